"""Iterative (online) Direct Preference Optimization: the loop of the seed's Figure 2.

Each round samples ``--samples-per-prompt`` completions per training prompt from the current
policy, lets the judge label the best and the worst one as a pair (the built-in task's
programmatic oracle, or a reward model folder given with --judge), and trains DPO on those
pairs, with the policy at the start of the round as the reference (--reference-policy initial
keeps the base model). After each round the policy's samples on held-out prompts are compared
with the base model's (the oracle's win-rate). With no flags: the built-in "sort the letters"
task and its tiny base model. --data takes a prompt file of your own (rows with a prompt field;
JSONL, JSON, parquet or a datasets folder) with --judge DIR, which then also rates the win-rate. The same --out resumes: finished rounds are loaded from their
saved policy, an unfinished round continues from its last checkpoint.

Run: `python experiments/iterative_dpo.py [--rounds N] [--model DIR] [--judge DIR] [--out DIR]`.
Writes DIR/rounds.jsonl, DIR/summary.json, DIR/win_rate.png, and per round DIR/round_R/
(metrics.jsonl, pairs.jsonl, policy/).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from rljax import checks, cli, data, experiment, runs
from rljax.models import hf
from rljax.models.generate import SamplingConfig, make_generate_fn
from rljax.tasks import sorting
from rljax.updates import lm


@dataclasses.dataclass(frozen=True)
class Config(experiment.DPORunConfig):
    """Iterative DPO (Xu et al., 2023, "Some things are more CRINGE than others"; Guo et al.,
    2024, online AI feedback).

    Attributes:
      rounds: sample-label-train rounds.
      prompts_per_round: training prompts sampled per round.
      samples_per_prompt: completions sampled per prompt (the best and worst form a pair).
      judge: a reward-model folder (a one-label *ForSequenceClassification checkpoint) that
        scores completions; none = the built-in task's oracle.
      reference_policy: previous (the policy at the start of each round) or initial.
      steps: DPO steps per round.
      out: output folder.
    """

    rounds: int = 3
    prompts_per_round: int = 1024
    samples_per_prompt: int = 4
    judge: str | None = None
    reference_policy: str = "previous"
    steps: int = 100
    out: str = "runs/iterative_dpo"

    def __post_init__(self):
        super().__post_init__()
        checks.check(
            self, {"rounds": ">= 1", "prompts_per_round": ">= 1", "samples_per_prompt": ">= 2"}
        )
        if self.data is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"--max-prompt-length {self.max_prompt_length} must be below --max-length "
                f"{self.max_length}: completions of a prompt file are sampled up to "
                "max_length - max_prompt_length tokens"
            )


def sample_completions(model, tokenizer, prompts, config, key, batch_size: int = 256) -> list[str]:
    """One temperature-1 completion per prompt (decoded without special tokens): the built-in
    task's sampler, or for a prompt file (``--data``) prompts left-padded to
    ``max_prompt_length`` and ``max_length - max_prompt_length`` new tokens."""
    if experiment.builtin(config):
        return sorting.evaluate_policy(model, tokenizer, prompts, key=key)["completions"]
    sampling = SamplingConfig(
        max_new_tokens=config.max_length - config.max_prompt_length,
        temperature=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    graphdef, params = nnx.split(model)
    generate_fn = make_generate_fn(graphdef, sampling)
    tokens, mask = data.tokenize_prompts(
        prompts, tokenizer, config.max_prompt_length, pad_to=config.max_prompt_length
    )
    out = []
    batch_size = min(batch_size, len(prompts))
    for start in range(0, len(prompts), batch_size):
        index = np.minimum(np.arange(start, start + batch_size), len(prompts) - 1)
        result = generate_fn(params, tokens[index], mask[index], jax.random.fold_in(key, start))
        ids, keep = jax.device_get((result.completions, result.completion_mask))
        for row in range(min(batch_size, len(prompts) - start)):
            out.append(tokenizer.decode(ids[row][keep[row]].tolist(), skip_special_tokens=True))
    return out


def sample_pairs(model, tokenizer, prompts, config, round_index, judge):
    """Sample ``samples_per_prompt`` completions per prompt and pair the best with the worst.
    Empty completions (EOS at once) cannot form a pair and are left out; prompts whose
    remaining samples all score the same give no pair. Both are counted."""
    completions, scores = [], []
    for k in range(config.samples_per_prompt):
        key = jax.random.fold_in(jax.random.key(config.seed), 1000 * round_index + k)
        texts = sample_completions(model, tokenizer, prompts, config, key)
        completions.append(texts)
        scores.append(
            sorting.score_batch(prompts, texts) if judge is None else judge(prompts, texts)
        )
    completions = np.array(completions, dtype=object)  # [k, P]
    scores = np.asarray(scores, np.float64)
    empty = np.vectorize(lambda c: not c.strip())(completions)
    ranked = np.where(empty, np.nan, scores)
    rows = []
    for p, prompt in enumerate(prompts):
        if np.sum(~empty[:, p]) < 2:
            continue
        best, worst = int(np.nanargmax(ranked[:, p])), int(np.nanargmin(ranked[:, p]))
        if ranked[best, p] > ranked[worst, p] and completions[best, p] != completions[worst, p]:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": completions[best, p],
                    "rejected": completions[worst, p],
                }
            )
    return rows, {
        "pairs": len(rows),
        "prompts_without_pair": len(prompts) - len(rows),
        "empty_samples": int(empty.sum()),
        "mean_score": float(np.nanmean(scores)) if np.isfinite(scores).any() else None,
    }


def round_prompts(config: Config) -> tuple[list, list]:
    """Training prompts (``rounds * prompts_per_round``) and held-out prompts: the built-in
    task's generated ones, or those of ``--data`` (rows with a ``prompt`` field; held out:
    ``--eval-data`` or the last 10%), cycled through in a seeded order when the rounds need more
    prompts than the file has."""
    n = config.rounds * config.prompts_per_round
    if experiment.builtin(config):
        train = sorting.prompts(n, config.seed)
        held_out = sorted(
            set(sorting.prompts(config.win_rate_prompts, config.seed + 7)) - set(train)
        )
        return train, held_out

    def prompts_of(path):
        rows = data.load_rows(path)
        missing = [i for i, row in enumerate(rows) if not row.get("prompt")]
        if missing:
            raise ValueError(f"{path}: rows {missing[:5]} have no (or an empty) 'prompt' field")
        return [row["prompt"] for row in rows]

    prompts = prompts_of(config.data)
    if config.eval_data is not None:
        held_out = prompts_of(config.eval_data)
    else:
        n_eval = max(1, len(prompts) // 10)
        prompts, held_out = prompts[:-n_eval], prompts[-n_eval:]
    if not prompts:
        raise ValueError(f"--data {config.data!r}: no training prompts left")
    rng = np.random.default_rng(config.seed)
    cycled = []
    while len(cycled) < n:
        cycled += [prompts[i] for i in rng.permutation(len(prompts))]
    return cycled[:n], held_out[: config.win_rate_prompts]


def win_rate(policy, base, tokenizer, prompts, config: Config, judge) -> dict:
    """Win-rate (ties half) of one sampled policy completion over one sampled base-model
    completion per held-out prompt (the same key), and both mean scores: by the oracle on the
    built-in task, by the judge on a prompt file."""
    if experiment.builtin(config):  # the oracle measures true improvement
        oracle = experiment.oracle_win_rate(policy, base, tokenizer, prompts, config.seed + 1)
        return {
            "win_rate_vs_base": oracle["win_rate"],
            "policy_score": oracle["policy"]["mean_score"],
            "policy_validity": oracle["policy"]["validity"],
            "base_score": oracle["reference"]["mean_score"],
        }
    key = jax.random.key(config.seed + 1)
    mine = sample_completions(policy, tokenizer, prompts, config, key)
    theirs = sample_completions(base, tokenizer, prompts, config, key)
    score = judge if judge is not None else sorting.score_batch
    p, b = np.asarray(score(prompts, mine), float), np.asarray(score(prompts, theirs), float)
    p, b = np.nan_to_num(p, nan=-np.inf), np.nan_to_num(b, nan=-np.inf)  # empty loses
    return {
        "win_rate_vs_base": float(np.mean((p > b) + 0.5 * (p == b))),
        "policy_score": float(np.mean(p[np.isfinite(p)])) if np.isfinite(p).any() else None,
        "base_score": float(np.mean(b[np.isfinite(b)])) if np.isfinite(b).any() else None,
    }


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def reward_model_judge(folder, max_length):
    """Scores of a reward model (a one-label *ForSequenceClassification folder) for
    ``(prompt, completion)`` lists; empty completions get NaN (they are never paired)."""
    model = hf.load_model(folder, head="reward")
    tokenizer = hf.load_tokenizer(folder)
    score = jax.jit(lambda t, m: model.rewards(t, m))

    def judge(prompts, completions):
        keep = [i for i, c in enumerate(completions) if c.strip()]
        out = np.full(len(completions), np.nan)
        if keep:
            rows = [{"prompt": prompts[i], "completion": completions[i]} for i in keep]
            arrays, _ = data.tokenize_completions(
                rows, tokenizer, max_length=max_length, pad_to=max_length
            )
            out[keep] = np.asarray(score(arrays["tokens"], arrays["mask"]))
        return out

    return judge


def train_round(r, round_dir, config, graphdef, params, initial, tokenizer, mesh):
    """DPO on the round's pairs (``round_dir/pairs.jsonl``); returns the new parameters and the
    held-out pair metrics of the last step."""
    round_config = dataclasses.replace(
        config, data=str(round_dir / "pairs.jsonl"), out=str(round_dir)
    )
    train, held_pairs, _ = experiment.load_preference_arrays(round_config, tokenizer)
    reference = params if config.reference_policy == "previous" else initial
    state, step_fn, place, evaluate = experiment.dpo_run(
        graphdef,
        jax.tree.map(np.copy, params),
        train,
        held_pairs,
        round_config,
        mesh,
        reference,
    )
    state, log, _ = experiment.train_loop(
        label=f"iterative DPO round {r}",
        config=round_config,
        state=state,
        step_fn=step_fn,
        train_arrays=train,
        place=place,
        evaluate=evaluate,
        progress_keys=("loss", "rewards/accuracies", "eval/rewards/accuracies"),
    )
    return jax.device_get(state.params), experiment.final_eval(log.rows())


def saved_rounds(out: pathlib.Path) -> int | None:
    """The last round with saved progress (finished, or an unfinished one's checkpoint)."""
    rounds = [
        int(folder.name.removeprefix("round_"))
        for folder in out.glob("round_*")
        if (folder / "done.json").exists()
        or runs.latest_saved_step(folder / "checkpoints") is not None
    ]
    return max(rounds, default=None)


# One run per --out; a resume (of finished or checkpointed rounds) must keep the settings.
@experiment.in_run_folder(length_field=None, progress=saved_rounds)
def main(config: Config) -> dict:
    if config.reference_policy not in ("previous", "initial"):
        raise ValueError(
            f"--reference-policy must be previous or initial, got {config.reference_policy!r}"
        )
    if not experiment.builtin(config) and config.judge is None:
        raise ValueError(
            "--data (a prompt set of your own) needs --judge DIR (a reward-model folder): the "
            "oracle only knows the built-in task"
        )
    checks.require_folder("--judge", config.judge, "reward-model folder")
    start = time.perf_counter()
    out = pathlib.Path(config.out)
    model_path = experiment.resolve_model(config)
    tokenizer = hf.load_tokenizer(model_path)
    graphdef, initial = nnx.split(hf.load_model(model_path))
    initial = jax.device_get(initial)
    judge = None if config.judge is None else reward_model_judge(config.judge, config.max_length)
    mesh = experiment.build_mesh(config.mesh)
    train_prompts, held_out = round_prompts(config)
    params, history = initial, []
    for r in range(1, config.rounds + 1):
        round_dir = out / f"round_{r}"
        done = round_dir / "done.json"
        if done.exists():  # finished before an interruption: load its policy
            history.append(json.loads(done.read_text()))
            params = jax.device_get(nnx.split(hf.load_model(str(round_dir / "policy")))[1])
            print(f"[iterative DPO] round {r}: loaded from {round_dir}")
            continue
        policy = lm.merge(graphdef, params)
        prompts = train_prompts[(r - 1) * config.prompts_per_round : r * config.prompts_per_round]
        rows, sampling = sample_pairs(policy, tokenizer, prompts, config, r, judge)
        round_dir.mkdir(parents=True, exist_ok=True)
        (round_dir / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(
            f"[iterative DPO] round {r}: {sampling['pairs']} pairs, {sampling['prompts_without_pair']} prompts without a pair ({sampling['empty_samples']} empty samples), mean sampled score {_fmt(sampling['mean_score'])}"
        )
        if sampling["pairs"] < max(2, config.batch_size):
            print(f"[iterative DPO] round {r}: too few pairs to train on; the policy is unchanged")
            round_eval = {}
        else:
            params, round_eval = train_round(
                r, round_dir, config, graphdef, params, initial, tokenizer, mesh
            )
        policy = lm.merge(graphdef, params)
        hf.save_model(policy, round_dir / "policy", tokenizer=tokenizer)
        verdict = win_rate(policy, lm.merge(graphdef, initial), tokenizer, held_out, config, judge)
        record = {"round": r, **sampling, **verdict, "eval": round_eval}
        done.write_text(json.dumps(runs.to_json(record)))
        history.append(record)
        print(
            f"[iterative DPO] round {r}: win-rate over the base model {record['win_rate_vs_base']:.3f}, mean score {_fmt(record['policy_score'])} (base {_fmt(record['base_score'])})"
        )
    (out / "rounds.jsonl").write_text("".join(json.dumps(runs.to_json(h)) + "\n" for h in history))
    hf.save_model(lm.merge(graphdef, params), out / "policy", tokenizer=tokenizer)
    runs.plot_metrics(
        history,
        ["win_rate_vs_base", "policy_score"],
        out / "win_rate.png",
        title="Iterative DPO",
        x="round",
    )
    summary = {
        "model": model_path,
        "rounds": history,
        "final_win_rate": history[-1]["win_rate_vs_base"],
        "wall_seconds": round(time.perf_counter() - start, 2),
        "config": dataclasses.asdict(config),
        **runs.config_record(out),  # the original settings, after --allow-config-change
    }
    runs.write_summary(out, summary)
    print(
        f"[iterative DPO] win-rate by round: {[round(h['win_rate_vs_base'], 3) for h in history]}; wrote {out}"
    )
    return summary


if __name__ == "__main__":
    main(cli.parse(Config))
