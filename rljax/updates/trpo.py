"""The TRPO update (Schulman et al., 2015): :func:`make_trpo_update` over pure
``policy_fn``/``value_fn``, built from the objectives in :mod:`rljax.trpo` (Fisher-vector
products, conjugate gradient, KL line search).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp

from rljax import checks
from rljax.advantages import explained_variance
from rljax.finite import all_finite, count_nonfinite, select
from rljax.logprobs import masked_mean
from rljax.models import lora
from rljax.trpo import (
    FVP_METHODS,
    kl_line_search,
    make_fisher_vector_product,
    natural_step,
    tree_vdot,
    trpo_objectives,
)
from rljax.updates.common import check_config, float_coefficients, require_keys, traced_config
from rljax.updates.ppo import PPOState, minibatch_epochs

__all__ = [
    "TRPOConfig",
    "init_trpo_state",
    "make_trpo_update",
]


# ---------------------------------------------------------------------------------------------
# The pure TRPO update step.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TRPOConfig:
    """Settings of :func:`make_trpo_update` (defaults follow sb3-contrib's TRPO).

    The float coefficients ``max_kl``, ``cg_damping``, ``cg_tol`` and ``backtrack_coeff``
    (:meth:`traced_coefficients`) are compiled in as constants by a step called without
    ``hyperparams``; pass ``hyperparams`` to the step to trace them instead, so a sweep
    compiles once. The counts (``cg_iters``, ``max_backtracks``, ``fvp_subsample``, the critic
    passes and minibatches) and switches are static.

    Attributes:
      max_kl: trust-region radius :math:`\\delta` on the mean KL (sb3-contrib ``target_kl``).
      cg_iters: conjugate-gradient iterations (``cg_max_steps``).
      cg_damping: :math:`\\lambda` in :math:`(F + \\lambda I) s = g`.
      cg_tol: stop CG once the squared residual norm is below this.
      backtrack_coeff: line-search shrink factor per step (``line_search_shrinking_factor``).
      max_backtracks: candidates tried by the line search (``line_search_max_iter``).
      fvp_method: ``"gauss_newton"`` or ``"hessian"`` (see :func:`fisher_vector_product`).
      fvp_subsample: use every ``k``-th batch row for the Fisher-vector products
        (``sub_sampling_factor``); the gradient and line search use the whole batch.
      normalize_advantages: whiten advantages over valid positions before the policy step.
      n_critic_updates: passes over the batch fitting the value function.
      critic_minibatches: minibatches per pass (the batch's rows must divide evenly).
      flat_params: run conjugate gradient and the line search on one flat vector
        (``ravel_pytree``) instead of the parameter pytree: the same arithmetic in far fewer
        XLA kernels, so small networks compile faster. Leave it off for sharded models (the
        flat vector would gather every parameter onto each device).
    """

    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 0.1
    cg_tol: float = 1e-10
    backtrack_coeff: float = 0.8
    max_backtracks: int = 10
    fvp_method: str = "gauss_newton"
    fvp_subsample: int = 1
    normalize_advantages: bool = True
    n_critic_updates: int = 10
    critic_minibatches: int = 1
    flat_params: bool = False

    def __post_init__(self):
        if self.fvp_method not in FVP_METHODS:
            raise ValueError(
                f"fvp_method {self.fvp_method!r} unknown; valid choices: {list(FVP_METHODS)}"
            )
        checks.check(
            self,
            {
                "max_kl": "> 0",
                "cg_iters": ">= 1",
                "cg_damping": ">= 0",
                "cg_tol": ">= 0",
                "backtrack_coeff": "in (0, 1)",
                "max_backtracks": ">= 1",
                "fvp_subsample": ">= 1",
                "n_critic_updates": ">= 0",
                "critic_minibatches": ">= 1",
            },
            library=True,
        )

    def traced_coefficients(self) -> tuple[str, ...]:
        """The keys the step's ``hyperparams`` may hold (see :func:`make_trpo_update`)."""
        return float_coefficients(self)


def init_trpo_state(policy_params, value_params, value_optimizer, key: jax.Array) -> PPOState:
    """Initial state of :func:`make_trpo_update`: the policy-gradient family's
    :class:`rljax.updates.PPOState` with ``params = {"policy", "value"}`` and ``opt_state`` the
    value optimizer's (the policy moves by the natural step, not by an optimizer); ``key``
    shuffles the value-function minibatches."""
    params = {"policy": policy_params, "value": value_params}
    step, skipped = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers: donated
    return PPOState(params, value_optimizer.init(lora.trainable(value_params)), key, step, skipped)


def _rows(tree, index):
    return jax.tree.map(lambda x: x[index], tree)


def make_trpo_update(
    policy_fn: Callable,
    value_fn: Callable,
    value_optimizer,
    config: TRPOConfig = TRPOConfig(),
) -> Callable[..., tuple[PPOState, dict[str, jax.Array]]]:
    """Build the pure TRPO step ``update(state, batch, hyperparams=None) -> (state, metrics)``.

    One call is one iteration of Schulman et al. (2015), "practical algorithm" (Sec. 6): the
    surrogate gradient :math:`g`, the natural direction :math:`s \\approx F^{-1} g` by conjugate
    gradient on Fisher-vector products, the full step :math:`\\sqrt{2\\delta / s^\\top F s}\\,s`,
    a KL-constrained backtracking line search, then ``n_critic_updates`` passes of optax steps
    on the squared error of the value function (as sb3-contrib does).

    Args:
      policy_fn: ``policy_fn(policy_params, inputs) -> outputs`` (logits or ``(mean, log_std)``).
      value_fn: ``value_fn(value_params, value_inputs) -> values`` shaped like ``returns``.
      value_optimizer: an optax ``GradientTransformation`` for the value parameters.
      config: :class:`TRPOConfig`.

    The ``batch`` is a dict of arrays whose leading axis is the batch of rows:

    * ``inputs``: what ``policy_fn`` takes (array or pytree);
    * ``actions``: ``[batch, ...]`` taken actions (token ids or continuous actions);
    * ``advantages``, ``returns``: shaped like the log-probs (``[batch]`` or ``[batch, time]``);
    * optional ``mask`` (same shape, 1 = valid), ``old_logps`` (behaviour-policy log-probs;
      default: computed at the current parameters, which is exact for on-policy data) and
      ``value_inputs`` (default ``inputs``).

    Metrics: ``surrogate_before``, ``surrogate_after``, ``improvement``, ``kl``,
    ``step_fraction``, ``line_search_steps``, ``accepted``, ``cg_iterations``,
    ``cg_residual``, ``step_size``, ``grad_norm``, ``value_loss``, ``explained_variance``
    (of the value predictions before the update), ``nonfinite`` (1.0 if this update had a NaN
    or inf: in the surrogate, its gradient or the new policy, which then stays unchanged, or
    in a critic minibatch step, which is skipped), ``nonfinite_policy``, ``nonfinite_critic``
    (which of the two) and ``nonfinite_updates`` (the running count, also
    ``state.nonfinite_updates``). A non-finite critic makes the advantages of the next
    rollouts non-finite, so each later policy step is reported too, not silently rejected.

    ``hyperparams``: ``None`` (the config's coefficients, compiled in) or a dict with any of
    ``config.traced_coefficients()`` (``max_kl``, ``cg_damping``, ``cg_tol``,
    ``backtrack_coeff``), traced under jit: a sweep compiles once and each call equals the
    step built with ``dataclasses.replace(config, **hyperparams)``. Another key (a count such
    as ``cg_iters``, a switch) or a ``None`` value raises ``ValueError`` naming it.
    """
    check_config(config, TRPOConfig, "make_trpo_update")
    return _trpo_update(policy_fn, value_fn, value_optimizer, config, where="make_trpo_update")


def _trpo_update(policy_fn, value_fn, value_optimizer, config: TRPOConfig, *, where: str):
    """The step of :func:`make_trpo_update` (``where``: the builder its errors name)."""

    def update(
        state: PPOState, batch: dict, hyperparams: Mapping[str, Any] | None = None
    ) -> tuple[PPOState, dict[str, jax.Array]]:
        require_keys(batch, ("returns",), "TRPO")
        traced = traced_config(config, hyperparams, where=where)
        new_policy, policy_finite, policy_metrics = _policy_step(
            policy_fn, traced, state.params["policy"], batch
        )
        value_params, value_opt_state, key, value_metrics = _fit_critic(
            value_fn, value_optimizer, traced, state.params["value"], state.opt_state,
            state.key, batch,
        )  # fmt: skip
        critic_finite = value_metrics.pop("finite")
        count, guard_metrics = count_nonfinite(
            state.nonfinite_updates, policy_finite & critic_finite
        )
        params = {"policy": new_policy, "value": value_params}
        new_state = PPOState(params, value_opt_state, key, state.step + 1, count)
        metrics = {
            **policy_metrics,
            **value_metrics,
            **guard_metrics,
            "nonfinite_policy": jnp.logical_not(policy_finite).astype(jnp.float32),
            "nonfinite_critic": jnp.logical_not(critic_finite).astype(jnp.float32),
        }
        return new_state, metrics

    return update


def _policy_step(policy_fn: Callable, config: TRPOConfig, params, batch: dict):
    """The natural-gradient step of the policy: ``(new_params, finite, metrics)``.

    The surrogate's gradient, the natural direction by conjugate gradient on Fisher-vector
    products (every ``fvp_subsample``-th row), the full step to the trust region and the KL
    line search; with ``flat_params`` on one raveled vector. A step with a non-finite
    surrogate, gradient or result is not taken (``finite`` False, ``params`` returned). With
    LoRA parameters the natural step moves the adapters only (the Fisher is the adapters')."""
    if lora.has_lora(params):
        if lora.has_dropout(params):
            raise ValueError(
                "TRPO's natural step needs a deterministic policy (the Fisher, the line "
                "search): LoRA dropout is not supported with TRPO; apply the adapters with "
                "dropout=0 (--lora-dropout 0)"
            )
        full = params
        new_train, finite, metrics = _policy_step(
            lambda train, inputs: policy_fn(lora.combine(train, full), inputs),
            config,
            lora.trainable(params),
            batch,
        )
        return lora.combine(new_train, full), finite, metrics
    surrogate_fn, surrogate_and_kl = trpo_objectives(
        policy_fn, params, batch, config.normalize_advantages
    )
    surrogate_before, grad = jax.value_and_grad(surrogate_fn)(params)
    mask = batch.get("mask")
    rows = slice(None, None, config.fvp_subsample)
    fvp = make_fisher_vector_product(
        policy_fn,
        params,
        _rows(batch["inputs"], rows),
        None if mask is None else mask[rows],
        config.fvp_method,
    )
    if config.flat_params:
        # One flat vector rather than every parameter array: far fewer XLA kernels.
        flat_params, unravel = jax.flatten_util.ravel_pytree(params)

        def ravel(tree):
            return jax.flatten_util.ravel_pytree(tree)[0]

        step_grad, step_fvp = ravel(grad), lambda v: ravel(fvp(unravel(v)))
        step_objective, start = (lambda p: surrogate_and_kl(unravel(p))), flat_params
    else:
        unravel = None
        step_grad, step_fvp, step_objective, start = grad, fvp, surrogate_and_kl, params
    full_step, step_info = natural_step(
        step_grad, step_fvp, config.max_kl, config.cg_iters, config.cg_damping, config.cg_tol
    )
    new_params, ls_info = kl_line_search(
        step_objective,
        start,
        full_step,
        surrogate_before,
        config.max_kl,
        config.backtrack_coeff,
        config.max_backtracks,
        check_direction=False,  # grad is the surrogate's own: the sign is right
    )
    if unravel is not None:
        new_params = unravel(new_params)
    finite = all_finite(surrogate_before, grad, new_params)
    metrics = {
        "surrogate_before": surrogate_before,
        "surrogate_after": ls_info.surrogate,
        "improvement": ls_info.surrogate - surrogate_before,
        "kl": ls_info.kl,
        "step_fraction": ls_info.step_fraction,
        "line_search_steps": ls_info.steps,
        "accepted": ls_info.accepted,
        "cg_iterations": step_info.cg_iterations,
        "cg_residual": step_info.cg_residual,
        "step_size": step_info.step_size,
        "grad_norm": jnp.sqrt(tree_vdot(grad, grad)),
    }
    return select(finite, new_params, params), finite, metrics


def _fit_critic(value_fn, value_optimizer, config: TRPOConfig, value_params, opt_state, key, batch):
    """``n_critic_updates`` passes of ``critic_minibatches`` optax steps on the squared error of
    the value function: the policy-gradient family's minibatch/epoch loop
    (:func:`rljax.updates.minibatch_epochs`), each non-finite step skipped. Returns
    ``(value_params, opt_state, key, metrics)`` with ``value_loss``, ``explained_variance``
    (of the predictions before the fit) and ``finite``."""
    value_inputs = batch.get("value_inputs", batch["inputs"])
    returns, mask = batch["returns"], batch.get("mask")
    num_rows = returns.shape[0]
    if num_rows % config.critic_minibatches:
        raise ValueError(
            f"batch of {num_rows} rows does not split into critic_minibatches="
            f"{config.critic_minibatches} equal minibatches"
        )
    data = {
        "x": value_inputs,
        "returns": returns,
        "mask": jnp.ones_like(returns) if mask is None else mask,
    }
    predictions = value_fn(value_params, value_inputs)
    chex.assert_equal_shape([predictions, returns])
    ev = explained_variance(predictions, returns, mask)

    def loss_fn(p, minibatch):
        values = value_fn(p, minibatch["x"])
        loss = masked_mean(jnp.square(values - minibatch["returns"]), minibatch["mask"])
        return loss, {"value_loss": loss}

    value_params, opt_state, key, metrics = minibatch_epochs(
        loss_fn,
        value_optimizer,
        value_params,
        opt_state,
        key,
        data,
        num_epochs=config.n_critic_updates,
        num_minibatches=config.critic_minibatches,
    )
    finite = metrics["nonfinite"] == 0
    return (
        value_params,
        opt_state,
        key,
        {
            "value_loss": metrics["value_loss"],
            "explained_variance": ev,
            "finite": finite,
        },
    )
