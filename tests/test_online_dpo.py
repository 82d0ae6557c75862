"""Tests of online DPO (:mod:`rljax.rl.online_dpo`): the pairing stage against hand-picked
rows, the pair batch's log-probs against the rollout's own (the left-padded layout reads the
same tokens), and a short run with a reference refresh, killed and resumed."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import reward_module_that_dies

from rljax import rewards, rl
from rljax.models.generate import SamplingConfig
from rljax.models.transformer import Transformer, TransformerConfig
from rljax.updates import lm

P, N, V, K = 4, 5, 24, 3  # prompt width, completion width, vocabulary, group


def rollout(groups, seed=0):
    rng = np.random.default_rng(seed)
    rows = groups * K
    cmask = np.arange(N)[None, :] < rng.integers(1, N + 1, rows)[:, None]
    return {
        "tokens": rng.integers(0, V, (rows, P + N)).astype(np.int32),
        "mask": np.concatenate([np.ones((rows, P), bool), cmask], axis=1),
        "completion_mask": cmask,
        "ref_logps": np.where(cmask, rng.normal(-2, 0.5, (rows, N)), 0.0),
    }


def test_pairs_take_each_groups_best_and_worst_valid_row():
    out = rollout(4)
    scores = np.array([0.5, 1.0, 0.0, 2.0, 2.0, 1.0, 3.0, 9.0, 0.0, 1.0, 1.0, 1.0], np.float32)
    valid = np.ones(12, bool)
    valid[7] = False  # group 2: the invalid 9.0 is not its best
    valid[9:] = False  # group 3: no valid row (a masked fill): no pair
    batch, metrics = rl.online_dpo.pairs(out, scores, valid, K)
    chosen, rejected = [1, 3, 6], [2, 5, 8]  # the first of equals for group 1's best
    for side, rows in (("chosen", chosen), ("rejected", rejected)):
        np.testing.assert_array_equal(batch[f"{side}_tokens"][:3], out["tokens"][rows])
        np.testing.assert_array_equal(batch[f"{side}_mask"][:3], out["mask"][rows])
        loss_mask = batch[f"{side}_loss_mask"]
        assert not loss_mask[:, :P].any() and not loss_mask[3].any()
        np.testing.assert_array_equal(loss_mask[:3, P:], out["completion_mask"][rows])
        want = (out["ref_logps"][rows] * out["completion_mask"][rows]).sum(1)
        np.testing.assert_allclose(batch[f"ref_{side}_logps"][:3], want, rtol=1e-6)
        assert batch[f"ref_{side}_logps"][3] == 0.0
    assert metrics["pairs/reward_margin"] == pytest.approx(np.mean([1.0, 1.0, 3.0]))
    assert metrics["pairs/chosen_reward"] == pytest.approx(np.mean([1.0, 2.0, 3.0]))


def test_a_group_of_equal_scores_is_no_pair():
    batch, metrics = rl.online_dpo.pairs(rollout(1), np.ones(K, np.float32), np.ones(K, bool), K)
    assert not batch["chosen_loss_mask"].any() and not batch["rejected_loss_mask"].any()
    assert np.isnan(metrics["pairs/reward_margin"])


def test_pair_batch_log_probs_equal_the_rollouts():
    config = TransformerConfig.llama(
        vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    sampling = SamplingConfig(max_new_tokens=N, temperature=1.0, eos_token_id=1, pad_token_id=0)
    rollout_fn = rl.rollout.make_rollout_fn(graphdef, sampling)
    prompt_mask = np.arange(P)[None, :] >= np.array([[3], [1], [0], [2], [0], [1]])  # left pads
    tokens = np.where(prompt_mask, np.arange(6 * P).reshape(6, P) % (V - 2) + 2, 0)
    out = jax.device_get(
        rollout_fn(params, params, None, tokens, prompt_mask, jax.random.key(1), 1.0)
    )
    scores = np.arange(6, dtype=np.float32)  # each group's last row is its best, first worst
    batch, _ = rl.online_dpo.pairs(out, scores, np.ones(6, bool), 3)
    chosen, rejected, _, _ = lm.pair_sequence_logps(graphdef, params, batch)
    for got, rows in ((chosen, [2, 5]), (rejected, [0, 3])):
        want = (out["old_logps"][rows] * out["completion_mask"][rows]).sum(1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # the reference is the same model here: the pair's reference sums are the policy's
    np.testing.assert_allclose(batch["ref_chosen_logps"], np.asarray(chosen), rtol=1e-5, atol=1e-5)


def test_run_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--ref-update-every"):
        rl.online_dpo.OnlineDPORunConfig(ref_update_every=-1)
    with pytest.raises(ValueError, match="loss_type"):
        rl.online_dpo.OnlineDPORunConfig(loss_type="nope")
    with pytest.raises(ValueError, match="--group-size"):
        rl.online_dpo.OnlineDPORunConfig(group_size=1)
    assert rl.online_dpo.OnlineDPORunConfig().dpo_config().reference == "precomputed"
    assert isinstance(rl.config("online_dpo"), rl.online_dpo.OnlineDPORunConfig)


def test_a_killed_run_resumes_with_its_refreshed_reference(tmp_path, monkeypatch):
    spec, die = reward_module_that_dies(tmp_path, monkeypatch, "float(sum(map(ord, c)) % 7)")
    settings = rl.online_dpo.OnlineDPORunConfig(
        reward=(spec,), out=str(tmp_path / "run"), iterations=4, batch_size=2,
        group_size=4, eval_prompts=4, max_new_tokens=8, log_every=1, eval_every=0,
        checkpoint_every=1, ref_update_every=2, compilation_cache=None, temperature=4.0,
    )  # fmt: skip
    calls = {"n": 0}
    original = rl.online_dpo.collect
    references, policies = [], []

    def dying_collect(rollout_fn, policy, ref, *args, **kwargs):
        calls["n"] += 1
        copy = lambda tree: jax.tree.map(lambda x: np.array(x, copy=True), tree)  # not a view
        references.append(copy(ref))  # of a buffer the donated step reuses
        policies.append(copy(policy))
        if calls["n"] == 4:
            die.touch()
        return original(rollout_fn, policy, ref, *args, **kwargs)

    monkeypatch.setattr(rl.online_dpo, "collect", dying_collect)
    with pytest.raises(rewards.RewardError, match="killed"):
        rl.online_dpo.run(settings)
    die.unlink()
    # iterations 0 and 1 sample against the initial policy, 2 and 3 against its copy at 2
    leaves = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    same = lambda a, b: np.array_equal(leaves(a), leaves(b))
    assert same(references[0], policies[0]) and same(references[1], policies[0])
    assert not same(policies[2], policies[0])  # the policy moved (a pair had a preference)
    assert same(references[2], policies[2]) and same(references[3], references[2])
    summary = rl.online_dpo.run(settings)  # resumes after iteration 2's checkpoint
    assert summary["resumed_from"] == 3
    # iteration 3 (no refresh) samples against the refreshed reference from the checkpoint
    assert same(references[4], references[2])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert {"pairs/reward_margin", "rewards/accuracies", "loss"} <= set(rows[1])
    assert (tmp_path / "run" / "policy" / "config.json").exists()


def test_the_script_on_a_checkpoint_folder_and_a_prompt_file(tmp_path):
    """experiments/online_dpo.py with a Hugging Face folder of the user's (here the built-in
    base model copied out), a prompt file and a reward function of the user's."""
    import shutil

    from helpers import load_experiment

    from rljax import cli
    from rljax.tasks import arithmetic

    model = tmp_path / "my-model"
    shutil.copytree(arithmetic.default_base_model(), model)
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i} + {i} =", "n": i}) + "\n" for i in range(8))
    )
    module = tmp_path / "judge.py"
    module.write_text(
        "def longer(prompts, completions, n, **columns):\n"
        "    return [float(len(c) % (k + 2)) for c, k in zip(completions, n)]\n"
    )
    script = load_experiment("online_dpo")
    flags = [
        "--model", str(model), "--data", str(data), "--reward", f"{module}:longer",
        "--iterations", "2", "--batch-size", "2", "--group-size", "2", "--eval-prompts", "2",
        "--max-new-tokens", "6", "--eval-every", "0", "--temperature", "3.0",
        "--compilation-cache", "none", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    summary = script.main(cli.parse(script.Config, flags))
    assert summary["model"] == str(model) and summary["data"] == str(data)
    assert summary["rewards"] == {"longer": 1.0}
    assert (tmp_path / "run" / "policy" / "config.json").exists()
