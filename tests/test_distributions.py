"""Tests of :mod:`rljax.distributions` against independent float64 numpy references.

* categorical: explicit log-softmax and gather, ``-sum p log p``, ``sum p log(p / q)``;
* diagonal Gaussian: the log of the product of the per-dimension normal densities, the
  multivariate closed forms with explicit covariance matrices (``numpy.linalg``), and a Monte
  Carlo estimate of the KL from many samples.

Tolerances: float64 to 1e-10 relative. float32 inputs are compared with the float64 reference
evaluated on the same float32-rounded inputs to 1e-5 relative, with an absolute floor of 1e-6:
a KL or an entropy near 0 is a difference of O(1) terms, each rounded to ~6e-8 in float32, so
its absolute, not relative, error is what is bounded.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TRANSFORMS,
    assert_close,
    dtype_st,
    np_gaussian_kl,
    np_probs,
    seed_st,
    shape_st,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.distributions import entropy, is_gaussian, kl_divergence, log_prob

size_st = st.sampled_from([4])
# What every property test draws, in this order: a seed, the positions' shape, the number of
# categories (or dimensions) and the dtype.
DRAWS = dict(seed=seed_st, positions=shape_st, size=size_st, dtype=dtype_st)


def property_test(**more):
    """A property test, eager and under jit: 6 examples of :data:`DRAWS` and ``more``."""

    def wrap(test):
        test = given(**DRAWS, **more)(test)
        return pytest.mark.parametrize("transform", TRANSFORMS)(settings(max_examples=6)(test))

    return wrap


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def np_categorical_log_prob(logits, actions):
    logits = np.asarray(logits, np.float64)
    out = np.zeros(logits.shape[:-1])
    for idx in np.ndindex(out.shape):
        row = logits[idx]
        out[idx] = row[actions[idx]] - (row.max() + np.log(np.sum(np.exp(row - row.max()))))
    return out


def np_gaussian_log_prob(mean, log_std, actions):
    """log prod_d N(a_d; mu_d, sigma_d^2), from the density itself."""
    mean, actions = np.asarray(mean, np.float64), np.asarray(actions, np.float64)
    std = np.broadcast_to(np.exp(np.asarray(log_std, np.float64)), mean.shape)
    density = np.exp(-((actions - mean) ** 2) / (2 * std**2)) / (std * np.sqrt(2 * np.pi))
    return np.log(np.prod(density, axis=-1))


def np_gaussian_entropy(mean, log_std):
    """0.5 log det(2 pi e S)."""
    std = np.broadcast_to(np.exp(np.asarray(log_std, np.float64)), np.shape(mean))
    out = np.zeros(np.shape(mean)[:-1])
    for idx in np.ndindex(out.shape):
        out[idx] = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * np.diag(std[idx] ** 2))[1]
    return out


def assert_per_position(got, want, positions, dtype):
    """One value per position (shape ``positions``), each matching the reference."""
    assert got.shape == positions
    assert_close(got, want, dtype)


def make_gaussian(rng, positions, size, shared, dtype=np.float64):
    mean = rng.normal(0.0, 1.0, (*positions, size)).astype(dtype)
    log_std = rng.normal(-0.2, 0.4, (size,) if shared else (*positions, size)).astype(dtype)
    return mean, log_std


# ---------------------------------------------------------------------------------------------
# log_prob
# ---------------------------------------------------------------------------------------------


@property_test(int_dtype=st.sampled_from([np.int32]))
def test_categorical_log_prob(transform, seed, positions, size, dtype, int_dtype):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (*positions, size)).astype(dtype)
    actions = rng.integers(0, size, positions).astype(int_dtype)
    got = transform(log_prob)(jnp.asarray(logits), jnp.asarray(actions))
    assert_per_position(got, np_categorical_log_prob(logits, actions), positions, dtype)


@property_test(shared=st.booleans())
def test_gaussian_log_prob(transform, seed, positions, size, dtype, shared):
    rng = np.random.default_rng(seed)
    mean, log_std = make_gaussian(rng, positions, size, shared, dtype)
    actions = (mean + np.exp(log_std) * rng.normal(size=mean.shape)).astype(dtype)
    got = transform(log_prob)((jnp.asarray(mean), jnp.asarray(log_std)), jnp.asarray(actions))
    assert_per_position(got, np_gaussian_log_prob(mean, log_std, actions), positions, dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_log_prob_gradients(transform):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4))
    actions = rng.integers(0, 4, 6)
    g = transform(jax.grad(lambda z: jnp.sum(log_prob(z, actions))))(jnp.asarray(logits))
    np.testing.assert_allclose(g, np.eye(4)[actions] - np_probs(logits), rtol=1e-10, atol=1e-15)

    mean, log_std = make_gaussian(rng, (6,), 4, shared=True)
    a = rng.normal(size=(6, 4))
    g_mean, g_log_std = transform(
        jax.grad(lambda m, s: jnp.sum(log_prob((m, s), jnp.asarray(a))), argnums=(0, 1))
    )(jnp.asarray(mean), jnp.asarray(log_std))
    z = (a - mean) / np.exp(log_std)
    np.testing.assert_allclose(g_mean, z / np.exp(log_std), rtol=1e-10)
    # the shared log_std [D] collects d/d log_sigma = z^2 - 1 from every position
    np.testing.assert_allclose(g_log_std, np.sum(z**2 - 1, axis=0), rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# kl_divergence
# ---------------------------------------------------------------------------------------------


@property_test()
def test_categorical_kl(transform, seed, positions, size, dtype):
    rng = np.random.default_rng(seed)
    p = rng.normal(0.0, 1.5, (*positions, size)).astype(dtype)
    q = rng.normal(0.0, 1.5, (*positions, size)).astype(dtype)
    got = transform(kl_divergence)(jnp.asarray(p), jnp.asarray(q))
    pp, qq = np_probs(p), np_probs(q)
    assert_close(got, np.sum(pp * np.log(pp / qq), axis=-1), dtype)
    assert np.all(np.asarray(got) >= -1e-6)
    assert_close(
        transform(kl_divergence)(jnp.asarray(p), jnp.asarray(p)), np.zeros(positions), dtype
    )


@property_test(p_shared=st.booleans(), q_shared=st.booleans())
def test_gaussian_kl_closed_form(transform, seed, positions, size, dtype, p_shared, q_shared):
    rng = np.random.default_rng(seed)
    p = make_gaussian(rng, positions, size, p_shared, dtype)
    q = make_gaussian(rng, positions, size, q_shared, dtype)
    got = transform(kl_divergence)(*(tuple(map(jnp.asarray, d)) for d in (p, q)))
    assert_per_position(got, np_gaussian_kl(p, q), positions, dtype)
    assert np.all(np.asarray(got) > 0)
    same = transform(kl_divergence)(tuple(map(jnp.asarray, p)), tuple(map(jnp.asarray, p)))
    assert_close(same, np.zeros(positions), dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gaussian_kl_monte_carlo(transform):
    """KL(p || q) = E_p[log p(x) - log q(x)], estimated from 200k samples per position.

    Tolerance: 5 standard errors of the sample mean (deterministic seed).
    """
    rng = np.random.default_rng(0)
    p = make_gaussian(rng, (2, 3), 3, shared=False)
    q = (p[0] + rng.normal(0.0, 0.5, p[0].shape), p[1] + rng.normal(0.0, 0.3, p[1].shape))
    got = np.asarray(
        transform(kl_divergence)(tuple(map(jnp.asarray, p)), tuple(map(jnp.asarray, q)))
    )
    n = 200_000
    x = p[0][None] + np.exp(p[1])[None] * rng.normal(size=(n, *p[0].shape))
    log_ratio = np_gaussian_log_prob(p[0], p[1], x) - np_gaussian_log_prob(q[0], q[1], x)
    estimate, stderr = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(n)
    assert np.all(np.abs(got - estimate) < 5 * stderr + 1e-12), (got, estimate, stderr)
    assert np.all(stderr < 0.02)  # the check is informative: KLs here are O(0.1 - 1)
    assert np.all(got > 0.05)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_categorical_kl_equals_expected_log_ratio(transform):
    """Exact expectation over the support: sum_a p(a) (log p(a) - log q(a)) from log_prob."""
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(2, 6, 5))
    got = transform(kl_divergence)(jnp.asarray(p), jnp.asarray(q))
    expected = sum(
        np_probs(p)[:, a]
        * (np_categorical_log_prob(p, np.full(6, a)) - np_categorical_log_prob(q, np.full(6, a)))
        for a in range(5)
    )
    assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------------------------


@property_test()
def test_categorical_entropy(transform, seed, positions, size, dtype):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (*positions, size)).astype(dtype)
    got = transform(entropy)(jnp.asarray(logits))
    probs = np_probs(logits)
    assert_close(got, -np.sum(probs * np.log(probs), axis=-1), dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_categorical_entropy_extremes(transform):
    uniform = jnp.zeros((6, 5))
    np.testing.assert_allclose(transform(entropy)(uniform), np.full(6, math.log(5)), rtol=1e-12)
    # a (numerically) deterministic policy: very negative logits give exp(.) * . = 0, not nan
    peaked = jnp.asarray(np.where(np.eye(5)[[0, 1, 2, 3, 4, 0]] > 0, 0.0, -1e4))
    np.testing.assert_allclose(transform(entropy)(peaked), np.zeros(6), atol=1e-12)


@property_test(shared=st.booleans())
def test_gaussian_entropy(transform, seed, positions, size, dtype, shared):
    rng = np.random.default_rng(seed)
    mean, log_std = make_gaussian(rng, positions, size, shared, dtype)
    got = transform(entropy)((jnp.asarray(mean), jnp.asarray(log_std)))
    assert_per_position(got, np_gaussian_entropy(mean, log_std), positions, dtype)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_one_action_and_one_dimension(transform):
    """A single action has probability 1; a 1-d Gaussian reduces over a length-1 axis."""
    rng = np.random.default_rng(3)
    logits, other = rng.normal(size=(2, 6, 1))
    actions = np.zeros(6, np.int64)
    assert_close(transform(log_prob)(logits, actions), np.zeros(6))
    assert_close(transform(entropy)(logits), np.zeros(6))
    assert_close(transform(kl_divergence)(logits, other), np.zeros(6))
    p = make_gaussian(rng, (6,), 1, shared=True)
    q = make_gaussian(rng, (6,), 1, shared=False)
    a = rng.normal(size=(6, 1))
    assert_close(transform(log_prob)(p, a), np_gaussian_log_prob(*p, a))
    assert_close(transform(entropy)(p), np_gaussian_entropy(*p))
    assert_close(transform(kl_divergence)(p, q), np_gaussian_kl(p, q))


# Actions ruled out with -inf logits (action masking, top-k / top-p filtering) have probability
# 0 and contribute 0 to the entropy and the KL (0 log 0 = 0): the results are those of the
# distribution over the remaining actions.
IMPOSSIBLE = np.array([[0.0, 1.0, -np.inf], [2.0, -np.inf, -np.inf], [0.3, -0.2, 0.9]])
IMPOSSIBLE_Q = np.array([[0.5, -0.5, -np.inf], [-1.0, -np.inf, -np.inf], [0.1, 0.4, -0.7]])


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_categorical_entropy_with_impossible_actions(transform):
    expected = [-np.sum(pr * np.log(pr)) for pr in (np_probs([0.0, 1.0]), [1.0])]
    expected.append(-np.sum(np_probs(IMPOSSIBLE[2]) * np.log(np_probs(IMPOSSIBLE[2]))))
    assert_close(transform(entropy)(jnp.asarray(IMPOSSIBLE)), expected)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_categorical_kl_with_impossible_actions(transform):
    p2, q2 = np_probs([0.0, 1.0]), np_probs([0.5, -0.5])
    p3, q3 = np_probs(IMPOSSIBLE[2]), np_probs(IMPOSSIBLE_Q[2])
    expected = [np.sum(p2 * np.log(p2 / q2)), 0.0, np.sum(p3 * np.log(p3 / q3))]
    got = transform(kl_divergence)(jnp.asarray(IMPOSSIBLE), jnp.asarray(IMPOSSIBLE_Q))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_categorical_log_prob_with_impossible_actions(transform):
    got = transform(log_prob)(jnp.asarray(IMPOSSIBLE), jnp.asarray([1, 0, 2]))
    expected = [np.log(np_probs([0.0, 1.0])[1]), 0.0, np.log(np_probs(IMPOSSIBLE[2])[2])]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# dtypes, structure checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_bfloat16_logits_are_upcast(transform):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(6, 4)), jnp.bfloat16)
    actions = jnp.asarray(rng.integers(0, 4, 6))
    exact = np.asarray(logits.astype(jnp.float32), np.float64)
    lp = transform(log_prob)(logits, actions)
    ent = transform(entropy)(logits)
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    assert_close(lp, np_categorical_log_prob(exact, np.asarray(actions)), np.float32)
    probs = np_probs(exact)
    assert_close(ent, -np.sum(probs * np.log(probs), axis=-1), np.float32)


def test_is_gaussian():
    assert is_gaussian((jnp.zeros(3), jnp.zeros(3)))
    assert is_gaussian([jnp.zeros(3), jnp.zeros(3)])
    assert not is_gaussian(jnp.zeros((2, 3)))
    for bad in [(jnp.zeros(3),) * 3, (jnp.zeros(3),), ()]:
        with pytest.raises(ValueError):
            is_gaussian(bad)


THREE_TUPLE = (jnp.zeros((2, 3)), jnp.zeros((3,)), jnp.zeros((3,)))
GAUSSIAN = (jnp.zeros((2, 3)), jnp.zeros((3,)))
LOGITS = jnp.zeros((2, 3))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(
    "fn, args",
    [
        pytest.param(log_prob, (THREE_TUPLE, LOGITS), id="log_prob-three-tuple"),
        pytest.param(entropy, (THREE_TUPLE,), id="entropy-three-tuple"),
        pytest.param(kl_divergence, (THREE_TUPLE, GAUSSIAN), id="kl-three-tuple-gaussian"),
        pytest.param(kl_divergence, (GAUSSIAN, THREE_TUPLE), id="kl-gaussian-three-tuple"),
        pytest.param(kl_divergence, (LOGITS, GAUSSIAN), id="kl-categorical-gaussian"),
        pytest.param(kl_divergence, (GAUSSIAN, LOGITS), id="kl-gaussian-categorical"),
    ],
)
def test_three_tuples_and_mixed_families_raise(transform, fn, args):
    with pytest.raises(ValueError):
        transform(fn)(*args)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gaussian_shape_mismatch_raises(transform):
    mean, log_std = jnp.zeros((2, 3)), jnp.zeros((3,))
    with pytest.raises(AssertionError):
        transform(log_prob)((mean, log_std), jnp.zeros((2, 4)))
    with pytest.raises(AssertionError):
        transform(kl_divergence)((mean, log_std), (jnp.zeros((3, 3)), log_std))
