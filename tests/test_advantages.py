"""Tests of :mod:`rljax.advantages` against independent float64 numpy references.

The references are explicit backwards Python loops over time, one batch row at a time, written
from the documented semantics and never calling library code:

* ``delta_t = r_t + gamma (1 - d_t) V_next - V_t``, ``A_t = delta_t + gamma lam (1 - d_t) A_next``;
* ``V_next``/``A_next`` are the value and advantage of the next *valid* step, the bootstrap
  ``values[..., T]`` and 0 after the last one: positions with ``mask == 0`` are not steps, are
  skipped, and get advantage and return 0;
* ``returns = A + V`` at valid positions.

Tolerances: float64 results must match to 1e-10 relative. float32 inputs are compared with the
float64 reference evaluated on the *same* float32-rounded inputs to 1e-5 relative, with an
absolute floor of 1e-5 * max|input|: an advantage is a sum of O(1) terms of both signs
(``r + gamma V' - V + ...``) and can cancel to ~0, where the ~6e-8 rounding of each float32
term, not the result's size, sets the error. For the same reason float64 results that are
*differences* of independently computed quantities get a floor of 1e-12.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.advantages import discounted_returns, explained_variance, gae, whiten

TRANSFORMS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
# hypothesis draws shapes from a small set: jit (and eager dispatch) compiles once per shape
BATCHES = (1, 3)
TIMES = (1, 7)


# ---------------------------------------------------------------------------------------------
# numpy references (float64, explicit loops)
# ---------------------------------------------------------------------------------------------


def np_gae_row(r, v, d, m, gamma, lam):
    """One row: ``r, d, m`` of length T, ``v`` of length T + 1."""
    t_len = len(r)
    adv, ret = np.zeros(t_len), np.zeros(t_len)
    next_value, next_adv = float(v[t_len]), 0.0
    for t in range(t_len - 1, -1, -1):
        if not m[t]:
            continue  # not a step: skipped, advantage and return stay 0
        not_done = 1.0 - float(d[t])
        delta = float(r[t]) + gamma * not_done * next_value - float(v[t])
        a = delta + gamma * lam * not_done * next_adv
        adv[t], ret[t] = a, a + float(v[t])
        next_value, next_adv = float(v[t]), a
    return adv, ret


def np_gae(rewards, values, dones, gamma, lam, mask=None):
    rewards, values, dones = (np.asarray(x, np.float64) for x in (rewards, values, dones))
    mask = np.ones(rewards.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    t_len = rewards.shape[-1]
    rows = zip(
        rewards.reshape(-1, t_len),
        values.reshape(-1, t_len + 1),
        dones.reshape(-1, t_len),
        mask.reshape(-1, t_len),
        strict=True,
    )
    out = [np_gae_row(r, v, d, m, float(gamma), float(lam)) for r, v, d, m in rows]
    adv = np.array([a for a, _ in out]).reshape(rewards.shape)
    ret = np.array([g for _, g in out]).reshape(rewards.shape)
    return adv, ret


def np_discounted_returns(rewards, dones, gamma, bootstrap=None, mask=None):
    rewards, dones = np.asarray(rewards, np.float64), np.asarray(dones, np.float64)
    mask = np.ones(rewards.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    t_len = rewards.shape[-1]
    batch = rewards.shape[:-1]
    boot = np.zeros(batch) if bootstrap is None else np.asarray(bootstrap, np.float64)
    out = np.zeros(rewards.shape)
    for idx in np.ndindex(batch):
        g = float(boot[idx])
        for t in range(t_len - 1, -1, -1):
            if mask[idx][t]:
                g = float(rewards[idx][t]) + gamma * (1.0 - float(dones[idx][t])) * g
                out[idx][t] = g
    return out


def np_whiten(x, mask, shift_mean=True, eps=1e-8):
    x = np.asarray(x, np.float64)
    valid = np.ones(x.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if not valid.any():
        return np.zeros(x.shape)
    vals = x[valid]
    mean = vals.mean()
    var = ((vals - mean) ** 2).mean()
    out = np.zeros(x.shape)
    out[valid] = (vals - mean) / np.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return out


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def make_mask(rng, shape, kind):
    """``kind`` per row: full, left/right padding, holes, empty, or a random mix of them."""
    t_len = shape[-1]
    rows = int(np.prod(shape[:-1]))
    mask = np.ones((rows, t_len), bool)
    kinds = ["full", "left", "right", "holes", "empty"]
    for i in range(rows):
        k = kinds[rng.integers(len(kinds))] if kind == "mixed" else kind
        n_pad = int(rng.integers(1, t_len + 1)) if t_len > 1 else 1
        if k == "left":
            mask[i, :n_pad] = False
        elif k == "right":
            mask[i, t_len - n_pad :] = False
        elif k == "holes":
            mask[i] = rng.random(t_len) < 0.6
        elif k == "empty":
            mask[i] = False
    return mask.reshape(shape)


def make_data(seed, shape, dtype=np.float64, mask_kind="mixed", p_done=0.3):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(0.0, 1.0, shape).astype(dtype)
    values = rng.normal(0.0, 1.0, (*shape[:-1], shape[-1] + 1)).astype(dtype)
    dones = (rng.random(shape) < p_done).astype(dtype)
    mask = None if mask_kind == "none" else make_mask(rng, shape, mask_kind)
    return rewards, values, dones, mask


def assert_close(got, want, dtype, atol=0.0):
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=RTOL[np.dtype(dtype)], atol=atol)


def _j(*xs):
    return tuple(None if x is None else jnp.asarray(x) for x in xs)


# ---------------------------------------------------------------------------------------------
# gae
# ---------------------------------------------------------------------------------------------

MASK_KINDS = ["none", "full", "left", "right", "holes", "empty", "mixed"]
# hypothesis strategies for a rollout (make_data's shape and mask) and its discount
ROLLOUT_ST = dict(
    batch=st.sampled_from(BATCHES),
    t_len=st.sampled_from(TIMES),
    mask_kind=st.sampled_from(MASK_KINDS),
    gamma=st.floats(0.0, 1.0),
)


@settings(max_examples=10)
@given(
    **ROLLOUT_ST,
    lam=st.floats(0.0, 1.0),
    p_done=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gae_matches_numpy_loop(transform, batch, t_len, mask_kind, gamma, lam, p_done, seed):
    r, v, d, m = make_data(seed, (batch, t_len), mask_kind=mask_kind, p_done=p_done)
    # gamma and lam are passed as (traced) arguments: no recompilation per example under jit
    adv, ret = transform(gae)(*_j(r, v, d), gamma, lam, *_j(m))
    want_adv, want_ret = np_gae(r, v, d, gamma, lam, m)
    # a sum of O(1) terms of both signs can cancel to ~0 (see module docstring)
    assert_close(adv, want_adv, np.float64, atol=1e-13)
    assert_close(ret, want_ret, np.float64, atol=1e-13)
    if m is not None:
        assert np.all(np.asarray(adv)[~m] == 0.0) and np.all(np.asarray(ret)[~m] == 0.0)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("mask_kind", ["none", "mixed"])
def test_gae_float32(transform, mask_kind):
    r, v, d, m = make_data(1, (3, 7), np.float32, mask_kind)
    adv, ret = transform(functools.partial(gae, gamma=0.97, lam=0.9))(*_j(r, v, d), mask=m)
    want_adv, want_ret = np_gae(r, v, d, np.float32(0.97), np.float32(0.9), m)
    atol = 1e-5 * max(np.abs(r).max(), np.abs(v).max())
    assert_close(adv, want_adv, np.float32, atol=atol)
    assert_close(ret, want_ret, np.float32, atol=atol)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(
    ("in_dtype", "out_dtype"),
    [(np.float64, np.float64), (np.float32, np.float32), (jnp.bfloat16, np.float32)],
)
def test_gae_output_dtype(transform, in_dtype, out_dtype):
    r, v, d, m = make_data(2, (3, 7), mask_kind="holes")
    args = tuple(jnp.asarray(x, in_dtype) for x in (r, v, d))
    adv, ret = transform(gae)(*args, 0.9, 0.8, m)
    assert adv.dtype == out_dtype and ret.dtype == out_dtype
    rounded = [np.asarray(x.astype(jnp.float64)) for x in args]
    # python-float gamma/lam are rounded to the compute dtype
    g, lam = (0.9, 0.8) if out_dtype == np.float64 else (np.float32(0.9), np.float32(0.8))
    want_adv, _ = np_gae(*rounded, g, lam, m)
    atol = 0.0 if out_dtype == np.float64 else 1e-5 * np.abs(rounded[1]).max()
    assert_close(adv, want_adv, out_dtype, atol=atol)


# Hand-computed tiny cases, T = 3, gamma = lam = 0.5 (gamma * lam = 0.25),
# rewards r = [1, 2, 3], values V = [1, 2, 3, 4] (V_3 = 4 is the bootstrap).
#
# (a) no dones, no mask:
#     delta_2 = 3 + 0.5 * 4 - 3 = 2      A_2 = 2
#     delta_1 = 2 + 0.5 * 3 - 2 = 1.5    A_1 = 1.5 + 0.25 * 2 = 2
#     delta_0 = 1 + 0.5 * 2 - 1 = 1      A_0 = 1 + 0.25 * 2 = 1.5
#     returns = A + V[:3] = [2.5, 4, 5]
# (b) dones = [0, 1, 0] (episode ends at step 1: neither V_2 nor A_2 flows into step 1):
#     A_2 = 2;  delta_1 = 2 + 0 - 2 = 0, A_1 = 0;  delta_0 = 1 + 0.5 * 2 - 1 = 1,
#     A_0 = 1 + 0.25 * 0 = 1;  returns = [2, 2, 5]
# (c) mask = [1, 0, 1] (step 1 is a hole, skipped; step 0 sees V_2 = 3 and A_2 = 2):
#     A_2 = 2;  A_1 = 0 (padding);  delta_0 = 1 + 0.5 * 3 - 1 = 1.5, A_0 = 1.5 + 0.25 * 2 = 2;
#     returns = [1 + 2, 0, 3 + 2] = [3, 0, 5]
# (d) mask = [0, 1, 1] with dones = [1, 0, 0] (left padding; the done at the padded step is
#     ignored): A_2 = 2, A_1 = 2, A_0 = 0; returns = [0, 4, 5]
HAND_CASES = [
    ([0, 0, 0], None, [1.5, 2.0, 2.0], [2.5, 4.0, 5.0]),
    ([0, 1, 0], None, [1.0, 0.0, 2.0], [2.0, 2.0, 5.0]),
    ([0, 0, 0], [1, 0, 1], [2.0, 0.0, 2.0], [3.0, 0.0, 5.0]),
    ([1, 0, 0], [0, 1, 1], [0.0, 2.0, 2.0], [0.0, 4.0, 5.0]),
]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(("dones", "mask", "want_adv", "want_ret"), HAND_CASES)
def test_gae_hand_computed(transform, dones, mask, want_adv, want_ret):
    r = jnp.array([1.0, 2.0, 3.0])
    v = jnp.array([1.0, 2.0, 3.0, 4.0])
    f = transform(functools.partial(gae, gamma=0.5, lam=0.5))
    # float or bool dones, float / int / bool mask
    for d, m in [
        (jnp.array(dones, jnp.float64), None if mask is None else jnp.array(mask, jnp.float64)),
        (jnp.array(dones, bool), None if mask is None else jnp.array(mask, bool)),
        (jnp.array(dones, jnp.int32), None if mask is None else jnp.array(mask, jnp.int32)),
    ]:
        adv, ret = f(r, v, d, mask=m)
        # all intermediate values are dyadic rationals: exact in floating point
        np.testing.assert_array_equal(np.asarray(adv), want_adv)
        np.testing.assert_array_equal(np.asarray(ret), want_ret)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
def test_gae_leading_batch_dims(transform, batch_shape):
    t_len = 7
    r, v, d, m = make_data(3, (*batch_shape, t_len), mask_kind="holes")
    adv, ret = transform(gae)(*_j(r, v, d), 0.95, 0.9, m)
    assert adv.shape == ret.shape == (*batch_shape, t_len)
    want_adv, want_ret = np_gae(r, v, d, 0.95, 0.9, m)
    assert_close(adv, want_adv, np.float64, atol=1e-13)
    assert_close(ret, want_ret, np.float64, atol=1e-13)
    if batch_shape:  # rows are independent: the flattened batch gives the same numbers
        flat = gae(
            *_j(r.reshape(-1, t_len), v.reshape(-1, t_len + 1), d.reshape(-1, t_len)),
            0.95,
            0.9,
            m.reshape(-1, t_len),
        )[0]
        np.testing.assert_array_equal(np.asarray(flat).reshape(adv.shape), np.asarray(adv))


@settings(max_examples=8)
@given(**ROLLOUT_ST, seed=st.integers(0, 2**16))
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gae_lam1_is_discounted_returns_minus_values(
    transform, batch, t_len, mask_kind, gamma, seed
):
    r, v, d, m = make_data(seed, (batch, t_len), mask_kind=mask_kind)
    adv, ret = transform(gae)(*_j(r, v, d), gamma, 1.0, *_j(m))
    g = transform(discounted_returns)(*_j(r, d), gamma, jnp.asarray(v[..., -1]), *_j(m))
    valid = np.ones(r.shape, bool) if m is None else m
    want = np.where(valid, np.asarray(g) - v[..., :-1], 0.0)
    # two different summation orders of the same O(1) terms: floor 1e-12 (module docstring)
    assert_close(adv, want, np.float64, atol=1e-12)
    assert_close(ret, np.asarray(g), np.float64, atol=1e-12)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("mask_kind", ["none", "mixed"])
def test_gae_lam0_is_one_step_td_error(transform, mask_kind):
    r, v, d, m = make_data(4, (3, 7), mask_kind=mask_kind)
    adv, ret = transform(functools.partial(gae, gamma=0.9, lam=0.0))(*_j(r, v, d), mask=m)
    valid = np.ones(r.shape, bool) if m is None else m
    # V_next = value of the next valid step, or the bootstrap V_T after the last valid one
    v_next = np.empty(r.shape)
    for b, t in np.ndindex(r.shape):
        later = [s for s in range(t + 1, r.shape[-1]) if valid[b, s]]
        v_next[b, t] = v[b, later[0]] if later else v[b, -1]
    td = r + 0.9 * (1.0 - d) * v_next - v[:, :-1]
    assert_close(adv, np.where(valid, td, 0.0), np.float64, atol=1e-15)
    assert_close(ret, np.where(valid, td + v[:, :-1], 0.0), np.float64, atol=1e-15)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("t_done", [0, 3, 6])
def test_gae_done_stops_bootstrapping(transform, t_done):
    t_len = 7
    r, v, d, _ = make_data(5, (3, t_len), p_done=0.0)
    f = transform(functools.partial(gae, gamma=0.99, lam=0.95))
    rng = np.random.default_rng(6)
    v2 = v.copy()
    v2[:, t_done + 1 :] += rng.normal(0.0, 5.0, v2[:, t_done + 1 :].shape)  # incl. bootstrap
    r2 = r.copy()
    r2[:, t_done + 1 :] += 1.0

    d_done = d.copy()
    d_done[:, t_done] = 1.0
    adv, _ = f(*_j(r, v, d_done))
    adv2, _ = f(*_j(r2, v2, d_done))
    # nothing after the episode end reaches steps <= t_done (the terms are multiplied by 0)
    np.testing.assert_array_equal(
        np.asarray(adv2)[:, : t_done + 1], np.asarray(adv)[:, : t_done + 1]
    )
    np.testing.assert_allclose(np.asarray(adv)[:, t_done], r[:, t_done] - v[:, t_done], rtol=1e-15)
    if t_done + 1 < t_len:  # ...but it does reach the later steps
        assert np.all(np.asarray(adv2)[:, t_done + 1] != np.asarray(adv)[:, t_done + 1])

    # without the done, the perturbed V_{t+1} does change A_t: the check above can fail
    adv_nd, _ = f(*_j(r, v, d))
    adv2_nd, _ = f(*_j(r2, v2, d))
    assert np.all(np.asarray(adv2_nd)[:, t_done] != np.asarray(adv_nd)[:, t_done])


@settings(max_examples=8)
@given(
    t_compact=st.sampled_from([1, 4]),
    # always 3 padded columns (few distinct shapes); positions >= t_compact are right padding
    pad_positions=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gae_padding_columns_are_not_steps(transform, t_compact, pad_positions, seed):
    # Inserting padded columns anywhere (left, right, holes), filled with nan, leaves the
    # advantages of the real steps unchanged and gives 0 at the padding.
    r, v, d, _ = make_data(seed, (3, t_compact))
    cols = list(range(t_compact))
    for p in sorted(pad_positions, reverse=True):
        cols.insert(min(p, len(cols)), -1)
    t_len = len(cols)
    real = np.array([c >= 0 for c in cols])
    idx = np.array([max(c, 0) for c in cols])
    rp = np.where(real, r[:, idx], np.nan)
    dp = np.where(real, d[:, idx], np.nan)
    vp = np.concatenate([np.where(real, v[:, idx], np.nan), v[:, -1:]], axis=1)
    mp = np.broadcast_to(real, (3, t_len))
    # gamma, lam traced (a fresh partial per example would recompile under jit)
    adv_p, ret_p = transform(gae)(*_j(rp, vp, dp), 0.9, 0.8, jnp.asarray(mp))
    adv, ret = transform(gae)(*_j(r, v, d), 0.9, 0.8)
    adv_p, ret_p = np.asarray(adv_p), np.asarray(ret_p)
    assert np.all(np.isfinite(adv_p)) and np.all(np.isfinite(ret_p))
    np.testing.assert_allclose(adv_p[:, real], np.asarray(adv), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ret_p[:, real], np.asarray(ret), rtol=1e-12, atol=1e-15)
    assert np.all(adv_p[:, ~real] == 0.0) and np.all(ret_p[:, ~real] == 0.0)


def test_gae_shape_errors():
    """Every shape error names the layout (time last) and the shapes given."""
    r, v, d = jnp.zeros((2, 5)), jnp.zeros((2, 6)), jnp.zeros((2, 5))
    layout = r"gae expects time on the LAST axis.*values \[\.\.\., T \+ 1\]"
    for f in (gae, jax.jit(gae)):
        for bad_v in (jnp.zeros((2, 5)), jnp.zeros((2, 7))):  # values need exactly T + 1
            with pytest.raises(
                ValueError, match=layout + ".*" + re.escape(f"values {bad_v.shape}")
            ):
                f(r, bad_v, d)
        with pytest.raises(ValueError, match="no time axis"):
            f(jnp.zeros(()), jnp.zeros((1,)), jnp.zeros(()))
        with pytest.raises(ValueError, match=r"LAST axis.*dones \(2, 4\)"):
            f(r, v, jnp.zeros((2, 4)))
        with pytest.raises(ValueError, match=r"LAST axis.*mask \(2, 4\)"):
            f(r, v, d, 0.9, 0.9, jnp.ones((2, 4)))
        with pytest.raises(ValueError, match=r"LAST axis.*values \(3, 6\)"):
            f(r, jnp.zeros((3, 6)), d)  # values batch
        with pytest.raises(ValueError, match=r"LAST axis.*values \(6,\)"):
            f(r, jnp.zeros((6,)), d)  # values rank


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gae_time_first_input_is_named(transform):
    """rlax's layout (time first: rewards [T, B], values [T + 1, B]) fails with a message that
    says so; moving time last gives the numpy reference's answer."""
    r, v, d, _ = make_data(3, (4, 9))  # [B=4, T=9], values [4, 10]
    r_tb, v_tb, d_tb = r.T, v.T, d.T  # as rlax and many rollout loops hold them
    with pytest.raises(ValueError, match=r"time-first.*rlax.*moveaxis"):
        transform(gae)(*_j(r_tb, v_tb, d_tb))
    moved = [np.moveaxis(x, 0, -1) for x in (r_tb, v_tb, d_tb)]
    got = transform(gae)(*_j(*moved))
    want = np_gae(r, v, d, 0.99, 0.95)
    assert_close(got[0], want[0], np.float64)
    assert_close(got[1], want[1], np.float64)
    with pytest.raises(ValueError, match=r"discounted_returns.*time-first"):
        transform(discounted_returns)(*_j(r.T, d.T), 0.9, jnp.asarray(v[:, -1]))


# ---------------------------------------------------------------------------------------------
# discounted_returns
# ---------------------------------------------------------------------------------------------


@settings(max_examples=8)
@given(
    **ROLLOUT_ST,
    with_bootstrap=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_discounted_returns_matches_numpy_loop(
    transform, batch, t_len, mask_kind, gamma, with_bootstrap, seed
):
    r, v, d, m = make_data(seed, (batch, t_len), mask_kind=mask_kind)
    boot = v[:, -1] if with_bootstrap else None
    got = transform(discounted_returns)(*_j(r, d), gamma, *_j(boot, m))
    assert_close(got, np_discounted_returns(r, d, gamma, boot, m), np.float64, atol=1e-13)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_discounted_returns_hand_computed(transform):
    # r = [1, 2, 3], gamma = 0.5, bootstrap 4: G_2 = 3 + 2 = 5, G_1 = 2 + 2.5 = 4.5,
    # G_0 = 1 + 2.25 = 3.25. With done at step 1: G_1 = 2, G_0 = 1 + 1 = 2. With a hole at
    # step 1: G_1 = 0 and G_0 = 1 + 0.5 * 5 = 3.5. No bootstrap: G = [2.75, 3.5, 3].
    r = jnp.array([[1.0, 2.0, 3.0]] * 4)
    d = jnp.array([[0.0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]])
    m = jnp.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 1]])
    boot = jnp.array([4.0, 4.0, 4.0, 0.0])
    got = transform(functools.partial(discounted_returns, gamma=0.5))(
        r, d, bootstrap_value=boot, mask=m
    )
    want = [[3.25, 4.5, 5.0], [2.0, 2.0, 5.0], [3.5, 0.0, 5.0], [2.75, 3.5, 3.0]]
    np.testing.assert_array_equal(np.asarray(got), want)
    no_boot = transform(functools.partial(discounted_returns, gamma=0.5))(r[:1], d[:1])
    np.testing.assert_array_equal(np.asarray(no_boot), [[2.75, 3.5, 3.0]])


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
def test_discounted_returns_leading_batch_dims_and_float32(transform, batch_shape):
    for dtype in (np.float64, np.float32):
        r, v, d, m = make_data(7, (*batch_shape, 7), dtype, mask_kind="holes")
        boot = v[..., -1]
        got = transform(functools.partial(discounted_returns, gamma=0.9))(
            *_j(r, d), bootstrap_value=jnp.asarray(boot), mask=m
        )
        gamma = 0.9 if dtype == np.float64 else np.float32(0.9)  # rounded to the compute dtype
        want = np_discounted_returns(r, d, gamma, boot, m)
        atol = 1e-13 if dtype == np.float64 else 1e-5 * np.abs(r).max()
        assert_close(got, want, dtype, atol=atol)


def test_discounted_returns_shape_errors():
    r = jnp.zeros((2, 5))
    for f in (discounted_returns, jax.jit(discounted_returns)):
        with pytest.raises(ValueError, match=r"LAST axis.*dones \(2, 4\)"):
            f(r, jnp.zeros((2, 4)))
        with pytest.raises(ValueError, match=r"bootstrap_value \[\.\.\.\]; got .*\(3,\)"):
            f(r, jnp.zeros((2, 5)), 0.9, jnp.zeros((3,)))  # bootstrap shape
        with pytest.raises(ValueError, match=r"LAST axis.*mask \(5,\)"):
            f(r, jnp.zeros((2, 5)), 0.9, None, jnp.ones((5,)))  # mask shape
        with pytest.raises(ValueError, match="time axis"):
            f(jnp.zeros(()), jnp.zeros(()))


# ---------------------------------------------------------------------------------------------
# whiten, explained_variance
# ---------------------------------------------------------------------------------------------


def make_whiten_data(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.5, (4, 6)).astype(dtype)
    mask = rng.random((4, 6)) < 0.6
    mask[0, 0] = True
    return x, mask


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_whiten_matches_numpy(transform, shift_mean, with_mask, dtype):
    x, mask = make_whiten_data(8, dtype)
    m = mask if with_mask else None
    got = transform(functools.partial(whiten, shift_mean=shift_mean))(jnp.asarray(x), *_j(m))
    want = np_whiten(x, m, shift_mean)
    # whitened values of O(1) cross 0; their error is ~eps * |x - mean| / std, not relative
    assert_close(got, want, dtype, atol=0.0 if dtype == np.float64 else 1e-6)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_whiten_statistics_over_valid_positions_only(transform):
    x, mask = make_whiten_data(9)
    x[~mask] = 1e6  # huge padding values must not affect the statistics
    got = np.asarray(transform(whiten)(jnp.asarray(x), jnp.asarray(mask)))
    vals = got[mask]
    np.testing.assert_allclose(vals.mean(), 0.0, atol=1e-12)
    # variance is var / (var + eps) with eps = 1e-8 and var ~ 6
    np.testing.assert_allclose(vals.var(), 1.0, rtol=1e-8)
    assert np.all(got[~mask] == 0.0)

    kept = np.asarray(transform(functools.partial(whiten, shift_mean=False))(x, mask))
    np.testing.assert_allclose(kept[mask].mean(), x[mask].mean(), rtol=1e-12)
    np.testing.assert_allclose(kept[mask].std(), 1.0, rtol=1e-8)
    assert np.all(kept[~mask] == 0.0)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_whiten_nan_padding_and_empty_mask(transform):
    x, mask = make_whiten_data(10)
    poisoned = np.where(mask, x, np.nan)
    got = np.asarray(transform(whiten)(jnp.asarray(poisoned), jnp.asarray(mask)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np_whiten(x, mask), rtol=1e-10)
    empty = np.asarray(transform(whiten)(jnp.asarray(x), jnp.zeros(x.shape, bool)))
    np.testing.assert_array_equal(empty, 0.0)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_whiten_constant_input(transform):
    # zero variance: (x - mean) = 0, so 0 (not nan), with eps keeping the rsqrt finite
    x = jnp.full((3, 4), 2.5)
    np.testing.assert_array_equal(np.asarray(transform(whiten)(x)), 0.0)
    kept = transform(functools.partial(whiten, shift_mean=False))(x)
    np.testing.assert_array_equal(np.asarray(kept), 2.5)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_explained_variance_matches_numpy(transform, with_mask):
    rng = np.random.default_rng(11)
    y = rng.normal(0.0, 2.0, (4, 6))
    pred = y + rng.normal(0.0, 1.0, (4, 6))
    mask = rng.random((4, 6)) < 0.7 if with_mask else np.ones((4, 6), bool)
    pred_poisoned = np.where(mask, pred, np.nan) if with_mask else pred
    got = transform(explained_variance)(pred_poisoned, y, mask if with_mask else None)
    want = 1.0 - np.var((y - pred)[mask]) / np.var(y[mask])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10)
    perfect = transform(explained_variance)(y, y, mask if with_mask else None)
    np.testing.assert_allclose(np.asarray(perfect), 1.0, rtol=1e-12)
    constant = transform(explained_variance)(pred, np.full((4, 6), 3.0), None)
    assert np.isnan(np.asarray(constant))
