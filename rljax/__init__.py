"""rljax: TRPO, PPO and Direct Preference Optimization for language models in JAX/Flax.

Layer 1, the pure objectives, lives in :mod:`rljax.logprobs`, :mod:`rljax.advantages`,
:mod:`rljax.distributions`, :mod:`rljax.ppo`, :mod:`rljax.trpo`, :mod:`rljax.dpo` and
:mod:`rljax.reward`.
"""

from rljax import advantages, distributions, dpo, logprobs, ppo, reward, trpo

__version__ = "0.1.0"

__all__ = ["advantages", "distributions", "dpo", "logprobs", "ppo", "reward", "trpo"]
