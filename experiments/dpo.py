"""Direct Preference Optimization of a language model on preference pairs.

With no flags: the built-in "sort the letters" task (rljax.tasks.sorting). Its tiny base model,
warmed up on random permutations (a valid but unsorted reference policy), is trained with DPO on
generated pairs labelled by the programmatic oracle; the held-out evaluation reports TRL's
reward metrics and the oracle's win-rate of the policy's samples over the reference's. Flags
take a Hugging Face checkpoint folder (--model), a data file (--data) and a mesh (--mesh
data=2,fsdp=2,tensor=2). Running again with the same --out resumes from the last checkpoint.

Run: `python experiments/dpo.py [--model DIR] [--data FILE] [--mesh SPEC] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png and DIR/policy (HF checkpoint).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rljax import cli, data, dpo, experiment, lm, runs
from rljax.models import hf
from rljax.tasks import sorting


@dataclasses.dataclass(frozen=True)
class Config(experiment.PreferenceRunConfig):
    """Direct Preference Optimization (Rafailov et al., 2023).

    Attributes:
      beta: DPO's beta (strength of the KL regularisation to the reference).
      loss_type: a TRL loss type, or several separated by commas (sigmoid,ipo,...).
      loss_weights: comma-separated weights, one per loss type (empty = 1 each).
      rpo_alpha: weight of the chosen NLL term (RPO, Pang et al., 2024); none = off. The default
        0.5 keeps the chosen completions likely: with plain DPO on the built-in task both
        log-probs fall and the policy's samples stop being valid permutations (oracle win-rate
        0.17 against 0.70 with 0.5, 300 steps; benchmarks/RESULTS.md).
      reference: precomputed (reference log-probs computed once over the data), model (a frozen
        reference forward pass per batch) or none (reference-free).
      chunk_size: token rows per chunk of the log-prob computation.
      win_rate_prompts: held-out prompts sampled for the oracle win-rate (built-in task).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    loss_weights: str = ""
    rpo_alpha: float | None = 0.5
    reference: str = "precomputed"
    chunk_size: int = 1024
    win_rate_prompts: int = 512
    out: str = "runs/dpo"


def win_rate(policy_model, reference_model, tokenizer, held_out_rows, config) -> dict:
    """Oracle win-rate (ties count half) of sampled policy completions over sampled reference
    completions on the same held-out prompts, temperature 1."""
    prompts = sorted({row["prompt"] for row in held_out_rows})[: config.win_rate_prompts]
    key = jax.random.key(config.seed + 1)
    policy = sorting.evaluate_policy(policy_model, tokenizer, prompts, key=key)
    reference = sorting.evaluate_policy(reference_model, tokenizer, prompts, key=key)
    p, r = np.asarray(policy["scores"]), np.asarray(reference["scores"])
    return {
        "win_rate": float(np.mean((p > r) + 0.5 * (p == r))),
        "prompts": len(prompts),
        "policy": policy["metrics"],
        "reference": reference["metrics"],
        "examples": [
            {"prompt": q, "policy": a, "reference": b}
            for q, a, b in zip(
                prompts[:5], policy["completions"], reference["completions"], strict=False
            )
        ],
    }


def main(config: Config) -> dict:
    start = time.perf_counter()
    model_path = experiment.resolve_model(config)
    tokenizer = hf.load_tokenizer(model_path)
    policy = hf.load_model(model_path)
    graphdef, params = nnx.split(policy)
    reference_host = jax.device_get(params)  # kept apart from the donated train state
    train, held_out, data_report = experiment.load_preference_arrays(config, tokenizer)

    types = tuple(t.strip() for t in config.loss_type.split(",") if t.strip())
    weights = tuple(float(w) for w in config.loss_weights.split(",") if w.strip()) or None
    dpo_config = dpo.DPOConfig(
        beta=config.beta,
        loss_type=types[0] if len(types) == 1 else types,
        loss_weights=weights,
        rpo_alpha=config.rpo_alpha,
        reference=config.reference,
        chunk_size=config.chunk_size,
    )
    if config.reference == "precomputed":
        for arrays in (train, held_out):
            arrays.update(
                lm.reference_logps(graphdef, params, arrays, chunk_size=config.chunk_size)
            )
    mesh = experiment.build_mesh(config.mesh)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        max(1, config.steps // 10),
        config.steps,
        0.1 * config.learning_rate,
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    ref_params = jax.tree.map(jnp.copy, params) if config.reference == "model" else None
    state = dpo.init_dpo_state(params, optimizer, ref_params)
    example = {k: v[: config.batch_size] for k, v in train.items()}
    state, step_fn, batch_shardings = lm.compile_update(
        dpo.make_dpo_update(graphdef, optimizer, dpo_config), state, example, mesh
    )
    place = lambda batch: jax.device_put(batch, batch_shardings)
    eval_fn = jax.jit(dpo.make_dpo_eval(graphdef, dpo_config))
    evaluate = lambda s: experiment.mean_metrics(eval_fn, s, held_out, place, config.batch_size)

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
    rows = log.rows()
    final = {k[len("eval/") :]: v for k, v in rows[-1].items() if k.startswith("eval/")}
    out = pathlib.Path(config.out)
    policy_model = lm.merge(graphdef, jax.device_get(state.params))
    hf.save_model(policy_model, out / "policy", tokenizer=tokenizer)
    summary = {
        "model": model_path,
        "steps": config.steps,
        "eval": final,
        "data": data_report,
        "resumed_from": info["resumed_from"],
        "wall_seconds": round(time.perf_counter() - start, 2),
        "devices": int(mesh.size),
        "config": dataclasses.asdict(config),
    }
    if experiment.builtin(config):
        held_out_rows = data.load_rows(str(out / "data" / "test.jsonl"))
        summary["oracle"] = win_rate(
            policy_model, lm.merge(graphdef, reference_host), tokenizer, held_out_rows, config
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
        title=f"DPO ({dpo_config.loss_type}, beta {config.beta})",
    )
    print(
        f"[DPO] held-out reward accuracy {final.get('rewards/accuracies', float('nan')):.3f}, "
        f"margin {final.get('rewards/margins', float('nan')):.3f}; wrote {out}/metrics.jsonl, "
        f"summary.json, training.png, policy/ ({summary['wall_seconds']:.0f}s)"
    )
    return summary


if __name__ == "__main__":
    main(cli.parse(Config))
