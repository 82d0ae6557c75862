"""Tests of the TRPO objectives :func:`rljax.trpo.surrogate_objective` and
:func:`rljax.trpo.mean_kl` against independent float64 numpy references.

The Gaussian KL reference uses the general multivariate formula with explicit covariance
matrices and ``numpy.linalg`` (trace, inverse, log-determinant), not the per-dimension sum
the library uses; the categorical reference normalises probabilities explicitly.

Tolerances: float64 to 1e-10 relative. float32 inputs are compared with the float64 reference
evaluated on the same float32-rounded inputs to 1e-5 relative, with an absolute floor of 1e-6:
a KL (or a mean of advantages of both signs) near 0 is a difference of O(1) terms, each
rounded to ~6e-8 in float32, so its absolute, not relative, error is what is bounded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TRANSFORMS,
    assert_close,
    dtype_st,
    finite_diff,
    np_gaussian_kl,
    np_probs,
    seed_st,
    shape_st,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.trpo import mean_kl, surrogate_objective


def np_masked_mean(x, mask, normalizer=None):
    x = np.asarray(x, np.float64)
    valid = np.ones(x.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if normalizer is not None:
        return float(x[valid].sum() / normalizer)
    return float(x[valid].mean()) if valid.any() else 0.0


def make_mask(rng, shape, dtype=np.float64):
    mask = (rng.random(shape) < 0.7).astype(dtype)
    mask.flat[0] = 1
    return mask


# ---------------------------------------------------------------------------------------------
# surrogate objective
# ---------------------------------------------------------------------------------------------


def np_surrogate(logps, old_logps, adv, mask, normalizer=None):
    logps, old_logps, adv = (np.asarray(x, np.float64) for x in (logps, old_logps, adv))
    ratio = np.exp(logps - old_logps)
    return np_masked_mean(ratio * adv, mask, normalizer), {
        "surrogate": np_masked_mean(ratio * adv, mask, normalizer),
        "ratio": np_masked_mean(ratio, mask),
        "count": float(np.prod(ratio.shape) if mask is None else np.asarray(mask).sum()),
    }


def make_surrogate_data(seed, shape, dtype=np.float64):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 1.0, shape)
    logps = old + rng.normal(0.0, 0.3, shape)
    adv = rng.normal(0.0, 1.0, shape)
    return (*(x.astype(dtype) for x in (logps, old, adv)), make_mask(rng, shape, dtype))


@pytest.mark.parametrize("transform", TRANSFORMS)
@settings(max_examples=6)
@given(seed=seed_st, shape=shape_st, dtype=dtype_st, use_mask=st.booleans(), use_norm=st.booleans())
def test_surrogate_matches_reference(transform, seed, shape, dtype, use_mask, use_norm):
    logps, old, adv, mask = make_surrogate_data(seed, shape, dtype)
    mask = mask if use_mask else None
    normalizer = 13.0 if use_norm else None
    fn = transform(functools.partial(surrogate_objective, normalizer=normalizer))
    value, metrics = fn(*(jnp.asarray(x) for x in (logps, old, adv)), mask)
    ref, ref_metrics = np_surrogate(logps, old, adv, mask, normalizer)
    assert_close(value, ref, dtype)
    assert set(metrics) == set(ref_metrics)
    for key, expected in ref_metrics.items():
        assert_close(metrics[key], expected, dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
@settings(max_examples=6)
@given(seed=seed_st, shape=shape_st)
def test_surrogate_gradient_is_policy_gradient_at_old_policy(transform, seed, shape):
    """At logps == old_logps, d L / d logps = A * mask / count (the masked-mean policy gradient)."""
    _, old, adv, mask = make_surrogate_data(seed, shape)
    grad_fn = transform(
        jax.grad(lambda lp, o, a, m: surrogate_objective(lp, o, a, m)[0], (0, 1, 2))
    )
    grads = grad_fn(*(jnp.asarray(x) for x in (old, old, adv, mask)))
    np.testing.assert_allclose(grads[0], adv * mask / mask.sum(), rtol=1e-10, atol=1e-300)
    # old log-probs and advantages are data
    np.testing.assert_array_equal(grads[1], np.zeros(shape))
    np.testing.assert_array_equal(grads[2], np.zeros(shape))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_surrogate_gradient_away_from_old_policy(transform):
    logps, old, adv, mask = make_surrogate_data(3, (3, 4))
    n = 9.0
    grad_fn = transform(
        jax.grad(lambda lp, o, a, m: surrogate_objective(lp, o, a, m, normalizer=n)[0])
    )
    grad = grad_fn(*(jnp.asarray(x) for x in (logps, old, adv, mask)))
    np.testing.assert_allclose(grad, np.exp(logps - old) * adv * mask / n, rtol=1e-10)
    numeric = finite_diff(lambda lp: np_surrogate(lp, old, adv, mask, n)[0], logps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_surrogate_normalizer_microbatches_add_up(transform):
    logps, old, adv, mask = make_surrogate_data(4, (3, 4))
    fn = transform(surrogate_objective)
    full, _ = fn(*(jnp.asarray(x) for x in (logps, old, adv, mask)))
    n = jnp.asarray(mask.sum())
    # two [6] micro-batches of the flattened [3, 4] batch (shapes shared with other tests)
    flat = [x.reshape(12) for x in (logps, old, adv, mask)]
    a, _ = fn(*(x[:6] for x in flat), normalizer=n)
    b, _ = fn(*(x[6:] for x in flat), normalizer=n)
    assert_close(a + b, full)
    assert_close(full, np_surrogate(logps, old, adv, mask)[0])


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_surrogate_ignores_padding_garbage_and_all_masked(transform):
    logps, old, adv, mask = make_surrogate_data(5, (3, 4))
    mask[1, 1] = 0
    bad = logps.copy()
    bad[1, 1] = np.nan
    value, metrics = transform(surrogate_objective)(bad, old, adv, mask)
    ref, ref_metrics = np_surrogate(logps, old, adv, mask)
    assert_close(value, ref)
    assert_close(metrics["ratio"], ref_metrics["ratio"])
    value, metrics = transform(surrogate_objective)(logps, old, adv, np.zeros((3, 4)))
    assert float(value) == 0.0 and float(metrics["count"]) == 0.0


def test_surrogate_traced_normalizer_does_not_retrace():
    logps, old, adv, mask = make_surrogate_data(6, (3, 4))
    traces = []

    @jax.jit
    def fn(lp, o, a, m, normalizer):
        traces.append(1)
        return surrogate_objective(lp, o, a, m, normalizer)

    for n in (5.0, 8.0, 20.0):
        value, _ = fn(logps, old, adv, mask, n)
        assert_close(value, np_surrogate(logps, old, adv, mask, n)[0])
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------------
# mean KL
# ---------------------------------------------------------------------------------------------


def np_categorical_kl(p_logits, q_logits):
    p, q = np_probs(p_logits), np_probs(q_logits)
    return np.sum(p * np.log(p / q), axis=-1)


def make_outputs(rng, kind, positions, dtype=np.float64, size=3):
    """Policy outputs over ``positions`` for kind: categorical / gauss_shared / gauss_full."""
    if kind == "categorical":
        return rng.normal(0.0, 1.5, (*positions, size)).astype(dtype)
    mean = rng.normal(0.0, 1.0, (*positions, size)).astype(dtype)
    log_std_shape = (size,) if kind == "gauss_shared" else (*positions, size)
    return mean, rng.normal(-0.3, 0.4, log_std_shape).astype(dtype)


def perturb(rng, outputs, scale=0.3):
    return jax.tree.map(lambda x: (x + scale * rng.normal(size=x.shape)).astype(x.dtype), outputs)


def kl_case(seed, kind, positions=(3, 4), dtype=np.float64):
    """``(old, new, mask)``: outputs of ``kind`` over ``positions``, a perturbation of them and a
    mask, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    old = make_outputs(rng, kind, positions, dtype)
    return old, perturb(rng, old), make_mask(rng, positions, dtype)


def np_kl(kind, p, q):
    return np_categorical_kl(p, q) if kind == "categorical" else np_gaussian_kl(p, q)


def to_jnp(outputs):
    return jax.tree.map(jnp.asarray, outputs)


KINDS = ["categorical", "gauss_shared", "gauss_full"]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(
    seed=seed_st, positions=shape_st, dtype=dtype_st, use_mask=st.booleans(), use_norm=st.booleans()
)
def test_mean_kl_matches_reference(transform, kind, seed, positions, dtype, use_mask, use_norm):
    old, new, mask = kl_case(seed, kind, positions, dtype)
    mask = mask if use_mask else None
    normalizer = 7.0 if use_norm else None
    fn = transform(functools.partial(mean_kl, normalizer=normalizer))
    value = fn(to_jnp(old), to_jnp(new), mask)
    assert_close(value, np_masked_mean(np_kl(kind, old, new), mask, normalizer), dtype)
    assert float(value) > 0


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_mean_kl_zero_at_identical_outputs_with_zero_gradient(transform, kind):
    rng = np.random.default_rng(1)
    old = make_outputs(rng, kind, (3, 4))
    mask = make_mask(rng, (3, 4))
    value = transform(mean_kl)(to_jnp(old), to_jnp(old), mask)
    np.testing.assert_allclose(value, 0.0, atol=1e-15)
    grad = transform(jax.grad(mean_kl, argnums=(0, 1)))(to_jnp(old), to_jnp(old), mask)
    for leaf in jax.tree.leaves(grad):
        # exactly 0 in exact arithmetic; the categorical one is q * sum(p) - p, off by rounding
        np.testing.assert_allclose(leaf, np.zeros(leaf.shape), atol=1e-15)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_mean_kl_gradient_only_to_new_outputs(transform, kind):
    old, new, mask = kl_case(2, kind)
    grad_old, grad_new = transform(jax.grad(mean_kl, argnums=(0, 1)))(
        to_jnp(old), to_jnp(new), mask
    )
    for leaf in jax.tree.leaves(grad_old):
        np.testing.assert_array_equal(leaf, np.zeros(leaf.shape))
    # the gradient to the new outputs matches central differences of the numpy reference,
    # leaf by leaf (a shared log_std [D] collects the gradient of every position)
    leaves, treedef = jax.tree.flatten(new)
    for i, (leaf, g) in enumerate(zip(leaves, jax.tree.leaves(grad_new), strict=True)):

        def f(x, i=i):
            tree = jax.tree.unflatten(treedef, [x if j == i else v for j, v in enumerate(leaves)])
            return np_masked_mean(np_kl(kind, old, tree), mask)

        assert np.any(np.asarray(g) != 0)
        np.testing.assert_allclose(g, finite_diff(f, leaf), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_mean_kl_hessian_at_old_policy_is_fisher(transform):
    """Hessian-vector products at z_new = z_old are Fisher-vector products:
    categorical (diag(p) - p p^T) v / count; Gaussian (mean) v / sigma^2 / count."""
    rng = np.random.default_rng(3)
    mask = make_mask(rng, (3, 4))
    mask[1, 1] = 0
    count = mask.sum()

    def hvp(f, x, v):
        return transform(lambda x, v: jax.jvp(jax.grad(f), (x,), (v,))[1])(x, v)

    logits = rng.normal(size=(3, 4, 5))
    v = rng.normal(size=(3, 4, 5))
    got = hvp(lambda new: mean_kl(jnp.asarray(logits), new, mask), jnp.asarray(logits), v)
    p = np_probs(logits)
    expected = (p * v - p * np.sum(p * v, -1, keepdims=True)) * mask[..., None] / count
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)

    mean, log_std = make_outputs(rng, "gauss_shared", (3, 4))
    v = rng.normal(size=mean.shape)
    got = hvp(lambda m: mean_kl((mean, log_std), (m, log_std), mask), jnp.asarray(mean), v)
    expected = v * np.exp(-2 * log_std) * mask[..., None] / count
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_mean_kl_normalizer_microbatches_add_up(transform, kind):
    old, new, mask = kl_case(4, kind)
    fn = transform(mean_kl)
    full = fn(to_jnp(old), to_jnp(new), mask)
    n = float(mask.sum())

    def rows(tree, sl):
        """Rows ``sl`` of the [12] flattened positions (micro-batches of shape [6])."""
        cut = lambda x: x.reshape(12, x.shape[-1])[sl]
        if kind == "gauss_shared":  # the state-independent log_std is shared, not split
            return (cut(tree[0]), tree[1])
        return jax.tree.map(cut, tree)

    parts = [
        fn(to_jnp(rows(old, sl)), to_jnp(rows(new, sl)), mask.reshape(12)[sl], jnp.asarray(n))
        for sl in (slice(0, 6), slice(6, None))
    ]
    assert_close(parts[0] + parts[1], full)
    assert_close(full, np_masked_mean(np_kl(kind, old, new), mask))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_mean_kl_masked_positions_are_ignored(transform):
    old, new, mask = kl_case(5, "gauss_full")
    mask[2, 3] = 0
    bad_mean = np.array(new[0])
    bad_mean[2, 3] = np.nan
    value = transform(mean_kl)(to_jnp(old), (jnp.asarray(bad_mean), jnp.asarray(new[1])), mask)
    assert_close(value, np_masked_mean(np_kl("gauss_full", old, new), mask))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_mean_kl_with_impossible_actions(transform):
    """-inf logits (masked actions, probability 0 under both policies) add 0 to the KL."""
    old = np.array([[0.0, 1.0, -np.inf], [0.3, -0.2, 0.9]])
    new = np.array([[0.5, -0.5, -np.inf], [0.1, 0.4, -0.7]])
    expected = (np_categorical_kl(old[0, :2], new[0, :2]) + np_categorical_kl(old[1], new[1])) / 2
    value = transform(mean_kl)(jnp.asarray(old), jnp.asarray(new))
    np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_mean_kl_traced_normalizer_does_not_retrace():
    old, new, mask = kl_case(6, "categorical")
    traces = []

    @jax.jit
    def fn(o, n, m, normalizer):
        traces.append(1)
        return mean_kl(o, n, m, normalizer)

    for norm in (3.0, 10.0, 40.0):
        value = fn(old, new, mask, norm)
        assert_close(value, np_masked_mean(np_kl("categorical", old, new), mask, norm))
    assert len(traces) == 1


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_mean_kl_mixed_families_raise(transform):
    logits = jnp.zeros((3, 4))
    gaussian = (jnp.zeros((3, 4)), jnp.zeros((4,)))
    with pytest.raises(ValueError):
        transform(mean_kl)(logits, gaussian)
    with pytest.raises(ValueError):
        transform(mean_kl)(gaussian, logits)
