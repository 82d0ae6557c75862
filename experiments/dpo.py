"""Direct Preference Optimization of a language model on preference pairs.

With no flags: the built-in "sort the letters" task (rljax.tasks.sorting). Its tiny base model,
warmed up on random permutations (a valid but unsorted reference policy), is trained with DPO on
generated pairs labelled by the programmatic oracle; the held-out evaluation reports TRL's
reward metrics and the oracle's win-rate of the policy's samples over the reference's. Flags
take a Hugging Face checkpoint folder (--model), a data file (--data) and a mesh (--mesh
data=2,fsdp=2,tensor=2). Running again with the same --out resumes from the last checkpoint.
Several processes (`python -m rljax.launch --processes 2 -- python experiments/dpo.py --mesh
...`, or one process per host of a cluster) train one model over all their devices; process 0
writes the outputs.

Run: `python experiments/dpo.py [--model DIR] [--data FILE] [--mesh SPEC] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png and DIR/policy (HF checkpoint).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
from flax import nnx

from rljax import cli, data, experiment, runs, sharding
from rljax.models import hf
from rljax.updates import lm


@dataclasses.dataclass(frozen=True)
class Config(experiment.DPORunConfig):
    """Direct Preference Optimization of a language model on preference pairs.

    Attributes:
      out: output folder (checkpoints, metrics.jsonl, summary.json, training.png, policy/).
    """

    out: str = "runs/dpo"


@experiment.in_run_folder  # one run per --out; a resume must keep the stored settings
def main(config: Config) -> dict:
    sharding.initialize_from_env()  # a multi-process run (rljax.launch); no-op otherwise
    start = time.perf_counter()
    model_path = experiment.resolve_model(config)
    tokenizer = hf.load_tokenizer(model_path)
    policy = hf.load_model(model_path)
    graphdef, params = nnx.split(policy)
    reference_host = jax.device_get(params)  # kept apart from the donated train state
    train, held_out, data_report = experiment.load_preference_arrays(config, tokenizer)

    mesh = experiment.build_mesh(config.mesh)
    state, step_fn, place, evaluate = experiment.dpo_run(
        graphdef, params, train, held_out, config, mesh
    )
    state, log, info = experiment.train_loop(
        label="DPO",
        config=config,
        state=state,
        step_fn=step_fn,
        train_arrays=train,
        place=place,
        evaluate=evaluate,
        progress_keys=("loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies"),
    )
    policy_model, summary = experiment.finish_run(
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
        folder="policy",
    )
    rows, final, out = log.rows(), summary["eval"], pathlib.Path(config.out)
    if not sharding.is_primary():
        return summary  # process 0 samples, writes the summary and plots
    if experiment.builtin(config):
        held_out_rows = data.load_rows(str(out / "data" / "test.jsonl"))
        prompts = sorted({row["prompt"] for row in held_out_rows})[: config.win_rate_prompts]
        summary["oracle"] = experiment.oracle_win_rate(
            policy_model, lm.merge(graphdef, reference_host), tokenizer, prompts, config.seed + 1
        )
        print(
            f"[DPO] oracle win-rate of the policy over the reference: "
            f"{summary['oracle']['win_rate']:.3f} ({summary['oracle']['prompts']} held-out prompts;"
            f" mean score {summary['oracle']['policy']['mean_score']:.3f} vs "
            f"{summary['oracle']['reference']['mean_score']:.3f})"
        )
    runs.write_summary(out, summary)
    runs.plot_metrics(
        rows,
        ["loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies"],
        out / "training.png",
        title=f"DPO ({config.loss_type}, beta {config.beta})",
    )
    print(
        f"[DPO] held-out reward accuracy {final.get('rewards/accuracies', float('nan')):.3f}, "
        f"margin {final.get('rewards/margins', float('nan')):.3f}; wrote {out}/metrics.jsonl, "
        f"summary.json, training.png, policy/ ({summary['wall_seconds']:.0f}s)"
    )
    return summary


if __name__ == "__main__":
    main(cli.parse(Config))
