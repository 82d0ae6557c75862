"""Token log-probabilities, masked reductions, entropy and KL estimators.

Conventions used across rljax:

* log-probabilities are natural logarithms;
* masks are 1 (or ``True``) at valid positions and 0 at padding;
* sequence arrays are batch-major, ``[batch, time]``, logits ``[batch, time, vocab]``.

Everything here is a pure function of arrays: no model, no optimiser, no config. Nothing is
jitted internally; callers jit.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "KL_ESTIMATORS",
    "categorical_kl",
    "entropy_from_logits",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "masked_sum",
    "masked_sum_and_count",
    "token_logprobs",
]


def _float_dtype(x: jax.Array) -> jnp.dtype:
    """Compute dtype for reductions: at least float32 (bfloat16 inputs are upcast)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    r"""Log-probability of each target token under the categorical distribution ``logits``.

    .. math:: \log \pi(y_t) = z_{t, y_t} - \log \sum_v \exp z_{t, v}

    Computed as the gathered logit minus ``logsumexp``, so the full log-softmax is never
    materialised; bfloat16 logits are upcast to float32 for the reduction.

    Args:
      logits: ``[..., vocab]`` unnormalised log-probabilities.
      targets: ``[...]`` integer token ids, same leading shape as ``logits``.

    Returns:
      ``[...]`` log-probabilities (float32, or float64 for float64 logits).
    """
    chex.assert_rank(targets, logits.ndim - 1)
    chex.assert_equal_shape_prefix([logits, targets], targets.ndim)
    chex.assert_type(targets, int)
    logits = logits.astype(_float_dtype(logits))
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    r"""Entropy of the categorical distribution given by ``logits``, over the last axis.

    .. math:: H = \log \sum_v e^{z_v} - \sum_v \mathrm{softmax}(z)_v z_v

    Args:
      logits: ``[..., vocab]``.

    Returns:
      ``[...]`` entropies in nats.
    """
    log_p = jax.nn.log_softmax(logits.astype(_float_dtype(logits)), axis=-1)
    probs = jnp.exp(log_p)
    # Impossible outcomes (logit -inf, p = 0) contribute 0 * log 0 = 0, not NaN; the inner
    # where keeps the gradient finite as well.
    support = probs > 0
    return -jnp.sum(jnp.where(support, probs * jnp.where(support, log_p, 0.0), 0.0), axis=-1)


def categorical_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    r"""Exact ``KL(p || q)`` between categorical distributions, over the last axis.

    .. math:: \mathrm{KL}(p\,\|\,q) = \sum_v p_v (\log p_v - \log q_v)

    Args:
      p_logits: ``[..., n]`` logits of ``p``.
      q_logits: ``[..., n]`` logits of ``q``.

    Returns:
      ``[...]`` divergences in nats.
    """
    chex.assert_equal_shape([p_logits, q_logits])
    dtype = jnp.promote_types(_float_dtype(p_logits), q_logits.dtype)
    log_p = jax.nn.log_softmax(p_logits.astype(dtype), axis=-1)
    log_q = jax.nn.log_softmax(q_logits.astype(dtype), axis=-1)
    probs = jnp.exp(log_p)
    # Outcomes impossible under p contribute 0 (also where q gives them -inf).
    support = probs > 0
    log_ratio = jnp.where(support, log_p, 0.0) - jnp.where(support, log_q, 0.0)
    return jnp.sum(jnp.where(support, probs * log_ratio, 0.0), axis=-1)


def _mask_like(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(x.shape, _float_dtype(x))
    chex.assert_equal_shape([x, mask])
    return mask.astype(_float_dtype(x))


def masked_sum(x: jax.Array, mask: jax.Array | None = None, axis=None) -> jax.Array:
    """Sum of ``x`` over valid positions (``mask == 1``) along ``axis`` (all axes if ``None``).

    Padding is removed with ``where`` rather than multiplication, so ``inf``/``nan`` at padded
    positions do not leak into the result.
    """
    mask_f = _mask_like(x, mask)
    return jnp.sum(jnp.where(mask_f > 0, x, 0).astype(mask_f.dtype) * mask_f, axis=axis)


def masked_sum_and_count(
    x: jax.Array, mask: jax.Array | None = None, axis=None
) -> tuple[jax.Array, jax.Array]:
    """``(masked_sum(x, mask, axis), number of valid positions)``.

    Sums and counts add across micro-batches and data-parallel shards, so
    ``total_sum / total_count`` is the exact mean over the whole batch; averaging per-shard
    means is not.
    """
    mask_f = _mask_like(x, mask)
    return masked_sum(x, mask, axis), jnp.sum(mask_f, axis=axis)


def masked_mean(
    x: jax.Array, mask: jax.Array | None = None, axis=None, normalizer=None
) -> jax.Array:
    """Mean of ``x`` over valid positions along ``axis``.

    Args:
      x: values.
      mask: same shape as ``x``; 1 where valid. ``None`` means all valid.
      axis: axis or axes to reduce; ``None`` reduces all.
      normalizer: if given, divide the masked sum by this instead of the local count of valid
        positions (e.g. the token count of the whole global batch, for exact gradient
        accumulation). Positions with zero valid entries give 0, not ``nan``.
    """
    total, count = masked_sum_and_count(x, mask, axis)
    if normalizer is None:
        return total / jnp.maximum(count, 1.0)
    return total / normalizer


def kl_k1(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    r"""k1 estimator of ``KL(pi || ref)`` from samples of ``pi``: :math:`\log\pi - \log\pi_{ref}`.

    Unbiased, high variance, can be negative per sample. From J. Schulman, "Approximating KL
    Divergence" (2020), http://joschu.net/blog/kl-approx.html, with ``r = ref / pi``.
    """
    chex.assert_equal_shape([logps, ref_logps])
    return logps - ref_logps


def kl_k2(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    r"""k2 estimator of ``KL(pi || ref)``: :math:`\tfrac12 (\log\pi_{ref} - \log\pi)^2`.

    Biased (low bias for close policies), low variance, always >= 0 (Schulman 2020).
    """
    chex.assert_equal_shape([logps, ref_logps])
    return 0.5 * jnp.square(ref_logps - logps)


def kl_k3(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    r"""k3 estimator of ``KL(pi || ref)``: :math:`(r - 1) - \log r`, :math:`r = \pi_{ref}/\pi`.

    Unbiased and always >= 0 (Schulman 2020); the estimator GRPO uses for its KL penalty.
    """
    chex.assert_equal_shape([logps, ref_logps])
    log_ratio = ref_logps - logps
    return jnp.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logps: jax.Array, ref_logps: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-sample estimate of ``KL(pi || ref)`` by name: ``"k1"``, ``"k2"`` or ``"k3"``.

    ``logps`` are log-probs under ``pi`` of samples drawn from ``pi``; ``ref_logps`` are the
    same samples' log-probs under the reference. See :func:`kl_k1`, :func:`kl_k2`, :func:`kl_k3`.
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid choices: {sorted(KL_ESTIMATORS)}"
        ) from None
    return fn(logps, ref_logps)
