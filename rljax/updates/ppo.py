"""The PPO update (Schulman et al., 2017): the train state of the policy-gradient family, the
minibatch/epoch loop that PPO, TRPO's critic fit and the RL updates on language models share,
and :func:`make_ppo_update` over pure ``policy_fn``/``value_fn``. The loss is
:func:`rljax.ppo.ppo_loss`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rljax import checks
from rljax.advantages import whiten
from rljax.distributions import entropy as distribution_entropy
from rljax.distributions import log_prob
from rljax.finite import all_finite, count_nonfinite, step_if_finite
from rljax.ppo import (
    _check_clip,
    ppo_loss,
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
    """Static settings of :func:`make_ppo_update`.

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
    return PPOState(params, optimizer.init(params), key, step, skipped)


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

    def minibatch_step(carry, minibatch):
        params, opt_state, stopped = carry
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, minibatch)
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

    def epoch(carry, order):
        minibatches = jax.tree.map(
            lambda x: x[order].reshape(num_minibatches, rows, *x.shape[1:]), batch
        )
        return jax.lax.scan(minibatch_step, carry, minibatches)

    key, epochs_key = jax.random.split(key)
    # Every epoch's shuffle at once (one batched sort rather than one per epoch).
    orders = jax.vmap(lambda k: jax.random.permutation(k, num_rows))(
        jax.random.split(epochs_key, num_epochs)
    )
    (params, opt_state, stopped), (metrics, taken, finite) = jax.lax.scan(
        epoch, (params, opt_state, jnp.bool_(False)), orders
    )
    # Average over the steps taken only; where() rather than a product, so that a metric
    # that overflowed at the step which triggered the stop cannot turn the mean into NaN.
    count = jnp.maximum(jnp.sum(taken, dtype=jnp.float32), 1.0)
    metrics = {k: jnp.sum(jnp.where(taken, v, 0)) / count for k, v in metrics.items()}
    metrics["updates"] = jnp.sum(taken & finite, dtype=jnp.float32)
    metrics["early_stopped"] = stopped
    metrics["nonfinite"] = jnp.any(~finite).astype(jnp.float32)
    return params, opt_state, key, metrics


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


def make_ppo_update(
    policy_fn: Callable,
    value_fn: Callable,
    optimizer,
    config: PPOConfig = PPOConfig(),
) -> Callable[[PPOState, dict], tuple[PPOState, dict[str, jax.Array]]]:
    """Build the pure PPO step ``update(state, batch) -> (state, metrics)``.

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

    Metrics are means over the minibatch steps taken: those of :func:`ppo_loss`, plus
    ``updates`` (steps applied), ``early_stopped`` (target KL reached), ``nonfinite`` (1.0 if
    a minibatch step was skipped because its loss, gradients or result had a NaN or inf; its
    parameters and optimizer state stay unchanged) and ``nonfinite_updates`` (the running
    count of such updates, also ``state.nonfinite_updates``).
    """
    if not isinstance(config, PPOConfig):
        raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
    required = ("inputs", "actions", "old_logps", "advantages", "returns", "old_values")

    def loss_fn(params, minibatch):
        outputs = policy_fn(params["policy"], minibatch["inputs"])
        logps = log_prob(outputs, minibatch["actions"])
        values = value_fn(params["value"], minibatch.get("value_inputs", minibatch["inputs"]))
        mask = minibatch.get("mask")
        advantages = minibatch["advantages"]
        if config.normalize_advantages:
            advantages = whiten(advantages, mask)
        return ppo_loss(
            logps,
            minibatch["old_logps"],
            advantages,
            values,
            minibatch["old_values"],
            minibatch["returns"],
            distribution_entropy(outputs),
            mask,
            clip_eps=config.clip_eps,
            clip_eps_high=config.clip_eps_high,
            dual_clip=config.dual_clip,
            value_clip_eps=config.value_clip_eps,
            value_coef=config.value_coef,
            entropy_coef=config.entropy_coef,
        )

    def update(state: PPOState, batch: dict) -> tuple[PPOState, dict[str, jax.Array]]:
        missing = [k for k in required if k not in batch]
        if missing:
            raise KeyError(f"PPO batch is missing {missing}; it has {sorted(batch)}")
        return epochs_step(
            loss_fn,
            optimizer,
            state,
            batch,
            num_epochs=config.num_epochs,
            num_minibatches=config.num_minibatches,
            target_kl=config.target_kl,
        )

    return update
