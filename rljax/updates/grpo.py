"""The GRPO family's update step on a policy language model (critic-free RL on verifiable or
learned rewards): :class:`GRPOConfig` and :func:`make_grpo_update`.

The loss is :func:`rljax.rlhf.policy_loss` (GRPO, BNPO, Dr. GRPO, DAPO, CISPO; token-level or
GSPO's sequence-level ratios; clip-higher; an optional k3 KL to the reference in the loss), as
TRL 1.16's GRPOTrainer defines it. Advantages are per sequence and come with the batch
(:func:`rljax.advantages.group_advantages`), optionally multiplied per token by truncated
importance weights between the sampler and the trainer (:func:`rljax.advantages.
truncated_importance_weights`): because every weight is >= 0, scaling the advantage of a token
scales its clipped surrogate by the same factor (``min(w r A, w clip(r) A) = w min(r A,
clip(r) A)``), which is TRL's ``per_token_loss * importance_sampling_ratio``.

Shape convention (as :mod:`rljax.rlhf`): ``tokens``, ``mask`` ``[B, P + N]`` (left-padded
prompt, then the completion), per-token arrays ``[B, N]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from rljax import rlhf
from rljax.updates.common import (
    check_config,
    check_router_aux_loss_coef,
    fields_of,
    require_keys,
)
from rljax.updates.ppo import PPOState, epochs_step, loop_settings
from rljax.updates.rlhf import completion_outputs, init_rlhf_ppo_state

__all__ = ["GRPOConfig", "init_grpo_state", "make_grpo_update"]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Settings of the GRPO-family update (TRL 1.16 GRPOConfig names in brackets).

    Attributes:
      loss_type: grpo, bnpo, dr_grpo, dapo, cispo or luspo (``loss_type``; default dapo as
        TRL's).
      importance_sampling_level: token (GRPO) or sequence (GSPO) ratios.
      clip_eps: lower clip range of the ratio (``epsilon``).
      clip_eps_high: upper clip range (``epsilon_high``, DAPO's clip-higher; CISPO's cap of
        the ratio); none = clip_eps.
      beta: weight of the k3 KL to the reference in the loss (``beta``; 0 = no reference
        forward in the update).
      num_epochs: passes of the optimizer over each batch of samples (``num_iterations``; 1 =
        exactly on-policy).
      num_minibatches: optimizer steps per pass (the batch's rows must divide evenly).
      chunk_size: token rows per chunk of the log-prob computation.
      router_aux_loss_coef: weight of a mixture-of-experts policy's load-balancing loss
        (:func:`rljax.models.moe.load_balancing_loss` over every real token of the policy's
        forward pass, prompt and completion) added to each minibatch's loss and reported as
        ``router_aux_loss``; 0 (the default, as :class:`rljax.updates.SFTConfig`'s) leaves it
        out. Static; a model without experts refuses it.
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    beta: float = 0.0
    num_epochs: int = 1
    num_minibatches: int = 1
    chunk_size: int = 1024
    router_aux_loss_coef: float = 0.0

    def __post_init__(self):
        def fail(field, problem):
            raise ValueError(f"--{field.replace('_', '-')}: {problem}")

        if self.loss_type not in rlhf.POLICY_LOSS_TYPES:
            fail("loss_type", f"must be one of {rlhf.POLICY_LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in ("token", "sequence"):
            fail(
                "importance_sampling_level",
                f"must be token or sequence, got {self.importance_sampling_level!r}",
            )
        if not self.clip_eps > 0:
            fail("clip_eps", f"must be > 0, got {self.clip_eps}")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0:
            fail("clip_eps_high", f"must be > 0 or none, got {self.clip_eps_high}")
        if self.loss_type == "cispo" and self.clip_eps_high is None:
            fail(
                "clip_eps_high",
                "cispo caps the ratio at clip_eps_high (ScaleRL's epsilon_max, e.g. 5.0): set it",
            )
        if not self.beta >= 0:
            fail("beta", f"must be >= 0, got {self.beta}")
        for field in ("num_epochs", "num_minibatches", "chunk_size"):
            if getattr(self, field) < 1:
                fail(field, f"must be >= 1, got {getattr(self, field)}")
        check_router_aux_loss_coef(self.router_aux_loss_coef, "--router-aux-loss-coef")


KEYS = ("tokens", "mask", "completion_mask", "old_logps", "advantages")


def init_grpo_state(policy_params, optimizer, key) -> PPOState:
    """The train state of :func:`make_grpo_update`: the policy-gradient family's
    :class:`rljax.ppo.PPOState` with ``params = {"policy": ...}``."""
    return init_rlhf_ppo_state(policy_params, optimizer, key)


def _check_batch(batch: dict, config: GRPOConfig) -> None:
    hint = (
        "tokens/mask [B, P + N], completion_mask/old_logps [B, N], advantages [B], ref_logps "
        "[B, N] when beta > 0"
    )
    require_keys(batch, KEYS + (("ref_logps",) if config.beta > 0 else ()), "GRPO", hint)
    if "ref_logps" in batch and config.beta == 0:
        raise ValueError("GRPO batch has ref_logps but beta is 0: the loss would not read them")
    b, n = batch["completion_mask"].shape
    if batch["tokens"].shape[0] != b or batch["tokens"].shape[1] <= n:
        raise ValueError(
            f"tokens {batch['tokens'].shape} must be [B, P + N] with P >= 1 for "
            f"completion_mask {batch['completion_mask'].shape}"
        )
    expected = {"old_logps": (b, n), "advantages": (b,), "ref_logps": (b, n), "is_weights": (b, n)}
    for key, shape in expected.items():
        if key in batch and batch[key].shape != shape:
            raise ValueError(f"GRPO batch {key!r} has shape {batch[key].shape}, expected {shape}")


def make_grpo_update(graphdef: Any, optimizer, config: GRPOConfig = GRPOConfig()) -> Callable:
    """Build the pure step ``update(state, batch) -> (state, metrics)`` of the GRPO family.

    ``config.num_epochs`` passes of ``config.num_minibatches`` optimizer steps
    (:func:`rljax.ppo.minibatch_epochs`) on :func:`rljax.rlhf.policy_loss` over the sampled
    completions. ``dr_grpo`` normalises by ``B * N`` with ``N`` the batch's completion width
    (TRL's ``max_completion_length``); ``dapo``/``cispo`` by the minibatch's token count (the
    batch is one global array, so that count is global over devices).

    ``batch``: ``tokens``, ``mask`` ``[B, P + N]``; ``completion_mask``, ``old_logps``
    ``[B, N]`` (the trainer's log-probs of the samples at sampling time); ``advantages``
    ``[B]``; ``ref_logps`` ``[B, N]`` exactly when ``config.beta > 0``; optional
    ``is_weights`` ``[B, N]`` (truncated importance weights, applied per token). State:
    :func:`init_grpo_state`. Metrics: the loss's (clip fractions, ratio statistics, KL),
    ``policy/entropy``, with ``config.router_aux_loss_coef > 0`` ``router_aux_loss`` and
    ``loss`` (the policy loss ``loss/policy`` plus the weighted load-balancing loss),
    ``updates`` (optimizer steps applied), ``nonfinite`` (1 when a minibatch step had a NaN/inf
    loss, gradient or result: that step is skipped, parameters and optimizer state unchanged)
    and ``nonfinite_updates`` (the running count of such updates).
    """
    check_config(config, GRPOConfig, "make_grpo_update")
    router_aux_loss = config.router_aux_loss_coef > 0

    def loss_fn(params, mb):
        mask = mb["completion_mask"]
        n = mask.shape[1]
        out = completion_outputs(
            graphdef,
            params["policy"],
            mb["tokens"],
            mb["mask"],
            n,
            chunk_size=config.chunk_size,
            router_aux_loss=router_aux_loss,
        )
        advantages = mb["advantages"]
        if "is_weights" in mb:
            advantages = advantages[:, None] * mb["is_weights"]
        loss, metrics = rlhf.policy_loss(
            out["logps"],
            mb["old_logps"],
            advantages,
            mask,
            ref_logps=mb.get("ref_logps"),
            max_completion_len=n if config.loss_type == "dr_grpo" else None,
            **fields_of(
                config,
                "loss_type",
                "importance_sampling_level",
                "clip_eps",
                "clip_eps_high",
                "beta",
            ),
        )
        valid = mask.astype(out["entropy"].dtype)
        entropy = jnp.sum(out["entropy"] * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        metrics = {**metrics, "loss/policy": loss, "policy/entropy": entropy}
        if router_aux_loss:
            loss = loss + config.router_aux_loss_coef * out["router_aux_loss"]
            metrics = {**metrics, "loss": loss, "router_aux_loss": out["router_aux_loss"]}
        return loss, metrics

    def update(state: PPOState, batch: dict):
        _check_batch(batch, config)
        new_state, metrics = epochs_step(loss_fn, optimizer, state, batch, **loop_settings(config))
        return new_state, {k: v for k, v in metrics.items() if k != "early_stopped"}

    return update
