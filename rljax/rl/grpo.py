"""RL on language models with verifiable (or any Python) rewards: the GRPO family's loop.

One iteration, one named stage per line of :func:`run`::

    rollout, scores, stats = collect(...)   # sample G completions per prompt, score them with
                                            # the reward functions; DAPO dynamic sampling
                                            # samples more until the batch has informative groups
    batch, shaped = shape(...)              # overlong handling, group advantages, importance
                                            # weights between the sampler and the trainer
    state, metrics = step(state, batch)     # the compiled GRPO-family update (rljax.updates.grpo)
    evaluate / log / checkpoint

Every stage is a function of its inputs (testable on its own); the compiled pieces are the
rollout (:func:`make_rollout_fn`: sampling plus one policy and one reference forward; the
same program evaluates), and the update. Reward functions follow TRL's convention
(:mod:`rljax.rewards`): ``fn(prompts, completions, **columns) -> list[float | None]``, where
``columns`` are the data set's other fields.

Checkpoints hold the train state and the prompt cursor; a run started again with the same
``out`` continues where the last checkpoint left it (the rollout key of iteration ``i`` is
``fold_in(key(seed), i)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax import advantages, data, experiment, rewards, runs, sharding, updates
from rljax.models import generate, hf, lora
from rljax.rl.loop import finish, start_run, train_loop
from rljax.rl.rollout import (
    RolloutRunSettings,
    decode_completions,
    example_batch,
    make_rollout_fn,
    sampling_config,
)
from rljax.tasks import arithmetic
from rljax.updates import lm

__all__ = [
    "GRPORunConfig",
    "Prompts",
    "SampledRun",
    "SampledRunConfig",
    "apply_stop_strings",
    "collect",
    "evaluate",
    "finish_sampled_run",
    "load_prompts",
    "make_rollout_fn",
    "reward_set",
    "run",
    "shape",
    "start_sampled_run",
]

ESTIMATORS = tuple(advantages.OUTCOME_ESTIMATORS)
OVERLONG = ("none", "mask", "soft")
SAMPLES_LOGGED = 8  # greedy held-out completions logged at each evaluation (out/samples.jsonl)


@dataclasses.dataclass(frozen=True)
class SampledRunConfig(RolloutRunSettings):
    """Settings of an RL run that samples groups of completions from the policy and scores them
    with reward functions (the GRPO family, online DPO).

    Attributes:
      model: the policy's Hugging Face checkpoint folder (also the reference); none = the
        built-in arithmetic task's small base model.
      data: a prompt file (JSONL, JSON, parquet or a datasets folder) with a prompt field
        (text or chat messages) and any fields the reward functions read (e.g. answer); none =
        the built-in arithmetic word problems.
      reward: reward function MODULE:FUNCTION[=WEIGHT] (MODULE importable from PYTHONPATH or
        a path to a .py file); none = the built-in task's accuracy (1.0) and format (0.1)
        rewards.
      on_reward_error: raise (stop, naming the function and the row) or mask (leave that
        sample out of the update and count it).
      stop: stop strings (repeat the flag for several): a completion ends after the token
        that completes the first of them in its text (rljax.models.generate.stop_at_strings);
        later tokens are out of the rewards, the loss and the evaluation. EOS still ends
        every completion.
      out: output folder (checkpoints, metrics.jsonl, summary.json, plots, the final policy).
      seed: prompt order, sampling and data split seed.
      iterations: sample + update iterations.
      batch_size: prompts per update (rows = batch_size * group_size).
      group_size: completions sampled per prompt (TRL's num_generations).
      max_sampling_rounds: sampling rounds per iteration when groups are filtered (dynamic
        sampling).
      max_prompt_length: prompt tokens kept (left-padded to this width); none = the built-in
        task's longest prompt, or 256.
      max_new_tokens: completion tokens sampled; none = the built-in task's longest answer,
        or 64.
      temperature: sampling temperature.
      learning_rate: Adam learning rate.
      eval_prompts: held-out prompts evaluated (greedy accuracy, sampled KL).
      eval_every: iterations between evaluations (0 = only before and after).
      log_every: iterations between progress lines.
      checkpoint_every: iterations between checkpoints (the last is always saved).
      compilation_cache: folder of JAX's persistent compilation cache; none = off.
    """

    model: str | None = None
    data: str | None = None
    reward: tuple[str, ...] = ()
    on_reward_error: str = "raise"
    stop: tuple[str, ...] = ()
    out: str = "runs/grpo"
    iterations: int = 30
    batch_size: int = 16
    group_size: int = 8
    max_sampling_rounds: int = 3
    max_prompt_length: int | None = None
    max_new_tokens: int | None = None
    temperature: float = 1.0
    learning_rate: float = 1e-4
    eval_prompts: int = 256
    eval_every: int = 10
    log_every: int = 5
    checkpoint_every: int = 10
    compilation_cache: str | None = runs.DEFAULT_COMPILATION_CACHE

    def __post_init__(self):
        super().__post_init__()
        positive = (
            "iterations",
            "batch_size",
            "max_sampling_rounds",
            "eval_prompts",
            "log_every",
            "checkpoint_every",
        )
        for field in positive:
            if getattr(self, field) < 1:
                _fail(field, f"must be >= 1, got {getattr(self, field)}")
        if self.group_size < 2:
            _fail(
                "group_size",
                f"group advantages need >= 2 samples per prompt, got {self.group_size}",
            )
        if self.eval_every < 0:
            _fail("eval_every", f"must be >= 0, got {self.eval_every}")
        if self.on_reward_error not in ("raise", "mask"):
            _fail("on_reward_error", f"must be raise or mask, got {self.on_reward_error!r}")
        for field in ("max_new_tokens", "max_prompt_length"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                _fail(field, f"must be >= 1 or none, got {getattr(self, field)}")
        if not self.temperature > 0:
            _fail("temperature", f"must be > 0 (RL needs sampling), got {self.temperature}")
        if not self.learning_rate > 0:
            _fail("learning_rate", f"must be > 0, got {self.learning_rate}")
        if any(not s for s in self.stop):
            _fail("stop", "stop strings must be non-empty")
        if self.data is not None and not self.reward:
            _fail("reward", "a data set of your own needs --reward MODULE:FUNCTION")

    @property
    def rows(self) -> int:
        return self.batch_size * self.group_size

    @property
    def prompt_width(self) -> int:
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        return arithmetic.MAX_PROMPT_TOKENS if self.data is None else 256

    @property
    def completion_width(self) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return arithmetic.MAX_COMPLETION_TOKENS if self.data is None else 64


def _fail(field: str, problem: str):
    raise ValueError(f"--{field.replace('_', '-')}: {problem}")


@dataclasses.dataclass(frozen=True)
class GRPORunConfig(SampledRunConfig):
    """GRPO-family RL with reward functions (the loss settings are GRPOConfig's).

    Attributes:
      estimator: group advantages: grpo (group mean/std), grpo_batch_std, dr_grpo (mean
        only), rloo (leave-one-out), reinforce_pp (batch-normalised) or
        reinforce_pp_baseline.
      dynamic_sampling: DAPO: leave out groups whose rewards are all equal and sample more
        prompts until the batch is full (or max_sampling_rounds is reached; the rest of the
        batch is then masked out and counted).
      overlong: completions that hit max_new_tokens without EOS: none (kept), mask (left out
        of the loss, TRL's mask_truncated_completions) or soft (DAPO's soft overlong penalty
        added to the reward).
      overlong_buffer: soft penalty ramp length in tokens (DAPO's L_cache).
      overlong_penalty: soft penalty at max_new_tokens (DAPO's penalty factor).
      tis_cap: truncated importance sampling cap on exp(trainer - sampler log-probs) per token
        (the sampler is the KV-cache decode, the trainer the full forward); none = off (the
        mismatch is logged either way).
      grpo: the update's settings.
    """

    estimator: str = "grpo"
    dynamic_sampling: bool = False
    overlong: str = "none"
    overlong_buffer: int = 4
    overlong_penalty: float = 1.0
    tis_cap: float | None = None
    grpo: updates.GRPOConfig = dataclasses.field(
        default_factory=lambda: updates.GRPOConfig(loss_type="dapo", num_minibatches=2)
    )

    def __post_init__(self):
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            _fail("estimator", f"must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.overlong not in OVERLONG:
            _fail("overlong", f"must be one of {OVERLONG}, got {self.overlong!r}")
        if self.overlong == "soft":
            if self.overlong_buffer < 1:
                _fail("overlong_buffer", f"must be >= 1, got {self.overlong_buffer}")
            if self.overlong_penalty < 0:
                _fail("overlong_penalty", f"must be >= 0, got {self.overlong_penalty}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            _fail("tis_cap", f"must be > 0 or none, got {self.tis_cap}")
        rows = self.batch_size * self.group_size
        if rows % self.grpo.num_minibatches:
            _fail(
                "num_minibatches",
                f"{self.grpo.num_minibatches} must divide the batch's {rows} rows "
                f"(--batch-size {self.batch_size} x --group-size {self.group_size})",
            )


# ---------------------------------------------------------------------------- data and rewards


@dataclasses.dataclass
class Prompts:
    """Prompt rows cycled in a fixed shuffled order: ``texts`` (what the reward functions see
    as ``prompts``), ``columns`` (the other fields, one list per field), ``tokens``/``mask``
    (left-padded ``[N, max_prompt_length]``)."""

    texts: list[Any]
    columns: dict[str, list]
    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: np.ndarray) -> tuple[list[Any], dict[str, list], np.ndarray, np.ndarray]:
        idx = [int(i) for i in index]
        columns = {k: [v[i] for i in idx] for k, v in self.columns.items()}
        return [self.texts[i] for i in idx], columns, self.tokens[index], self.mask[index]


def _prompts(
    rows: Sequence[dict],
    tokenizer,
    max_prompt_length: int,
    where: str,
    numbering: data.RowNumbers | None = None,
) -> Prompts:
    """``numbering``: where each row lies in the user's file (errors name that row)."""
    if not rows:
        raise ValueError(f"{where}: no rows")
    numbering = data.RowNumbers.of(len(rows)) if numbering is None else numbering
    in_file = dataclasses.replace(numbering, source=None)  # `where` names the file
    name = lambda i: f"{where} {in_file.label(i)}"
    fields = set(rows[0])
    for i, row in enumerate(rows):
        if "prompt" not in row:
            raise ValueError(f"{name(i)}: field 'prompt' is missing")
        if set(row) != fields:
            raise ValueError(
                f"{name(i)}: fields {sorted(row)} differ from those of {name(0)}, "
                f"{sorted(fields)} (reward functions get one list per field)"
            )
    tokens, mask = data.tokenize_prompts(
        [r["prompt"] for r in rows], tokenizer, max_prompt_length, pad_to=max_prompt_length
    )
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        numbers = [numbering.numbers[i] for i in empty[:5]]
        raise ValueError(f"{where} {numbering.labels(numbers, empty.size)}: prompt has no tokens")
    columns = {k: [r[k] for r in rows] for k in sorted(fields - {"prompt"})}
    return Prompts([r["prompt"] for r in rows], columns, tokens, mask)


def load_prompts(config: GRPORunConfig, tokenizer) -> tuple[Prompts, Prompts, str]:
    """``(train, held_out, source)``: the built-in arithmetic problems, or ``config.data``
    with every tenth row (in a seeded order) held out."""
    if config.data is None:
        as_row = lambda p: {"prompt": p["question"], "answer": p["answer"]}
        train = [as_row(p) for p in arithmetic.problems(4096, config.seed, split="train")]
        held_out = [as_row(p) for p in arithmetic.problems(config.eval_prompts, 0, "heldout")]
        source = "built-in arithmetic word problems"
        train_numbers = held_numbers = None  # generated rows: their index in the list
    else:
        rows, numbering = data.load_numbered_rows(config.data)
        if len(rows) < 2:
            raise ValueError(
                f"--data {config.data!r}: the file holds {len(rows)} row"
                f"{'' if len(rows) == 1 else 's (it is empty)'}, too few to split: "
                "a held-out split (10%, at least 1 row) is carved from it and the rest is "
                "trained on, so it needs at least 2 rows"
            )
        order = np.random.default_rng(config.seed).permutation(len(rows))
        n_eval = max(1, min(config.eval_prompts, len(rows) // 10))
        held_index, train_index = sorted(order[:n_eval]), sorted(order[n_eval:])
        held_out, held_numbers = [rows[i] for i in held_index], numbering.take(held_index)
        train, train_numbers = [rows[i] for i in train_index], numbering.take(train_index)
        source = config.data
    return (
        _prompts(train, tokenizer, config.prompt_width, source + " (train)", train_numbers),
        _prompts(held_out, tokenizer, config.prompt_width, source + " (held out)", held_numbers),
        source,
    )


def reward_set(config: GRPORunConfig) -> rewards.RewardSet:
    """``--reward`` specs, or the built-in task's accuracy (1.0) and format (0.1) rewards."""
    if config.reward:
        return rewards.RewardSet.from_specs(config.reward)
    return rewards.RewardSet.of(
        [(arithmetic.accuracy_reward, 1.0), (arithmetic.format_reward, 0.1)]
    )


# ---------------------------------------------------------------------------- stages


def _fill_masked(rollout, scores, valid, rows: int, sampled):
    """``rollout``, ``scores`` and ``valid`` with ``rows`` masked-out rows appended (the first
    sampled row's tokens, from ``sampled``, the last round's rollout, as ``rollout`` may have
    no rows; no completion, score 0, not valid)."""
    fill = {
        name: np.zeros((rows, *value.shape[1:]), value.dtype) for name, value in rollout.items()
    }
    fill["tokens"] = np.repeat(sampled["tokens"][:1], rows, axis=0)
    fill["mask"] = np.repeat(sampled["mask"][:1], rows, axis=0)
    rollout = {name: np.concatenate([rollout[name], fill[name]]) for name in rollout}
    scores = np.concatenate([scores, np.zeros(rows, np.float32)])
    valid = np.concatenate([valid, np.zeros(rows, bool)])
    return rollout, scores, valid


def _mean_over_rounds(reward_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Each reward metric's mean over the sampling rounds (NaN: no row scored in any round)."""
    metrics = {}
    for name in reward_metrics[0]:
        values = np.array([m[name] for m in reward_metrics], np.float64)
        metrics[name] = (
            float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else math.nan
        )
    return metrics


def collect(
    rollout_fn,
    policy_params,
    ref_params,
    prompts: Prompts,
    cursor: int,
    key: jax.Array,
    reward: rewards.RewardSet,
    tokenizer,
    config: GRPORunConfig,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, float], int]:
    """Sample ``group_size`` completions for each of ``batch_size`` prompts (from ``cursor``
    in the cycled prompt order) and score them.

    With ``dynamic_sampling`` (DAPO, Yu et al., 2025, Sec. 3.2), groups whose rewards are all
    equal (zero advantage: no gradient) are left out and further rounds sample new prompts
    until ``batch_size`` groups are kept or ``max_sampling_rounds`` is reached; what is still
    missing is filled with masked-out rows (no tokens in the loss) and counted.

    Returns ``(rollout, scores [B], valid [B], metrics, cursor)``, ``rollout`` on the host
    with the rows grouped contiguously.
    """
    k, want = config.group_size, config.batch_size
    kept: list[dict[str, np.ndarray]] = []
    kept_scores, kept_valid, reward_metrics = [], [], []
    have = dropped = rounds = 0
    while have < want and rounds < (config.max_sampling_rounds if config.dynamic_sampling else 1):
        index = (cursor + np.arange(want)) % len(prompts)
        cursor += want
        texts, columns, tokens, mask = prompts.take(np.repeat(index, k))
        out = jax.device_get(
            rollout_fn(
                policy_params, ref_params, None, tokens[::k], mask[::k],
                jax.random.fold_in(key, rounds), config.temperature, group_size=k,
            )  # each prompt prefilled once for its group
        )  # fmt: skip
        out = apply_stop_strings(out, tokenizer, config.stop)
        rounds += 1
        scored = reward.score(
            texts, decode_completions(tokenizer, out), columns, on_error=config.on_reward_error
        )
        reward_metrics.append(scored.metrics())
        keep = np.ones(want * k, bool)
        if config.dynamic_sampling:
            keep, n_dropped = advantages.filter_groups(scored.rewards, k, valid=scored.valid)
            dropped += int(n_dropped)
        keep_groups = np.flatnonzero(keep.reshape(want, k).all(axis=1))[: want - have]
        rows = (keep_groups[:, None] * k + np.arange(k)).reshape(-1)
        kept.append({name: value[rows] for name, value in out.items()})
        kept_scores.append(scored.rewards[rows])
        kept_valid.append(scored.valid[rows])
        have += len(keep_groups)
    rollout = {name: np.concatenate([part[name] for part in kept]) for name in kept[0]}
    scores = np.concatenate(kept_scores).astype(np.float32)
    valid = np.concatenate(kept_valid)
    missing = want - have
    if missing:  # dynamic sampling ran out of rounds: masked rows fill the fixed shape
        rollout, scores, valid = _fill_masked(rollout, scores, valid, missing * k, out)
    metrics = _mean_over_rounds(reward_metrics)
    metrics.update(
        {
            "sampling/rounds": float(rounds),
            "sampling/dropped_groups": float(dropped),
            "sampling/masked_groups": float(missing),
        }
    )
    return rollout, scores, valid, metrics, cursor


def shape(
    rollout: dict[str, np.ndarray],
    scores: np.ndarray,
    valid: np.ndarray,
    config: GRPORunConfig,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The update's batch: overlong handling, group advantages over the valid rows, truncated
    importance weights (``tis_cap``) and the sampler/trainer mismatch metrics."""
    cmask = np.asarray(rollout["completion_mask"]) & valid[:, None]
    lengths = cmask.sum(axis=1)
    truncated = ~np.asarray(rollout["finished"]) & valid
    n = cmask.shape[1]
    share = lambda x: float(x[valid].mean()) if valid.any() else 0.0  # over the valid rows
    metrics: dict[str, float] = {"completions/truncated_fraction": share(truncated)}
    if config.overlong == "mask":
        cmask = np.asarray(advantages.mask_truncated(jnp.asarray(cmask), jnp.asarray(truncated)))
    elif config.overlong == "soft":
        penalty = np.asarray(
            advantages.soft_overlong_penalty(
                jnp.asarray(lengths), n, config.overlong_buffer, config.overlong_penalty
            )
        )
        scores = scores + np.where(valid, penalty, 0.0).astype(np.float32)
        metrics["rewards/overlong_penalty/mean"] = share(penalty)
    adv = np.asarray(
        advantages.outcome_advantages(
            jnp.asarray(scores, jnp.float32),
            config.group_size,
            estimator=config.estimator,
            valid=jnp.asarray(valid),
        )
    )
    adv = np.where(valid, adv, 0.0).astype(np.float32)
    weights, tis = advantages.truncated_importance_weights(
        jnp.asarray(rollout["old_logps"]),
        jnp.asarray(rollout["sampler_logps"]),
        jnp.asarray(cmask),
        cap=config.tis_cap if config.tis_cap is not None else None,
    )
    metrics.update({name: float(value) for name, value in tis.items()})  # sampling/...
    batch = {
        "tokens": rollout["tokens"],
        "mask": rollout["mask"],
        "completion_mask": cmask,
        "old_logps": np.where(cmask, rollout["old_logps"], 0.0).astype(np.float32),
        "advantages": adv,
    }
    if config.grpo.beta > 0:
        batch["ref_logps"] = np.where(cmask, rollout["ref_logps"], 0.0).astype(np.float32)
    if config.tis_cap is not None:
        batch["is_weights"] = np.asarray(weights, np.float32)
    seq_kl = np.sum((rollout["old_logps"] - rollout["ref_logps"]) * cmask, axis=1)
    metrics.update(
        {
            "objective/kl": share(seq_kl),
            "completions/mean_length": share(lengths),
            "advantages/abs_mean": share(np.abs(adv)),
        }
    )
    return batch, metrics


def apply_stop_strings(rollout: dict, tokenizer, stop: Sequence[str]) -> dict:
    """``rollout`` (on the host) with each completion ended at its first stop string
    (:func:`rljax.models.generate.stop_at_strings`): the completion and attention masks
    shortened, the per-token arrays zeroed past the end, ``finished`` set where a stop string
    ended the row. No stop strings: ``rollout`` unchanged."""
    if not stop:
        return rollout
    cmask = rollout["completion_mask"]
    n = cmask.shape[1]
    completions = rollout["tokens"][:, -n:]
    new_mask, stopped = generate.stop_at_strings(
        completions, cmask, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop
    )
    out = dict(rollout)
    for name, value in rollout.items():  # the per-token arrays: zero past the new end
        if name != "completion_mask" and np.shape(value) == cmask.shape:
            out[name] = np.where(new_mask, value, np.zeros((), np.asarray(value).dtype))
    out["completion_mask"] = new_mask
    out["mask"] = np.concatenate([rollout["mask"][:, :-n], new_mask], axis=1)
    out["finished"] = rollout["finished"] | stopped
    return out


def evaluate(
    rollout_fn, policy_params, ref_params, tokenizer, held_out: Prompts, reward, config
) -> dict[str, Any]:
    """Held-out metrics from the training rollout's function (its evaluation program, one row
    a prompt, is compiled once and shared by greedy and sampled evaluation):
    on greedy completions, ``accuracy`` (exact match of the final answer, when the rows have
    an ``answer`` field) and ``reward`` (the reward functions); on temperature-1 samples,
    ``sampled_accuracy`` and ``kl``, the mean sequence KL(policy || reference) estimated as
    the sum over tokens of ``log pi - log pi_ref`` (unbiased on the policy's samples); and
    ``samples``, the first greedy completions with their prompts and rewards (logged as a
    table, not as a metric)."""
    result: dict[str, float] = {}
    n, rows = len(held_out), config.rows
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        completions, kls, lengths = [], [], []
        for start in range(0, n, rows):
            index = np.minimum(np.arange(start, start + rows), n - 1)  # pad the last batch
            keep = min(rows, n - start)
            _, _, tokens, mask = held_out.take(index)
            key = jax.random.fold_in(jax.random.key(config.seed + 1), start)
            out = jax.device_get(
                rollout_fn(policy_params, ref_params, None, tokens, mask, key, temperature)
            )
            out = apply_stop_strings(out, tokenizer, config.stop)
            cmask = out["completion_mask"]
            completions += decode_completions(tokenizer, out)[:keep]
            kls.append(np.sum((out["old_logps"] - out["ref_logps"]) * cmask, axis=1)[:keep])
            lengths.append(cmask.sum(axis=1)[:keep])
        accuracy = None
        if "answer" in held_out.columns:
            accuracy = float(
                np.mean(
                    arithmetic.accuracy_reward(
                        held_out.texts, completions, answer=held_out.columns["answer"]
                    )
                )
            )
        if mode == "greedy":
            scored = reward.score(held_out.texts, completions, held_out.columns, on_error="mask")
            result["reward"] = scored.metrics()["reward"]
            if accuracy is not None:
                result["accuracy"] = accuracy
            result["samples"] = [  # the first greedy completions, for the samples table
                {
                    "prompt": held_out.texts[i],
                    "completion": completions[i],
                    "reward": float(scored.rewards[i]) if scored.valid[i] else None,
                }
                for i in range(min(SAMPLES_LOGGED, n))
            ]
        else:
            if accuracy is not None:
                result["sampled_accuracy"] = accuracy
            result["kl"] = float(np.mean(np.concatenate(kls)))
            result["sampled_length"] = float(np.mean(np.concatenate(lengths)))
    return result


# ---------------------------------------------------------------------------- the run


def _example_batch(config: GRPORunConfig, max_new: int) -> dict[str, np.ndarray]:
    """Shapes of a shaped batch (for the update's batch shardings)."""
    per_token = []
    if config.grpo.beta > 0:
        per_token.append("ref_logps")
    if config.tis_cap is not None:
        per_token.append("is_weights")
    return example_batch(
        config.rows, config.prompt_width, max_new, token_advantages=False, per_token=per_token
    )


class SampledRun(NamedTuple):
    """What a sampled run (:func:`run`, :func:`rljax.rl.online_dpo.run`) starts from: the
    started run folder, its prompts and reward functions, the split policy, the mesh, the
    run's key and optimizer."""

    started: Any
    train: Prompts
    held_out: Prompts
    source: str
    reward: rewards.RewardSet
    graphdef: Any
    params: Any
    mesh: jax.sharding.Mesh
    key: jax.Array
    optimizer: optax.GradientTransformation


def start_sampled_run(config: SampledRunConfig, label: str, what: str) -> SampledRun:
    """Start (or resume) ``config``'s run: load the base model (the built-in task's when
    ``--model`` is empty), the prompts and the reward functions; build the mesh and the
    optimizer (Adam, global gradient norm clipped at 1). With ``--lora-rank`` the policy has
    LoRA adapters and ``params`` are :func:`rljax.models.lora.split`'s."""
    if jax.process_count() > 1:
        raise ValueError(f"{what} runs in one process (any number of local devices via --mesh)")
    started = start_run(config, label, arithmetic.default_base_model)
    train, held_out, source = load_prompts(config, started.tokenizer)
    graphdef, params = lora.split(config.with_lora(hf.load_model(started.model_path), label))
    return SampledRun(
        started=started,
        train=train,
        held_out=held_out,
        source=source,
        reward=reward_set(config),
        graphdef=graphdef,
        params=jax.tree.map(np.array, jax.device_get(params)),
        mesh=experiment.build_mesh(config.mesh),
        key=jax.random.key(config.seed),
        optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(config.learning_rate)),
    )


def finish_sampled_run(
    config: SampledRunConfig,
    run: SampledRun,
    *,
    label: str,
    state: Any,
    iterate,
    evaluate,
    policy_params,
    log_keys: Sequence[str],
    plot_keys: Sequence[str],
    describe: str,
    algorithm: str,
    title: str,
) -> dict[str, Any]:
    """Run the iteration loop from ``state`` (the prompt cursor in its carry), then write the
    final policy (``policy_params(state)``), ``summary.json`` and the plot."""
    result = train_loop(
        config,
        label=label,
        state=state,
        carry={"cursor": 0},
        iterate=iterate,
        evaluate=evaluate,
        log_keys=tuple(log_keys),
        describe=f"{run.source}; {describe}, rewards {', '.join(run.reward.names)}, "
        f"{run.mesh.size} device(s)",
    )
    policy = lm.merge(run.graphdef, jax.device_get(policy_params(result.state)))
    summary = _summary(
        config, run.started.model_path, run.source, run.reward, result.history, algorithm
    )
    return finish(
        config, run.started, result, policy, devices=run.mesh.size, summary=summary,
        plot_keys=list(plot_keys), title=title, message=_message(summary),
    )  # fmt: skip


@experiment.in_run_folder(length_field="iterations")  # one run per --out; a resume keeps settings
def run(config: GRPORunConfig, *, label: str = "GRPO") -> dict[str, Any]:
    """Train; writes ``out/metrics.jsonl``, ``out/summary.json`` (with
    ``heldout_accuracy_before``/``_after`` and ``kl_to_reference``), ``out/training.png`` and
    the final policy as a Hugging Face folder ``out/policy``; returns the summary."""
    r = start_sampled_run(config, label, "grpo.py")
    tokenizer, max_new = r.started.tokenizer, config.completion_width
    update = updates.make_grpo_update(r.graphdef, r.optimizer, config.grpo)
    init = updates.init_grpo_state(r.params, r.optimizer, jax.random.fold_in(r.key, 2**31))
    state, step, batch_shardings = lm.compile_update(
        update, init, _example_batch(config, max_new), r.mesh
    )
    # With LoRA the reference is the policy with its adapters off (ref_params None).
    ref_params = None if lora.has_lora(r.params) else sharding.shard_params(r.params, r.mesh)
    sampling = sampling_config(tokenizer, max_new, config.temperature)
    rollout_fn = make_rollout_fn(
        r.graphdef, sampling, chunk_size=config.grpo.chunk_size, sampler=config.sampler,
        slots=config.rollout_slots,
    )  # fmt: skip

    def held_out_eval(s):
        return evaluate(
            rollout_fn, s.params["policy"], ref_params, tokenizer, r.held_out, r.reward, config
        )

    def iterate(it, state, carry):
        rollout, scores, valid, collected, cursor = collect(
            rollout_fn, state.params["policy"], ref_params, r.train, carry["cursor"],
            jax.random.fold_in(r.key, it), r.reward, tokenizer, config,
        )  # fmt: skip
        batch, shaped = shape(rollout, scores, valid, config)
        state, metrics = step(state, jax.device_put(batch, batch_shardings))
        return state, metrics, {**collected, **shaped}, {"cursor": cursor}

    keys = ("reward", "objective/kl", "eval/accuracy", "eval/kl")
    return finish_sampled_run(
        config, r, label=label, state=state, iterate=iterate, evaluate=held_out_eval,
        policy_params=lambda s: s.params["policy"], log_keys=keys, plot_keys=keys,
        describe=f"{config.iterations} iterations x {config.rows} samples "
        f"({config.batch_size} prompts x {config.group_size}), loss {config.grpo.loss_type}, "
        f"advantages {config.estimator}",
        algorithm=f"grpo family ({config.grpo.loss_type}, {config.estimator} advantages)",
        title=f"{label} ({config.grpo.loss_type}, group {config.group_size})",
    )  # fmt: skip


def _summary(
    config: SampledRunConfig, model_path: str, source: str, reward, history, algorithm: str
) -> dict:
    """The run's ``summary.json``: settings and the first and last held-out evaluations."""
    evals = [r for r in history if "eval/kl" in r]
    before, after = evals[0], evals[-1]
    return {
        "algorithm": algorithm,
        "model": model_path,
        "data": source,
        "rewards": dict(zip(reward.names, map(float, reward.weights), strict=True)),
        "iterations": config.iterations,
        "samples": config.iterations * config.rows,
        "heldout_accuracy_before": before.get("eval/accuracy"),
        "heldout_accuracy_after": after.get("eval/accuracy"),
        "heldout_reward_before": before.get("eval/reward"),
        "heldout_reward_after": after.get("eval/reward"),
        "kl_to_reference": after.get("eval/kl"),
    }


def _message(summary: dict) -> str:
    """The closing line: held-out accuracy (where the rewards give one) and reward, before ->
    after, and the KL to the reference."""
    acc = ""
    if summary["heldout_accuracy_before"] is not None:
        acc = (
            f"held-out accuracy {summary['heldout_accuracy_before']:.3f} -> "
            f"{summary['heldout_accuracy_after']:.3f}, "
        )
    return (
        f"{acc}held-out reward {summary['heldout_reward_before']:.3f} -> "
        f"{summary['heldout_reward_after']:.3f}, KL to the reference "
        f"{summary['kl_to_reference']:.3f} nats"
    )
