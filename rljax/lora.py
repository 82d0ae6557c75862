"""LoRA adapters (Hu et al., 2021, arXiv:2106.09685) under the short name of the package's
public API: ``rljax.lora.apply``, ``rljax.lora.merge``, ``rljax.lora.save_peft``,
``rljax.lora.load_peft``, ... are :mod:`rljax.models.lora`'s (documented there)."""

from __future__ import annotations

from rljax.models.lora import *  # noqa: F403
from rljax.models.lora import __all__  # noqa: F401
