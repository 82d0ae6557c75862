"""Decoder-only transformer language models in Flax NNX: the GPT-2, Llama and Gemma families.

One module, :class:`Transformer`, covers

- the **GPT-2** family (Radford et al., 2019): learned absolute positions, LayerNorm, GELU MLP,
  biases everywhere, tied input/output embeddings;
- the **Llama** family (Touvron et al., 2023) and its relatives **Qwen2** (q/k/v biases),
  **Qwen3** (RMSNorm on each head's queries and keys, ``qk_norm``) and **Mistral**: rotary
  position embeddings (Su et al., 2021, RoFormer) with ``rope_theta`` and the
  ``linear``, ``llama3`` and ``yarn`` scalings, grouped-query / multi-query attention
  (Ainslie et al., 2023), RMSNorm (Zhang & Sennrich, 2019), SwiGLU MLP (Shazeer, 2020), tied or
  untied embeddings;
- with ``num_experts > 0``, the mixtures of experts **Qwen3-MoE** and **Mixtral** (Jiang et
  al., 2024): every layer's MLP a top-k routed mixture of SwiGLU experts
  (:mod:`rljax.models.moe`), whose router logits ``decode``/``__call__`` return with
  ``return_router_logits=True`` for the load-balancing loss;
- sliding-window attention (Mistral, Jiang et al., 2023; Qwen2/Qwen3's ``use_sliding_window``):
  ``sliding_window`` on every layer or on those ``layer_types`` marks, the window of each layer
  scanned with its parameters, in the full pass, packed rows and KV-cache decoding;
- the **Gemma** family, ``TransformerConfig.gemma``: **Gemma 2** (Gemma Team, 2024,
  arXiv:2408.00118) and **Gemma 3** text (Gemma Team, 2025, arXiv:2503.19786), RMSNorm scaled by
  ``1 + w`` before and after attention and the MLP, embeddings times ``sqrt(hidden_size)``,
  GeGLU, alternating sliding and global layers, attention and final-logit soft-caps,
  ``query_pre_attn_scalar``, and Gemma 3's q/k norms and local RoPE base on sliding layers.

Design, for speed and for sharding:

- The layers are **stacked**: every per-layer parameter has a leading ``layers`` axis and the
  forward pass is one ``jax.lax.scan`` over it, so compile time does not grow with depth.
  ``remat=True`` wraps the layer in ``jax.checkpoint`` (activations recomputed in the backward
  pass).
- Attention is ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU with
  ``attention_impl="cudnn"``; right-padded batches then use sequence lengths instead of a mask),
  or on CPU by default rljax's grouped-query attention as two batched matmuls
  (:func:`_grouped_attention`, several times faster there).
- Parameters are stored in ``param_dtype`` (float32 master weights by default) and cast to the
  compute ``dtype`` (e.g. bfloat16) inside the forward pass; norms and softmax run in float32
  (float64 in a float64 model, which is float64 throughout: the parity tests' reference).
- Every parameter carries ``logical_axes`` metadata (``("layers", "embed", "heads",
  "head_dim")``, ...); :mod:`rljax.sharding` turns those names into ``PartitionSpec``\\ s.
  Building a model needs no mesh.

Conventions: ``tokens`` are ``int32 [batch, time]``; ``mask`` is 1 (True) at real tokens and 0
at padding, left or right or both; positions default to ``cumsum(mask) - 1``, so a left-padded
prompt starts at position 0 (what Hugging Face ``generate`` does; pass ``positions`` to
override). Padding positions produce finite garbage that losses must mask out. Packed rows
(several sequences per row, :func:`rljax.data.pack`) pass ``segment_ids``: attention is then
causal within each segment and positions restart at 0 in each (:meth:`Transformer.decode`).

Usage::

    config = TransformerConfig.llama(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4)
    model = Transformer(config, rngs=nnx.Rngs(0))
    logits = model(tokens, mask)                          # [B, T, V]
    hidden, _ = model.decode(tokens, mask)                # [B, T, D], final norm applied
    cache = model.init_cache(batch_size=B, max_length=S)  # KV cache for generation
    hidden, cache = model.decode(prompt, prompt_mask, cache=cache)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax import sharding
from rljax.models.moe import MOE_IMPLS, moe_mlp

__all__ = [
    "PRESETS",
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "last_valid_index",
    "positions_from_mask",
    "positions_from_segments",
    "preset",
    "rope_inverse_frequencies",
    "with_head",
]

FAMILIES = ("gpt2", "llama", "gemma")
LAYER_TYPES = ("full_attention", "sliding_attention")
#: The window of a global-attention layer in the per-layer window array (longer than any
#: sequence, so every earlier key is in reach).
GLOBAL_WINDOW = 2**30
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
HEADS = (None, "value", "reward")
ATTENTION_IMPLS = (None, "xla", "grouped", "cudnn")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture, dtypes and options of a :class:`Transformer` (hashable, so jit-static).

    Attributes:
      vocab_size: number of token ids.
      hidden_size: model width ``D``.
      num_layers: number of decoder layers ``L``.
      num_heads: query heads ``N``.
      num_kv_heads: key/value heads ``K`` (``N`` = multi-head, 1 = multi-query, else GQA);
        ``None`` means ``num_heads``.
      head_dim: per-head width; ``None`` means ``hidden_size // num_heads``.
      intermediate_size: MLP width ``F``; ``None`` means ``4 * hidden_size``.
      max_position_embeddings: size of GPT-2's position table; RoPE's nominal context.
      family: ``"gpt2"`` (LayerNorm, learned positions, GELU MLP) or ``"llama"`` (RMSNorm, RoPE,
        gated MLP).
      norm_eps: epsilon of LayerNorm / RMSNorm.
      hidden_act: MLP activation (``gelu_new``, ``gelu``, ``gelu_pytorch_tanh``, ``silu``,
        ``relu``).
      qkv_bias: biases on the query, key and value projections (GPT-2, Qwen2).
      qk_norm: RMSNorm (``norm_eps``, a learned scale of ``head_dim``) on each head's queries
        and keys, before RoPE (Qwen3); Llama family only.
      o_bias: bias on the attention output projection (GPT-2).
      mlp_bias: biases in the MLP (GPT-2).
      tie_word_embeddings: output projection is the transposed token embedding.
      rope_theta: RoPE base.
      rope_type: ``default``, ``linear``, ``llama3`` or ``yarn``.
      rope_scaling: the scaling's parameters as sorted ``(name, value)`` pairs, Hugging Face's
        names (``factor``, ``low_freq_factor``, ``high_freq_factor``,
        ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``,
        ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate``).
      lm_head: the model has an output projection to the vocabulary (False for a pure reward
        model or critic).
      head: optional scalar head on the final hidden state: ``"value"`` (per token, with a bias)
        or ``"reward"`` (read at the last valid token; no bias, as Hugging Face's
        ``*ForSequenceClassification`` with one label).
      param_dtype: storage dtype of the parameters (``"float32"`` or ``"bfloat16"``).
      dtype: compute dtype.
      remat: recompute each layer's activations in the backward pass.
      attention_impl: ``"xla"`` (``jax.nn.dot_product_attention``, any mask), ``"grouped"``
        (rljax's grouped-query attention as two batched matmuls, any mask: on CPU 4-6x faster
        forward and ~1.4x faster backward than ``"xla"``, benchmarks/RESULTS.md), ``None``
        (``"grouped"`` on CPU, else ``jax.nn.dot_product_attention``'s own choice) or
        ``"cudnn"`` (GPU flash attention; needs right padding, expressed as sequence lengths).
      initializer_range: standard deviation of the normal initialiser.
      sliding_window: ``W``: a query at slot ``i`` of a sliding layer sees only the keys at
        slots ``i - W < j <= i`` (itself and the ``W - 1`` before it; Mistral, Jiang et al.,
        2023; Hugging Face's ``sliding_window_causal`` mask). Slots count every column of the
        row (padding included) and every KV-cache slot, as Hugging Face's cache positions do.
        ``None``: no window.
      layer_types: per layer ``"sliding_attention"`` or ``"full_attention"`` (Hugging Face's
        names); ``None`` with a ``sliding_window``: every layer slides (Mistral).
      query_pre_attn_scalar: attention logits are scaled by ``query_pre_attn_scalar ** -0.5``
        (Gemma); ``None``: ``head_dim ** -0.5``.
      attn_logit_softcap: attention logits become ``cap * tanh(logits / cap)`` before the mask
        and softmax (Gemma 2); ``None``: off.
      final_logit_softcap: the same on the vocabulary logits (Gemma 2 and 3).
      rope_local_theta: RoPE base of the sliding layers (Gemma 3's ``rope_local_base_freq``,
        without scaling); the global layers keep ``rope_theta`` and its scaling. ``None``: one
        RoPE for every layer.
      num_experts: ``E`` > 0 replaces every layer's MLP with a sparse mixture of ``E`` SwiGLU
        experts of width ``intermediate_size`` and a linear router (Qwen3-MoE, Mixtral;
        :mod:`rljax.models.moe`); 0: a dense MLP. Llama family only, no MLP biases.
      num_experts_per_tok: ``k``, the experts each token is routed to (top-k).
      norm_topk_prob: renormalise the top-k router probabilities to sum to 1 (Mixtral always;
        Qwen3-MoE per its config).
      router_aux_loss_coef: weight of the load-balancing loss in transformers' training loss
        (kept for the checkpoint's ``config.json``; rljax's updates take their own coefficient).
      moe_impl: ``None`` (``"dense"`` on CPU, ``"ragged"`` elsewhere), ``"dense"`` or
        ``"ragged"``: the exact expert compute paths of :func:`rljax.models.moe.moe_mlp`.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 2048
    family: str = "llama"
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    lm_head: bool = True
    head: str | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    attention_impl: str | None = None
    initializer_range: float = 0.02
    num_experts: int = 0
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    moe_impl: str | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    rope_local_theta: float | None = None

    def __post_init__(self):
        def fail(field, problem):
            raise ValueError(f"TransformerConfig.{field}: {problem}")

        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            if int(getattr(self, field)) < 1:
                fail(field, f"must be >= 1, got {getattr(self, field)}")
        if self.family not in FAMILIES:
            fail("family", f"{self.family!r} is not one of {FAMILIES}")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"{self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.rope_type not in ROPE_TYPES:
            fail("rope_type", f"{self.rope_type!r} is not one of {ROPE_TYPES}")
        if self.head not in HEADS:
            fail("head", f"{self.head!r} is not one of {HEADS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"{self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            fail("num_heads", f"{self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.num_heads % self.kv_heads:
            fail("num_kv_heads", f"{self.kv_heads} does not divide num_heads {self.num_heads}")
        if self.family != "gpt2" and self.dim_per_head % 2:
            fail("head_dim", f"RoPE needs an even head_dim, got {self.dim_per_head}")
        if self.qk_norm and self.family == "gpt2":
            fail("qk_norm", "per-head query/key RMSNorm is a Llama/Gemma-family option")
        self._check_attention_options(fail)
        if self.num_experts:
            if self.family != "llama" or self.mlp_bias:
                fail("num_experts", "mixture-of-experts MLPs are Llama-family, without mlp_bias")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                fail("num_experts_per_tok", f"must be in 1..num_experts={self.num_experts}")
        if self.moe_impl not in MOE_IMPLS:
            fail("moe_impl", f"{self.moe_impl!r} is not one of {MOE_IMPLS}")
        if not self.lm_head and self.head is None:
            fail("lm_head", "a model without an LM head needs head='value' or 'reward'")
        for field in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, field))
            except TypeError:
                fail(field, f"{getattr(self, field)!r} is not a dtype")
        if not isinstance(self.rope_scaling, tuple):
            object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))

    def _check_attention_options(self, fail) -> None:
        """Sliding windows, layer types, soft-caps, attention scale and local RoPE."""
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            fail("sliding_window", f"must be >= 1 or None, got {self.sliding_window}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple):
                object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers:
                fail(
                    "layer_types",
                    f"has {len(self.layer_types)} entries for num_layers={self.num_layers}",
                )
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                fail("layer_types", f"{unknown} are not among {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                fail("layer_types", "sliding_attention layers need a sliding_window")
        for field in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, field)
            if value is not None and not float(value) > 0:
                fail(field, f"must be > 0 or None, got {value}")
        if self.family == "gpt2":
            for field in ("sliding_window", "attn_logit_softcap", "query_pre_attn_scalar"):
                if getattr(self, field) is not None:
                    fail(field, "is a Llama/Gemma-family option (GPT-2 has none)")
        if self.rope_local_theta is not None and not any(self.sliding_layers):
            fail("rope_local_theta", "the local RoPE base needs sliding layers (sliding_window)")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends through the ``sliding_window``."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if self.layer_types is None:
            return (True,) * self.num_layers
        return tuple(kind == "sliding_attention" for kind in self.layer_types)

    @property
    def layer_windows(self) -> tuple[int, ...] | None:
        """Per layer, its window (:data:`GLOBAL_WINDOW` for a global layer); ``None`` when no
        layer slides (attention is then causal only, as it always was)."""
        if not any(self.sliding_layers):
            return None
        w = int(self.sliding_window)
        return tuple(w if sliding else GLOBAL_WINDOW for sliding in self.sliding_layers)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def mlp_size(self) -> int:
        return 4 * self.hidden_size if self.intermediate_size is None else self.intermediate_size

    @property
    def num_params(self) -> int:
        """Number of parameters (embeddings included)."""
        d, n, k, h, f = (
            self.hidden_size,
            self.num_heads,
            self.kv_heads,
            self.dim_per_head,
            self.mlp_size,
        )
        gated = self.family != "gpt2"
        per_layer = d * h * (n + 2 * k) + n * h * d + (3 if gated else 2) * d * f
        per_layer += (2 if self.family == "llama" else 4) * d  # norm scales (and biases)
        per_layer += self.qkv_bias * h * (n + 2 * k) + self.o_bias * d
        per_layer += self.qk_norm * 2 * h  # per-head query and key norm scales
        per_layer += self.mlp_bias * (f * (2 if gated else 1) + d)
        if self.num_experts:  # E SwiGLU experts instead of one MLP, and the router
            per_layer += (self.num_experts - 1) * 3 * d * f + d * self.num_experts
        total = self.num_layers * per_layer + self.vocab_size * d
        total += d * (1 if gated else 2)  # final norm
        total += self.max_position_embeddings * d if self.family == "gpt2" else 0
        total += self.vocab_size * d if self.lm_head and not self.tie_word_embeddings else 0
        total += (d + (self.head == "value")) if self.head else 0
        return total

    @classmethod
    def gpt2(cls, **kwargs) -> TransformerConfig:
        """A GPT-2-family config (LayerNorm, learned positions, GELU, biases, tied embeddings)."""
        defaults = dict(
            family="gpt2",
            hidden_act="gelu_new",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            norm_eps=1e-5,
            max_position_embeddings=1024,
        )
        return cls(**{**defaults, **kwargs})

    @classmethod
    def llama(cls, **kwargs) -> TransformerConfig:
        """A Llama-family config (RMSNorm, RoPE, SwiGLU; Qwen2 adds ``qkv_bias=True``, Qwen3
        ``qk_norm=True`` and an explicit ``head_dim``)."""
        defaults = dict(family="llama", hidden_act="silu", norm_eps=1e-6)
        return cls(**{**defaults, **kwargs})

    @classmethod
    def gemma(cls, *, generation: int = 2, **kwargs) -> TransformerConfig:
        """A Gemma-family config: RMSNorm scaled by ``1 + w`` before and after attention and the
        MLP, embeddings times ``sqrt(hidden_size)``, GeGLU (tanh GELU), tied embeddings and
        sliding-window layers.

        ``generation=2`` (Gemma Team, 2024, arXiv:2408.00118): windows on every other layer
        (sliding first), attention and final logits soft-capped at 50 and 30.
        ``generation=3`` (Gemma Team, 2025, arXiv:2503.19786): five sliding layers to each
        global one, per-head query/key norms, no attention soft-cap, local RoPE base 1e4 and
        global 1e6. ``layer_types`` defaults to the pattern over ``num_layers``.
        """
        if generation not in (2, 3):
            raise ValueError(
                f"TransformerConfig.gemma: generation must be 2 or 3, got {generation}"
            )
        defaults = dict(
            family="gemma",
            hidden_act="gelu_pytorch_tanh",
            norm_eps=1e-6,
            tie_word_embeddings=True,
            sliding_window=4096,
        )
        if generation == 2:
            defaults.update(attn_logit_softcap=50.0, final_logit_softcap=30.0)
        else:
            defaults.update(qk_norm=True, rope_theta=1e6, rope_local_theta=1e4)
        kwargs = {**defaults, **kwargs}
        if kwargs.get("layer_types") is None and kwargs.get("sliding_window") is not None:
            period = 2 if generation == 2 else 6
            kwargs["layer_types"] = tuple(
                "sliding_attention" if (i + 1) % period else "full_attention"
                for i in range(kwargs["num_layers"])
            )
        return cls(**kwargs)


# The named model sizes, in the Llama family unless their further fields say otherwise: one
# row per preset, a column per TransformerConfig field (None: the field's default), then any
# further fields (``family`` and ``generation`` pick TransformerConfig.gemma).
_PRESET_COLUMNS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
)
_PRESET_ROWS = {
    # name: (vocab, width, layers, heads, kv heads, MLP width, positions), other fields
    # Test- and CPU-sized.
    "tiny": ((256, 64, 2, 4, 2, 128, 512), {}),
    "small": ((8192, 256, 4, 8, 4, 704, 2048), {}),
    # GPT-2 small's size (124M) in the Llama family.
    "125m": ((50304, 768, 12, 12, None, 2048, 2048), {}),
    # Llama-3.2-1B's shape (1.24B, tied embeddings, GQA 32/8).
    "1b": ((128256, 2048, 16, 32, 8, 8192, 8192), {"rope_theta": 500000.0}),
    # Test-sized Gemma 2 and Gemma 3: windows of 64 tokens on 2 of 4 / 5 of 6 layers.
    "gemma2-tiny": ((256, 64, 4, 4, 2, 128, 512), {"family": "gemma", "sliding_window": 64}),
    "gemma3-tiny": (
        (256, 64, 6, 4, 2, 128, 512),
        {"family": "gemma", "generation": 3, "sliding_window": 64},
    ),
}
PRESETS: dict[str, dict[str, Any]] = {
    name: {
        "family": "llama",
        **{k: v for k, v in zip(_PRESET_COLUMNS, row, strict=True) if v is not None},
        **extra,
    }
    for name, (row, extra) in _PRESET_ROWS.items()
}


def preset(name: str, **overrides) -> TransformerConfig:
    """A named model size (``tiny``, ``small``, ``125m``, ``1b``; Gemma-family ``gemma2-tiny``,
    ``gemma3-tiny``) with optional overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    family = kwargs.pop("family")
    return getattr(TransformerConfig, family)(**kwargs)


class KVCache(NamedTuple):
    """Preallocated key/value cache for incremental decoding (a pytree).

    Attributes:
      k, v: ``[layers, batch, max_length, kv_heads, head_dim]`` in the compute dtype.
      mask: ``[batch, max_length]`` bool, True where a slot holds a real token.
      index: the next slot to write: an int32 scalar that the rows share (prompts are
        left-padded so that their last tokens line up), or ``int32 [batch]``, each row its own
        (continuous batching, :mod:`rljax.models.engine`: rows at different stages of
        different sequences decode together).
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array


class _LayerStatics(NamedTuple):
    """Per-layer constants scanned alongside the stacked parameters (fields None where the
    config needs none; :meth:`Transformer._layer_statics`).

    Attributes:
      window: ``int32 []`` per layer: the sliding window (:data:`GLOBAL_WINDOW` for a global
        layer).
      inv_freq: ``[H/2]`` per layer: RoPE inverse frequencies (Gemma 3: local on sliding
        layers, global on the others).
      rope_factor: ``[]`` per layer: the factor on RoPE's cos/sin.
    """

    window: jax.Array | None
    inv_freq: jax.Array | None
    rope_factor: jax.Array | None


class _PassInputs(NamedTuple):
    """What every layer of one forward pass reads besides its own parameters and cache
    (:meth:`Transformer.decode` builds it once per call).

    Attributes:
      positions: ``int [B, T]`` position ids.
      mask: ``bool [B, T]``, True at real tokens.
      seq_lengths: ``int32 [B]``, real tokens per row (cuDNN's right-padded lengths).
      segment_ids: ``int32 [B, T]`` of packed rows, or None.
      cache_index: the first cache slot written (int32 scalar, or ``[B]`` per row), or None
        without a cache.
      cache_mask: ``bool [B, S]`` valid cache slots, these tokens' included, or None.
    """

    positions: jax.Array
    mask: jax.Array
    seq_lengths: jax.Array
    segment_ids: jax.Array | None
    cache_index: jax.Array | None
    cache_mask: jax.Array | None


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids ``cumsum(mask) - 1`` (0 at padding before the first token), int32."""
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position ids of packed rows: ``0, 1, 2, ...`` restarting at every segment (a run of
    equal ``segment_ids``; 0 = padding, which gets position 0), int32 ``[..., T]``."""
    segment_ids = segment_ids.astype(jnp.int32)
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    previous = jnp.concatenate(
        [jnp.full_like(segment_ids[..., :1], -1), segment_ids[..., :-1]], axis=-1
    )
    starts = jax.lax.cummax(jnp.where(segment_ids != previous, idx, 0), axis=segment_ids.ndim - 1)
    return jnp.where(segment_ids > 0, idx - starts, 0)


def last_valid_index(mask: jax.Array) -> jax.Array:
    """Index of the last position with ``mask == 1`` along the last axis (0 if there is none)."""
    t = mask.shape[-1]
    idx = jnp.arange(t, dtype=jnp.int32)
    return jnp.max(jnp.where(mask.astype(bool), idx, 0), axis=-1)


def rope_inverse_frequencies(config: TransformerConfig) -> tuple[np.ndarray, float]:
    """RoPE inverse frequencies ``theta^(-2i/d)`` after the configured scaling, and the factor
    applied to cos/sin (YaRN's attention factor, else 1).

    Scalings follow Hugging Face's ``modeling_rope_utils``: ``linear`` (Chen et al., 2023,
    position interpolation) divides every frequency by ``factor``; ``llama3`` (Meta, 2024)
    divides only low frequencies, with a smooth band between ``low_freq_factor`` and
    ``high_freq_factor``; ``yarn`` (Peng et al., 2023) ramps between interpolation and
    extrapolation over a band of dimensions and scales attention by ``0.1 ln(factor) + 1``.
    Computed once in float64 from the static config.
    """
    dim = config.dim_per_head
    base = float(config.rope_theta)
    params = dict(config.rope_scaling)
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    attention_factor = 1.0

    def need(name):
        if params.get(name) is None:
            raise ValueError(f"rope_type {config.rope_type!r} needs rope_scaling[{name!r}]")
        return float(params[name])

    if config.rope_type == "linear":
        inv = inv / need("factor")
    elif config.rope_type == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        old_context = need("original_max_position_embeddings")
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_context / low, inv / factor, inv)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv = np.where(medium, smoothed, scaled)
    elif config.rope_type == "yarn":
        original = params.get("original_max_position_embeddings")
        original = float(original if original is not None else config.max_position_embeddings)
        factor = params.get("factor")
        factor = float(factor if factor is not None else config.max_position_embeddings / original)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            if m and m_all:
                attention_factor = mscale(factor, m) / mscale(factor, m_all)
            else:
                attention_factor = mscale(factor)
        beta_fast = params.get("beta_fast") or 32.0
        beta_slow = params.get("beta_slow") or 1.0

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
    return inv, float(attention_factor)


def _normal(rngs: nnx.Rngs, shape, std, dtype):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype)


def _wide(dtype) -> jnp.dtype:
    """Dtype of norms, RoPE angles, softmax and scalar heads: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _needs_general_attention(config: TransformerConfig) -> bool:
    """Whether attention needs :meth:`Transformer._windowed_attention` (a sliding window, a
    logit soft-cap or a query scale other than ``head_dim ** -0.5``)."""
    return (
        config.layer_windows is not None
        or config.attn_logit_softcap is not None
        or config.query_pre_attn_scalar is not None
    )


def _masked_attention(q, k, v, allowed, scale=None, softcap=None):
    """Softmax attention with an explicit mask (``q [B,T,N,H]``, ``k, v [B,S,K,H]``,
    ``allowed [B,T,S]``; grouped-query heads share their key/value head): logits times
    ``scale`` (default ``H ** -0.5``), soft-capped to ``softcap * tanh(logits / softcap)``
    (Gemma 2) before the mask; logits and softmax in float32 (float64 in a float64 model)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    wide = _wide(q.dtype)
    qg = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=wide)
    logits = logits * (h**-0.5 if scale is None else scale)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(wide).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def _grouped_attention(q, k, v, allowed, scale=None):
    """Softmax attention as two batched matmuls (``q [B,T,N,H]``, ``k, v [B,S,K,H]``,
    ``allowed [B,T,S]``): each key/value head's ``G = N // K`` query heads are stacked along
    the query axis (``[B, K, G*T, H]`` against ``[B, K, S, H]``), the logits stay in that
    layout, the scale is applied to ``q`` and the softmax's normalisation to the ``[B, K, G*T,
    H]`` output instead of the ``[.., T, S]`` weights: fewer passes over the largest tensor,
    which is what XLA:CPU spends its time on (``jax.nn.dot_product_attention``'s five-axis
    einsums, scale and softmax over it cost 4-6x this forward at 128 rows of 100 tokens). Logits
    and softmax in float32 at least; a query with no allowed key gets a uniform average (its
    output is padding)."""
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    wide = _wide(q.dtype)
    q = q * jnp.asarray(h**-0.5 if scale is None else scale, q.dtype)
    # batch and key/value-head axes stay apart (two batch dimensions, never merged): a mesh
    # shards them on different axes, and merging them made XLA reshard (collectives inside
    # attention, which deadlocked the simulated 8-device CPU mesh)
    qq = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
    kk = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    vv = v.transpose(0, 2, 1, 3)
    batch = ((0, 1), (0, 1))
    logits = jax.lax.dot_general(qq, kk, (((3,), (3,)), batch), preferred_element_type=wide)
    ok = jnp.broadcast_to(allowed[:, None, None], (b, kv, g, t, s)).reshape(b, kv, g * t, s)
    logits = jnp.where(ok, logits, jnp.finfo(wide).min)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    total = weights.sum(axis=-1, keepdims=True)
    out = jax.lax.dot_general(
        weights.astype(v.dtype), vv, (((3,), (2,)), batch), preferred_element_type=wide
    )
    out = (out / total).astype(v.dtype)  # [B, K, G*T, H]
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _float64_attention(q, k, v, allowed):
    """Softmax attention computed entirely in float64 (``q [B,T,N,H]``, ``k, v [B,S,K,H]``,
    ``allowed [B,T,S]``; grouped-query heads share their key/value head)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k) / jnp.sqrt(jnp.asarray(h, q.dtype))
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(q.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def _allowed_keys(k: jax.Array, inputs: _PassInputs, query_slots) -> jax.Array:
    """``bool [B, T, S]``: which keys each query may attend to, segments aside. Without a cache
    (``S == T``) the real keys at or before the query; with one, the valid cache slots not
    after the query's slot (``query_slots [T]``, or ``[B, T]`` with per-row cache indices)."""
    slots = jnp.arange(k.shape[1], dtype=jnp.int32)
    if inputs.cache_mask is None:
        causal = slots[None, :] <= slots[:, None]  # [T, S]
        return inputs.mask.astype(bool)[:, None, :] & causal[None]
    query_slots = query_slots if query_slots.ndim == 2 else query_slots[None]
    return inputs.cache_mask[:, None, :] & (slots[None, None, :] <= query_slots[:, :, None])


def _cache_write(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``new [B, T, ...]`` written into ``cache [B, S, ...]`` at slot ``index``: a scalar (every
    row) or ``[B]`` (each row its own; a row's write that would run past ``S`` is moved back,
    as ``dynamic_update_slice`` moves it)."""
    new = new.astype(cache.dtype)
    rest = (jnp.zeros((), jnp.int32),) * (cache.ndim - 2)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new, (jnp.zeros((), jnp.int32), index, *rest))
    write_row = lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i, *rest))
    return jax.vmap(write_row)(cache, new, index)


def _lora_dropout(x: jax.Array, key_data: jax.Array, name: str, rate: float) -> jax.Array:
    """Inverted dropout at ``rate`` on the input ``x`` of projection ``name``'s LoRA adapter.
    ``key_data`` is the layer's raw ``uint32 [2]`` key: all zeros (outside a training step's
    gradient pass, :func:`rljax.models.lora.combine` with a key) means no dropout."""

    def drop(x):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), sum(map(ord, name)))
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

    return jax.lax.cond(jnp.any(key_data != 0), drop, lambda x: x, x)


@jax.custom_jvp
def _differentiated_as(value: jax.Array, like: jax.Array) -> jax.Array:
    """``value``, equal to ``like``, with ``like``'s tangent: the layer scan reads values from
    copies XLA:CPU does not widen to float32 (:meth:`Transformer.decode`) while gradients
    flow through the plain ones."""
    return value


@_differentiated_as.defjvp
def _differentiated_as_jvp(primals, tangents):
    value, _ = primals
    return value, tangents[1]


def _dense(x: jax.Array, w: jax.Array, in_axes: int = 1) -> jax.Array:
    """``x``'s last ``in_axes`` axes contracted with ``w``'s first ``in_axes`` axes, as one
    2-D matmul ``[prod(batch axes), prod(in)] @ [prod(in), prod(out)]``."""
    batch, contracted = x.shape[: x.ndim - in_axes], x.shape[x.ndim - in_axes :]
    if w.shape[:in_axes] != contracted:
        raise ValueError(f"cannot contract {x.shape} with weight {w.shape} over {in_axes} axes")
    out = w.shape[in_axes:]
    n_in, n_out = math.prod(contracted), math.prod(out)
    y = x.reshape(math.prod(batch), n_in) @ w.reshape(n_in, n_out)
    return y.reshape(*batch, *out)


class Transformer(nnx.Module):
    """Decoder-only LM (GPT-2, Llama or Gemma family) with stacked layers; see the module
    docstring.

    Parameters (``L`` layers, ``D`` width, ``N``/``K`` query/key-value heads of width ``H``,
    ``F`` MLP width, ``V`` vocabulary), each with its ``logical_axes``:

    - ``embed [V, D]``, ``pos_embed [P, D]`` (GPT-2), ``final_norm_scale [D]`` (+ ``_bias``),
      ``lm_head [D, V]`` (untied), ``score [D]`` and ``score_bias []`` (value/reward head);
    - ``layers``: ``attn_norm_scale [L, D]``, ``q [L, D, N, H]``, ``k``/``v [L, D, K, H]``,
      ``o [L, N, H, D]``, ``mlp_norm_scale [L, D]``, ``gate``/``up [L, D, F]``,
      ``down [L, F, D]``, the biases the config asks for (``q_bias [L, N, H]``, ...), and with
      ``qk_norm`` the per-head norm scales ``q_norm_scale``/``k_norm_scale [L, H]``; with
      ``num_experts = E`` the MLP's are replaced by ``router [L, D, E]``,
      ``expert_gate``/``expert_up [L, E, D, F]`` and ``expert_down [L, E, F, D]``; Gemma adds
      ``post_attn_norm_scale``/``post_mlp_norm_scale [L, D]`` (its norm scales hold ``w`` of
      ``1 + w``).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        pdt = jnp.dtype(c.param_dtype)
        std = c.initializer_range
        L, D, N, K, H, F, V = (
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.kv_heads,
            c.dim_per_head,
            c.mlp_size,
            c.vocab_size,
        )

        def param(shape, axes, init="normal", scale=1.0):
            if init == "normal":
                value = _normal(rngs, shape, std * scale, pdt)
            elif init == "ones":  # a norm scale; Gemma stores w of its (1 + w) scale
                value = (jnp.zeros if c.family == "gemma" else jnp.ones)(shape, pdt)
            else:
                value = jnp.zeros(shape, pdt)
            return nnx.Param(value, logical_axes=axes)

        gpt2 = c.family == "gpt2"
        self.embed = param((V, D), ("vocab", "embed"))
        self.pos_embed = (
            param((c.max_position_embeddings, D), (None, "embed"), scale=0.5) if gpt2 else None
        )
        self.final_norm_scale = param((D,), ("norm",), "ones")
        self.final_norm_bias = param((D,), ("norm",), "zeros") if gpt2 else None
        self.lm_head = (
            param((D, V), ("embed", "vocab")) if c.lm_head and not c.tie_word_embeddings else None
        )
        self.score = param((D,), ("embed",)) if c.head else None
        self.score_bias = param((), (), "zeros") if c.head == "value" else None

        out_scale = 1.0 / math.sqrt(2 * L)  # GPT-2's scaled init of residual projections
        layers: dict[str, nnx.Param] = {
            "attn_norm_scale": param((L, D), ("layers", "norm"), "ones"),
            "q": param((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
            "k": param((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
            "v": param((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
            "o": param((L, N, H, D), ("layers", "heads", "head_dim", "embed"), scale=out_scale),
            "mlp_norm_scale": param((L, D), ("layers", "norm"), "ones"),
            "up": param((L, D, F), ("layers", "embed", "mlp")),
            "down": param((L, F, D), ("layers", "mlp", "embed"), scale=out_scale),
        }
        if not gpt2:
            layers["gate"] = param((L, D, F), ("layers", "embed", "mlp"))
        else:
            layers["attn_norm_bias"] = param((L, D), ("layers", "norm"), "zeros")
            layers["mlp_norm_bias"] = param((L, D), ("layers", "norm"), "zeros")
        if c.qkv_bias:
            layers["q_bias"] = param((L, N, H), ("layers", "heads", "head_dim"), "zeros")
            layers["k_bias"] = param((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
            layers["v_bias"] = param((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        if c.qk_norm:
            layers["q_norm_scale"] = param((L, H), ("layers", "norm"), "ones")
            layers["k_norm_scale"] = param((L, H), ("layers", "norm"), "ones")
        if c.family == "gemma":  # norms after attention and after the MLP too
            layers["post_attn_norm_scale"] = param((L, D), ("layers", "norm"), "ones")
            layers["post_mlp_norm_scale"] = param((L, D), ("layers", "norm"), "ones")
        if c.o_bias:
            layers["o_bias"] = param((L, D), ("layers", "embed"), "zeros")
        if c.mlp_bias:
            if not gpt2:
                layers["gate_bias"] = param((L, F), ("layers", "mlp"), "zeros")
            layers["up_bias"] = param((L, F), ("layers", "mlp"), "zeros")
            layers["down_bias"] = param((L, D), ("layers", "embed"), "zeros")
        if c.num_experts:  # a mixture of E SwiGLU experts and a router instead of the MLP
            E = c.num_experts
            for name in ("gate", "up", "down"):
                del layers[name]
            layers["router"] = param((L, D, E), ("layers", "embed", "experts"))
            layers["expert_gate"] = param((L, E, D, F), ("layers", "experts", "embed", "mlp"))
            layers["expert_up"] = param((L, E, D, F), ("layers", "experts", "embed", "mlp"))
            layers["expert_down"] = param(
                (L, E, F, D), ("layers", "experts", "mlp", "embed"), scale=out_scale
            )
        self.layers = nnx.Dict(layers)
        self.lora = None  # LoRA adapters' settings (rljax.models.lora.apply), static
        if not gpt2:
            inv_freq, self._rope_attention_factor = rope_inverse_frequencies(c)
            self._inv_freq = tuple(float(x) for x in inv_freq)  # static, not a parameter

    # ------------------------------------------------------------------ forward pieces

    def _norm(self, x, scale, bias):
        wide = _wide(x.dtype)
        x32 = x.astype(wide)
        if self.config.family == "gpt2":
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.config.norm_eps)
            y = y * scale.astype(wide) + bias.astype(wide)
        elif self.config.family == "gemma":  # RMSNorm times (1 + w), all in float32
            var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
            y = x32 * jax.lax.rsqrt(var + self.config.norm_eps) * (1.0 + scale.astype(wide))
        else:
            var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
            y = x32 * jax.lax.rsqrt(var + self.config.norm_eps) * scale.astype(wide)
        return y.astype(self.config.dtype)

    def _rope(self, x, positions, statics: _LayerStatics | None = None):
        """Rotate-half RoPE (Hugging Face's layout) on ``x [B, T, heads, H]``; the layer's own
        frequencies and factor where ``statics`` has them (Gemma 3's local RoPE)."""
        wide = _wide(x.dtype)
        inv_freq = jnp.asarray(self._inv_freq, wide)
        factor = self._rope_attention_factor
        if statics is not None and statics.inv_freq is not None:
            inv_freq, factor = statics.inv_freq.astype(wide), statics.rope_factor.astype(wide)
        angles = positions.astype(wide)[..., None] * inv_freq  # [B, T, H/2]
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        cos = jnp.cos(angles) * factor
        sin = jnp.sin(angles) * factor
        x32 = x.astype(wide)
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
        return (x32 * cos + rotated * sin).astype(x.dtype)

    def _attention(self, q, k, v, inputs: _PassInputs, query_slots, statics=None):
        """``q [B,T,N,H]``, ``k, v [B,S,K,H]``. Without a cache (S == T): causal + key padding
        (+ same segment, with ``segment_ids``). With one: keys are cache slots, allowed where
        valid and not after the query's slot (``query_slots [T]``). A sliding layer
        (``statics.window``) also drops the keys ``window`` or more slots back."""
        impl = self.config.attention_impl
        if _needs_general_attention(self.config):
            return self._windowed_attention(q, k, v, inputs, query_slots, statics)
        if inputs.segment_ids is not None:
            return self._segment_attention(q, k, v, inputs)
        if q.dtype == jnp.float64:
            # jax.nn.dot_product_attention runs its softmax in float32 whatever the inputs;
            # a float64 model (the reference of the parity tests) must stay float64 throughout.
            return _float64_attention(q, k, v, _allowed_keys(k, inputs, query_slots))
        if self._uses_grouped_attention():
            return _grouped_attention(q, k, v, _allowed_keys(k, inputs, query_slots))
        if inputs.cache_mask is None:
            if impl == "cudnn":
                return jax.nn.dot_product_attention(
                    q,
                    k,
                    v,
                    is_causal=True,
                    query_seq_lengths=inputs.seq_lengths,
                    key_value_seq_lengths=inputs.seq_lengths,
                    implementation="cudnn",
                )
            key_mask = inputs.mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S]
            return jax.nn.dot_product_attention(
                q, k, v, mask=key_mask, is_causal=True, implementation=impl
            )
        allowed = _allowed_keys(k, inputs, query_slots)
        return jax.nn.dot_product_attention(
            q, k, v, mask=allowed[:, None, :, :], implementation="xla"
        )

    def _uses_grouped_attention(self) -> bool:
        """Whether :func:`_grouped_attention` runs: ``attention_impl="grouped"``, or the default
        (``None``) on a CPU backend (decided when the pass is traced)."""
        impl = self.config.attention_impl
        return impl == "grouped" or (impl is None and jax.default_backend() == "cpu")

    def _windowed_attention(self, q, k, v, inputs: _PassInputs, query_slots, statics):
        """Attention of the configs with a sliding window, a logit soft-cap or a query scale
        (Mistral/Qwen windows, Gemma): the allowed keys as an explicit mask, causal, padding,
        segments and window in one. cuDNN's flash attention takes no such mask here: XLA runs
        it (a soft-cap needs the logits, so :func:`_masked_attention` runs that case)."""
        c = self.config
        allowed = _allowed_keys(k, inputs, query_slots)  # [B, T, S]
        if inputs.segment_ids is not None:
            segment_ids = inputs.segment_ids
            allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
        if statics is not None and statics.window is not None:
            q_slots = (
                jnp.arange(q.shape[1], dtype=jnp.int32) if query_slots is None else query_slots
            )
            q_slots = q_slots if q_slots.ndim == 2 else q_slots[None]  # [B or 1, T]
            k_slots = jnp.arange(k.shape[1], dtype=jnp.int32)
            allowed &= q_slots[:, :, None] - k_slots[None, None, :] < statics.window
        scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        if c.attn_logit_softcap is not None or q.dtype == jnp.float64:
            return _masked_attention(q, k, v, allowed, scale, c.attn_logit_softcap)
        if self._uses_grouped_attention():
            return _grouped_attention(q, k, v, allowed, scale)
        impl = "xla" if c.attention_impl == "cudnn" else c.attention_impl
        return jax.nn.dot_product_attention(
            q, k, v, mask=allowed[:, None, :, :], scale=scale, implementation=impl
        )

    def _layer_statics(self) -> _LayerStatics | None:
        """The per-layer windows and RoPE tables scanned with the layers (None if the config
        needs neither: every layer then runs the same causal attention and RoPE)."""
        c = self.config
        windows, local = c.layer_windows, c.rope_local_theta
        if windows is None:
            return None
        window = jnp.asarray(windows, jnp.int32)
        if local is None:
            return _LayerStatics(window, None, None)
        dim = c.dim_per_head
        local_inv = 1.0 / float(local) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        inv_freq = np.stack(
            [local_inv if s else np.asarray(self._inv_freq) for s in c.sliding_layers]
        )
        factors = [1.0 if s else self._rope_attention_factor for s in c.sliding_layers]
        wide = _wide(jnp.dtype(c.dtype))
        return _LayerStatics(
            window, jnp.asarray(inv_freq, wide), jnp.asarray(np.asarray(factors), wide)
        )

    def _segment_attention(self, q, k, v, inputs: _PassInputs):
        """Packed rows: a query attends to the keys of its own segment, causally (the key
        padding mask too). cuDNN's flash attention takes no such mask here: XLA runs it."""
        segment_ids = inputs.segment_ids
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
        allowed = same & _allowed_keys(k, inputs, None)
        if q.dtype == jnp.float64:
            return _float64_attention(q, k, v, allowed)
        if self._uses_grouped_attention():
            return _grouped_attention(q, k, v, allowed)
        impl = "xla" if self.config.attention_impl == "cudnn" else self.config.attention_impl
        return jax.nn.dot_product_attention(
            q, k, v, mask=allowed[:, None, :, :], implementation=impl
        )

    def _project(self, x, p, name: str):
        """Projection ``name`` (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``) of ``x``
        with the layer's parameters ``p``, plus ``scale * (x A) B`` when the model has a LoRA
        adapter on it (:mod:`rljax.models.lora`)."""
        in_axes = 2 if name == "o" else 1
        y = _dense(x, p[name], in_axes)
        if self.lora is not None and name in self.lora.targets:
            if self.lora.dropout:  # on the adapter's input, in training steps only
                x = _lora_dropout(x, p["lora_dropout_key"], name, self.lora.dropout)
            low = _dense(x, p[f"{name}_lora_a"], in_axes)
            y = y + self.lora.scale * _dense(low, p[f"{name}_lora_b"])
        return y

    def _layer(self, h, p, layer_cache, inputs: _PassInputs, statics=None):
        """One decoder layer on the residual stream ``h [B, T, D]`` with its parameters ``p``
        and its ``(k, v)`` cache slice (or None): the new ``h``, the updated slice and the
        router logits ``[B, T, E]`` of a mixture-of-experts layer (None for a dense MLP).
        ``statics``: the layer's :class:`_LayerStatics` (window, RoPE), or None."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.inexact) else x  # not keys
        p = jax.tree.map(cast, p)
        gpt2 = c.family == "gpt2"

        # Every projection is one 2-D matmul on [B * T, features] (the weights' head axes
        # folded in): XLA:CPU runs these, and their gradients under the layer scan, markedly
        # faster than the equivalent 3-D/4-D einsums (benchmarks/RESULTS.md, DPO step speed).
        x = self._norm(h, p["attn_norm_scale"], p.get("attn_norm_bias"))
        q = self._project(x, p, "q")
        k = self._project(x, p, "k")
        v = self._project(x, p, "v")
        if c.qkv_bias:
            q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
        if c.qk_norm:  # Qwen3: RMSNorm over each head's width, before RoPE
            q = self._norm(q, p["q_norm_scale"], None)
            k = self._norm(k, p["k_norm_scale"], None)
        if not gpt2:
            q = self._rope(q, inputs.positions, statics)
            k = self._rope(k, inputs.positions, statics)
        query_slots = None
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            k = _cache_write(cache_k, k, inputs.cache_index)
            v = _cache_write(cache_v, v, inputs.cache_index)
            layer_cache = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)  # a bfloat16 cache is read widened
            # [T], or [B, T] with per-row indices
            query_slots = inputs.cache_index[..., None] + jnp.arange(q.shape[1], dtype=jnp.int32)
        attn = self._attention(q, k, v, inputs, query_slots, statics)
        out = self._project(attn.astype(dt), p, "o")
        if c.o_bias:
            out = out + p["o_bias"]
        if c.family == "gemma":  # Gemma 2/3: the attention output normed before the residual
            out = self._norm(out, p["post_attn_norm_scale"], None)
        h = h + out

        x = self._norm(h, p["mlp_norm_scale"], p.get("mlp_norm_bias"))
        act = ACTIVATIONS[c.hidden_act]
        if c.num_experts:  # Qwen3-MoE / Mixtral: top-k routed SwiGLU experts
            experts = (p["router"], p["expert_gate"], p["expert_up"], p["expert_down"])
            down, router_logits = moe_mlp(
                x,
                *experts,
                act=act,
                top_k=c.num_experts_per_tok,
                norm_topk_prob=c.norm_topk_prob,
                impl=c.moe_impl,
            )
            return h + down, layer_cache, router_logits
        up = self._project(x, p, "up")
        if c.mlp_bias:
            up = up + p["up_bias"]
        if gpt2:
            hidden = act(up)
        else:
            gate = self._project(x, p, "gate")
            if c.mlp_bias:
                gate = gate + p["gate_bias"]
            hidden = act(gate) * up
        down = self._project(hidden, p, "down")
        if c.mlp_bias:
            down = down + p["down_bias"]
        if c.family == "gemma":  # and the MLP's
            down = self._norm(down, p["post_mlp_norm_scale"], None)
        return h + down, layer_cache, None

    # ------------------------------------------------------------------ public API

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_length`` tokens."""
        c = self.config
        shape = (c.num_layers, batch_size, max_length, c.kv_heads, c.dim_per_head)
        dtype = jnp.dtype(c.dtype if dtype is None else dtype)
        return KVCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def _pass_layout(self, tokens, mask, positions, cache, segment_ids):
        """``decode``'s inputs checked against ``tokens [B, T]``, with the defaults filled in:
        ``(mask, positions, segment_ids)``."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        b, t = tokens.shape
        if segment_ids is not None:
            if cache is not None:
                raise ValueError(
                    "segment_ids (packed rows) are for training/evaluation passes, "
                    "not with a KV cache"
                )
            if segment_ids.shape != (b, t):
                raise ValueError(
                    f"segment_ids shape {segment_ids.shape} does not match tokens {tokens.shape}"
                )
            segment_ids = segment_ids.astype(jnp.int32)
            if mask is None:
                mask = segment_ids > 0
            if positions is None:
                positions = positions_from_segments(segment_ids)
        if mask is None:
            mask = jnp.ones((b, t), bool)
        if mask.shape != (b, t):
            raise ValueError(f"mask shape {mask.shape} does not match tokens {tokens.shape}")
        mask = mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(mask)
            if cache is not None:
                positions = positions + jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]
        elif positions.shape != (b, t):
            raise ValueError(f"positions shape {positions.shape} does not match {tokens.shape}")
        return mask, positions, segment_ids

    def _embed(self, tokens, positions):
        """The input embeddings ``[B, T, D]`` in the compute dtype (GPT-2: plus the learned
        position embeddings; Gemma: times sqrt(D))."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        h = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        if c.family == "gpt2":
            h = h + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
        elif c.family == "gemma":  # embeddings times sqrt(D), rounded to the compute dtype
            h = h * jnp.asarray(math.sqrt(c.hidden_size), jnp.float32).astype(dt)
        return h

    def decode(
        self,
        tokens: jax.Array,
        mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
        return_router_logits: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states ``[B, T, D]`` (after the final norm), and the updated cache.

        Args:
          tokens: ``int [B, T]`` token ids.
          mask: ``[B, T]``, 1 at real tokens (default: all real).
          positions: ``int [B, T]`` position ids; default ``cumsum(mask) - 1``, continued from
            the tokens already in ``cache``.
          cache: a :class:`KVCache`; the ``T`` tokens are written at slots
            ``cache.index .. cache.index + T - 1`` (per row with an index ``[B]``) and attend
            to every valid earlier slot (on a sliding layer, to those less than
            ``sliding_window`` slots back).
          segment_ids: ``int [B, T]`` for packed rows (:func:`rljax.data.pack`): several
            sequences per row, numbered 1, 2, ... with 0 at padding. A token attends only to
            earlier tokens of its own segment, ``mask`` defaults to ``segment_ids > 0`` and
            ``positions`` to :func:`positions_from_segments` (restarting at 0 in each
            segment), so each sequence's outputs are those it has alone. Not with ``cache``.
          return_router_logits: also return the router logits ``[L, B, T, E]`` of a
            mixture-of-experts model (``(hidden, cache, router_logits)``), for
            :func:`rljax.models.moe.load_balancing_loss`.
        """
        c = self.config
        if return_router_logits and not c.num_experts:
            raise ValueError("return_router_logits: this model has no experts (num_experts=0)")
        mask, positions, segment_ids = self._pass_layout(
            tokens, mask, positions, cache, segment_ids
        )
        b, t = tokens.shape
        h = self._embed(tokens, positions)

        layer_params = {name: var[...] for name, var in self.layers.items()}
        if cache is None:
            cache_mask, cache_index, kv = None, None, None
        else:
            if cache.k.shape[1] != b:
                raise ValueError(f"cache batch {cache.k.shape[1]} != tokens batch {b}")
            cache_index = jnp.asarray(cache.index, jnp.int32)
            if cache_index.shape not in ((), (b,)):
                raise ValueError(
                    f"cache index must be a scalar or one per row ({b},), got {cache_index.shape}"
                )
            cache_mask = _cache_write(cache.mask, mask, cache_index)
            kv = (cache.k, cache.v)

        inputs = _PassInputs(
            positions=positions,
            mask=mask,
            seq_lengths=jnp.sum(mask, axis=-1, dtype=jnp.int32),
            segment_ids=segment_ids,
            cache_index=cache_index,
            cache_mask=cache_mask,
        )

        # XLA:CPU widens every bfloat16 (float16) operation to float32 but the converts, the
        # scan's per-layer slice of a 16-bit stack too: it converts the whole stack, and
        # loop-invariant code motion then hoists that convert out of the loop, a float32 copy
        # of each stack (of a LoRA model's frozen base, of the residual stream remat saves)
        # live through the backward scan. So a 16-bit parameter stack is sliced from a copy
        # that an optimization barrier with the layer index makes loop-variant (the convert
        # stays in the loop, on one layer), and remat saves the residual stream as its uint16
        # bits (only with such a stack: a step with float32 parameters peaks in the optimizer,
        # not in the scan, and Qwen3-8B's full fine-tuning gained 0.04 GB from it); both are
        # differentiated as the plain values. Same values and gradients; the Qwen2.5-7B LoRA
        # DPO step (benchmarks/memory_plan.py, remat) 12.4 -> 8.5 GB per device, 9.1 without
        # the residual stream's bits.
        narrow = {
            name: jax.lax.stop_gradient(x)
            for name, x in layer_params.items()
            if x.dtype in (jnp.bfloat16, jnp.float16)
        }

        def layer(h_bits, h, xs):
            if h_bits is not None:
                h = _differentiated_as(jax.lax.bitcast_convert_type(h_bits, h.dtype), h)
            (p, index), layer_cache, statics = xs
            if narrow:
                p = dict(p)
                stacks, index = jax.lax.optimization_barrier((narrow, index))
                for name, x in stacks.items():
                    p[name] = _differentiated_as(
                        jax.lax.dynamic_index_in_dim(x, index, 0, False), p[name]
                    )
            h = sharding.constrain_batch(h)  # under FSDP: keep the batch split (on_mesh)
            h, layer_cache, router_logits = self._layer(h, p, layer_cache, inputs, statics)
            return sharding.constrain_batch(h), (layer_cache, router_logits)

        if c.remat:
            layer = jax.checkpoint(layer, prevent_cse=False)

        def body(h, xs):
            h_bits = None
            if narrow and h.dtype in (jnp.bfloat16, jnp.float16):
                h_bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(h), jnp.uint16)
            return layer(h_bits, h, xs)

        index = jnp.arange(c.num_layers, dtype=jnp.int32)
        xs = ((layer_params, index), kv, self._layer_statics())
        h, (new_kv, router_logits) = jax.lax.scan(body, h, xs)
        h = self._norm(
            h,
            self.final_norm_scale[...],
            None if self.final_norm_bias is None else self.final_norm_bias[...],
        )
        if cache is not None:
            cache = KVCache(new_kv[0], new_kv[1], cache_mask, cache.index + t)
        if return_router_logits:
            return h, cache, router_logits
        return h, cache

    def unembedding(self) -> jax.Array:
        """The output projection ``[D, V]`` in the compute dtype (tied: the embedding's
        transpose). With ``final_logit_softcap`` the logits are ``cap * tanh(h W / cap)``
        (:meth:`logits`; the chunked log-probs take ``softcap=``)."""
        if not self.config.lm_head:
            raise ValueError("this model has no LM head (TransformerConfig.lm_head=False)")
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.config.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits ``[..., V]`` (compute dtype) from final hidden states, soft-capped
        to ``cap * tanh(logits / cap)`` with ``final_logit_softcap`` (Gemma)."""
        logits = jnp.einsum("...d,dv->...v", hidden.astype(self.config.dtype), self.unembedding())
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits

    def scores(self, hidden: jax.Array) -> jax.Array:
        """The scalar head per position ``[...]`` in float32 (float64 for a float64 model)."""
        if self.score is None:
            raise ValueError("this model has no scalar head (TransformerConfig.head is None)")
        wide = _wide(hidden.dtype)
        s = jnp.einsum("...d,d->...", hidden.astype(wide), self.score[...].astype(wide))
        if self.score_bias is not None:
            s = s + self.score_bias[...].astype(wide)
        return s

    def __call__(
        self,
        tokens: jax.Array,
        mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        return_router_logits: bool = False,
    ) -> jax.Array:
        """Logits ``[B, T, V]`` of the next token at every position (``segment_ids``: packed
        rows, as :meth:`decode`); with ``return_router_logits``, ``(logits, router_logits)``
        (``[L, B, T, E]``, a mixture-of-experts model's)."""
        if return_router_logits:
            hidden, _, router_logits = self.decode(
                tokens,
                mask,
                positions=positions,
                segment_ids=segment_ids,
                return_router_logits=True,
            )
            return self.logits(hidden), router_logits
        hidden, _ = self.decode(tokens, mask, positions=positions, segment_ids=segment_ids)
        return self.logits(hidden)

    def values(self, tokens, mask=None, *, positions=None, segment_ids=None) -> jax.Array:
        """Per-token values ``[B, T]`` from the value head."""
        hidden, _ = self.decode(tokens, mask, positions=positions, segment_ids=segment_ids)
        return self.scores(hidden)

    def rewards(self, tokens, mask=None, *, positions=None) -> jax.Array:
        """Sequence rewards ``[B]``: the scalar head at the last valid token of each row."""
        hidden, _ = self.decode(tokens, mask, positions=positions)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        last = last_valid_index(mask)
        h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return self.scores(h_last)


def with_head(
    model: Transformer, head: str | None, *, rngs: nnx.Rngs, lm_head: bool | None = None
) -> Transformer:
    """A new model with ``model``'s backbone (copied) and a fresh scalar ``head``.

    E.g. a reward model from a causal LM: ``with_head(lm, "reward", rngs=nnx.Rngs(0))`` (the
    LM head is dropped unless ``lm_head=True``), or a policy with a value head:
    ``with_head(lm, "value", rngs=...)``. ``head=None`` removes the scalar head.
    """
    if lm_head is None:
        lm_head = model.config.lm_head and head != "reward"
    config = dataclasses.replace(model.config, head=head, lm_head=lm_head)
    new = Transformer(config, rngs=rngs)
    for name in ("embed", "pos_embed", "final_norm_scale", "final_norm_bias", "lm_head"):
        source, target = getattr(model, name), getattr(new, name)
        if source is not None and target is not None:
            target[...] = jnp.copy(source[...])
    if new.lm_head is not None and model.lm_head is None:  # untie: start from the embedding
        new.lm_head[...] = jnp.copy(model.embed[...].T)
    for name, source in model.layers.items():
        new.layers[name][...] = jnp.copy(source[...])
    return new


def config_summary(config: TransformerConfig) -> Mapping[str, Any]:
    """A JSON-friendly dict of the config (for logs and summaries)."""
    return {**dataclasses.asdict(config), "num_params": config.num_params}
