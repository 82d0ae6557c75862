"""The preference experiments end to end on tiny settings: experiments/dpo.py (with a local
Hugging Face checkpoint folder, resume after an interruption with identical results and each
step once in metrics.jsonl and the TensorBoard files, and a sharded mesh that equals one
device), experiments/reward_model.py and experiments/iterative_dpo.py (the drivers in
rljax.experiment)."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
from helpers import load_experiment

from rljax import cli, experiment, runs
from rljax.models import hf
from rljax.tasks import sorting


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A briefly warmed-up base model saved as a Hugging Face folder (the --model path)."""
    folder = tmp_path_factory.mktemp("base") / "model"
    sorting.warmup_base_model(str(folder), steps=20, seed=0, eval_prompts=0)
    return str(folder)


TINY = [
    "--steps", "6", "--batch-size", "8", "--train-pairs", "64", "--eval-pairs", "16",
    "--log-every", "1", "--eval-every", "3", "--checkpoint-every", "3",
]  # fmt: skip


def tensorboard_values(folder) -> dict[str, list[tuple[int, object]]]:
    """``{tag: [(step, value)]}`` of the scalars and texts in the event files of ``folder``,
    in file-name order (TensorBoard's)."""
    from tensorboardX.proto.event_pb2 import Event

    values = {}
    for path in sorted(folder.glob("*tfevents*")):
        for _, payload in runs._tfrecords(path):
            event = Event.FromString(payload)
            for value in event.summary.value:
                tag = value.tag.removesuffix("/text_summary")
                item = (
                    value.tensor.string_val[0] if value.HasField("tensor") else value.simple_value
                )
                values.setdefault(tag, []).append((event.step, item))
    return values


def test_dpo_experiment_resumes_with_identical_results(base_model, tmp_path, monkeypatch):
    dpo = load_experiment("dpo")
    flags = [*TINY, "--model", base_model, "--win-rate-prompts", "8", "--log", "jsonl,tensorboard"]
    whole = dpo.main(cli.parse(dpo.Config, [*flags, "--out", str(tmp_path / "whole")]))
    assert whole["oracle"]["prompts"] == 8 and 0.0 <= whole["oracle"]["win_rate"] <= 1.0
    assert set(whole["eval"]) >= {"rewards/accuracies", "rewards/margins", "loss"}
    out = tmp_path / "whole"
    assert (out / "training.png").exists() and (out / "summary.json").exists()
    assert hf.load_model(str(out / "policy")).config.num_layers == 2  # an HF folder

    # Interrupt the second run after its step-3 checkpoint, then start it again.
    original = runs.MetricsLog.log

    def interrupted(self, step, metrics, **kw):
        if step == 5:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, step, metrics, **kw)

    monkeypatch.setattr(runs.MetricsLog, "log", interrupted)
    resumed_dir = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        dpo.main(cli.parse(dpo.Config, [*flags, "--out", resumed_dir]))
    monkeypatch.setattr(runs.MetricsLog, "log", original)
    resumed = dpo.main(cli.parse(dpo.Config, [*flags, "--out", resumed_dir]))
    assert resumed["resumed_from"] == 3
    a = _rows(out)
    b = _rows(pathlib.Path(resumed_dir))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, err_msg=f"{key} {ra['step']}")
    np.testing.assert_allclose(resumed["eval"]["loss"], whole["eval"]["loss"], rtol=1e-6)
    # --log tensorboard: event files hold each step once, the resumed run's as the whole run's;
    # the oracle's first completions are one samples table (and samples.jsonl rows) at step 6.
    whole_tb = tensorboard_values(out / "tensorboard")
    resumed_tb = tensorboard_values(pathlib.Path(resumed_dir) / "tensorboard")
    assert [s for s, _ in resumed_tb["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in resumed_tb["eval/loss"]] == [3, 6]
    np.testing.assert_allclose(
        [v for _, v in resumed_tb["loss"]], [v for _, v in whole_tb["loss"]], rtol=1e-6
    )
    assert [s for s, _ in resumed_tb["samples"]] == [s for s, _ in whole_tb["samples"]] == [6]
    assert [s for s, _ in resumed_tb["config"]] == [0]
    samples = [row for _, row in runs.read_jsonl(pathlib.Path(resumed_dir) / "samples.jsonl")]
    assert [r["step"] for r in samples] == [6] * 5
    assert [r["prompt"] for r in samples] == [e["prompt"] for e in resumed["oracle"]["examples"]]


def test_an_unknown_metrics_sink_fails_at_config_construction():
    for name in ("dpo", "reward_model", "iterative_dpo"):
        with pytest.raises(ValueError, match=r"unknown metrics sink 'tensorbord' in --log"):
            load_experiment(name).Config(log="jsonl,tensorbord")
    assert experiment.DPORunConfig(log="tensorboard,wandb").log == "tensorboard,wandb"


def test_pair_best_worst_skips_empty_and_tied_samples():
    prompts = ["a", "b", "c"]
    completions = [["x", "", "p"], ["y", "q", "p2"]]  # [samples, prompts]
    scores = [[1.0, 5.0, 0.5], [2.0, 3.0, 0.5]]
    rows, stats = experiment.pair_best_worst(prompts, completions, scores)
    assert rows == [{"prompt": "a", "chosen": "y", "rejected": "x"}]  # b: one non-empty; c: tie
    assert stats == {"pairs": 1, "prompts_without_pair": 2, "empty_samples": 1, "mean_score": 2.0}


def _rows(folder):
    path = pathlib.Path(folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_dpo_experiment_on_a_mesh_equals_one_device(base_model, tmp_path):
    dpo = load_experiment("dpo")
    flags = [*TINY, "--steps", "3", "--model", base_model, "--win-rate-prompts", "4"]
    one = dpo.main(cli.parse(dpo.Config, [*flags, "--out", str(tmp_path / "one")]))
    mesh = dpo.main(
        cli.parse(
            dpo.Config,
            [*flags, "--mesh", "data=2,fsdp=2,tensor=2", "--out", str(tmp_path / "mesh")],
        )
    )
    # The shared-prompt layout (each prompt run once) on the mesh: the same run again.
    shared_dir = str(tmp_path / "shared")
    shared = dpo.main(
        cli.parse(
            dpo.Config,
            [*flags, "--share-prompt", "--mesh", "data=2,fsdp=2,tensor=2", "--out", shared_dir],
        )
    )
    assert one["devices"] == 1 and mesh["devices"] == shared["devices"] == 8
    for other in ("mesh", "shared"):
        for ra, rb in zip(_rows(tmp_path / "one"), _rows(tmp_path / other), strict=True):
            np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=1e-5, err_msg=other)
            np.testing.assert_allclose(
                rb["rewards/margins"], ra["rewards/margins"], rtol=1e-4, atol=1e-6, err_msg=other
            )


def test_reward_model_experiment(base_model, tmp_path):
    reward_model = load_experiment("reward_model")
    summary = reward_model.main(
        cli.parse(reward_model.Config, [*TINY, "--model", base_model, "--out", str(tmp_path)])
    )
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    assert -1.0 <= summary["oracle"]["spearman"] <= 1.0
    samples = [row for _, row in runs.read_jsonl(tmp_path / "samples.jsonl")]
    assert [r["step"] for r in samples] == [6] * 5
    assert set(samples[0]) == {"step", "prompt", "completion", "reward", "oracle"}
    loaded = hf.load_model(str(tmp_path / "reward_model"), head="reward")
    assert loaded.config.head == "reward" and loaded.lm_head is None
    config = dataclasses.asdict(cli.parse(reward_model.Config, []))
    assert config["model"] is None and config["data"] is None  # the built-in defaults


def test_iterative_dpo_rounds_and_resume(base_model, tmp_path):
    """Two rounds labelled by a reward-model judge (a random head: the briefly warmed-up base
    model's samples are not yet valid permutations, so the oracle would tie them all)."""
    from flax import nnx

    from rljax.models.transformer import with_head

    judge = tmp_path / "judge"
    hf.save_model(
        with_head(hf.load_model(base_model), "reward", rngs=nnx.Rngs(3)),
        judge,
        tokenizer=hf.load_tokenizer(base_model),
    )
    iterative = load_experiment("iterative_dpo")
    out = tmp_path / "run"
    flags = [
        "--rounds", "2", "--prompts-per-round", "24", "--samples-per-prompt", "2",
        "--steps", "2", "--batch-size", "4", "--win-rate-prompts", "8", "--log-every", "1",
        "--model", base_model, "--judge", str(judge), "--out", str(out),
    ]  # fmt: skip
    summary = iterative.main(cli.parse(iterative.Config, flags))
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["pairs"] > 0 and 0.0 <= r["win_rate_vs_base"] <= 1.0 for r in rounds)
    assert all(r["eval"] for r in rounds)  # both rounds trained
    pairs = [json.loads(x) for x in (out / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == rounds[0]["pairs"]
    assert all(p["chosen"] != p["rejected"] and p["chosen"].strip() for p in pairs)
    assert (out / "policy" / "config.json").exists() and (out / "win_rate.png").exists()
    # Finished rounds are loaded, not redone, and give the same record.
    (out / "round_2" / "done.json").unlink()
    again = iterative.main(cli.parse(iterative.Config, flags))
    assert again["rounds"][0] == rounds[0]
    np.testing.assert_allclose(
        again["rounds"][1]["win_rate_vs_base"], rounds[1]["win_rate_vs_base"], rtol=1e-6
    )
    # Round 2 resumed at its last checkpoint: its samples are not logged a second time.
    samples = [row for _, row in runs.read_jsonl(out / "round_2" / "samples.jsonl")]
    assert [r["step"] for r in samples] == [2] * 5
    with pytest.raises(ValueError, match="reference-policy"):
        iterative.main(cli.parse(iterative.Config, [*flags, "--reference-policy", "latest"]))


def test_iterative_dpo_on_a_prompt_file_with_a_judge(base_model, tmp_path):
    """--data: a prompt file of one's own (not the built-in task); the judge labels the pairs
    and rates the win-rate. Without --judge it is refused."""
    from flax import nnx

    from rljax.models.transformer import with_head

    judge = tmp_path / "judge"
    hf.save_model(
        with_head(hf.load_model(base_model), "reward", rngs=nnx.Rngs(4)),
        judge,
        tokenizer=hf.load_tokenizer(base_model),
    )
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"sort: {w} ->"} for w in ("cab", "zyx", "mlkj", "qp", "dcba", "hgf")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    iterative = load_experiment("iterative_dpo")
    flags = [
        "--data", str(prompts), "--rounds", "1", "--prompts-per-round", "20",
        "--samples-per-prompt", "2", "--steps", "2", "--batch-size", "4", "--log-every", "1",
        "--max-length", "26", "--max-prompt-length", "14",
        "--model", base_model, "--judge", str(judge), "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    summary = iterative.main(cli.parse(iterative.Config, flags))
    (record,) = summary["rounds"]
    assert record["pairs"] > 0 and 0.0 <= record["win_rate_vs_base"] <= 1.0
    assert "policy_validity" not in record  # judged, not the built-in oracle
    pairs = (tmp_path / "run" / "round_1" / "pairs.jsonl").read_text().splitlines()
    assert {json.loads(p)["prompt"] for p in pairs} <= {r["prompt"] for r in rows}
    no_judge = [f for f in flags if f not in ("--judge", str(judge))]
    no_judge[no_judge.index(str(tmp_path / "run"))] = str(tmp_path / "run_no_judge")
    with pytest.raises(ValueError, match="needs --judge"):
        iterative.main(cli.parse(iterative.Config, no_judge))
