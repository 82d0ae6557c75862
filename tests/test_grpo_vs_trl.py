"""benchmarks/grpo_vs_trl.py without TRL: the flags follow the recipe's defaults and reach the
peer's command line, settings TRL cannot mirror are refused, the prompt files hold rljax's rows
in rljax's order, the timing plumbing around rl.grpo.run, and the peer's task loader imports
rljax's reward functions without jax."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
from helpers import ROOT, load_script

from rljax import cli, rl
from rljax.tasks import arithmetic


class _CharTokenizer:
    """What rl.grpo.load_prompts needs of a tokenizer (transformers takes seconds to import)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 90 for c in text]}


def _flag(command, name):
    return command[command.index(name) + 1]


def test_defaults_follow_the_recipe_and_reach_the_peer():
    gvt = load_script("benchmarks/grpo_vs_trl.py")
    config = cli.parse(gvt.GRPOvsTRLConfig, [])
    recipe, run = rl.grpo.GRPORunConfig(), config.run
    for field in ("iterations", "batch_size", "group_size", "learning_rate", "temperature"):
        assert getattr(run, field) == getattr(recipe, field), field
    assert run.grpo == recipe.grpo
    assert (run.eval_every, run.checkpoint_every) == (0, 1_000_000)  # only before and after

    paths = {"train": "/d/train.jsonl", "heldout": "/d/heldout.jsonl"}
    command = gvt.peer_command(config, "/m", paths, "/d/out.json")
    expected = {
        "--iterations": recipe.iterations,
        "--batch-size": recipe.batch_size,
        "--group-size": recipe.group_size,
        "--num-minibatches": recipe.grpo.num_minibatches,
        "--epochs": recipe.grpo.num_epochs,
        "--max-new-tokens": arithmetic.MAX_COMPLETION_TOKENS,
        "--learning-rate": recipe.learning_rate,
        "--loss-type": recipe.grpo.loss_type,
        "--beta": recipe.grpo.beta,
        "--clip-eps": recipe.grpo.clip_eps,
        "--scale-rewards": "group",
    }
    for flag, value in expected.items():
        assert _flag(command, flag) == str(value), flag
    i = command.index("--reward-weights")
    assert command[i + 1 : i + 3] == ["1.0", "0.1"]
    assert command[-1].endswith("policy")  # rljax's final policy, scored by the peer too

    config = cli.parse(
        gvt.GRPOvsTRLConfig,
        ["--iterations", "7", "--num-minibatches", "4", "--estimator", "dr_grpo", "--skip-rljax"],
    )
    command = gvt.peer_command(config, "/m", paths, "/d/out.json")
    assert _flag(command, "--iterations") == "7"
    assert _flag(command, "--num-minibatches") == "4"
    assert _flag(command, "--scale-rewards") == "none"
    assert "--also-evaluate" not in command


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"estimator": "rloo"}, "--estimator"),
        ({"dynamic_sampling": True}, "--dynamic-sampling"),
        ({"overlong": "soft"}, "--overlong"),
        ({"tis_cap": 2.0}, "--tis-cap"),
        ({"data": "x.jsonl", "reward": ("m:f",)}, "--data"),
    ],
)
def test_settings_trl_cannot_mirror_are_refused(change, flag):
    gvt = load_script("benchmarks/grpo_vs_trl.py")
    run = dataclasses.replace(rl.grpo.GRPORunConfig(), **change)
    with pytest.raises(ValueError, match=flag):
        gvt.check_comparable(run)


def test_prompt_files_hold_rljax_rows_in_order(tmp_path, monkeypatch):
    """The rows of rl.grpo.load_prompts, the training rows cycled as rljax's cursor takes
    them (4 training problems here instead of 4,096, so 6 rows wrap around)."""
    gvt = load_script("benchmarks/grpo_vs_trl.py")
    problems = arithmetic.problems
    monkeypatch.setattr(
        arithmetic, "problems", lambda n, seed, split: problems(min(n, 4), seed, split)
    )
    run = dataclasses.replace(gvt._recipe(), iterations=2, batch_size=3, eval_prompts=5)
    paths = gvt.write_prompts(run, _CharTokenizer(), str(tmp_path))
    read = lambda p: [json.loads(line) for line in pathlib.Path(p).read_text().splitlines()]
    as_rows = lambda ps: [{"prompt": p["question"], "answer": p["answer"]} for p in ps]
    train = as_rows(problems(4, run.seed, "train"))
    assert read(paths["train"]) == train + train[:2]
    assert read(paths["heldout"]) == as_rows(problems(4, 0, "heldout"))


def test_rljax_side_timing(monkeypatch):
    """run_rljax around a stand-in rl.grpo.run: one evaluation, N collects, one evaluation."""
    gvt = load_script("benchmarks/grpo_vs_trl.py")
    clock = iter(range(100))
    monkeypatch.setattr(gvt.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(rl.grpo, "collect", lambda: None)
    monkeypatch.setattr(rl.grpo, "evaluate", lambda: None)

    def fake_run(run):
        rl.grpo.evaluate()
        for _ in range(run.iterations):
            rl.grpo.collect()
        rl.grpo.evaluate()
        return {
            "samples": run.iterations * run.rows,
            **{
                f"heldout_{k}_{w}": 0.5 for k in ("accuracy", "reward") for w in ("before", "after")
            },
            "kl_to_reference": 0.0,
        }

    monkeypatch.setattr(rl.grpo, "run", fake_run)
    run = dataclasses.replace(gvt._recipe(), iterations=4, batch_size=2, group_size=2)
    result = gvt.run_rljax(run)
    # perf_counter ticks 1 per call: run start 0, evaluation (1, 2), collects (3, 4) ...
    assert result["setup_s"] == 3
    assert result["iteration_times_s"] == [2, 2, 2, 2]
    assert result["rollout_times_s"] == [1, 1, 1, 1]
    assert result["steady_iteration"]["n"] == 3 and result["samples_seen"] == 16
    assert rl.grpo.collect.__name__ == "<lambda>"  # the wrappers are removed afterwards


def test_peer_loads_the_reward_functions_without_jax():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import trl_grpo;"
        "task = trl_grpo.load_task_module();"
        "assert 'jax' not in sys.modules, 'jax imported';"
        "r = task.accuracy_reward(['q', 'q'], [' 3+4=7\\n#### 7', '#### 8'], answer=['#### 7'] * 2);"
        "print(r, task.format_reward(['q'], ['#### 8']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks" / "peers")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[1.0, 0.0] [1.0]"
