"""Helpers shared by the rljax-side benchmark scripts (``dpo_speed.py``, ``lm_speed.py``,
``rlhf_speed.py``, ``step_speed.py``).

Not part of rljax. A script run as ``python benchmarks/X.py`` has this folder on ``sys.path``;
the scripts also put it there themselves, so that importing them from elsewhere (the tests'
``load_script``) finds ``_common`` too.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax.numpy as jnp

from rljax.models.transformer import TransformerConfig

#: The model-size flags of ``--vocab`` .. ``--intermediate-size``: ``(argparse dest,
#: TransformerConfig field, default)``. The defaults are the TRL peers' model
#: (``benchmarks/peers/_peer_common.py``'s ``llama_config``).
MODEL_SIZE_FLAGS = (
    ("vocab", "vocab_size", 2048),
    ("hidden", "hidden_size", 256),
    ("layers", "num_layers", 4),
    ("heads", "num_heads", 4),
    ("intermediate_size", "intermediate_size", 688),
)
#: The model sizes of ``--quick`` (by argparse dest).
QUICK_MODEL_SIZES = {"vocab": 256, "hidden": 64, "layers": 2, "heads": 2, "intermediate_size": 128}


def add_model_size_args(parser: argparse.ArgumentParser) -> None:
    """Add the integer flags of :data:`MODEL_SIZE_FLAGS` (``--vocab``, ``--hidden``,
    ``--layers``, ``--heads``, ``--intermediate-size``) with their defaults."""
    for dest, _, default in MODEL_SIZE_FLAGS:
        parser.add_argument("--" + dest.replace("_", "-"), type=int, default=default)


def use_quick_model_sizes(args: argparse.Namespace) -> None:
    """Set the model-size flags of ``args`` to :data:`QUICK_MODEL_SIZES` (``--quick``)."""
    for dest, value in QUICK_MODEL_SIZES.items():
        setattr(args, dest, value)


def model_config(args: argparse.Namespace) -> TransformerConfig:
    """The Llama-layout model of the model-size flags in float32, as ``transformers.LlamaConfig``
    lays out those sizes (untied LM head, RMSNorm eps 1e-6, RoPE theta 1e4), 256 positions: the
    model of the TRL peers."""
    sizes = {field: getattr(args, dest) for dest, field, _ in MODEL_SIZE_FLAGS}
    return TransformerConfig.llama(
        **sizes,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        dtype="float32",
        param_dtype="float32",
    )


def decode_step_bytes(
    config: TransformerConfig, batch: int, prompt_len: int, new_tokens: int
) -> tuple[int, float]:
    """``(parameter bytes, mean KV-cache bytes)`` that one KV-cache decode step reads at the
    least: every parameter in the compute dtype, and the keys and values of ``batch`` rows at
    the mean context length ``prompt_len + new_tokens / 2``. Their sum over the memory bandwidth
    is the step's bandwidth bound."""
    itemsize = jnp.dtype(config.dtype).itemsize
    param_bytes = config.num_params * itemsize  # decode reads weights in the compute dtype
    kv_per_token = 2 * config.num_layers * config.kv_heads * config.dim_per_head * itemsize
    mean_context = prompt_len + new_tokens / 2
    return param_bytes, kv_per_token * batch * mean_context


def write_json(path: str | pathlib.Path, record: dict, **dumps_kwargs) -> pathlib.Path:
    """Write ``record`` as indented JSON to ``path`` (creating its folder), print where, and
    return the path; ``dumps_kwargs`` go to ``json.dumps`` (``default=str``)."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, **dumps_kwargs))
    print(f"wrote {out}")
    return out
