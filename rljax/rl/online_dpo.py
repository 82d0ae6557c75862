"""Online DPO: DPO on pairs sampled from the current policy and ranked by a judge, one update
per batch (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback",
arXiv:2402.04792; TRL's ``OnlineDPOTrainer``).

Each iteration is the GRPO driver's collect stage (:func:`rljax.rl.grpo.collect`: sample
``group_size`` completions per prompt with the one compiled rollout, score them with the
reward functions of the GRPO protocol) followed by :func:`pairs`, which makes each group's best
and worst completion the chosen and rejected side of a DPO pair, and one step of
:func:`rljax.updates.make_dpo_update`. The reference log-probs are the rollout's reference
pass (``DPOConfig(reference="precomputed")``: no second forward of the reference in the
update). Groups whose completions all score the same carry no preference: they are left out and
new prompts sampled in their place (as DAPO's dynamic sampling), up to ``max_sampling_rounds``;
what is still missing is masked out (no gradient) and counted. The reference is the initial
policy, or the current one copied every ``ref_update_every`` iterations; it lives in the train
state (``DPOState.ref_params``), so a resumed run continues with the reference it had.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rljax import experiment, updates
from rljax.models import lora
from rljax.rl.grpo import (
    SampledRunConfig,
    _fail,
    collect,
    evaluate,
    finish_sampled_run,
    start_sampled_run,
)
from rljax.rl.rollout import make_rollout_fn, sampling_config
from rljax.updates import lm

__all__ = ["OnlineDPORunConfig", "pairs", "run"]


@dataclasses.dataclass(frozen=True)
class OnlineDPORunConfig(experiment.DPOLossSettings, SampledRunConfig):
    """Online DPO with reward functions as the judge.

    Attributes:
      batch_size: prompts per update, one pair each (rows sampled = batch_size * group_size).
      group_size: completions sampled per prompt; the best and the worst by reward are the
        pair (2 = TRL's online DPO). Groups that all score the same are replaced by new
        prompts (up to max_sampling_rounds rounds), counted.
      out: output folder (checkpoints, metrics.jsonl, summary.json, plots, the final policy).
      ref_update_every: iterations between copies of the current policy into the reference
        (0 = the initial policy throughout).
      chunk_size: token rows per chunk of the log-prob computation.
    """

    batch_size: int = 32
    group_size: int = 4
    out: str = "runs/online_dpo"
    ref_update_every: int = 0
    chunk_size: int = 1024
    dynamic_sampling = True  # not a setting: groups with no preference are always resampled

    def __post_init__(self):
        super().__post_init__()
        if self.ref_update_every < 0:
            _fail("ref_update_every", f"must be >= 0, got {self.ref_update_every}")
        if self.ref_update_every and self.lora_rank:
            _fail(
                "ref_update_every",
                "with --lora-rank the reference is the base model (the adapters switched off, "
                "no second copy); a refreshed reference is not supported with LoRA, use 0",
            )
        self.dpo_config()  # DPOConfig checks beta, rpo_alpha, the loss types, ...

    def dpo_config(self) -> updates.DPOConfig:
        """The update's :class:`rljax.updates.DPOConfig`: the reference log-probs are the
        rollout's reference pass (``reference="precomputed"``)."""
        return super().dpo_config(reference="precomputed", chunk_size=self.chunk_size)


def pairs(
    rollout: dict[str, np.ndarray], scores: np.ndarray, valid: np.ndarray, group_size: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The DPO batch of a collected rollout: per group of ``group_size`` rows, the valid row
    with the highest score is the chosen side and the one with the lowest the rejected side
    (the first of equals). A group with no two valid rows of different scores (the masked
    rows that fill a short batch) gets empty loss masks: it adds nothing to the gradient.

    Returns ``(batch, metrics)``: ``chosen_/rejected_`` ``tokens``, ``mask``, ``loss_mask``
    (``[G, P + N]``, the rollout's left-padded prompt and completion) and
    ``ref_chosen_logps``/``ref_rejected_logps`` ``[G]`` (sums of the rollout's reference
    log-probs); metrics ``pairs/chosen_reward``, ``pairs/rejected_reward`` and
    ``pairs/reward_margin`` over the real pairs."""
    k = group_size
    groups = len(scores) // k
    rated = np.where(valid, scores.astype(np.float64), np.nan).reshape(groups, k)
    counts = np.sum(~np.isnan(rated), axis=1)
    filled = np.where(np.isnan(rated), 0.0, rated)
    best = np.argmax(np.where(np.isnan(rated), -np.inf, rated), axis=1)
    worst = np.argmin(np.where(np.isnan(rated), np.inf, rated), axis=1)
    real = (counts >= 2) & (filled[np.arange(groups), best] > filled[np.arange(groups), worst])
    cmask = np.asarray(rollout["completion_mask"], bool)
    prompt_width = rollout["tokens"].shape[1] - cmask.shape[1]
    batch: dict[str, np.ndarray] = {}
    for side, index in (("chosen", best), ("rejected", worst)):
        rows = np.arange(groups) * k + index
        completion = cmask[rows] & real[:, None]
        batch[f"{side}_tokens"] = np.asarray(rollout["tokens"])[rows]
        batch[f"{side}_mask"] = np.asarray(rollout["mask"])[rows]
        batch[f"{side}_loss_mask"] = np.concatenate(
            [np.zeros((groups, prompt_width), bool), completion], axis=1
        )
        batch[f"ref_{side}_logps"] = np.sum(
            np.where(completion, rollout["ref_logps"][rows], 0.0), axis=1
        ).astype(np.float32)
    chosen = filled[np.arange(groups), best][real]
    rejected = filled[np.arange(groups), worst][real]
    mean = lambda x: float(np.mean(x)) if x.size else float("nan")
    metrics = {
        "pairs/chosen_reward": mean(chosen),
        "pairs/rejected_reward": mean(rejected),
        "pairs/reward_margin": mean(chosen - rejected),
    }
    return batch, metrics


def _example_batch(config: OnlineDPORunConfig) -> dict[str, np.ndarray]:
    """Shapes of a pair batch (for the update's batch shardings)."""
    width = config.prompt_width + config.completion_width
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = np.zeros((config.batch_size, width), np.int32)
        batch[f"{side}_mask"] = np.zeros((config.batch_size, width), bool)
        batch[f"{side}_loss_mask"] = np.zeros((config.batch_size, width), bool)
        batch[f"ref_{side}_logps"] = np.zeros((config.batch_size,), np.float32)
    return batch


@experiment.in_run_folder(length_field="iterations")  # one run per --out; a resume keeps settings
def run(config: OnlineDPORunConfig, *, label: str = "online DPO") -> dict[str, Any]:
    """Train; writes what :func:`rljax.rl.grpo.run` writes (``out/metrics.jsonl``,
    ``summary.json`` with the held-out accuracy and reward before and after and the KL to the
    reference, ``training.png``, ``policy/``); returns the summary."""
    r = start_sampled_run(config, label, "online DPO")
    tokenizer = r.started.tokenizer
    update = updates.make_dpo_update(r.graphdef, r.optimizer, config.dpo_config())
    # With LoRA the reference is the policy with its adapters off (ref_params None).
    ref_params = None if lora.has_lora(r.params) else jax.tree.map(np.copy, r.params)
    init = updates.init_dpo_state(r.params, r.optimizer, ref_params=ref_params)
    state, step, batch_shardings = lm.compile_update(update, init, _example_batch(config), r.mesh)
    sampling = sampling_config(tokenizer, config.completion_width, config.temperature)
    rollout_fn = make_rollout_fn(
        r.graphdef, sampling, chunk_size=config.chunk_size, sampler=config.sampler,
        slots=config.rollout_slots,
    )  # fmt: skip

    def held_out_eval(s):
        return evaluate(rollout_fn, s.params, s.ref_params, tokenizer, r.held_out, r.reward, config)

    def iterate(it, state, carry):
        done = it - 1  # iterations are numbered from 1: `done` updates so far
        if config.ref_update_every and done and done % config.ref_update_every == 0:
            state = state._replace(ref_params=jax.tree.map(jnp.copy, state.params))
        rollout, scores, valid, collected, cursor = collect(
            rollout_fn, state.params, state.ref_params, r.train, carry["cursor"],
            jax.random.fold_in(r.key, it), r.reward, tokenizer, config,
        )  # fmt: skip
        batch, paired = pairs(rollout, scores, valid, config.group_size)
        state, metrics = step(state, jax.device_put(batch, batch_shardings))
        return state, metrics, {**collected, **paired}, {"cursor": cursor}

    every = config.ref_update_every
    reference = f"refreshed every {every} iterations" if every else "fixed"
    return finish_sampled_run(
        config, r, label=label, state=state, iterate=iterate, evaluate=held_out_eval,
        policy_params=lambda s: s.params,
        log_keys=("reward", "pairs/reward_margin", "rewards/accuracies", "eval/accuracy"),
        plot_keys=("reward", "pairs/reward_margin", "eval/accuracy", "eval/kl"),
        describe=f"{config.iterations} iterations x {config.batch_size} pairs (best vs worst "
        f"of {config.group_size} samples), reference {reference}",
        algorithm=f"online dpo ({config.loss_type}, best vs worst of {config.group_size})",
        title=f"{label} (best vs worst of {config.group_size})",
    )  # fmt: skip
