"""Trust Region Policy Optimization (Schulman et al., 2015, arXiv:1502.05477).

TRPO maximises the importance-weighted surrogate subject to a bound on the mean KL between
the old and the new policy (Eq. 14 of the paper):

.. math::
    \\max_\\theta\\ L(\\theta) = \\hat{\\mathbb E}\\Big[\\frac{\\pi_\\theta(a|s)}{\\pi_{old}(a|s)}
    \\hat A\\Big] \\quad \\text{s.t.}\\quad
    \\bar D_{KL}(\\theta) = \\hat{\\mathbb E}\\big[\\mathrm{KL}(\\pi_{old}(\\cdot|s)\\,\\|\\,
    \\pi_\\theta(\\cdot|s))\\big] \\le \\delta.

This module holds the pure objectives; policies are categorical (logits) or diagonal
Gaussian (``(mean, log_std)``), see :mod:`rljax.distributions`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rljax.distributions import Outputs, kl_divergence
from rljax.logprobs import masked_mean, masked_sum_and_count

__all__ = ["mean_kl", "surrogate_objective"]


def surrogate_objective(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array | None = None,
    normalizer: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Importance-weighted surrogate :math:`L = \mathrm{mean}\,[\exp(\log\pi - \log\pi_{old}) A]`.

    Schulman et al. (2015), Eq. 14. This is an objective to *maximise*; its gradient at
    ``logps == old_logps`` is the policy gradient.

    Args:
      logps: ``[batch, time]`` or ``[batch]`` log-probs of the taken actions under the
        candidate policy (gradients flow through these).
      old_logps: same shape, under the policy that collected the data (gradient stopped).
      advantages: same shape (gradient stopped).
      mask: same shape, 1 at valid positions.
      normalizer: divide the masked sum by this instead of the local valid count.

    Returns:
      ``(surrogate, metrics)`` with ``surrogate`` (the value), ``ratio`` (mean) and ``count``.
    """
    chex.assert_equal_shape([logps, old_logps, advantages])
    ratio = jnp.exp(logps - jax.lax.stop_gradient(old_logps))
    surrogate = masked_mean(ratio * jax.lax.stop_gradient(advantages), mask, normalizer=normalizer)
    metrics = {
        "surrogate": jax.lax.stop_gradient(surrogate),
        "ratio": masked_mean(jax.lax.stop_gradient(ratio), mask),
        "count": masked_sum_and_count(ratio, mask)[1],
    }
    return surrogate, metrics


def mean_kl(
    old_outputs: Outputs,
    new_outputs: Outputs,
    mask: jax.Array | None = None,
    normalizer: float | jax.Array | None = None,
) -> jax.Array:
    r"""Mean of :math:`\mathrm{KL}(\pi_{old}(\cdot|s) \| \pi_{new}(\cdot|s))` over valid positions.

    The constraint of TRPO (Schulman et al., 2015, Eq. 12), computed exactly from the output
    distributions (not from samples). ``old_outputs`` is treated as data (gradient stopped),
    so the gradient and Hessian are with respect to the new policy only.

    Args:
      old_outputs: logits ``[..., num_actions]`` or ``(mean, log_std)`` of the old policy.
      new_outputs: same structure, of the new policy.
      mask: ``[...]`` validity mask over positions (the outputs' shape minus the last axis).
      normalizer: divide the masked sum by this instead of the local valid count.
    """
    old_outputs = jax.tree.map(jax.lax.stop_gradient, old_outputs)
    return masked_mean(kl_divergence(old_outputs, new_outputs), mask, normalizer=normalizer)
