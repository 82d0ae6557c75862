"""Generalised advantage estimation, discounted returns and advantage whitening.

Time is the **last** axis; any leading axes (batch, environments) are carried along.

Episode ends: ``dones[..., t] = 1`` means the episode ended at step ``t`` (a termination), so
nothing is bootstrapped from ``values[..., t + 1]`` across it. For a time-limit truncation,
where the episode was cut but did not terminate, fold the bootstrap into the reward
(``r_t + gamma * V(s_{t+1})``, with ``s_{t+1}`` the state the time limit cut off) and set
``dones[t] = 1``: the next entry of ``values`` then belongs to the next episode.

Padding: positions with ``mask == 0`` are *not steps*. They are skipped by the backward
recursion (the next valid step's value and advantage pass through them unchanged) and get an
advantage and return of 0. This handles left padding, right padding and holes alike. Right
padding after a terminal step needs ``dones = 1`` at that step (as it would without padding).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rljax.logprobs import masked_sum_and_count

__all__ = ["discounted_returns", "explained_variance", "gae", "whiten"]


def _prepare(rewards, dones, mask):
    if rewards.ndim < 1:
        raise ValueError(f"rewards needs a time axis (last axis); got shape {rewards.shape}")
    chex.assert_equal_shape([rewards, dones])
    dtype = jnp.promote_types(rewards.dtype, jnp.float32)
    if mask is None:
        mask = jnp.ones(rewards.shape, dtype)
    chex.assert_equal_shape([rewards, mask])
    return dtype, dones.astype(dtype), mask.astype(bool)


def _scan_backwards(step, init, xs):
    """Reverse-time ``lax.scan`` over the last axis of each array in ``xs``."""
    xs_time_major = jax.tree.map(lambda x: jnp.moveaxis(x, -1, 0), xs)
    _, ys = jax.lax.scan(step, init, xs_time_major, reverse=True)
    return jnp.moveaxis(ys, 0, -1)


def gae(
    rewards: jax.Array,
    values: jax.Array,
    dones: jax.Array,
    gamma: float | jax.Array = 0.99,
    lam: float | jax.Array = 0.95,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Generalised advantage estimation (Schulman et al., 2016, arXiv:1506.02438, Eq. 16).

    .. math::
        \delta_t = r_t + \gamma (1 - d_t) V_{t+1} - V_t, \qquad
        \hat A_t = \delta_t + \gamma \lambda (1 - d_t) \hat A_{t+1}

    with :math:`\hat A_T = 0` after the last step and :math:`V_T` the bootstrap value.

    Args:
      rewards: ``[..., T]``.
      values: ``[..., T + 1]``; the last entry is the bootstrap value of the state after the
        final step.
      dones: ``[..., T]``, 1 where the episode terminated at step ``t``.
      gamma: discount :math:`\gamma`.
      lam: GAE :math:`\lambda`. ``lam=1`` gives discounted returns minus values; ``lam=0``
        gives the one-step TD error.
      mask: optional ``[..., T]`` validity mask (see module docstring for padding semantics).

    Returns:
      ``(advantages, returns)``, both ``[..., T]``, with ``returns = advantages + values[..., :T]``
      at valid positions and 0 at padding. Returns are the TD(lambda) targets of the value
      function.
    """
    dtype, dones, valid = _prepare(rewards, dones, mask)
    chex.assert_rank(values, rewards.ndim)
    chex.assert_equal_shape_prefix([rewards, values], rewards.ndim - 1)
    if values.shape[-1] != rewards.shape[-1] + 1:
        raise ValueError(
            f"values must have one more entry than rewards on the time axis (the bootstrap "
            f"value): rewards {rewards.shape}, values {values.shape}"
        )
    rewards = rewards.astype(dtype)
    values = values.astype(dtype)
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)

    def step(carry, x):
        next_value, next_adv = carry
        reward, value, done, is_valid = x
        not_done = 1.0 - done
        delta = reward + gamma * not_done * next_value - value
        adv = delta + gamma * lam * not_done * next_adv
        carry = (jnp.where(is_valid, value, next_value), jnp.where(is_valid, adv, next_adv))
        return carry, jnp.where(is_valid, adv, 0.0)

    init = (values[..., -1], jnp.zeros_like(values[..., -1]))
    advantages = _scan_backwards(step, init, (rewards, values[..., :-1], dones, valid))
    returns = jnp.where(valid, advantages + values[..., :-1], 0.0)
    return advantages, returns


def discounted_returns(
    rewards: jax.Array,
    dones: jax.Array,
    gamma: float | jax.Array = 0.99,
    bootstrap_value: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Discounted returns :math:`G_t = r_t + \gamma (1 - d_t) G_{t+1}`, :math:`G_T` = bootstrap.

    Args:
      rewards: ``[..., T]``.
      dones: ``[..., T]``, 1 where the episode terminated at step ``t``.
      gamma: discount.
      bootstrap_value: ``[...]`` value of the state after the last step (default 0).
      mask: optional ``[..., T]`` validity mask; padded positions are skipped and return 0.

    Returns:
      ``[..., T]`` returns.
    """
    dtype, dones, valid = _prepare(rewards, dones, mask)
    rewards = rewards.astype(dtype)
    if bootstrap_value is None:
        bootstrap_value = jnp.zeros(rewards.shape[:-1], dtype)
    chex.assert_shape(bootstrap_value, rewards.shape[:-1])
    gamma = jnp.asarray(gamma, dtype)

    def step(next_return, x):
        reward, done, is_valid = x
        ret = reward + gamma * (1.0 - done) * next_return
        return jnp.where(is_valid, ret, next_return), jnp.where(is_valid, ret, 0.0)

    return _scan_backwards(step, bootstrap_value.astype(dtype), (rewards, dones, valid))


def whiten(
    x: jax.Array,
    mask: jax.Array | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> jax.Array:
    r"""Normalise ``x`` to zero mean and unit variance over valid positions only.

    .. math:: \tilde x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}

    with :math:`\mu, \sigma^2` the mean and (population) variance over all positions where
    ``mask == 1``; padded positions neither contribute nor receive a value (they are 0).
    Advantage normalisation as in PPO implementations (Andrychowicz et al., 2021,
    arXiv:2006.05990, Sec. 3).

    Args:
      x: any shape.
      mask: same shape as ``x`` or ``None``.
      shift_mean: if ``False``, the mean is added back after scaling (as TRL does for rewards).
      eps: added to the variance.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    total, count = masked_sum_and_count(x, mask)
    count = jnp.maximum(count, 1.0)
    mean = total / count
    centred = x - mean
    var = masked_sum_and_count(jnp.square(centred), mask)[0] / count
    out = centred * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    if mask is None:
        return out
    return jnp.where(mask.astype(bool), out, 0.0)


def explained_variance(
    predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    r"""Explained variance :math:`1 - \mathrm{Var}[y - \hat y] / \mathrm{Var}[y]` over valid positions.

    1 is a perfect value function, 0 no better than a constant, negative worse. Returns
    ``nan`` when the targets have zero variance (undefined), as Stable-Baselines3 does.
    """
    chex.assert_equal_shape([predictions, targets])
    dtype = jnp.promote_types(targets.dtype, jnp.float32)
    predictions, targets = predictions.astype(dtype), targets.astype(dtype)

    def variance(x):
        total, count = masked_sum_and_count(x, mask)
        count = jnp.maximum(count, 1.0)
        mean = total / count
        return masked_sum_and_count(jnp.square(x - mean), mask)[0] / count

    var_targets = variance(targets)
    return jnp.where(var_targets > 0, 1.0 - variance(targets - predictions) / var_targets, jnp.nan)
