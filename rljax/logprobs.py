"""Token log-probabilities, masked reductions, entropy and KL estimators.

Conventions used across rljax:

* log-probabilities are natural logarithms;
* masks are 1 (or ``True``) at valid positions and 0 at padding;
* sequence arrays are batch-major, ``[batch, time]``, logits ``[batch, time, vocab]``.

Everything here is a pure function of arrays: no model, no optimiser, no config. Nothing is
jitted internally; callers jit.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "KL_ESTIMATORS",
    "categorical_kl",
    "chunked_token_logprobs",
    "chunked_token_logprobs_and_entropy",
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


def _chunk_logits(h: jax.Array, w: jax.Array, softcap: float | None = None) -> jax.Array:
    """``[c, D] @ [D, V]`` in the input dtype, accumulated (and returned) in at least float32;
    with ``softcap``, then ``softcap * tanh(z / softcap)``."""
    z = jnp.dot(h, w, preferred_element_type=_float_dtype(h))
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return z


def _chunk_forward(h, w, y, with_entropy, softcap=None):
    """Log-probs, logsumexp and (optionally) ``E_pi[z]`` of one chunk ``h: [c, D], y: [c]``."""
    z = _chunk_logits(h, w, softcap)  # [c, V], the only vocabulary-sized array
    m = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - m)
    s = jnp.sum(e, axis=-1)
    lse = m[:, 0] + jnp.log(s)
    picked = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    mean_z = jnp.sum(e * z, axis=-1) / s if with_entropy else None
    return picked - lse, lse, mean_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_core(with_entropy, softcap, h, w, y):
    """``h: [n, c, D], w: [D, V], y: [n, c]`` -> log-probs ``[n, c]`` (and entropies ``[n, c]``)."""
    out, _ = _chunked_core_fwd(with_entropy, softcap, h, w, y)
    return out


def _chunked_core_fwd(with_entropy, softcap, h, w, y):
    def body(xs):
        h_c, y_c = xs
        logp, lse, mean_z = _chunk_forward(h_c, w, y_c, with_entropy, softcap)
        return (logp, lse) if mean_z is None else (logp, lse, mean_z)

    outs = jax.lax.map(body, (h, y))
    if with_entropy:
        logp, lse, mean_z = outs
        return (logp, lse - mean_z), (h, w, y, lse, mean_z)
    logp, lse = outs
    return logp, (h, w, y, lse, None)


def _chunked_core_bwd(with_entropy, softcap, res, g):
    h, w, y, lse, mean_z = res
    g_logp, g_ent = g if with_entropy else (g, None)
    acc = _float_dtype(h)
    vocab = w.shape[1]

    def body(dw, xs):
        h_c, y_c, lse_c, g_c = xs[:4]
        z = _chunk_logits(h_c, w, softcap)  # recomputed, [c, V]
        p = jnp.exp(z - lse_c[:, None])
        onehot = (jnp.arange(vocab, dtype=y_c.dtype)[None, :] == y_c[:, None]).astype(acc)
        # d log pi(y) / dz = onehot - p;  dH / dz = -p (z - E_pi[z])
        dz = g_c[:, None].astype(acc) * (onehot - p)
        if with_entropy:
            mz_c, ge_c = xs[4:]
            dz = dz - ge_c[:, None].astype(acc) * p * (z - mz_c[:, None])
        if softcap is not None:  # d(cap tanh(u / cap)) / du = 1 - tanh^2
            dz = dz * (1 - jnp.square(z / softcap))
        dz_in = dz.astype(h_c.dtype)
        dh_c = jnp.dot(dz_in, w.T, preferred_element_type=acc).astype(h_c.dtype)
        dw = dw + jnp.dot(h_c.T, dz_in, preferred_element_type=acc)
        return dw, dh_c

    xs = (h, y, lse, g_logp) + ((mean_z, g_ent) if with_entropy else ())
    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, acc), xs)
    return dh, dw.astype(w.dtype), None


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def _chunked(hidden, unembedding, targets, chunk_size, with_entropy, softcap=None):
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, int | float) or softcap <= 0:
            raise ValueError(f"softcap must be a float > 0 or None, got {softcap!r}")
        softcap = float(softcap)
    chex.assert_rank(unembedding, 2)
    chex.assert_rank(targets, hidden.ndim - 1)
    chex.assert_equal_shape_prefix([hidden, targets], targets.ndim)
    chex.assert_type(targets, int)
    if hidden.shape[-1] != unembedding.shape[0]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} (hidden {hidden.shape}) does not match the "
            f"unembedding's first axis (unembedding {unembedding.shape}, expected [D, V])"
        )
    dtype = jnp.result_type(hidden, unembedding)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"hidden and unembedding must be floating point, got {dtype}")
    hidden, unembedding = hidden.astype(dtype), unembedding.astype(dtype)
    lead, d = targets.shape, hidden.shape[-1]
    n = targets.size
    out_dtype = _float_dtype(hidden)
    if n == 0:
        zeros = jnp.zeros(lead, out_dtype)
        return (zeros, zeros) if with_entropy else zeros
    chunk = min(chunk_size, n)
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(num_chunks, chunk, d)
    y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad)).reshape(num_chunks, chunk)
    out = _chunked_core(with_entropy, softcap, h, unembedding, y)
    unpad = lambda x: x.reshape(num_chunks * chunk)[:n].reshape(lead)
    return tuple(unpad(x) for x in out) if with_entropy else unpad(out)


def chunked_token_logprobs(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> jax.Array:
    r"""``token_logprobs(hidden @ unembedding, targets)`` without building the full logits.

    .. math:: \log \pi(y_t) = h_t \cdot w_{y_t} - \log \sum_v \exp(h_t \cdot w_v)

    The ``[..., vocab]`` logits are the largest activation of a language-model loss (float32
    ``[B, T, V]``). Here the flattened token axis is split into chunks of ``chunk_size`` rows
    (the last one zero-padded, the padding dropped) and a ``lax.map`` computes one chunk's
    ``[chunk, vocab]`` logits at a time. A ``jax.custom_vjp`` saves only the per-token
    ``logsumexp`` and recomputes each chunk's logits and softmax in the backward pass
    (``dz = g (onehot - softmax)``; ``dh = dz W^T`` per chunk, ``dW = \sum_chunks h^T dz``
    accumulated in float32), so neither pass holds more than one chunk of logits. This is the
    chunked "fused linear cross-entropy" of Liger Kernel (Hsu et al., 2024, arXiv:2410.10989);
    see also Cut Cross-Entropy (Wijmans et al., 2024, arXiv:2411.09009).

    Matmuls run in the inputs' (promoted) dtype, e.g. bfloat16, with float32 accumulation
    (``preferred_element_type``); max, exp and sums run in float32 (float64 for float64
    inputs). In the backward pass the logit cotangent is cast back to the input dtype for the
    two matmuls.

    Args:
      hidden: ``[..., D]`` final hidden states (e.g. ``model.decode(...)[0]``).
      unembedding: ``[D, V]`` output projection (e.g. ``model.unembedding()``).
      targets: ``[...]`` integer token ids in ``[0, V)``, same leading shape as ``hidden``.
      chunk_size: rows of the flattened ``[prod(...), D]`` hidden states per chunk; peak extra
        memory is a few ``[chunk_size, V]`` float32 arrays. Clamped to the number of tokens.
      softcap: soft-cap the logits to ``softcap * tanh(z / softcap)`` first (Gemma 2's final
        logits: ``model.config.final_logit_softcap``); ``None``: off. Static.

    Returns:
      ``[...]`` log-probabilities (float32, or float64 for float64 inputs).

    Raises:
      ValueError: ``chunk_size`` is not a positive int, or ``D`` does not match.
      AssertionError: (chex) ranks / leading shapes mismatch or ``targets`` is not integer.
    """
    return _chunked(hidden, unembedding, targets, chunk_size, with_entropy=False, softcap=softcap)


def chunked_token_logprobs_and_entropy(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    r""":func:`chunked_token_logprobs` plus the entropy of each position's distribution.

    .. math:: H_t = \log \sum_v e^{z_{t,v}} - \sum_v \mathrm{softmax}(z_t)_v z_{t,v},
              \quad z_t = h_t W

    Same chunking and memory as :func:`chunked_token_logprobs`; the entropy's gradient
    ``dH/dz = -softmax(z) (z - E[z])`` is recomputed per chunk as well; ``softcap`` as there.

    Returns:
      ``(logps, entropy)``, both ``[...]`` float32 (float64 for float64 inputs).
    """
    return _chunked(hidden, unembedding, targets, chunk_size, with_entropy=True, softcap=softcap)


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
