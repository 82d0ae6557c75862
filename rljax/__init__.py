"""rljax: reinforcement learning for language models in JAX/Flax (TRPO, PPO, the GRPO family,
DPO, reward models).

The package is layered; a module imports only from its own layer and the layers below it
(tests/test_layering.py reads every import and enforces this):

1. **Objectives** (arrays in, ``(loss, metrics)`` out; no flax, no optax, no model code):
   :mod:`rljax.logprobs`, :mod:`rljax.advantages`, :mod:`rljax.distributions`,
   :mod:`rljax.ppo`, :mod:`rljax.trpo`, :mod:`rljax.dpo`, :mod:`rljax.reward`,
   :mod:`rljax.rlhf` (the RL policy-loss family and reward shaping), :mod:`rljax.sft`
   (supervised fine-tuning).
   Beside them, **infrastructure** used by every layer above: :mod:`rljax.checks`,
   :mod:`rljax.finite`, :mod:`rljax.sharding`, :mod:`rljax.checkpoint`, :mod:`rljax.runs`,
   :mod:`rljax.cli`, :mod:`rljax.launch`, :mod:`rljax.bench`.
2. **Models and data**: :mod:`rljax.models` (transformer, Hugging Face load/save, sampler,
   continuous-batching engine, MLPs, LoRA adapters; :mod:`rljax.lora` is :mod:`rljax.models.lora`), :mod:`rljax.data`, :mod:`rljax.envs`, :mod:`rljax.tasks`, :mod:`rljax.rewards`
   (reward functions on text).
3. **Updates**: :mod:`rljax.updates` binds objectives to models: each ``make_*_update``
   returns a pure ``update(state, batch) -> (state, metrics)``; :mod:`rljax.updates.lm` is the
   language-model glue (sequence log-probs, the reference pass, ``compile_update``).
4. **Drivers**: :mod:`rljax.experiment` (preference learning: DPO, reward models, iterative
   DPO), :mod:`rljax.rl` (RL on language models, one algorithm registry), :mod:`rljax.classic`
   (classic control, a whole run in one compiled function).
5. **Scripts**: ``experiments/*.py`` and ``benchmarks/`` (outside the package).

``import rljax`` imports neither JAX nor any module: each submodule is imported on first
attribute access (PEP 562), so ``import rljax`` followed by ``rljax.envs.make(...)``,
``rljax.classic.train_ppo(...)`` or ``rljax.models.hf.load_model(...)`` works as the README
writes it, and a script pays only for the modules it uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

__version__ = "0.1.0"

__all__ = ["advantages", "distributions", "dpo", "logprobs", "ppo", "reward", "rlhf", "sft", "trpo"]


def _lazy_getattr(package_name: str, package_path):
    """A PEP 562 ``__getattr__`` that imports ``<package_name>.<name>`` on first access."""

    def __getattr__(name: str):
        if not name.startswith("_") and importlib.util.find_spec(f"{package_name}.{name}"):
            return importlib.import_module(f"{package_name}.{name}")
        submodules = sorted(info.name for info in pkgutil.iter_modules(package_path))
        raise AttributeError(
            f"module {package_name!r} has no attribute {name!r}; its submodules are {submodules}"
        )

    return __getattr__


__getattr__ = _lazy_getattr(__name__, __path__)


def __dir__() -> list[str]:
    return sorted({*globals(), *(info.name for info in pkgutil.iter_modules(__path__))})


# Subpackages whose __init__ imports nothing get the same lazy access to their modules here,
# so ``rljax.models.hf`` works after ``import rljax`` however ``rljax.models`` gets imported.
# (A subpackage that defines its own ``__getattr__`` keeps it.)
for _name in ("models",):
    _package = importlib.import_module(f"{__name__}.{_name}")
    if "__getattr__" not in vars(_package):
        _package.__getattr__ = _lazy_getattr(_package.__name__, _package.__path__)
del _name, _package
