"""Swept coefficients of the PPO and TRPO updates are traced (``update(state, batch,
hyperparams)``): a sweep compiles once, each call equals the step built with
``dataclasses.replace(config, **hyperparams)``, and a key the config does not trace (a count, an
unknown name, an optional coefficient the config leaves ``None``, a ``None`` value) raises
``ValueError`` naming it.

Covered: :func:`rljax.updates.make_ppo_update` on a linear categorical policy,
:func:`rljax.updates.make_trpo_update` on the same policy (sweeping ``max_kl``: TRPO has no
``clip_eps``), and
:func:`rljax.updates.make_rlhf_ppo_update` / :func:`rljax.updates.make_rlhf_trpo_update` on a
one-layer float64 Llama. Everything is float64 (conftest enables x64); the traced and the baked
programs may order their sums differently, hence ``rtol=1e-6``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import count_traces, np_log_softmax, one_layer_llama

from rljax import updates
from rljax.models.transformer import Transformer

RTOL, ATOL = 1e-6, 1e-9
OBS, ACTIONS, ROWS = 3, 4, 8
SWEEP = (0.05, 0.2, 0.35)  # clip_eps; the configs below use 0.2


def assert_steps_equal(got, want):
    (state, metrics), (want_state, want_metrics) = got, want
    assert set(metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=RTOL, atol=ATOL, err_msg=key)
    leaves, want_leaves = jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)
    for a, b in zip(leaves, want_leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def sweep_compiles_once(build, config, state, batch, sweeps, check):
    """Step ``build(config)`` jitted through each dict of ``sweeps``: one trace, one cache
    entry; the calls at ``check`` equal the steps built with the replaced config. Returns the
    metrics of every call."""
    counted, traces = count_traces(build(config))
    step = jax.jit(counted)
    results = [step(state, batch, h) for h in sweeps]
    assert len(traces) == 1 and step._cache_size() == 1
    for i in check:
        baked = jax.jit(build(dataclasses.replace(config, **sweeps[i])))
        assert_steps_equal(results[i], baked(state, batch))
    return [metrics for _, metrics in results]


# ---------------------------------------------------------------------------------------------
# PPO on a linear categorical policy
# ---------------------------------------------------------------------------------------------


def policy(params, x):
    return x @ params["W"] + params["b"]


def value(params, x):
    return x @ params["v"] + params["c"]


PPO_CONFIG = updates.PPOConfig(
    clip_eps=0.2, dual_clip=2.0, entropy_coef=0.01, num_epochs=2, num_minibatches=2
)


def linear_problem(init_state, optimizer):
    """``(state, batch)``: ``init_state(policy_params, value_params, optimizer, key)`` of a linear
    categorical policy and value function, and a batch whose behaviour policy is away from the
    current one (ratios far from 1, so the clip matters)."""
    rng = np.random.default_rng(0)
    policy_params = {"W": 0.5 * rng.normal(size=(OBS, ACTIONS)), "b": 0.3 * rng.normal(size=4)}
    value_params = {"v": rng.normal(size=OBS), "c": np.float64(0.1)}
    x = rng.normal(size=(ROWS, OBS))
    behaviour = policy_params["W"] + 0.4 * rng.normal(size=(OBS, ACTIONS))
    actions = rng.integers(0, ACTIONS, ROWS)
    batch = {
        "inputs": x,
        "actions": actions,
        "old_logps": np_log_softmax(x @ behaviour)[np.arange(ROWS), actions],
        "advantages": rng.normal(size=ROWS),
        "returns": rng.normal(size=ROWS),
        "old_values": rng.normal(size=ROWS),
    }
    policy_params, value_params, batch = jax.tree.map(
        jnp.asarray, (policy_params, value_params, batch)
    )
    return init_state(policy_params, value_params, optimizer, jax.random.key(0)), batch


def test_ppo_clip_eps_sweep_compiles_once_and_equals_the_replaced_config():
    optimizer = optax.sgd(0.5)
    state, batch = linear_problem(updates.init_ppo_state, optimizer)
    build = lambda config: updates.make_ppo_update(policy, value, optimizer, config)
    sweeps = [{"clip_eps": c} for c in SWEEP]
    metrics = sweep_compiles_once(build, PPO_CONFIG, state, batch, sweeps, check=(0,))
    clipfracs = [float(m["policy/clipfrac"]) for m in metrics]
    assert clipfracs[0] > clipfracs[2]  # the traced clip range was read
    assert len({float(m["loss/total"]) for m in metrics}) == 3


def test_ppo_every_coefficient_can_be_traced():
    optimizer = optax.sgd(0.5)
    state, batch = linear_problem(updates.init_ppo_state, optimizer)
    config = dataclasses.replace(PPO_CONFIG, clip_eps_high=0.3, value_clip_eps=0.1, target_kl=0.5)
    assert set(config.traced_coefficients()) == {
        "clip_eps", "clip_eps_high", "dual_clip", "value_clip_eps", "value_coef",
        "entropy_coef", "target_kl",
    }  # fmt: skip
    hyperparams = {
        "clip_eps": 0.1,
        "clip_eps_high": 0.25,
        "dual_clip": 1.5,
        "value_clip_eps": 0.3,
        "value_coef": 0.9,
        "entropy_coef": 0.05,
        "target_kl": 0.02,
    }
    build = lambda config: updates.make_ppo_update(policy, value, optimizer, config)
    sweep_compiles_once(build, config, state, batch, [hyperparams], check=(0,))


def test_ppo_keys_the_config_does_not_trace_raise():
    optimizer = optax.sgd(0.5)
    state, batch = linear_problem(updates.init_ppo_state, optimizer)
    update = updates.make_ppo_update(policy, value, optimizer, PPO_CONFIG)
    assert PPO_CONFIG.traced_coefficients() == (
        "clip_eps", "dual_clip", "value_clip_eps", "value_coef", "entropy_coef"
    )  # fmt: skip
    cases = [
        ({"num_epochs": 3}, r"\['num_epochs'\].*num_epochs: not a float coefficient"),
        ({"gamma": 0.9}, r"\['gamma'\].*gamma: not a PPOConfig field.*valid keys: \['clip_eps'"),
        ({"clip_eps_high": 0.3}, r"clip_eps_high: PPOConfig.clip_eps_high is None"),
        ({"target_kl": 0.01}, r"target_kl: PPOConfig.target_kl is None"),
        ({"dual_clip": None}, r"sets \['dual_clip'\] to None"),
    ]
    for hyperparams, message in cases:
        with pytest.raises(ValueError, match=message):
            update(state, batch, hyperparams)
    with pytest.raises(TypeError, match="hyperparams must be a dict"):
        update(state, batch, 0.1)
    # a concrete value goes through the config's own range checks
    with pytest.raises(ValueError, match=r"PPOConfig.clip_eps must be >= 0"):
        update(state, batch, {"clip_eps": -0.1})


# ---------------------------------------------------------------------------------------------
# TRPO on the same linear policy
# ---------------------------------------------------------------------------------------------

TRPO_CONFIG = updates.TRPOConfig(max_kl=0.02, cg_iters=8, n_critic_updates=1, flat_params=True)


def test_trpo_max_kl_sweep_compiles_once_and_equals_the_replaced_config():
    optimizer = optax.sgd(0.1)
    state, batch = linear_problem(updates.init_trpo_state, optimizer)
    build = lambda config: updates.make_trpo_update(policy, value, optimizer, config)
    sweeps = [
        {"max_kl": 0.005, "cg_damping": 0.1, "backtrack_coeff": 0.8, "cg_tol": 1e-10},
        {"max_kl": 0.02, "cg_damping": 0.1, "backtrack_coeff": 0.8, "cg_tol": 1e-10},
        {"max_kl": 0.05, "cg_damping": 0.3, "backtrack_coeff": 0.5, "cg_tol": 1e-12},
    ]
    metrics = sweep_compiles_once(build, TRPO_CONFIG, state, batch, sweeps, check=(2,))
    step_sizes = [float(m["step_size"]) for m in metrics]
    assert step_sizes[0] < step_sizes[1]  # the traced trust region was read
    assert all(float(m["kl"]) <= s["max_kl"] for m, s in zip(metrics, sweeps, strict=True))


def test_trpo_keys_the_config_does_not_trace_raise():
    optimizer = optax.sgd(0.1)
    state, batch = linear_problem(updates.init_trpo_state, optimizer)
    update = updates.make_trpo_update(policy, value, optimizer, TRPO_CONFIG)
    assert TRPO_CONFIG.traced_coefficients() == (
        "max_kl",
        "cg_damping",
        "cg_tol",
        "backtrack_coeff",
    )
    with pytest.raises(ValueError, match=r"make_trpo_update: hyperparams has \['cg_iters'\]"):
        update(state, batch, {"cg_iters": 3})
    with pytest.raises(ValueError, match=r"sets \['max_kl'\] to None"):
        update(state, batch, {"max_kl": None})


# ---------------------------------------------------------------------------------------------
# PPO and TRPO on a language model
# ---------------------------------------------------------------------------------------------

B, P, N, V = 4, 3, 4, 16


def lm_problem():
    config = one_layer_llama(V, param_dtype="float64", dtype="float64")
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(2)
    completion_mask = np.arange(N)[None, :] < rng.integers(1, N + 1, B)[:, None]
    batch = {
        "tokens": rng.integers(0, V, (B, P + N)).astype(np.int32),
        "mask": np.concatenate([np.ones((B, P), bool), completion_mask], axis=1),
        "completion_mask": completion_mask,
        "old_logps": np.where(completion_mask, rng.normal(-2.8, 0.5, (B, N)), 0.0),
        "advantages": np.where(completion_mask, rng.normal(size=(B, N)), 0.0),
    }
    return graphdef, params, batch


def test_rlhf_ppo_clip_eps_sweep_compiles_once_and_equals_the_replaced_config():
    graphdef, params, batch = lm_problem()
    optimizer = optax.sgd(0.1)
    config = updates.PPOConfig(num_epochs=1, num_minibatches=2)
    state = updates.init_rlhf_ppo_state(params, optimizer, jax.random.key(2))

    def build(config):
        return updates.make_rlhf_ppo_update(graphdef, optimizer, config, critic="none")

    sweeps = [{"clip_eps": c} for c in SWEEP]
    metrics = sweep_compiles_once(build, config, state, batch, sweeps, check=(2,))
    assert len({float(m["loss/policy_avg"]) for m in metrics}) == 3
    with pytest.raises(ValueError, match=r"value_coef: critic='none' has no value loss"):
        build(config)(state, batch, {"value_coef": 0.1})


def test_rlhf_trpo_takes_the_overrides():
    graphdef, params, batch = lm_problem()
    optimizer = optax.sgd(0.1)
    config = updates.TRPOConfig(max_kl=0.01, cg_iters=4, max_backtracks=4)
    state = updates.init_trpo_state(params, {}, optimizer, jax.random.key(3))
    update = updates.make_rlhf_trpo_update(graphdef, optimizer, config)
    # traced through to make_trpo_update's step (whose equality with the replaced config is
    # tested above): a trace only, no compilation
    jax.eval_shape(update, state, batch, {"max_kl": 0.03, "cg_damping": 0.2})
    with pytest.raises(ValueError, match=r"make_rlhf_trpo_update: hyperparams has \['clip_eps'\]"):
        update(state, batch, {"clip_eps": 0.1})
