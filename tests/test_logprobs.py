"""Tests of :mod:`rljax.logprobs` against independent float64 numpy references.

The references never call library code: log-softmax is ``s - log(sum(exp(s)))`` with
``s = z - max(z)`` in float64; masked reductions use boolean indexing (``x[mask].sum()``), not
``where``/multiplication; the KL estimators are written from Schulman (2020).

Tolerances: float64 results must match to 1e-10 relative; float32 (and bfloat16-input) results
are compared with the float64 reference evaluated on the *same* rounded inputs to 1e-5
relative. Where a result is the difference of two numbers of size ``|z|`` (a log-probability
is ``z_y - logsumexp(z)``, an entropy ``logsumexp(z) - E[z]``), its absolute error is set by
the rounding of ``|z|``, not by the result's size, so a result near 0 (the log-probability of a
dominant token is ~ -exp(-gap)) gets an absolute floor of a few ``eps * max|z|``
(``ABS_FLOOR``); that is ~1e-12 for float64 logits of size 1e3 and ~5e-4 for float32 ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import EPS, RTOL, TRANSFORMS, assert_close_per_element, np_log_softmax
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rljax.logprobs import (
    KL_ESTIMATORS,
    categorical_kl,
    entropy_from_logits,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_sum_and_count,
    token_logprobs,
)

# Few distinct shapes keep the eager runs fast (every primitive compiles once per shape).
LOGIT_SHAPE = (3, 5, 7)  # [B, T, V]


def ABS_FLOOR(dtype, z):
    """Absolute error floor for a difference of two numbers of size ``max|z|`` (see module)."""
    return 8 * EPS[np.dtype(dtype)] * max(1.0, float(np.max(np.abs(np.asarray(z, np.float64)))))


# ---------------------------------------------------------------------------------------------
# numpy references (float64)
# ---------------------------------------------------------------------------------------------


def np_token_logprobs(z, y):
    ls = np_log_softmax(z)
    out = np.empty(np.shape(y), np.float64)
    for idx in np.ndindex(out.shape):
        out[idx] = ls[idx][int(np.asarray(y)[idx])]
    return out


def np_entropy(z):
    """``-sum p log p`` with the convention ``0 log 0 = 0``."""
    ls = np_log_softmax(z)
    p = np.exp(ls)
    terms = np.zeros_like(ls)
    np.multiply(p, ls, out=terms, where=p > 0)
    return -terms.sum(-1)


def np_categorical_kl(zp, zq):
    """``sum_v p_v (log p_v - log q_v)`` with ``0 log 0 = 0``."""
    lp, lq = np_log_softmax(zp), np_log_softmax(zq)
    p = np.exp(lp)
    out = np.zeros(lp.shape[:-1], np.float64)
    for idx in np.ndindex(out.shape):
        for v in range(lp.shape[-1]):
            if p[idx][v] > 0:
                out[idx] += p[idx][v] * (lp[idx][v] - lq[idx][v])
    return out


def _valid(x, mask):
    return np.ones(np.shape(x), bool) if mask is None else np.asarray(mask).astype(bool)


def np_masked_sum_count(x, mask, axis):
    """Sum and count over valid positions by boolean indexing (row by row for ``axis=-1``)."""
    x = np.asarray(x, np.float64)
    valid = _valid(x, mask)
    if axis is None:
        return float(x[valid].sum()), float(valid.sum())
    assert axis == -1
    rows_x, rows_v = x.reshape(-1, x.shape[-1]), valid.reshape(-1, x.shape[-1])
    sums = np.array([row[v].sum() for row, v in zip(rows_x, rows_v, strict=True)])
    counts = np.array([v.sum() for v in rows_v], np.float64)
    return sums.reshape(x.shape[:-1]), counts.reshape(x.shape[:-1])


def np_masked_mean(x, mask, axis):
    total, count = np_masked_sum_count(x, mask, axis)
    return np.where(np.asarray(count) > 0, total / np.maximum(count, 1.0), 0.0)


def make_logits(seed, shape=LOGIT_SHAPE, scale=3.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    z = rng.uniform(-scale, scale, shape).astype(dtype)
    y = rng.integers(0, shape[-1], shape[:-1])
    # make some targets the argmax (log-probability ~ 0, the hardest case relatively)
    argmax = np.argmax(np.asarray(z, np.float64), axis=-1)
    y = np.where(rng.random(shape[:-1]) < 0.3, argmax, y)
    return z, y


def assert_close(got, want, dtype, atol=0.0):
    assert_close_per_element(got, want, dtype, RTOL[np.dtype(dtype)], atol)


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [3.0, 1e3])
def test_token_logprobs_matches_numpy(transform, dtype, scale):
    z, y = make_logits(0, scale=scale, dtype=dtype)
    got = transform(token_logprobs)(jnp.asarray(z), jnp.asarray(y))
    want = np_token_logprobs(z, y)
    assert np.all(np.isfinite(np.asarray(got)))
    assert_close(got, want, dtype, atol=ABS_FLOOR(dtype, z))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_token_logprobs_extreme_logits_hand_computed(transform, dtype):
    # z = [1000, -1000, 0]: logsumexp = 1000 + log(1 + e^-2000 + e^-1000) == 1000 in floating
    # point, so log pi = [0, -2000, -1000] exactly; a naive exp(z) overflows to inf -> nan.
    z = np.array([[1000.0, -1000.0, 0.0]] * 3, dtype)
    y = np.array([0, 1, 2])
    got = transform(token_logprobs)(jnp.asarray(z), jnp.asarray(y))
    assert_close(got, np.array([0.0, -2000.0, -1000.0]), dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_token_logprobs_bfloat16_returns_float32(transform):
    z, y = make_logits(1, scale=4.0)
    z_bf16 = jnp.asarray(z, jnp.bfloat16)
    got = transform(token_logprobs)(z_bf16, jnp.asarray(y))
    # the reference sees exactly the bfloat16-rounded logits; the reduction runs in float32
    z_rounded = np.asarray(z_bf16.astype(jnp.float64))
    assert_close(got, np_token_logprobs(z_rounded, y), np.float32, atol=ABS_FLOOR(np.float32, z))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_token_logprobs_int32_and_int64_targets(transform, dtype):
    z, y = make_logits(2, dtype=dtype)
    want = np_token_logprobs(z, y)
    for ydt in (np.int32, np.int64):
        got = transform(token_logprobs)(jnp.asarray(z), jnp.asarray(y.astype(ydt)))
        assert_close(got, want, dtype, atol=ABS_FLOOR(dtype, z))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("shape", [(7,), (4, 7), (2, 3, 4, 7)])
def test_token_logprobs_leading_dims(transform, shape):
    z, y = make_logits(3, shape=shape)
    got = transform(token_logprobs)(jnp.asarray(z), jnp.asarray(y))
    assert got.shape == shape[:-1]
    assert_close(got, np_token_logprobs(z, y), np.float64, atol=ABS_FLOOR(np.float64, z))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_token_logprobs_grad_is_onehot_minus_softmax(transform):
    z, y = make_logits(4)
    grad = transform(jax.grad(lambda logits, t: token_logprobs(logits, t).sum()))(
        jnp.asarray(z), jnp.asarray(y)
    )
    onehot = np.zeros(z.shape)
    for idx in np.ndindex(y.shape):
        onehot[idx][y[idx]] = 1.0
    want = onehot - np.exp(np_log_softmax(z))
    # 1 - softmax of a dominant token cancels towards 0; its error is ~eps, not eps * |result|
    assert_close(grad, want, np.float64, atol=1e-15)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_token_logprobs_shape_and_type_errors(transform):
    z = jnp.zeros((2, 3, 5))
    f = transform(token_logprobs)
    with pytest.raises(AssertionError):
        f(z, jnp.zeros((2,), jnp.int32))  # wrong rank
    with pytest.raises(AssertionError):
        f(z, jnp.zeros((2, 4), jnp.int32))  # leading shape mismatch
    with pytest.raises(AssertionError):
        f(z, jnp.zeros((2, 3, 5), jnp.int32))  # same rank as logits
    with pytest.raises(AssertionError):
        f(z, jnp.zeros((2, 3), jnp.float32))  # float targets


# ---------------------------------------------------------------------------------------------
# entropy_from_logits, categorical_kl
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [3.0, 1e3])
def test_entropy_matches_numpy(transform, dtype, scale):
    z, _ = make_logits(5, scale=scale, dtype=dtype)
    got = transform(entropy_from_logits)(jnp.asarray(z))
    assert np.all(np.isfinite(np.asarray(got)))
    assert_close(got, np_entropy(z), dtype, atol=ABS_FLOOR(dtype, z))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_entropy_bfloat16_returns_float32(transform):
    z, _ = make_logits(5, scale=4.0)
    z_bf16 = jnp.asarray(z, jnp.bfloat16)
    got = transform(entropy_from_logits)(z_bf16)
    z_rounded = np.asarray(z_bf16.astype(jnp.float64))
    assert_close(got, np_entropy(z_rounded), np.float32, atol=ABS_FLOOR(np.float32, z))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_entropy_uniform_and_degenerate(transform):
    v = 7
    z = np.stack([np.full(v, 2.5), np.r_[500.0, np.zeros(v - 1)]])
    got = np.asarray(transform(entropy_from_logits)(jnp.asarray(z)))
    np.testing.assert_allclose(got[0], np.log(v), rtol=1e-12)  # uniform: log V
    # one dominant logit: H ~ 500 * 6 e^-500 ~ 0; allow the cancellation floor eps * 500
    assert abs(got[1]) <= ABS_FLOOR(np.float64, z)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_entropy_with_minus_inf_logits(transform):
    # Masked vocabulary (top-k / top-p, invalid tokens) is written as logit -inf: probability 0,
    # contributing 0 log 0 = 0 to the entropy. H([0, 1, -inf]) = H of softmax([0, 1]).
    z = np.array([[0.0, 1.0, -np.inf], [0.5, -np.inf, -np.inf]])
    got = np.asarray(transform(entropy_from_logits)(jnp.asarray(z)))
    p = np.exp(1.0) / (1.0 + np.exp(1.0))
    want = np.array([-(p * np.log(p) + (1 - p) * np.log(1 - p)), 0.0])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_categorical_kl_matches_numpy(transform, dtype):
    zp, _ = make_logits(6, dtype=dtype)
    zq, _ = make_logits(7, dtype=dtype)
    got = transform(categorical_kl)(jnp.asarray(zp), jnp.asarray(zq))
    want = np_categorical_kl(zp, zq)
    # KL is a sum of O(1) terms of both signs; its rounding error is ~eps * sum|terms|
    assert_close(got, want, dtype, atol=ABS_FLOOR(dtype, np.r_[zp.ravel(), zq.ravel()]))
    assert np.all(np.asarray(got) >= -ABS_FLOOR(dtype, zp))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_categorical_kl_identical_is_zero_and_large_logits(transform):
    zp, _ = make_logits(8, scale=1e3)
    zq, _ = make_logits(9, scale=1e3)
    f = transform(categorical_kl)
    got_same = np.asarray(f(jnp.asarray(zp), jnp.asarray(zp)))
    np.testing.assert_array_equal(got_same, 0.0)
    got = f(jnp.asarray(zp), jnp.asarray(zq))
    assert np.all(np.isfinite(np.asarray(got)))
    assert_close(got, np_categorical_kl(zp, zq), np.float64, atol=ABS_FLOOR(np.float64, zp))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_categorical_kl_zero_probability_in_p(transform):
    # p_v = 0 (logit -inf) contributes 0 log 0 = 0, whatever q_v is.
    zp = np.array([0.0, 1.0, -np.inf])
    zq = np.array([0.3, -0.2, 0.7])
    got = transform(categorical_kl)(jnp.asarray(zp), jnp.asarray(zq))
    want = np_categorical_kl(zp, zq)
    assert np.isfinite(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_categorical_kl_zero_probability_in_q_is_inf(transform):
    # q_v = 0 where p_v > 0: KL(p || q) = +inf.
    got = transform(categorical_kl)(jnp.array([0.0, 1.0, 2.0]), jnp.array([0.0, 1.0, -jnp.inf]))
    assert np.asarray(got) == np.inf


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_categorical_kl_bfloat16_returns_float32(transform):
    zp, _ = make_logits(10)
    zq, _ = make_logits(11)
    zp16, zq16 = jnp.asarray(zp, jnp.bfloat16), jnp.asarray(zq, jnp.bfloat16)
    got = transform(categorical_kl)(zp16, zq16)
    want = np_categorical_kl(
        np.asarray(zp16.astype(jnp.float64)), np.asarray(zq16.astype(jnp.float64))
    )
    assert_close(got, want, np.float32, atol=ABS_FLOOR(np.float32, zp))


def test_categorical_kl_shape_mismatch_raises():
    with pytest.raises(AssertionError):
        categorical_kl(jnp.zeros((2, 5)), jnp.zeros((2, 4)))
    with pytest.raises(AssertionError):
        jax.jit(categorical_kl)(jnp.zeros((3, 5)), jnp.zeros((2, 5)))


# ---------------------------------------------------------------------------------------------
# masked_sum, masked_sum_and_count, masked_mean
# ---------------------------------------------------------------------------------------------

MASK_SHAPE = (4, 6)


def make_masked(seed, dtype=np.float64, mask_dtype=np.float64, empty_row=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 2.0, MASK_SHAPE).astype(dtype)
    valid = rng.random(MASK_SHAPE) < 0.6
    valid[0] = [False, True, True, True, True, False]  # left and right padding
    if empty_row:
        valid[1] = False  # a fully masked row
    return x, valid.astype(mask_dtype)


# a masked sum of O(1) terms of both signs can cancel towards 0, where the rounding of each
# summand (eps * |x|), not the result's size, sets the error
SUM_ATOL = {np.dtype(np.float64): 1e-13, np.dtype(np.float32): 1e-5}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("axis", [None, -1])
@pytest.mark.parametrize(
    ("dtype", "mask_dtype"),
    [(np.float64, np.float64), (np.float64, bool), (np.float32, np.int32), (np.float32, None)],
)
def test_masked_reductions_match_numpy(transform, axis, dtype, mask_dtype):
    x, mask = make_masked(12, dtype, mask_dtype or np.float64)
    if mask_dtype is None:
        mask = None
    xj = jnp.asarray(x)
    mj = None if mask is None else jnp.asarray(mask)
    want_sum, want_count = np_masked_sum_count(x, mask, axis)
    atol = SUM_ATOL[np.dtype(dtype)]

    got_sum = transform(functools.partial(masked_sum, axis=axis))(xj, mj)
    assert_close(got_sum, want_sum, dtype, atol=atol)

    got_sum2, got_count = transform(functools.partial(masked_sum_and_count, axis=axis))(xj, mj)
    assert_close(got_sum2, want_sum, dtype, atol=atol)
    np.testing.assert_array_equal(np.asarray(got_count), want_count)

    got_mean = transform(functools.partial(masked_mean, axis=axis))(xj, mj)
    assert_close(got_mean, np_masked_mean(x, mask, axis), dtype, atol=atol)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_masked_mean_fully_masked_rows_give_zero(transform):
    x, mask = make_masked(13)
    mask[2] = 0.0
    got = np.asarray(transform(functools.partial(masked_mean, axis=-1))(x, mask))
    assert np.all(np.isfinite(got))
    assert got[1] == 0.0 and got[2] == 0.0
    all_masked = transform(masked_mean)(jnp.asarray(x), jnp.zeros(MASK_SHAPE))
    assert np.asarray(all_masked) == 0.0
    s, c = transform(functools.partial(masked_sum_and_count, axis=-1))(x, mask)
    assert np.asarray(s)[1] == 0.0 and np.asarray(c)[1] == 0.0


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("axis", [None, -1])
def test_masked_reductions_ignore_inf_and_nan_in_padding(transform, axis):
    x, mask = make_masked(14)
    poisoned = x.copy()
    pad = mask == 0
    poisoned[pad] = np.where(np.arange(pad.sum()) % 3 == 0, np.nan, np.inf)
    poisoned[pad & (np.arange(MASK_SHAPE[-1]) % 2 == 0)] = -np.inf
    assert np.isnan(poisoned).any() and np.isposinf(poisoned).any() and np.isneginf(poisoned).any()
    for fn in (masked_sum, masked_mean):
        got = np.asarray(transform(functools.partial(fn, axis=axis))(poisoned, mask))
        want = np.asarray(transform(functools.partial(fn, axis=axis))(x, mask))
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        np.asarray(transform(functools.partial(masked_mean, axis=axis))(poisoned, mask)),
        np_masked_mean(x, mask, axis),
        rtol=1e-10,
        atol=1e-13,
    )


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_masked_mean_grad_with_nan_padding(transform):
    # d mean / d x = mask / count at valid positions and exactly 0 (not nan) at padding
    x, mask = make_masked(15, empty_row=False)
    x[mask == 0] = np.nan
    grad = np.asarray(transform(jax.grad(masked_mean))(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(grad, mask / mask.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("axis", [None, -1])
def test_masked_mean_normalizer(transform, axis):
    x, mask = make_masked(16)
    want_sum, _ = np_masked_sum_count(x, mask, axis)
    got = transform(functools.partial(masked_mean, axis=axis))(x, mask, normalizer=7.5)
    assert_close(got, np.asarray(want_sum) / 7.5, np.float64, atol=1e-14)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_masked_mean_normalizer_accumulates_micro_batches(transform):
    # summing per-micro-batch masked means normalised by the global token count gives the exact
    # global mean; averaging per-micro-batch means does not (different valid counts)
    x, mask = make_masked(17)
    mean = transform(masked_mean)
    n_total = jnp.asarray(mask.sum())
    accumulated = sum(
        np.asarray(mean(x[i : i + 2], mask[i : i + 2], normalizer=n_total)) for i in (0, 2)
    )
    want = np_masked_mean(x, mask, None)
    np.testing.assert_allclose(accumulated, want, rtol=1e-10, atol=1e-14)
    naive = np.mean([np_masked_mean(x[i : i + 2], mask[i : i + 2], None) for i in (0, 2)])
    assert abs(naive - want) > 1e-3  # the data make the distinction visible


def test_masked_shape_mismatch_raises():
    x = jnp.zeros((3, 4))
    for fn in (masked_sum, masked_sum_and_count, masked_mean):
        with pytest.raises(AssertionError):
            fn(x, jnp.ones((3, 5)))
        with pytest.raises(AssertionError):
            jax.jit(fn)(x, jnp.ones((4,)))


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


def np_k1(lp, lr):
    return lp - lr


def np_k2(lp, lr):
    return 0.5 * (lr - lp) ** 2


def np_k3(lp, lr):
    # (r - 1) - log r with r = ref / pi; expm1 for accuracy at r ~ 1
    log_r = lr - lp
    return np.expm1(log_r) - log_r


NP_KL = {"k1": np_k1, "k2": np_k2, "k3": np_k3}
LIB_KL = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def make_logp_pairs(seed, shape=(4, 6), dtype=np.float64):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(2.0, shape)
    lr = lp + rng.normal(0.0, 0.5, shape)
    lr[0, :3] = lp[0, :3] + np.array([1e-9, -1e-7, 0.0])  # r ~ 1: expm1 matters
    return lp.astype(dtype), np.minimum(lr, 0.0).astype(dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy(transform, dtype, name):
    lp, lr = make_logp_pairs(18, dtype=dtype)
    lp64, lr64 = lp.astype(np.float64), lr.astype(np.float64)
    want = NP_KL[name](lp64, lr64)
    # k1 = lp - lr and k2 = (lr - lp)^2 / 2 are correctly rounded up to a few eps relative.
    # k3 = expm1(x) - x ~ x^2 / 2 cancels for small x = lr - lp: expm1(x) carries an error of
    # ~eps * |x|, which is the absolute error of k3 whatever its (tiny) size.
    atol = 4 * EPS[np.dtype(dtype)] * np.abs(lr64 - lp64) if name == "k3" else 0.0
    got_direct = transform(LIB_KL[name])(jnp.asarray(lp), jnp.asarray(lr))
    got_named = transform(functools.partial(kl_estimate, estimator=name))(
        jnp.asarray(lp), jnp.asarray(lr)
    )
    for got in (got_direct, got_named):
        assert_close(got, want, dtype, atol=atol)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_kl_estimate_default_is_k1(transform):
    lp, lr = make_logp_pairs(19)
    got = np.asarray(transform(kl_estimate)(jnp.asarray(lp), jnp.asarray(lr)))
    np.testing.assert_array_equal(got, lp - lr)


# Six categories: the policy's and the reference's log-probabilities and their exact KL(pi || ref).
SIX_LOGPS = np_log_softmax(np.array([1.0, 0.2, -0.5, 2.0, -1.5, 0.0]))
SIX_REF_LOGPS = np_log_softmax(np.array([0.3, 0.9, -0.1, 1.0, 0.4, -0.8]))
SIX_KL = float(np.sum(np.exp(SIX_LOGPS) * (SIX_LOGPS - SIX_REF_LOGPS)))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_kl_k1_k3_expectation_is_exact_kl(transform):
    # E_{v ~ pi}[k(log pi_v, log ref_v)] summed exactly over the support: KL(pi || ref) for the
    # unbiased k1 and k3 (E[r - 1] = sum ref - 1 = 0); k2 is biased.
    lp, lq, kl = SIX_LOGPS, SIX_REF_LOGPS, SIX_KL
    expect = {
        name: float(
            np.sum(
                np.exp(lp) * np.asarray(transform(LIB_KL[name])(jnp.asarray(lp), jnp.asarray(lq)))
            )
        )
        for name in ("k1", "k2", "k3")
    }
    np.testing.assert_allclose(expect["k1"], kl, rtol=1e-10)
    np.testing.assert_allclose(expect["k3"], kl, rtol=1e-10)
    assert abs(expect["k2"] - kl) > 1e-2


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_kl_k1_k3_unbiased_monte_carlo(transform):
    # Sample v ~ pi (6 categories, 200k samples, fixed seed); the sample means of k1 and k3 must
    # lie within 5 standard errors of the exact KL(pi || ref). k2 is biased: its mean is far off.
    lp_all, lq_all, kl = SIX_LOGPS, SIX_REF_LOGPS, SIX_KL
    rng = np.random.default_rng(20)
    n = 200_000
    v = rng.choice(6, size=n, p=np.exp(lp_all) / np.exp(lp_all).sum())
    lp, lq = jnp.asarray(lp_all[v]), jnp.asarray(lq_all[v])
    means = {}
    for name in ("k1", "k2", "k3"):
        k = np.asarray(transform(functools.partial(kl_estimate, estimator=name))(lp, lq))
        means[name] = (k.mean(), k.std() / np.sqrt(n))
    for name in ("k1", "k3"):
        mean, se = means[name]
        assert abs(mean - kl) < 5 * se, (name, mean, kl, se)
    mean2, se2 = means["k2"]
    assert abs(mean2 - kl) > 20 * se2


@settings(max_examples=15)
@given(
    lp=hnp.arrays(np.float64, 16, elements=st.floats(-60.0, 0.0)),
    lr=hnp.arrays(np.float64, 16, elements=st.floats(-60.0, 0.0)),
    delta=hnp.arrays(np.float64, 16, elements=st.floats(-1e-6, 1e-6)),
)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_kl_k2_k3_nonnegative(transform, lp, lr, delta):
    # half the pairs are nearly equal, where k3 = expm1(x) - x ~ x^2 / 2 could round below 0
    lr = np.where(np.arange(16) % 2 == 0, lr, np.minimum(lp + delta, 0.0))
    for dtype in (np.float64, np.float32):
        a, b = jnp.asarray(lp, dtype), jnp.asarray(lr, dtype)
        k2 = np.asarray(transform(kl_k2)(a, b))
        k3 = np.asarray(transform(kl_k3)(a, b))
        assert np.all(k2 >= 0), k2
        assert np.all(k3 >= 0), k3
        # equality iff pi == ref
        same = np.asarray(a) == np.asarray(b)
        assert np.all((k2 == 0) >= same) and np.all((k3 == 0) >= same)


def test_kl_estimate_unknown_raises_with_choices():
    lp = jnp.zeros(3)
    with pytest.raises(ValueError, match="k4") as info:
        kl_estimate(lp, lp, estimator="k4")
    for name in ("k1", "k2", "k3"):
        assert repr(name) in str(info.value)
    assert sorted(KL_ESTIMATORS) == ["k1", "k2", "k3"]
    with pytest.raises(ValueError):
        jax.jit(functools.partial(kl_estimate, estimator="K1"))(lp, lp)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_estimators_shape_mismatch_raises(name):
    with pytest.raises(AssertionError):
        LIB_KL[name](jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(AssertionError):
        jax.jit(functools.partial(kl_estimate, estimator=name))(jnp.zeros((3,)), jnp.zeros((2, 3)))
