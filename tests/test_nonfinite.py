"""Non-finite guards (:mod:`rljax.finite`): every update family skips a step whose loss,
gradients or result has a NaN or inf, leaving the parameters and the optimizer state bitwise
unchanged, reports it (``nonfinite``) and counts it (``nonfinite_updates``); the preference
driver stops after ``max_nonfinite_updates`` such updates in a row and never checkpoints a
non-finite state; classic control reports skipped updates and refuses non-finite results.

That a finite step is unchanged by the guard is covered by the value tests of each update
(test_dpo_update, test_reward_update, test_ppo_update, test_rlhf, test_trpo_engine)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import load_script, one_layer_llama

from rljax import (
    checkpoint,
    classic,
    cli,
    experiment,
    finite,
    updates,
)
from rljax.models import hf
from rljax.models.transformer import Transformer, with_head
from rljax.tasks import sorting
from rljax.updates import lm

PAIRS, TIME = 4, 10


def bits(tree):
    """Every leaf's dtype, shape and bytes: equal iff the trees are bitwise equal."""
    leaves = jax.tree.leaves(jax.device_get(tree))
    return [(np.asarray(x).dtype, np.shape(x), np.asarray(x).tobytes()) for x in leaves]


def host_copy(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


@functools.cache
def tokenizer():
    return sorting.build_tokenizer()


@functools.cache
def tiny_lm():
    """``(graphdef, params)`` of a one-layer LM over the sorting task's vocabulary (also the
    driver test's --model)."""
    config = one_layer_llama(
        len(tokenizer()), max_position_embeddings=64, param_dtype="float32", dtype="float32"
    )
    return nnx.split(Transformer(config, rngs=nnx.Rngs(0)))


def pair_batch(seed):
    rng = np.random.default_rng(seed)
    pos = np.arange(TIME)[None]
    batch = {}
    for side in ("chosen", "rejected"):
        mask = pos < rng.integers(4, TIME + 1, PAIRS)[:, None]
        batch[f"{side}_tokens"] = (rng.integers(4, 34, (PAIRS, TIME)) * mask).astype(np.int32)
        batch[f"{side}_mask"] = mask
        batch[f"{side}_loss_mask"] = mask & (pos >= 2)
    batch["ref_chosen_logps"] = rng.normal(-20, 1, PAIRS).astype(np.float32)
    batch["ref_rejected_logps"] = rng.normal(-20, 1, PAIRS).astype(np.float32)
    batch["margin"] = rng.uniform(0, 1, PAIRS).astype(np.float32)
    return batch


def check_skip_then_step(step, state, bad, good, params_of, opt_state_of):
    """``step(state, bad)`` skips (bitwise), then ``step(state, good)`` applies and keeps the
    count. ``step`` donates its state, so the comparisons use host copies."""
    before = host_copy((params_of(state), opt_state_of(state)))
    state, metrics = step(state, bad)
    assert float(metrics["nonfinite"]) == 1.0
    assert int(metrics["nonfinite_updates"]) == int(state.nonfinite_updates) == 1
    assert bits((params_of(state), opt_state_of(state))) == bits(before)
    assert int(state.step) == 1
    state, metrics = step(state, good)
    assert float(metrics["nonfinite"]) == 0.0
    assert int(metrics["nonfinite_updates"]) == int(state.nonfinite_updates) == 1
    assert bits(params_of(state)) != bits(before[0])
    assert all(bool(finite.all_finite(x)) for x in (params_of(state), opt_state_of(state)))


# ---------------------------------------------------------------------------- the helpers


def test_step_if_finite_checks_loss_gradients_and_result_and_keeps_old_bits():
    params = {"w": jnp.array([1.0, -0.0, 2.0], jnp.float32)}
    grads = {"w": jnp.array([1e30, 0.0, 1.0], jnp.float32)}
    step = jax.jit(finite.step_if_finite, static_argnums=0)
    big = optax.sgd(1e10)  # finite gradient, overflowing result: -1e40 is inf in float32
    p, _, ok = step(big, grads, big.init(params), params, jnp.float32(1.0))
    assert not bool(ok) and bits(p) == bits(params)  # -0.0 kept, not turned into +0.0
    small = optax.sgd(1e-3)
    p, _, ok = step(small, grads, small.init(params), params, jnp.float32(jnp.nan))
    assert not bool(ok) and bits(p) == bits(params)  # a NaN loss alone skips
    p, _, ok = step(small, grads, small.init(params), params, jnp.float32(1.0))
    assert bool(ok) and bits(p) != bits(params)
    assert bool(finite.all_finite({"k": jax.random.key(0), "i": jnp.int32(1)}))
    with pytest.raises(FloatingPointError, match=r"x: non-finite values .* \['b'\]"):
        finite.require_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf])}, "x")


def test_nonfinite_stop_counts_streaks_and_names_the_last_checkpoint(capsys):
    stop = finite.NonfiniteStop(2, "T", "/runs/x/checkpoints")
    ok, bad = {"nonfinite": 0.0, "loss": 1.0}, {"nonfinite": 1.0, "loss": float("nan")}
    stop.saved(4)
    for step, metrics in enumerate([ok, bad, ok, bad], start=5):
        stop.observe(step, metrics)
    stop.flush()  # two non-finite updates, never in a row
    assert "step 6: non-finite loss; the non-finite step was skipped" in capsys.readouterr().out
    stop.observe(9, bad)
    with pytest.raises(FloatingPointError) as error:
        stop.before_save(9, {"w": jnp.ones(2)})
    message = str(error.value)
    assert "stopped at step 9" in message and "steps 8-9" in message
    assert "Last good checkpoint: step 4 (/runs/x/checkpoints/4)" in message
    with pytest.raises(FloatingPointError, match=r"not saving the checkpoint of step 3.*step 4"):
        stop.before_save(3, {"w": jnp.array([jnp.nan])})
    with pytest.raises(ValueError, match="--max-nonfinite-updates must be an integer >= 1"):
        finite.NonfiniteStop(0, "T", "x")
    with pytest.raises(ValueError, match="--max-nonfinite-updates must be >= 1"):
        experiment.PreferenceRunConfig(max_nonfinite_updates=0)
    assert np.isnan(experiment.final_eval([{"eval/score": None}])["score"])  # no TypeError


# ---------------------------------------------------------------------------- update steps


def test_dpo_update_skips_a_nonfinite_step_with_donation():
    graphdef, params = tiny_lm()
    optimizer = optax.adam(1e-2)
    mesh = experiment.build_mesh("")
    good = pair_batch(0)
    bad = {**good, "ref_chosen_logps": np.full(PAIRS, np.nan, np.float32)}
    state, step, shardings = lm.compile_update(
        updates.make_dpo_update(graphdef, optimizer, updates.DPOConfig()),
        updates.init_dpo_state(host_copy(params), optimizer),
        good,
        mesh,
    )
    place = lambda b: jax.device_put(b, shardings)
    check_skip_then_step(
        lambda s, b: step(s, place(b)), state, bad, good, lambda s: s.params, lambda s: s.opt_state
    )


def test_reward_update_skips_a_nonfinite_step():
    graphdef, params = tiny_lm()
    model = with_head(nnx.merge(graphdef, params, copy=True), "reward", rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    optimizer = optax.adam(1e-2)
    step = jax.jit(updates.make_reward_update(graphdef, optimizer))
    good = pair_batch(1)
    bad = {**good, "margin": np.full(PAIRS, np.inf, np.float32)}
    state = updates.init_reward_state(params, optimizer)
    check_skip_then_step(step, state, bad, good, lambda s: s.params, lambda s: s.opt_state)


def linear_policy(params, x):
    return x @ params["W"] + params["b"]


def linear_value(params, x):
    return x @ params["v"] + params["c"]


def control_batch(rows=16):
    rng = np.random.default_rng(0)
    return {
        "inputs": rng.normal(size=(rows, 3)).astype(np.float32),
        "actions": rng.integers(0, 4, rows),
        "old_logps": np.full(rows, -1.4, np.float32),
        "advantages": rng.normal(size=rows).astype(np.float32),
        "returns": rng.normal(size=rows).astype(np.float32),
        "old_values": np.zeros(rows, np.float32),
    }


def control_params():
    rng = np.random.default_rng(1)
    policy = {"W": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    return policy, {"v": rng.normal(size=3).astype(np.float32), "c": np.float32(0.0)}


@pytest.mark.parametrize("target_kl", [None, 10.0])
def test_ppo_update_skips_nonfinite_minibatch_steps(target_kl):
    optimizer = optax.adam(1e-2)
    config = updates.PPOConfig(num_epochs=2, num_minibatches=2, target_kl=target_kl)
    step = jax.jit(updates.make_ppo_update(linear_policy, linear_value, optimizer, config))
    state = updates.init_ppo_state(*control_params(), optimizer, jax.random.key(0))
    good = control_batch()
    bad = {**good, "returns": np.full(16, np.nan, np.float32)}  # every minibatch
    check_skip_then_step(step, state, bad, good, lambda s: s.params, lambda s: s.opt_state)
    _, metrics = step(state, bad)
    assert float(metrics["updates"]) == 0.0
    one_row = good["returns"].copy()
    one_row[3] = np.inf  # one minibatch per epoch: the other one is applied
    new, metrics = step(state, {**good, "returns": one_row})
    assert float(metrics["nonfinite"]) == 1.0 and float(metrics["updates"]) == 2.0
    assert bits(new.params) != bits(state.params) and bool(finite.all_finite(new.params))


def test_trpo_update_guards_the_policy_step_and_the_critic_fit():
    optimizer = optax.adam(1e-2)
    config = updates.TRPOConfig(n_critic_updates=2, critic_minibatches=2)
    step = jax.jit(updates.make_trpo_update(linear_policy, linear_value, optimizer, config))
    state = updates.init_trpo_state(*control_params(), optimizer, jax.random.key(0))
    good = {k: v for k, v in control_batch().items() if k not in ("old_logps", "old_values")}
    # A NaN critic target: every critic step is skipped; the policy step is taken.
    new, metrics = step(state, {**good, "returns": np.full(16, np.nan, np.float32)})
    assert float(metrics["nonfinite_critic"]) == 1.0 and float(metrics["nonfinite_policy"]) == 0.0
    assert bits((new.params["value"], new.opt_state)) == bits(
        (state.params["value"], state.opt_state)
    )
    assert bits(new.params["policy"]) != bits(state.params["policy"])
    assert int(new.nonfinite_updates) == 1 and float(metrics["nonfinite"]) == 1.0
    # NaN advantages (what a NaN critic gives the next rollout): the policy step is reported.
    policy = new.params["policy"]
    new, metrics = step(new, {**good, "advantages": np.full(16, np.nan, np.float32)})
    assert float(metrics["nonfinite_policy"]) == 1.0 and int(new.nonfinite_updates) == 2
    assert bits(new.params["policy"]) == bits(policy)
    new, metrics = step(new, good)
    assert float(metrics["nonfinite"]) == 0.0 and int(metrics["nonfinite_updates"]) == 2


def test_rlhf_ppo_update_reports_and_counts():
    graphdef, params = tiny_lm()
    optimizer = optax.adam(1e-2)
    config = updates.PPOConfig(num_epochs=1, num_minibatches=1)
    step = jax.jit(updates.make_rlhf_ppo_update(graphdef, optimizer, config, critic="none"))
    rng = np.random.default_rng(0)
    rows, prompt, new_tokens = 4, 3, 4
    cmask = np.ones((rows, new_tokens), bool)
    good = {
        "tokens": rng.integers(4, 34, (rows, prompt + new_tokens)).astype(np.int32),
        "mask": np.ones((rows, prompt + new_tokens), bool),
        "completion_mask": cmask,
        "old_logps": np.full((rows, new_tokens), -3.5, np.float32),
        "advantages": rng.normal(size=(rows, new_tokens)).astype(np.float32),
    }
    bad = {**good, "old_logps": np.full((rows, new_tokens), -np.inf, np.float32)}
    state = updates.init_rlhf_ppo_state(params, optimizer, jax.random.key(0))
    check_skip_then_step(step, state, bad, good, lambda s: s.params, lambda s: s.opt_state)


def test_classic_run_reports_skipped_updates_and_refuses_nonfinite_params(tmp_path, monkeypatch):
    config = classic.PPOClassicConfig(
        env="probe-action", total_steps=256, num_envs=8, num_steps=16, hidden=8
    )
    iterations = config.num_iterations

    def fake_train(config, key, progress=None, *, value=0.0):
        params = {"policy": {"w": jnp.full(2, value)}, "value": {"w": jnp.zeros(2)}}
        state = updates.PPOState(params, (), key, jnp.int32(iterations), jnp.int32(1))
        history = {
            "episode_return": jnp.ones(iterations),
            "env_steps": jnp.arange(1, iterations + 1) * 128,
            "nonfinite": jnp.zeros(iterations).at[0].set(1.0),
        }
        return state, history, {"mean_return": jnp.float32(1.0)}

    monkeypatch.setattr(classic, "train_ppo", fake_train)
    summary = classic.run_experiment("ppo", config, 2, 0, str(tmp_path), progress_every=0)
    assert summary["nonfinite_updates_per_seed"] == [1, 1]
    assert summary["final_params_finite_per_seed"] == [True, True]
    monkeypatch.setattr(classic, "train_ppo", functools.partial(fake_train, value=jnp.nan))
    with pytest.raises(FloatingPointError, match=r"seed\(s\) \[0, 1\] \(of 2\)"):
        classic.run_experiment("ppo", config, 2, 0, str(tmp_path), progress_every=0)


# ---------------------------------------------------------------------------- the driver


def test_dpo_run_with_a_huge_learning_rate_stops_and_keeps_checkpoints_finite(tmp_path):
    graphdef, params = tiny_lm()
    model_dir = tmp_path / "base"
    hf.save_model(nnx.merge(graphdef, params, copy=True), model_dir, tokenizer=tokenizer())
    script = load_script("experiments/dpo.py", "dpo_script")
    out = tmp_path / "run"
    flags = [
        "--steps", "20", "--batch-size", "8", "--train-pairs", "64", "--eval-pairs", "16",
        "--log-every", "1", "--eval-every", "0", "--checkpoint-every", "2",
        "--learning-rate", "1e20", "--model", str(model_dir), "--out", str(out),
    ]  # fmt: skip
    with pytest.raises(FloatingPointError) as error:
        script.main(cli.parse(script.Config, flags))
    message = str(error.value)
    stopped = int(re.search(r"stopped at step (\d+): 3 consecutive updates", message).group(1))
    assert stopped < 20
    last = int(re.search(r"Last good checkpoint: step (\d+) \(", message).group(1))
    ckpt = checkpoint.Checkpointer(out / "checkpoints")
    try:
        assert ckpt.all_steps() and ckpt.latest_step() == last < stopped
        for saved in ckpt.all_steps():
            state, _ = ckpt.restore(saved)
            assert bool(finite.all_finite(state)), f"checkpoint {saved} is not finite"
    finally:
        ckpt.close()
    assert not (out / "policy").exists()  # nothing exported
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"nonfinite": 1.0' in line for line in lines) >= 2  # the skipped steps logged
