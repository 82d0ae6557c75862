"""What the update modules share: the coefficient overrides a step takes (``hyperparams``),
the one-optax-step update and evaluation of the language-model objectives (SFT, reward, DPO,
KTO), and the check of a batch's keys.

Coefficient overrides. A step built from a config compiles the config's coefficients in as
constants; called with ``hyperparams``, a dict of coefficient values, it reads those instead,
so under ``jax.jit`` they are traced arguments and a sweep over them compiles once. Every
update that takes ``hyperparams`` validates and merges it here:

* the keys must be among ``config.traced_coefficients()`` (the float coefficients the step
  reads), else ``ValueError`` naming each key and why it is not traced (a count or switch, an
  optional coefficient the config leaves ``None``, a term the step does not compute);
* a value may not be ``None``: whether an optional coefficient is set (``None`` = off) is part
  of the compiled program, so the config fixes it and only the value is traced;
* :func:`traced_config` is then ``dataclasses.replace(config, **hyperparams)``: the step reads
  the same fields, so it equals the step built with the replaced config. Concrete values go
  through the config's own range checks there; traced ones cannot be checked.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rljax.finite import guarded_step
from rljax.models import lora

__all__: list[str] = []  # internal: the pieces the update modules share


# ---------------------------------------------------------------------------------------------
# Coefficient overrides (hyperparams)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _float_fields(cls: type) -> tuple[str, ...]:
    hints = typing.get_type_hints(cls)

    def is_float(hint) -> bool:
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        return hint is float or (union and set(typing.get_args(hint)) == {float, type(None)})

    return tuple(f.name for f in dataclasses.fields(cls) if is_float(hints[f.name]))


def float_coefficients(config: Any) -> tuple[str, ...]:
    """The fields of the config dataclass ``config`` annotated ``float`` or ``float | None``
    that it sets (not ``None``): the coefficients a step built from it can trace (an optional
    coefficient left ``None`` is off and has no input in the program). Counts are ``int`` and
    switches ``bool``/``str``, so they stay static."""
    return tuple(name for name in _float_fields(type(config)) if getattr(config, name) is not None)


def check_config(config: Any, cls: type | tuple[type, ...], where: str) -> None:
    """``TypeError`` unless ``config`` is a ``cls`` (or one of a tuple of classes; ``where``:
    the builder's name)."""
    if not isinstance(config, cls):
        names = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise TypeError(
            f"{where}: config must be an instance of {names}, got {type(config).__name__}"
        )


def _why_not_traced(config: Any, key: Any) -> str:
    cls = type(config).__name__
    fields = {f.name for f in dataclasses.fields(config)}
    if key not in fields:
        return f"not a {cls} field"
    if getattr(config, key) is None:
        return (
            f"{cls}.{key} is None (off): the config fixes whether it is set; give it a number "
            "there to sweep it"
        )
    return "not a float coefficient of the step (a count, size or switch: one step per value)"


def check_hyperparams(
    config: Any,
    hyperparams: Mapping[str, Any] | None,
    allowed: Sequence[str],
    *,
    where: str,
    reasons: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate the ``hyperparams`` of a step built from ``config`` and return them as a dict
    (``{}`` for ``None``).

    Raises ``TypeError`` unless ``hyperparams`` is ``None`` or a mapping, and ``ValueError``
    for a key outside ``allowed`` (naming each such key and why, from ``reasons`` where it has
    the key, else from the config: not a field, a ``None`` field, not a coefficient) or a
    ``None`` value. ``where`` starts the messages (the builder's name)."""
    if hyperparams is None:
        return {}
    if not isinstance(hyperparams, Mapping):
        example = f"{{{allowed[0]!r}: 0.2}}" if allowed else "{}"
        raise TypeError(
            f"{where}: hyperparams must be a dict of coefficients, e.g. {example}; got "
            f"{type(hyperparams).__name__}"
        )
    unknown = sorted(set(hyperparams) - set(allowed), key=str)
    if unknown:
        reasons = reasons or {}
        why = "; ".join(f"{k}: {reasons.get(k) or _why_not_traced(config, k)}" for k in unknown)
        raise ValueError(
            f"{where}: hyperparams has {unknown}, which this {type(config).__name__} does not "
            f"trace ({why}); valid keys: {list(allowed)}"
        )
    nones = sorted((k for k, v in hyperparams.items() if v is None), key=str)
    if nones:
        raise ValueError(
            f"{where}: hyperparams sets {nones} to None; whether a coefficient is set is fixed "
            "by the config (None turns its term off in the compiled program): pass numbers"
        )
    return dict(hyperparams)


def traced_config(
    config: Any,
    hyperparams: Mapping[str, Any] | None,
    *,
    where: str,
    allowed: Sequence[str] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> Any:
    """``dataclasses.replace(config, **hyperparams)`` after :func:`check_hyperparams` (the
    allowed keys default to ``config.traced_coefficients()``); ``config`` itself without
    overrides, so a step called without ``hyperparams`` compiles the config's constants."""
    allowed = config.traced_coefficients() if allowed is None else allowed
    given = check_hyperparams(config, hyperparams, allowed, where=where, reasons=reasons)
    return dataclasses.replace(config, **given) if given else config


def fields_of(config: Any, *names: str) -> dict[str, Any]:
    """``{name: config.<name>}``: config fields passed on as keyword arguments."""
    return {name: getattr(config, name) for name in names}


# ---------------------------------------------------------------------------------------------
# One optax step on an objective (SFT, reward, DPO, KTO)
# ---------------------------------------------------------------------------------------------


class OptaxState(NamedTuple):
    """The train state of a model moved by one optax step per batch (a pytree): ``params``
    (``nnx.split(model)[1]``), ``opt_state``, an int32 ``step`` and an int32
    ``nonfinite_updates`` (updates skipped as non-finite, :func:`rljax.finite.step_if_finite`).
    :class:`rljax.updates.SFTState` and :class:`rljax.updates.RewardState` are its named
    subclasses."""

    params: Any
    opt_state: Any
    step: jax.Array
    nonfinite_updates: Any = np.int32(0)


def init_optax_state(cls: type[OptaxState], params, optimizer) -> OptaxState:
    """The initial ``cls`` (an :class:`OptaxState`): ``optimizer.init`` of the trained
    parameters (:func:`rljax.models.lora.trainable`: the adapters of a LoRA model, else all),
    step 0."""
    step, skipped = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers: donated
    return cls(params, optimizer.init(lora.trainable(params)), step, skipped)


def reference_params(state: Any) -> Any:
    """The reference policy of a step with ``reference="model"``: ``state.ref_params``, or,
    when that is ``None`` and ``state.params`` are LoRA parameters, the same base weights with
    the adapters switched off (:func:`rljax.models.lora.disabled`; no second model in
    memory). ``None`` otherwise."""
    if state.ref_params is None and lora.has_lora(state.params):
        return lora.disabled(state.params)
    return state.ref_params


def _no_context(state: Any, batch: Any, *args, **kwargs) -> None:
    if args or kwargs:
        raise TypeError("this update takes (state, batch) only: it traces no hyperparams")
    return None


def make_optax_update(
    objective: Callable, optimizer, prepare: Callable = _no_context
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """The step ``update(state, batch, *args, **kwargs) -> (state, metrics)`` of one guarded
    optax step on ``objective``.

    ``context = prepare(state, batch, *args, **kwargs)`` is what the objective reads besides the
    parameters and the batch (reference log-probs, coefficient overrides; by default nothing
    and no ``args``); then the gradient of ``objective(params, context, batch) -> (loss,
    metrics)`` (``metrics["loss"]`` the loss) at ``state.params`` and
    :func:`rljax.finite.guarded_step`. ``state`` is a NamedTuple with ``params``,
    ``opt_state``, ``step`` and ``nonfinite_updates`` (other fields are kept); the metrics
    gain ``grad_norm``, ``nonfinite`` and ``nonfinite_updates``. With LoRA parameters
    (:func:`rljax.models.lora.split`) the gradient, the optimizer step and the guard cover the
    adapters only (:func:`rljax.models.lora.trainable`); the frozen base passes through."""

    def update(state, batch, *args, **kwargs):
        context = prepare(state, batch, *args, **kwargs)
        train = lora.trainable(state.params)
        # Adapter dropout (if any) is drawn afresh each step; off in every other pass.
        dropout = lora.has_dropout(state.params)
        key = jax.random.fold_in(jax.random.key(0), state.step) if dropout else None

        def trained_objective(train, context, batch):
            return objective(lora.combine(train, state.params, key), context, batch)

        grads, metrics = jax.grad(trained_objective, has_aux=True)(train, context, batch)
        train, opt_state, count, guard_metrics = guarded_step(
            optimizer, grads, state._replace(params=train), metrics["loss"]
        )
        metrics.update(guard_metrics)
        new_state = state._replace(
            params=lora.combine(train, state.params),
            opt_state=opt_state,
            step=state.step + 1,
            nonfinite_updates=count,
        )
        return new_state, metrics

    return update


def make_objective_eval(
    objective: Callable, prepare: Callable = _no_context
) -> Callable[..., dict[str, jax.Array]]:
    """``evaluate(state, batch, *args, **kwargs) -> metrics``: the metrics of ``objective`` (as for
    :func:`make_optax_update`) at ``state.params``, without an update."""

    def evaluate(state, batch, *args, **kwargs):
        return objective(state.params, prepare(state, batch, *args, **kwargs), batch)[1]

    return evaluate


# ---------------------------------------------------------------------------------------------
# Batch checks
# ---------------------------------------------------------------------------------------------


def require_keys(batch: Mapping[str, Any], keys: Iterable[str], name: str, hint: str = "") -> None:
    """``KeyError`` ``"<name> batch is missing [...]; it has [...] (<hint>)"`` unless ``batch``
    has every key of ``keys``."""
    missing = [k for k in keys if k not in batch]
    if missing:
        note = f" ({hint})" if hint else ""
        raise KeyError(f"{name} batch is missing {missing}; it has {sorted(batch)}{note}")


def check_router_aux_loss_coef(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite real number >= 0 (the weight of a
    mixture-of-experts model's load-balancing loss), else ``ValueError`` naming ``name`` (the
    field or argument)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    return float(value)
