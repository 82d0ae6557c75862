"""Proximal Policy Optimization objectives (Schulman et al., 2017, arXiv:1707.06347).

Pure functions of arrays ``[batch, time]`` (or ``[batch]``) with an optional validity mask.
Each ``*_loss`` returns ``(loss, metrics)``: a scalar to *minimise* and a flat dict of scalar
arrays. Every loss reduces a per-element term with :func:`rljax.logprobs.masked_mean`; pass
``normalizer`` (e.g. the number of valid tokens in the whole global batch) to get a masked
*sum divided by that constant*, which adds up exactly over micro-batches and data-parallel
shards. ``metrics["count"]`` is the local number of valid positions.

Log-probs of the behaviour policy, advantages, returns and old values are data: gradients are
stopped through them.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rljax.logprobs import masked_mean, masked_sum_and_count

__all__ = [
    "clipped_surrogate_loss",
    "clipped_surrogate_per_token",
    "clipped_value_loss",
    "entropy_bonus",
    "ppo_loss",
]


def _check_clip(clip_eps, clip_eps_high, dual_clip):
    for name, value in (("clip_eps", clip_eps), ("clip_eps_high", clip_eps_high)):
        if isinstance(value, int | float) and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if isinstance(dual_clip, int | float) and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. use 3), got {dual_clip}")


def clipped_surrogate_per_token(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    clip_eps: float | jax.Array = 0.2,
    clip_eps_high: float | jax.Array | None = None,
    dual_clip: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Per-element negated PPO-clip objective (Schulman et al., 2017, Eq. 7).

    .. math::
        \rho = \exp(\log\pi - \log\pi_{old}), \qquad
        \ell = -\min\big(\rho A,\ \mathrm{clip}(\rho, 1 - \epsilon_{low}, 1 + \epsilon_{high}) A\big)

    ``clip_eps_high`` (default ``clip_eps``) gives the asymmetric "clip-higher" range of DAPO
    (Yu et al., 2025, arXiv:2503.14476). ``dual_clip = c > 1`` bounds the loss for negative
    advantages, :math:`\ell \leftarrow \min(\ell, -cA)` for :math:`A < 0` (Ye et al., 2020,
    arXiv:1912.09729, Eq. 5).

    Returns:
      ``(loss, ratio, clipped)``: per-element loss, probability ratio, and a float array that
      is 1 where the clipped term is active (its gradient is zero there).
    """
    chex.assert_equal_shape([logps, old_logps, advantages])
    _check_clip(clip_eps, clip_eps_high, dual_clip)
    old_logps = jax.lax.stop_gradient(old_logps)
    advantages = jax.lax.stop_gradient(advantages)
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    ratio = jnp.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped_term = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
    loss = jnp.maximum(unclipped, clipped_term)
    clipped = (clipped_term > unclipped).astype(loss.dtype)
    if dual_clip is not None:
        dual_bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (loss > dual_bound)
        loss = jnp.where(dual_active, dual_bound, loss)
        clipped = jnp.maximum(clipped, dual_active.astype(loss.dtype))
    return loss, ratio, clipped


def clipped_surrogate_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array | None = None,
    clip_eps: float | jax.Array = 0.2,
    clip_eps_high: float | jax.Array | None = None,
    dual_clip: float | jax.Array | None = None,
    normalizer: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate policy loss, masked mean of :func:`clipped_surrogate_per_token`.

    Args:
      logps: ``[batch, time]`` (or ``[batch]``) log-probs of the taken actions under the
        current policy (gradients flow through these).
      old_logps: same shape, under the behaviour policy that collected the data.
      advantages: same shape.
      mask: same shape, 1 at valid positions.
      clip_eps, clip_eps_high, dual_clip: see :func:`clipped_surrogate_per_token`.
      normalizer: divide the masked sum by this instead of the local valid count.

    Returns:
      ``(loss, metrics)`` with metrics (TRL names) ``policy/clipfrac`` (fraction of valid
      positions where clipping is active), ``policy/approxkl`` (``0.5 * mean(log_ratio**2)``),
      ``policy/approxkl_k3`` (``mean(ratio - 1 - log_ratio)``), ``policy/ratio`` (mean ratio),
      ``policy/ratio_max`` (0 when no position is valid), and ``count``.

    Example (the first ratio, 1.5, is clipped at 1.2 for its positive advantage)::

        >>> import jax.numpy as jnp
        >>> from rljax.ppo import clipped_surrogate_loss
        >>> loss, metrics = clipped_surrogate_loss(
        ...     jnp.log(jnp.array([0.6, 0.3])), jnp.log(jnp.array([0.4, 0.4])),
        ...     jnp.array([1.0, -1.0]),
        ... )
        >>> round(float(loss), 4), float(metrics["policy/clipfrac"])
        (-0.2, 1.0)
    """
    if mask is not None:
        # Padded positions may hold anything (e.g. -1e9 log-probs, inf advantages); neutralise
        # them, or 0 * inf would reach the gradient even though the mask hides the value.
        keep = mask.astype(bool)
        old_logps = jnp.where(keep, old_logps, jax.lax.stop_gradient(logps))
        advantages = jnp.where(keep, advantages, 0.0)
    per_token, ratio, clipped = clipped_surrogate_per_token(
        logps, old_logps, advantages, clip_eps, clip_eps_high, dual_clip
    )
    loss = masked_mean(per_token, mask, normalizer=normalizer)
    log_ratio = jax.lax.stop_gradient(logps - old_logps)
    ratio = jax.lax.stop_gradient(ratio)
    valid = jnp.ones_like(ratio, bool) if mask is None else mask.astype(bool)
    metrics = {
        "policy/clipfrac": masked_mean(clipped, mask),
        "policy/approxkl": masked_mean(0.5 * jnp.square(log_ratio), mask),
        "policy/approxkl_k3": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "policy/ratio": masked_mean(ratio, mask),
        "policy/ratio_max": jnp.where(
            jnp.any(valid), jnp.max(jnp.where(valid, ratio, -jnp.inf)), 0.0
        ),
        "count": masked_sum_and_count(ratio, mask)[1],
    }
    return loss, metrics


def clipped_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array | None = None,
    clip_eps: float | jax.Array | None = 0.2,
    normalizer: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Value loss with the PPO-style clipped update (as in OpenAI baselines' PPO2).

    .. math::
        V^{clip} = V_{old} + \mathrm{clip}(V - V_{old}, -\epsilon, \epsilon), \qquad
        \ell = \tfrac12 \max\big((V - R)^2, (V^{clip} - R)^2\big)

    ``clip_eps=None`` gives the plain squared error :math:`\tfrac12 (V - R)^2`.

    Returns:
      ``(loss, metrics)`` with ``val/clipfrac``, ``val/vpred`` (mean prediction),
      ``val/error`` (mean squared error ``(V - R)^2``) and ``count``.
    """
    chex.assert_equal_shape([values, old_values, returns])
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    if mask is not None:  # padded targets must not reach the gradient (see above)
        keep = mask.astype(bool)
        old_values = jnp.where(keep, old_values, 0.0)
        returns = jnp.where(keep, returns, 0.0)
    error = jnp.square(values - returns)
    if clip_eps is None:
        per_token = 0.5 * error
        clipped = jnp.zeros_like(error)
    else:
        values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        error_clipped = jnp.square(values_clipped - returns)
        per_token = 0.5 * jnp.maximum(error, error_clipped)
        # The clipped branch is active only where the clip moved the prediction; comparing the
        # errors alone would count float rounding of an unclipped V as clipping.
        moved = jnp.abs(values - old_values) > clip_eps
        clipped = (moved & (error_clipped > error)).astype(error.dtype)
    loss = masked_mean(per_token, mask, normalizer=normalizer)
    metrics = {
        "val/clipfrac": masked_mean(clipped, mask),
        "val/vpred": masked_mean(jax.lax.stop_gradient(values), mask),
        "val/error": masked_mean(jax.lax.stop_gradient(error), mask),
        "count": masked_sum_and_count(error, mask)[1],
    }
    return loss, metrics


def entropy_bonus(
    entropy: jax.Array,
    mask: jax.Array | None = None,
    normalizer: float | jax.Array | None = None,
) -> jax.Array:
    """Masked mean entropy (to be *maximised*; :func:`ppo_loss` subtracts ``coef * bonus``).

    ``entropy`` is per position, e.g. :func:`rljax.logprobs.entropy_from_logits`.
    """
    return masked_mean(entropy, mask, normalizer=normalizer)


def ppo_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    entropy: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    clip_eps: float | jax.Array = 0.2,
    clip_eps_high: float | jax.Array | None = None,
    dual_clip: float | jax.Array | None = None,
    value_clip_eps: float | jax.Array | None = 0.2,
    value_coef: float | jax.Array = 0.5,
    entropy_coef: float | jax.Array = 0.0,
    normalizer: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Combined PPO loss (Schulman et al., 2017, Eq. 9, with the sign flipped to minimise).

    .. math:: L = L^{clip} + c_v L^{V} - c_e H

    All per-position terms share ``mask`` and ``normalizer``. Returns ``(loss, metrics)`` with
    the metrics of :func:`clipped_surrogate_loss` and :func:`clipped_value_loss` plus
    ``loss/policy``, ``loss/value``, ``loss/total`` and (when ``entropy`` is given)
    ``policy/entropy``.
    """
    policy_loss, policy_metrics = clipped_surrogate_loss(
        logps, old_logps, advantages, mask, clip_eps, clip_eps_high, dual_clip, normalizer
    )
    value_loss, value_metrics = clipped_value_loss(
        values, old_values, returns, mask, value_clip_eps, normalizer
    )
    loss = policy_loss + value_coef * value_loss
    metrics = {**policy_metrics, **value_metrics}
    if entropy is not None:
        chex.assert_equal_shape([entropy, logps])
        bonus = entropy_bonus(entropy, mask, normalizer)
        loss = loss - entropy_coef * bonus
        metrics["policy/entropy"] = jax.lax.stop_gradient(bonus)
    metrics.update(
        {
            "loss/policy": jax.lax.stop_gradient(policy_loss),
            "loss/value": jax.lax.stop_gradient(value_loss),
            "loss/total": jax.lax.stop_gradient(loss),
        }
    )
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# The pure PPO update step.
# ---------------------------------------------------------------------------------------------
