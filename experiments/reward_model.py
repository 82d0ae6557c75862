"""Train a Bradley-Terry reward model on preference pairs (the first stage of classic RLHF).

With no flags: the built-in "sort the letters" task. The reward model is the tiny base model's
backbone with a fresh scalar head read at the last token (rljax.models.transformer.with_head),
trained on generated pairs labelled by the programmatic oracle; the held-out evaluation reports
the pairwise accuracy and margin, and, for the built-in task, the rank correlation between the
reward model's scores and the oracle's on held-out completions. --model takes a Hugging Face
causal-LM folder (or a one-label *ForSequenceClassification reward model to fine-tune), --data a
preference file, --mesh a device mesh; the same --out resumes from the last checkpoint. Runs
over several processes like experiments/dpo.py (python -m rljax.launch; process 0 writes).

Run: `python experiments/reward_model.py [--model DIR] [--data FILE] [--mesh SPEC] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png and DIR/reward_model (an HF
*ForSequenceClassification checkpoint that rljax.models.hf.load_model(..., head="reward") and
transformers' AutoModelForSequenceClassification load).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from rljax import cli, data, experiment, runs, sharding, updates
from rljax.models import hf
from rljax.models.transformer import with_head
from rljax.tasks import sorting
from rljax.updates import lm


@dataclasses.dataclass(frozen=True)
class Config(experiment.PreferenceRunConfig):
    """Bradley-Terry reward model (Ouyang et al., 2022; TRL's RewardTrainer).

    Attributes:
      center_rewards_coefficient: weight of the mean-squared-reward penalty (Eisenstein et al.,
        2023); none = off.
    """

    center_rewards_coefficient: float | None = None
    out: str = "runs/reward_model"

    def __post_init__(self):
        super().__post_init__()
        self.reward_config()  # RewardConfig checks center_rewards_coefficient

    def reward_config(self) -> updates.RewardConfig:
        return updates.RewardConfig(center_rewards_coefficient=self.center_rewards_coefficient)


def load_reward_model(path: str, seed: int):
    """A one-label *ForSequenceClassification folder as is; a causal LM with a fresh head."""
    model_type = json.loads((pathlib.Path(path) / "config.json").read_text()).get(
        "architectures", [""]
    )[0]
    if model_type.endswith("ForSequenceClassification"):
        return hf.load_model(path, head="reward")
    return with_head(hf.load_model(path), "reward", rngs=nnx.Rngs(seed))


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation (ties broken by order), in numpy."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def oracle_agreement(model, tokenizer, rows, max_length) -> dict:
    """Scores of the reward model and the oracle on every held-out completion (chosen and
    rejected), and their rank correlation."""
    texts = [
        {"prompt": r["prompt"], "completion": r[k]} for r in rows for k in ("chosen", "rejected")
    ]
    arrays, _ = data.tokenize_completions(
        texts, tokenizer, max_length=max_length, pad_to=max_length
    )
    rewards = jax.jit(lambda t, m: model.rewards(t, m))(arrays["tokens"], arrays["mask"])
    oracle = [sorting.score(t["prompt"], t["completion"]) for t in texts]
    return {
        "spearman": rank_correlation(np.asarray(rewards), np.asarray(oracle)),
        "completions": len(texts),
    }


@experiment.in_run_folder  # one run per --out; a resume must keep the stored settings
def main(config: Config) -> dict:
    sharding.initialize_from_env()  # a multi-process run (rljax.launch); no-op otherwise
    start = time.perf_counter()
    model_path = experiment.resolve_model(config)
    tokenizer = hf.load_tokenizer(model_path)
    graphdef, params = nnx.split(load_reward_model(model_path, config.seed))
    train, held_out, data_report = experiment.load_preference_arrays(config, tokenizer)
    experiment.apply_layout(config, train, held_out)  # --share-prompt
    reward_config = config.reward_config()
    optimizer = experiment.adamw(config)
    mesh = experiment.build_mesh(config.mesh)
    example = {k: v[: config.batch_size] for k, v in train.items()}
    state, step_fn, batch_shardings = lm.compile_update(
        updates.make_reward_update(graphdef, optimizer, reward_config),
        updates.init_reward_state(params, optimizer),
        example,
        mesh,
    )
    place = experiment.placer(mesh, batch_shardings)
    eval_fn = jax.jit(updates.make_reward_eval(graphdef, reward_config))
    evaluate = lambda s: experiment.mean_metrics(eval_fn, s, held_out, place, config.batch_size)
    state, log, info = experiment.train_loop(
        label="reward model",
        config=config,
        state=state,
        step_fn=step_fn,
        train_arrays=train,
        place=place,
        evaluate=evaluate,
        progress_keys=("loss", "accuracy", "margin", "eval/accuracy"),
    )
    model, summary = experiment.finish_run(
        config,
        graphdef=graphdef,
        params=state.params,
        tokenizer=tokenizer,
        log=log,
        info=info,
        mesh=mesh,
        model_path=model_path,
        data_report=data_report,
        wall_seconds=time.perf_counter() - start,
        folder="reward_model",
    )
    rows, final, out = log.rows(), summary["eval"], pathlib.Path(config.out)
    if not sharding.is_primary():
        return summary  # process 0 scores the oracle agreement, writes the summary and plots
    if experiment.builtin(config):
        test_rows = data.load_rows(str(out / "data" / "test.jsonl"))
        summary["oracle"] = oracle_agreement(model, tokenizer, test_rows, config.max_length)
        print(
            f"[reward model] rank correlation with the oracle: {summary['oracle']['spearman']:.3f}"
        )
    runs.write_summary(out, summary)
    runs.plot_metrics(
        rows,
        ["loss", "accuracy", "margin", "eval/accuracy"],
        out / "training.png",
        title="Reward model",
    )
    print(
        f"[reward model] held-out accuracy {final.get('accuracy', float('nan')):.3f}, margin "
        f"{final.get('margin', float('nan')):.3f}; wrote {out} ({summary['wall_seconds']:.0f}s)"
    )
    return summary


if __name__ == "__main__":
    main(cli.parse(Config))
