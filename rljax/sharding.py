"""Device meshes, logical-axis sharding rules and the helpers that place arrays on a mesh.

One :class:`jax.sharding.Mesh` with three named axes, always in this order:

- ``data``: data parallelism (the batch is split, parameters are replicated);
- ``fsdp``: fully-sharded data parallelism (ZeRO-3; Rajbhandari et al., 2020): the batch is
  split over ``data`` x ``fsdp``, and parameters are split along the model dimension ``embed``
  over ``fsdp`` (XLA all-gathers them per use and reduce-scatters their gradients);
- ``tensor``: Megatron-style tensor parallelism (Shoeybi et al., 2019): attention heads, MLP
  width and vocabulary are split over ``tensor``.

Parameters carry *logical* axis names as metadata (``nnx.Param(value,
logical_axes=("layers", "embed", "heads", "head_dim"))``, see :mod:`rljax.models.transformer`);
a :class:`ShardingRules` maps each logical name to mesh axes, and :func:`logical_to_spec` turns
one parameter's names into a :class:`~jax.sharding.PartitionSpec`. That mapping is the only
place sharding is decided: the model never sees a mesh.

Two conventions of the mapping:

- **Divisibility.** Given a shape, a mesh axis is dropped from a dimension it does not divide
  (the dimension stays replicated over it) instead of failing, so tiny test models and odd
  sizes (2 key/value heads on ``tensor=8``) still run; :func:`param_specs` always passes the
  shape.
- **One use per mesh axis.** A spec never names a mesh axis twice; the first dimension that
  claims an axis keeps it and later dimensions drop it.

Argument order: the spec functions take ``(x, rules, mesh)``; the placement helpers take
``(x, mesh, rules=DEFAULT_RULES)``.

A sharded training step is plain ``jax.jit`` with the shardings (no wrapper)::

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = (params, optimizer.init(params), jnp.zeros((), jnp.int32))
    state_shardings = train_state_shardings(state, mesh)
    state = jax.device_put(state, state_shardings)      # place inputs first: jit does not
    batch = shard_batch(batch, mesh)                     # reshard committed arguments
    step = jax.jit(
        update,                                          # (state, batch) -> (state, metrics)
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )

Donation caveat: ``jax.device_put`` may reuse the source buffer for the shard on the source's
device (e.g. replicated leaves), so donating a placed state can delete the array it came from;
do not reuse the unplaced state after a donating step.

Multi-host (one process per host, JAX's multi-controller runtime): call
:func:`initialize_distributed` before any other JAX call, build the same global mesh in every
process with :func:`make_mesh` (``jax.devices()`` is then every process's devices, ``data``
outermost so that it spans hosts), and assemble each step's global batch from the
process-local rows with :func:`make_array_from_process_local`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "COORDINATOR_ENV",
    "DATA_PARALLEL_RULES",
    "DEFAULT_RULES",
    "FSDP_RULES",
    "MESH_AXES",
    "NUM_PROCESSES_ENV",
    "PROCESS_ID_ENV",
    "RULE_PRESETS",
    "TENSOR_RULES",
    "ShardingRules",
    "barrier",
    "batch_sharding",
    "initialize_distributed",
    "initialize_from_env",
    "is_primary",
    "logical_to_spec",
    "make_array_from_process_local",
    "make_mesh",
    "param_shardings",
    "param_specs",
    "parse_mesh_spec",
    "process_rows",
    "replicated",
    "shard_batch",
    "shard_global_batch",
    "shard_params",
    "shard_train_state",
    "to_host",
    "train_state_shardings",
]

MESH_AXES = ("data", "fsdp", "tensor")

# ---------------------------------------------------------------------------- meshes


def _check_sizes(sizes: Mapping[str, Any], source: str) -> dict[str, int]:
    """Validate axis names and sizes; return all three axes in order (missing ones = 1)."""
    out = dict.fromkeys(MESH_AXES, 1)
    for name, size in sizes.items():
        if name not in MESH_AXES:
            raise ValueError(
                f"{source}: unknown mesh axis {name!r}; axes are {', '.join(MESH_AXES)}"
            )
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"{source}: size of {name!r} must be an integer, got {size!r}")
        if size < 1 and size != -1:
            raise ValueError(
                f"{source}: size of {name!r} must be >= 1 or -1 (the rest), got {size}"
            )
        out[name] = int(size)
    rest = [name for name, size in out.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"{source}: at most one axis may be -1, got {', '.join(rest)}")
    return out


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parse ``"data=2,fsdp=2,tensor=2"`` into ``{"data": 2, "fsdp": 2, "tensor": 2}``.

    Axes are ``data``, ``fsdp`` and ``tensor``, in any order; missing ones have size 1 and one
    may be ``-1`` (the remaining devices, resolved by :func:`make_mesh`). The result always has
    the three axes in mesh order. Raises ``ValueError`` naming the malformed part.
    """
    if not isinstance(spec, str):
        raise TypeError(f"mesh spec must be a string like 'data=2,fsdp=4', got {spec!r}")
    if not spec.strip():
        raise ValueError("mesh spec is empty; write e.g. 'data=-1' or 'data=2,fsdp=2,tensor=2'")
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        source = f"mesh spec {spec!r}, part {part.strip()!r}"
        if "=" not in part:
            raise ValueError(f"{source}: expected axis=size (e.g. 'fsdp=4')")
        name, _, size_text = (s.strip() for s in part.partition("="))
        if name not in MESH_AXES:
            raise ValueError(
                f"{source}: unknown mesh axis {name!r}; axes are {', '.join(MESH_AXES)}"
            )
        if name in sizes:
            raise ValueError(f"{source}: axis {name!r} is given twice")
        try:
            sizes[name] = int(size_text)
        except ValueError:
            raise ValueError(f"{source}: size {size_text!r} is not an integer") from None
        _check_sizes({name: sizes[name]}, source)
    return _check_sizes(sizes, f"mesh spec {spec!r}")


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A :class:`~jax.sharding.Mesh` with axes ``(data, fsdp, tensor)`` over ``devices``.

    Args:
      spec: ``"data=2,fsdp=4"`` (see :func:`parse_mesh_spec`) or a dict of axis sizes; missing
        axes have size 1, one axis may be ``-1`` (the rest of the devices).
      devices: the devices to use (default ``jax.devices()``, every process's devices in a
        multi-host run); their number must equal the product of the sizes.

    The axes are ``AxisType.Auto`` (XLA's sharding propagation inside ``jit``, what
    ``in_shardings``/``out_shardings`` and :mod:`rljax.sharding`'s rules assume; ``jax.make_mesh``
    would default to ``Explicit``).
    """
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else _check_sizes(dict(spec), "mesh")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    described = ",".join(f"{name}={size}" for name, size in sizes.items())
    known = math.prod(size for size in sizes.values() if size != -1)
    for name, size in sizes.items():
        if size == -1:
            if n % known:
                raise ValueError(
                    f"mesh {described}: the other axes ({known} devices) do not divide the "
                    f"{n} devices, so {name}=-1 has no integer size"
                )
            sizes[name] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh {described} needs {math.prod(sizes.values())} devices but {n} are given; "
            "make the sizes multiply to the device count (one axis may be -1 = the rest) or "
            "pass devices="
        )
    return jax.make_mesh(
        tuple(sizes.values()),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


# ---------------------------------------------------------------------------- rules


def _as_axes(mesh_axes: str | Sequence[str] | None) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    axes = tuple(mesh_axes)
    if not all(isinstance(a, str) for a in axes):
        raise ValueError(f"mesh axes must be names (str), got {mesh_axes!r}")
    return axes


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axes, as a tuple of ``(logical_name, mesh_axes)`` pairs.

    ``mesh_axes`` is a mesh axis name, a tuple of them (the dimension is split over their
    product, in order), or ``None``/``()`` (replicated). Normalised to tuples on construction.
    Hashable, so usable as a static argument.

    Example::

        rules = ShardingRules((("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None)))
        rules.mesh_axes("batch")              # ("data", "fsdp")
        rules.override(vocab=None)            # a new rules object with vocab replicated
    """

    rules: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self):
        pairs = []
        seen = set()
        for pair in self.rules:
            if len(pair) != 2 or not isinstance(pair[0], str):
                raise ValueError(f"each rule is (logical_name, mesh_axes), got {pair!r}")
            name, axes = pair
            if name in seen:
                raise ValueError(f"logical axis {name!r} has two rules")
            seen.add(name)
            pairs.append((name, _as_axes(axes)))
        object.__setattr__(self, "rules", tuple(pairs))

    @classmethod
    def from_dict(cls, mapping: Mapping[str, str | Sequence[str] | None]) -> ShardingRules:
        return cls(tuple(mapping.items()))

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.rules)

    def mesh_axes(self, logical_name: str) -> tuple[str, ...]:
        """The mesh axes of one logical name (raises ``ValueError`` if there is no rule)."""
        for name, axes in self.rules:
            if name == logical_name:
                return axes
        raise ValueError(
            f"no sharding rule for logical axis {logical_name!r} (rules cover "
            f"{', '.join(n for n, _ in self.rules)}); add one with "
            f"rules.override({logical_name}=...)"
        )

    def override(self, **mesh_axes: str | Sequence[str] | None) -> ShardingRules:
        """A copy with the given logical names remapped (or added)."""
        mapping = self.as_dict()
        mapping.update(mesh_axes)
        return ShardingRules.from_dict(mapping)


_REPLICATED_PARAMS = {
    "layers": None,
    "embed": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "mlp": None,
    "vocab": None,
    "norm": None,
    "experts": None,
}
_ACTIVATIONS = {"batch": ("data", "fsdp"), "time": None}

#: FSDP over ``fsdp`` along ``embed`` plus Megatron tensor parallelism over ``tensor``.
#: Mixture-of-experts weights ``[layers, experts, embed, mlp]`` are split over ``fsdp`` along
#: ``experts`` (whole experts per device, the layout expert parallelism wants; ``embed`` takes
#: ``fsdp`` instead where the expert count does not divide it): the same bytes per device as
#: FSDP along ``embed``, gathered per use like any FSDP weight.
DEFAULT_RULES = ShardingRules.from_dict(
    {
        **_ACTIVATIONS,
        **_REPLICATED_PARAMS,
        "experts": "fsdp",
        "embed": "fsdp",
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "vocab": "tensor",
    }
)
#: Parameters split along ``embed`` over ``fsdp`` only.
FSDP_RULES = ShardingRules.from_dict(
    {**_ACTIVATIONS, **_REPLICATED_PARAMS, "experts": "fsdp", "embed": "fsdp"}
)
#: Tensor parallelism only: heads, MLP width and vocabulary over ``tensor``.
TENSOR_RULES = DEFAULT_RULES.override(embed=None, experts=None)
#: Plain data parallelism: every parameter replicated, the batch split over ``data`` x ``fsdp``.
DATA_PARALLEL_RULES = ShardingRules.from_dict({**_ACTIVATIONS, **_REPLICATED_PARAMS})

RULE_PRESETS: dict[str, ShardingRules] = {
    "default": DEFAULT_RULES,
    "fsdp": FSDP_RULES,
    "tensor": TENSOR_RULES,
    "data": DATA_PARALLEL_RULES,
}


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: ShardingRules = DEFAULT_RULES,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """The ``PartitionSpec`` of an array whose dimensions have the given logical names.

    Args:
      logical_axes: one name (or ``None`` = replicated) per dimension.
      rules: the logical -> mesh mapping.
      mesh: if given, the mesh axes are checked against it and, with ``shape``, dropped from a
        dimension they do not divide (the dimension stays replicated over that mesh axis).
      shape: the array's shape (needs ``mesh``).

    A mesh axis is never used twice: the first dimension that claims it keeps it.
    """
    logical_axes = tuple(logical_axes)
    if shape is not None:
        shape = tuple(shape)
        if len(shape) != len(logical_axes):
            raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
        if mesh is None:
            raise ValueError("logical_to_spec: shape-aware divisibility needs the mesh")
    used: set[str] = set()
    entries = []
    for dim, name in enumerate(logical_axes):
        kept: list[str] = []
        for axis in () if name is None else rules.mesh_axes(name):
            if mesh is not None and axis not in mesh.shape:
                raise ValueError(
                    f"rule {name!r} -> {axis!r}: the mesh has no axis {axis!r} "
                    f"(its axes are {', '.join(mesh.axis_names)})"
                )
            if axis in used:
                continue
            if shape is not None:
                split = math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]
                if shape[dim] % split:
                    continue
            kept.append(axis)
            used.add(axis)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries)


# ---------------------------------------------------------------------------- parameters


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_specs(
    state: Any,
    rules: ShardingRules = DEFAULT_RULES,
    mesh: Mesh | None = None,
    *,
    allow_missing: bool = False,
) -> Any:
    """A ``PartitionSpec`` per parameter of an ``nnx.State`` (``nnx.split(model, nnx.Param)``).

    Each ``nnx.Variable``'s ``logical_axes`` metadata is mapped by :func:`logical_to_spec`
    with the variable's shape (so indivisible mesh axes are dropped when ``mesh`` is given).
    The result has the state's containers with a ``PartitionSpec`` where each variable was: a
    pytree prefix of the state, accepted by ``jax.jit``'s ``in_shardings``/``out_shardings``
    and ``jax.device_put``. A variable (or plain array) without ``logical_axes`` is an error
    naming its path, or replicated with ``allow_missing=True``.

    Only shapes are read, so an abstract state works too: shard at initialisation, without
    ever holding the whole model on one device, with ::

        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        shardings = param_shardings(nnx.split(abstract, nnx.Param, ...)[1], mesh)
        init = lambda: nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)[1]
        params = jax.jit(init, out_shardings=shardings)()
    """

    def spec(path, leaf):
        axes = leaf.get_metadata().get("logical_axes") if _is_variable(leaf) else None
        shape = np.shape(leaf.get_value() if _is_variable(leaf) else leaf)
        if axes is None:
            if allow_missing:
                return PartitionSpec()
            raise ValueError(
                f"parameter {_path_str(path)!r} has no logical_axes metadata; create it as "
                "nnx.Param(value, logical_axes=(...)) or pass allow_missing=True to replicate it"
            )
        try:
            return logical_to_spec(axes, rules, mesh, shape if mesh is not None else None)
        except ValueError as e:
            raise ValueError(f"parameter {_path_str(path)!r}: {e}") from None

    return jax.tree_util.tree_map_with_path(spec, state, is_leaf=_is_variable)


def param_shardings(
    state: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES, *, allow_missing: bool = False
) -> Any:
    """:func:`param_specs` as ``NamedSharding``\\ s on ``mesh`` (same prefix tree)."""
    specs = param_specs(state, rules, mesh, allow_missing=allow_missing)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def shard_params(
    state: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES, *, allow_missing: bool = False
) -> Any:
    """``jax.device_put`` of a parameter state onto its :func:`param_shardings`."""
    return jax.device_put(state, param_shardings(state, mesh, rules, allow_missing=allow_missing))


def _params_of(train_state: Any) -> Any:
    if hasattr(train_state, "params"):
        return train_state.params
    if isinstance(train_state, Mapping) and "params" in train_state:
        return train_state["params"]
    if isinstance(train_state, tuple | list) and train_state:
        return train_state[0]
    raise ValueError(
        "train_state_shardings: cannot find the parameters (no .params, no 'params' key, not "
        "a tuple whose first item is the params); pass params="
    )


def _map_param_like(
    tree: Any, params: Any, param_value: Any, leaf_fn: Callable, more: Sequence = ()
) -> Any:
    """Replace every subtree of ``tree`` shaped like ``params`` (same type, tree structure and
    leaf shapes) by ``param_value``, and then of each ``(like, value)`` pair of ``more``;
    map every other leaf through ``leaf_fn``."""

    def shaped_like(like):
        treedef = jax.tree.structure(like)
        shapes = [np.shape(x) for x in jax.tree.leaves(like)]
        return lambda node: (
            type(node) is type(like)
            and jax.tree.structure(node) == treedef
            and [np.shape(x) for x in jax.tree.leaves(node)] == shapes
        )

    matchers = [(shaped_like(like), value) for like, value in ((params, param_value), *more)]

    def matched(node):
        return next((value for like, value in matchers if like(node)), _UNMATCHED)

    return jax.tree.map(
        lambda node: leaf_fn(node) if (v := matched(node)) is _UNMATCHED else v,
        tree,
        is_leaf=lambda node: matched(node) is not _UNMATCHED,
    )


_UNMATCHED = object()


def train_state_shardings(
    train_state: Any,
    mesh: Mesh,
    rules: ShardingRules = DEFAULT_RULES,
    *,
    params: Any = None,
    allow_missing: bool = False,
) -> Any:
    """Shardings for a training state, e.g. ``(params, opt_state, step)``.

    The params get :func:`param_shardings`; so does every subtree of the state with the params'
    tree structure and leaf shapes, which covers optax states (Adam's ``mu`` and ``nu`` mirror
    the params); when the params are a tuple of states (LoRA's ``(trainable, frozen)``,
    :func:`rljax.models.lora.split`), so does every subtree shaped like one of them (Adam's
    moments of the trainable part); every other leaf (step counters, Adam's ``count``, RNG
    keys) is replicated. ``params`` defaults to ``train_state.params``, ``train_state["params"]`` or
    ``train_state[0]``.

    Returns a pytree prefix of ``train_state`` for ``jax.device_put`` and ``jax.jit``.
    """
    params = _params_of(train_state) if params is None else params
    shardings = param_shardings(params, mesh, rules, allow_missing=allow_missing)
    # A tuple of states (LoRA's (trainable, frozen)), the params themselves or anywhere in them
    # ({"policy": LoRAParams, ...}): a subtree shaped like one part (the optimizer state of the
    # trainable part) gets that part's shardings too.
    parts = _state_parts(params, shardings)
    return _map_param_like(train_state, params, shardings, lambda _: replicated(mesh), parts)


def _state_parts(params: Any, shardings: Any) -> tuple:
    """``(part, its shardings)`` of every tuple of states in ``params`` (the params themselves
    or in plain dicts of them, as ``{"policy": LoRAParams(trainable, frozen)}``)."""
    if isinstance(params, tuple) and params and not isinstance(params, nnx.State):
        return tuple(zip(params, shardings, strict=True))
    if type(params) is dict:
        return tuple(pair for k in params for pair in _state_parts(params[k], shardings[k]))
    return ()


def shard_train_state(
    train_state: Any,
    mesh: Mesh,
    rules: ShardingRules = DEFAULT_RULES,
    *,
    params: Any = None,
    allow_missing: bool = False,
) -> Any:
    """``jax.device_put`` of a training state onto its :func:`train_state_shardings`."""
    shardings = train_state_shardings(
        train_state, mesh, rules, params=params, allow_missing=allow_missing
    )
    return jax.device_put(train_state, shardings)


# ---------------------------------------------------------------------------- batches


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """The leading (batch) axis split over the ``batch`` rule's mesh axes (``data`` x ``fsdp``
    by default), other axes replicated; valid for arrays of any rank >= 1."""
    axes = rules.mesh_axes("batch")
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


# The batch axes of the mesh that :func:`on_mesh` traces under (None outside it).
_TRACING_MESH: contextvars.ContextVar = contextvars.ContextVar("rljax_tracing_mesh", default=None)


def on_mesh(fn: Callable, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Callable:
    """``fn`` traced with ``mesh`` as the ambient (abstract) mesh, so the model's activation
    constraints (:func:`constrain_batch`) take effect: wrap an update before ``jax.jit``
    (:func:`rljax.updates.lm.compile_update` does).

    Without them XLA's sharding propagation is free to all-gather the batch to match
    FSDP-sharded weights, and then runs every layer on the global batch on every device
    (measured by ``benchmarks/memory_plan.py``: 508 GB of temporaries per device for a
    Llama-3.1-8B DPO step on fsdp=8, 8 pairs x 2048 tokens, instead of a per-device share).
    """
    axes = rules.mesh_axes("batch")

    @functools.wraps(fn)
    def traced_on_mesh(*args, **kwargs):
        token = _TRACING_MESH.set((mesh.abstract_mesh, axes))
        try:
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args, **kwargs)
        finally:
            _TRACING_MESH.reset(token)

    return traced_on_mesh


def constrain_batch(x: jax.Array) -> jax.Array:
    """``x`` with its leading (batch) axis split over the batch axes of the mesh being traced
    under (:func:`on_mesh`), other axes replicated; ``x`` itself outside :func:`on_mesh`, on a
    mesh whose batch axes have one device, or when they do not divide the leading size (a
    constraint is a layout, never a change of values)."""
    traced = _TRACING_MESH.get()
    if traced is None or not np.ndim(x):
        return x
    abstract, axes = traced
    shards = math.prod(abstract.shape[a] for a in axes)
    if shards <= 1 or x.shape[0] % shards:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


def shard_batch(batch: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """``jax.device_put`` every leaf of ``batch`` with its leading axis split over ``data`` x
    ``fsdp`` (:func:`batch_sharding`); scalars are replicated. For one process (on several,
    use :func:`make_array_from_process_local`). Raises ``ValueError`` naming a leaf whose
    leading size the batch axes do not divide."""
    axes = rules.mesh_axes("batch")
    shards = math.prod(mesh.shape[a] for a in axes)

    def leaf_sharding(path, leaf):
        shape = np.shape(leaf)
        if not shape:
            return replicated(mesh)
        if shape[0] % shards:
            raise ValueError(
                f"batch leaf {_path_str(path) or '<root>'!r} has leading size {shape[0]}, not "
                f"divisible by {' x '.join(axes)} = {shards} devices; make the batch a "
                f"multiple of {shards}"
            )
        return batch_sharding(mesh, rules)

    return jax.device_put(batch, jax.tree_util.tree_map_with_path(leaf_sharding, batch))


def _local_batch_shards(mesh: Mesh, axes: Sequence[str]) -> int:
    """How many distinct slices of the batch axis this process's devices hold."""
    devices = mesh.devices
    names = list(mesh.axis_names)
    process = jax.process_index()
    coords = set()
    for index in np.ndindex(devices.shape):
        if devices[index].process_index == process:
            coords.add(tuple(index[names.index(a)] for a in axes))
    return len(coords)


def make_array_from_process_local(
    batch: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES
) -> Any:
    """Global batch arrays from each process's rows (``jax.make_array_from_process_local_data``).

    Every process calls it with its own ``batch`` (numpy or jax arrays, rows ``[local_batch,
    ...]``); the result's leading axis is the concatenation over processes, split over the
    batch mesh axes as :func:`batch_sharding`. Scalars must be equal in every process and are
    replicated. On one process this equals :func:`shard_batch`.
    """
    axes = rules.mesh_axes("batch")
    local_shards = _local_batch_shards(mesh, axes)

    def one(path, leaf):
        local = np.asarray(leaf)
        if local.ndim == 0:
            return jax.make_array_from_process_local_data(replicated(mesh), local)
        if local.shape[0] % local_shards:
            raise ValueError(
                f"batch leaf {_path_str(path) or '<root>'!r}: process {jax.process_index()} has "
                f"{local.shape[0]} rows, not divisible by its {local_shards} local batch shards"
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, rules), local)

    return jax.tree_util.tree_map_with_path(one, batch)


# ---------------------------------------------------------------------------- multi-host


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int,
    process_id: int,
    *,
    cpu_collectives: str | None = "gloo",
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """Start JAX's multi-controller runtime (``jax.distributed.initialize``); a no-op when
    ``num_processes == 1`` or when it is already initialized.

    Call it first, before any other JAX call, in every process with the same
    ``coordinator_address`` (``"host:port"`` of process 0) and ``num_processes``.
    ``cpu_collectives`` (``"gloo"`` or ``"mpi"``; ``None`` leaves the setting alone) sets
    ``jax_cpu_collectives_implementation``, which CPU devices need for cross-process
    collectives; it does nothing on GPU/TPU.
    """
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"need num_processes >= 1 and 0 <= process_id < num_processes, got "
            f"num_processes={num_processes}, process_id={process_id}"
        )
    if num_processes == 1 or jax.distributed.is_initialized():
        return
    if coordinator_address is None:
        raise ValueError("a multi-process run needs coordinator_address='host:port'")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


COORDINATOR_ENV = "RLJAX_COORDINATOR"
NUM_PROCESSES_ENV = "RLJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "RLJAX_PROCESS_ID"


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """:func:`initialize_distributed` from environment variables; what the experiments call first.

    ``RLJAX_COORDINATOR`` (``host:port`` of process 0), ``RLJAX_NUM_PROCESSES`` and
    ``RLJAX_PROCESS_ID`` are set by ``python -m rljax.launch`` (or by hand, one process per
    host, on a cluster). ``RLJAX_COORDINATOR=auto`` calls plain ``jax.distributed.initialize()``,
    which detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes). With
    none of the variables set this is a no-op (one process), so scripts run unchanged.

    Returns whether the process is now part of a multi-process run (``jax.process_count() >
    1`` once initialized). Raises ``ValueError`` naming a missing or malformed variable.
    """
    env = os.environ if environ is None else environ
    names = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
    present = [name for name in names if env.get(name)]
    if not present:
        return False
    coordinator = env.get(COORDINATOR_ENV, "")
    if coordinator == "auto":
        if not jax.distributed.is_initialized():
            jax.distributed.initialize()
        return jax.process_count() > 1
    missing = [name for name in names if name not in present]
    if missing:
        raise ValueError(
            f"{', '.join(present)} set but {', '.join(missing)} not: a multi-process run needs "
            f"all of {', '.join(names)} (or {COORDINATOR_ENV}=auto)"
        )
    values = {}
    for name in (NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        try:
            values[name] = int(env[name])
        except ValueError:
            raise ValueError(f"{name}={env[name]!r} is not an integer") from None
    if ":" not in coordinator:
        raise ValueError(f"{COORDINATOR_ENV}={coordinator!r} is not host:port (or auto)")
    initialize_distributed(coordinator, values[NUM_PROCESSES_ENV], values[PROCESS_ID_ENV])
    return values[NUM_PROCESSES_ENV] > 1


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs, summaries and exported models."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_rows(rows: int, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> slice:
    """The rows of a global batch of ``rows`` rows that this process's devices hold under
    :func:`batch_sharding` (all of them on one process, or when the batch axes lie within a
    host). Raises ``ValueError`` when they are not one contiguous block (a mesh whose batch axes
    interleave hosts; put ``data`` outermost)."""
    index_map = batch_sharding(mesh, rules).addressable_devices_indices_map((rows,))
    spans = sorted({(s[0].indices(rows)[0], s[0].indices(rows)[1]) for s in index_map.values()})
    start, stop = spans[0][0], spans[0][1]
    for lo, hi in spans[1:]:
        if lo != stop:
            raise ValueError(
                f"process {jax.process_index()} holds batch rows {spans} of {rows}, not one "
                "contiguous block; order the mesh so that the batch axes (data, fsdp) split "
                "hosts first"
            )
        stop = hi
    return slice(start, stop)


def shard_global_batch(batch: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Place a global batch that every process holds in full (the same rows everywhere).

    One process: :func:`shard_batch`. Several: each process keeps only its own rows
    (:func:`process_rows`) and :func:`make_array_from_process_local` assembles the global
    arrays, so the result equals the one-process placement of the same batch.
    """
    if jax.process_count() == 1:
        return shard_batch(batch, mesh, rules)
    rows = {np.shape(leaf)[0] for leaf in jax.tree.leaves(batch) if np.ndim(leaf)}
    if len(rows) > 1:
        raise ValueError(f"batch leaves have different leading sizes {sorted(rows)}")
    if not rows:
        return make_array_from_process_local(batch, mesh, rules)
    own = process_rows(rows.pop(), mesh, rules)
    return make_array_from_process_local(
        jax.tree.map(lambda x: x[own] if np.ndim(x) else x, batch), mesh, rules
    )


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also works on arrays spread over several processes.

    Arrays this process cannot read alone (sharded over other hosts' devices and not fully
    replicated) are gathered with ``multihost_utils.process_allgather`` (a collective: every
    process must call ``to_host`` on the same structure); everything else is a plain
    ``jax.device_get``. On one process this is ``jax.device_get``.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    remote = [
        i
        for i, x in enumerate(leaves)
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated
    ]
    if remote:
        gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True)
        for i, value in zip(remote, gathered, strict=True):
            leaves[i] = np.asarray(value)
    return jax.device_get(jax.tree.unflatten(treedef, leaves))
