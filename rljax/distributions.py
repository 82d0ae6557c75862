"""The two policy families rljax's objectives work with, as plain functions of their outputs.

A policy's *outputs* at each position are either

* ``logits`` of shape ``[..., num_actions]``: a categorical policy (discrete actions, tokens);
* a pair ``(mean, log_std)``: a diagonal Gaussian over ``[..., action_dim]``; ``log_std``
  may be state independent (shape ``[action_dim]``) and is broadcast against ``mean``.

The functions dispatch on that structure, so a TRPO/PPO step can be written once for both.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from rljax.logprobs import categorical_kl, entropy_from_logits, token_logprobs

__all__ = ["entropy", "is_gaussian", "kl_divergence", "log_prob"]

Outputs = jax.Array | tuple[jax.Array, jax.Array]


def is_gaussian(outputs: Outputs) -> bool:
    """True for a ``(mean, log_std)`` pair, False for categorical logits."""
    if isinstance(outputs, tuple | list):
        if len(outputs) != 2:
            raise ValueError(
                f"policy outputs must be logits or a (mean, log_std) pair; got a sequence of "
                f"{len(outputs)} arrays"
            )
        return True
    return False


def _gaussian(outputs):
    mean, log_std = outputs
    dtype = jnp.promote_types(mean.dtype, jnp.float32)
    mean = mean.astype(dtype)
    log_std = jnp.broadcast_to(log_std.astype(dtype), mean.shape)
    return mean, log_std


def log_prob(outputs: Outputs, actions: jax.Array) -> jax.Array:
    r"""Log-density of ``actions`` under the policy outputs, one value per position.

    Categorical: :func:`rljax.logprobs.token_logprobs`. Diagonal Gaussian:
    :math:`\sum_d -\tfrac12 ((a_d - \mu_d)/\sigma_d)^2 - \log\sigma_d - \tfrac12\log 2\pi`.
    """
    if not is_gaussian(outputs):
        return token_logprobs(outputs, actions)
    mean, log_std = _gaussian(outputs)
    chex.assert_equal_shape([mean, actions])
    z = (actions.astype(mean.dtype) - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * jnp.square(z) - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def kl_divergence(p_outputs: Outputs, q_outputs: Outputs) -> jax.Array:
    r"""Exact ``KL(p || q)`` per position, for two outputs of the same family.

    Diagonal Gaussian: :math:`\sum_d \log\frac{\sigma_{q,d}}{\sigma_{p,d}} +
    \frac{\sigma_{p,d}^2 + (\mu_{p,d} - \mu_{q,d})^2}{2\sigma_{q,d}^2} - \frac12`.
    """
    if is_gaussian(p_outputs) != is_gaussian(q_outputs):
        raise ValueError("KL between a categorical and a Gaussian policy output is undefined")
    if not is_gaussian(p_outputs):
        return categorical_kl(p_outputs, q_outputs)
    p_mean, p_log_std = _gaussian(p_outputs)
    q_mean, q_log_std = _gaussian(q_outputs)
    chex.assert_equal_shape([p_mean, q_mean])
    var_ratio = jnp.exp(2.0 * (p_log_std - q_log_std))
    mahalanobis = jnp.square((p_mean - q_mean) * jnp.exp(-q_log_std))
    return jnp.sum(0.5 * (var_ratio + mahalanobis - 1.0) - (p_log_std - q_log_std), axis=-1)


def entropy(outputs: Outputs) -> jax.Array:
    r"""Entropy per position; Gaussian: :math:`\sum_d \log\sigma_d + \tfrac12\log(2\pi e)`."""
    if not is_gaussian(outputs):
        return entropy_from_logits(outputs)
    _, log_std = _gaussian(outputs)
    return jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e), axis=-1)
