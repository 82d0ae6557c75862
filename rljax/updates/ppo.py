"""The PPO update (Schulman et al., 2017): the train state of the policy-gradient family, the
minibatch/epoch loop that PPO, TRPO's critic fit and the RL updates on language models share,
and :func:`make_ppo_update` over pure ``policy_fn``/``value_fn``. The loss is
:func:`rljax.ppo.ppo_loss`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rljax import checks
from rljax.advantages import whiten
from rljax.distributions import entropy as distribution_entropy
from rljax.distributions import log_prob
from rljax.finite import all_finite, count_nonfinite, step_if_finite
from rljax.models import lora
from rljax.ppo import (
    _check_clip,
    ppo_loss,
)
from rljax.updates.common import (
    check_config,
    fields_of,
    float_coefficients,
    require_keys,
    traced_config,
)

__all__ = [
    "PPOConfig",
    "PPOState",
    "epochs_step",
    "init_ppo_state",
    "make_ppo_update",
    "minibatch_epochs",
]


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Settings of :func:`make_ppo_update` (and of :func:`rljax.updates.make_rlhf_ppo_update`).

    The float coefficients (``clip_eps``, ``value_coef``, ``entropy_coef`` and, where set,
    ``clip_eps_high``, ``dual_clip``, ``value_clip_eps``, ``target_kl``:
    :meth:`traced_coefficients`) are compiled in as constants by a step called without
    ``hyperparams``; pass ``hyperparams`` to the step to trace them instead, so a sweep
    compiles once. The counts and switches are static.

    Attributes:
      clip_eps: clip range of the probability ratio.
      clip_eps_high: upper clip range (DAPO clip-higher); ``None`` = ``clip_eps``.
      dual_clip: dual-clip bound ``c > 1`` for negative advantages; ``None`` = off.
      value_clip_eps: clip range of the value update; ``None`` = plain squared error.
      value_coef: weight of the value loss.
      entropy_coef: weight of the entropy bonus.
      num_epochs: passes over the batch.
      num_minibatches: minibatches per pass (the batch's rows must divide evenly).
      normalize_advantages: whiten advantages per minibatch over valid positions.
      target_kl: stop the remaining minibatch steps of this update once a minibatch's
        approximate KL (k3, measured before its step) exceeds this; ``None`` = never.
    """

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip_eps: float | None = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    num_epochs: int = 4
    num_minibatches: int = 4
    normalize_advantages: bool = True
    target_kl: float | None = None

    def __post_init__(self):
        checks.check(
            self,
            {
                "clip_eps": ">= 0",
                "clip_eps_high": ">= 0",
                "value_clip_eps": ">= 0",
                "value_coef": ">= 0",
                "entropy_coef": ">= 0",
                "num_epochs": ">= 1",
                "num_minibatches": ">= 1",
                "target_kl": "> 0",
            },
            library=True,
        )
        _check_clip(self.clip_eps, self.clip_eps_high, self.dual_clip)  # dual_clip > 1

    def traced_coefficients(self) -> tuple[str, ...]:
        """The keys the step's ``hyperparams`` may hold: the float coefficients, the optional
        ones only where this config sets them (``None`` is off: no input in the program)."""
        return float_coefficients(self)


class PPOState(NamedTuple):
    """The train state of the policy-gradient family (a pytree), one layout for every update:
    PPO (:func:`make_ppo_update`, :func:`rljax.updates.make_rlhf_ppo_update`), TRPO
    (:func:`rljax.updates.make_trpo_update`) and the GRPO family. ``params`` is
    ``{"policy": ...}`` plus ``"value"`` with a critic; ``opt_state`` is the optax state of
    what the optimizer moves (PPO: both networks; TRPO: the critic, the policy moving by the
    natural step); ``key`` shuffles minibatches; ``nonfinite_updates`` counts the updates
    that skipped a non-finite step."""

    params: Any
    opt_state: Any
    key: jax.Array
    step: jax.Array
    nonfinite_updates: Any = np.int32(0)


def init_ppo_state(policy_params, value_params, optimizer, key: jax.Array) -> PPOState:
    """Initial :class:`PPOState`; one optax ``optimizer`` for both networks."""
    params = {"policy": policy_params, "value": value_params}
    step, skipped = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers: donated
    return PPOState(params, optimizer.init(lora.trainable(params)), key, step, skipped)


def minibatch_epochs(
    loss_fn: Callable,
    optimizer,
    params,
    opt_state,
    key: jax.Array,
    batch: dict,
    *,
    num_epochs: int,
    num_minibatches: int,
    target_kl: float | None = None,
    kl_metric: str = "policy/approxkl_k3",
):
    """``num_epochs`` passes of shuffled minibatch optax steps on ``loss_fn`` (the loop of PPO's
    Algorithm 1, shared by :func:`make_ppo_update` and :mod:`rljax.rlhf`).

    Args:
      loss_fn: ``loss_fn(params, minibatch) -> (loss, metrics)``.
      optimizer: optax ``GradientTransformation`` over ``params``.
      params, opt_state: where to start.
      key: PRNG key; the shuffles use a split of it.
      batch: pytree of arrays with the rows on the leading axis (divisible by
        ``num_minibatches``).
      target_kl: skip the remaining steps once a minibatch's ``metrics[kl_metric]`` (measured
        before its step) exceeds this (or is NaN); ``None`` = never.

    Each step is applied only if it is finite (:func:`rljax.finite.step_if_finite`: the loss,
    the gradients, the new parameters and optimizer state); a non-finite one leaves both
    unchanged.

    LoRA parameters (:func:`rljax.models.lora.split`, anywhere in ``params``): the gradient,
    the optimizer (``opt_state`` is ``optimizer.init(lora.trainable(params))``) and the guard
    see only the adapters; the frozen base is passed through.

    Returns:
      ``(params, opt_state, key, metrics)``: metrics are means over the steps taken (a skipped
      non-finite step included, so its NaN shows), plus ``updates`` (steps applied),
      ``early_stopped`` and ``nonfinite`` (1.0 if any step was skipped as non-finite).
    """
    num_rows = jax.tree.leaves(batch)[0].shape[0]
    if num_rows % num_minibatches:
        raise ValueError(
            f"batch of {num_rows} rows does not split into num_minibatches="
            f"{num_minibatches} equal minibatches"
        )
    rows = num_rows // num_minibatches
    full_params = params
    # Adapter dropout (LoRA models applied with dropout): a key per minibatch step, drawn
    # beside the shuffles' stream (which it leaves as it is).
    dropout_key = jax.random.fold_in(key, 0x10CA) if lora.has_dropout(params) else None

    def trained_loss(train, minibatch, step_index):
        step_key = None if dropout_key is None else jax.random.fold_in(dropout_key, step_index)
        return loss_fn(lora.combine(train, full_params, step_key), minibatch)

    def minibatch_step(carry, xs):
        params, opt_state, stopped = carry
        minibatch, step_index = xs
        (loss, metrics), grads = jax.value_and_grad(trained_loss, has_aux=True)(
            params, minibatch, step_index
        )
        if target_kl is not None:
            # A NaN KL estimate stops as well: nothing about that step can be trusted.
            stopped = stopped | ~(metrics[kl_metric] <= target_kl)

        def step(_):
            return step_if_finite(optimizer, grads, opt_state, params, loss)

        if target_kl is None:
            params, opt_state, finite = step(None)
        else:
            params, opt_state, finite = jax.lax.cond(
                stopped, lambda _: (params, opt_state, all_finite(loss, grads)), step, None
            )
        return (params, opt_state, stopped), (metrics, ~stopped, finite)

    def epoch(carry, xs):
        order, epoch_index = xs
        minibatches = jax.tree.map(
            lambda x: x[order].reshape(num_minibatches, rows, *x.shape[1:]), batch
        )
        step_indices = epoch_index * num_minibatches + jnp.arange(num_minibatches)
        return jax.lax.scan(minibatch_step, carry, (minibatches, step_indices))

    key, epochs_key = jax.random.split(key)
    # Every epoch's shuffle at once (one batched sort rather than one per epoch).
    orders = jax.vmap(lambda k: jax.random.permutation(k, num_rows))(
        jax.random.split(epochs_key, num_epochs)
    )
    (params, opt_state, stopped), (metrics, taken, finite) = jax.lax.scan(
        epoch,
        (lora.trainable(params), opt_state, jnp.bool_(False)),
        (orders, jnp.arange(num_epochs)),
    )
    params = lora.combine(params, full_params)
    return params, opt_state, key, _steps_metrics(metrics, taken, finite, stopped)


def _steps_metrics(metrics: dict, taken, finite, stopped) -> dict:
    """:func:`minibatch_epochs`' metrics: each step's metrics averaged over the steps taken,
    plus ``updates`` (steps applied), ``early_stopped`` and ``nonfinite``."""
    # where() rather than a product, so that a metric that overflowed at the step which
    # triggered the stop cannot turn the mean into NaN.
    count = jnp.maximum(jnp.sum(taken, dtype=jnp.float32), 1.0)
    metrics = {k: jnp.sum(jnp.where(taken, v, 0)) / count for k, v in metrics.items()}
    metrics["updates"] = jnp.sum(taken & finite, dtype=jnp.float32)
    metrics["early_stopped"] = stopped
    metrics["nonfinite"] = jnp.any(~finite).astype(jnp.float32)
    return metrics


def epochs_step(
    loss_fn: Callable,
    optimizer,
    state: PPOState,
    batch: dict,
    *,
    num_epochs: int,
    num_minibatches: int,
    target_kl: float | None = None,
) -> tuple[PPOState, dict]:
    """One update of a :class:`PPOState`: :func:`minibatch_epochs` from the state's params,
    optimizer state and key, then the step and the running count of non-finite updates
    advanced (:func:`rljax.finite.count_nonfinite`). Shared by :func:`make_ppo_update`,
    :func:`rljax.rlhf.make_rlhf_ppo_update` and :func:`rljax.grpo.make_grpo_update`.

    Returns ``(new_state, metrics)``: :func:`minibatch_epochs`' metrics with ``nonfinite``
    (1.0 if a minibatch step was skipped) and ``nonfinite_updates`` (the new count)."""
    params, opt_state, key, metrics = minibatch_epochs(
        loss_fn,
        optimizer,
        state.params,
        state.opt_state,
        state.key,
        batch,
        num_epochs=num_epochs,
        num_minibatches=num_minibatches,
        target_kl=target_kl,
    )
    count, guard_metrics = count_nonfinite(state.nonfinite_updates, metrics["nonfinite"] == 0)
    new_state = PPOState(params, opt_state, key, state.step + 1, count)
    return new_state, {**metrics, **guard_metrics}


def loop_settings(config) -> dict[str, Any]:
    """The settings of :func:`epochs_step` in a config: ``num_epochs``, ``num_minibatches`` and
    ``target_kl`` (``None`` for a config without one, e.g. :class:`rljax.updates.GRPOConfig`)."""
    return {
        "num_epochs": config.num_epochs,
        "num_minibatches": config.num_minibatches,
        "target_kl": getattr(config, "target_kl", None),
    }


def config_ppo_loss(
    config: PPOConfig, logps, entropy, values, minibatch: dict, mask, *, critic: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`rljax.ppo.ppo_loss` of a minibatch with the coefficients of ``config``: the loss
    of :func:`make_ppo_update` and :func:`rljax.updates.make_rlhf_ppo_update`.

    ``minibatch`` holds ``old_logps``, ``advantages`` (whitened over ``mask`` when
    ``config.normalize_advantages``) and, with ``critic``, ``returns`` and ``old_values``;
    without a critic the value terms are zeros with weight 0 (``values`` is not read)."""
    advantages = minibatch["advantages"]
    if config.normalize_advantages:
        advantages = whiten(advantages, mask)
    if critic:
        value_terms = (values, minibatch["old_values"], minibatch["returns"])
        value_coef = config.value_coef
    else:
        value_terms = (jnp.zeros_like(logps),) * 3
        value_coef = 0.0
    return ppo_loss(
        logps,
        minibatch["old_logps"],
        advantages,
        *value_terms,
        entropy,
        mask,
        value_coef=value_coef,
        **fields_of(
            config, "clip_eps", "clip_eps_high", "dual_clip", "value_clip_eps", "entropy_coef"
        ),
    )


_PPO_BATCH_KEYS = ("inputs", "actions", "old_logps", "advantages", "returns", "old_values")


def make_ppo_update(
    policy_fn: Callable,
    value_fn: Callable,
    optimizer,
    config: PPOConfig = PPOConfig(),
) -> Callable[..., tuple[PPOState, dict[str, jax.Array]]]:
    """Build the pure PPO step ``update(state, batch, hyperparams=None) -> (state, metrics)``.

    ``num_epochs`` passes over the batch in ``num_minibatches`` shuffled minibatches, each an
    optax step on :func:`ppo_loss` (Schulman et al., 2017, Algorithm 1). Gradient clipping and
    learning-rate schedules belong to ``optimizer`` (e.g. ``optax.chain(
    optax.clip_by_global_norm(0.5), optax.adam(optax.linear_schedule(...)))``).

    Args:
      policy_fn: ``policy_fn(policy_params, inputs) -> outputs`` (logits or ``(mean, log_std)``).
      value_fn: ``value_fn(value_params, inputs) -> values`` shaped like ``advantages``.
      optimizer: optax ``GradientTransformation`` over ``{"policy": ..., "value": ...}``.
      config: :class:`PPOConfig`.

    The ``batch`` is a dict of arrays with the batch of rows on the leading axis: ``inputs``
    (array or pytree), ``actions``, ``old_logps``, ``advantages``, ``returns``, ``old_values``
    (all shaped like the log-probs, ``[rows]`` or ``[rows, time]``), optional ``mask`` and
    ``value_inputs`` (default ``inputs``).

    ``hyperparams``: ``None`` (the config's coefficients, compiled in) or a dict with any of
    ``config.traced_coefficients()`` (``clip_eps``, ``value_coef``, ``entropy_coef``, and
    ``clip_eps_high``, ``dual_clip``, ``value_clip_eps``, ``target_kl`` where the config sets
    them), traced under jit: ``step(state, batch, {"clip_eps": c})`` for a sweep of ``c``
    compiles once (keep the keys and the Python/array types fixed) and equals the step built
    with ``dataclasses.replace(config, clip_eps=c)``. Another key, or a ``None`` value (the
    config fixes which optional terms exist), raises ``ValueError`` naming it.

    Metrics are means over the minibatch steps taken: those of :func:`ppo_loss`, plus
    ``updates`` (steps applied), ``early_stopped`` (target KL reached), ``nonfinite`` (1.0 if
    a minibatch step was skipped because its loss, gradients or result had a NaN or inf; its
    parameters and optimizer state stay unchanged) and ``nonfinite_updates`` (the running
    count of such updates, also ``state.nonfinite_updates``).
    """
    check_config(config, PPOConfig, "make_ppo_update")

    def loss_fn(config: PPOConfig, params, minibatch):
        outputs = policy_fn(params["policy"], minibatch["inputs"])
        logps = log_prob(outputs, minibatch["actions"])
        values = value_fn(params["value"], minibatch.get("value_inputs", minibatch["inputs"]))
        entropy = distribution_entropy(outputs)
        return config_ppo_loss(config, logps, entropy, values, minibatch, minibatch.get("mask"))

    def update(
        state: PPOState, batch: dict, hyperparams: Mapping[str, Any] | None = None
    ) -> tuple[PPOState, dict[str, jax.Array]]:
        require_keys(batch, _PPO_BATCH_KEYS, "PPO")
        traced = traced_config(config, hyperparams, where="make_ppo_update")
        loss = functools.partial(loss_fn, traced)
        return epochs_step(loss, optimizer, state, batch, **loop_settings(traced))

    return update
