"""GRPO side by side: rljax's ``experiments/grpo.py`` (:func:`rljax.rl.grpo.run`) and TRL's
``GRPOTrainer`` (``benchmarks/peers/trl_grpo.py``, in its own virtual environment) on the same
task, model, prompts and settings; seconds per iteration and held-out accuracy.

The settings are the recipe's: every flag of ``experiments/grpo.py`` is a flag here, with the
defaults of :class:`rljax.rl.grpo.GRPORunConfig` read at run time (so the comparison follows
the recipe when its defaults change), except ``--eval-every 0`` (evaluate only before and
after, so no iteration carries an evaluation) and ``--checkpoint-every 1000000`` (only the
final checkpoint, after the timed iterations; TRL saves nothing). The TRL peer gets the same
base model folder, the same prompt rows in the same order (``rl.grpo.load_prompts``, written
to JSONL), the same reward functions and weights (``rl.grpo.reward_set``: rljax's
``accuracy_reward`` 1.0 and ``format_reward`` 0.1, which TRL calls itself), prompts per
iteration, group size (``num_generations``), optimizer steps per iteration
(``steps_per_generation`` = ``--num-minibatches``, no gradient accumulation), epochs
(``num_iterations``), completion tokens, temperature (no top-k/top-p), Adam learning rate
(constant) with clipping at 1, loss type, clip range, beta and advantage scaling
(``--estimator`` grpo / grpo_batch_std / dr_grpo -> ``scale_rewards`` group / batch / none).
Settings TRL has no counterpart for (your own ``--data``/``--reward``, dynamic sampling, soft
overlong penalty, ``--tis-cap``) are refused.

Measured on each side: ``setup_s`` (model loading, compilation ahead of time of rljax's update,
the "before" evaluation on rljax's side), the first iteration (rljax: with the rollout's
compilation) apart from the steady state (median, mean, p10-p90 over iterations 2..N), the time
of the rollout stage within each iteration (JSON only: TRL's ``_generate_and_score_completions``;
rljax's ``collect``, which also waits for the previous iteration's update, dispatched
asynchronously, so the two are not comparable), the held-out greedy
exact-match accuracy before and after (each side's own evaluator; the TRL peer also scores
rljax's final policy with ``transformers`` ``generate``, so both final models meet one
evaluator), samples seen and the 1-minute load average. rljax's iteration is the time from one
``collect`` call to the next (the last: to the final evaluation), so it includes shaping, the
compiled update and logging.

Run: ``python benchmarks/grpo_vs_trl.py [--iterations 20] [--peer-python PATH]``. Appends the
record to ``--json`` (default ``benchmarks/grpo_vs_trl.json``) and prints a markdown table.
Figures: ``benchmarks/RESULTS.md``, "GRPO vs TRL on the arithmetic task (CPU)".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "peers" / "trl_grpo.py"
if str(PEER.parent) not in sys.path:  # the peers' helpers: both sides' statistics are one function
    sys.path.insert(0, str(PEER.parent))

from _peer_common import nearest_rank_summary  # noqa: E402

from rljax import cli, rl  # noqa: E402
from rljax.models import hf  # noqa: E402
from rljax.tasks import arithmetic  # noqa: E402

SCALE_REWARDS = {"grpo": "group", "grpo_batch_std": "batch", "dr_grpo": "none"}
REWARDS = ("accuracy_reward", "format_reward")  # the order the peer passes them to TRL


def _recipe() -> rl.grpo.GRPORunConfig:
    """The recipe's defaults, evaluated only before and after, checkpointed only at the end."""
    return dataclasses.replace(
        rl.grpo.GRPORunConfig(),
        out="runs/grpo_vs_trl/rljax",
        eval_every=0,
        checkpoint_every=1_000_000,
    )


@dataclasses.dataclass(frozen=True)
class GRPOvsTRLConfig:
    """rljax's GRPO recipe against TRL's GRPOTrainer on the same settings.

    Attributes:
      peer_python: the Python of the TRL virtual environment (torch 2.13.0 CPU, trl 1.16.0).
      threads: torch threads of the TRL peer.
      data_dir: where the prompt rows for the peer are written.
      json: results file (a record is appended to its "runs").
      skip_rljax: run only the TRL peer.
      skip_trl: run only rljax.
      overwrite: delete an earlier run in --out first (a resumed run would not be timed).
      peer_timeout: seconds before the peer is stopped.
      run: the recipe (experiments/grpo.py's flags).
    """

    peer_python: str = os.environ.get("RLJAX_TRL_PYTHON", "/work/peer-venv-trl/bin/python")
    threads: int = 2
    data_dir: str = "runs/grpo_vs_trl/data"
    json: str = str(ROOT / "benchmarks" / "grpo_vs_trl.json")
    skip_rljax: bool = False
    skip_trl: bool = False
    overwrite: bool = False
    peer_timeout: int = 3600
    run: rl.grpo.GRPORunConfig = dataclasses.field(default_factory=_recipe)


def check_comparable(run: rl.grpo.GRPORunConfig) -> None:
    """Refuse settings the TRL peer cannot mirror, naming the flag."""

    def refuse(flag, why):
        raise ValueError(f"--{flag}: {why}; the TRL side cannot match it")

    if run.data is not None or run.reward:
        refuse("data/--reward", "the peer runs the built-in arithmetic task and its rewards")
    if run.estimator not in SCALE_REWARDS:
        refuse("estimator", f"{run.estimator!r} is not one of {sorted(SCALE_REWARDS)}")
    if run.dynamic_sampling:
        refuse("dynamic-sampling", "TRL's GRPOTrainer has no dynamic sampling")
    if run.overlong == "soft":
        refuse("overlong", "TRL's GRPOTrainer has no soft overlong penalty")
    if run.tis_cap is not None:
        refuse("tis-cap", "TRL's importance-sampling correction is for vLLM only")
    if run.max_prompt_length is not None and run.max_prompt_length < run.prompt_width:
        refuse("max-prompt-length", "TRL 1.16 does not truncate prompts")
    if rl.grpo.reward_set(run).names != REWARDS:
        raise ValueError(f"the recipe's rewards {rl.grpo.reward_set(run).names} are not {REWARDS}")


def shared_settings(run: rl.grpo.GRPORunConfig, model: str) -> dict:
    """The settings both sides run with, as recorded in the results."""
    return {
        "model": model,
        "iterations": run.iterations,
        "batch_size": run.batch_size,
        "group_size": run.group_size,
        "samples_per_iteration": run.rows,
        "num_minibatches": run.grpo.num_minibatches,
        "epochs": run.grpo.num_epochs,
        "max_new_tokens": run.completion_width,
        "temperature": run.temperature,
        "learning_rate": run.learning_rate,
        "loss_type": run.grpo.loss_type,
        "importance_sampling_level": run.grpo.importance_sampling_level,
        "beta": run.grpo.beta,
        "clip_eps": run.grpo.clip_eps,
        "clip_eps_high": run.grpo.clip_eps_high,
        "estimator": run.estimator,
        "scale_rewards": SCALE_REWARDS[run.estimator],
        "overlong": run.overlong,
        "reward_weights": dict(
            zip(REWARDS, map(float, rl.grpo.reward_set(run).weights), strict=True)
        ),
        "eval_prompts": run.eval_prompts,
        "seed": run.seed,
    }


def write_prompts(run: rl.grpo.GRPORunConfig, tokenizer, folder: str) -> dict[str, str]:
    """The rows rljax trains on, in the order it takes them (the cursor cycles through the
    prompt list), and its held-out rows, as JSONL ``{"prompt", "answer"}`` files."""
    train, held_out, _ = rl.grpo.load_prompts(run, tokenizer)
    order = [i % len(train) for i in range(run.iterations * run.batch_size)]
    rows = {
        "train": [(train.texts[i], train.columns["answer"][i]) for i in order],
        "heldout": list(zip(held_out.texts, held_out.columns["answer"], strict=True)),
    }
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, pairs in rows.items():
        paths[name] = os.path.abspath(os.path.join(folder, f"{name}.jsonl"))
        with open(paths[name], "w") as f:
            f.writelines(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs)
    return paths


def peer_command(config: GRPOvsTRLConfig, model: str, paths: dict, out_json: str) -> list[str]:
    """The TRL peer's command line: the shared settings as its flags."""
    run = config.run
    s = shared_settings(run, model)
    flags = {
        "--model": model,
        "--train": paths["train"],
        "--heldout": paths["heldout"],
        "--iterations": s["iterations"],
        "--batch-size": s["batch_size"],
        "--group-size": s["group_size"],
        "--num-minibatches": s["num_minibatches"],
        "--epochs": s["epochs"],
        "--max-new-tokens": s["max_new_tokens"],
        "--temperature": s["temperature"],
        "--learning-rate": s["learning_rate"],
        "--loss-type": s["loss_type"],
        "--importance-sampling-level": s["importance_sampling_level"],
        "--beta": s["beta"],
        "--clip-eps": s["clip_eps"],
        "--scale-rewards": s["scale_rewards"],
        "--seed": s["seed"],
        "--threads": config.threads,
        "--json": out_json,
    }
    if s["clip_eps_high"] is not None:
        flags["--clip-eps-high"] = s["clip_eps_high"]
    command = [config.peer_python, str(PEER)]
    for flag, value in flags.items():
        command += [flag, str(value)]
    command += ["--reward-weights", *(str(w) for w in s["reward_weights"].values())]
    if run.overlong == "mask":
        command.append("--mask-truncated-completions")
    if not config.skip_rljax:
        command += ["--also-evaluate", str(pathlib.Path(run.out).resolve() / "policy")]
    return command


@contextlib.contextmanager
def _timestamps(module, name: str, record: list):
    """Record ``(start, end)`` of every call of ``module.name`` while in the block."""
    original = getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        record.append((start, time.perf_counter()))
        return out

    setattr(module, name, timed)
    try:
        yield record
    finally:
        setattr(module, name, original)


def iteration_times(collects: list[tuple], evaluations: list[tuple]) -> list[float]:
    """Seconds per iteration: from one ``collect`` start to the next, the last to the start
    of the final evaluation."""
    starts = [c[0] for c in collects] + [evaluations[-1][0]]
    return [b - a for a, b in itertools.pairwise(starts)]


def run_rljax(run: rl.grpo.GRPORunConfig) -> dict:
    """``rl.grpo.run`` (experiments/grpo.py) with its stages timed from outside."""
    import flax
    import jax
    import optax

    start, load_before = time.perf_counter(), os.getloadavg()
    with (
        _timestamps(rl.grpo, "collect", []) as collects,
        _timestamps(rl.grpo, "evaluate", []) as evaluations,
    ):
        summary = rl.grpo.run(run)
    iterations = iteration_times(collects, evaluations)
    rollouts = [end - begin for begin, end in collects]
    return {
        "system": "rljax",
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "python": platform.python_version(),
        },
        "devices": [str(d) for d in jax.devices()],
        "samples_seen": summary["samples"],
        "setup_s": collects[0][0] - start,
        "first_iteration_s": iterations[0],
        "steady_iteration": nearest_rank_summary(iterations[1:]),
        "iteration_times_s": iterations,
        "rollout_times_s": rollouts,
        "steady_rollout": nearest_rank_summary(rollouts[1:]),
        "heldout_problems": run.eval_prompts,
        "heldout_accuracy_before": summary["heldout_accuracy_before"],
        "heldout_accuracy_after": summary["heldout_accuracy_after"],
        "heldout_reward_before": summary["heldout_reward_before"],
        "heldout_reward_after": summary["heldout_reward_after"],
        "kl_to_reference": summary["kl_to_reference"],
        "load_avg": {"before": list(load_before), "after": list(os.getloadavg())},
        "wall_s": time.perf_counter() - start,
    }


def run_trl(config: GRPOvsTRLConfig, model: str, paths: dict) -> dict:
    out_json = os.path.abspath(os.path.join(config.data_dir, "trl_result.json"))
    if os.path.exists(out_json):
        os.remove(out_json)
    command = peer_command(config, model, paths, out_json)
    print("[grpo_vs_trl] " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, timeout=config.peer_timeout, cwd=ROOT)
    result = json.loads(pathlib.Path(out_json).read_text())
    result["process_wall_s"] = time.perf_counter() - start
    return result


def weights_sha256(model: str) -> str | None:
    """SHA-256 of the model folder's ``model.safetensors`` (the shipped model is rebuilt at
    times under the same path; the hash tells records apart)."""
    path = pathlib.Path(model) / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}


def table(record: dict) -> str:
    rows = [
        "| system | setup s | first iteration s | steady s/iteration median [p10-p90] | "
        "samples | held-out accuracy before -> after | load avg (1 min) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name in ("rljax", "trl"):
        r = record.get(name)
        if r is None:
            continue
        steady = r["steady_iteration"] or dict.fromkeys(("median_s", "p10_s", "p90_s"), 0.0)
        load = r["load_avg"]
        rows.append(
            f"| {name} | {r['setup_s']:.1f} | {r['first_iteration_s']:.2f} | "
            f"{steady['median_s']:.3f} [{steady['p10_s']:.3f}-{steady['p90_s']:.3f}] | "
            f"{r['samples_seen']} | "
            f"{r['heldout_accuracy_before']:.3f} -> {r['heldout_accuracy_after']:.3f} | "
            f"{load['before'][0]:.1f} -> {load['after'][0]:.1f} |"
        )
    return "\n".join(rows)


def save(record: dict, path: str) -> None:
    target = pathlib.Path(path)
    existing = json.loads(target.read_text()) if target.exists() else {"runs": []}
    existing["runs"].append(record)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(existing, indent=1) + "\n")


def main(config: GRPOvsTRLConfig) -> dict:
    run = config.run
    check_comparable(run)
    model = run.model or arithmetic.default_base_model()
    if (pathlib.Path(run.out) / "checkpoints").exists() and not config.skip_rljax:
        if not config.overwrite:
            raise SystemExit(f"--out {run.out} holds a run (it would resume): pass --overwrite")
        shutil.rmtree(run.out)
    record = {
        "benchmark": "grpo_vs_trl",
        "measured_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine(),
        "settings": shared_settings(run, model),
        "model_sha256": weights_sha256(model),
    }
    paths = write_prompts(run, hf.load_tokenizer(model), config.data_dir)
    if not config.skip_rljax:
        record["rljax"] = run_rljax(run)
    if not config.skip_trl:
        record["trl"] = run_trl(config, model, paths)
    save(record, config.json)
    print(table(record), flush=True)
    return record


if __name__ == "__main__":
    main(cli.parse(GRPOvsTRLConfig))
