"""Tests of the pure PPO step :func:`rljax.updates.make_ppo_update` (and its config/state helpers).

Every result is compared with an independent computation:

* a float64 numpy re-implementation of the whole update (minibatch shuffling with the same
  permutations, per-minibatch advantage whitening, the clipped surrogate / clipped value /
  entropy gradients written out by hand for a linear categorical policy and a linear value
  function, SGD with momentum, the target-KL stop and the metric averaging);
* a manual ``optax`` step on ``jax.grad`` of :func:`rljax.ppo.ppo_loss` (itself tested against
  numpy in ``test_ppo.py``), with log-probs / entropies from :mod:`rljax.distributions` and
  advantages whitened in numpy, for categorical and diagonal-Gaussian policies;
* first-order and invariance properties that hold whatever the shuffling protocol.

The permutation protocol reproduced by the references: ``key, epochs_key = split(state.key)``,
then ``order_e = permutation(split(epochs_key, num_epochs)[e], num_rows)`` and minibatch ``j``
of epoch ``e`` is ``order_e[j * m:(j + 1) * m]``.

Everything is float64 (conftest enables x64), so results are compared to 1e-9 relative.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import np_log_softmax

from rljax.distributions import entropy as distribution_entropy
from rljax.distributions import log_prob
from rljax.ppo import ppo_loss
from rljax.updates import PPOConfig, PPOState, init_ppo_state, make_ppo_update

OBS = 3  # observation features
NUM_ACTIONS = 4  # categorical policy
ACT_DIM = 2  # Gaussian policy
ROWS = 16
TIME = 5
WHITEN_EPS = 1e-8  # rljax.advantages.whiten's default
RTOL = 1e-9
ATOL = 1e-12

# A config in which every knob is active on the generated data (checked in the tests).
FULL_CONFIG = dict(
    clip_eps=0.15,
    clip_eps_high=0.4,
    dual_clip=1.3,
    value_clip_eps=0.1,
    value_coef=0.7,
    entropy_coef=0.05,
)


# ---------------------------------------------------------------------------------------------
# Networks: pure functions of param dicts.
# ---------------------------------------------------------------------------------------------


def categorical_policy(params, x):
    return x @ params["W"] + params["b"]


def gaussian_policy(params, x):
    return x @ params["W"] + params["b"], params["log_std"]


def linear_value(params, x):
    return x @ params["v"] + params["c"]


POLICY_FNS = {"categorical": categorical_policy, "gaussian": gaussian_policy}


def init_params(family, seed, value_dim=OBS):
    rng = np.random.default_rng(seed)
    out_dim = NUM_ACTIONS if family == "categorical" else ACT_DIM
    policy = {"W": 0.5 * rng.normal(size=(OBS, out_dim)), "b": 0.3 * rng.normal(size=out_dim)}
    if family == "gaussian":
        policy["log_std"] = -0.3 + 0.2 * rng.normal(size=ACT_DIM)
    value = {"v": rng.normal(size=value_dim), "c": np.float64(rng.normal())}
    to_jnp = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    return to_jnp(policy), to_jnp(value)


def make_batch(family, seed, *, seq=False, value_inputs=False, rows=ROWS):
    """Random batch with a behaviour policy away from ``init_params(family, seed)``.

    ``seq``: ``[rows, time]`` positions with a mask (every row keeps at least one valid one).
    """
    rng = np.random.default_rng(1000 + seed)
    lead = (rows, TIME) if seq else (rows,)
    x = rng.normal(size=(*lead, OBS))
    policy, _ = init_params(family, seed)
    behaviour = {k: np.asarray(v) + 0.3 * rng.normal(size=np.shape(v)) for k, v in policy.items()}
    if family == "categorical":
        log_pi = np_log_softmax(x @ behaviour["W"] + behaviour["b"])
        actions = rng.integers(0, NUM_ACTIONS, size=lead)
        old_logps = np.take_along_axis(log_pi, actions[..., None], axis=-1)[..., 0]
    else:
        mean, log_std = x @ behaviour["W"] + behaviour["b"], behaviour["log_std"]
        actions = mean + np.exp(log_std) * rng.normal(size=mean.shape)
        z = (actions - mean) * np.exp(-log_std)
        old_logps = np.sum(-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi), axis=-1)
    batch = {
        "inputs": x,
        "actions": actions,
        "old_logps": old_logps,
        "advantages": 0.4 + 1.7 * rng.normal(size=lead),
        "returns": rng.normal(size=lead),
        "old_values": rng.normal(size=lead),
    }
    if value_inputs:
        batch["value_inputs"] = rng.normal(size=(*lead, OBS))
    if seq:
        mask = rng.random(lead) < 0.65
        mask[:, 0] = True
        batch["mask"] = mask.astype(np.float64)
    return {k: jnp.asarray(v) for k, v in batch.items()}


class CountState(NamedTuple):
    inner: optax.OptState
    count: jax.Array


def counting(inner):
    """``inner`` plus a count of its ``update`` calls kept in the optimizer state."""

    def init(params):
        return CountState(inner.init(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        updates, inner_state = inner.update(updates, state.inner, params)
        return updates, CountState(inner_state, state.count + 1)

    return optax.GradientTransformation(init, update)


def sgd(lr, momentum=0.0):
    """Counted SGD whose hyperparameters live in the state (``momentum=0`` is plain SGD), so
    that one compiled update serves every learning rate: compilation dominates the run time."""
    return counting(optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum))


SGD = sgd(1.0)  # the update functions are built with this; each state carries its own lr


@functools.cache
def compiled_update(family, cfg):
    return jax.jit(make_ppo_update(POLICY_FNS[family], linear_value, SGD, cfg))


def new_state(family, seed, lr, momentum=0.0, key_seed=None, value_dim=OBS):
    policy, value = init_params(family, seed, value_dim)
    key = jax.random.key(seed if key_seed is None else key_seed)
    return init_ppo_state(policy, value, sgd(lr, momentum), key)


def permutations(key, num_epochs, num_rows):
    _, epochs_key = jax.random.split(key)
    return [
        np.asarray(jax.random.permutation(k, num_rows))
        for k in jax.random.split(epochs_key, num_epochs)
    ]


def key_data(key):
    return np.asarray(
        jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    )


def assert_tree_close(actual, expected, rtol=RTOL, atol=ATOL):
    actual, expected = jax.tree.map(np.asarray, (actual, expected))
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def trees_differ(a, b, tol=1e-6):
    return any(
        not np.allclose(x, y, rtol=tol, atol=tol)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ---------------------------------------------------------------------------------------------
# Independent numpy float64 reference (linear categorical policy, linear value function).
# ---------------------------------------------------------------------------------------------


def np_whiten(a, valid):
    a = np.asarray(a, np.float64)
    mean = a[valid].mean()
    var = np.square(a[valid] - mean).mean()
    return (a - mean) / np.sqrt(var + WHITEN_EPS)


def np_minibatch(params, mb, cfg: PPOConfig):
    """Metrics of ``ppo_loss`` at ``params`` on a minibatch and the gradient, by hand."""
    W, b = params["policy"]["W"], params["policy"]["b"]
    v, c = params["value"]["v"], params["value"]["c"]
    valid = mb["mask"].astype(bool) if "mask" in mb else np.ones(mb["advantages"].shape, bool)
    x = mb["inputs"][valid]
    xv = mb.get("value_inputs", mb["inputs"])[valid]
    actions = mb["actions"][valid]
    old_logps, returns, old_values = (
        mb["old_logps"][valid],
        mb["returns"][valid],
        mb["old_values"][valid],
    )
    adv = mb["advantages"]
    adv = (np_whiten(adv, valid) if cfg.normalize_advantages else adv)[valid]
    n = len(adv)
    rows = np.arange(n)

    # Policy: loss = -min(r A, clip(r) A), then the dual clip min(., -c A) for A < 0.
    log_pi = np_log_softmax(x @ W + b)
    pi = np.exp(log_pi)
    logps = log_pi[rows, actions]
    log_ratio = logps - old_logps
    r = np.exp(log_ratio)
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    r_clip = np.clip(r, 1 - cfg.clip_eps, 1 + high)
    unclipped, clipped = -adv * r, -adv * r_clip
    # d loss / d logp: -A r on the unclipped branch (also where the two coincide), else 0.
    policy_loss = np.maximum(unclipped, clipped)
    dloss_dlogp = np.where(unclipped >= clipped, -adv * r, 0.0)
    clip_active = clipped > unclipped
    if cfg.dual_clip is not None:
        dual = (adv < 0) & (policy_loss > -cfg.dual_clip * adv)
        policy_loss = np.where(dual, -cfg.dual_clip * adv, policy_loss)
        dloss_dlogp = np.where(dual, 0.0, dloss_dlogp)
        clip_active = clip_active | dual
    entropy = -(pi * log_pi).sum(-1)
    onehot = np.eye(NUM_ACTIONS)[actions]
    dentropy_dz = -pi * (log_pi + entropy[:, None])
    dz = (dloss_dlogp[:, None] * (onehot - pi) - cfg.entropy_coef * dentropy_dz) / n

    # Value: 0.5 max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, +-eps).
    values = xv @ v + c
    error = np.square(values - returns)
    if cfg.value_clip_eps is None:
        value_loss, dvalue, value_clip_active = 0.5 * error, values - returns, np.zeros(n, bool)
    else:
        eps = cfg.value_clip_eps
        inside = np.abs(values - old_values) <= eps
        values_clipped = old_values + np.clip(values - old_values, -eps, eps)
        error_clipped = np.square(values_clipped - returns)
        value_loss = 0.5 * np.maximum(error, error_clipped)
        dvalue = np.where(
            error >= error_clipped,
            values - returns,
            np.where(inside, values_clipped - returns, 0.0),
        )
        value_clip_active = ~inside & (error_clipped > error)
    dvalue = cfg.value_coef * dvalue / n

    grads = {
        "policy": {"W": x.T @ dz, "b": dz.sum(0)},
        "value": {"v": xv.T @ dvalue, "c": dvalue.sum()},
    }
    metrics = {
        "policy/clipfrac": clip_active.mean(),
        "policy/approxkl": (0.5 * log_ratio**2).mean(),
        "policy/approxkl_k3": (np.expm1(log_ratio) - log_ratio).mean(),
        "policy/ratio": r.mean(),
        "policy/ratio_max": r.max(),
        "policy/entropy": entropy.mean(),
        "val/clipfrac": value_clip_active.mean(),
        "val/vpred": values.mean(),
        "val/error": error.mean(),
        "count": float(n),
        "loss/policy": policy_loss.mean(),
        "loss/value": value_loss.mean(),
        "loss/total": policy_loss.mean()
        + cfg.value_coef * value_loss.mean()
        - cfg.entropy_coef * entropy.mean(),
    }
    return metrics, grads


def np_ppo_update(params, batch, cfg: PPOConfig, key, lr, momentum, kls=None):
    """The whole update in numpy: shuffled minibatches, SGD(momentum), target-KL stop.

    Returns ``(params, mean metrics of the steps taken, steps taken, stopped)``; appends each
    visited minibatch's KL estimate (measured before its step) to ``kls`` if given."""
    params = jax.tree.map(lambda a: np.array(a, np.float64), params)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    trace = jax.tree.map(np.zeros_like, params)
    num_rows = batch["advantages"].shape[0]
    m = num_rows // cfg.num_minibatches
    taken, stopped = [], False
    for order in permutations(key, cfg.num_epochs, num_rows):
        for j in range(cfg.num_minibatches):
            mb = {k: v[order[j * m : (j + 1) * m]] for k, v in batch.items()}
            metrics, grads = np_minibatch(params, mb, cfg)
            if kls is not None and not stopped:
                kls.append(metrics["policy/approxkl_k3"])
            if cfg.target_kl is not None and metrics["policy/approxkl_k3"] > cfg.target_kl:
                stopped = True
            if stopped:
                continue
            trace = jax.tree.map(lambda t, g: g + momentum * t, trace, grads)
            params = jax.tree.map(lambda p, t: p - lr * t, params, trace)
            taken.append(metrics)
    mean_metrics = {k: np.mean([s[k] for s in taken]) for k in taken[0]} if taken else {}
    return params, mean_metrics, len(taken), stopped


# ---------------------------------------------------------------------------------------------
# Reference with jax.grad of rljax.ppo.ppo_loss (any policy family).
# ---------------------------------------------------------------------------------------------


def knobs_of(cfg: PPOConfig):
    """The numeric settings of ``cfg`` as a pytree (traced, so changing a value compiles once)."""
    return {name: getattr(cfg, name) for name in FULL_CONFIG}


def reference_loss(params, batch, advantages, policy_fn, knobs):
    outputs = policy_fn(params["policy"], batch["inputs"])
    values = linear_value(params["value"], batch.get("value_inputs", batch["inputs"]))
    loss, _ = ppo_loss(
        log_prob(outputs, batch["actions"]),
        batch["old_logps"],
        advantages,
        values,
        batch["old_values"],
        batch["returns"],
        distribution_entropy(outputs),
        batch.get("mask"),
        **knobs,
    )
    return loss


_reference_grads = jax.jit(jax.grad(reference_loss), static_argnums=3)


def reference_grads(params, batch, policy_fn, cfg: PPOConfig, knobs=None):
    """``jax.grad`` of ``ppo_loss`` on one (mini)batch, advantages whitened in numpy."""
    adv = np.asarray(batch["advantages"])
    if cfg.normalize_advantages:
        valid = (
            np.asarray(batch["mask"]).astype(bool) if "mask" in batch else np.ones(adv.shape, bool)
        )
        adv = np.where(valid, np_whiten(adv, valid), 0.0)
    knobs = knobs_of(cfg) if knobs is None else knobs
    return _reference_grads(params, batch, jnp.asarray(adv), policy_fn, knobs)


def reference_loop(params, batch, policy_fn, optimizer, cfg: PPOConfig, key):
    """Python loop over epochs / minibatches with ``reference_grads`` (no target-KL)."""
    opt_state = optimizer.init(params)
    num_rows = batch["advantages"].shape[0]
    m = num_rows // cfg.num_minibatches
    for order in permutations(key, cfg.num_epochs, num_rows):
        for j in range(cfg.num_minibatches):
            idx = order[j * m : (j + 1) * m]
            mb = {k: v[idx] for k, v in batch.items()}
            grads = reference_grads(params, mb, policy_fn, cfg)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
    return params


CFG_1 = PPOConfig(**FULL_CONFIG, num_epochs=1, num_minibatches=1)
CFG_32 = PPOConfig(**FULL_CONFIG, num_epochs=3, num_minibatches=2)
CFG_KL = dataclasses.replace(CFG_32, target_kl=0.2)
CFG_TINY_KL = dataclasses.replace(CFG_32, target_kl=1e-9)
CFG_MASKED = PPOConfig(**FULL_CONFIG, num_epochs=2, num_minibatches=2, target_kl=2.0)


# ---------------------------------------------------------------------------------------------
# 1. One step (1 epoch, 1 minibatch) equals a manual optax step on grad(ppo_loss).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, seq, normalize",
    [
        ("categorical", False, True),
        ("categorical", True, False),
        ("gaussian", False, False),
        ("gaussian", True, True),
    ],
)
def test_single_step_equals_manual_optax_step(family, seq, normalize):
    lr = 0.3
    cfg = dataclasses.replace(CFG_1, normalize_advantages=normalize)
    state = new_state(family, 3, lr)
    batch = make_batch(family, 3, seq=seq)
    new, metrics = compiled_update(family, cfg)(state, batch)

    grads = reference_grads(state.params, batch, POLICY_FNS[family], cfg)
    optimizer = optax.sgd(lr)
    updates, _ = optimizer.update(grads, optimizer.init(state.params), state.params)
    assert_tree_close(new.params, optax.apply_updates(state.params, updates))
    assert float(metrics["updates"]) == 1.0
    assert not bool(metrics["early_stopped"])
    assert int(new.step) == 1

    # Every setting changes the reference on this data, so each one is checked above. "Off"
    # values keep the pytree structure of the settings (no recompilation): a dual clip or value
    # clip of 1e9 never binds; clip_eps_high = clip_eps is the symmetric clip.
    for name, off in [
        ("clip_eps_high", cfg.clip_eps),
        ("dual_clip", 1e9),
        ("value_clip_eps", 1e9),
        ("value_coef", 0.5),
        ("entropy_coef", 0.0),
    ]:
        knobs = dict(knobs_of(cfg), **{name: off})
        other = reference_grads(state.params, batch, POLICY_FNS[family], cfg, knobs)
        assert trees_differ(other, grads), name
    flipped = dataclasses.replace(cfg, normalize_advantages=not normalize)
    assert trees_differ(reference_grads(state.params, batch, POLICY_FNS[family], flipped), grads)


def test_single_step_categorical_matches_numpy_reference():
    state = new_state("categorical", 1, 0.3)
    batch = make_batch("categorical", 1)
    new, metrics = compiled_update("categorical", CFG_1)(state, batch)
    expected, expected_metrics, steps, stopped = np_ppo_update(
        state.params, batch, CFG_1, state.key, lr=0.3, momentum=0.0
    )
    assert steps == 1 and not stopped
    assert_tree_close(new.params, expected)
    assert_tree_close({k: metrics[k] for k in expected_metrics}, expected_metrics)


# ---------------------------------------------------------------------------------------------
# 2. Minibatches and epochs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_epochs, num_minibatches, seq", [(1, 4, False), (3, 2, False), (2, 2, True)]
)
def test_epochs_and_minibatches_match_numpy_reference(num_epochs, num_minibatches, seq):
    cfg = PPOConfig(**FULL_CONFIG, num_epochs=num_epochs, num_minibatches=num_minibatches)
    lr, momentum = 0.2, 0.7  # momentum: the optimizer state is threaded through every step
    state = new_state("categorical", 2, lr, momentum, key_seed=5)
    batch = make_batch("categorical", 2, seq=seq)
    update = compiled_update("categorical", cfg)
    new, metrics = update(state, batch)

    expected, expected_metrics, steps, stopped = np_ppo_update(
        state.params, batch, cfg, state.key, lr, momentum
    )
    assert steps == num_epochs * num_minibatches and not stopped
    assert_tree_close(new.params, expected)
    assert_tree_close({k: metrics[k] for k in expected_metrics}, expected_metrics)
    assert int(new.opt_state.count) == num_epochs * num_minibatches
    assert float(metrics["updates"]) == num_epochs * num_minibatches
    assert not bool(metrics["early_stopped"])

    # The key advances as documented and the step counter increments.
    assert np.array_equal(key_data(new.key), key_data(jax.random.split(state.key)[0]))
    assert not np.array_equal(key_data(new.key), key_data(state.key))
    assert int(new.step) == 1
    again, _ = update(new, batch)
    assert int(again.step) == 2
    assert int(again.opt_state.count) == 2 * num_epochs * num_minibatches
    assert np.array_equal(key_data(again.key), key_data(jax.random.split(new.key)[0]))


def test_each_row_used_once_per_epoch_first_order():
    """Independent of the shuffling protocol: at a tiny learning rate the total SGD move is, to
    first order, ``-lr`` times the sum over the minibatch steps of the minibatch gradients at
    the start. That sum is ``epochs * minibatches`` times the full-batch gradient only if every
    row lies in exactly one equal-sized minibatch per epoch (the loss is a per-row mean and the
    advantages are not whitened, so the gradient is additive over rows)."""
    num_epochs, num_minibatches, lr = 3, 4, 1e-7
    cfg = PPOConfig(
        **FULL_CONFIG,
        num_epochs=num_epochs,
        num_minibatches=num_minibatches,
        normalize_advantages=False,
    )
    state = new_state("categorical", 3, lr, key_seed=11)
    batch = make_batch("categorical", 3)
    new, metrics = compiled_update("categorical", cfg)(state, batch)
    assert float(metrics["updates"]) == num_epochs * num_minibatches
    _, full_grads = np_minibatch(
        jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, batch), cfg
    )
    move = jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / lr, new.params, state.params)
    expected = jax.tree.map(lambda g: -num_epochs * num_minibatches * g, full_grads)
    assert_tree_close(move, expected, rtol=1e-4, atol=1e-8)


def test_shuffling_depends_on_key():
    batch = make_batch("categorical", 4)
    state = new_state("categorical", 4, 0.3)
    other_key = state._replace(key=jax.random.key(123))
    update = compiled_update("categorical", CFG_32)
    assert trees_differ(update(state, batch)[0].params, update(other_key, batch)[0].params)
    # With one full-batch minibatch the order is irrelevant (up to summation order).
    update = compiled_update("categorical", CFG_1)
    assert_tree_close(
        update(state, batch)[0].params, update(other_key, batch)[0].params, rtol=1e-12
    )


def test_gaussian_multi_step_adam_matches_loop_reference():
    cfg = PPOConfig(**FULL_CONFIG, num_epochs=2, num_minibatches=2)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
    policy, value = init_params("gaussian", 5)
    state = init_ppo_state(policy, value, optimizer, jax.random.key(2))
    batch = make_batch("gaussian", 5, seq=True)
    new, metrics = jax.jit(make_ppo_update(gaussian_policy, linear_value, optimizer, cfg))(
        state, batch
    )
    expected = reference_loop(state.params, batch, gaussian_policy, optimizer, cfg, state.key)
    assert_tree_close(new.params, expected)
    assert float(metrics["updates"]) == 4.0


# ---------------------------------------------------------------------------------------------
# 3. Target-KL early stop.
# ---------------------------------------------------------------------------------------------


def test_target_kl_stops_midway_and_matches_reference():
    lr = 2.0
    state = new_state("categorical", 5, lr)
    batch = make_batch("categorical", 5)
    new, metrics = compiled_update("categorical", CFG_KL)(state, batch)

    expected, expected_metrics, steps, stopped = np_ppo_update(
        state.params, batch, CFG_KL, state.key, lr, 0.0
    )
    assert stopped and 1 < steps < CFG_KL.num_epochs * CFG_KL.num_minibatches
    assert bool(metrics["early_stopped"])
    assert float(metrics["updates"]) == steps
    assert int(new.opt_state.count) == steps  # no optimizer step after the stop
    # Params stop changing at the stop; metrics are means over the steps taken only.
    assert_tree_close(new.params, expected)
    assert_tree_close({k: metrics[k] for k in expected_metrics}, expected_metrics)
    assert int(new.step) == 1

    # Without a target the same update takes every step.
    full, full_metrics = compiled_update("categorical", CFG_32)(state, batch)
    assert not bool(full_metrics["early_stopped"])
    assert float(full_metrics["updates"]) == 6.0
    assert int(full.opt_state.count) == 6
    assert trees_differ(full.params, new.params)
    expected_full, _, steps_full, _ = np_ppo_update(state.params, batch, CFG_32, state.key, lr, 0.0)
    assert steps_full == 6
    assert_tree_close(full.params, expected_full)


def test_target_kl_threshold_is_exact():
    """A target between the KL of step ``j`` and every earlier one stops exactly there: the
    threshold is applied to the k3 estimate measured before each step."""
    lr = 1.0
    state = new_state("categorical", 5, lr)
    batch = make_batch("categorical", 5)
    kls = []
    np_ppo_update(state.params, batch, CFG_32, state.key, lr, 0.0, kls=kls)
    j = max(range(2, 6), key=lambda j: kls[j] / max(kls[:j]))
    assert kls[j] > 1.2 * max(kls[:j]), kls
    cfg = dataclasses.replace(CFG_32, target_kl=0.5 * (kls[j] + max(kls[:j])))
    new, metrics = compiled_update("categorical", cfg)(state, batch)
    assert bool(metrics["early_stopped"])
    assert float(metrics["updates"]) == j
    expected, expected_metrics, steps, _ = np_ppo_update(
        state.params, batch, cfg, state.key, lr, 0.0
    )
    assert steps == j
    assert_tree_close(new.params, expected)
    assert_tree_close({k: metrics[k] for k in expected_metrics}, expected_metrics)


def test_target_kl_tiny_stops_after_first_step():
    """At the behaviour policy the first minibatch's KL is 0 and its step is taken; after one
    large step any tiny target is exceeded."""
    lr = 5.0
    state = new_state("categorical", 7, lr, momentum=0.9)
    batch = dict(make_batch("categorical", 7))
    policy = jax.tree.map(np.asarray, state.params["policy"])
    log_pi = np_log_softmax(np.asarray(batch["inputs"]) @ policy["W"] + policy["b"])
    actions = np.asarray(batch["actions"])
    batch["old_logps"] = jnp.asarray(np.take_along_axis(log_pi, actions[:, None], axis=-1)[:, 0])
    new, metrics = compiled_update("categorical", CFG_TINY_KL)(state, batch)
    assert bool(metrics["early_stopped"])
    assert float(metrics["updates"]) == 1.0
    assert int(new.opt_state.count) == 1
    expected, _, steps, _ = np_ppo_update(state.params, batch, CFG_TINY_KL, state.key, lr, 0.9)
    assert steps == 1
    assert_tree_close(new.params, expected)
    np.testing.assert_allclose(metrics["policy/approxkl_k3"], 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics["policy/ratio"], 1.0, rtol=1e-12)


def test_target_kl_exceeded_before_first_step_leaves_state():
    state = new_state("categorical", 8, 1.0, momentum=0.9)
    batch = make_batch("categorical", 8)  # the behaviour policy differs from the current one
    new, metrics = compiled_update("categorical", CFG_TINY_KL)(state, batch)
    assert bool(metrics["early_stopped"])
    assert float(metrics["updates"]) == 0.0
    assert_tree_close(new.params, state.params, rtol=0, atol=0)
    assert_tree_close(new.opt_state, state.opt_state, rtol=0, atol=0)
    assert int(new.step) == 1
    assert float(metrics["loss/total"]) == 0.0  # no step to average over


def test_metrics_of_steps_not_taken_do_not_leak():
    state = new_state("categorical", 8, 1.0)
    batch = dict(make_batch("categorical", 8))
    old_logps = np.asarray(batch["old_logps"]).copy()
    old_logps[3] = -800.0  # the ratio overflows: the KL estimate k3 is inf and stops the update
    batch["old_logps"] = jnp.asarray(old_logps)
    new, metrics = compiled_update("categorical", CFG_TINY_KL)(state, batch)
    assert bool(metrics["early_stopped"]) and float(metrics["updates"]) == 0.0
    assert_tree_close(new.params, state.params, rtol=0, atol=0)
    for name, value in metrics.items():
        assert np.isfinite(float(value)), name


def test_no_target_kl_never_stops_even_when_kl_is_huge():
    state = new_state("categorical", 9, 20.0)
    new, metrics = compiled_update("categorical", CFG_32)(state, make_batch("categorical", 9))
    assert not bool(metrics["early_stopped"])
    assert float(metrics["updates"]) == 6.0
    assert int(new.opt_state.count) == 6
    assert float(metrics["policy/approxkl_k3"]) > 0.1


# ---------------------------------------------------------------------------------------------
# 4. Masked positions.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["categorical", "gaussian"])
def test_masked_positions_do_not_affect_update(family):
    update = compiled_update(family, CFG_MASKED)
    state = new_state(family, 10, 0.1, momentum=0.5)
    batch = make_batch(family, 10, seq=True, value_inputs=True)
    padded = np.asarray(batch["mask"]) == 0
    assert padded.any()

    rng = np.random.default_rng(99)
    scrambled = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if k == "mask":
            noise = v
        elif k == "actions" and family == "categorical":
            noise = rng.integers(0, NUM_ACTIONS, size=v.shape)
        else:
            noise = 50.0 * rng.normal(size=v.shape)
        where = padded.reshape(padded.shape + (1,) * (v.ndim - padded.ndim))
        scrambled[k] = jnp.asarray(np.where(where, noise, v))
    assert trees_differ(scrambled, batch)

    a, metrics_a = update(state, batch)
    b, metrics_b = update(state, scrambled)
    assert float(metrics_a["updates"]) > 0
    assert_tree_close(b.params, a.params, rtol=1e-12, atol=1e-14)
    assert_tree_close(metrics_b, metrics_a, rtol=1e-12, atol=1e-14)

    # The mask matters: with every position valid the scrambled values are used.
    c, _ = update(state, dict(scrambled, mask=jnp.ones_like(batch["mask"])))
    assert trees_differ(c.params, a.params)


def test_non_finite_padding_does_not_affect_update():
    update = compiled_update("categorical", CFG_MASKED)
    state = new_state("categorical", 10, 0.1)
    batch = make_batch("categorical", 10, seq=True, value_inputs=True)
    padded = np.asarray(batch["mask"]) == 0
    fills = {"old_logps": -1e9, "advantages": np.inf, "returns": np.nan, "old_values": np.inf}
    dirty = dict(batch)
    for k, fill in fills.items():
        dirty[k] = jnp.asarray(np.where(padded, fill, np.asarray(batch[k])))
    a, metrics_a = update(state, batch)
    b, metrics_b = update(state, dirty)
    assert_tree_close(metrics_b, metrics_a, rtol=1e-12, atol=1e-14)
    assert_tree_close(b.params, a.params, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 5. value_inputs, pytree inputs.
# ---------------------------------------------------------------------------------------------


def test_value_inputs_feed_the_value_function():
    lr = 0.2
    update = compiled_update("categorical", CFG_32)
    state = new_state("categorical", 11, lr, key_seed=6)
    batch = make_batch("categorical", 11)
    rng = np.random.default_rng(7)
    with_vi = dict(batch, value_inputs=jnp.asarray(rng.normal(size=(ROWS, OBS))))
    a, _ = update(state, with_vi)
    b, _ = update(state, batch)
    expected, *_ = np_ppo_update(state.params, with_vi, CFG_32, state.key, lr, 0.0)
    assert_tree_close(a.params, expected)
    # Only the value function sees value_inputs (the two losses share no parameters).
    assert_tree_close(a.params["policy"], b.params["policy"], rtol=1e-12)
    assert trees_differ(a.params["value"], b.params["value"])


def test_pytree_inputs():
    """``inputs`` may be a pytree; every leaf is shuffled with the same permutation."""
    join = lambda inputs: jnp.concatenate([inputs["a"], inputs["b"]], axis=-1)
    update = jax.jit(
        make_ppo_update(
            lambda p, inputs: categorical_policy(p, join(inputs)),
            lambda p, inputs: linear_value(p, join(inputs)),
            SGD,
            CFG_32,
        )
    )
    state = new_state("categorical", 12, 0.2)
    batch = make_batch("categorical", 12)
    x = np.asarray(batch["inputs"])
    split = dict(batch, inputs={"a": jnp.asarray(x[:, :1]), "b": jnp.asarray(x[:, 1:])})
    new, _ = update(state, split)
    expected, *_ = np_ppo_update(state.params, batch, CFG_32, state.key, 0.2, 0.0)
    assert_tree_close(new.params, expected)


# ---------------------------------------------------------------------------------------------
# 6. Errors and the config / state helpers.
# ---------------------------------------------------------------------------------------------


def test_missing_batch_keys_raise_key_error_naming_them():
    update = make_ppo_update(categorical_policy, linear_value, SGD, CFG_1)
    state = new_state("categorical", 0, 0.1)
    batch = make_batch("categorical", 0)
    for missing in (["returns"], ["old_logps", "old_values"], ["inputs"], ["actions"]):
        partial = {k: v for k, v in batch.items() if k not in missing}
        with pytest.raises(KeyError) as info:
            update(state, partial)
        for name in missing:
            assert name in str(info.value)
        for present in partial:
            assert f"missing ['{present}'" not in str(info.value)


@pytest.mark.parametrize("num_minibatches", [3, 5, 32])
def test_rows_not_divisible_by_minibatches_raise(num_minibatches):
    cfg = PPOConfig(num_epochs=1, num_minibatches=num_minibatches)
    update = make_ppo_update(categorical_policy, linear_value, SGD, cfg)
    with pytest.raises(ValueError, match="num_minibatches"):
        update(new_state("categorical", 0, 0.1), make_batch("categorical", 0))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_epochs=0),
        dict(num_epochs=-1),
        dict(num_minibatches=0),
        dict(target_kl=0.0),
        dict(target_kl=-0.01),
        dict(clip_eps=-0.1),
        dict(clip_eps_high=-0.1),
        dict(dual_clip=1.0),
        dict(dual_clip=0.5),
    ],
)
def test_bad_config_values_raise(kwargs):
    with pytest.raises(ValueError):
        PPOConfig(**kwargs)


def test_good_config_values_accepted():
    PPOConfig(num_epochs=1, num_minibatches=1, target_kl=1e-9, clip_eps=0.0, dual_clip=1.01)
    PPOConfig(value_clip_eps=None, clip_eps_high=None, dual_clip=None, target_kl=None)


@pytest.mark.parametrize("config", [None, {"num_epochs": 1}, dataclasses.asdict(PPOConfig())])
def test_non_ppo_config_raises_type_error(config):
    with pytest.raises(TypeError, match="PPOConfig"):
        make_ppo_update(categorical_policy, linear_value, SGD, config)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PPOConfig().num_epochs = 2


def test_init_ppo_state():
    optimizer = counting(optax.adam(0.1))
    policy, value = init_params("gaussian", 0)
    key = jax.random.key(3)
    state = init_ppo_state(policy, value, optimizer, key)
    assert isinstance(state, PPOState)
    assert_tree_close(state.params, {"policy": policy, "value": value}, rtol=0, atol=0)
    assert int(state.step) == 0 and state.step.dtype == jnp.int32 and state.step.shape == ()
    assert int(state.opt_state.count) == 0
    assert_tree_close(state.opt_state.inner, optimizer.init(state.params).inner, rtol=0, atol=0)
    assert np.array_equal(key_data(state.key), key_data(key))
    # A pytree: it goes through jit.
    roundtrip = jax.jit(lambda s: s)(state)
    assert isinstance(roundtrip, PPOState)
    assert_tree_close(roundtrip.params, state.params, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 7. jit and vmap.
# ---------------------------------------------------------------------------------------------


def test_jit_matches_eager():
    state = new_state("categorical", 5, 2.0)
    batch = make_batch("categorical", 5)
    eager, eager_metrics = make_ppo_update(categorical_policy, linear_value, SGD, CFG_KL)(
        state, batch
    )
    jitted, jit_metrics = compiled_update("categorical", CFG_KL)(state, batch)
    assert 0 < float(eager_metrics["updates"]) < 6  # the target-KL branch is exercised too
    assert_tree_close(jitted.params, eager.params, rtol=1e-12)
    assert_tree_close(jit_metrics, eager_metrics, rtol=1e-12)
    assert np.array_equal(key_data(jitted.key), key_data(eager.key))
    assert int(jitted.step) == int(eager.step) == 1


def test_vmap_over_states_matches_separate_runs():
    lr = 2.0
    update = compiled_update("categorical", CFG_KL)
    batch = make_batch("categorical", 5)
    states = [new_state("categorical", seed, lr) for seed in (1, 5)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    out, out_metrics = jax.jit(jax.vmap(update, in_axes=(0, None)))(stacked, batch)
    steps_taken = []
    for i, state in enumerate(states):
        pick = lambda t, i=i: jax.tree.map(lambda x: x[i], t)
        single, single_metrics = update(state, batch)
        assert_tree_close(pick(out.params), single.params)
        assert_tree_close(pick(out_metrics), single_metrics)
        assert np.array_equal(key_data(pick(out.key)), key_data(single.key))
        assert int(pick(out.step)) == 1
        expected, _, steps, _ = np_ppo_update(state.params, batch, CFG_KL, state.key, lr, 0.0)
        assert_tree_close(pick(out.params), expected)
        assert int(pick(out.opt_state.count)) == steps
        steps_taken.append(steps)
    # The two states stop after different numbers of steps: the stop is per state under vmap.
    assert steps_taken[0] != steps_taken[1] and min(steps_taken) > 0


# ---------------------------------------------------------------------------------------------
# 8. Sanity: repeated updates on a fixed batch improve the clipped surrogate objective.
# ---------------------------------------------------------------------------------------------


def test_repeated_updates_decrease_surrogate_loss():
    cfg = PPOConfig(
        clip_eps=0.2,
        value_clip_eps=None,
        num_epochs=2,
        num_minibatches=2,
        normalize_advantages=False,
    )
    update = compiled_update("categorical", cfg)
    state = new_state("categorical", 16, 0.1)
    batch = make_batch("categorical", 16)
    np_batch = {k: np.asarray(v) for k, v in batch.items()}

    def full_batch_metrics(params):
        return np_minibatch(jax.tree.map(np.asarray, params), np_batch, cfg)[0]

    history = [full_batch_metrics(state.params)]
    for _ in range(15):
        state, _ = update(state, batch)
        history.append(full_batch_metrics(state.params))
    assert int(state.step) == 15
    policy_loss = np.array([m["loss/policy"] for m in history])
    value_error = np.array([m["val/error"] for m in history])
    assert policy_loss[-1] < policy_loss[0] - 0.3
    assert value_error[-1] < 0.5 * value_error[0]
    # Essentially monotone (minibatch steps may jitter near the clipped optimum).
    assert np.all(np.diff(policy_loss) < 0.02)
    assert np.all(np.diff(value_error) < 0.0)
    # The clipped objective is bounded: each term is at least -(1 + eps) A for A > 0 and
    # -(1 - eps) A for A < 0 (every ratio at its favourable clip bound).
    adv = np_batch["advantages"]
    bound = -np.mean(np.where(adv > 0, 1.2 * adv, 0.8 * adv))
    assert policy_loss[-1] >= bound - 1e-12
    assert policy_loss[-1] < bound + 0.1
