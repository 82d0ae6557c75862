"""Updates: the objectives bound to models, each a pure ``update(state, batch) -> (state,
metrics)`` to jit with explicit shardings (layer 3 of the package).

The objectives (:mod:`rljax.ppo`, :mod:`rljax.trpo`, :mod:`rljax.dpo`, :mod:`rljax.reward`,
:mod:`rljax.rlhf`, :mod:`rljax.sft`) are arrays in, arrays out; the modules here add what a
training step needs around them: a train state, an optimizer, minibatches and epochs, the
non-finite guard, and for language models the forward passes that turn tokens into log-probs
(:mod:`.lm`).

* :mod:`.ppo`: :class:`PPOConfig`, :class:`PPOState` (the one train-state layout of the
  policy-gradient family), :func:`minibatch_epochs` / :func:`epochs_step` (the one
  minibatch/epoch loop), :func:`make_ppo_update` over pure policy/value functions.
* :mod:`.trpo`: :class:`TRPOConfig`, :func:`make_trpo_update` (its state is a
  :class:`PPOState` too; the critic is fitted by :func:`minibatch_epochs`).
* :mod:`.dpo`, :mod:`.kto`, :mod:`.reference_free` (ORPO, CPO, SimPO), :mod:`.reward`: the
  preference updates on a language model.
* :mod:`.sft`: supervised fine-tuning on padded or packed rows.
* :mod:`.rlhf`, :mod:`.grpo`: PPO, TRPO and the GRPO family on a policy language model.
* :mod:`.lm`: log-probs of token sequences, the reference pass, ``compile_update``.
* :mod:`.common`: what the updates share: the ``hyperparams`` overrides (validated and
  merged once for DPO, PPO, TRPO and their language-model variants: the swept coefficients
  are traced, so a sweep compiles once), the one-optax-step update of SFT / reward / DPO /
  KTO (:class:`.common.OptaxState`), the batch-key check.

Every public name of those modules is importable from here (``rljax.updates.PPOConfig``).
"""

from __future__ import annotations

from rljax.updates.dpo import *  # noqa: F403
from rljax.updates.dpo import __all__ as _dpo
from rljax.updates.grpo import *  # noqa: F403
from rljax.updates.grpo import __all__ as _grpo
from rljax.updates.kto import *  # noqa: F403
from rljax.updates.kto import __all__ as _kto
from rljax.updates.ppo import *  # noqa: F403
from rljax.updates.ppo import __all__ as _ppo
from rljax.updates.reference_free import *  # noqa: F403
from rljax.updates.reference_free import __all__ as _reference_free
from rljax.updates.reward import *  # noqa: F403
from rljax.updates.reward import __all__ as _reward
from rljax.updates.rlhf import *  # noqa: F403
from rljax.updates.rlhf import __all__ as _rlhf
from rljax.updates.sft import *  # noqa: F403
from rljax.updates.sft import __all__ as _sft
from rljax.updates.trpo import *  # noqa: F403
from rljax.updates.trpo import __all__ as _trpo

__all__ = [*_dpo, *_grpo, *_kto, *_ppo, *_reference_free, *_reward, *_rlhf, *_sft, *_trpo]
