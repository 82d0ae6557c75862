"""RLHF on language models with PPO or TRPO: the driver of ``experiments/ppo_rlhf.py``,
``experiments/trpo_rlhf.py`` and the RL arms of ``experiments/frontier.py``.

One iteration, one stage per line of :func:`run`'s ``iterate`` (each a function of its
inputs, tested alone in tests/test_rlhf_stages.py)::

    rollout = rollout_fn(...)                 # rljax.rl.rollout: sample, then one forward pass
                                              # each of policy (+ value head), reference, critic
    scores = scorer(prompts, rollout)         # Scorer: built-in oracle or a reward-model folder
    batch, metrics, seq_kl = shape_fn(...)    # make_shaping_fn: missing-EOS penalty, per-token
                                              # KL-penalised rewards, GAE or group advantages
    state, metrics = step(state, batch)       # config.make_update: the compiled PPO/TRPO update
    kl_coef = controller.update(...)          # the adaptive KL controller (Ziegler et al.)

The loop around it (resume, logging, evaluation, checkpoints, the non-finite stop) is
:func:`rljax.rl.loop.train_loop`. The train state and the KL coefficient are checkpointed; the
rollout key of iteration ``i`` is ``fold_in(key(seed), i)``, so a run started again with the
same ``--out`` continues with identical results.

Evaluation (every ``eval_every`` iterations and at the end) samples the policy on held-out
prompts and reports the oracle's (or reward model's) mean score and the mean sequence
KL(policy || reference), estimated on those samples as the sum over tokens of
``log pi - log pi_ref`` (unbiased for the sequence KL); the pair is one point of the
reward-vs-KL frontier (Rafailov et al., 2023, Fig. 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rljax import checks, data, experiment, rlhf, runs, sharding, updates
from rljax.advantages import whiten
from rljax.logprobs import masked_mean
from rljax.models import hf, lora
from rljax.models.transformer import with_head
from rljax.rl.loop import finish, start_run, train_loop
from rljax.rl.rollout import (
    RolloutRunSettings,
    decode_completions,
    example_batch,
    make_rollout_fn,
    sampling_config,
)
from rljax.tasks import sorting
from rljax.updates import lm

__all__ = [
    "Models",
    "PPORunConfig",
    "PolicyUpdate",
    "RLHFRunConfig",
    "Scorer",
    "TRPORunConfig",
    "evaluate_policy_kl",
    "load_models",
    "make_shaping_fn",
    "run",
]


@dataclasses.dataclass(frozen=True)
class RLHFRunConfig(RolloutRunSettings):
    """Settings shared by the RLHF experiments.

    Attributes:
      model: the policy's Hugging Face checkpoint folder (also the reference); none = the
        built-in task's tiny base model.
      reward_model: a reward-model folder (a one-label *ForSequenceClassification checkpoint,
        e.g. from experiments/reward_model.py, with the policy's tokenizer); none = the built-in
        task's oracle.
      prompts: a prompt file (JSONL, JSON, parquet or a datasets folder with a prompt field;
        needs --reward-model); none = the built-in task's generated prompts.
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
    """

    model: str | None = None
    reward_model: str | None = None
    prompts: str | None = None
    out: str = "runs/rlhf"
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

    def __post_init__(self):
        super().__post_init__()

        def fail(field, problem):
            raise ValueError(f"--{field.replace('_', '-')}: {problem}")

        checks.check(
            self,
            {
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


# The update settings of the RLHF runs (frozen, so safe as dataclass defaults): PPOConfig's with
# TRL's value weight and two minibatches; TRPOConfig's with the trust region measured for the
# built-in task (see TRPORunConfig) and a short critic fit.
PPO_DEFAULTS = updates.PPOConfig(value_coef=0.1, num_minibatches=2)
TRPO_DEFAULTS = updates.TRPOConfig(max_kl=0.005, n_critic_updates=4, critic_minibatches=2)


@dataclasses.dataclass(frozen=True)
class PPORunConfig(RLHFRunConfig):
    """RLHF with PPO (Schulman et al., 2017; Ziegler et al., 2019; Ouyang et al., 2022).

    Attributes:
      ppo: the PPO update's settings (:class:`rljax.updates.PPOConfig`: clip ranges, value and
        entropy weights, epochs, minibatches, advantage whitening, KL early stop).
    """

    out: str = "runs/ppo_rlhf"
    ppo: updates.PPOConfig = PPO_DEFAULTS

    def __post_init__(self):
        super().__post_init__()
        _check_divides(self, "num_minibatches", self.ppo.num_minibatches)
        _check_group_whitening(self, self.ppo.normalize_advantages)

    def make_update(self, models: Models, key: jax.Array) -> PolicyUpdate:
        """The compiled-to-be PPO update on ``models`` and its initial state."""
        optimizer = _adam(self.learning_rate)
        update = updates.make_rlhf_ppo_update(
            models.policy_graphdef,
            optimizer,
            self.ppo,
            models.value_graphdef,
            critic=self.critic,
            chunk_size=self.chunk_size,
        )
        state = updates.init_rlhf_ppo_state(
            models.policy_params, optimizer, key, models.value_params
        )
        return PolicyUpdate(update, state, lambda s: (s.params["policy"], s.params.get("value")))


@dataclasses.dataclass(frozen=True)
class TRPORunConfig(RLHFRunConfig):
    """RLHF with TRPO (Schulman et al., 2015): a natural-gradient step in a KL trust region,
    with jvp-based Gauss-Newton Fisher-vector products, on the policy LM.

    Attributes:
      critic: separate (a critic model fitted after each step) or none (group-relative
        advantages; needs samples_per_prompt >= 2). TRPO keeps the critic apart from the policy.
      value_learning_rate: Adam learning rate of the critic.
      trpo: the TRPO update's settings (:class:`rljax.updates.TRPOConfig`). The defaults here:
        max_kl 0.005 (0.02, the classic-control value, overfits each 64-sample batch on the
        built-in task: held-out score 0.36 -> 0.41 in 100 iterations, against 0.36 -> 0.54
        with 0.005), 4 critic passes of 2 minibatches.
    """

    out: str = "runs/trpo_rlhf"
    critic: str = "separate"
    value_learning_rate: float = 1e-3
    trpo: updates.TRPOConfig = TRPO_DEFAULTS

    def __post_init__(self):
        super().__post_init__()
        if self.critic == "head":
            raise ValueError(
                "--critic head: TRPO's natural step moves the policy alone; use separate or none"
            )
        if self.lora_dropout:
            raise ValueError(
                "--lora-dropout: TRPO's natural step needs a deterministic policy (the Fisher, "
                "the line search); use 0"
            )
        if self.critic != "none":
            _check_divides(self, "critic_minibatches", self.trpo.critic_minibatches)
        _check_group_whitening(self, self.trpo.normalize_advantages)
        checks.check(self, {"value_learning_rate": "> 0"})

    def make_update(self, models: Models, key: jax.Array) -> PolicyUpdate:
        """The compiled-to-be TRPO update on ``models`` and its initial state."""
        value_optimizer = _adam(self.value_learning_rate)
        update = updates.make_rlhf_trpo_update(
            models.policy_graphdef, value_optimizer, self.trpo, models.value_graphdef
        )
        value_params = {} if models.value_params is None else models.value_params
        state = updates.init_trpo_state(models.policy_params, value_params, value_optimizer, key)
        return PolicyUpdate(update, state, lambda s: (s.params["policy"], s.params["value"]))


def _check_divides(config: RLHFRunConfig, field: str, parts: int) -> None:
    """The rollout's rows (batch_size x samples_per_prompt) split into ``parts`` minibatches."""
    if config.rows % parts:
        raise ValueError(
            f"--{field.replace('_', '-')} {parts} must divide the rollout's "
            f"{config.rows} rows (--batch-size {config.batch_size} x --samples-per-prompt "
            f"{config.samples_per_prompt})"
        )


def _check_group_whitening(config: RLHFRunConfig, normalize_advantages: bool) -> None:
    """Group-relative advantages (critic none) are already centred (and, with --scale std,
    scaled) per group: whitening them again over tokens would undo --scale none and shift each
    group's baseline by its completion lengths, so the combination is refused."""
    if config.critic == "none" and normalize_advantages:
        raise ValueError(
            "--critic none takes group-relative advantages (centred per group, --baseline/"
            "--scale); --normalize-advantages would whiten them again over tokens, shifting "
            "each group's baseline by its completion lengths: pass --no-normalize-advantages"
        )


# ---------------------------------------------------------------------------- compiled pieces


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
        texts = decode_completions(self.tokenizer, rollout)
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


def evaluate_policy_kl(
    rollout_fn: Callable,
    policy_params,
    ref_params,
    tokenizer,
    prompts: Sequence[str],
    scorer: Callable,
    *,
    key: jax.Array,
    max_prompt_length: int,
    rows: int,
    value_params=None,
) -> dict[str, float]:
    """Mean score and mean sequence KL(policy || reference) of one temperature-1 sample per
    held-out prompt: ``{"score", "kl", "eos_rate", "length", "prompts"}``.

    ``rollout_fn`` is a :func:`rljax.rl.rollout.make_rollout_fn` program (the training one:
    its temperature is traced; with groups of several samples training calls it with
    ``group_size > 1``, and evaluation's single rows compile it once more, then never again);
    the prompts go through it
    ``rows`` at a time (the last batch padded by repeating the last prompt; the padding is not
    counted). The KL is estimated on the policy's own samples as the sum over tokens of
    ``log pi(y_t) - log pi_ref(y_t)`` (k1; unbiased for the sequence KL)."""
    tokens, mask = _tokenize(list(prompts), tokenizer, max_prompt_length)
    scores, kls, finished, lengths = [], [], [], []
    n = len(prompts)
    for start in range(0, n, rows):
        index = np.minimum(np.arange(start, start + rows), n - 1)
        keep = min(rows, n - start)
        out = rollout_fn(
            policy_params,
            ref_params,
            value_params,
            tokens[index],
            mask[index],
            jax.random.fold_in(key, start),
            1.0,
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


# ---------------------------------------------------------------------------- models, update


class Models(NamedTuple):
    """The networks of an RLHF run (parameters on the host): the policy (with a value head
    for critic head), the frozen reference and, for critic separate, the value model."""

    policy_graphdef: Any
    policy_params: Any
    ref_graphdef: Any
    ref_params: Any
    value_graphdef: Any = None
    value_params: Any = None


class PolicyUpdate(NamedTuple):
    """An algorithm's update (``update(state, batch) -> (state, metrics)``, not yet
    compiled), its initial state, and ``params(state) -> (policy_params, value_params)``."""

    update: Callable
    state: Any
    params: Callable[[Any], tuple[Any, Any]]


def load_models(config: RLHFRunConfig, model_path: str) -> Models:
    """The policy, reference and critic of ``config.critic`` from a checkpoint folder: the
    reference is the checkpoint; a value head (critic head, or the separate critic's own
    copy of the network) starts from ``seed + 1``. With ``--lora-rank`` the policy (and a
    separate critic) get LoRA adapters, and the reference is the policy with its adapters
    switched off (``ref_params`` None: no second copy of the weights)."""
    base = hf.load_model(model_path)
    ref_graphdef, ref_params = nnx.split(base)
    rngs = nnx.Rngs(config.seed + 1)
    value_graphdef = value_params = None
    if config.critic == "head":
        policy = with_head(base, "value", rngs=rngs, lm_head=True)
    else:
        policy = base
        if config.critic == "separate":
            critic = config.with_lora(with_head(base, "value", rngs=rngs), "critic")
            value_graphdef, value_params = lora.split(critic)
    policy_graphdef, policy_params = lora.split(config.with_lora(policy, "policy"))
    if config.lora_rank:
        ref_graphdef, ref_params = policy_graphdef, None
    copy = lambda tree: None if tree is None else jax.tree.map(np.array, jax.device_get(tree))
    return Models(
        policy_graphdef,
        copy(policy_params),
        ref_graphdef,
        copy(ref_params),
        value_graphdef,
        copy(value_params),
    )


def _make_rollout_fn(config: RLHFRunConfig, models: Models, tokenizer, max_new: int) -> Callable:
    """The run's compiled rollout of ``models`` (:func:`rljax.rl.rollout.make_rollout_fn`):
    ``max_new`` tokens sampled, the reference's and the critic's passes after."""
    return make_rollout_fn(
        models.policy_graphdef,
        sampling_config(tokenizer, max_new, config.temperature),
        ref_graphdef=models.ref_graphdef,
        critic=config.critic,
        value_graphdef=models.value_graphdef,
        chunk_size=config.chunk_size,
        sampler=config.sampler,
        slots=config.rollout_slots,
    )


def _adam(learning_rate: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate, eps=1e-5))


# ---------------------------------------------------------------------------- the run


@experiment.in_run_folder(length_field="iterations")  # one run per --out; a resume keeps settings
def run(config: PPORunConfig | TRPORunConfig, *, label: str | None = None) -> dict[str, Any]:
    """Train with the algorithm of ``config`` (a :class:`PPORunConfig` or
    :class:`TRPORunConfig`: its ``make_update`` builds the update); writes
    ``out/metrics.jsonl``, ``out/summary.json``, ``out/training.png`` and the final policy as a
    Hugging Face folder ``out/policy``, and returns the summary."""
    algorithm = _check_run(config)
    label = label or f"{algorithm.upper()}-RLHF"
    started = start_run(config, label)
    tokenizer = started.tokenizer
    builtin = config.prompts is None and config.reward_model is None
    max_new = config.max_new_tokens or (sorting.max_completion_tokens() if builtin else 32)
    train_prompts, held_out, source = _prompt_texts(config)
    train_tokens, train_mask = _tokenize(train_prompts, tokenizer, config.max_prompt_length)
    scorer = Scorer(tokenizer, config.reward_model)

    models = load_models(config, started.model_path)
    mesh = experiment.build_mesh(config.mesh)
    key = jax.random.key(config.seed)
    k, rows = config.samples_per_prompt, config.rows
    algo = config.make_update(models, jax.random.fold_in(key, 2**31))
    state, step_fn, batch_shardings = lm.compile_update(
        algo.update, algo.state, _example_batch(config, rows, max_new), mesh
    )
    ref_params = (
        None if models.ref_params is None else sharding.shard_params(models.ref_params, mesh)
    )
    rollout_fn = _make_rollout_fn(config, models, tokenizer, max_new)
    shape_fn = make_shaping_fn(config)
    controller = config.kl_controller()

    def evaluate(s):
        policy_params, value_params = algo.params(s)
        return evaluate_policy_kl(
            rollout_fn,
            policy_params,
            ref_params,
            tokenizer,
            held_out,
            scorer,
            key=jax.random.fold_in(jax.random.key(config.seed + 1), 0),
            max_prompt_length=config.max_prompt_length,
            rows=rows,
            value_params=value_params,
        )

    def iterate(it, state, carry):
        lo = (it - 1) * config.batch_size
        index = np.repeat(np.arange(lo, lo + config.batch_size), k)  # groups contiguous
        prompts = [train_prompts[i] for i in index]
        policy_params, value_params = algo.params(state)
        rollout = rollout_fn(
            policy_params,
            ref_params,
            value_params,
            train_tokens[index[::k]],
            train_mask[index[::k]],
            jax.random.fold_in(key, it),
            config.temperature,
            group_size=k,
        )  # each prompt prefilled once for its group; fmt: skip
        scores = jnp.asarray(scorer(prompts, rollout))
        batch, rollout_metrics, seq_kl = shape_fn(rollout, scores, carry["kl_coef"])
        state, update_metrics = step_fn(state, jax.device_put(batch, batch_shardings))
        kl_coef = controller.update(carry["kl_coef"], jnp.mean(seq_kl), rows)
        return state, update_metrics, rollout_metrics, {"kl_coef": kl_coef}

    result = train_loop(
        config,
        label=label,
        state=state,
        carry={"kl_coef": controller.init()},
        iterate=iterate,
        evaluate=evaluate,
        log_keys=("objective/scores", "objective/kl", "objective/kl_coef", "eval/score", "eval/kl"),
        describe=(
            f"{source}; {config.iterations} iterations x {rows} samples "
            f"({config.batch_size} prompts x {k}), critic {config.critic}, {mesh.size} device(s)"
        ),
    )
    policy_params, _ = algo.params(result.state)
    policy = lm.merge(models.policy_graphdef, jax.device_get(policy_params))
    return _finish(
        config, started, result, _without_value_head(policy, config), algorithm, source, mesh.size
    )


def _finish(config, started, result, policy, algorithm: str, source: str, devices: int) -> dict:
    """The end of a run (:func:`rljax.rl.loop.finish`): the policy exported, ``summary.json``
    (held-out score and KL before and after, the final KL coefficient), the training plot and
    the closing line."""
    evals = [r for r in result.history if "eval/score" in r]
    final, start_eval = experiment.final_eval(evals), experiment.final_eval(evals[:1])
    summary = {
        "algorithm": algorithm,
        "model": started.model_path,
        "reward": config.reward_model or "oracle (built-in task)",
        "prompts": source,
        "iterations": config.iterations,
        "initial_eval": start_eval,
        "final_eval": final,
        "final_kl_coef": float(result.carry["kl_coef"]),
    }
    message = (
        f"held-out score {start_eval['score']:.3f} -> {final['score']:.3f}, "
        f"KL to the reference {final['kl']:.3f} nats"
    )
    return finish(
        config, started, result, policy, devices=devices, summary=summary,
        plot_keys=["objective/scores", "objective/kl", "eval/score", "eval/kl"],
        title=f"{started.label} (critic {config.critic}, KL coef {config.kl_coef})",
        message=message,
    )  # fmt: skip


def _check_run(config) -> str:
    """The algorithm of ``config`` (``"ppo"`` or ``"trpo"``), after the checks a run needs
    before it starts (the reward-model folder exists; one process)."""
    if not hasattr(config, "make_update"):
        raise TypeError(
            f"rljax.rl.rlhf.run: config must be a PPORunConfig or TRPORunConfig, got "
            f"{type(config).__name__}"
        )
    checks.require_folder("--reward-model", config.reward_model, "reward-model folder")
    if jax.process_count() > 1:
        raise ValueError(
            "the RLHF experiments run in one process (any number of local devices via --mesh); "
            "multi-process runs (python -m rljax.launch) are supported by dpo.py and "
            "reward_model.py only"
        )
    return "ppo" if isinstance(config, PPORunConfig) else "trpo"


def _without_value_head(model, config):
    """The policy as a plain causal LM (the value head is training machinery; a LoRA policy's
    is dropped after the merge, by :func:`rljax.experiment.export_model`)."""
    if config.critic != "head" or model.lora is not None:
        return model
    return with_head(model, None, rngs=nnx.Rngs(0), lm_head=True)


def _example_batch(config: RLHFRunConfig, rows: int, max_new: int) -> dict[str, np.ndarray]:
    """Shapes of a shaped rollout batch (for the update's batch shardings)."""
    per_token = ("returns", "old_values") if config.critic != "none" else ()
    return example_batch(
        rows, config.max_prompt_length, max_new, token_advantages=True, per_token=per_token
    )
