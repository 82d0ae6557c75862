"""The reward-vs-KL frontier of DPO, IPO, PPO, TRPO and GRPO on the built-in task (the
controlled-generation comparison of Rafailov et al., 2023, Fig. 2, left), with seeds.

Every arm starts from the same tiny base model, which is also the reference, and is trained
with one coefficient and one seed: DPO and IPO for several betas (on the oracle-labelled pairs
of experiments/dpo.py), PPO and TRPO with a value critic for several KL-penalty coefficients
(experiments/ppo_rlhf.py, trpo_rlhf.py), GRPO (critic-free, group advantages; the oracle's
score as the reward function) for several weights of its in-loss KL term. Each final policy is
evaluated the same way: the same held-out prompts and key, one temperature-1 sample per prompt;
the oracle's mean score, the mean sequence KL(policy || reference) on those samples, and the
samples' validity (the EOS rate and the fraction of valid permutations, so a high score from
degenerate samples shows).

The summary aggregates the seeds of each setting (mean and a 95% Student-t interval on both
axes), draws each method's Pareto frontier (the upper envelope of its settings' means over KL:
the best score reachable at or below each KL) and a second panel of score against training
samples (the completions each arm's training drew or read), and tabulates, per method, the
best score at KL <= 1, 2 and 4 nats (frontier.md, quoted by the README).

Arms and evaluations are kept in per-arm folders (``summary.json`` marks a finished arm,
``frontier_point.json`` its evaluation), so an interrupted sweep resumes arm by arm; ``--workers
N`` trains N arms at a time in separate processes.

Run: ``python experiments/frontier.py [--seeds 0,1,2] [--dpo-betas ...] [--workers 2]
[--out DIR] [--quick]``. Writes DIR/frontier.json, DIR/frontier.png, DIR/frontier.md and one
folder per arm.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import pathlib
import time
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from rljax import cli, experiment, rl, runs
from rljax.models import hf
from rljax.tasks import sorting


class Method(NamedTuple):
    """A method's row: the flag field of its coefficients, the coefficient's name, and its
    plot marker and color."""

    field: str
    coef_name: str
    marker: str
    color: str


#: Methods in plot and table order.
METHODS = {
    "DPO": Method("dpo_betas", "beta", "o", "tab:blue"),
    "IPO": Method("ipo_betas", "beta (tau)", "D", "tab:purple"),
    "PPO": Method("ppo_kl_coefs", "KL coef", "s", "tab:orange"),
    "TRPO": Method("trpo_kl_coefs", "KL coef", "^", "tab:green"),
    "GRPO": Method("grpo_betas", "KL loss beta", "v", "tab:red"),
}
KL_LIMITS = (1.0, 2.0, 4.0)  # nats: the table's columns
GRPO_GROUP = 8  # completions per prompt of the GRPO arms


@dataclasses.dataclass(frozen=True)
class Config:
    """Reward-vs-KL frontier of DPO, IPO, PPO, TRPO and GRPO on the built-in task.

    Attributes:
      model: the base model (policy start and reference), a Hugging Face folder; none = the
        built-in task's tiny base model.
      out: output folder (one sub-folder per arm, frontier.json, frontier.png, frontier.md).
      seeds: comma-separated training seeds; every setting is trained once per seed.
      dpo_betas: comma-separated DPO betas (empty = no DPO arms).
      ipo_betas: comma-separated IPO betas (its tau; empty = no IPO arms).
      ppo_kl_coefs: comma-separated KL-penalty coefficients of the PPO arms (empty = none).
      trpo_kl_coefs: comma-separated KL-penalty coefficients of the TRPO arms (empty = none).
      grpo_betas: comma-separated weights of GRPO's k3 KL term in the loss (empty = none).
      dpo_steps: optimizer steps of each DPO/IPO arm.
      dpo_pairs: generated training pairs of each DPO/IPO arm.
      dpo_rpo_alpha: RPO NLL weight of the DPO/IPO arms (experiments/dpo.py's default; none =
        plain DPO, which loses sample validity on this task).
      iterations: iterations of each PPO, TRPO and GRPO arm (64 sampled completions each).
      grpo_learning_rate: Adam learning rate of the GRPO arms.
      eval_prompts: held-out prompts sampled per policy for its frontier point.
      arm_eval_prompts: held-out prompts of each arm's own evaluations (its run's win-rate or
        held-out score, logged in its folder; not the frontier point).
      eval_seed: seed of the held-out prompts and of the evaluation key (the same for every
        arm).
      workers: arms trained at a time, each in its own process (1 = in this process).
      quick: a smoke-test sweep: every setting left at its default is shrunk (2 seeds, one
        coefficient per method, a few steps, 32 and 8 prompts); a setting given explicitly is
        kept.
      log: metrics sinks of every arm, comma-separated: jsonl (each arm's metrics.jsonl,
        always written), tensorboard, wandb (see rljax.runs).
    """

    model: str | None = None
    out: str = "runs/frontier"
    seeds: str = "0,1,2"
    dpo_betas: str = "0.03,0.1,0.3,1,3"
    ipo_betas: str = "0.3,1,3,10,30"
    ppo_kl_coefs: str = "0.003,0.01,0.03,0.1,0.3"
    trpo_kl_coefs: str = "0.003,0.01,0.03,0.1,0.3"
    grpo_betas: str = "0.003,0.03,0.1,0.3,1"
    dpo_steps: int = 200
    dpo_pairs: int = 4096
    dpo_rpo_alpha: float | None = 0.5
    iterations: int = 40
    grpo_learning_rate: float = 2e-4
    eval_prompts: int = 512
    arm_eval_prompts: int = 64
    eval_seed: int = 0
    workers: int = 1
    quick: bool = False
    log: str = "jsonl"

    def __post_init__(self):
        runs.parse_sinks(self.log)  # an unknown sink fails here, before any arm
        positive = ("dpo_steps", "dpo_pairs", "iterations", "eval_prompts", "arm_eval_prompts")
        for field in (*positive, "workers"):
            if getattr(self, field) < 1:
                raise ValueError(f"--{field.replace('_', '-')}: must be >= 1")
        if not self.grpo_learning_rate > 0:
            raise ValueError("--grpo-learning-rate: must be > 0")
        _ints(self.seeds, "seeds")

    def resolved(self) -> Config:
        """The settings a run uses: with ``quick``, the quick values of the fields left at
        their defaults."""
        if not self.quick:
            return self
        defaults = Config()
        changes = {k: v for k, v in QUICK.items() if getattr(self, k) == getattr(defaults, k)}
        return dataclasses.replace(self, **changes)


QUICK = {
    "seeds": "0,1",
    "dpo_betas": "0.1",
    "ipo_betas": "0.1",
    "ppo_kl_coefs": "0.05",
    "trpo_kl_coefs": "0.05",
    "grpo_betas": "0.05",
    "dpo_steps": 4,
    "dpo_pairs": 64,
    "iterations": 2,
    "eval_prompts": 32,
    "arm_eval_prompts": 8,
}


def _numbers(text: str, flag: str, kind=float) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{flag}: expected comma-separated numbers, got {text!r}") from None


def _ints(text: str, flag: str) -> list[int]:
    values = _numbers(text, flag, int)
    if not values:
        raise ValueError(f"--{flag}: give at least one")
    if len(set(values)) != len(values):
        raise ValueError(f"--{flag}: {text!r} repeats a value")
    return values


def arms(config: Config) -> list[dict]:
    """The arms, ``{"method", "coef", "seed", "folder"}`` each, in method, coefficient, seed
    order."""
    config = config.resolved()
    out = pathlib.Path(config.out)
    found, seeds = [], _ints(config.seeds, "seeds")
    for method, spec in METHODS.items():
        field = spec.field
        flag = field.replace("_", "-")
        coefs = _numbers(getattr(config, field), flag)
        if len(set(coefs)) != len(coefs):
            raise ValueError(f"--{flag}: {getattr(config, field)!r} repeats a value")
        for coef in coefs:
            if not coef > 0:
                raise ValueError(f"--{flag}: every value must be > 0, got {coef:g}")
            for seed in seeds:
                folder = out / f"{method.lower()}_{coef:g}_seed{seed}"
                found.append({"method": method, "coef": coef, "seed": seed, "folder": str(folder)})
    if not found:
        flags = ", ".join("--" + f.replace("_", "-") for f, *_ in METHODS.values())
        raise ValueError(f"no arms: give at least one of {flags}")
    return found


def _grpo_prompts(config: Config, seed: int) -> str:
    """A prompt file of the built-in task for a GRPO arm (its last 10% are held out by the
    driver): enough prompts for every iteration's 8 distinct prompts."""
    path = pathlib.Path(config.out) / f"grpo_prompts_seed{seed}.jsonl"
    if not path.exists():
        texts = sorting.prompts(max(64, config.iterations * 8 * 10 // 9 + 8), seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        tmp.replace(path)
    return str(path)


def arm_run_config(arm: dict, config: Config, model_path: str):
    """The run configuration that trains ``arm`` (a DPO run, or an RL registry run)."""
    common = {"model": model_path, "out": arm["folder"], "seed": arm["seed"], "log": config.log}
    if arm["method"] in ("DPO", "IPO"):
        return experiment.DPORunConfig(
            **common,
            beta=arm["coef"],
            loss_type="sigmoid" if arm["method"] == "DPO" else "ipo",  # TRL's loss names
            steps=config.dpo_steps,
            train_pairs=config.dpo_pairs,
            eval_pairs=max(config.arm_eval_prompts // 2, config.dpo_pairs // 8),
            rpo_alpha=config.dpo_rpo_alpha,
            win_rate_prompts=config.arm_eval_prompts,
        )
    if arm["method"] == "GRPO":
        return rl.config(
            "grpo",
            **common,
            data=_grpo_prompts(config, arm["seed"]),
            reward=("rljax.tasks.sorting:score_batch",),
            iterations=config.iterations,
            batch_size=64 // GRPO_GROUP,
            group_size=GRPO_GROUP,
            beta=arm["coef"],
            learning_rate=config.grpo_learning_rate,
            max_prompt_length=16,  # as the RLHF arms and the evaluation
            max_new_tokens=sorting.max_completion_tokens(),
            eval_every=0,
            eval_prompts=config.arm_eval_prompts,
        )
    return rl.config(
        arm["method"].lower(),  # the registry's ppo or trpo
        **common,
        iterations=config.iterations,
        kl_coef=arm["coef"],
        eval_every=0,
        eval_prompts=config.arm_eval_prompts,
    )


def training_samples(run_config) -> int:
    """Completions an arm's training drew (RL: sampled, scored by the oracle) or read (DPO:
    two per pair in every optimizer batch)."""
    if isinstance(run_config, experiment.DPORunConfig):
        return run_config.steps * run_config.batch_size * 2
    return run_config.iterations * run_config.rows


def train_arm(arm: dict, config: Config, model_path: str) -> None:
    """Train one arm (:func:`train_arms` leaves out the finished ones)."""
    run_config = arm_run_config(arm, config, model_path)
    if isinstance(run_config, experiment.DPORunConfig):
        experiment.train_dpo(run_config)
    else:
        rl.train(run_config, label=f"frontier {_label(arm)}")


def _train_in_worker(arm: dict, config: Config, model_path: str) -> str:
    train_arm(arm, config, model_path)
    return arm["folder"]


def _label(arm: dict) -> str:
    return f"{arm['method']} {METHODS[arm['method']].coef_name} {arm['coef']:g} seed {arm['seed']}"


def train_arms(todo: list[dict], config: Config, model_path: str) -> None:
    """Train the unfinished arms, ``config.workers`` at a time (spawned processes: each
    imports JAX afresh and finds the compiled programs in the persistent cache)."""
    finished = len(todo)
    todo = [a for a in todo if not (pathlib.Path(a["folder"]) / "summary.json").exists()]
    finished -= len(todo)
    if finished:
        print(f"[frontier] {finished} arms finished before, not trained again", flush=True)
    if config.workers == 1 or len(todo) <= 1:
        for i, arm in enumerate(todo):
            print(f"[frontier] arm {i + 1}/{len(todo)}: {_label(arm)}", flush=True)
            train_arm(arm, config, model_path)
        return
    context = multiprocessing.get_context("spawn")  # JAX does not survive fork
    with concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=context) as pool:
        futures = {pool.submit(_train_in_worker, a, config, model_path): a for a in todo}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            future.result()  # an arm's error stops the sweep, naming it in the traceback
            print(f"[frontier] trained {done}/{len(todo)}: {_label(futures[future])}", flush=True)


class Evaluator:
    """One policy's frontier point on the held-out prompts, the same prompts and key for every
    arm: the oracle score, the sequence KL to the reference, the EOS rate, the rate of valid
    permutations and the mean completion length (one temperature-1 sample per prompt)."""

    def __init__(self, model_path: str, config: Config):
        self.tokenizer = hf.load_tokenizer(model_path)
        self.ref_graphdef, self.ref_params = nnx.split(hf.load_model(model_path))
        self.prompts = sorting.prompts(config.eval_prompts, config.eval_seed + 11)
        self.key = jax.random.key(config.eval_seed + 12)
        self.settings = {"eval_prompts": config.eval_prompts, "eval_seed": config.eval_seed}
        sampling = rl.rollout.sampling_config(self.tokenizer, sorting.max_completion_tokens(), 1.0)
        self.rollout_fn = rl.rollout.make_rollout_fn(
            self.ref_graphdef, sampling, ref_graphdef=self.ref_graphdef
        )
        self.valid: list[list[bool]] = []  # per chunk of prompts, while evaluating

    def _score(self, prompts, rollout) -> np.ndarray:
        texts = rl.rollout.decode_completions(self.tokenizer, rollout)
        self.valid.append([sorting.is_valid(p, t) for p, t in zip(prompts, texts, strict=True)])
        return np.asarray(sorting.score_batch(list(prompts), texts), np.float32)

    def __call__(self, params) -> dict:
        self.valid = []
        rows = min(256, len(self.prompts))
        point = rl.rlhf.evaluate_policy_kl(
            self.rollout_fn, params, self.ref_params, self.tokenizer, self.prompts,
            self._score, key=self.key, max_prompt_length=16, rows=rows,
        )  # fmt: skip
        # The last chunk is padded with repeats of its last prompt: not counted (nor scored).
        n = len(self.prompts)
        valid = [v for i, chunk in enumerate(self.valid) for v in chunk[: n - i * rows]]
        point["valid_rate"] = float(np.mean(valid))
        return point

    def arm_point(self, arm: dict) -> dict:
        """The arm's point, from its folder's frontier_point.json when that was evaluated
        with the same settings."""
        cache = pathlib.Path(arm["folder"]) / "frontier_point.json"
        if cache.exists():
            saved = json.loads(cache.read_text())
            if saved.get("settings") == self.settings:
                return saved["point"]
        graphdef, params = nnx.split(hf.load_model(str(pathlib.Path(arm["folder"]) / "policy")))
        if graphdef != self.ref_graphdef:
            raise ValueError(f"{arm['folder']}/policy: not the base model's architecture")
        point = self(params)
        cache.write_text(json.dumps(runs.to_json({"settings": self.settings, "point": point})))
        return point


# ---------------------------------------------------------------------------- statistics


def interval(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float(x.mean()), 0.0
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def aggregate(points: list[dict]) -> list[dict]:
    """One entry per (method, coefficient): the seeds' mean and 95% half-width of score, KL,
    the validity rates and training samples."""
    settings: dict[tuple, list[dict]] = {}
    for p in points:
        if p["method"] != "reference":
            settings.setdefault((p["method"], p["coef"]), []).append(p)
    out = []
    for (method, coef), group in settings.items():
        entry = {"method": method, "coef": coef, "seeds": len(group)}
        for key in ("score", "kl", "eos_rate", "valid_rate", "samples"):
            entry[key], entry[f"{key}_ci"] = interval([p[key] for p in group])
        out.append(entry)
    return out


def pareto(settings: list[dict]) -> list[dict]:
    """A method's Pareto frontier over its settings' means: by increasing KL, the settings
    whose score beats every setting of lower (or equal) KL."""
    front, best = [], -math.inf
    for s in sorted(settings, key=lambda s: (s["kl"], -s["score"])):
        if s["score"] > best:
            front.append(s)
            best = s["score"]
    return front


def best_within(settings: list[dict], limit: float) -> dict | None:
    """The setting with the highest mean score among those whose mean KL is <= ``limit``."""
    inside = [s for s in settings if s["kl"] <= limit]
    return max(inside, key=lambda s: s["score"]) if inside else None


def markdown_table(summary: dict) -> str:
    """Per method, the best mean score at KL <= 1, 2, 4 nats with its 95% interval, the
    setting, its mean KL and its rate of valid samples."""
    settings = summary["settings"]
    head = "| method | " + " | ".join(f"best score at KL <= {k:g}" for k in KL_LIMITS) + " |"
    lines = [head, "|---|" + "---|" * len(KL_LIMITS)]
    ref = summary["reference"]
    lines.append(
        f"| reference (base model) | {ref['score']:.3f} (KL 0, valid {ref['valid_rate']:.2f}) |"
        + " |" * (len(KL_LIMITS) - 1)
    )
    for method, spec in METHODS.items():
        name = spec.coef_name
        mine = [s for s in settings if s["method"] == method]
        if not mine:
            continue
        cells = []
        for limit in KL_LIMITS:
            s = best_within(mine, limit)
            cells.append(
                "-"
                if s is None
                else f"{s['score']:.3f} ± {s['score_ci']:.3f} ({name} {s['coef']:g}: KL "
                f"{s['kl']:.2f}, valid {s['valid_rate']:.2f})"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the sweep


def main(config: Config) -> dict:
    start = time.perf_counter()
    config = config.resolved()
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = arms(config)
    model_path = experiment.resolve_model(config)
    seeds = _ints(config.seeds, "seeds")
    print(
        f"[frontier] {len(todo)} arms ({len(todo) // len(seeds)} settings x {len(seeds)} "
        f"seeds), {config.workers} at a time; out {out}",
        flush=True,
    )
    train_arms(todo, config, model_path)
    evaluate = Evaluator(model_path, config)
    reference = {"method": "reference", "coef": None, **evaluate(evaluate.ref_params)}
    print(f"[frontier] reference: score {reference['score']:.3f}", flush=True)
    points = []
    for arm in todo:
        run_config = arm_run_config(arm, config, model_path)
        point = {
            "method": arm["method"],
            "coef": arm["coef"],
            "seed": arm["seed"],
            "samples": training_samples(run_config),
            **evaluate.arm_point(arm),
        }
        points.append(point)
        print(
            f"[frontier] {_label(arm)}: score {point['score']:.3f}, KL {point['kl']:.3f} nats, "
            f"valid {point['valid_rate']:.3f}",
            flush=True,
        )
    settings = aggregate(points)
    summary = {
        "reference": reference,
        "points": points,
        "settings": settings,
        "frontiers": {
            m: pareto(mine) for m in METHODS if (mine := [s for s in settings if s["method"] == m])
        },
        "eval_prompts": len(evaluate.prompts),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "config": dataclasses.asdict(config),
    }
    (out / "frontier.json").write_text(json.dumps(runs.to_json(summary), indent=2))
    (out / "frontier.md").write_text(markdown_table(summary))
    plot(summary, out / "frontier.png")
    print(markdown_table(summary))
    print(f"[frontier] wrote {out}/frontier.json, frontier.md, frontier.png "
          f"({summary['wall_seconds']:.0f}s)", flush=True)  # fmt: skip
    return summary


def plot(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    for method, (_, _, marker, color) in METHODS.items():
        mine = [s for s in summary["settings"] if s["method"] == method]
        if not mine:
            continue
        seeds = [p for p in summary["points"] if p["method"] == method]
        ax.scatter([p["kl"] for p in seeds], [p["score"] for p in seeds], marker=marker,
                   color=color, alpha=0.2, s=14, linewidths=0)  # fmt: skip
        ax.errorbar([s["kl"] for s in mine], [s["score"] for s in mine],
                    xerr=[s["kl_ci"] for s in mine], yerr=[s["score_ci"] for s in mine],
                    fmt=marker, color=color, capsize=2, ms=5, label=method)  # fmt: skip
        front = summary["frontiers"][method]
        ax.plot([s["kl"] for s in front], [s["score"] for s in front], color=color, lw=1.5)
        # Every setting of a method costs the same samples: its settings faint, its best bold.
        bx.scatter([s["samples"] for s in mine], [s["score"] for s in mine], marker=marker,
                   color=color, alpha=0.3, s=18, linewidths=0)  # fmt: skip
        best = max(mine, key=lambda s: s["score"])
        bx.errorbar([best["samples"]], [best["score"]], yerr=[best["score_ci"]], fmt=marker,
                    color=color, capsize=2, ms=6, label=f"{method} (best setting)")  # fmt: skip
    ref = summary["reference"]
    ax.scatter([0.0], [ref["score"]], color="black", marker="x", zorder=3, label="reference")
    bx.axhline(ref["score"], color="black", lw=0.8, ls=":", label="reference")
    for axis in (ax, bx):
        axis.grid(alpha=0.3)
        axis.set_ylabel("oracle score of samples")
        axis.legend(fontsize=8)
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_title("Reward vs KL: seeds (faint), mean ± 95% CI, Pareto frontier (line)", fontsize=9)
    bx.set_xscale("log")
    bx.set_xlabel("training samples (completions drawn or read)")
    bx.set_title("Score vs training samples (settings faint; best setting ± 95% CI)", fontsize=9)
    fig.suptitle(f"Built-in sorting task, {summary['eval_prompts']} held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(cli.parse(Config))
