"""Tests of :mod:`rljax.ppo` against independent float64 numpy references.

The references below are written case by case from the definitions (Schulman et al. 2017,
Eq. 7; Ye et al. 2020, Eq. 5 for the dual clip; the PPO2 clipped value loss) and never call
library code. Masked means are taken with boolean indexing (``x[mask].mean()``), not with a
``where``/multiply, so they are independent of :func:`rljax.logprobs.masked_mean` too.

Tolerances: float64 results must match to 1e-10 relative. float32 inputs are compared with
the float64 reference evaluated on the *same* (float32-rounded) inputs to 1e-5 relative, with
an absolute floor of 1e-6: a masked mean of O(1) terms of both signs can cancel to ~0, where
the ~6e-8 rounding of each float32 summand, not the result's size, sets the error.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TOL,
    TRANSFORMS,
    assert_close,
    count_traces,
    dtype_st,
    finite_diff,
    seed_st,
    shape_st,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.ppo import (
    clipped_surrogate_loss,
    clipped_surrogate_per_token,
    clipped_value_loss,
    entropy_bonus,
    ppo_loss,
)

# Clip settings: symmetric, clip-higher (a larger upper bound), dual clip.
CLIPS = [
    pytest.param(dict(eps=0.2), id="symmetric"),
    pytest.param(dict(eps=0.2, eps_high=0.28), id="clip_higher"),
    pytest.param(dict(eps=0.2, dual=3.0), id="dual"),
]
# Every clip boundary any test uses; generated ratios / value moves keep away from all of them,
# so that float32 rounding cannot flip a branch and finite differences never straddle a kink.
RATIO_BOUNDARIES = (0.7, 0.8, 0.9, 1.1, 1.2, 1.28, 1.3, 2.0, 3.0, 4.0)


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def _f64(*xs):
    return tuple(np.asarray(x, dtype=np.float64) for x in xs)


def np_masked_mean(x, mask):
    """Mean over valid positions by boolean indexing; 0 when nothing is valid."""
    x = np.asarray(x, np.float64)
    valid = np.ones(x.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    return float(x[valid].mean()) if valid.any() else 0.0


def np_count(shape, mask):
    return float(np.prod(shape)) if mask is None else float(np.asarray(mask).astype(bool).sum())


def np_surrogate_per_token(logps, old_logps, adv, eps, eps_high=None, dual=None):
    """Case-by-case PPO-clip loss ``-min(rA, clip(r)A)``, dual clip ``min(., -cA)`` for A < 0.

    A > 0: ``-A min(r, 1 + eps_high)`` (clipped iff r > 1 + eps_high);
    A < 0: ``-A max(r, 1 - eps)`` (clipped iff r < 1 - eps), and with the dual clip ``c``:
    ``-cA`` where ``r > c`` (then the dual clip is active); A == 0: 0.
    """
    logps, old_logps, adv = _f64(logps, old_logps, adv)
    high = eps if eps_high is None else eps_high
    r = np.exp(logps - old_logps)
    pos, neg = adv > 0, adv < 0
    loss = np.where(pos, -adv * np.minimum(r, 1 + high), 0.0)
    loss = np.where(neg, -adv * np.maximum(r, 1 - eps), loss)
    clipped = (pos & (r > 1 + high)) | (neg & (r < 1 - eps))
    if dual is not None:
        dual_active = neg & (r > dual)
        loss = np.where(dual_active, -dual * adv, loss)
        clipped = clipped | dual_active
    return loss, r, clipped


def np_surrogate_grad_per_token(logps, old_logps, adv, eps, eps_high=None, dual=None):
    """d loss / d logps per element: ``-A r`` where the unclipped term is active, else 0."""
    logps, old_logps, adv = _f64(logps, old_logps, adv)
    high = eps if eps_high is None else eps_high
    r = np.exp(logps - old_logps)
    active = ((adv > 0) & (r < 1 + high)) | ((adv < 0) & (r > 1 - eps))
    if dual is not None:
        active = active & ~((adv < 0) & (r > dual))
    return np.where(active, -adv * r, 0.0)


def np_surrogate_loss(logps, old_logps, adv, mask, eps, eps_high=None, dual=None, normalizer=None):
    loss, r, clipped = np_surrogate_per_token(logps, old_logps, adv, eps, eps_high, dual)
    logr = np.log(r)
    valid = np.ones(r.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if normalizer is None:
        value = np_masked_mean(loss, mask)
    else:
        value = float(loss[valid].sum() / normalizer)
    metrics = {
        "policy/clipfrac": np_masked_mean(clipped.astype(np.float64), mask),
        "policy/approxkl": np_masked_mean(0.5 * logr**2, mask),
        "policy/approxkl_k3": np_masked_mean(r - 1 - logr, mask),
        "policy/ratio": np_masked_mean(r, mask),
        "policy/ratio_max": float(r[valid].max()) if valid.any() else -np.inf,
        "count": np_count(r.shape, mask),
    }
    return value, metrics


def np_value_loss(values, old_values, returns, mask, eps, normalizer=None):
    values, old_values, returns = _f64(values, old_values, returns)
    err = (values - returns) ** 2
    if eps is None:
        per = 0.5 * err
        clipped = np.zeros(err.shape, bool)
    else:
        move = values - old_values
        v_clip = np.where(move > eps, old_values + eps, values)
        v_clip = np.where(move < -eps, old_values - eps, v_clip)
        err_clip = (v_clip - returns) ** 2
        per = 0.5 * np.maximum(err, err_clip)
        clipped = err_clip > err
    valid = np.ones(err.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    value = (
        np_masked_mean(per, mask) if normalizer is None else float(per[valid].sum() / normalizer)
    )
    metrics = {
        "val/clipfrac": np_masked_mean(clipped.astype(np.float64), mask),
        "val/vpred": np_masked_mean(values, mask),
        "val/error": np_masked_mean(err, mask),
        "count": np_count(err.shape, mask),
    }
    return value, metrics


def np_value_grad_per_token(values, old_values, returns, eps):
    values, old_values, returns = _f64(values, old_values, returns)
    if eps is None:
        return values - returns
    move = values - old_values
    v_clip = np.clip(values, old_values - eps, old_values + eps)
    use_clipped = (v_clip - returns) ** 2 > (values - returns) ** 2
    return np.where(use_clipped & (np.abs(move) > eps), 0.0, values - returns)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _away_from(x, boundaries, margin=3e-3):
    for b in boundaries:
        x = np.where(np.abs(x - b) < margin, b + 2 * margin, x)
    return x


def make_policy_data(seed, shape, dtype=np.float64, mask_kind="random"):
    """logps, old_logps, advantages, mask with ratios spread over every clip region."""
    rng = np.random.default_rng(seed)
    lo = np.array([0.3, 0.72, 0.82, 0.92, 1.12, 1.22, 1.32, 2.1, 3.1])
    hi = np.array([0.68, 0.78, 0.88, 1.08, 1.18, 1.26, 1.9, 2.9, 5.0])
    region = rng.integers(0, len(lo), shape)
    ratio = _away_from(rng.uniform(lo[region], hi[region]), RATIO_BOUNDARIES)
    old_logps = rng.normal(-2.0, 1.0, shape)
    logps = old_logps + np.log(ratio)
    adv = rng.normal(0.0, 1.5, shape)
    adv = np.where(rng.random(shape) < 0.1, 0.0, adv)  # exercise A == 0
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool":
        mask = rng.random(shape) < 0.7
    else:
        mask = (rng.random(shape) < 0.7).astype(dtype)
    # round to the test dtype first: the reference sees exactly what the library sees
    return (*(np.asarray(x, dtype) for x in (logps, old_logps, adv)), mask)


def make_value_data(seed, shape, dtype=np.float64, eps_values=(0.1, 0.2, 0.3)):
    rng = np.random.default_rng(seed)
    old = rng.normal(0.0, 1.0, shape)
    move = rng.uniform(-0.6, 0.6, shape)
    move = _away_from(move, [s * e for e in eps_values for s in (-1, 1)] + [0.0])
    # half of the returns lie beyond the moved value (there the clipped error is the larger
    # one whenever |move| > eps), the rest anywhere
    beyond = old + move * rng.uniform(1.5, 3.0, shape)
    returns = np.where(rng.random(shape) < 0.5, beyond, rng.normal(0.0, 1.0, shape))
    mask = (rng.random(shape) < 0.7).astype(dtype)
    # Multiples of 2**-12 below 8 in size are exact in float32, so ``old + (values - old)``
    # is exactly ``values`` in any precision. (With general float32 data it may be off by an
    # ulp, which the library counts as clipping: see test_value_clipfrac_float32_rounding.)
    old, move, returns = (np.round(x * 4096) / 4096 for x in (old, move, returns))
    return (*(np.asarray(x, dtype) for x in (old + move, old, returns)), mask)


def assert_metrics(metrics, expected, dtype=np.float64):
    assert set(metrics) >= set(expected), sorted(set(expected) - set(metrics))
    for key, value in expected.items():
        got = np.asarray(metrics[key])
        assert got.shape == (), key
        if key in ("policy/clipfrac", "val/clipfrac", "count"):
            # counting metrics: exact up to the float rounding of k / n
            np.testing.assert_allclose(got, value, rtol=1e-6, atol=0, err_msg=key)
        else:
            np.testing.assert_allclose(got, value, **TOL[np.dtype(dtype)], err_msg=key)


def assert_loss_and_metrics(got, want, dtype):
    """``got = (loss, metrics)`` matches the reference's ``want``, with the same metric names."""
    (loss, metrics), (ref, ref_metrics) = got, want
    assert_close(loss, ref, dtype)
    assert_metrics(metrics, ref_metrics, dtype)
    assert set(metrics) == set(ref_metrics)


def clip_args(clip):
    """``(clip_eps, clip_eps_high, dual_clip)`` of a :data:`CLIPS` entry."""
    return clip["eps"], clip.get("eps_high"), clip.get("dual")


def clip_kwargs(clip):
    return dict(zip(("clip_eps", "clip_eps_high", "dual_clip"), clip_args(clip), strict=True))


# ---------------------------------------------------------------------------------------------
# clipped surrogate: values and metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(
    "clip",
    [*CLIPS, pytest.param(dict(eps=0.1, eps_high=0.3, dual=3.0), id="asym_dual")],
)
@settings(max_examples=6)
@given(seed=seed_st, shape=shape_st, dtype=dtype_st)
def test_per_token_matches_reference(transform, clip, seed, shape, dtype):
    logps, old, adv, _ = make_policy_data(seed, shape, dtype)
    fn = transform(functools.partial(clipped_surrogate_per_token, **clip_kwargs(clip)))
    loss, ratio, clipped = fn(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv))
    ref_loss, ref_ratio, ref_clipped = np_surrogate_per_token(logps, old, adv, *clip_args(clip))
    chex.assert_shape([loss, ratio, clipped], shape)
    assert_close(loss, ref_loss, dtype)
    assert_close(ratio, ref_ratio, dtype)
    assert np.asarray(clipped).dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(clipped), ref_clipped.astype(dtype))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(
    "clip",
    [*CLIPS, pytest.param(dict(eps=0.1, eps_high=0.3, dual=2.0), id="asym_dual")],
)
@settings(max_examples=6)
@given(
    seed=seed_st,
    shape=shape_st,
    dtype=dtype_st,
    mask_kind=st.sampled_from(["random", "bool"]),
)
def test_surrogate_loss_and_metrics(transform, clip, seed, shape, dtype, mask_kind):
    logps, old, adv, mask = make_policy_data(seed, shape, dtype, mask_kind)
    fn = transform(functools.partial(clipped_surrogate_loss, **clip_kwargs(clip)))
    args = [jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv)]
    loss, metrics = fn(*args, None if mask is None else jnp.asarray(mask))
    ref, ref_metrics = np_surrogate_loss(logps, old, adv, mask, *clip_args(clip))
    assert_loss_and_metrics((loss, metrics), (ref, ref_metrics), dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_surrogate_defaults_and_no_mask_equals_all_ones_mask(transform):
    logps, old, adv, _ = make_policy_data(3, (3, 4))
    args = [jnp.asarray(x) for x in (logps, old, adv)]
    loss, metrics = transform(clipped_surrogate_loss)(*args)  # clip_eps=0.2, no dual clip
    ref, ref_metrics = np_surrogate_loss(logps, old, adv, None, 0.2)
    assert_close(loss, ref)
    assert_metrics(metrics, ref_metrics)
    loss_ones, _ = clipped_surrogate_loss(*args, jnp.ones((3, 4)))
    assert_close(loss_ones, ref)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_surrogate_all_masked(transform):
    logps, old, adv, _ = make_policy_data(4, (3, 4))
    args = [jnp.asarray(x) for x in (logps, old, adv)]
    loss, metrics = transform(clipped_surrogate_loss)(*args, jnp.zeros((3, 4)))
    assert float(loss) == 0.0
    assert float(metrics["count"]) == 0.0
    assert float(metrics["policy/clipfrac"]) == 0.0
    assert float(metrics["policy/ratio_max"]) == 0.0  # finite, so averages over steps stay finite


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_surrogate_ignores_garbage_at_padding(transform):
    """nan / huge values at padded positions change neither the loss nor the metrics."""
    logps, old, adv, mask = make_policy_data(5, (3, 4))
    mask[0, 0], mask[1, 2], mask[2, 3] = 0, 0, 0
    ref, ref_metrics = np_surrogate_loss(logps, old, adv, mask, 0.2, None, 3.0)
    bad_logps, bad_adv = logps.copy(), adv.copy()
    bad_logps[0, 0], bad_adv[1, 2], bad_logps[2, 3] = np.nan, np.nan, 60.0
    fn = transform(functools.partial(clipped_surrogate_loss, dual_clip=3.0))
    loss, metrics = fn(jnp.asarray(bad_logps), jnp.asarray(old), jnp.asarray(bad_adv), mask)
    assert_close(loss, ref)
    assert_metrics(metrics, ref_metrics)


def _halves(*arrays):
    """Split a [3, 4] batch into two [6] micro-batches (a [B] batch of 12 rows, cut in two).

    Reusing the [6] and [3, 4] shapes of the other tests keeps un-jitted runs fast."""
    flat = [np.asarray(x).reshape(12) for x in arrays]
    return [x[:6] for x in flat], [x[6:] for x in flat]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_surrogate_normalizer_microbatches_add_up(transform):
    """Two micro-batches with normalizer = global valid count sum to the full-batch loss."""
    logps, old, adv, mask = make_policy_data(61, (3, 4))
    fn = transform(functools.partial(clipped_surrogate_loss, clip_eps=0.2, dual_clip=3.0))
    full, _ = fn(*(jnp.asarray(x) for x in (logps, old, adv, mask)))
    assert_close(full, np_surrogate_loss(logps, old, adv, mask, 0.2, None, 3.0)[0])
    n = float(mask.sum())
    parts, grads = [], []
    for batch in _halves(logps, old, adv, mask):
        loss, metrics = fn(*batch, normalizer=jnp.asarray(n))
        # with an explicit normalizer the loss is the masked sum over that constant
        assert_close(loss, np_surrogate_loss(*batch, 0.2, None, 3.0, normalizer=n)[0])
        # metrics stay local means / counts
        assert float(metrics["count"]) == batch[3].sum() > 0
        g = jax.grad(lambda lp, b=batch: fn(lp, *b[1:], normalizer=n)[0])(jnp.asarray(batch[0]))
        parts.append(loss)
        grads.append(g)
    assert_close(parts[0] + parts[1], full)
    full_grad = jax.grad(lambda lp: fn(lp, *(jnp.asarray(x) for x in (old, adv, mask)))[0])(
        jnp.asarray(logps)
    )
    assert_close(jnp.concatenate(grads).reshape(3, 4), full_grad)


# ---------------------------------------------------------------------------------------------
# clipped surrogate: gradients
# ---------------------------------------------------------------------------------------------

GRAD_CASES = [
    # (advantage, ratio, clip kwargs, gradient is zero?)
    pytest.param(1.5, 1.5, dict(clip_eps=0.2), True, id="A>0,r>1+eps:zero"),
    pytest.param(1.5, 0.5, dict(clip_eps=0.2), False, id="A>0,r<1-eps:flows"),
    pytest.param(1.5, 1.05, dict(clip_eps=0.2), False, id="A>0,inside:flows"),
    pytest.param(1.5, 0.95, dict(clip_eps=0.2), False, id="A>0,inside_low:flows"),
    pytest.param(-1.5, 0.5, dict(clip_eps=0.2), True, id="A<0,r<1-eps:zero"),
    pytest.param(-1.5, 1.5, dict(clip_eps=0.2), False, id="A<0,r>1+eps:flows"),
    pytest.param(-1.5, 1.05, dict(clip_eps=0.2), False, id="A<0,inside:flows"),
    pytest.param(-1.5, 0.95, dict(clip_eps=0.2), False, id="A<0,inside_low:flows"),
    # clip-higher: the high bound applies to A > 0 ...
    pytest.param(1.5, 1.25, dict(clip_eps=0.2, clip_eps_high=0.28), False, id="asym:A>0,r=1.25"),
    pytest.param(1.5, 1.3, dict(clip_eps=0.2, clip_eps_high=0.28), True, id="asym:A>0,r=1.3"),
    pytest.param(1.5, 0.85, dict(clip_eps=0.1, clip_eps_high=0.3), False, id="asym:A>0,r=.85"),
    # ... and the low bound to A < 0
    pytest.param(-1.5, 0.85, dict(clip_eps=0.1, clip_eps_high=0.3), True, id="asym:A<0,r=.85"),
    pytest.param(-1.5, 0.75, dict(clip_eps=0.2, clip_eps_high=0.28), True, id="asym:A<0,r=.75"),
    pytest.param(-1.5, 0.85, dict(clip_eps=0.2, clip_eps_high=0.28), False, id="asym:A<0,r=.85"),
    pytest.param(-1.5, 1.25, dict(clip_eps=0.2, clip_eps_high=0.28), False, id="asym:A<0,r=1.25"),
    # dual clip c = 3 bounds the loss for A < 0 only
    pytest.param(-1.5, 3.5, dict(clip_eps=0.2, dual_clip=3.0), True, id="dual:A<0,r>c:zero"),
    pytest.param(-1.5, 2.5, dict(clip_eps=0.2, dual_clip=3.0), False, id="dual:A<0,1+eps<r<c"),
    pytest.param(-1.5, 0.5, dict(clip_eps=0.2, dual_clip=3.0), True, id="dual:A<0,r<1-eps"),
    pytest.param(1.5, 3.5, dict(clip_eps=0.2, dual_clip=3.0), True, id="dual:A>0,r>c"),
    pytest.param(1.5, 0.5, dict(clip_eps=0.2, dual_clip=3.0), False, id="dual:A>0,r<1-eps"),
    pytest.param(0.0, 1.05, dict(clip_eps=0.2, dual_clip=3.0), True, id="A=0"),
]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(("adv", "ratio", "clip", "zero"), GRAD_CASES)
def test_surrogate_gradient_cases(transform, adv, ratio, clip, zero):
    """Five valid copies of one (A, ratio) case plus a padded position; count = 5."""
    old = np.array([-1.0, -2.0, -0.5, -1.5, -3.0, -0.1])
    logps = old + np.log(ratio)
    advs = np.full(6, adv)
    mask = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    fn = transform(jax.grad(functools.partial(_surrogate_value, **clip)))
    grad = np.asarray(fn(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(advs), mask))
    expected = np.zeros(6) if zero else np.array([-adv * ratio / 5] * 5 + [0])
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-15)
    if not zero:
        assert np.all(np.sign(grad[:5]) == -np.sign(adv))  # descending raises ratio iff A > 0


def check_gradients(grads, analytic, numeric):
    """``grads`` of a loss in (the input, two data arrays): the first matches the analytic
    gradient and central differences of the numpy reference (truncation ~h^2 and round-off
    ~1e-16/h), the data get exactly 0."""
    np.testing.assert_allclose(grads[0], analytic, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(grads[0], numeric, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(grads[1], np.zeros(np.shape(analytic)))
    np.testing.assert_array_equal(grads[2], np.zeros(np.shape(analytic)))


def _surrogate_value(logps, old_logps, adv, mask, **clip):
    return clipped_surrogate_loss(logps, old_logps, adv, mask, **clip)[0]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("clip", CLIPS)
@settings(max_examples=4)
@given(seed=seed_st, shape=shape_st)
def test_surrogate_gradient_vs_reference_and_finite_differences(transform, clip, seed, shape):
    logps, old, adv, mask = make_policy_data(seed, shape)
    eps, high, dual = clip_args(clip)
    fn = functools.partial(_surrogate_value, clip_eps=eps, clip_eps_high=high, dual_clip=dual)
    grads = transform(jax.grad(fn, argnums=(0, 1, 2)))(
        *(jnp.asarray(x) for x in (logps, old, adv)), jnp.asarray(mask)
    )
    count = max(mask.sum(), 1.0)
    analytic = np_surrogate_grad_per_token(logps, old, adv, eps, high, dual) * mask / count
    numeric = finite_diff(
        lambda lp: np_surrogate_loss(lp, old, adv, mask, eps, high, dual)[0], logps
    )
    # old log-probs and advantages are data
    check_gradients(grads, analytic, numeric)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_per_token_no_gradient_to_old_logps_or_advantages(transform):
    logps, old, adv, _ = make_policy_data(11, (3, 4))

    def total(lp, o, a):
        loss, _, _ = clipped_surrogate_per_token(lp, o, a, 0.2, 0.28, 3.0)
        return jnp.sum(loss * jnp.arange(1.0, 13.0).reshape(3, 4))

    grads = transform(jax.grad(total, argnums=(0, 1, 2)))(
        *(jnp.asarray(x) for x in (logps, old, adv))
    )
    assert np.any(np.asarray(grads[0]) != 0)
    np.testing.assert_array_equal(grads[1], np.zeros((3, 4)))
    np.testing.assert_array_equal(grads[2], np.zeros((3, 4)))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_surrogate_metrics_carry_no_gradient(transform):
    logps, old, adv, mask = make_policy_data(12, (3, 4))
    for key in ("policy/approxkl", "policy/approxkl_k3", "policy/ratio", "policy/ratio_max"):
        g = transform(jax.grad(lambda lp, k=key: clipped_surrogate_loss(lp, old, adv, mask)[1][k]))(
            jnp.asarray(logps)
        )
        np.testing.assert_array_equal(g, np.zeros((3, 4)), err_msg=key)


# ---------------------------------------------------------------------------------------------
# value loss, entropy bonus
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("eps", [0.2, 0.1, None])
@settings(max_examples=6)
@given(seed=seed_st, shape=shape_st, dtype=dtype_st)
def test_value_loss_matches_reference(transform, eps, seed, shape, dtype):
    values, old, returns, mask = make_value_data(seed, shape, dtype)
    fn = transform(functools.partial(clipped_value_loss, clip_eps=eps))
    loss, metrics = fn(*(jnp.asarray(x) for x in (values, old, returns, mask)))
    ref, ref_metrics = np_value_loss(values, old, returns, mask, eps)
    assert_loss_and_metrics((loss, metrics), (ref, ref_metrics), dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_value_loss_defaults_and_unclipped_case(transform):
    values, old, returns, _ = make_value_data(1, (3, 4))
    fn = transform(clipped_value_loss)
    loss, metrics = fn(*(jnp.asarray(x) for x in (values, old, returns)))
    ref, ref_metrics = np_value_loss(values, old, returns, None, 0.2)  # default clip_eps=0.2
    assert_close(loss, ref)
    assert_metrics(metrics, ref_metrics)
    assert float(metrics["val/clipfrac"]) > 0  # the data does move some values beyond 0.2
    plain, plain_metrics = transform(functools.partial(clipped_value_loss, clip_eps=None))(
        *(jnp.asarray(x) for x in (values, old, returns))
    )
    assert_close(plain, 0.5 * np.mean((values - returns) ** 2))
    assert float(plain_metrics["val/clipfrac"]) == 0.0


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_value_clipfrac_float32_rounding(transform):
    """A value that moved less than eps is not clipped and must not count in val/clipfrac.

    Here |V - V_old| = 0.157 < 0.2, but in float32 ``V_old + (V - V_old)`` rounds to one ulp
    away from V, the "clipped" error comes out 1.5e-8 larger than the unclipped one, and a
    ``error_clipped > error`` test counts the position as clipped.
    """
    values = jnp.asarray([0.21527608, 0.5], jnp.float32)
    old_values = jnp.asarray([0.058284767, 0.0], jnp.float32)
    returns = jnp.asarray([0.4752694, 1.0], jnp.float32)  # second position: really clipped
    loss, metrics = transform(clipped_value_loss)(values, old_values, returns, clip_eps=0.2)
    ref, ref_metrics = np_value_loss(values, old_values, returns, None, 0.2)
    assert_close(loss, ref, np.float32)
    assert ref_metrics["val/clipfrac"] == 0.5
    assert float(metrics["val/clipfrac"]) == 0.5


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("eps", [0.2, None])
@settings(max_examples=5)
@given(seed=seed_st, shape=shape_st)
def test_value_loss_gradient(transform, eps, seed, shape):
    values, old, returns, mask = make_value_data(seed, shape)
    fn = lambda v, o, r: clipped_value_loss(v, o, r, jnp.asarray(mask), clip_eps=eps)[0]
    grads = transform(jax.grad(fn, argnums=(0, 1, 2)))(
        *(jnp.asarray(x) for x in (values, old, returns))
    )
    count = max(mask.sum(), 1.0)
    analytic = np_value_grad_per_token(values, old, returns, eps) * mask / count
    numeric = finite_diff(lambda v: np_value_loss(v, old, returns, mask, eps)[0], values)
    # old values and returns are data
    check_gradients(grads, analytic, numeric)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_value_loss_normalizer_microbatches_add_up(transform):
    values, old, returns, mask = make_value_data(21, (3, 4))
    n = float(mask.sum())
    fn = transform(functools.partial(clipped_value_loss, clip_eps=0.2))
    full, _ = fn(*(jnp.asarray(x) for x in (values, old, returns, mask)))
    first, second = _halves(values, old, returns, mask)
    a, _ = fn(*first, normalizer=n)
    b, _ = fn(*second, normalizer=n)
    assert_close(a + b, full)
    assert_close(a, np_value_loss(*first, 0.2, n)[0])


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("shape", [(6,), (3, 4)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_entropy_bonus(transform, shape, dtype):
    rng = np.random.default_rng(7)
    ent = rng.uniform(0.0, 3.0, shape).astype(dtype)
    mask = (rng.random(shape) < 0.6).astype(dtype)
    mask.flat[0] = 1
    fn = transform(entropy_bonus)
    assert_close(fn(jnp.asarray(ent), jnp.asarray(mask)), np_masked_mean(ent, mask), dtype)
    assert_close(fn(jnp.asarray(ent)), np.mean(ent.astype(np.float64)), dtype)
    n = 17.0
    assert_close(
        fn(jnp.asarray(ent), jnp.asarray(mask), jnp.asarray(n, dtype)),
        ent.astype(np.float64)[mask.astype(bool)].sum() / n,
        dtype,
    )


# ---------------------------------------------------------------------------------------------
# combined loss
# ---------------------------------------------------------------------------------------------


def _ppo_data(seed, shape, dtype=np.float64):
    logps, old, adv, mask = make_policy_data(seed, shape, dtype)
    values, old_values, returns, _ = make_value_data(seed + 1, shape, dtype)
    ent = np.random.default_rng(seed + 2).uniform(0.0, 2.0, shape).astype(dtype)
    return logps, old, adv, values, old_values, returns, ent, mask


# ppo_loss's hyper-parameters, in np_ppo_loss's order
PPO_HYPERPARAMETERS = (
    "clip_eps",
    "clip_eps_high",
    "dual_clip",
    "value_clip_eps",
    "value_coef",
    "entropy_coef",
    "normalizer",
)


def np_ppo_loss(data, clip_eps, clip_eps_high, dual_clip, value_clip_eps, vc, ec, normalizer):
    logps, old, adv, values, old_values, returns, ent, mask = data
    pol, pm = np_surrogate_loss(
        logps, old, adv, mask, clip_eps, clip_eps_high, dual_clip, normalizer
    )
    val, vm = np_value_loss(values, old_values, returns, mask, value_clip_eps, normalizer)
    valid = mask.astype(bool)
    if normalizer is None:
        bonus = np_masked_mean(ent, mask)
    else:
        bonus = float(ent.astype(np.float64)[valid].sum() / normalizer)
    total = pol + vc * val - ec * bonus
    metrics = {**pm, **vm, "policy/entropy": bonus}
    metrics.update({"loss/policy": pol, "loss/value": val, "loss/total": total})
    return total, metrics


PPO_CONFIGS = [
    pytest.param(
        dict(clip_eps=0.2, value_clip_eps=0.2, value_coef=0.5, entropy_coef=0.01), id="std"
    ),
    pytest.param(
        dict(
            clip_eps=0.2,
            clip_eps_high=0.28,
            dual_clip=3.0,
            value_clip_eps=None,
            value_coef=1.0,
            entropy_coef=0.1,
        ),
        id="asym_dual_noclipv",
    ),
]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("config", PPO_CONFIGS)
@settings(max_examples=4)
@given(seed=st.integers(0, 2**30), shape=shape_st, dtype=dtype_st, use_norm=st.booleans())
def test_ppo_loss_matches_reference(transform, config, seed, shape, dtype, use_norm):
    data = _ppo_data(seed, shape, dtype)
    normalizer = 11.0 if use_norm else None
    fn = transform(functools.partial(ppo_loss, **config, normalizer=normalizer))
    loss, metrics = fn(*(jnp.asarray(x) for x in data))
    ref, ref_metrics = np_ppo_loss(
        data,
        config["clip_eps"],
        config.get("clip_eps_high"),
        config.get("dual_clip"),
        config["value_clip_eps"],
        config["value_coef"],
        config["entropy_coef"],
        normalizer,
    )
    assert_loss_and_metrics((loss, metrics), (ref, ref_metrics), dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_ppo_loss_without_entropy_and_defaults(transform):
    data = _ppo_data(31, (3, 4))
    logps, old, adv, values, old_values, returns, _, mask = data
    loss, metrics = transform(ppo_loss)(
        *(jnp.asarray(x) for x in (logps, old, adv, values, old_values, returns)),
        None,
        jnp.asarray(mask),
    )
    # defaults: clip_eps=0.2, value_clip_eps=0.2, value_coef=0.5, entropy_coef=0
    pol, _ = np_surrogate_loss(logps, old, adv, mask, 0.2)
    val, _ = np_value_loss(values, old_values, returns, mask, 0.2)
    assert_close(loss, pol + 0.5 * val)
    assert "policy/entropy" not in metrics
    assert_close(metrics["loss/total"], pol + 0.5 * val)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_ppo_loss_gradients(transform):
    data = _ppo_data(41, (3, 4))
    mask = data[-1]
    kw = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, value_clip_eps=0.2)
    coefs = dict(value_coef=0.7, entropy_coef=0.05)

    def fn(*arrays):
        return ppo_loss(*arrays, jnp.asarray(mask), **kw, **coefs)[0]

    grads = transform(jax.grad(fn, argnums=tuple(range(7))))(*(jnp.asarray(x) for x in data[:-1]))
    ref = lambda d: np_ppo_loss(d, 0.2, 0.28, 3.0, 0.2, 0.7, 0.05, None)[0]
    for i in (0, 3, 6):  # logps, values, entropy receive gradients
        numeric = finite_diff(lambda x, i=i: ref((*data[:i], x, *data[i + 1 :])), data[i])
        np.testing.assert_allclose(grads[i], numeric, rtol=1e-6, atol=1e-9, err_msg=str(i))
        assert np.any(np.asarray(grads[i]) != 0)
    np.testing.assert_allclose(grads[6], -0.05 * mask / mask.sum(), rtol=1e-10)
    for i in (1, 2, 4, 5):  # old_logps, advantages, old_values, returns are data
        np.testing.assert_array_equal(grads[i], np.zeros((3, 4)), err_msg=str(i))


# ---------------------------------------------------------------------------------------------
# traced hyper-parameters: one trace serves every value
# ---------------------------------------------------------------------------------------------


def test_surrogate_traced_hyperparameters_do_not_retrace():
    logps, old, adv, mask = make_policy_data(51, (3, 4))
    fn, traces = count_traces(clipped_surrogate_loss)
    fn = jax.jit(fn)
    arrays = [jnp.asarray(x) for x in (logps, old, adv, mask)]
    for eps, high, dual, norm in [
        (0.2, 0.28, 3.0, 9.0),
        (0.1, 0.3, 2.0, 5.0),
        (0.3, 0.3, 4.0, 7.0),
    ]:
        loss, metrics = fn(*arrays, eps, high, dual, norm)
        ref, ref_metrics = np_surrogate_loss(logps, old, adv, mask, eps, high, dual, norm)
        assert_close(loss, ref)
        assert_metrics(metrics, ref_metrics)
        # the same values passed as arrays hit the same trace too
        loss2, _ = fn(*arrays, *(jnp.asarray(v) for v in (eps, high, dual, norm)))
        assert_close(loss2, ref)
    assert len(traces) == 1


def test_value_loss_traced_clip_does_not_retrace():
    values, old, returns, mask = make_value_data(52, (3, 4))
    fn, traces = count_traces(clipped_value_loss)
    fn = jax.jit(fn)
    for eps in (0.1, 0.2, 0.3):
        loss, metrics = fn(*(jnp.asarray(x) for x in (values, old, returns, mask)), eps)
        ref, ref_metrics = np_value_loss(values, old, returns, mask, eps)
        assert_close(loss, ref)
        assert_metrics(metrics, ref_metrics)
    assert len(traces) == 1


def test_ppo_loss_traced_hyperparameters_do_not_retrace():
    data = _ppo_data(53, (3, 4))
    fn, traces = count_traces(lambda arrays, hp: ppo_loss(*arrays, **hp))
    fn = jax.jit(fn)
    arrays = tuple(jnp.asarray(x) for x in data)
    settings_list = [
        (0.2, 0.28, 3.0, 0.2, 0.5, 0.01, 10.0),
        (0.1, 0.3, 2.0, 0.3, 1.0, 0.1, 6.0),
        (0.3, 0.3, 4.0, 0.1, 0.25, 0.0, 12.0),
    ]
    for values in settings_list:
        hp = dict(zip(PPO_HYPERPARAMETERS, values, strict=True))
        loss, metrics = fn(arrays, {k: jnp.asarray(v) for k, v in hp.items()})
        ref, ref_metrics = np_ppo_loss(data, *values)
        assert_close(loss, ref)
        assert_metrics(metrics, ref_metrics)
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(clip_eps=-0.1), dict(clip_eps_high=-0.2), dict(dual_clip=1.0), dict(dual_clip=0.5)],
)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_invalid_clip_arguments_raise(transform, kwargs):
    """Python-number hyper-parameters are checked (under jit: at trace time)."""
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError):
        transform(functools.partial(clipped_surrogate_per_token, **kwargs))(x, x, x)
    with pytest.raises(ValueError):
        transform(functools.partial(clipped_surrogate_loss, **kwargs))(x, x, x)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_shape_mismatch_raises(transform):
    with pytest.raises(AssertionError):
        transform(clipped_surrogate_loss)(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((3, 2)))
    with pytest.raises(AssertionError):
        transform(clipped_value_loss)(jnp.zeros((2, 3)), jnp.zeros((2,)), jnp.zeros((2, 3)))
