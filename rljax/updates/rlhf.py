"""The PPO and TRPO updates on a policy language model (RLHF): one forward pass reads the
completion tokens' log-probs, entropies and values; :func:`make_rlhf_ppo_update` and
:func:`make_rlhf_trpo_update` bind :func:`rljax.ppo.ppo_loss` and the TRPO step to it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rljax.logprobs import (
    chunked_token_logprobs_and_entropy,
)
from rljax.models import lora
from rljax.models.moe import load_balancing_loss
from rljax.rlhf import (
    CRITICS,
)
from rljax.updates import lm
from rljax.updates.common import (
    check_config,
    check_router_aux_loss_coef,
    require_keys,
    traced_config,
)
from rljax.updates.ppo import PPOConfig, PPOState, config_ppo_loss, epochs_step, loop_settings
from rljax.updates.trpo import TRPOConfig, _trpo_update

__all__ = [
    "ROLLOUT_KEYS",
    "completion_outputs",
    "init_rlhf_ppo_state",
    "make_rlhf_ppo_update",
    "make_rlhf_trpo_update",
]


def completion_outputs(
    graphdef: Any,
    params: Any,
    tokens: jax.Array,
    mask: jax.Array,
    num_completion: int,
    *,
    chunk_size: int = 1024,
    values: bool = False,
    router_aux_loss: bool = False,
) -> dict[str, jax.Array]:
    """One forward pass: per-token log-probs and entropies of the last ``num_completion``
    tokens (``[B, N]``, chunked, no ``[B, N, V]`` float32 logits), with ``values=True`` the
    scalar head at the same positions (the model needs a value head), and with
    ``router_aux_loss=True`` (a mixture-of-experts model) ``"router_aux_loss"``, the
    load-balancing loss of the pass over every real token, prompt and completion
    (:func:`rljax.models.moe.load_balancing_loss`)."""
    model = lm.merge(graphdef, params)
    decoded = model.decode(tokens, mask, return_router_logits=router_aux_loss)
    hidden = decoded[0]
    n = num_completion
    h = hidden[:, -n - 1 : -1]
    logps, entropy = chunked_token_logprobs_and_entropy(
        h,
        model.unembedding(),
        tokens[:, -n:],
        chunk_size=chunk_size,
        softcap=model.config.final_logit_softcap,
    )
    out = {"logps": logps, "entropy": entropy}
    if values:
        out["values"] = model.scores(h)
    if router_aux_loss:
        top_k = model.config.num_experts_per_tok
        out["router_aux_loss"] = load_balancing_loss(decoded[2], top_k, mask)
    return out


# ------------------------------------------------------------------------------ PPO


# TRL's PPO trainer's defaults (vf_coef 0.1, one minibatch); the other fields are PPOConfig's.
_RLHF_PPO = PPOConfig(value_coef=0.1, num_minibatches=1)

ROLLOUT_KEYS = ("tokens", "mask", "completion_mask", "old_logps", "advantages")


def _check_rollout(batch: dict, keys) -> int:
    hint = "tokens/mask [B, P + N], completion_mask and per-token arrays [B, N]"
    require_keys(batch, keys, "RLHF", hint)
    b, n = batch["completion_mask"].shape
    if batch["tokens"].shape[0] != b or batch["tokens"].shape[1] <= n:
        raise ValueError(
            f"tokens {batch['tokens'].shape} must be [B, P + N] with P >= 1 for "
            f"completion_mask {batch['completion_mask'].shape}"
        )
    for k in keys[3:]:
        if batch[k].shape != (b, n):
            raise ValueError(f"RLHF batch {k!r} has shape {batch[k].shape}, expected {(b, n)}")
    return n


def check_critic(critic: str, value_graphdef: Any, where: str) -> None:
    """``ValueError`` (naming ``where``) unless ``critic`` is one of ``rljax.rlhf.CRITICS`` and
    ``value_graphdef`` is given exactly for ``critic="separate"``."""
    if critic not in CRITICS:
        raise ValueError(f"{where}: critic must be one of {CRITICS}, got {critic!r}")
    if (critic == "separate") != (value_graphdef is not None):
        raise ValueError(
            f"{where}: critic={critic!r}: pass value_graphdef exactly when critic='separate'"
        )


def init_rlhf_ppo_state(policy_params, optimizer, key: jax.Array, value_params=None):
    """Initial :class:`rljax.ppo.PPOState` of :func:`make_rlhf_ppo_update`: ``params =
    {"policy": ...}`` plus ``"value"`` for a separate critic."""
    params = {"policy": policy_params}
    if value_params is not None:
        params["value"] = value_params
    step, skipped = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers: donated
    return PPOState(params, optimizer.init(lora.trainable(params)), key, step, skipped)


def make_rlhf_ppo_update(
    graphdef: Any,
    optimizer,
    config: PPOConfig = _RLHF_PPO,
    value_graphdef: Any = None,
    *,
    critic: str = "head",
    chunk_size: int = 1024,
    router_aux_loss_coef: float = 0.0,
) -> Callable:
    """Build the pure PPO step on a policy LM, ``update(state, batch, hyperparams=None) ->
    (state, metrics)``.

    Epochs of shuffled minibatch steps (:func:`rljax.ppo.minibatch_epochs`) on the clipped
    surrogate (Schulman et al., 2017), the clipped value loss and an entropy bonus
    (:func:`rljax.ppo.ppo_loss`), over the tokens of a rollout, as in Ouyang et al. (2022) and
    TRL's PPO trainer. The KL penalty to the reference is in the rewards
    (:func:`kl_penalty_rewards`), hence in the advantages, not in this loss.

    Args:
      graphdef: the policy model (with a value head when ``critic == "head"``).
      optimizer: optax transformation over ``state.params``.
      config: the PPO settings, :class:`rljax.ppo.PPOConfig` (every field is read; the
        default is TRL's PPO trainer's: ``value_coef=0.1``, one minibatch). With
        ``critic="none"`` the advantages are group-relative and ``normalize_advantages`` whitens
        them again per minibatch over tokens (usually unwanted: it shifts each group's baseline
        by its completion lengths).
      value_graphdef: the critic model (value head) for ``critic == "separate"``.
      critic: ``"head"`` (a value head on the policy model, one forward pass),
        ``"separate"`` (a critic model of its own) or ``"none"`` (critic-free: no value loss;
        ``value_coef`` and ``value_clip_eps`` are then not read).
      chunk_size: token rows per chunk of the log-prob computation.
      router_aux_loss_coef: weight of a mixture-of-experts policy's load-balancing loss
        (:func:`rljax.models.moe.load_balancing_loss` over every real token of the policy's
        forward pass) added to each minibatch's loss (``loss/total``) and reported as
        ``router_aux_loss``; 0 (the default, as :class:`rljax.updates.SFTConfig`'s) leaves it
        out. Static; a model without experts refuses it.

    ``batch``: ``tokens``, ``mask`` ``[B, P + N]``; ``completion_mask``, ``old_logps``,
    ``advantages`` ``[B, N]``; with a critic also ``returns`` and ``old_values`` ``[B, N]``.
    State: :func:`init_rlhf_ppo_state`. Metrics (TRL names): ``policy/approxkl_avg``,
    ``policy/clipfrac_avg``, ``policy/entropy_avg``, ``loss/policy_avg``, ``val/ratio``, and
    with a critic ``loss/value_avg``, ``val/clipfrac_avg``, ``val/vpred``; plus ``updates``,
    ``nonfinite`` and ``nonfinite_updates`` (non-finite minibatch steps are skipped:
    :func:`rljax.ppo.minibatch_epochs`).

    ``hyperparams``: coefficient overrides traced under jit, as for
    :func:`rljax.updates.make_ppo_update` (``config.traced_coefficients()``; with
    ``critic="none"`` not ``value_coef`` / ``value_clip_eps``, which no value loss reads).
    """
    check_config(config, PPOConfig, "make_rlhf_ppo_update")
    check_critic(critic, value_graphdef, "make_rlhf_ppo_update")
    if chunk_size < 1:
        raise ValueError(f"make_rlhf_ppo_update: chunk_size must be >= 1, got {chunk_size}")
    aux_coef = check_router_aux_loss_coef(
        router_aux_loss_coef, "make_rlhf_ppo_update: router_aux_loss_coef"
    )
    with_critic = critic != "none"
    keys = ROLLOUT_KEYS + (("returns", "old_values") if with_critic else ())
    loss_fn = _ppo_token_loss(graphdef, value_graphdef, critic, chunk_size, aux_coef)
    names = {k: v for k, v in TRL_PPO_METRICS.items() if with_critic or v not in _CRITIC_METRICS}
    allowed, reasons = config.traced_coefficients(), {}
    if not with_critic:  # no value loss: its coefficients are not read
        reasons = dict.fromkeys(_VALUE_COEFFICIENTS, "critic='none' has no value loss")
        allowed = tuple(k for k in allowed if k not in _VALUE_COEFFICIENTS)

    def update(state: PPOState, batch: dict, hyperparams: Mapping[str, Any] | None = None):
        _check_rollout(batch, keys)
        batch = {k: batch[k] for k in keys}
        traced = traced_config(
            config, hyperparams, where="make_rlhf_ppo_update", allowed=allowed, reasons=reasons
        )
        loss = functools.partial(loss_fn, traced)
        new_state, metrics = epochs_step(loss, optimizer, state, batch, **loop_settings(traced))
        return new_state, {names[k]: v for k, v in metrics.items() if k in names}

    return update


# rljax.ppo.ppo_loss's metric names -> TRL's PPO trainer's (the RLHF logs use TRL's names).
TRL_PPO_METRICS = {
    "policy/approxkl_k3": "policy/approxkl_avg",
    "policy/clipfrac": "policy/clipfrac_avg",
    "policy/entropy": "policy/entropy_avg",
    "policy/ratio": "val/ratio",
    "loss/policy": "loss/policy_avg",
    "loss/value": "loss/value_avg",
    "loss/total": "loss/total",
    "router_aux_loss": "router_aux_loss",
    "val/clipfrac": "val/clipfrac_avg",
    "val/vpred": "val/vpred",
    "updates": "updates",
    "early_stopped": "early_stopped",
    "nonfinite": "nonfinite",
    "nonfinite_updates": "nonfinite_updates",
}
_CRITIC_METRICS = {"loss/value_avg", "val/clipfrac_avg", "val/vpred"}
_VALUE_COEFFICIENTS = ("value_coef", "value_clip_eps")


def _ppo_token_loss(
    graphdef, value_graphdef, critic: str, chunk_size: int, router_aux_loss_coef: float = 0.0
):
    """``loss_fn(config, params, minibatch) -> (loss, metrics)``: :func:`rljax.ppo.ppo_loss`
    over the completion tokens (:func:`rljax.updates.ppo.config_ppo_loss`), with log-probs,
    entropies and (critic head or separate) values from one forward pass of each model;
    critic none has a zero value loss (one code path). With ``router_aux_loss_coef > 0`` the
    policy's load-balancing loss times it is added (``loss/total``, ``router_aux_loss``)."""

    def loss_fn(config: PPOConfig, params, mb):
        n = mb["completion_mask"].shape[1]
        out = completion_outputs(
            graphdef,
            params["policy"],
            mb["tokens"],
            mb["mask"],
            n,
            chunk_size=chunk_size,
            values=critic == "head",
            router_aux_loss=router_aux_loss_coef > 0,
        )
        if critic == "separate":
            model = lm.merge(value_graphdef, params["value"])
            hidden, _ = model.decode(mb["tokens"], mb["mask"])
            out["values"] = model.scores(hidden[:, -n - 1 : -1])
        loss, metrics = config_ppo_loss(
            config,
            out["logps"],
            out["entropy"],
            out.get("values"),
            mb,
            mb["completion_mask"],
            critic=critic != "none",
        )
        if "router_aux_loss" in out:
            loss = loss + router_aux_loss_coef * out["router_aux_loss"]
            aux = out["router_aux_loss"]
            metrics = {**metrics, "loss/total": jax.lax.stop_gradient(loss), "router_aux_loss": aux}
        return loss, metrics

    return loss_fn


# ------------------------------------------------------------------------------ TRPO


def make_rlhf_trpo_update(
    graphdef: Any,
    value_optimizer,
    config: TRPOConfig | None = None,
    value_graphdef: Any = None,
) -> Callable:
    """Build the pure TRPO step on a policy LM, ``update(state, batch, hyperparams=None) ->
    (state, metrics)``.

    :func:`rljax.trpo.make_trpo_update` with the LM as the categorical policy over completion
    tokens: the natural direction by conjugate gradient on Gauss-Newton Fisher-vector products
    (``jax.jvp`` of the logits, the softmax Fisher, and the transpose back), the step scaled to
    the trust region ``max_kl`` on the mean per-token KL, and a backtracking line search. The
    critic is a separate value-head model (``value_graphdef``) fitted afterwards, or none
    (``value_graphdef=None``: critic-free with group-relative advantages; ``returns`` is then
    not needed and no value fitting runs).

    ``batch``: as :func:`make_rlhf_ppo_update`'s (``returns`` with a critic). The state is a
    :class:`rljax.updates.PPOState` (:func:`rljax.updates.init_trpo_state`; ``value_params={}``
    without a critic). The FVP works on the full ``[B, N, V]`` logits of the completion
    positions, fine for small vocabularies; subsample rows with ``config.fvp_subsample``.
    ``hyperparams``: coefficient overrides (``max_kl``, ``cg_damping``, ``cg_tol``,
    ``backtrack_coeff``) traced under jit, as for :func:`rljax.updates.make_trpo_update`.
    """
    config = TRPOConfig() if config is None else config
    check_config(config, TRPOConfig, "make_rlhf_trpo_update")
    if value_graphdef is None and config.n_critic_updates:
        config = dataclasses.replace(config, n_critic_updates=0)

    def policy_fn(params, inputs):
        n = inputs["completion_mask"].shape[1]
        model = lm.merge(graphdef, params)
        hidden, _ = model.decode(inputs["tokens"], inputs["mask"])
        # float32 accumulation, as the chunked log-probs of the rollout (old_logps) use, so
        # the ratio starts at exactly 1 for a bfloat16 model too.
        h = hidden[:, -n - 1 : -1]
        logits = jnp.einsum(
            "bnd,dv->bnv",
            h,
            model.unembedding(),
            preferred_element_type=jnp.promote_types(h.dtype, jnp.float32),
        )
        cap = model.config.final_logit_softcap  # Gemma 2's soft-capped logits
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def value_fn(params, inputs):
        n = inputs["completion_mask"].shape[1]
        if value_graphdef is None:
            return jnp.zeros(inputs["completion_mask"].shape, jnp.float32)
        model = lm.merge(value_graphdef, params)
        hidden, _ = model.decode(inputs["tokens"], inputs["mask"])
        return model.scores(hidden[:, -n - 1 : -1])

    inner = _trpo_update(
        policy_fn, value_fn, value_optimizer, config, where="make_rlhf_trpo_update"
    )
    keys = ROLLOUT_KEYS + (("returns",) if value_graphdef is not None else ())

    def update(state: PPOState, batch: dict, hyperparams: Mapping[str, Any] | None = None):
        _check_rollout(batch, keys)
        inputs = {k: batch[k] for k in ("tokens", "mask", "completion_mask")}
        mask = batch["completion_mask"]
        returns = batch.get("returns", jnp.zeros(mask.shape, jnp.float32))
        return inner(
            state,
            {
                "inputs": inputs,
                "actions": batch["tokens"][:, -mask.shape[1] :],
                "advantages": batch["advantages"],
                "returns": returns,
                "mask": mask.astype(jnp.float32),
                "old_logps": batch["old_logps"],
            },
            hyperparams,
        )

    return update
