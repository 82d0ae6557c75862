"""rljax: TRPO, PPO and Direct Preference Optimization for language models in JAX/Flax.

Layer 1, the pure objectives, lives in :mod:`rljax.logprobs`, :mod:`rljax.advantages`,
:mod:`rljax.distributions`, :mod:`rljax.ppo`, :mod:`rljax.trpo`, :mod:`rljax.dpo` and
:mod:`rljax.reward`.

``import rljax`` imports neither JAX nor any objective: each submodule is imported on first
attribute access (PEP 562), so ``import rljax`` followed by ``rljax.envs.make(...)``,
``rljax.classic.train_ppo(...)`` or ``rljax.models.hf.load_model(...)`` works as the README
writes it, and a script pays only for the modules it uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

__version__ = "0.1.0"

__all__ = ["advantages", "distributions", "dpo", "logprobs", "ppo", "reward", "trpo"]


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
