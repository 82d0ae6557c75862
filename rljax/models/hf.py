"""Load and save Hugging Face checkpoint folders (``config.json`` + safetensors) as
:class:`~rljax.models.transformer.Transformer` models.

Supported ``model_type``\\ s: ``gpt2``, ``llama``, ``mistral``, ``qwen2``, ``qwen3``, the
mixtures of experts ``qwen3_moe`` and ``mixtral``, and ``gemma2`` and ``gemma3_text`` (Gemma 3's
text model, ``Gemma3ForCausalLM``); sliding windows included (causal LMs, and their
``*ForSequenceClassification`` reward models with one label). Weights are read
with the ``safetensors`` package's numpy API (bfloat16 through ``ml_dtypes``; no torch needed);
pickle files (``pytorch_model.bin``, ``*.pt``) are never opened.

How names map: each family has a table of :class:`TensorMap` rows, *our parameter <- HF tensor,
layout*. A layout is an einops-style pattern from the HF tensor's axes to ours, e.g.
``"(N H) D -> D N H"`` for a Llama ``q_proj.weight`` (PyTorch ``Linear`` stores ``(out, in)``;
we store ``[D, N, H]``). A numeral in the HF side is a packed axis: GPT-2's ``c_attn.weight`` is
``"D (3 N H)"`` (``Conv1D`` stores ``(in, out)``, with q, k and v side by side), and the rows for
``q``/``k``/``v`` take parts 0/1/2 of it. ``{i}`` is the layer index (our per-layer parameters are
stacked on a leading ``layers`` axis) and ``{base}`` the base model's prefix (``model.`` or
``transformer.``; checkpoints of the bare base model have none). Saving runs the same table
backwards.

Usage::

    model = load_model("path/to/Qwen2.5-0.5B", param_dtype="bfloat16")
    tokenizer = load_tokenizer("path/to/Qwen2.5-0.5B")
    critic = load_model("path/to/Qwen2.5-0.5B", head="value")  # LM + a fresh value head
    # A one-label *ForSequenceClassification checkpoint: its score.weight is the reward head.
    reward_model = load_model("path/to/reward-model", head="reward")
    rewards = reward_model.rewards(tokens, mask)  # [B], read at the last valid token
    save_model(model, "out/")  # transformers.AutoModelForCausalLM.from_pretrained("out/") loads it
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from flax import nnx

from rljax.models.transformer import ACTIVATIONS, ROPE_TYPES, Transformer, TransformerConfig

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TensorMap",
    "config_from_hf",
    "hf_config_from",
    "load_model",
    "load_tokenizer",
    "save_model",
]

SUPPORTED_MODEL_TYPES = (
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "gemma2",
    "gemma3_text",
)
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # never opened
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ---------------------------------------------------------------------------- mapping tables


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One row of a family's table: our parameter ``ours`` <- the HF tensor ``hf``.

    Attributes:
      ours: our parameter's name, ``"embed"`` or ``"layers.q"`` (stacked over layers).
      hf: the HF tensor name; ``{base}`` is the base model's prefix, ``{i}`` the layer index.
      layout: ``"<HF axes> -> <our axes>"`` with axis letters ``V`` vocab, ``P`` positions,
        ``D`` width, ``N``/``K`` query/key-value heads, ``H`` head width, ``F`` MLP width;
        ``(N H)`` is one HF axis of size ``N * H``; a numeral is a packed axis of that size.
      part: which slice of the packed axis this parameter is.
    """

    ours: str
    hf: str
    layout: str
    part: int = 0


T = TensorMap
_LLAMA_LAYER = "{base}layers.{i}."
LLAMA_TABLE = (
    T("embed", "{base}embed_tokens.weight", "V D -> V D"),
    T("final_norm_scale", "{base}norm.weight", "D -> D"),
    T("lm_head", "lm_head.weight", "V D -> D V"),
    T("score", "score.weight", "1 D -> D"),
    T("layers.attn_norm_scale", _LLAMA_LAYER + "input_layernorm.weight", "D -> D"),
    T("layers.q", _LLAMA_LAYER + "self_attn.q_proj.weight", "(N H) D -> D N H"),
    T("layers.k", _LLAMA_LAYER + "self_attn.k_proj.weight", "(K H) D -> D K H"),
    T("layers.v", _LLAMA_LAYER + "self_attn.v_proj.weight", "(K H) D -> D K H"),
    T("layers.o", _LLAMA_LAYER + "self_attn.o_proj.weight", "D (N H) -> N H D"),
    T("layers.q_bias", _LLAMA_LAYER + "self_attn.q_proj.bias", "(N H) -> N H"),
    T("layers.k_bias", _LLAMA_LAYER + "self_attn.k_proj.bias", "(K H) -> K H"),
    T("layers.v_bias", _LLAMA_LAYER + "self_attn.v_proj.bias", "(K H) -> K H"),
    T("layers.o_bias", _LLAMA_LAYER + "self_attn.o_proj.bias", "D -> D"),
    T("layers.mlp_norm_scale", _LLAMA_LAYER + "post_attention_layernorm.weight", "D -> D"),
    T("layers.gate", _LLAMA_LAYER + "mlp.gate_proj.weight", "F D -> D F"),
    T("layers.up", _LLAMA_LAYER + "mlp.up_proj.weight", "F D -> D F"),
    T("layers.down", _LLAMA_LAYER + "mlp.down_proj.weight", "D F -> F D"),
    T("layers.gate_bias", _LLAMA_LAYER + "mlp.gate_proj.bias", "F -> F"),
    T("layers.up_bias", _LLAMA_LAYER + "mlp.up_proj.bias", "F -> F"),
    T("layers.down_bias", _LLAMA_LAYER + "mlp.down_proj.bias", "D -> D"),
)
# Qwen3: Llama's tensors plus an RMSNorm scale on each head's queries and keys.
_QK_NORMS = (
    T("layers.q_norm_scale", _LLAMA_LAYER + "self_attn.q_norm.weight", "H -> H"),
    T("layers.k_norm_scale", _LLAMA_LAYER + "self_attn.k_norm.weight", "H -> H"),
)
QWEN3_TABLE = (*LLAMA_TABLE, *_QK_NORMS)
# Gemma 2: Llama's tensors, but four norms per layer: input_layernorm before attention,
# post_attention_layernorm on its output (not before the MLP, as in Llama),
# pre_feedforward_layernorm before the MLP and post_feedforward_layernorm on its output.
# Gemma 3 (text) adds Qwen3's per-head query/key norms.
GEMMA2_TABLE = (
    *(e for e in LLAMA_TABLE if e.ours != "layers.mlp_norm_scale"),
    T("layers.post_attn_norm_scale", _LLAMA_LAYER + "post_attention_layernorm.weight", "D -> D"),
    T("layers.mlp_norm_scale", _LLAMA_LAYER + "pre_feedforward_layernorm.weight", "D -> D"),
    T("layers.post_mlp_norm_scale", _LLAMA_LAYER + "post_feedforward_layernorm.weight", "D -> D"),
)
GEMMA3_TABLE = (*GEMMA2_TABLE, *_QK_NORMS)


# Mixtures of experts: the attention of Qwen3 (Qwen3-MoE) or Llama (Mixtral), and per layer a
# router and E SwiGLU experts, one tensor per (layer, expert) ({e}: the expert index), as
# transformers' save_pretrained writes them (its in-memory experts.gate_up_proj is fused).
def _experts(mlp: str, gate: str, up: str, down: str) -> tuple[TensorMap, ...]:
    """The router and the per-expert SwiGLU tensors under the layer's ``mlp`` prefix, the
    experts' projections named ``gate``, ``up`` and ``down`` by the checkpoint."""
    prefix = _LLAMA_LAYER + mlp
    return (
        TensorMap("layers.router", prefix + "gate.weight", "E D -> D E"),
        TensorMap("layers.expert_gate", prefix + "experts.{e}." + gate + ".weight", "F D -> D F"),
        TensorMap("layers.expert_up", prefix + "experts.{e}." + up + ".weight", "F D -> D F"),
        TensorMap("layers.expert_down", prefix + "experts.{e}." + down + ".weight", "D F -> F D"),
    )


QWEN3_MOE_TABLE = (*QWEN3_TABLE, *_experts("mlp.", "gate_proj", "up_proj", "down_proj"))
MIXTRAL_TABLE = (*LLAMA_TABLE, *_experts("block_sparse_moe.", "w1", "w3", "w2"))
_GPT2_LAYER = "{base}h.{i}."
GPT2_TABLE = (
    T("embed", "{base}wte.weight", "V D -> V D"),
    T("pos_embed", "{base}wpe.weight", "P D -> P D"),
    T("final_norm_scale", "{base}ln_f.weight", "D -> D"),
    T("final_norm_bias", "{base}ln_f.bias", "D -> D"),
    T("lm_head", "lm_head.weight", "V D -> D V"),
    T("score", "score.weight", "1 D -> D"),
    T("layers.attn_norm_scale", _GPT2_LAYER + "ln_1.weight", "D -> D"),
    T("layers.attn_norm_bias", _GPT2_LAYER + "ln_1.bias", "D -> D"),
    T("layers.q", _GPT2_LAYER + "attn.c_attn.weight", "D (3 N H) -> D N H", part=0),
    T("layers.k", _GPT2_LAYER + "attn.c_attn.weight", "D (3 N H) -> D N H", part=1),
    T("layers.v", _GPT2_LAYER + "attn.c_attn.weight", "D (3 N H) -> D N H", part=2),
    T("layers.q_bias", _GPT2_LAYER + "attn.c_attn.bias", "(3 N H) -> N H", part=0),
    T("layers.k_bias", _GPT2_LAYER + "attn.c_attn.bias", "(3 N H) -> N H", part=1),
    T("layers.v_bias", _GPT2_LAYER + "attn.c_attn.bias", "(3 N H) -> N H", part=2),
    T("layers.o", _GPT2_LAYER + "attn.c_proj.weight", "(N H) D -> N H D"),
    T("layers.o_bias", _GPT2_LAYER + "attn.c_proj.bias", "D -> D"),
    T("layers.mlp_norm_scale", _GPT2_LAYER + "ln_2.weight", "D -> D"),
    T("layers.mlp_norm_bias", _GPT2_LAYER + "ln_2.bias", "D -> D"),
    T("layers.up", _GPT2_LAYER + "mlp.c_fc.weight", "D F -> D F"),
    T("layers.up_bias", _GPT2_LAYER + "mlp.c_fc.bias", "F -> F"),
    T("layers.down", _GPT2_LAYER + "mlp.c_proj.weight", "F D -> F D"),
    T("layers.down_bias", _GPT2_LAYER + "mlp.c_proj.bias", "D -> D"),
)
del T


@dataclasses.dataclass(frozen=True)
class _Family:
    table: tuple[TensorMap, ...]
    base_prefix: str  # the base model's attribute in *ForCausalLM / *ForSequenceClassification
    ignorable: re.Pattern  # buffers some checkpoints carry that are not parameters
    causal_lm: str
    sequence_classification: str


_FAMILIES = {
    "gpt2": _Family(
        GPT2_TABLE,
        "transformer.",
        re.compile(r"(^|\.)attn\.(bias|masked_bias)$"),
        "GPT2LMHeadModel",
        "GPT2ForSequenceClassification",
    ),
    **{
        model_type: _Family(
            LLAMA_TABLE,
            "model.",
            re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
            f"{name}ForCausalLM",
            f"{name}ForSequenceClassification",
        )
        for model_type, name in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"))
    },
    "qwen3": _Family(
        QWEN3_TABLE,
        "model.",
        re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
        "Qwen3ForCausalLM",
        "Qwen3ForSequenceClassification",
    ),
    "gemma2": _Family(
        GEMMA2_TABLE,
        "model.",
        re.compile(r"(^|\.)rotary_emb\.\w*inv_freq$"),
        "Gemma2ForCausalLM",
        "Gemma2ForSequenceClassification",
    ),
    "gemma3_text": _Family(
        GEMMA3_TABLE,
        "model.",
        re.compile(r"(^|\.)rotary_emb\.\w*inv_freq$"),
        "Gemma3ForCausalLM",
        "Gemma3TextForSequenceClassification",
    ),
    "qwen3_moe": _Family(
        QWEN3_MOE_TABLE,
        "model.",
        re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
        "Qwen3MoeForCausalLM",
        "Qwen3MoeForSequenceClassification",
    ),
    "mixtral": _Family(
        MIXTRAL_TABLE,
        "model.",
        re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
        "MixtralForCausalLM",
        "MixtralForSequenceClassification",
    ),
}


def _parse_layout(layout: str):
    """``"D (3 N H) -> D N H"`` -> HF axis groups ``[["D"], [3, "N", "H"]]`` and our axes
    ``["D", "N", "H"]``."""
    hf_side, ours_side = (s.strip() for s in layout.split("->"))
    groups = [
        [int(a) if a.isdigit() else a for a in (g[0] or g[1]).split()]
        for g in re.findall(r"\(([^)]*)\)|(\S+)", hf_side)
    ]
    return groups, ours_side.split()


def _hf_shape(groups, sizes) -> tuple[int, ...]:
    return tuple(math.prod(a if isinstance(a, int) else sizes[a] for a in g) for g in groups)


def _from_hf(array: np.ndarray, entry: TensorMap, sizes) -> np.ndarray:
    """One HF tensor (one layer) -> our layout (without the layers axis)."""
    groups, ours = _parse_layout(entry.layout)
    atoms = [a for g in groups for a in g]
    x = array.reshape([a if isinstance(a, int) else sizes[a] for a in atoms])
    packed = [j for j, a in enumerate(atoms) if isinstance(a, int)]
    if packed:
        x = np.take(x, entry.part, axis=packed[0])
        atoms = [a for a in atoms if not isinstance(a, int)]
    return np.transpose(x, [atoms.index(a) for a in ours])


def _to_hf(arrays: Sequence[np.ndarray], entries: Sequence[TensorMap], sizes) -> np.ndarray:
    """Our arrays (one layer; one per part of a packed tensor, in part order) -> the HF tensor."""
    groups, ours = _parse_layout(entries[0].layout)
    atoms = [a for g in groups for a in g]
    symbols = [a for a in atoms if not isinstance(a, int)]
    parts = [np.transpose(x, [ours.index(a) for a in symbols]) for x in arrays]
    packed = [j for j, a in enumerate(atoms) if isinstance(a, int)]
    x = np.stack(parts, axis=packed[0]) if packed else parts[0]
    return np.ascontiguousarray(x.reshape(_hf_shape(groups, sizes)))


# The letters of the weight-shape specs and the TransformerConfig fields they stand for.
_SIZE_FIELDS = {
    "V": "vocab_size",
    "P": "max_position_embeddings",
    "D": "hidden_size",
    "N": "num_heads",
    "K": "kv_heads",
    "H": "dim_per_head",
    "F": "mlp_size",
    "E": "num_experts",
}


def _sizes(config: TransformerConfig) -> dict[str, int]:
    return {letter: getattr(config, field) for letter, field in _SIZE_FIELDS.items()}


# ---------------------------------------------------------------------------- config.json


def _read_config_json(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path!r} is not a local folder. Download the checkpoint first, e.g. "
            f"huggingface_hub.snapshot_download(repo_id, local_dir=..., "
            f"allow_patterns=['*.json', '*.safetensors', 'tokenizer*'])"
        )
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file} is missing: a Hugging Face checkpoint folder needs config.json next to its "
            f"safetensors weights (save the model with save_pretrained, or copy config.json in)"
        )
    with open(file) as f:
        return json.load(f)


def _check_model_type(model_type: str | None) -> str:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    return model_type


def _rope_fields(hf_config) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5; older configs: ``rope_theta``/``rope_scaling``) ->
    ``rope_theta``, ``rope_type``, ``rope_scaling``."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(
            f"per-layer-type rope_parameters {sorted(params)} are not supported (one RoPE for "
            f"every layer only)"
        )
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None)
    theta = 10000.0 if theta is None else float(theta)
    partial = params.pop("partial_rotary_factor", None)
    if partial is not None and float(partial) != 1.0:
        raise ValueError(
            f"partial_rotary_factor={partial} is not supported (RoPE over the whole head only)"
        )
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES} (dynamic NTK and "
            f"longrope scale with the sequence length at run time, which a static config cannot)"
        )
    scaling = () if rope_type == "default" else tuple(sorted(params.items()))
    return dict(rope_theta=theta, rope_type=rope_type, rope_scaling=scaling)


# TransformerConfig fields and their names in the families' ``transformers`` configs (None:
# that family's config has no such field): config_from_hf reads through this table and
# hf_config_from writes through it.
_CONFIG_NAMES = (
    # ours, GPT-2's, Llama's (and Qwen2's, Qwen3's, Mistral's)
    ("vocab_size", "vocab_size", "vocab_size"),
    ("hidden_size", "n_embd", "hidden_size"),
    ("num_layers", "n_layer", "num_hidden_layers"),
    ("num_heads", "n_head", "num_attention_heads"),
    ("num_kv_heads", None, "num_key_value_heads"),
    ("head_dim", None, "head_dim"),
    ("intermediate_size", "n_inner", "intermediate_size"),
    ("max_position_embeddings", "n_positions", "max_position_embeddings"),
    ("hidden_act", "activation_function", "hidden_act"),
    ("norm_eps", "layer_norm_epsilon", "rms_norm_eps"),
)
# Fields whose value to save is the property that resolves their ``None`` default.
_RESOLVED = {
    "num_kv_heads": "kv_heads",
    "head_dim": "dim_per_head",
    "intermediate_size": "mlp_size",
}


def _config_names(family: str) -> dict[str, str]:
    """Our field -> the ``transformers`` config's, for ``family`` (``"gpt2"``, ``"llama"`` or
    ``"gemma"``)."""
    column = 1 if family == "gpt2" else 2
    names = {row[0]: row[column] for row in _CONFIG_NAMES if row[column] is not None}
    if family == "gemma":  # Gemma's configs name the activation hidden_activation
        names["hidden_act"] = "hidden_activation"
    return names


def _read_names(hf, family: str) -> dict[str, Any]:
    """The fields of :data:`_CONFIG_NAMES` read off a ``transformers`` config (None where it
    lacks one)."""
    return {ours: getattr(hf, theirs, None) for ours, theirs in _config_names(family).items()}


def _gpt2_fields(hf) -> dict[str, Any]:
    unsupported = {
        "scale_attn_by_inverse_layer_idx": (True, "attention scaled by 1/(layer index + 1)"),
        "reorder_and_upcast_attn": (True, "keys scaled before the dot product, float32 upcast"),
        "add_cross_attention": (True, "cross-attention layers (encoder-decoder use)"),
        "scale_attn_weights": (False, "attention logits without the 1/sqrt(head_dim) scale"),
    }
    for name, (bad, what) in unsupported.items():
        if bool(getattr(hf, name, not bad)) == bad:
            raise ValueError(
                f"GPT-2 option {name}={bad} ({what}) is not implemented; only the standard "
                f"GPT-2 attention is"
            )
    fields = _read_names(hf, "gpt2")
    return dict(
        fields,
        family="gpt2",
        num_kv_heads=None,
        intermediate_size=fields["intermediate_size"] or 4 * fields["hidden_size"],
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    )


def _llama_fields(hf) -> dict[str, Any]:
    if hf.model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:  # llama, qwen3 (attention_bias: all four projections), mistral (no biases)
        qkv_bias = o_bias = bool(getattr(hf, "attention_bias", False))
        mlp_bias = bool(getattr(hf, "mlp_bias", False))  # Qwen3's config has no mlp_bias
    fields = _read_names(hf, "llama")
    return dict(
        fields,
        family="llama",
        num_kv_heads=fields["num_kv_heads"] or fields["num_heads"],
        head_dim=fields["head_dim"] or fields["hidden_size"] // fields["num_heads"],
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=hf.model_type in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        **_rope_fields(hf),
    )


def _moe_fields(hf) -> dict[str, Any]:
    """The mixture-of-experts fields of a ``qwen3_moe`` or ``mixtral`` config (``{}`` for
    others, and for a Qwen3-MoE config with ``num_experts=0``: every layer dense); raises
    ``ValueError`` naming an option that is not implemented."""
    if hf.model_type == "mixtral":
        jitter = float(getattr(hf, "router_jitter_noise", 0.0) or 0.0)
        if jitter:
            raise ValueError(
                f"router_jitter_noise={jitter} is not supported (transformers multiplies the "
                f"router's input by uniform noise while training); set it to 0.0"
            )
        experts, width, normalize = hf.num_local_experts, hf.intermediate_size, True
    elif hf.model_type == "qwen3_moe" and hf.num_experts:
        step, dense = hf.decoder_sparse_step, list(hf.mlp_only_layers or [])
        if step != 1:
            raise ValueError(
                f"decoder_sparse_step={step} is not supported: every layer must be sparse "
                f"(mixing dense and expert layers breaks the stacked layer scan)"
            )
        if dense:
            raise ValueError(
                f"mlp_only_layers={dense} is not supported: every layer must be sparse "
                f"(mixing dense and expert layers breaks the stacked layer scan)"
            )
        experts, width, normalize = hf.num_experts, hf.moe_intermediate_size, hf.norm_topk_prob
    else:
        return {}
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(hf.num_experts_per_tok),
        norm_topk_prob=bool(normalize),
        intermediate_size=int(width),
        router_aux_loss_coef=float(hf.router_aux_loss_coef),
    )


def _window_fields(hf) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` of a Llama-family config (Jiang et al., 2023,
    Mistral). Mistral, Mixtral and Qwen3-MoE slide every layer when ``sliding_window`` is set
    (Qwen3-MoE's config clears it unless ``use_sliding_window``); Qwen2 and Qwen3 only with
    ``use_sliding_window``, on the layers ``layer_types`` marks (by default those from
    ``max_window_layers`` on). Llama has no window."""
    window = getattr(hf, "sliding_window", None)
    if window is None:
        return {}
    if hf.model_type in ("qwen2", "qwen3"):
        layer_types = tuple(getattr(hf, "layer_types", None) or ())
        if not getattr(hf, "use_sliding_window", False) or "sliding_attention" not in layer_types:
            return {}
        return dict(sliding_window=int(window), layer_types=layer_types)
    return dict(sliding_window=int(window))


_GEMMA_TYPES = ("gemma2", "gemma3_text")


def _gemma_rope_fields(hf) -> dict[str, Any]:
    """Gemma 3's two RoPEs: ``rope_parameters["full_attention"]`` (any supported scaling) for
    the global layers and ``["sliding_attention"]`` (Gemma 3's ``rope_local_base_freq``,
    unscaled) for the sliding ones; Gemma 2 has one."""
    params = getattr(hf, "rope_parameters", None) or {}
    if hf.model_type == "gemma2" or "full_attention" not in params:
        return _rope_fields(hf)
    fields = _rope_fields(types.SimpleNamespace(rope_parameters=params["full_attention"]))
    local = dict(params.get("sliding_attention") or {"rope_theta": fields["rope_theta"]})
    kind = local.pop("rope_type", None) or local.pop("type", None) or "default"
    local.pop("type", None)
    theta = local.pop("rope_theta", None)
    partial = local.pop("partial_rotary_factor", None)
    if kind != "default" or (partial is not None and float(partial) != 1.0):
        raise ValueError(
            f"rope_parameters['sliding_attention'] = {params['sliding_attention']} is not "
            f"supported: the sliding layers' RoPE must be rope_type 'default' over the whole head"
        )
    sliding = "sliding_attention" in (getattr(hf, "layer_types", None) or ())
    if sliding and getattr(hf, "sliding_window", None) is not None:
        fields["rope_local_theta"] = float(fields["rope_theta"] if theta is None else theta)
    return fields


def _gemma_fields(hf) -> dict[str, Any]:
    """Gemma 2 (Gemma Team, 2024, arXiv:2408.00118) and Gemma 3 text (Gemma Team, 2025,
    arXiv:2503.19786) configs: sliding and global layers, soft-caps, ``query_pre_attn_scalar``,
    Gemma 3's q/k norms and local RoPE."""
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError(
            "use_bidirectional_attention=True (non-causal attention, as in embedding models) is "
            "not supported: rljax's transformers are causal language models"
        )
    gemma3 = hf.model_type == "gemma3_text"
    window = getattr(hf, "sliding_window", None)
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    if window is None and "sliding_attention" in layer_types:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
    attn_cap = getattr(hf, "attn_logit_softcapping", None)
    if gemma3 and attn_cap is not None:
        warnings.warn(
            f"attn_logit_softcapping={attn_cap} is ignored: transformers' Gemma 3 attention "
            f"does not apply it (the released Gemma 3 configs set it to null)",
            stacklevel=3,
        )
        attn_cap = None
    final_cap = getattr(hf, "final_logit_softcapping", None)
    fields = _read_names(hf, "gemma")
    bias = bool(getattr(hf, "attention_bias", False))
    return dict(
        fields,
        family="gemma",
        num_kv_heads=fields["num_kv_heads"] or fields["num_heads"],
        head_dim=fields["head_dim"] or fields["hidden_size"] // fields["num_heads"],
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        qk_norm=gemma3,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        sliding_window=None if window is None else int(window),
        layer_types=(layer_types or None) if window is not None else None,
        query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
        attn_logit_softcap=None if attn_cap is None else float(attn_cap),
        final_logit_softcap=None if final_cap is None else float(final_cap),
        **_gemma_rope_fields(hf),
    )


def config_from_hf(hf_config, **overrides) -> TransformerConfig:
    """A :class:`TransformerConfig` from a ``transformers`` config (or a ``config.json`` dict).

    Args:
      hf_config: a ``transformers.PreTrainedConfig`` of a supported ``model_type``, or the dict
        of a ``config.json``.
      **overrides: :class:`TransformerConfig` fields to set (``param_dtype``, ``dtype``,
        ``head``, ``remat``, ``attention_impl``, ``max_position_embeddings``, ...).
        ``head="reward"`` also sets ``lm_head=False`` unless given.

    Raises:
      ValueError: unsupported ``model_type``, RoPE type, GPT-2 or Gemma option, activation,
        or an unknown override.
    """
    if isinstance(hf_config, Mapping):
        import transformers

        kwargs = dict(hf_config)
        model_type = _check_model_type(kwargs.pop("model_type", None))
        hf_config = transformers.AutoConfig.for_model(model_type, **kwargs)
    model_type = _check_model_type(getattr(hf_config, "model_type", None))
    if model_type == "gpt2":
        fields = _gpt2_fields(hf_config)
    elif model_type in _GEMMA_TYPES:
        fields = _gemma_fields(hf_config)
    else:
        fields = {**_llama_fields(hf_config), **_window_fields(hf_config)}
    fields.update(_moe_fields(hf_config))
    if fields["hidden_act"] not in ACTIVATIONS:
        raise ValueError(
            f"activation {fields['hidden_act']!r} is not supported; supported: "
            f"{sorted(ACTIVATIONS)}"
        )
    fields["initializer_range"] = float(getattr(hf_config, "initializer_range", 0.02))
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown TransformerConfig field(s) {unknown}; known: {sorted(known)}")
    if overrides.get("head") == "reward":
        overrides.setdefault("lm_head", False)
        labels = getattr(hf_config, "num_labels", 1)
        archs = getattr(hf_config, "architectures", None) or []
        if any(a.endswith("ForSequenceClassification") for a in archs) and labels != 1:
            raise ValueError(
                f"head='reward' needs a one-label *ForSequenceClassification checkpoint; this "
                f"one has num_labels={labels}"
            )
    return TransformerConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------- safetensors


class _Checkpoint(contextlib.ExitStack):
    """The tensors of a checkpoint folder: ``model.safetensors`` or an index of shards (a
    context manager that closes the files)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        super().__init__()
        self.path = path
        single, index = os.path.join(path, SAFE_WEIGHTS), os.path.join(path, SAFE_INDEX)
        if os.path.isfile(single):
            files = [SAFE_WEIGHTS]
            self.where = SAFE_WEIGHTS
        elif os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            self.where = f"the shards listed in {SAFE_INDEX}"
            for file in files:
                if not os.path.isfile(os.path.join(path, file)):
                    raise FileNotFoundError(f"{SAFE_INDEX} lists {file}, which is not in {path}")
        else:
            pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise FileNotFoundError(
                    f"{path} has only PyTorch pickle weights ({', '.join(pickles)}), which rljax "
                    f"never unpickles. Convert them to safetensors once, in a trusted "
                    f"environment: transformers.AutoModelForCausalLM.from_pretrained(path)"
                    f".save_pretrained(out_dir) (writes model.safetensors)"
                )
            raise FileNotFoundError(f"{path} has no {SAFE_WEIGHTS} and no {SAFE_INDEX}")
        self._handles = {
            f: self.enter_context(safe_open(os.path.join(path, f), framework="np")) for f in files
        }
        self.file_of = {name: f for f, handle in self._handles.items() for name in handle.keys()}

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> np.ndarray:
        if name not in self.file_of:
            raise ValueError(f"tensor {name!r} is missing from {self.where} in {self.path}")
        return self._handles[self.file_of[name]].get_tensor(name)


_TOP_LEVEL = ("embed", "pos_embed", "final_norm_scale", "final_norm_bias", "lm_head", "score")


def _names(model: Transformer) -> tuple[TransformerConfig, dict[str, nnx.Param]]:
    """The model's config and its parameters by table name (``"embed"``, ``"layers.q"``)."""
    params = {}
    for name in (*_TOP_LEVEL, "score_bias"):
        if getattr(model, name, None) is not None:
            params[name] = getattr(model, name)
    for name, var in model.layers.items():
        params[f"layers.{name}"] = var
    return model.config, params


def _layout_rows(family: _Family, params: Mapping[str, Any], fresh: set[str]):
    rows = [e for e in family.table if e.ours in params and e.ours not in fresh]
    covered = {e.ours for e in rows} | fresh
    uncovered = sorted(set(params) - covered)
    if uncovered:  # a parameter the table cannot fill: a bug in this module or the model
        raise RuntimeError(f"no checkpoint tensor maps to parameter(s) {uncovered}")
    return rows


def _hf_slots(
    entry: TensorMap, base: str, num_layers: int, num_experts: int = 0
) -> list[tuple[str, tuple[int, ...]]]:
    """The HF tensors of a table row and the index of each in our parameter: ``()`` for a
    top-level one, ``(i,)`` per layer, ``(i, e)`` per layer and expert (an ``{e}`` row)."""
    if not entry.ours.startswith("layers."):
        return [(entry.hf.format(base=base), ())]
    if "{e}" in entry.hf:
        return [
            (entry.hf.format(base=base, i=i, e=e), (i, e))
            for i in range(num_layers)
            for e in range(num_experts)
        ]
    return [(entry.hf.format(base=base, i=i), (i,)) for i in range(num_layers)]


def _hf_names(entry: TensorMap, base: str, num_layers: int, num_experts: int = 0) -> list[str]:
    """The HF tensor names of a table row: one per layer (and expert) for a per-layer one."""
    return [name for name, _ in _hf_slots(entry, base, num_layers, num_experts)]


def _by_hf(rows: Sequence[TensorMap]) -> dict[str, list[TensorMap]]:
    """Table rows grouped by HF tensor: one read or write per HF tensor (GPT-2's packed
    ``c_attn`` feeds q, k and v)."""
    by_hf: dict[str, list[TensorMap]] = {}
    for entry in rows:
        by_hf.setdefault(entry.hf, []).append(entry)
    return by_hf


def _check_present(checkpoint: _Checkpoint, config: TransformerConfig, head, wanted) -> None:
    """Raise for a reward checkpoint loaded without ``head="reward"`` or a tensor in ``wanted``
    that the checkpoint lacks, with a hint at the fix."""
    path, available = checkpoint.path, checkpoint.names()
    untied_lm = config.lm_head and not config.tie_word_embeddings
    if head is None and untied_lm and "score.weight" in available:
        if "lm_head.weight" not in available:
            raise ValueError(
                f"{path} is a *ForSequenceClassification checkpoint (score.weight, no "
                f"lm_head.weight): pass head='reward' to load its reward head"
            )
    missing = [n for n in dict.fromkeys(wanted) if n not in available]
    if missing:
        hint = ""
        if "score.weight" in missing:
            hint = (
                " (head='reward' reads the score.weight of a *ForSequenceClassification "
                "checkpoint; for a causal LM use head='value' for a fresh head)"
            )
        elif "lm_head.weight" in missing:
            hint = (
                " (config.json says tie_word_embeddings=false; if the output projection is the "
                "embedding, pass tie_word_embeddings=True)"
            )
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(
            f"tensor {missing[0]!r}{more} is missing from {checkpoint.where} in {path}{hint}"
        )


def _read_tensors(
    checkpoint: _Checkpoint, rows: Sequence[TensorMap], base: str, config: TransformerConfig
) -> dict[str, np.ndarray]:
    """Our parameters by table name, read through the rows' layouts and cast to
    ``param_dtype`` on the host (per-layer ones stacked on a leading axis, per-expert ones on
    a second)."""
    sizes, layers = _sizes(config), config.num_layers
    np_dtype = jnp.dtype(config.param_dtype)
    values: dict[str, np.ndarray] = {}
    for entries in _by_hf(rows).values():
        groups, _ = _parse_layout(entries[0].layout)
        expected = _hf_shape(groups, sizes)
        for name, index in _hf_slots(entries[0], base, layers, config.num_experts):
            array = checkpoint.get(name)
            if tuple(array.shape) != expected:
                raise ValueError(
                    f"tensor {name!r} in {checkpoint.file_of[name]} has shape "
                    f"{tuple(array.shape)}, expected {expected} for this config.json"
                )
            for entry in entries:
                ours = _from_hf(array, entry, sizes).astype(np_dtype)
                if index:
                    if entry.ours not in values:
                        stacked = (layers, config.num_experts)[: len(index)]
                        values[entry.ours] = np.empty((*stacked, *ours.shape), np_dtype)
                    values[entry.ours][index] = ours
                else:
                    values[entry.ours] = ours
    return values


def _check_unused(checkpoint: _Checkpoint, model_type: str, config, head, wanted, values) -> None:
    """Raise for a checkpoint tensor that no parameter reads (a tied ``lm_head.weight`` equal to
    the embedding is allowed), with a hint at the fix."""
    path, family = checkpoint.path, _FAMILIES[model_type]
    used = set(wanted)
    extra = sorted(n for n in checkpoint.names() - used if not family.ignorable.search(n))
    if config.tie_word_embeddings and "lm_head.weight" in extra and "embed" in values:
        tied = checkpoint.get("lm_head.weight").astype(jnp.dtype(config.param_dtype))
        if tied.shape == values["embed"].shape and np.array_equal(tied, values["embed"]):
            extra.remove("lm_head.weight")  # a tied copy saved twice
        else:
            raise ValueError(
                f"config.json says tie_word_embeddings=true but {path} has an lm_head.weight "
                f"that differs from the embedding; pass tie_word_embeddings=False to load it"
            )
    if extra:
        hint = ""
        if "score.weight" in extra and head is None:
            hint = " (a *ForSequenceClassification checkpoint: pass head='reward')"
        shown = ", ".join(repr(n) for n in extra[:8])
        more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
        raise ValueError(
            f"{checkpoint.where} in {path} has tensors this {model_type} config does "
            f"not use: {shown}{more}{hint}"
        )


def _read_weights(
    checkpoint: _Checkpoint, model_type: str, config: TransformerConfig, params, fresh, head
) -> dict[str, np.ndarray]:
    """The values of ``params`` but the ``fresh`` ones, read from ``checkpoint`` after checking
    that it holds every tensor the family's table asks for, of the right shape, and no other."""
    family = _FAMILIES[model_type]
    rows = _layout_rows(family, params, fresh)
    base = family.base_prefix
    if not any(n.startswith(base) for n in checkpoint.names()):
        base = ""  # a bare base model (GPT2Model, LlamaModel) or an old GPT-2 file
    wanted = [n for e in rows for n in _hf_names(e, base, config.num_layers, config.num_experts)]
    _check_present(checkpoint, config, head, wanted)
    values = _read_tensors(checkpoint, rows, base, config)
    _check_unused(checkpoint, model_type, config, head, wanted, values)
    return values


def _init_value_head(params, config: TransformerConfig, rngs: nnx.Rngs | None) -> None:
    """Draw a fresh value head (``score``, ``score_bias``) into ``params``."""
    np_dtype = jnp.dtype(config.param_dtype)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    d = config.hidden_size
    score = config.initializer_range * jax.random.normal(rngs.params(), (d,), jnp.float32)
    params["score"].set_value(score.astype(np_dtype))
    params["score_bias"].set_value(jnp.zeros((), np_dtype))


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    head: str | None = None,
    remat: bool = False,
    attention_impl: str | None = None,
    rngs: nnx.Rngs | None = None,
    **overrides,
) -> Transformer:
    """A :class:`Transformer` with the weights of a Hugging Face checkpoint folder.

    Args:
      path: a local folder with ``config.json`` and ``model.safetensors`` (or
        ``model.safetensors.index.json`` and its shards).
      dtype: compute dtype (default: ``param_dtype``).
      param_dtype: storage dtype of the parameters (default ``"float32"``); tensors are cast
        on the host as they are read.
      head: ``None`` (LM only), ``"reward"`` (the ``score.weight`` of a one-label
        ``*ForSequenceClassification`` checkpoint; no LM head) or ``"value"`` (the LM plus a
        freshly initialised value head, drawn from ``rngs``).
      remat, attention_impl: as in :class:`TransformerConfig`.
      rngs: randomness of the fresh value head (default ``nnx.Rngs(0)``).
      **overrides: other :class:`TransformerConfig` fields.

    Raises:
      FileNotFoundError: no folder, no ``config.json``, no safetensors (pickle-only folders).
      ValueError: unsupported config; a missing, mis-shaped or unexpected tensor.
    """
    import transformers

    path = os.fspath(path)
    raw = _read_config_json(path)
    _check_model_type(raw.get("model_type"))
    hf_config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    param_dtype = "float32" if param_dtype is None else param_dtype
    config = config_from_hf(
        hf_config,
        param_dtype=param_dtype,
        dtype=param_dtype if dtype is None else dtype,
        head=head,
        remat=remat,
        attention_impl=attention_impl,
        **overrides,
    )
    with _Checkpoint(path) as checkpoint:
        model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        _, params = _names(model)
        fresh = {"score", "score_bias"} if head == "value" else set()
        values = _read_weights(checkpoint, hf_config.model_type, config, params, fresh, head)
    for name, array in values.items():
        params[name].set_value(jnp.asarray(array))
    if fresh:
        _init_value_head(params, config, rngs)
    return model


# ---------------------------------------------------------------------------- saving


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes (int) or e.g. '5GB', '500MB'")
    number, unit = float(m.group(1)), m.group(2)
    base = 1024 if "I" in unit else 1000
    return int(number * base ** "BKMGT".index(unit[0]))


def _written_names(c: TransformerConfig) -> dict[str, Any]:
    """The fields of :data:`_CONFIG_NAMES` as ``c``'s family's ``transformers`` config names
    them, ``None`` defaults resolved (``intermediate_size`` -> ``mlp_size``, ...)."""
    return {
        theirs: getattr(c, _RESOLVED.get(ours, ours))
        for ours, theirs in _config_names(c.family).items()
    }


def _gpt2_hf_fields(c: TransformerConfig, model_type: str | None):
    """``(model_type, fields, config class)`` of a GPT-2 family config."""
    import transformers

    model_type = model_type or "gpt2"
    problems = []
    if not (c.qkv_bias and c.o_bias and c.mlp_bias):
        problems.append("GPT-2 has biases on every projection")
    if c.kv_heads != c.num_heads or c.dim_per_head * c.num_heads != c.hidden_size:
        problems.append("GPT-2 has num_kv_heads == num_heads and head_dim * heads == width")
    if model_type != "gpt2" or problems:
        raise ValueError(f"cannot save as {model_type!r}: {'; '.join(problems)}")
    return model_type, _written_names(c), transformers.GPT2Config


def _llama_hf_fields(c: TransformerConfig, model_type: str | None):
    """``(model_type, fields, config class)`` of a Llama family config (``llama``, ``qwen2``,
    ``qwen3`` or ``mistral``, as its biases and ``qk_norm`` allow)."""
    import transformers

    if model_type is None:
        if c.qk_norm:
            model_type = "qwen3"
        elif c.qkv_bias and not (c.o_bias or c.mlp_bias):
            model_type = "qwen2"
        elif c.layer_windows is not None:  # Llama has no window: Mistral (every layer) or Qwen2
            model_type = "mistral" if all(c.sliding_layers) else "qwen2"
        else:
            model_type = "llama"
    allowed = {
        "llama": c.qkv_bias == c.o_bias and not c.qk_norm,
        "qwen2": c.qkv_bias and not c.o_bias and not c.mlp_bias and not c.qk_norm,
        "qwen3": c.qkv_bias == c.o_bias and not c.mlp_bias and c.qk_norm,
        "mistral": not (c.qkv_bias or c.o_bias or c.mlp_bias or c.qk_norm),
    }
    if not allowed.get(model_type, False):
        raise ValueError(
            f"cannot save as {model_type!r}: biases qkv={c.qkv_bias}, o={c.o_bias}, "
            f"mlp={c.mlp_bias}, qk_norm={c.qk_norm} (llama: qkv == o, any mlp; qwen2: qkv "
            f"only; qwen3: qkv == o, no mlp, qk_norm; mistral: none; only qwen3 has qk_norm)"
        )
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta, **dict(c.rope_scaling)}
    fields = {**_written_names(c), "rope_parameters": rope}
    if model_type == "llama":
        fields.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    elif model_type == "qwen3":
        fields.update(
            attention_bias=c.qkv_bias,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=c.num_layers,
        )
    elif model_type == "mistral":
        fields.update(sliding_window=None)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[model_type]
    return model_type, fields, cls


def _moe_hf_fields(c: TransformerConfig, model_type: str | None):
    """``(model_type, fields, config class)`` of a mixture-of-experts config: ``qwen3_moe``
    (the default, and the only choice, with ``qk_norm``) or ``mixtral`` (no biases, no
    ``qk_norm``, top-k probabilities renormalised)."""
    import transformers

    model_type = model_type or ("qwen3_moe" if c.qk_norm else "mixtral")
    allowed = {
        "qwen3_moe": c.qkv_bias == c.o_bias and c.qk_norm,
        "mixtral": not (c.qkv_bias or c.o_bias or c.qk_norm) and c.norm_topk_prob,
    }
    if not allowed.get(model_type, False):
        raise ValueError(
            f"cannot save a mixture-of-experts model as {model_type!r}: biases "
            f"qkv={c.qkv_bias}, o={c.o_bias}, qk_norm={c.qk_norm}, norm_topk_prob="
            f"{c.norm_topk_prob} (qwen3_moe: qkv == o, qk_norm; mixtral: no biases, no qk_norm, "
            f"norm_topk_prob=True)"
        )
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta, **dict(c.rope_scaling)}
    fields = {**_written_names(c), "rope_parameters": rope}
    shared = dict(
        num_experts_per_tok=c.num_experts_per_tok, router_aux_loss_coef=c.router_aux_loss_coef
    )
    if model_type == "qwen3_moe":
        fields.update(
            shared,
            num_experts=c.num_experts,
            moe_intermediate_size=c.mlp_size,  # intermediate_size (dense layers') is unused
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=c.qkv_bias,
            use_sliding_window=False,
            sliding_window=None,
        )
        return model_type, fields, transformers.Qwen3MoeConfig
    fields.update(shared, num_local_experts=c.num_experts, router_jitter_noise=0.0)
    fields.update(sliding_window=None)
    return model_type, fields, transformers.MixtralConfig


def _window_hf_fields(c: TransformerConfig, model_type: str) -> dict[str, Any]:
    """The sliding-window fields of a Llama-family ``config.json`` (``{}`` without windows):
    Qwen2/Qwen3 name each layer's kind, Mistral, Mixtral and Qwen3-MoE slide every layer."""
    if c.layer_windows is None:
        return {}
    every = all(c.sliding_layers)
    if model_type in ("qwen2", "qwen3"):
        kinds = ["sliding_attention" if s else "full_attention" for s in c.sliding_layers]
        return dict(
            use_sliding_window=True,
            sliding_window=int(c.sliding_window),
            layer_types=kinds,
            max_window_layers=kinds.index("sliding_attention"),
        )
    if model_type in ("mistral", "mixtral", "qwen3_moe") and every:
        fields = dict(sliding_window=int(c.sliding_window))
        if model_type == "qwen3_moe":
            fields["use_sliding_window"] = True
        return fields
    raise ValueError(
        f"cannot save as {model_type!r}: sliding_window={c.sliding_window} with layer_types="
        f"{c.layer_types} has no place in its config (qwen2/qwen3: windows on any layers; "
        f"mistral, mixtral, qwen3_moe: on every layer; llama: none)"
    )


def _gemma_hf_fields(c: TransformerConfig, model_type: str | None):
    """``(model_type, fields, config class)`` of a Gemma family config: ``gemma3_text`` (the
    default with ``qk_norm``) or ``gemma2``."""
    import transformers

    model_type = model_type or ("gemma3_text" if c.qk_norm else "gemma2")
    problems = []
    if c.mlp_bias or c.qkv_bias != c.o_bias:
        problems.append("Gemma has no MLP biases and attention_bias on q, k, v and o together")
    if model_type == "gemma2" and (c.qk_norm or c.rope_local_theta is not None):
        problems.append("Gemma 2 has no q/k norms (qk_norm) and one RoPE (rope_local_theta)")
    if model_type == "gemma3_text" and not c.qk_norm:
        problems.append("Gemma 3 has q/k norms (qk_norm=True)")
    if model_type == "gemma3_text" and c.attn_logit_softcap is not None:
        problems.append("transformers' Gemma 3 ignores attn_logit_softcapping")
    if model_type not in _GEMMA_TYPES or problems:
        raise ValueError(f"cannot save as {model_type!r}: {'; '.join(problems) or 'not Gemma'}")
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta, **dict(c.rope_scaling)}
    if model_type == "gemma3_text":
        local = c.rope_theta if c.rope_local_theta is None else c.rope_local_theta
        rope = {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": float(local)},
        }
    scalar = c.dim_per_head if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar
    fields = {
        **_written_names(c),
        "rope_parameters": rope,
        "attention_bias": c.qkv_bias,
        "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else float(scalar),
        # transformers' Gemma always builds a sliding mask: a window no sequence exceeds when
        # no layer slides.
        "sliding_window": int(c.sliding_window or c.max_position_embeddings),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in c.sliding_layers],
        "attn_logit_softcapping": c.attn_logit_softcap,
        "final_logit_softcapping": c.final_logit_softcap,
        "use_bidirectional_attention": False,
    }
    cls = {"gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig}
    return model_type, fields, cls[model_type]


def hf_config_from(config: TransformerConfig, *, model_type: str | None = None, **hf_kwargs):
    """The ``transformers`` config of the same architecture as ``config``.

    Args:
      config: our config.
      model_type: ``"gpt2"`` for the GPT-2 family; for the Llama family ``"qwen3"`` (the
        default, and the only choice, with ``qk_norm``), ``"qwen2"`` (the default when only the
        q/k/v projections have biases), ``"llama"`` (the default otherwise) or ``"mistral"``;
        for a mixture of experts ``"qwen3_moe"`` (the default with ``qk_norm``) or
        ``"mixtral"`` (the default otherwise); for the Gemma family ``"gemma3_text"`` (the
        default with ``qk_norm``) or ``"gemma2"``. Sliding windows go into ``sliding_window``
        and, for Qwen2/Qwen3 and Gemma, ``layer_types``.
      **hf_kwargs: extra fields (``pad_token_id``, ``bos_token_id``, ``eos_token_id``, ...).
    """
    c = config
    reward = c.head == "reward"
    family_fields = _gpt2_hf_fields if c.family == "gpt2" else _llama_hf_fields
    if c.num_experts:
        family_fields = _moe_hf_fields
    if c.family == "gemma":
        family_fields = _gemma_hf_fields
    model_type, fields, cls = family_fields(c, model_type)
    if c.family == "llama":
        fields.update(_window_hf_fields(c, model_type))
    family = _FAMILIES[model_type]
    fields.update(
        tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range,
        architectures=[family.sequence_classification if reward else family.causal_lm],
        dtype=str(jnp.dtype(c.param_dtype)),
    )
    if reward:
        fields.update(num_labels=1)
    # Token ids are the tokenizer's business; the config classes' defaults (Llama's 1 and 2,
    # GPT-2's 50256) would be guesses.
    fields.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return cls(**{**fields, **hf_kwargs})


def _saved_params(config: TransformerConfig, params, family: _Family) -> dict[str, Any]:
    """``params`` less those with no Hugging Face counterpart (a value head; a reward model's
    LM head), with a warning naming them."""
    reward = config.head == "reward"
    dropped = {"score", "score_bias"} if config.head == "value" else set()
    if reward and "lm_head" in params:
        dropped.add("lm_head")
    if dropped:
        warnings.warn(
            f"save_model: parameters {sorted(dropped)} have no place in a Hugging Face "
            f"{family.sequence_classification if reward else family.causal_lm} and are not "
            f"saved",
            stacklevel=3,
        )
    return {k: v for k, v in params.items() if k not in dropped}


def _hf_tensors(params, family: _Family, config: TransformerConfig) -> dict[str, np.ndarray]:
    """The HF tensors of our parameters: the family's table run backwards (one tensor per
    layer, or per layer and expert, for per-layer parameters; packed ones assembled from their
    parts)."""
    rows = _layout_rows(family, params, set())
    sizes = _sizes(config)
    base = family.base_prefix
    tensors: dict[str, np.ndarray] = {}
    for entries in _by_hf(rows).values():
        entries = sorted(entries, key=lambda e: e.part)
        arrays = [np.asarray(jax.device_get(params[e.ours][...])) for e in entries]
        for name, index in _hf_slots(entries[0], base, config.num_layers, config.num_experts):
            tensors[name] = _to_hf([a[index] for a in arrays], entries, sizes)
    return tensors


def _write_safetensors(folder: str, tensors: dict[str, np.ndarray], limit: int) -> None:
    """``model.safetensors``, or shards of at most ``limit`` bytes and their index."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SAFE_WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(folder, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_model(
    model: Transformer,
    folder: str | os.PathLike,
    *,
    model_type: str | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer=None,
    **hf_kwargs,
) -> None:
    """Write ``model`` as a Hugging Face checkpoint folder: ``config.json`` and
    ``model.safetensors`` (or shards of at most ``max_shard_size`` and their index).

    ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads the result with no
    missing or unexpected keys; a ``head="reward"`` model is written as a one-label
    ``*ForSequenceClassification`` (``AutoModelForSequenceClassification``). A value head has no
    Hugging Face counterpart and is left out (with a warning), as is the LM head of a reward
    model.

    Args:
      model: the model to write (parameters in their ``param_dtype``).
      folder: created if needed; earlier weight files (``model.safetensors``, its index and
        ``model-*-of-*.safetensors`` shards) are replaced.
      model_type: see :func:`hf_config_from`.
      max_shard_size: bytes, or a string such as ``"5GB"``.
      tokenizer: optional ``transformers`` tokenizer, saved alongside; its pad/bos/eos ids go
        into ``config.json`` unless given in ``hf_kwargs``.
      **hf_kwargs: extra ``config.json`` fields (e.g. ``pad_token_id``, which Hugging Face's
        sequence classifiers need to find the last token of a padded batch).
    """
    folder = os.fspath(folder)
    if getattr(model, "lora", None) is not None:
        raise ValueError(
            "save_model: the model has LoRA adapters, which a Hugging Face checkpoint has no "
            "place for: save rljax.models.lora.merge(model), and the adapters themselves with "
            "rljax.models.lora.save_peft"
        )
    config, params = _names(model)
    if tokenizer is not None:
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, key, None) is not None:
                hf_kwargs.setdefault(key, getattr(tokenizer, key))
    hf_config = hf_config_from(config, model_type=model_type, **hf_kwargs)
    family = _FAMILIES[hf_config.model_type]
    tensors = _hf_tensors(_saved_params(config, params, family), family, config)

    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name in (SAFE_WEIGHTS, SAFE_INDEX) or _SHARD_NAME.fullmatch(name):
            os.remove(os.path.join(folder, name))
    hf_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _write_safetensors(folder, tensors, _parse_size(max_shard_size))


#: Files of which a tokenizer folder holds at least one (fast, BPE, sentencepiece, WordPiece).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
)


def load_tokenizer(path: str | os.PathLike):
    """The ``transformers`` tokenizer of a checkpoint folder (never runs remote code).

    Raises ``FileNotFoundError`` at once when ``path`` is not a local folder (a Hub name is not
    downloaded) or holds no tokenizer file (tokenizer.json, vocab.json, ...)."""
    import transformers

    path = os.fspath(path)
    if not os.path.isdir(path):
        problem = "a file" if os.path.exists(path) else "missing"
        raise FileNotFoundError(
            f"tokenizer folder {path!r} is {problem}: pass a local checkpoint folder with the "
            "tokenizer's files (Hub names are not downloaded; fetch one first with "
            "huggingface_hub.snapshot_download)"
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: the tokenizer files are missing (none of {list(_TOKENIZER_FILES)}); save "
            "the tokenizer into the folder (tokenizer.save_pretrained) or copy its files in"
        )
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
