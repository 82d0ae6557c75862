"""Tests of the critic-free RL helpers in :mod:`rljax.advantages` against float64 numpy loops.

The references below are explicit Python loops, one group / row / token at a time, written
from the formulas in the docstrings (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO Eq. 13, TRL 1.16's
importance-sampling correction) and never calling library code. RLOO's reference uses the
leave-one-out sum itself, not the ``k / (k - 1)`` identity the library uses.

Tolerances: float64 results match to 1e-12 relative, with an absolute floor of 1e-12 times the
inputs' scale: advantages are differences of O(1) quantities that can cancel to ~0, and the
library centres on a pivot (the first valid score) while the references sum directly, so only
the rounding of the inputs' size, not of the result's, is shared.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.advantages import (
    IMPORTANCE_SAMPLING_LEVELS,
    IMPORTANCE_SAMPLING_MODES,
    OUTCOME_ESTIMATORS,
    filter_groups,
    mask_truncated,
    outcome_advantages,
    soft_overlong_penalty,
    truncated_importance_weights,
)

TRANSFORMS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
RTOL = 1e-12
GROUP_ESTIMATORS = sorted(set(OUTCOME_ESTIMATORS) - {"reinforce_pp"})


def assert_close(actual, expected, scale=1.0):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=RTOL, atol=RTOL * max(scale, 1.0)
    )


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def np_mean_std(values):
    """Mean and Bessel-corrected standard deviation of a list; std 0 with < 2 values."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def np_outcome(scores, k, estimator, eps, valid=None):
    scores = [float(s) for s in scores]
    ok = [not math.isnan(s) and (valid is None or bool(valid[i])) for i, s in enumerate(scores)]
    out = [0.0] * len(scores)
    groups = [list(range(g, g + k)) for g in range(0, len(scores), k)]
    all_valid = [scores[i] for i in range(len(scores)) if ok[i]]
    batch_mean, batch_std = np_mean_std(all_valid)
    centred = [0.0] * len(scores)  # r_i - group mean (valid rows)
    for rows in groups:
        vals = [scores[i] for i in rows if ok[i]]
        mean, std = np_mean_std(vals)
        for i in rows:
            if not ok[i]:
                continue
            r = scores[i]
            centred[i] = r - mean
            if estimator == "grpo":
                out[i] = (r - mean) / (std + eps)
            elif estimator == "grpo_batch_std":
                out[i] = (r - mean) / (batch_std + eps)
            elif estimator == "dr_grpo":
                out[i] = r - mean
            elif estimator == "rloo":
                others = [scores[j] for j in rows if ok[j] and j != i]
                out[i] = r - sum(others) / len(others) if others else 0.0
            elif estimator == "reinforce_pp":
                out[i] = (r - batch_mean) / (batch_std + eps)
    if estimator == "reinforce_pp_baseline":
        _, c_std = np_mean_std([centred[i] for i in range(len(scores)) if ok[i]])
        out = [centred[i] / (c_std + eps) if ok[i] else 0.0 for i in range(len(scores))]
    return np.array(out)


def np_filter(scores, k, valid=None):
    keep, dropped = [], 0
    for g in range(0, len(scores), k):
        vals = [
            float(scores[i])
            for i in range(g, g + k)
            if not math.isnan(float(scores[i])) and (valid is None or valid[i])
        ]
        kept = len(vals) >= 2 and len(set(vals)) > 1
        keep += [kept] * k
        dropped += not kept
    return np.array(keep), dropped


def np_overlong(lengths, l_max, l_cache, factor):
    out = []
    for n in lengths:
        n = float(n)
        if n <= l_max - l_cache:
            out.append(0.0)
        elif n <= l_max:
            out.append(factor * ((l_max - l_cache) - n) / l_cache)
        else:
            out.append(-factor)
    return np.array(out)


def np_importance(trainer, sampler, mask, cap, cap_min, level, mode):
    """TRL 1.16 semantics, one row and token at a time."""
    b_len, t_len = trainer.shape
    low = 0.0 if cap_min is None else cap_min
    high = math.inf if cap is None else cap

    def constrain(rho):
        if mode == "truncate":
            return min(max(rho, low), high)
        return 0.0 if (rho < low or rho > high) else rho

    weights = np.ones((b_len, t_len))
    diffs, kls, units, capped = [], [], [], []
    for b in range(b_len):
        deltas = []
        for t in range(t_len):
            d = float(trainer[b, t]) - float(sampler[b, t]) if mask[b, t] else 0.0
            if math.isnan(d):
                d = 0.0
            elif mask[b, t]:
                diffs.append(abs(d))
                kls.append(math.exp(d) - 1.0 - d)
            deltas.append(d)
        if level == "token":
            for t in range(t_len):
                rho = math.exp(deltas[t])
                weights[b, t] = constrain(rho)
                if mask[b, t]:
                    units.append(weights[b, t])
                    capped.append(rho < low or rho > high)
        else:
            rho = math.exp(sum(deltas))
            weights[b, :] = constrain(rho)
            if any(mask[b]):
                units.append(weights[b, 0])
                capped.append(rho < low or rho > high)

    def stats(xs):
        return (sum(xs) / len(xs), min(xs), max(xs)) if xs else (0.0, 0.0, 0.0)

    metrics = {
        "sampling/sampling_logp_difference/mean": stats(diffs)[0],
        "sampling/sampling_logp_difference/max": stats(diffs)[2],
        "sampling/mismatch_kl/mean": stats(kls)[0],
        "sampling/mismatch_kl/max": stats(kls)[2],
        "sampling/importance_sampling_ratio/min": stats(units)[1],
        "sampling/importance_sampling_ratio/mean": stats(units)[0],
        "sampling/importance_sampling_ratio/max": stats(units)[2],
        "sampling/importance_sampling_ratio/capped_frac": stats([float(c) for c in capped])[0],
    }
    return weights, metrics


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

K = 5
NUM_GROUPS = 6


def random_scores(seed):
    """Scores with a constant group, a binary group, a NaN row, and a one-valid-row group."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(NUM_GROUPS, K)) * 2.0 + 0.3
    scores[1] = 0.1  # all equal (0.1 * 5 / 5 is not exactly 0.1 in float)
    scores[2] = rng.integers(0, 2, size=K).astype(float)
    scores[3, 2] = np.nan  # an unscorable completion
    valid = rng.random((NUM_GROUPS, K)) > 0.15
    valid[4] = [True, False, False, False, False]  # a single valid row: no baseline
    return scores.reshape(-1), valid.reshape(-1)


# ---------------------------------------------------------------------------------------------
# outcome_advantages
# ---------------------------------------------------------------------------------------------


def all_estimators(scores, valid, eps, group_size=K):
    """Every estimator at once: one compilation under jit instead of one per estimator."""
    return {
        name: outcome_advantages(scores, group_size, estimator=name, eps=eps, valid=valid)
        for name in OUTCOME_ESTIMATORS
    }


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_outcome_advantages_match_numpy(transform):
    fn = transform(all_estimators)
    for seed in range(2):
        scores, valid = random_scores(seed)
        for row_valid in (None, valid):
            for eps in (1e-4, 0.5):
                got = fn(
                    jnp.asarray(scores), None if row_valid is None else jnp.asarray(row_valid), eps
                )
                for name, adv in got.items():
                    assert adv.shape == scores.shape and adv.dtype == jnp.float64
                    assert_close(adv, np_outcome(scores, K, name, eps, row_valid), scale=10.0)


def test_constant_groups_get_exactly_zero_and_are_filtered():
    scores, _ = random_scores(5)
    scores = np.nan_to_num(scores)
    scores[:K] = scores[2 * K]  # group 0 repeats one random score
    scores[K : 2 * K] = 1e6 + 0.1  # group 1: a large offset, not exact in binary
    constant = np.zeros(len(scores), bool)
    constant[: 2 * K] = True
    for name, adv in all_estimators(jnp.asarray(scores), None, 1e-4).items():
        adv = np.asarray(adv)
        if name != "reinforce_pp":  # no group baseline: a constant group is not zero there
            assert np.all(adv[constant] == 0.0), name  # exact, not merely small
        assert np.any(adv[~constant] != 0.0), name
    keep, dropped = filter_groups(scores, K)
    ref_keep, ref_dropped = np_filter(scores, K)
    np.testing.assert_array_equal(keep, ref_keep)
    assert not keep[constant].any() and dropped == ref_dropped >= 2


def test_rloo_is_scaled_dr_grpo():
    scores = jnp.asarray(np.nan_to_num(random_scores(7)[0]))  # 30 rows: groups of 2, 3 or 5

    @jax.jit
    def both(s):
        return {
            k: (
                outcome_advantages(s, k, estimator="rloo"),
                outcome_advantages(s, k, estimator="dr_grpo"),
            )
            for k in (2, 3, 5)
        }

    for k, (rloo, dr) in both(scores).items():  # rloo = k / (k - 1) * (r - group mean)
        assert_close(rloo, np.asarray(dr) * k / (k - 1), scale=10.0)


def test_group_size_one_only_for_reinforce_pp():
    scores = np.nan_to_num(random_scores(2)[0])
    adv = outcome_advantages(jnp.asarray(scores), 1, estimator="reinforce_pp")
    assert_close(adv, np_outcome(scores, 1, "reinforce_pp", 1e-4), scale=10.0)
    assert_close(adv, outcome_advantages(jnp.asarray(scores), K, estimator="reinforce_pp"), 10.0)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        outcome_advantages(jnp.asarray(scores), 1, estimator="grpo")


def test_invalid_rows_are_zero_gradients_finite_and_eps_traced():
    scores, valid = random_scores(3)
    traces = []

    @jax.jit
    def grad_fn(s, eps):
        traces.append(1)

        def objective(s):
            adv = outcome_advantages(s, K, estimator="grpo", eps=eps, valid=jnp.asarray(valid))
            return jnp.sum(adv * jnp.arange(adv.shape[0]))

        return jax.grad(objective)(s)

    for eps in (1e-4, 1e-2, 1.0):  # a sweep over eps does not recompile
        grad = grad_fn(jnp.asarray(np.nan_to_num(scores)), eps)
        assert np.all(np.isfinite(np.asarray(grad)))
    assert len(traces) == 1
    adv = outcome_advantages(jnp.asarray(scores), K, valid=jnp.asarray(valid))
    assert np.all(np.asarray(adv)[~valid | np.isnan(scores)] == 0.0)


def test_outcome_advantages_errors():
    scores = jnp.zeros(6)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        outcome_advantages(scores, 1)
    with pytest.raises(ValueError, match="do not split into groups of group_size=4"):
        outcome_advantages(scores, 4)
    with pytest.raises(ValueError, match="Python int"):
        outcome_advantages(scores, 2.0)
    with pytest.raises(ValueError, match=r"unknown estimator 'ppo'.*'dr_grpo'.*'rloo'"):
        outcome_advantages(scores, 3, estimator="ppo")
    with pytest.raises(AssertionError):
        outcome_advantages(jnp.zeros((2, 3)), 3)
    with pytest.raises(AssertionError):
        outcome_advantages(scores, 3, valid=jnp.ones(5, bool))


# ---------------------------------------------------------------------------------------------
# filter_groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_valid", [False, True], ids=["all_valid", "valid_mask"])
def test_filter_groups_matches_numpy(use_valid):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        binary = rng.integers(0, 2, size=40).astype(float)  # many all-0 / all-1 groups of 4
        scores, valid = random_scores(seed)
        for s, k, v in ((binary, 4, rng.random(40) > 0.2), (scores, K, valid)):
            v = v if use_valid else None
            keep, dropped = filter_groups(jnp.asarray(s), k, v)
            ref_keep, ref_dropped = np_filter(s, k, v)
            assert keep.dtype == np.bool_
            np.testing.assert_array_equal(keep, ref_keep)
            assert dropped == ref_dropped


def test_filter_groups_errors():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        filter_groups(np.zeros(4), 1)
    with pytest.raises(ValueError, match="do not split"):
        filter_groups(np.zeros(5), 2)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        filter_groups(np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="valid must have the shape"):
        filter_groups(np.zeros(4), 2, valid=np.ones(3, bool))


# ---------------------------------------------------------------------------------------------
# overlong handling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_soft_overlong_penalty_matches_numpy(transform):
    fn = transform(lambda n, factor: soft_overlong_penalty(n, 100, 20, penalty_factor=factor))
    rng = np.random.default_rng(0)
    for lengths in (rng.integers(0, 131, size=131), rng.uniform(0, 130, size=131)):
        for factor in (1.0, 0.7):
            got = fn(jnp.asarray(lengths), factor)
            assert got.dtype == jnp.float64
            assert_close(got, np_overlong(lengths, 100, 20, factor))


def test_soft_overlong_penalty_shape():
    lengths = jnp.arange(0, 131)
    pen = np.asarray(soft_overlong_penalty(lengths, 100, 20, penalty_factor=0.5))
    assert np.all(pen[:81] == 0.0)  # up to L_max - L_cache = 80: no penalty
    np.testing.assert_allclose(np.diff(pen[80:101]), -0.5 / 20, rtol=1e-12)  # linear ramp
    assert pen[90] == -0.25  # TRL's docstring example (-0.5) times the factor
    assert np.all(pen[100:] == -0.5)  # -penalty_factor at and beyond L_max
    hard = np.asarray(soft_overlong_penalty(lengths, 100, 0))
    assert np.all(hard[:101] == 0.0) and np.all(hard[101:] == -1.0)
    ramp_all = np.asarray(soft_overlong_penalty(lengths, 100, 100))  # the ramp starts at 0
    np.testing.assert_allclose(ramp_all[[0, 50, 100, 101]], [0.0, -0.5, -1.0, -1.0], rtol=1e-12)


def test_soft_overlong_penalty_errors():
    lengths = jnp.asarray([3, 5])
    with pytest.raises(ValueError, match="row 1 has length -2"):
        soft_overlong_penalty(jnp.asarray([3, -2]), 10, 2)
    with pytest.raises(ValueError, match="max_completion_len must be > 0"):
        soft_overlong_penalty(lengths, 0, 0)
    with pytest.raises(ValueError, match="overlong_buffer_len must be in"):
        soft_overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="overlong_buffer_len must be in"):
        soft_overlong_penalty(lengths, 10, -1)
    with pytest.raises(ValueError, match="max_completion_len must be a Python int"):
        soft_overlong_penalty(lengths, 10.0, 2)
    with pytest.raises(ValueError, match="penalty_factor must be >= 0"):
        soft_overlong_penalty(lengths, 10, 2, penalty_factor=-1.0)


def test_mask_truncated():
    rng = np.random.default_rng(0)
    mask = rng.random((5, 7)) > 0.3
    truncated = np.array([True, False, False, True, False])
    for m in (jnp.asarray(mask), jnp.asarray(mask, jnp.float32)):
        out = mask_truncated(m, jnp.asarray(truncated))
        assert out.dtype == m.dtype
        expected = np.where(truncated[:, None], 0, mask)
        np.testing.assert_array_equal(np.asarray(out, np.float64), expected)
    with pytest.raises(AssertionError):
        mask_truncated(jnp.asarray(mask), jnp.asarray(truncated[:4]))


# ---------------------------------------------------------------------------------------------
# truncated importance weights
# ---------------------------------------------------------------------------------------------


def random_logps(seed, b_len=6, t_len=9):
    rng = np.random.default_rng(seed)
    trainer = np.log(rng.uniform(0.01, 1.0, size=(b_len, t_len)))
    sampler = trainer + rng.normal(scale=0.6, size=(b_len, t_len))
    lengths = rng.integers(1, t_len + 1, size=b_len)
    lengths[-1] = 0  # a row with no valid token (e.g. masked as truncated)
    mask = np.arange(t_len)[None, :] < lengths[:, None]
    sampler[0, 0] = np.nan  # a token the sampler could not score
    sampler[2, t_len - 1] = np.nan  # NaN at padding or a valid token
    return trainer, sampler, mask


def all_importance_modes(trainer, sampler, mask, cap):
    """Every (level, mode) at once: one compilation under jit."""
    return {
        (level, mode): truncated_importance_weights(
            trainer, sampler, mask, cap=cap, cap_min=0.5, level=level, mode=mode
        )
        for level in IMPORTANCE_SAMPLING_LEVELS
        for mode in IMPORTANCE_SAMPLING_MODES
    }


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_truncated_importance_weights_match_numpy(transform):
    fn = transform(all_importance_modes)
    for seed in range(2):
        trainer, sampler, mask = random_logps(seed)
        for cap in (2.0, 1.2):  # traced under jit: no recompile
            got = fn(jnp.asarray(trainer), jnp.asarray(sampler), jnp.asarray(mask), cap)
            for (level, mode), (weights, metrics) in got.items():
                ref_w, ref_m = np_importance(trainer, sampler, mask, cap, 0.5, level, mode)
                assert weights.shape == trainer.shape
                assert_close(weights, ref_w)
                assert sorted(metrics) == sorted(ref_m)
                for name, value in ref_m.items():
                    assert_close(metrics[name], value)


def test_truncated_importance_weights_unbounded_and_gradient_stopped():
    trainer, sampler, mask = random_logps(11)
    weights, metrics = truncated_importance_weights(
        jnp.asarray(trainer), jnp.asarray(sampler), jnp.asarray(mask), cap=None
    )
    ref_w, _ = np_importance(trainer, sampler, mask, None, None, "token", "truncate")
    assert_close(weights, ref_w)
    assert float(metrics["sampling/importance_sampling_ratio/capped_frac"]) == 0.0

    def total(t):
        w, _ = truncated_importance_weights(t, jnp.asarray(sampler), jnp.asarray(mask))
        return jnp.sum(w)

    grad = jax.grad(total)(jnp.asarray(trainer))
    assert np.all(np.asarray(grad) == 0.0)
    empty = truncated_importance_weights(
        jnp.asarray(trainer), jnp.asarray(sampler), jnp.zeros(trainer.shape, bool)
    )[1]
    assert all(float(v) == 0.0 for v in empty.values())


def test_truncated_importance_weights_errors():
    t = jnp.zeros((2, 3))
    m = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(t, t, m, cap=0.0)
    with pytest.raises(ValueError, match="cap_min must be >= 0"):
        truncated_importance_weights(t, t, m, cap_min=-0.1)
    with pytest.raises(ValueError, match=r"cap_min=3\.0 must not exceed cap=2\.0"):
        truncated_importance_weights(t, t, m, cap=2.0, cap_min=3.0)
    with pytest.raises(ValueError, match=r"unknown level 'row'.*'sequence', 'token'"):
        truncated_importance_weights(t, t, m, level="row")
    with pytest.raises(ValueError, match=r"unknown mode 'clip'.*'mask', 'truncate'"):
        truncated_importance_weights(t, t, m, mode="clip")
    with pytest.raises(AssertionError):
        truncated_importance_weights(t, jnp.zeros((2, 4)), m)
