"""Offline, iterative and online DPO at equal labelling budgets on the built-in sorting task.

Each method spends completions labelled by the task's oracle: offline DPO its 4,096 generated
pairs (8,192 labelled completions, not sampled from the policy), iterative DPO 1,024 prompts x
4 samples a round (three rounds), online DPO 32 prompts x 4 samples an iteration (the best vs
the worst of each prompt's samples, one DPO step per iteration). Every policy is then judged
the same way: the oracle's win-rate of its samples over the base model's on the same held-out
prompts with the same key (rljax.experiment.oracle_win_rate). Online DPO is trained once and
resumed to each budget, so its points are one run.

Run: `python experiments/preference_budget.py [--out DIR] [--budgets 4096,8192,12288]`; writes
DIR/preference_budget.json and DIR/preference_budget.png. About 6 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rljax import cli, data, experiment, rl
from rljax.models import hf
from rljax.tasks import sorting


@dataclasses.dataclass(frozen=True)
class Config:
    """Offline vs iterative vs online DPO at equal oracle-labelling budgets.

    Attributes:
      out: output folder (one run folder per method, the JSON and the figure).
      budgets: online DPO's budgets in labelled completions, comma-separated (multiples of
        its 128 samples an iteration).
      online_learning_rate: online DPO's Adam learning rate.
      win_rate_prompts: held-out prompts of the win-rate.
      seed: seed of every run (the win-rate's key is seed + 1, as the DPO script's).
    """

    out: str = "runs/preference_budget"
    budgets: str = "4096,8192,12288"
    online_learning_rate: float = 3e-4
    win_rate_prompts: int = 512
    seed: int = 0


def win_rate(folder: str, base, tokenizer, prompts, seed: int) -> float:
    """The oracle's win-rate of the policy in ``folder`` over ``base``."""
    policy = hf.load_model(folder)
    return experiment.oracle_win_rate(policy, base, tokenizer, prompts, seed)["win_rate"]


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    budgets = [int(b) for b in config.budgets.split(",") if b.strip()]
    offline = experiment.train_dpo(experiment.DPORunConfig(out=str(out / "offline")))
    iterative = experiment.train_iterative_dpo(
        experiment.IterativeDPORunConfig(out=str(out / "iterative"), seed=config.seed)
    )
    base_path = sorting.default_base_model()
    tokenizer, base = hf.load_tokenizer(base_path), hf.load_model(base_path)
    held_out = data.load_rows(str(out / "offline" / "data" / "test.jsonl"))
    prompts = sorted({row["prompt"] for row in held_out})[: config.win_rate_prompts]
    judge = lambda folder: win_rate(folder, base, tokenizer, prompts, config.seed + 1)
    points = {
        "offline DPO": [(2 * offline["data"]["train"]["pairs"], judge(out / "offline" / "policy"))]
    }
    per_round = iterative["config"]["prompts_per_round"] * iterative["config"]["samples_per_prompt"]
    points["iterative DPO"] = [
        (r * per_round, judge(out / "iterative" / f"round_{r}" / "policy"))
        for r in range(1, len(iterative["rounds"]) + 1)
    ]
    online = rl.online_dpo.OnlineDPORunConfig(
        model=base_path, data=str(out / "offline" / "data" / "train.jsonl"),
        reward=("rljax.tasks.sorting:score_batch",), max_prompt_length=16, max_new_tokens=16,
        learning_rate=config.online_learning_rate, eval_every=0, seed=config.seed,
        out=str(out / "online"), allow_config_change=True,
    )  # fmt: skip
    points["online DPO"] = []
    for budget in budgets:
        rl.online_dpo.run(dataclasses.replace(online, iterations=budget // online.rows))
        points["online DPO"].append((budget, judge(out / "online" / "policy")))
    record = {"win_rate_vs_labelled_completions": points, "prompts": len(prompts)}
    (out / "preference_budget.json").write_text(json.dumps(record, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, xy in points.items():
        ax.plot(*zip(*xy, strict=True), marker="o", label=name)
    ax.set(xlabel="completions labelled by the oracle", ylabel="oracle win-rate over base")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "preference_budget.png", dpi=120)
    for name, xy in points.items():
        print(f"[budget] {name}: " + ", ".join(f"{n} -> {w:.3f}" for n, w in xy))
    return record


if __name__ == "__main__":
    main(cli.parse(Config))
