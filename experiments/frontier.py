"""The reward-vs-KL frontier of DPO, PPO and TRPO on the built-in task (the controlled-generation
comparison of Rafailov et al., 2023, Fig. 2, left).

Every arm starts from the same tiny base model, which is also the reference: DPO for several
betas (on the oracle-labelled pairs of experiments/dpo.py), PPO and TRPO with a value critic for
several KL-penalty coefficients (experiments/ppo_rlhf.py, trpo_rlhf.py). Each final policy is
then evaluated the same way, with the same held-out prompts and key: one temperature-1 sample
per prompt, the oracle's mean score (the "reward") and the mean sequence KL(policy ||
reference) estimated on those samples. An arm that finished (its folder has summary.json) is not
trained again, so an interrupted frontier resumes arm by arm.

Run: `python experiments/frontier.py [--dpo-betas 0.05,0.2,1] [--ppo-kl-coefs 0.01,0.05,0.2]
[--trpo-kl-coefs 0.02,0.2] [--out DIR]`. Writes DIR/frontier.json, DIR/frontier.png and one
folder per arm.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
from flax import nnx

from rljax import cli, experiment, rl, runs
from rljax.models import hf
from rljax.tasks import sorting


@dataclasses.dataclass(frozen=True)
class Config:
    """Reward-vs-KL frontier of DPO, PPO and TRPO on the built-in task.

    Attributes:
      model: the base model (policy start and reference), a Hugging Face folder; none = the
        built-in task's tiny base model.
      out: output folder (one sub-folder per arm, frontier.json, frontier.png).
      seed: seed of every arm and of the evaluation.
      dpo_betas: comma-separated DPO betas (empty = no DPO arm).
      dpo_steps: DPO optimizer steps per arm.
      dpo_pairs: generated training pairs of the DPO arms.
      dpo_rpo_alpha: RPO NLL weight of the DPO arms (experiments/dpo.py's default; none = plain
        DPO, which loses sample validity on this task).
      ppo_kl_coefs: comma-separated KL-penalty coefficients of the PPO arms (empty = none).
      trpo_kl_coefs: comma-separated KL-penalty coefficients of the TRPO arms (empty = none).
      iterations: RLHF iterations per PPO/TRPO arm.
      eval_prompts: held-out prompts sampled per policy for the frontier point.
      log: metrics sinks of every arm, comma-separated: jsonl (each arm's metrics.jsonl,
        always written), tensorboard, wandb (see rljax.runs).
    """

    model: str | None = None
    out: str = "runs/frontier"
    seed: int = 0
    dpo_betas: str = "0.05,0.2,1.0"
    dpo_steps: int = 200
    dpo_pairs: int = 4096
    dpo_rpo_alpha: float | None = 0.5
    ppo_kl_coefs: str = "0.01,0.05,0.2"
    trpo_kl_coefs: str = "0.02,0.2"
    iterations: int = 60
    eval_prompts: int = 512
    log: str = "jsonl"

    def __post_init__(self):
        runs.parse_sinks(self.log)  # an unknown sink fails here, before any arm


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{flag}: expected comma-separated numbers, got {text!r}") from None


def arms(config: Config) -> list[dict]:
    """The arms: ``{"method", "coef", "folder"}`` each."""
    out = pathlib.Path(config.out)
    found = []
    for method, flag, values in (
        ("DPO", "dpo-betas", config.dpo_betas),
        ("PPO", "ppo-kl-coefs", config.ppo_kl_coefs),
        ("TRPO", "trpo-kl-coefs", config.trpo_kl_coefs),
    ):
        for coef in _floats(values, flag):
            if not coef > 0:
                raise ValueError(f"--{flag}: every value must be > 0, got {coef}")
            found.append(
                {"method": method, "coef": coef, "folder": str(out / f"{method.lower()}_{coef:g}")}
            )
    if not found:
        raise ValueError(
            "no arms: give at least one of --dpo-betas, --ppo-kl-coefs, --trpo-kl-coefs"
        )
    return found


def train_arm(arm: dict, config: Config, model_path: str) -> None:
    folder = arm["folder"]
    if (pathlib.Path(folder) / "summary.json").exists():
        print(f"[frontier] {arm['method']} {arm['coef']:g}: finished before, not trained again")
        return
    if arm["method"] == "DPO":
        experiment.train_dpo(
            experiment.DPORunConfig(
                model=model_path,
                out=folder,
                seed=config.seed,
                beta=arm["coef"],
                steps=config.dpo_steps,
                train_pairs=config.dpo_pairs,
                eval_pairs=max(32, config.dpo_pairs // 8),
                rpo_alpha=config.dpo_rpo_alpha,
                win_rate_prompts=64,
                log=config.log,
            )
        )
    else:
        rl_config = rl.config(
            arm["method"].lower(),  # the registry's ppo or trpo
            model=model_path,
            out=folder,
            seed=config.seed,
            iterations=config.iterations,
            kl_coef=arm["coef"],
            eval_every=0,
            eval_prompts=64,
            log=config.log,
        )
        rl.train(rl_config, label=f"{arm['method']}-RLHF")


def main(config: Config) -> dict:
    start = time.perf_counter()
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = arms(config)
    model_path = experiment.resolve_model(config)
    tokenizer = hf.load_tokenizer(model_path)
    ref_graphdef, ref_params = nnx.split(hf.load_model(model_path))
    prompts = sorting.prompts(config.eval_prompts, config.seed + 11)
    scorer = rl.rlhf.Scorer(tokenizer)
    key = jax.random.key(config.seed + 12)

    sampling = rl.rollout.sampling_config(tokenizer, sorting.max_completion_tokens(), 1.0)

    def point(graphdef, params):
        rollout_fn = rl.rollout.make_rollout_fn(graphdef, sampling, ref_graphdef=ref_graphdef)
        return rl.rlhf.evaluate_policy_kl(
            rollout_fn,
            params,
            ref_params,
            tokenizer,
            prompts,
            scorer,
            key=key,
            max_prompt_length=16,
            rows=min(256, len(prompts)),
        )

    points = [{"method": "reference", "coef": None, **point(ref_graphdef, ref_params)}]
    print(f"[frontier] reference: score {points[0]['score']:.3f}")
    for arm in todo:
        train_arm(arm, config, model_path)
        graphdef, params = nnx.split(hf.load_model(str(pathlib.Path(arm["folder"]) / "policy")))
        result = {"method": arm["method"], "coef": arm["coef"], **point(graphdef, params)}
        points.append(result)
        print(
            f"[frontier] {arm['method']} {arm['coef']:g}: score {result['score']:.3f}, "
            f"KL {result['kl']:.3f} nats"
        )
    summary = {
        "points": points,
        "eval_prompts": len(prompts),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "config": dataclasses.asdict(config),
    }
    (out / "frontier.json").write_text(json.dumps(runs.to_json(summary), indent=2))
    plot(points, out / "frontier.png")
    print(f"[frontier] wrote {out}/frontier.json, frontier.png ({summary['wall_seconds']:.0f}s)")
    return summary


def plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"DPO": ("o", "tab:blue"), "PPO": ("s", "tab:orange"), "TRPO": ("^", "tab:green")}
    for method, (marker, color) in styles.items():
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        if not mine:
            continue
        ax.plot([p["kl"] for p in mine], [p["score"] for p in mine], marker=marker, color=color,
                label=f"{method} ({'beta' if method == 'DPO' else 'KL coef'})")  # fmt: skip
        for p in mine:
            ax.annotate(f"{p['coef']:g}", (p["kl"], p["score"]), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ref = next(p for p in points if p["method"] == "reference")
    ax.scatter([ref["kl"]], [ref["score"]], color="black", marker="x", label="reference", zorder=3)
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_ylabel("oracle score of samples")
    ax.set_title("Reward vs KL frontier (built-in sorting task)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(cli.parse(Config))
