"""Tests for :func:`rljax.reward.bradley_terry_loss` against TRL 1.16's ``RewardTrainer``.

The reference is a float64 NumPy transcription of ``RewardTrainer.compute_loss``
(trl/trainer/reward_trainer.py): ``-logsigmoid(r_w - r_l [- margin]).mean()``, plus
``center_rewards_coefficient * mean((r_w + r_l)^2)``; metrics ``min_reward``/``mean_reward``/
``max_reward`` over all rewards (chosen and rejected), ``accuracy`` = mean(r_w > r_l) and
``margin`` = mean(r_w - r_l).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_traces, finite_diff, np_logsigmoid
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.reward import bradley_terry_loss

VARIANTS = pytest.mark.parametrize("variant", ["eager", "jit"])
METRIC_KEYS = {"accuracy", "margin", "mean_reward", "min_reward", "max_reward"}


def trl_reward_loss(rewards_chosen, rewards_rejected, margin=None, center_rewards_coefficient=None):
    rewards_chosen = np.asarray(rewards_chosen, np.float64)
    rewards_rejected = np.asarray(rewards_rejected, np.float64)
    if margin is not None:
        loss = -np_logsigmoid(rewards_chosen - rewards_rejected - np.asarray(margin)).mean()
    else:
        loss = -np_logsigmoid(rewards_chosen - rewards_rejected).mean()
    if center_rewards_coefficient is not None:
        loss += center_rewards_coefficient * np.mean((rewards_chosen + rewards_rejected) ** 2)
    all_rewards = np.concatenate([rewards_chosen, rewards_rejected])
    metrics = {
        "min_reward": all_rewards.min(),
        "mean_reward": all_rewards.mean(),
        "max_reward": all_rewards.max(),
        "accuracy": (rewards_chosen > rewards_rejected).astype(np.float64).mean(),
        "margin": (rewards_chosen - rewards_rejected).mean(),
    }
    return float(loss), metrics


def make_rewards(seed, batch, scale=2.0, with_margin=True, dtype=np.float64):
    """Chosen and rejected rewards, and margins (``None`` without ``with_margin``)."""
    rng = np.random.default_rng(seed)
    chosen = rng.normal(0.5, scale, batch).astype(dtype)
    rejected = rng.normal(0.0, scale, batch).astype(dtype)
    margin = rng.uniform(0.0, 2.0, batch).astype(dtype)
    return chosen, rejected, margin if with_margin else None


@functools.cache
def _loss_fn(variant, with_margin, with_center, with_normalizer):
    def f(chosen, rejected, margin, center, normalizer):
        return bradley_terry_loss(
            chosen,
            rejected,
            margin=margin if with_margin else None,
            center_rewards_coefficient=center if with_center else None,
            normalizer=normalizer if with_normalizer else None,
        )

    return jax.jit(f) if variant == "jit" else f


def run_bt(variant, chosen, rejected, margin=None, center=None, normalizer=None):
    fn = _loss_fn(variant, margin is not None, center is not None, normalizer is not None)
    zero = jnp.zeros(())
    return fn(
        jnp.asarray(chosen),
        jnp.asarray(rejected),
        zero if margin is None else jnp.asarray(margin),
        zero if center is None else center,
        zero if normalizer is None else normalizer,
    )


def assert_matches(got, want, *, rtol, atol=0.0):
    loss, metrics = got
    ref_loss, ref_metrics = want
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=rtol, atol=atol, err_msg="loss")
    assert set(metrics) == METRIC_KEYS
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(
            np.asarray(metrics[key]), value, rtol=rtol, atol=atol, err_msg=key
        )


@VARIANTS
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_matches_trl_float64(variant, with_margin, center):
    for seed, batch in ((1, 7), (2, 1), (3, 16)):
        chosen, rejected, margin = make_rewards(seed, batch, with_margin=with_margin)
        got = run_bt(variant, chosen, rejected, margin, center)
        assert got[0].dtype == jnp.float64
        assert_matches(got, trl_reward_loss(chosen, rejected, margin, center), rtol=1e-10)


@VARIANTS
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_matches_trl_float32(variant, with_margin, center):
    # float32 inputs against the float64 reference of the same float32-rounded values: 1e-5
    chosen, rejected, margin = make_rewards(4, 9, with_margin=with_margin, dtype=np.float32)
    got = run_bt(variant, chosen, rejected, margin, center)
    assert got[0].dtype == jnp.float32
    assert_matches(got, trl_reward_loss(chosen, rejected, margin, center), rtol=1e-5)


@settings(max_examples=15)
@given(
    batch=st.sampled_from([1, 2, 5, 8]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 20.0),
    with_margin=st.booleans(),
    center=st.one_of(st.none(), st.floats(0.0, 1.0)),
)
@VARIANTS
def test_matches_trl_property(variant, batch, seed, scale, with_margin, center):
    chosen, rejected, margin = make_rewards(seed, batch, scale)
    margin = margin if with_margin else None
    got = run_bt(variant, chosen, rejected, margin, center)
    # absolute floor for means that random examples can put near zero (rewards up to ~60)
    assert_matches(got, trl_reward_loss(chosen, rejected, margin, center), rtol=1e-10, atol=1e-13)


def test_hand_computed():
    # logits 2 - 0 = 2 and -1 - 1 = -2: loss = (log(1 + e^-2) + log(1 + e^2)) / 2 = 1 + log(1 + e^-2)
    chosen, rejected = np.array([2.0, -1.0]), np.array([0.0, 1.0])
    loss, m = bradley_terry_loss(chosen, rejected)
    np.testing.assert_allclose(float(loss), 1.0 + math.log1p(math.exp(-2.0)), rtol=1e-14)
    assert float(m["accuracy"]) == 0.5
    assert float(m["margin"]) == 0.0
    assert float(m["mean_reward"]) == 0.5
    assert float(m["min_reward"]) == -1.0
    assert float(m["max_reward"]) == 2.0
    # margin 2 on the first pair: logit 0 -> log 2; centring (c = 0.1): mean((2, 0)^2) = 2
    loss, _ = bradley_terry_loss(
        chosen, rejected, margin=np.array([2.0, 0.0]), center_rewards_coefficient=0.1
    )
    expected = (math.log(2.0) + 2.0 + math.log1p(math.exp(-2.0))) / 2 + 0.1 * 2.0
    np.testing.assert_allclose(float(loss), expected, rtol=1e-14)


def test_equal_rewards_give_log2_and_zero_accuracy():
    r = np.array([0.3, -1.2, 4.0])
    loss, m = bradley_terry_loss(r, r)
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-14)
    assert float(m["accuracy"]) == 0.0  # ties do not count as correct


@VARIANTS
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.3])
def test_gradients_match_finite_differences(variant, with_margin, center):
    chosen, rejected, margin = make_rewards(5, 6, with_margin=with_margin)

    def loss_fn(c, r, m):
        return bradley_terry_loss(c, r, margin=m, center_rewards_coefficient=center)[0]

    g = jax.grad(loss_fn, argnums=(0, 1, 2) if with_margin else (0, 1))
    g = jax.jit(g) if variant == "jit" else g
    got = g(chosen, rejected, margin)
    want = finite_diff(
        lambda x: trl_reward_loss(x[:6], x[6:], margin, center)[0],
        np.concatenate([chosen, rejected]),
    )
    np.testing.assert_allclose(np.concatenate(got[:2]), want, rtol=1e-6, atol=1e-9)
    if with_margin:  # the margin is data (TRL: an input tensor); no gradient flows into it
        np.testing.assert_array_equal(np.asarray(got[2]), 0.0)


@VARIANTS
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.2])
def test_micro_batches_with_normalizer_sum_to_full_batch(variant, with_margin, center):
    chosen, rejected, margin = make_rewards(6, 8, with_margin=with_margin)
    full = trl_reward_loss(chosen, rejected, margin, center)[0]
    total = 0.0
    grads = []
    for sl in (slice(0, 3), slice(3, 8)):
        m = None if margin is None else margin[sl]
        loss, _ = run_bt(variant, chosen[sl], rejected[sl], m, center, normalizer=8)
        total += float(loss)

        def part(c, r, sl=sl, m=m):
            return bradley_terry_loss(c, r, m, center, normalizer=8)[0]

        g = jax.grad(part, argnums=(0, 1))
        g = jax.jit(g) if variant == "jit" else g
        grads.append(g(chosen[sl], rejected[sl]))
    np.testing.assert_allclose(total, full, rtol=1e-10)
    got = np.concatenate([grads[0][0], grads[1][0], grads[0][1], grads[1][1]])
    want = finite_diff(
        lambda x: trl_reward_loss(x[:8], x[8:], margin, center)[0],
        np.concatenate([chosen, rejected]),
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_traced_center_coefficient_traces_once():
    chosen, rejected, _ = make_rewards(7, 5)
    f, traces = count_traces(
        lambda c, r, coef: bradley_terry_loss(c, r, center_rewards_coefficient=coef)
    )
    f = jax.jit(f)
    for coef in (0.0, 0.01, 0.1, 1.0):
        got = f(chosen, rejected, coef)
        assert_matches(got, trl_reward_loss(chosen, rejected, None, coef), rtol=1e-10)
    assert len(traces) == 1


def test_shape_mismatch_raises():
    with pytest.raises(AssertionError):
        bradley_terry_loss(np.zeros(3), np.zeros(4))
    with pytest.raises(AssertionError):
        bradley_terry_loss(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(AssertionError):
        bradley_terry_loss(np.zeros(3), np.zeros(3), margin=np.zeros(2))
