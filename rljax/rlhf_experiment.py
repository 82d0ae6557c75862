"""Orchestration of the RLHF experiments (``experiments/ppo_rlhf.py``, ``experiments/trpo_rlhf.py``
and the RL arms of ``experiments/frontier.py``).

One iteration: a batch of prompts (each repeated ``samples_per_prompt`` times) -> compiled
KV-cache sampling from the policy, plus one forward pass each of the policy (log-probs and, with
a value head, values), the frozen reference and the critic -> scores from the built-in task's
oracle or a reward-model folder -> reward shaping with the KL penalty (:mod:`rljax.rlhf`) and
advantages (token GAE with a critic, group-relative without) -> the compiled PPO or TRPO update
-> the KL controller's update. The train state, the KL coefficient and the iteration are
checkpointed with orbax; the rollout key of iteration ``i`` is ``fold_in(key(seed), i)``, so a
run started again with the same ``--out`` continues with identical results.

Evaluation (every ``eval_every`` iterations and at the end) samples the policy on held-out
prompts and reports the oracle's (or reward model's) mean score and the mean sequence
KL(policy || reference), estimated on those samples as the sum over tokens of
``log pi - log pi_ref`` (unbiased for the sequence KL); the pair is one point of the
reward-vs-KL frontier (Rafailov et al., 2023, Fig. 2).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rljax import checkpoint, checks, data, experiment, finite, lm, rlhf, runs, sharding, trpo
from rljax.advantages import whiten
from rljax.logprobs import masked_mean
from rljax.models import generate, hf
from rljax.models.transformer import with_head
from rljax.tasks import sorting

__all__ = [
    "PPORunConfig",
    "RLHFRunConfig",
    "Scorer",
    "TRPORunConfig",
    "evaluate_policy_kl",
    "make_rollout_fn",
    "make_shaping_fn",
    "run",
]


@dataclasses.dataclass(frozen=True)
class RLHFRunConfig:
    """Settings shared by the RLHF experiments.

    Attributes:
      model: the policy's Hugging Face checkpoint folder (also the reference); none = the
        built-in task's tiny base model.
      reward_model: a reward-model folder (a one-label *ForSequenceClassification checkpoint,
        e.g. from experiments/reward_model.py, with the policy's tokenizer); none = the built-in
        task's oracle.
      prompts: a prompt file (JSONL, JSON, parquet or a datasets folder with a prompt field;
        needs --reward-model); none = the built-in task's generated prompts.
      mesh: device mesh such as data=2,fsdp=2,tensor=2; empty = one device.
      out: output folder (checkpoints, metrics.jsonl, summary.json, plots, the final policy).
      seed: prompt order, sampling and initialisation seed.
      iterations: rollout + update iterations.
      batch_size: prompts per iteration (rows = batch_size * samples_per_prompt).
      samples_per_prompt: completions sampled per prompt (>= 2 for critic none).
      max_prompt_length: prompt tokens kept (left-padded to this width).
      max_new_tokens: completion tokens sampled; none = the built-in task's longest answer, or 32.
      temperature: sampling temperature (1 keeps the rollout on-policy).
      learning_rate: Adam learning rate of the policy (and of the critic with PPO).
      kl_coef: initial coefficient of the per-token KL penalty to the reference.
      kl_target: target sequence KL of the adaptive controller (Ziegler et al.); none = a fixed
        coefficient.
      kl_horizon: horizon of the adaptive controller, in samples.
      kl_estimator: per-token KL estimator of the penalty: k1, k2 or k3.
      missing_eos_penalty: subtracted from the score of completions without EOS; none = off.
      whiten_rewards: whiten the shaped per-token rewards over the batch (mean kept).
      gamma: discount over tokens.
      lam: GAE lambda over tokens.
      critic: head (value head on the policy), separate (a critic model) or none
        (group-relative advantages; needs samples_per_prompt >= 2).
      baseline: group baseline without a critic: mean (GRPO) or leave_one_out (RLOO).
      scale: group advantage scaling without a critic: std (GRPO) or none (RLOO, Dr. GRPO).
      chunk_size: token rows per chunk of the log-prob computation.
      log_every: iterations between progress lines.
      eval_every: iterations between held-out evaluations (0 = only at the end).
      eval_prompts: held-out prompts sampled per evaluation.
      checkpoint_every: iterations between checkpoints (the last is always saved).
      compilation_cache: folder of JAX's persistent compilation cache (a second run with the
        same shapes loads the compiled programs instead of compiling them); none = off.
      max_nonfinite_updates: stop after this many consecutive updates with a NaN or inf (in
        the loss, gradients, new parameters, or the critic's fit; each is skipped).
      allow_config_change: resume even though the settings differ from those stored in
        out/config.json (summary.json then records both); without it such a resume is refused.
    """

    model: str | None = None
    reward_model: str | None = None
    prompts: str | None = None
    mesh: str = ""
    out: str = "runs/rlhf"
    seed: int = 0
    iterations: int = 100
    batch_size: int = 64
    samples_per_prompt: int = 1
    max_prompt_length: int = 16
    max_new_tokens: int | None = None
    temperature: float = 1.0
    learning_rate: float = 2e-4
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: float = 10_000.0
    kl_estimator: str = "k1"
    missing_eos_penalty: float | None = 1.0
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    critic: str = "head"
    baseline: str = "mean"
    scale: str = "std"
    chunk_size: int = 1024
    log_every: int = 10
    eval_every: int = 25
    eval_prompts: int = 256
    checkpoint_every: int = 25
    compilation_cache: str | None = runs.DEFAULT_COMPILATION_CACHE
    max_nonfinite_updates: int = 3
    allow_config_change: bool = False

    def __post_init__(self):
        def fail(field, problem):
            raise ValueError(f"--{field.replace('_', '-')}: {problem}")

        checks.check(
            self,
            {
                "seed": ">= 0",
                "iterations": ">= 1",
                "batch_size": ">= 1",
                "samples_per_prompt": ">= 1",
                "max_prompt_length": ">= 1",
                "max_new_tokens": ">= 1",
                "temperature": "> 0",  # RL needs sampling
                "learning_rate": "> 0",
                "kl_coef": ">= 0",
                "kl_target": "> 0",
                "kl_horizon": "> 0",
                "missing_eos_penalty": ">= 0",
                "gamma": "in (0, 1]",
                "lam": "in [0, 1]",
                "chunk_size": ">= 1",
                "log_every": ">= 1",
                "eval_every": ">= 0",
                "eval_prompts": ">= 1",
                "checkpoint_every": ">= 1",
                "max_nonfinite_updates": ">= 1",
            },
        )
        if self.critic not in rlhf.CRITICS:
            fail("critic", f"must be one of {rlhf.CRITICS}, got {self.critic!r}")
        if self.critic == "none" and self.samples_per_prompt < 2:
            fail(
                "samples_per_prompt",
                "critic none uses group-relative advantages: sample >= 2 completions per prompt",
            )
        if self.baseline not in ("mean", "leave_one_out"):
            fail("baseline", f"must be mean or leave_one_out, got {self.baseline!r}")
        if self.scale not in ("std", "none"):
            fail("scale", f"must be std or none, got {self.scale!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            fail("kl_estimator", f"must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.whiten_rewards and self.critic == "none":
            fail(
                "whiten_rewards",
                "whitens the per-token rewards that GAE uses; critic none takes group-relative "
                "advantages of the sequence rewards instead",
            )
        if self.prompts is not None and self.reward_model is None:
            fail(
                "prompts",
                "a prompt set of your own needs --reward-model (the oracle only knows "
                "the built-in task)",
            )

    @property
    def rows(self) -> int:
        return self.batch_size * self.samples_per_prompt

    def kl_controller(self) -> rlhf.KLController:
        return rlhf.KLController(self.kl_coef, self.kl_target, self.kl_horizon)


@dataclasses.dataclass(frozen=True)
class PPORunConfig(RLHFRunConfig):
    """RLHF with PPO (Schulman et al., 2017; Ziegler et al., 2019; Ouyang et al., 2022).

    Attributes:
      clip_eps: clip range of the probability ratio.
      value_clip_eps: clip range of the value update; none = off.
      value_coef: weight of the value loss.
      entropy_coef: weight of the entropy bonus.
      num_epochs: PPO epochs over each rollout.
      num_minibatches: minibatches per epoch.
      target_kl: stop an update's remaining minibatches beyond this k3 KL to the rollout
        policy; none = never.
    """

    out: str = "runs/ppo_rlhf"
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    num_epochs: int = 4
    num_minibatches: int = 2
    target_kl: float | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_divides(self, "num_minibatches")
        self.update_config()  # RLHFPPOConfig and PPOConfig check the clip ranges, epochs, ...

    def update_config(self) -> rlhf.RLHFPPOConfig:
        return rlhf.RLHFPPOConfig(
            critic=self.critic,
            # Group-relative advantages are already centred (and scaled, with --scale std) per
            # group: whitening them again over tokens would undo --scale none and shift each
            # group's baseline by its completion lengths.
            normalize_advantages=self.critic != "none",
            clip_eps=self.clip_eps,
            value_clip_eps=self.value_clip_eps,
            value_coef=self.value_coef,
            entropy_coef=self.entropy_coef,
            num_epochs=self.num_epochs,
            num_minibatches=self.num_minibatches,
            target_kl=self.target_kl,
            chunk_size=self.chunk_size,
        )


@dataclasses.dataclass(frozen=True)
class TRPORunConfig(RLHFRunConfig):
    """RLHF with TRPO (Schulman et al., 2015): a natural-gradient step in a KL trust region,
    with jvp-based Gauss-Newton Fisher-vector products, on the policy LM.

    Attributes:
      critic: separate (a critic model fitted after each step) or none (group-relative
        advantages; needs samples_per_prompt >= 2). TRPO keeps the critic apart from the policy.
      max_kl: trust-region radius on the mean per-token KL to the rollout policy (0.02, the
        classic-control value, overfits each 64-sample batch on the built-in task: held-out
        score 0.36 -> 0.41 in 100 iterations, against 0.36 -> 0.54 with 0.005).
      cg_iters: conjugate-gradient iterations.
      cg_damping: damping added to the Fisher.
      fvp_subsample: use every k-th row for the Fisher-vector products.
      value_learning_rate: Adam learning rate of the critic.
      n_critic_updates: passes over the rollout fitting the critic.
      critic_minibatches: minibatches per pass.
    """

    out: str = "runs/trpo_rlhf"
    critic: str = "separate"
    max_kl: float = 0.005
    cg_iters: int = 10
    cg_damping: float = 0.1
    fvp_subsample: int = 1
    value_learning_rate: float = 1e-3
    n_critic_updates: int = 4
    critic_minibatches: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.critic == "head":
            raise ValueError(
                "--critic head: TRPO's natural step moves the policy alone; use separate or none"
            )
        if self.critic != "none":
            _check_divides(self, "critic_minibatches")
        checks.check(self, {"value_learning_rate": "> 0"})
        self.update_config()  # TRPOConfig checks max_kl, cg_iters, cg_damping, ...

    def update_config(self) -> trpo.TRPOConfig:
        return trpo.TRPOConfig(
            normalize_advantages=self.critic != "none",  # as PPORunConfig.update_config
            max_kl=self.max_kl,
            cg_iters=self.cg_iters,
            cg_damping=self.cg_damping,
            fvp_subsample=self.fvp_subsample,
            n_critic_updates=self.n_critic_updates,
            critic_minibatches=self.critic_minibatches,
        )


def _check_divides(config: RLHFRunConfig, field: str) -> None:
    """The rollout's rows (batch_size x samples_per_prompt) split into ``field`` minibatches."""
    parts = getattr(config, field)
    if parts < 1 or config.rows % parts:
        raise ValueError(
            f"--{field.replace('_', '-')} {parts} must divide the rollout's "
            f"{config.rows} rows (--batch-size {config.batch_size} x --samples-per-prompt "
            f"{config.samples_per_prompt})"
        )


# ---------------------------------------------------------------------------- compiled pieces


def make_rollout_fn(
    policy_graphdef,
    ref_graphdef,
    sampling: generate.SamplingConfig,
    *,
    critic: str,
    value_graphdef=None,
    chunk_size: int = 1024,
) -> Callable:
    """The jitted rollout ``(policy_params, ref_params, value_params, prompt_tokens,
    prompt_mask, key) -> dict``: samples, then the per-token log-probs of the samples under the
    policy (``old_logps``) and the reference (``ref_logps``), the policy's ``entropy`` and, with
    a critic, ``old_values`` (all ``[B, N]``, 0 at padding), with ``tokens``, ``mask``,
    ``completion_mask`` and ``finished``."""

    @jax.jit
    def rollout(policy_params, ref_params, value_params, prompt_tokens, prompt_mask, key):
        gen = generate.generate(
            (policy_graphdef, policy_params), prompt_tokens, prompt_mask, key, sampling
        )
        n = gen.completion_mask.shape[1]
        cmask = gen.completion_mask
        policy = rlhf.completion_outputs(
            policy_graphdef,
            policy_params,
            gen.tokens,
            gen.mask,
            n,
            chunk_size=chunk_size,
            values=critic == "head",
        )
        ref = rlhf.completion_outputs(
            ref_graphdef, ref_params, gen.tokens, gen.mask, n, chunk_size=chunk_size
        )
        zero = lambda x: jnp.where(cmask, x, 0.0)
        out = {
            "tokens": gen.tokens,
            "mask": gen.mask,
            "completion_mask": cmask,
            "finished": gen.finished,
            "old_logps": zero(policy["logps"]),
            "ref_logps": zero(ref["logps"]),
            "entropy": zero(policy["entropy"]),
        }
        if critic == "head":
            out["old_values"] = zero(policy["values"])
        elif critic == "separate":
            model = lm.merge(value_graphdef, value_params)
            hidden, _ = model.decode(gen.tokens, gen.mask)
            out["old_values"] = zero(model.scores(hidden[:, -n - 1 : -1]))
        return out

    return rollout


def make_shaping_fn(config: RLHFRunConfig) -> Callable:
    """The jitted ``(rollout, scores, kl_coef) -> (batch, metrics, seq_kl)``: the missing-EOS
    penalty, the KL-penalised per-token rewards, optional reward whitening and the advantages
    (token GAE with a critic, group-relative without), TRL's ``objective/...`` metrics, and the
    per-row sequence KL ``[B]`` (for the KL controller)."""

    @jax.jit
    def shape(rollout, scores, kl_coef):
        cmask = rollout["completion_mask"]
        scores = rlhf.penalize_missing_eos(scores, rollout["finished"], config.missing_eos_penalty)
        rewards, kl = rlhf.kl_penalty_rewards(
            scores,
            rollout["old_logps"],
            rollout["ref_logps"],
            cmask,
            kl_coef=kl_coef,
            estimator=config.kl_estimator,
        )
        seq_kl = rlhf.sequence_kl(kl, cmask)
        non_score = -kl_coef * seq_kl
        if config.whiten_rewards:
            rewards = whiten(rewards, cmask, shift_mean=False)
        batch = {k: rollout[k] for k in ("tokens", "mask", "completion_mask", "old_logps")}
        if config.critic == "none":
            adv = rlhf.group_advantages(
                scores + non_score,
                config.samples_per_prompt,
                baseline=config.baseline,
                scale=config.scale,
            )
            batch["advantages"] = jnp.where(cmask, adv[:, None], 0.0)
        else:
            adv, returns = rlhf.token_gae(
                rewards, rollout["old_values"], cmask, gamma=config.gamma, lam=config.lam
            )
            batch.update(advantages=adv, returns=returns, old_values=rollout["old_values"])
        lengths = jnp.sum(cmask, axis=1)
        metrics = {
            "objective/kl": jnp.mean(seq_kl),
            "objective/entropy": jnp.mean(-jnp.sum(rollout["old_logps"], axis=1)),
            "objective/non_score_reward": jnp.mean(non_score),
            "objective/rlhf_reward": jnp.mean(scores + non_score),
            "objective/scores": jnp.mean(scores),
            "objective/kl_coef": kl_coef,
            "val/num_eos_tokens": jnp.sum(rollout["finished"]),
            "completion_length": jnp.mean(lengths),
            "policy/token_entropy": masked_mean(rollout["entropy"], cmask),
        }
        return batch, metrics, seq_kl

    return shape


# ---------------------------------------------------------------------------- scoring


class Scorer:
    """Scores of sampled rows, ``scorer(prompts, rollout) -> float32 [B]``: the built-in task's
    oracle on the decoded completions (``reward_model=None``), or a reward-model folder (a
    one-label *ForSequenceClassification checkpoint with the policy's vocabulary) on the token
    ids of prompt + completion."""

    def __init__(self, tokenizer, reward_model: str | None = None):
        self.tokenizer = tokenizer
        self.model = None
        if reward_model is not None:
            rm_tokenizer = hf.load_tokenizer(reward_model)
            if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(
                    f"--reward-model {reward_model!r}: its tokenizer differs from the policy's "
                    "(the reward model scores the policy's token ids, so the vocabularies must "
                    "match)"
                )
            graphdef, params = nnx.split(hf.load_model(reward_model, head="reward"))
            self.params = params
            self.model = jax.jit(lambda p, t, m: lm.merge(graphdef, p).rewards(t, m))

    def __call__(self, prompts: Sequence[str], rollout: dict) -> np.ndarray:
        if self.model is not None:
            return np.asarray(
                self.model(self.params, rollout["tokens"], rollout["mask"]), np.float32
            )
        cmask = np.asarray(rollout["completion_mask"])
        tokens = np.asarray(rollout["tokens"])[:, -cmask.shape[1] :]
        texts = [
            self.tokenizer.decode([int(t) for t in row[m]], skip_special_tokens=True)
            for row, m in zip(tokens, cmask, strict=True)
        ]
        return np.asarray(sorting.score_batch(list(prompts), texts), np.float32)


# ---------------------------------------------------------------------------- prompts


def _prompt_texts(config: RLHFRunConfig) -> tuple[list[str], list[str], str]:
    n_train = config.iterations * config.batch_size
    if config.prompts is None:
        train = sorting.prompts(n_train, config.seed)
        held_out = sorted(set(sorting.prompts(config.eval_prompts, config.seed + 7)) - set(train))
        return train, held_out[: config.eval_prompts], "built-in sorting task"
    rows, numbering = data.load_numbered_rows(config.prompts)
    texts = []
    for i, row in enumerate(rows):
        if "prompt" not in row:
            raise ValueError(f"--prompts {numbering.label(i)}: field 'prompt' is missing")
        texts.append(row["prompt"])
    if len(texts) < 2:
        raise ValueError(
            f"--prompts {config.prompts!r}: the file holds {len(texts)} prompts, too few to "
            "split: the last 10% (at least 1) are held out and the rest trained on, so it needs "
            "at least 2"
        )
    n_eval = max(1, min(config.eval_prompts, len(texts) // 10))
    held_out, train = texts[-n_eval:], texts[:-n_eval]
    # Cycle through the prompt set (deterministically shuffled per pass) for the iterations.
    rng = np.random.default_rng(config.seed)
    cycled = []
    while len(cycled) < n_train:
        cycled += [train[i] for i in rng.permutation(len(train))]
    return cycled[:n_train], held_out, config.prompts


def _tokenize(prompts, tokenizer, max_prompt_length: int):
    tokens, mask = data.tokenize_prompts(
        prompts, tokenizer, max_prompt_length, pad_to=max_prompt_length
    )
    if not np.all(mask.any(axis=1)):
        empty = [prompts[int(i)] for i in np.flatnonzero(~mask.any(axis=1))[:3]]
        raise ValueError(f"prompts {empty} tokenise to nothing; every prompt needs a token")
    return tokens, mask


# ---------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=8)
def _eval_rollout(policy_graphdef, ref_graphdef, sampling, chunk_size):
    return make_rollout_fn(
        policy_graphdef, ref_graphdef, sampling, critic="none", chunk_size=chunk_size
    )


def evaluate_policy_kl(
    policy_graphdef,
    policy_params,
    ref_graphdef,
    ref_params,
    tokenizer,
    prompts: Sequence[str],
    scorer: Callable,
    *,
    key: jax.Array,
    max_prompt_length: int,
    max_new_tokens: int,
    batch_size: int = 256,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Mean score and mean sequence KL(policy || reference) of one temperature-1 sample per
    held-out prompt: ``{"score", "kl", "validity" (built-in task), "eos_rate", "length"}``.

    The KL is estimated on the policy's own samples as the sum over tokens of
    ``log pi(y_t) - log pi_ref(y_t)`` (k1; unbiased for the sequence KL)."""
    sampling = generate.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    rollout_fn = _eval_rollout(policy_graphdef, ref_graphdef, sampling, chunk_size)
    tokens, mask = _tokenize(list(prompts), tokenizer, max_prompt_length)
    scores, kls, finished, lengths = [], [], [], []
    n = len(prompts)
    batch_size = min(batch_size, n)  # a short prompt list is not padded to a big batch
    for start in range(0, n, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        keep = min(batch_size, n - start)
        out = rollout_fn(
            policy_params,
            ref_params,
            None,
            tokens[index],
            mask[index],
            jax.random.fold_in(key, start),
        )
        out = jax.device_get(out)
        chunk_prompts = [prompts[i] for i in index]
        scores.append(np.asarray(scorer(chunk_prompts, out))[:keep])
        cmask = out["completion_mask"]
        kls.append(np.sum((out["old_logps"] - out["ref_logps"]) * cmask, axis=1)[:keep])
        finished.append(out["finished"][:keep])
        lengths.append(cmask.sum(axis=1)[:keep])
    return {
        "score": float(np.mean(np.concatenate(scores))),
        "kl": float(np.mean(np.concatenate(kls))),
        "eos_rate": float(np.mean(np.concatenate(finished))),
        "length": float(np.mean(np.concatenate(lengths))),
        "prompts": n,
    }


# ---------------------------------------------------------------------------- the run


def _models(config: RLHFRunConfig, algorithm: str, model_path: str):
    """``(policy_graphdef, policy_params, ref_graphdef, ref_params, value_graphdef,
    value_params)`` on the host."""
    base = hf.load_model(model_path)
    ref_graphdef, ref_params = nnx.split(base)
    rngs = nnx.Rngs(config.seed + 1)
    value_graphdef = value_params = None
    if config.critic == "head":
        policy = with_head(base, "value", rngs=rngs, lm_head=True)
    else:
        policy = base
        if config.critic == "separate":
            value_graphdef, value_params = nnx.split(with_head(base, "value", rngs=rngs))
    policy_graphdef, policy_params = nnx.split(policy)
    if algorithm == "trpo" and value_params is None:
        value_params = {}
    copy = lambda tree: jax.tree.map(np.array, jax.device_get(tree))
    return (
        policy_graphdef,
        copy(policy_params),
        ref_graphdef,
        copy(ref_params),
        value_graphdef,
        None if value_params is None else copy(value_params),
    )


def _adam(learning_rate: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate, eps=1e-5))


@experiment.in_run_folder(length_field="iterations")  # one run per --out; a resume keeps settings
def run(config: RLHFRunConfig, algorithm: str, *, label: str | None = None) -> dict[str, Any]:
    """Train with ``algorithm`` (``"ppo"`` with a :class:`PPORunConfig`, ``"trpo"`` with a
    :class:`TRPORunConfig`); writes ``out/metrics.jsonl``, ``out/summary.json``,
    ``out/training.png`` and the final policy as a Hugging Face folder ``out/policy``, and
    returns the summary."""
    if algorithm not in ("ppo", "trpo"):
        raise ValueError(f"algorithm must be 'ppo' or 'trpo', got {algorithm!r}")
    checks.require_folder("--reward-model", config.reward_model, "reward-model folder")
    label = label or f"{algorithm.upper()}-RLHF"
    if jax.process_count() > 1:
        raise ValueError(
            "the RLHF experiments run in one process (any number of local devices via --mesh); "
            "multi-process runs (python -m rljax.launch) are supported by dpo.py and "
            "reward_model.py only"
        )
    runs.use_compilation_cache(config.compilation_cache)
    start_time = time.perf_counter()
    out = pathlib.Path(config.out)
    model_path = experiment.resolve_model(config)
    tokenizer = hf.load_tokenizer(model_path)
    builtin = config.prompts is None and config.reward_model is None
    max_new = config.max_new_tokens or (sorting.max_completion_tokens() if builtin else 32)
    train_prompts, held_out, source = _prompt_texts(config)
    train_tokens, train_mask = _tokenize(train_prompts, tokenizer, config.max_prompt_length)
    scorer = Scorer(tokenizer, config.reward_model)

    pg, policy_params, rg, ref_params, vg, value_params = _models(config, algorithm, model_path)
    mesh = experiment.build_mesh(config.mesh)
    key = jax.random.key(config.seed)
    k = config.samples_per_prompt
    rows = config.rows
    example = _example_batch(config, rows, max_new)
    if algorithm == "ppo":
        optimizer = _adam(config.learning_rate)
        update = rlhf.make_rlhf_ppo_update(pg, optimizer, config.update_config(), vg)
        init = rlhf.init_rlhf_ppo_state(
            policy_params, optimizer, jax.random.fold_in(key, 2**31), value_params
        )
    else:
        value_optimizer = _adam(config.value_learning_rate)
        update = rlhf.make_rlhf_trpo_update(pg, value_optimizer, config.update_config(), vg)
        init = trpo.init_trpo_state(
            policy_params, value_params, value_optimizer, jax.random.fold_in(key, 2**31)
        )
    state, step_fn, batch_shardings = lm.compile_update(update, init, example, mesh)
    ref_params = sharding.shard_params(ref_params, mesh)
    sampling = generate.SamplingConfig(
        max_new_tokens=max_new,
        temperature=config.temperature,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    rollout_fn = make_rollout_fn(
        pg, rg, sampling, critic=config.critic, value_graphdef=vg, chunk_size=config.chunk_size
    )
    shape_fn = make_shaping_fn(config)
    controller = config.kl_controller()
    kl_coef = controller.init()

    def params_of(s):
        if algorithm == "ppo":
            return s.params["policy"], s.params.get("value")
        return s.policy_params, s.value_params

    def evaluate(s):
        policy_p, _ = params_of(s)
        return evaluate_policy_kl(
            pg,
            policy_p,
            rg,
            ref_params,
            tokenizer,
            held_out,
            scorer,
            key=jax.random.fold_in(jax.random.key(config.seed + 1), 0),
            max_prompt_length=config.max_prompt_length,
            max_new_tokens=max_new,
            chunk_size=config.chunk_size,
        )

    ckpt = checkpoint.Checkpointer(out / "checkpoints", max_to_keep=2)
    first, state, saved = experiment.resume(ckpt, state, config.iterations, "iteration")
    if saved is not None:  # the newest checkpoint that restores (damaged ones are skipped)
        kl_coef = jnp.asarray(saved["kl_coef"], jnp.float32)
        print(f"[{label}] resumed from iteration {first} in {ckpt.directory}", flush=True)
    log = runs.MetricsLog(
        out / "metrics.jsonl",
        label,
        config.iterations,
        resume_step=first or None,
        keys=("objective/scores", "objective/kl", "objective/kl_coef", "eval/score", "eval/kl"),
    )
    print(
        f"[{label}] {source}; {config.iterations} iterations x {rows} samples "
        f"({config.batch_size} prompts x {k}), critic {config.critic}, {mesh.size} device(s)",
        flush=True,
    )
    initial = None
    if first == 0:
        initial = evaluate(state)
        log.log(0, {f"eval/{name}": v for name, v in initial.items()})
    stop = finite.NonfiniteStop(
        config.max_nonfinite_updates, label, ckpt.directory, unit="iteration"
    )
    if first:
        stop.saved(first)
    try:
        for it in range(first + 1, config.iterations + 1):
            lo = (it - 1) * config.batch_size
            index = np.repeat(np.arange(lo, lo + config.batch_size), k)  # groups contiguous
            prompts = [train_prompts[i] for i in index]
            policy_p, value_p = params_of(state)
            rollout = rollout_fn(
                policy_p,
                ref_params,
                value_p,
                train_tokens[index],
                train_mask[index],
                jax.random.fold_in(key, it),
            )
            scores = jnp.asarray(scorer(prompts, rollout))
            batch, rollout_metrics, seq_kl = shape_fn(rollout, scores, kl_coef)
            state, update_metrics = step_fn(state, jax.device_put(batch, batch_shardings))
            stop.observe(it, update_metrics)  # the previous iteration's `nonfinite`
            kl_coef = controller.update(kl_coef, jnp.mean(seq_kl), rows)
            last = it == config.iterations
            row = {}
            if it % config.log_every == 0 or last or it == 1:
                row.update(jax.device_get({**rollout_metrics, **update_metrics}))
            if last or (config.eval_every and it % config.eval_every == 0):
                row.update({f"eval/{name}": v for name, v in evaluate(state).items()})
            if row:
                log.log(it, row)
            if it % config.checkpoint_every == 0 or last:
                stop.before_save(it, (state, kl_coef))  # never checkpoint a non-finite state
                ckpt.save(it, state, {"kl_coef": float(kl_coef)}, force=True)
                stop.saved(it)
        stop.flush()
    finally:
        ckpt.close()

    policy_p, _ = params_of(state)
    finite.require_finite(policy_p, f"[{label}] not exporting the policy to {out / 'policy'}")
    policy_model = lm.merge(pg, jax.device_get(policy_p))
    hf.save_model(_without_value_head(policy_model, config), out / "policy", tokenizer=tokenizer)
    history = log.rows()
    evals = [r for r in history if "eval/score" in r]
    final, start_eval = experiment.final_eval(evals), experiment.final_eval(evals[:1])
    summary = {
        "algorithm": algorithm,
        "model": model_path,
        "reward": config.reward_model or "oracle (built-in task)",
        "prompts": source,
        "iterations": config.iterations,
        "initial_eval": start_eval,
        "final_eval": final,
        "final_kl_coef": float(kl_coef),
        **runs.run_record(
            config, out, resumed_from=first, start_time=start_time, devices=mesh.size
        ),
    }
    runs.write_summary(out, summary)
    runs.plot_metrics(
        history,
        ["objective/scores", "objective/kl", "eval/score", "eval/kl"],
        out / "training.png",
        title=f"{label} (critic {config.critic}, KL coef {config.kl_coef})",
    )
    print(
        f"[{label}] held-out score {start_eval['score']:.3f} -> {final['score']:.3f}, "
        f"KL to the reference {final['kl']:.3f} nats; wrote {out}/metrics.jsonl, summary.json, "
        f"training.png, policy/ ({summary['wall_seconds']:.0f}s)",
        flush=True,
    )
    return summary


def _without_value_head(model, config):
    """The policy as a plain causal LM (the value head is training machinery)."""
    if config.critic != "head":
        return model
    return with_head(model, None, rngs=nnx.Rngs(0), lm_head=True)


def _example_batch(config: RLHFRunConfig, rows: int, max_new: int) -> dict[str, np.ndarray]:
    """Shapes of a shaped rollout batch (for the update's batch shardings)."""
    width = config.max_prompt_length + max_new
    per_token = np.zeros((rows, max_new), np.float32)
    batch = {
        "tokens": np.zeros((rows, width), np.int32),
        "mask": np.zeros((rows, width), bool),
        "completion_mask": np.zeros((rows, max_new), bool),
        "old_logps": per_token,
        "advantages": per_token,
    }
    if config.critic != "none":
        batch.update(returns=per_token, old_values=per_token)
    return batch
