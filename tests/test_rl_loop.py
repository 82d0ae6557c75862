"""Tests of the GRPO family's update (:mod:`rljax.updates.grpo`) and of the RL loop's stages
(:mod:`rljax.rl.grpo`), each on its own against a hand-built reference, plus one short run of
``experiments/grpo.py``'s driver with a reward function of the user's (and one that raises).

The update reference computes per-token log-probs from the model's full ``[B, N, V]`` float64
logits and the loss with :func:`rljax.rlhf.policy_loss` (tested against TRL's definitions in
tests/test_policy_loss.py); with ``optax.sgd(1.0)`` and one minibatch the update's parameter
change is minus the gradient.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import reward_module_that_dies

from rljax import advantages, rewards, rl, rlhf, updates
from rljax.models.transformer import Transformer, TransformerConfig

B, P, N, V, K = 8, 4, 5, 24, 4  # rows, prompt width, completion width, vocabulary, group


def tiny_lm():
    config = TransformerConfig.llama(
        vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
        intermediate_size=32, max_position_embeddings=32, param_dtype="float64", dtype="float64",
    )  # fmt: skip
    return Transformer(config, rngs=nnx.Rngs(0))


def rollout(seed, rows=B):
    """A sampled batch as the rollout returns it: left-padded prompts, ragged completions
    (one row without EOS), log-probs of the policy, the reference and the sampler."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, P + 1, rows)
    prompt_mask = np.arange(P)[None, :] >= (P - prompt_len)[:, None]
    lengths = rng.integers(1, N + 1, rows)
    cmask = np.arange(N)[None, :] < lengths[:, None]
    finished = lengths < N
    finished[0] = False
    lp = lambda: np.where(cmask, rng.normal(-2, 0.5, (rows, N)), 0.0)
    return {
        "tokens": rng.integers(0, V, (rows, P + N)).astype(np.int32),
        "mask": np.concatenate([prompt_mask, cmask], axis=1),
        "completion_mask": cmask,
        "finished": finished,
        "old_logps": lp(),
        "ref_logps": lp(),
        "sampler_logps": lp(),
        "entropy": np.zeros((rows, N)),
    }


def config(**kw):
    fields = {"batch_size": B // K, "group_size": K, "eval_prompts": 4}
    grpo_kw = {k: kw.pop(k) for k in list(kw) if k in ("beta", "loss_type", "num_minibatches")}
    return rl.grpo.GRPORunConfig(
        **fields, **kw, grpo=updates.GRPOConfig(**{"num_minibatches": 1, **grpo_kw})
    )


# ------------------------------------------------------------------------------ shape


@pytest.mark.parametrize("overlong", ["none", "mask", "soft"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_shape_matches_hand_built_reference(overlong, estimator):
    out = rollout(1)
    scores = np.random.default_rng(2).normal(size=B).astype(np.float32)
    valid = np.ones(B, bool)
    valid[5] = False  # a row whose reward failed: out of the baselines and the loss
    c = config(overlong=overlong, estimator=estimator, beta=0.04, tis_cap=1.5)
    batch, metrics = rl.grpo.shape(out, scores, valid, c)

    cmask = out["completion_mask"] & valid[:, None]
    truncated = ~out["finished"] & valid
    lengths = cmask.sum(1)
    want_scores = scores.astype(np.float64)
    if overlong == "mask":
        cmask = cmask & ~truncated[:, None]
    if overlong == "soft":  # DAPO Eq. 13 with L_max = N, L_cache = overlong_buffer
        start = N - c.overlong_buffer
        penalty = np.where(lengths <= start, 0.0, (start - lengths) / c.overlong_buffer)
        want_scores = want_scores + np.maximum(penalty, -1.0) * c.overlong_penalty
    want_adv = np.zeros(B)
    for g in range(B // K):
        rows = [r for r in range(g * K, g * K + K) if valid[r]]
        r = want_scores[rows]
        if estimator == "grpo":
            a = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
        else:
            a = np.array([r[i] - np.delete(r, i).mean() for i in range(len(r))])
        want_adv[rows] = a
    np.testing.assert_array_equal(batch["completion_mask"], cmask)
    np.testing.assert_allclose(batch["advantages"], want_adv, rtol=1e-5, atol=1e-6)  # float32
    f32 = dict(rtol=1e-6, atol=0)  # the batch is float32, as the sampler's arrays are
    np.testing.assert_allclose(batch["old_logps"], np.where(cmask, out["old_logps"], 0), **f32)
    np.testing.assert_allclose(batch["ref_logps"], np.where(cmask, out["ref_logps"], 0), **f32)
    ratio = np.exp(out["old_logps"] - out["sampler_logps"])
    np.testing.assert_allclose(batch["is_weights"][cmask], np.minimum(ratio, 1.5)[cmask], rtol=1e-6)
    kl = np.sum((out["old_logps"] - out["ref_logps"]) * cmask, axis=1)[valid].mean()
    assert metrics["objective/kl"] == pytest.approx(kl, rel=1e-6)
    assert "sampling/mismatch_kl/mean" in metrics


def test_shape_leaves_out_what_the_loss_would_not_read():
    batch, _ = rl.grpo.shape(rollout(1), np.zeros(B, np.float32), np.ones(B, bool), config())
    assert set(batch) == set(
        updates.grpo.KEYS
    )  # no ref_logps without beta, no weights without a cap


# ------------------------------------------------------------------------------ collect


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_stop_strings_end_completions_in_every_per_token_array():
    out = rollout(2)
    tok = CharTokenizer()
    stop = ("a", "cd")
    got = rl.grpo.apply_stop_strings(out, tok, stop)
    cmask = got["completion_mask"]
    assert cmask.sum() < out["completion_mask"].sum()  # some rows were cut
    for row in range(B):
        valid = out["tokens"][row, -N:][out["completion_mask"][row]]
        text = tok.decode(valid)
        ends = [text.find(s) + len(s) for s in stop if s in text]
        keep = min(ends) if ends else len(valid)
        assert cmask[row].sum() == keep and cmask[row, :keep].all(), row
        assert got["finished"][row] == (out["finished"][row] or bool(ends))
    np.testing.assert_array_equal(got["mask"][:, -N:], cmask)
    np.testing.assert_array_equal(got["mask"][:, :-N], out["mask"][:, :-N])
    for name in ("old_logps", "ref_logps", "sampler_logps"):
        np.testing.assert_array_equal(got[name], np.where(cmask, out[name], 0.0))
    assert rl.grpo.apply_stop_strings(out, tok, ()) is out
    with pytest.raises(ValueError, match="--stop: stop strings must be non-empty"):
        config(stop=("",))


def test_collect_dynamic_sampling_drops_uninformative_groups_and_counts_them():
    prompts = rl.grpo.Prompts(
        texts=[f"p{i}" for i in range(6)],
        columns={"informative": [i % 2 == 0 for i in range(6)]},
        tokens=np.arange(6 * P, dtype=np.int32).reshape(6, P),
        mask=np.ones((6, P), bool),
    )

    def fake_rollout(policy, ref, value, tokens, mask, key, temperature, group_size):
        assert group_size == K  # one prompt per group: prefilled once, sampled K times
        rows = tokens.shape[0] * K
        out = rollout(0, rows)
        out["tokens"][:, :P] = np.repeat(tokens, K, axis=0)  # rows keep their prompt
        out["tokens"][:, P:] = np.arange(rows)[:, None] % K  # sample i of a group
        out["completion_mask"][:] = True
        return out

    def reward(prompts, completions, informative):
        # informative prompts: the samples differ; the others score 1 for every sample
        return [
            float(c[0] == "a") if inf else 1.0
            for c, inf in zip(completions, informative, strict=True)
        ]

    reward_set = rewards.RewardSet.of([reward])
    c = config(dynamic_sampling=True, max_sampling_rounds=3)
    out, scores, valid, metrics, cursor = rl.grpo.collect(
        fake_rollout, None, None, prompts, 0, jax.random.key(0), reward_set, CharTokenizer(), c
    )
    # round 1 takes prompts 0, 1 (keeps 0); round 2 prompts 2, 3 (keeps 2): the batch is full
    assert metrics["sampling/rounds"] == 2 and metrics["sampling/dropped_groups"] == 2
    assert metrics["sampling/masked_groups"] == 0 and cursor == 4
    np.testing.assert_array_equal(out["tokens"][::K, :P], prompts.tokens[[0, 2]])
    np.testing.assert_array_equal(scores, np.tile([1.0, 0, 0, 0], 2))
    assert valid.all()

    every = rewards.RewardSet.of([lambda prompts, completions, **_: [1.0] * len(prompts)])
    out, scores, valid, metrics, cursor = rl.grpo.collect(
        fake_rollout, None, None, prompts, 0, jax.random.key(0), every, CharTokenizer(), c
    )  # nothing informative: 3 rounds, then the batch is filled with masked-out rows
    assert metrics["sampling/rounds"] == 3 and metrics["sampling/masked_groups"] == 2
    assert not valid.any() and not out["completion_mask"].any() and cursor == 6
    assert out["tokens"].shape == (B, P + N) and scores.shape == valid.shape == (B,)
    batch, _ = rl.grpo.shape(out, scores, valid, c)
    assert not batch["completion_mask"].any() and not batch["advantages"].any()


# ------------------------------------------------------------------------------ update


def full_logits_logps(model, batch):
    hidden, _ = model.decode(jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))
    logits = model.logits(hidden[:, P - 1 : P + N - 1])
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    targets = jnp.asarray(batch["tokens"][:, P:])
    return jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize(
    ("loss_type", "beta", "weights"), [("dapo", 0.0, False), ("dr_grpo", 0.05, True)]
)
def test_update_is_a_gradient_step_on_the_reference_loss(loss_type, beta, weights):
    graphdef, params = nnx.split(tiny_lm())
    out = rollout(3)
    rng = np.random.default_rng(4)
    batch = {k: out[k] for k in ("tokens", "mask", "completion_mask", "old_logps")}
    batch["advantages"] = rng.normal(size=B)
    if beta:
        batch["ref_logps"] = out["ref_logps"]
    if weights:
        batch["is_weights"] = np.where(out["completion_mask"], rng.uniform(0.5, 1.5, (B, N)), 0)
    settings = updates.GRPOConfig(loss_type=loss_type, beta=beta, clip_eps=0.1, chunk_size=3)
    optimizer = optax.sgd(1.0)
    update = jax.jit(updates.make_grpo_update(graphdef, optimizer, settings))
    state = updates.init_grpo_state(params, optimizer, jax.random.key(0))
    new_state, metrics = update(state, batch)

    def ref_loss(p):
        logps = full_logits_logps(nnx.merge(graphdef, p["policy"]), batch)
        adv = jnp.asarray(batch["advantages"])
        if weights:
            adv = adv[:, None] * batch["is_weights"]
        loss, _ = rlhf.policy_loss(
            logps, batch["old_logps"], adv, batch["completion_mask"], loss_type=loss_type,
            clip_eps=0.1, ref_logps=batch.get("ref_logps"), beta=beta,
            max_completion_len=N if loss_type == "dr_grpo" else None,
        )  # fmt: skip
        return loss

    # A non-finite update is skipped (parameters unchanged) and counted; same shapes, no
    # recompile.
    skipped, nan_metrics = update(new_state, {**batch, "advantages": np.full(B, np.nan)})
    assert float(nan_metrics["nonfinite"]) == 1 and int(skipped.nonfinite_updates) == 1
    for a, b in zip(
        jax.tree.leaves(skipped.params), jax.tree.leaves(new_state.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    loss, grads = jax.jit(jax.value_and_grad(ref_loss))(state.params)
    assert float(metrics["loss/policy"]) == pytest.approx(float(loss), rel=1e-10)
    delta = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(delta), strict=True):
        np.testing.assert_allclose(d, g, rtol=1e-8, atol=1e-8 * float(np.max(np.abs(g))))


def test_update_checks_its_batch():
    graphdef, params = nnx.split(tiny_lm())
    out = rollout(3)
    batch = {k: out[k] for k in ("tokens", "mask", "completion_mask", "old_logps")}
    batch["advantages"] = np.zeros(B)
    state = updates.init_grpo_state(params, optax.sgd(1.0), jax.random.key(0))
    update = updates.make_grpo_update(graphdef, optax.sgd(1.0), updates.GRPOConfig(beta=0.1))
    with pytest.raises(KeyError, match="ref_logps"):
        update(state, batch)
    update = updates.make_grpo_update(graphdef, optax.sgd(1.0), updates.GRPOConfig())
    with pytest.raises(ValueError, match="beta is 0"):
        update(state, {**batch, "ref_logps": out["ref_logps"]})
    with pytest.raises(ValueError, match="'advantages' has shape"):
        update(state, {**batch, "advantages": np.zeros((B, N))})
    with pytest.raises(ValueError, match="--loss-type"):
        updates.GRPOConfig(loss_type="ppo")


def test_run_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--group-size"):
        rl.grpo.GRPORunConfig(group_size=1)
    with pytest.raises(ValueError, match="--reward"):
        rl.grpo.GRPORunConfig(data="prompts.jsonl")
    with pytest.raises(ValueError, match="--num-minibatches: 3 must divide"):
        rl.grpo.GRPORunConfig(
            batch_size=2, group_size=2, grpo=updates.GRPOConfig(num_minibatches=3)
        )
    with pytest.raises(ValueError, match="--estimator"):
        rl.grpo.GRPORunConfig(estimator="ppo")
    with pytest.raises(ValueError, match="unknown metrics sink 'tensorbord'"):
        rl.grpo.GRPORunConfig(log="jsonl,tensorbord")


# ------------------------------------------------------------------------------ the driver

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(f"<!-- {marker} -->") :]
    return after.split("```", 2)[1].split("\n", 1)[1]


def test_readme_grpo_quickstart_runs_as_written(tmp_path):
    """The README's quick start: its reward module and its command, run in a fresh folder
    (flags appended only to shrink the run: argparse keeps the last value of a flag)."""
    (tmp_path / "my_rewards.py").write_text(readme_block("grpo-quickstart-rewards"))
    command = readme_block("grpo-quickstart-run").replace(
        "experiments/grpo.py", str(ROOT / "experiments" / "grpo.py")
    )
    shrink = (
        " --iterations 2 --batch-size 2 --group-size 2 --eval-prompts 4 --max-new-tokens 12"
        " --num-minibatches 1 --log-every 1 --compilation-cache none"
    )
    result = subprocess.run(
        ["bash", "-c", command.strip() + shrink], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = tmp_path / "runs" / "grpo_mine"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("heldout_accuracy_before", "heldout_accuracy_after", "kl_to_reference"):
        assert np.isfinite(summary[key]), key
    assert summary["rewards"] == {"accuracy_reward": 1.0, "concise": 0.2}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert {"rewards/concise/mean", "rewards/accuracy_reward/mean", "loss/policy"} <= set(rows[1])
    assert 0 < rows[1]["rewards/concise/mean"] <= 1  # called on the completions' text
    assert (out / "policy" / "config.json").exists() and (out / "training.png").exists()


def test_a_raising_reward_function_stops_the_loop_naming_it(tmp_path):
    module = tmp_path / "bad_rewards.py"
    module.write_text("def broken(prompts, completions, **columns):\n    return 1 / 0\n")
    prompts = rl.grpo.Prompts(["p"] * 2, {}, np.ones((2, P), np.int32), np.ones((2, P), bool))
    fake_rollout = lambda *args, group_size: rollout(0, B)
    reward_set = rewards.RewardSet.from_specs([f"{module}:broken"])
    with pytest.raises(rewards.RewardError, match="broken"):
        rl.grpo.collect(
            fake_rollout, None, None, prompts, 0, jax.random.key(0), reward_set, CharTokenizer(),
            config(),
        )  # fmt: skip
    _, _, valid, metrics, _ = rl.grpo.collect(
        fake_rollout, None, None, prompts, 0, jax.random.key(0), reward_set, CharTokenizer(),
        config(on_reward_error="mask"),
    )  # fmt: skip
    assert not valid.any() and metrics["reward_errors"] == B


def test_outcome_estimators_are_the_run_config_choices():
    assert set(rl.grpo.ESTIMATORS) == set(advantages.OUTCOME_ESTIMATORS)


def test_a_killed_run_resumes_from_its_checkpoint_on_an_eight_device_mesh(tmp_path, monkeypatch):
    """The first run dies in iteration 3 (its reward function raises once the test says so);
    the same command resumes from the iteration-2 checkpoint and finishes, with one log line
    per step."""
    spec, die = reward_module_that_dies(tmp_path, monkeypatch, "float(len(c) % 3)")
    settings = rl.grpo.GRPORunConfig(
        reward=(spec,), out=str(tmp_path / "run"), iterations=3, batch_size=2,
        group_size=4, eval_prompts=4, max_new_tokens=8, log_every=1, eval_every=0,
        checkpoint_every=1, mesh="data=2,fsdp=2,tensor=2", compilation_cache=None,
        grpo=updates.GRPOConfig(num_minibatches=1), log="jsonl,tensorboard",
    )  # fmt: skip
    calls = {"n": 0}
    original = rl.grpo.collect

    def dying_collect(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            die.touch()
        return original(*args, **kwargs)

    monkeypatch.setattr(rl.grpo, "collect", dying_collect)
    with pytest.raises(rewards.RewardError, match="killed"):
        rl.grpo.run(settings)
    die.unlink()
    monkeypatch.setattr(rl.grpo, "collect", original)
    compiled = {}  # the programs the resumed run builds, to count their compilations

    def capture(name, make):
        def wrapped(*args, **kwargs):
            out = make(*args, **kwargs)
            compiled[name] = out if name == "rollout" else out[1]  # compile_update: (s, step, sh)
            return out

        return wrapped

    monkeypatch.setattr(rl.grpo, "make_rollout_fn", capture("rollout", rl.grpo.make_rollout_fn))
    monkeypatch.setattr(rl.grpo.lm, "compile_update", capture("step", rl.grpo.lm.compile_update))
    summary = rl.grpo.run(settings)
    assert summary["resumed_from"] == 2 and summary["devices"] == 8
    # Whatever the iteration: one engine (training's B prompts x G samples and evaluation's
    # B * G single prompts fill the same B * G slots; greedy and sampled evaluation share it:
    # the temperature is an argument), whose prefill and insert compiled once for each of the
    # two prompt counts and whose decode step compiled once; one scoring program; one update.
    (engine,) = compiled["rollout"].engines.values()
    assert engine.traces == {"prefill": 2, "insert": 2, "decode": 1}
    assert compiled["rollout"].score._cache_size() == 1 and compiled["step"]._cache_size() == 1
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps == [0, 1, 2, 3]
    # The evaluations' sample completions (before the first iteration and after the last),
    # and the TensorBoard sink asked for with --log.
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").open()]
    assert [r["step"] for r in samples] == [0] * 4 + [3] * 4  # eval_prompts=4
    assert {"prompt", "completion", "reward"} <= set(samples[0])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="learning_rate"):
        rl.grpo.run(dataclasses.replace(settings, learning_rate=0.5))
