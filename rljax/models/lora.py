"""LoRA adapters on a :class:`~rljax.models.transformer.Transformer` (Hu et al., 2021, "LoRA:
Low-Rank Adaptation of Large Language Models", arXiv:2106.09685).

A targeted projection ``W`` (``[in..., out...]`` per layer) gains a rank-``r`` update,

.. math::  y = x W + s \\, (x A) B, \\qquad A \\in \\mathbb{R}^{in \\times r},\\;
           B \\in \\mathbb{R}^{r \\times out},\\; s = \\alpha / r

(rsLoRA, Kalajdzievski 2023, arXiv:2312.03732: :math:`s = \\alpha / \\sqrt r`). ``A`` starts
as Hugging Face peft's default (Kaiming-uniform, ``U(-1/sqrt(in), 1/sqrt(in))``) and ``B`` at
zero, so a fresh adapter leaves the model's outputs unchanged. Training moves only the
adapters (and a scalar value/reward head, which is new); the base weights stay frozen, may be
stored in bfloat16 (QLoRA-style, Dettmers et al., 2023, without the 4-bit quantisation) and
get no gradient and no optimizer state.

The adapters are extra entries of the model's stacked ``layers`` dict, ``q_lora_a [L, D, r]``,
``q_lora_b [L, r, N, H]``, ``o_lora_a [L, N, H, r]``, ``o_lora_b [L, r, D]``, ... (the input
axes of ``W`` then ``r``; ``r`` then its output axes), read by the one projection helper of
every layer, ``Transformer._project``. The settings (:class:`LoRASettings`: rank, alpha,
targets, rsLoRA, dropout) are a static attribute of the model (``model.lora``), so they travel
in the ``graphdef``; with dropout the model also holds raw keys (:class:`LoRADropoutKey`).

Public API::

    model = lora.apply(model, rank=8, alpha=16, targets=("q", "v"), rngs=nnx.Rngs(0))
    graphdef, params = lora.split(model)      # params: LoRAParams(trainable, frozen)
    state = rljax.updates.init_dpo_state(params, optimizer)  # Adam state for the adapters only
    lora.trainable(params), lora.combine(trainable, params)  # the part the updates move
    lora.disabled(params)                     # the base model (adapters off): the reference
    lora.trainable_count(model), lora.total_count(model)
    plain = lora.merge(model)                 # adapters folded in: hf.save_model(plain, dir)
    lora.save_peft(model, "adapter/")         # peft's adapter_config.json + safetensors
    model = lora.load_peft(base_model, "adapter/")

Every update of :mod:`rljax.updates` takes LoRA parameters as they take plain ones
(``params`` from :func:`split`): the gradient, the optimizer state and the non-finite guard
cover :func:`trainable` only, and the DPO/KTO reference with ``reference="model"`` and no
``ref_params`` is :func:`disabled` (the same base weights, no second copy). Adapter dropout
is on in the gradient passes only (:func:`combine` with a key).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.models.transformer import Transformer

__all__ = [
    "PEFT_MODULES",
    "TARGETS",
    "LoRADropoutKey",
    "LoRAParams",
    "LoRASettings",
    "apply",
    "combine",
    "disabled",
    "has_dropout",
    "has_lora",
    "load_peft",
    "merge",
    "parse_targets",
    "save_peft",
    "split",
    "total_count",
    "trainable",
    "trainable_count",
]

#: The projections an adapter can target, and the number of input axes of each weight.
TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
#: Hugging Face module names of the targets (Llama family: Llama, Mistral, Qwen2/3).
PEFT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_FROM_PEFT = {module.split(".")[-1]: name for name, module in PEFT_MODULES.items()}
#: Top-level parameters trained alongside the adapters when present: a new scalar head.
_HEAD = ("score", "score_bias")
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """The adapters of a model (hashable: a static attribute, part of the ``graphdef``).

    Attributes:
      rank: ``r``.
      alpha: :math:`\\alpha` (peft's ``lora_alpha``).
      targets: the adapted projections, a subset of :data:`TARGETS` in its order.
      rslora: scale by :math:`\\alpha / \\sqrt r` instead of :math:`\\alpha / r`.
      dropout: dropout rate on each adapter's input ``x`` (peft's ``lora_dropout``), applied in
        the updates' gradient passes only (:func:`combine` with a ``key``).
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool = False
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRADropoutKey(nnx.Variable):
    """Raw ``uint32`` dropout keys (not a parameter): the run's ``lora_dropout_seed [2]``, and
    per layer ``layers.lora_dropout_key [L, 2]``, zero (dropout off) except inside a gradient
    pass (:func:`combine` with a ``key``)."""


class LoRAParams(NamedTuple):
    """The parameters of a model with adapters, split for training (a pytree; a tuple, so
    :func:`rljax.updates.lm.merge` takes it as ``nnx.merge(graphdef, *params)``).

    ``trainable``: the adapters (and a scalar head, if any), an ``nnx.State``; ``frozen``:
    everything else (the base weights), an ``nnx.State``."""

    trainable: Any
    frozen: Any


def _fail(argument: str, problem: str) -> None:
    raise ValueError(f"lora: {argument}: {problem}")


def parse_targets(targets: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """The projections named by ``targets`` (rljax's names, peft's ``"q_proj"``-style names,
    a comma-separated string) in :data:`TARGETS` order; ``None`` for ``None`` /
    ``"all-linear"`` (every projection a model has). ``ValueError`` for an unknown name."""
    if targets is None or targets == "all-linear":
        return None
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    names = set()
    for t in targets:
        name = _FROM_PEFT.get(t, t)
        if name not in TARGETS:
            _fail(
                "targets",
                f"{t!r} is not a projection; choose from {list(TARGETS)} (or peft's "
                f"{list(_FROM_PEFT)}, or 'all-linear')",
            )
        names.add(name)
    if not names:
        _fail("targets", "no projection selected")
    return tuple(t for t in TARGETS if t in names)


def _resolve_targets(targets, present: Sequence[str]) -> tuple[str, ...]:
    names = parse_targets(targets)
    if names is None:
        names = tuple(t for t in TARGETS if t in present)
        if not names:
            _fail("targets", "this model has none of the projections LoRA adapts")
    for name in names:
        if name not in present:
            _fail("targets", f"{name!r}: this model has no {name!r} projection")
    return names


def _check_model(model: Any, where: str) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(f"lora.{where}: model must be a Transformer, got {type(model).__name__}")


def apply(
    model: Transformer,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] | str | None = None,
    *,
    rngs: nnx.Rngs | None = None,
    rslora: bool = False,
    base_dtype: str | None = None,
    adapter_dtype: str = "float32",
) -> Transformer:
    """Add LoRA adapters to ``model`` (in place) and return it.

    Args:
      model: a :class:`~rljax.models.transformer.Transformer` without adapters.
      rank: ``r >= 1``.
      alpha: :math:`\\alpha`; ``None`` = ``rank`` (scale 1).
      dropout: dropout rate on each adapter's input, ``[0, 1)`` (peft's ``lora_dropout``):
        on in the updates' gradient passes only (evaluation, the reference and sampling run
        without it); not with TRPO's natural step.
      targets: projections to adapt: names from :data:`TARGETS` or peft's (``"q_proj"``, ...),
        a comma-separated string, or ``None`` / ``"all-linear"``: every projection the model
        has (the QLoRA paper's choice).
      rngs: where ``A``'s initial values come from (default ``nnx.Rngs(0)``).
      rslora: rank-stabilised scaling :math:`\\alpha / \\sqrt r`.
      base_dtype: cast the frozen base weights to this dtype (``"bfloat16"``: half the memory
        of a float32 base); ``None`` keeps them. The adapters stay ``adapter_dtype`` (and a
        scalar head, trained with them, its own dtype).
      adapter_dtype: storage dtype of the adapters (float32 master weights).
    """
    _check_model(model, "apply")
    if getattr(model, "lora", None) is not None:
        _fail("model", "already has LoRA adapters (merge(model) folds them in first)")
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        _fail("rank", f"must be an int >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        _fail("alpha", f"must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        _fail("dropout", f"must be in [0, 1), got {dropout}")
    for argument, dtype in (("base_dtype", base_dtype), ("adapter_dtype", adapter_dtype)):
        if dtype is not None and dtype not in ("float32", "bfloat16", "float16", "float64"):
            _fail(argument, f"must be float32, bfloat16, float16 or float64, got {dtype!r}")
    targets = _resolve_targets(targets, list(model.layers))
    settings = LoRASettings(int(rank), alpha, targets, rslora, float(dropout))
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if base_dtype is not None:  # the frozen base only: a scalar head is trained
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if _key_name(path[0]) not in _HEAD:
                var.set_value(var.get_value().astype(base_dtype))
    for name in settings.targets:
        _add_adapter(model, name, settings.rank, adapter_dtype, rngs)
    if settings.dropout:
        seed = jax.random.key_data(rngs.params())  # the run's dropout stream
        model.lora_dropout_seed = LoRADropoutKey(seed, logical_axes=(None,))
        layers = model.config.num_layers
        model.layers["lora_dropout_key"] = LoRADropoutKey(
            jnp.zeros((layers, 2), jnp.uint32), logical_axes=("layers", None)
        )
    model.lora = settings
    return model


def _adapter_shapes(model: Transformer, name: str, rank: int):
    """``(a_shape, a_axes, b_shape, b_axes)`` of the adapter on projection ``name``."""
    w = model.layers[name]
    shape, axes = w.shape, w.get_metadata().get("logical_axes") or (None,) * len(w.shape)
    n_in = TARGETS[name]
    a_shape = (shape[0], *shape[1 : 1 + n_in], rank)
    b_shape = (shape[0], rank, *shape[1 + n_in :])
    a_axes = (axes[0], *axes[1 : 1 + n_in], None)
    b_axes = (axes[0], None, *axes[1 + n_in :])
    return a_shape, a_axes, b_shape, b_axes


def _add_adapter(model: Transformer, name: str, rank: int, dtype: str, rngs: nnx.Rngs) -> None:
    a_shape, a_axes, b_shape, b_axes = _adapter_shapes(model, name, rank)
    fan_in = math.prod(a_shape[1:-1])
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), peft's default for A
    a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound).astype(dtype)
    model.layers[f"{name}_lora_a"] = nnx.Param(a, logical_axes=a_axes)
    model.layers[f"{name}_lora_b"] = nnx.Param(jnp.zeros(b_shape, dtype), logical_axes=b_axes)


def has_lora(tree: Any) -> bool:
    """Whether ``tree`` (a pytree of parameters, a train state's ``params``) holds a
    :class:`LoRAParams`."""
    return any(
        isinstance(x, LoRAParams)
        for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, LoRAParams))
    )


def _is_lora(x: Any) -> bool:
    return isinstance(x, LoRAParams)


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def _is_trainable(path, _value) -> bool:
    names = [_key_name(k) for k in path]
    return (len(names) >= 2 and names[0] == "layers" and "_lora_" in names[1]) or (
        len(names) >= 1 and names[0] in _HEAD
    )


def split(model: nnx.Module) -> tuple[Any, Any]:
    """``(graphdef, params)`` for the updates: ``params`` is a :class:`LoRAParams` when
    ``model`` has adapters, else ``nnx.split(model)[1]`` (so a driver calls this either way)."""
    if getattr(model, "lora", None) is None:
        return nnx.split(model)
    graphdef, train, frozen = nnx.split(model, _is_trainable, ...)
    return graphdef, LoRAParams(train, frozen)


def trainable(params: Any) -> Any:
    """``params`` (any pytree) with each :class:`LoRAParams` replaced by its ``trainable``
    part: what the optimizer moves and the gradient is taken of. ``params`` itself when it
    holds no adapters."""
    if not has_lora(params):
        return params
    return jax.tree.map(lambda x: x.trainable if _is_lora(x) else x, params, is_leaf=_is_lora)


def combine(train: Any, params: Any, key: jax.Array | None = None) -> Any:
    """The inverse of :func:`trainable`: ``params`` with its trainable parts replaced by
    ``train`` (``train`` itself when ``params`` holds no adapters).

    ``key``: a PRNG key that turns the adapters' dropout on (models applied with
    ``dropout > 0``): each layer's dropout key is drawn from it and the model's own seed, so a
    gradient pass (the updates call this with a key per step or minibatch) drops inputs while
    every other pass (evaluation, the reference, sampling) does not."""
    if not has_lora(params):
        return train
    count = iter(range(1 << 30))

    def one(full, t):
        if not _is_lora(full):
            return t
        full = full._replace(trainable=t)
        return (
            full if key is None else _with_dropout_key(full, jax.random.fold_in(key, next(count)))
        )

    return jax.tree.map(one, params, train, is_leaf=_is_lora)


def _with_dropout_key(params: LoRAParams, key: jax.Array) -> LoRAParams:
    frozen = params.frozen
    if "lora_dropout_seed" not in frozen:
        return params
    seed = jax.random.wrap_key_data(frozen["lora_dropout_seed"][...])
    layer_keys = frozen["layers"]["lora_dropout_key"]
    draws = jax.random.split(jax.random.fold_in(seed, jax.random.bits(key)), layer_keys.shape[0])
    fresh = jax.random.key_data(draws)

    def replace(path, value):
        return fresh if "lora_dropout_key" in jax.tree_util.keystr(path) else value

    return params._replace(frozen=jax.tree_util.tree_map_with_path(replace, frozen))


def has_dropout(params: Any) -> bool:
    """Whether ``params`` hold LoRA parameters of a model with adapter dropout."""
    leaves = jax.tree.leaves(params, is_leaf=_is_lora)
    return any(_is_lora(x) and "lora_dropout_seed" in x.frozen for x in leaves)


def disabled(params: Any) -> Any:
    """``params`` with every adapter switched off (its ``B`` zero, so ``s (x A) B = 0`` and
    each projection is exactly the base one): the base model, from the same frozen weights.
    Meant inside a jitted step (the zeros are adapter-sized)."""

    def off(x):
        if not _is_lora(x):
            return x
        zeroed = jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.zeros_like(v) if "_lora_b" in jax.tree_util.keystr(path) else v,
            x.trainable,
        )
        return x._replace(trainable=zeroed)

    return jax.tree.map(off, params, is_leaf=_is_lora)


def _count(tree: Any) -> int:
    """Floating-point numbers in ``tree`` (dropout keys are not parameters)."""
    leaves = jax.tree.leaves(tree)
    return int(sum(np.size(x) for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.inexact)))


def _params_of(model_or_params: Any) -> Any:
    if isinstance(model_or_params, nnx.Module):
        return split(model_or_params)[1]
    return model_or_params


def trainable_count(model_or_params: Any) -> int:
    """Number of trained parameters: the adapters (and scalar head) with LoRA, all of them
    without."""
    return _count(trainable(_params_of(model_or_params)))


def total_count(model_or_params: Any) -> int:
    """Number of parameters, adapters included."""
    return _count(_params_of(model_or_params))


def merge(model: Transformer) -> Transformer:
    """A new model without adapters whose projections are ``W + s A B`` (computed in float32,
    stored in ``config.param_dtype``): the fine-tuned model as a plain
    :class:`~rljax.models.transformer.Transformer`, for :func:`rljax.models.hf.save_model` or
    fast sampling. ``model`` is left unchanged."""
    _check_model(model, "merge")
    settings = getattr(model, "lora", None)
    if settings is None:
        _fail("model", "has no LoRA adapters to merge")
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    dtype = jnp.dtype(model.config.param_dtype)
    for name in settings.targets:
        a = new.layers[f"{name}_lora_a"][...].astype(jnp.float32)
        b = new.layers[f"{name}_lora_b"][...].astype(jnp.float32)
        w = new.layers[name]
        delta = jax.vmap(_low_rank_product, in_axes=(0, 0))(a, b)  # per layer
        w.set_value((w[...].astype(jnp.float32) + settings.scale * delta).astype(dtype))
        del new.layers[f"{name}_lora_a"], new.layers[f"{name}_lora_b"]
    if settings.dropout:
        del new.layers["lora_dropout_key"]
        del new.lora_dropout_seed
    for _, var in nnx.to_flat_state(nnx.state(new, nnx.Param)):
        var.set_value(var.get_value().astype(dtype))
    new.lora = None
    return new


def _low_rank_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``A B`` of one layer: ``a [in..., r]``, ``b [r, out...]`` -> ``[in..., out...]``."""
    return jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------- peft format


def _check_peft_model(model: Transformer, where: str) -> None:
    _check_model(model, where)
    if model.config.family == "gpt2":
        _fail(
            "model",
            "peft's GPT-2 adapters sit on the fused c_attn (one A for q, k and v), which "
            "rljax's separate q/k/v adapters cannot express: save_peft/load_peft take "
            "Llama-family models (Llama, Mistral, Qwen2/3); merge() works for GPT-2",
        )
    if model.config.head == "reward":
        _fail(
            "model",
            "is a reward model: save_peft/load_peft handle causal-LM adapters (a value head, "
            "training machinery, is left out); merge() and rljax.models.hf.save_model keep "
            "the reward head",
        )


def save_peft(
    model: Transformer,
    folder: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write ``model``'s adapters as a Hugging Face peft adapter folder:
    ``adapter_config.json`` (``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r``,
    ``lora_alpha``, ``target_modules``, ``use_rslora``) and ``adapter_model.safetensors``
    (float32; ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]``
    and ``lora_B.weight`` ``[out, r]``), which ``peft.PeftModel.from_pretrained(base, folder)``
    loads onto the transformers model of the same base weights."""
    from safetensors.numpy import save_file

    _check_peft_model(model, "save_peft")
    settings = getattr(model, "lora", None)
    if settings is None:
        _fail("model", "has no LoRA adapters to save (lora.apply or lora.load_peft first)")
    tensors = {}
    for name in settings.targets:
        a = np.asarray(jax.device_get(model.layers[f"{name}_lora_a"][...]), np.float32)
        b = np.asarray(jax.device_get(model.layers[f"{name}_lora_b"][...]), np.float32)
        for i in range(a.shape[0]):
            prefix = f"{_PEFT_PREFIX}model.layers.{i}.{PEFT_MODULES[name]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(
                a[i].reshape(-1, settings.rank).T
            )
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(
                b[i].reshape(settings.rank, -1).T
            )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": [PEFT_MODULES[t].split(".")[-1] for t in settings.targets],
        "use_rslora": settings.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, _ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(folder, _ADAPTER_WEIGHTS), metadata={"format": "pt"})


# adapter_config.json fields whose non-default values rljax's adapters cannot express.
_PEFT_UNSUPPORTED = {
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "use_dora": (False, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "use_qalora": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "lora_bias": (False, None),
    "use_bdlora": (None, False),
    "layer_replication": (None, []),
}


def _read_peft_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, _ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lora.load_peft: no {_ADAPTER_CONFIG} in {folder!r}")
    with open(path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        _fail("folder", f"{path}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        _fail("folder", f"{path}: task_type {config.get('task_type')!r}; only CAUSAL_LM loads")
    for key, allowed in _PEFT_UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            _fail("folder", f"{path}: {key}={config[key]!r} is not supported (only {allowed[0]!r})")
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        _fail("folder", f"{path}: a regex target_modules {targets!r} is not supported; list them")
    return config


def load_peft(model: Transformer, folder: str | os.PathLike) -> Transformer:
    """Add the peft LoRA adapter saved in ``folder`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, e.g. from ``PeftModel.save_pretrained`` or
    :func:`save_peft`) to ``model``, the same base model (in place; returned), with its
    ``lora_dropout`` (used if the model is trained further). Every adapter tensor must be read and
    every one the config implies present, else ``ValueError`` naming them."""
    from safetensors.numpy import load_file

    _check_peft_model(model, "load_peft")
    folder = os.fspath(folder)
    config = _read_peft_config(folder)
    weights_path = os.path.join(folder, _ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"lora.load_peft: no {_ADAPTER_WEIGHTS} in {folder!r}")
    tensors = load_file(weights_path)
    rank = int(config["r"])
    apply(
        model,
        rank,
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=config.get("target_modules"),
        rslora=bool(config.get("use_rslora", False)),
    )
    unread = set(tensors)
    for name in model.lora.targets:
        a_var, b_var = model.layers[f"{name}_lora_a"], model.layers[f"{name}_lora_b"]
        a, b = np.zeros(a_var.shape, np.float32), np.zeros(b_var.shape, np.float32)
        for i in range(a.shape[0]):
            prefix = f"{_PEFT_PREFIX}model.layers.{i}.{PEFT_MODULES[name]}"
            for kind, out, layout in (("A", a, "in_r"), ("B", b, "r_out")):
                key = f"{prefix}.lora_{kind}.weight"
                if key not in tensors:
                    _fail("folder", f"{weights_path} has no {key!r}")
                value = np.asarray(tensors[key], np.float32).T  # [in, r] or [r, out]
                try:
                    out[i] = value.reshape(out.shape[1:])
                except ValueError:
                    _fail(
                        "folder",
                        f"{key} has shape {tensors[key].shape}, which does not fit this "
                        f"model's {name!r} adapter ({layout} {out.shape[1:]})",
                    )
                unread.discard(key)
        a_var.set_value(jnp.asarray(a, a_var.dtype))
        b_var.set_value(jnp.asarray(b, b_var.dtype))
    if unread:
        shown = sorted(unread)[:5]
        _fail("folder", f"{weights_path}: tensors this model has no place for: {shown} ...")
    return model
