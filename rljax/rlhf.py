"""RLHF for language models: reward shaping against a reference policy, KL controllers,
token-level GAE, group-relative advantages, and PPO/TRPO update steps on a policy LM.

The layout follows what :func:`rljax.models.generate.generate` returns: a batch of ``B`` rows,
each a left-padded prompt of ``P`` tokens followed by ``N`` completion tokens, ``tokens`` and
``mask`` ``[B, P + N]`` and ``completion_mask`` ``[B, N]`` (1 up to and including the first
EOS). Every per-token array here (log-probs, KL, rewards, values, advantages) is ``[B, N]``,
entry ``j`` belonging to completion token ``j`` (predicted by the model's output at column
``P - 1 + j``, so a value is that of the state before the token is chosen).

Pure functions (no model): :func:`kl_penalty_rewards`, :func:`penalize_missing_eos`,
:func:`adaptive_kl_coef` and :class:`KLController`, :func:`token_gae`,
:func:`group_advantages`. Update steps: :func:`make_rlhf_ppo_update` (value head on the policy,
a separate critic, or critic-free with group-relative advantages) and
:func:`make_rlhf_trpo_update` (the TRPO engine of :mod:`rljax.trpo` on the policy LM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from rljax import lm, ppo, trpo
from rljax.advantages import gae, whiten
from rljax.logprobs import (
    KL_ESTIMATORS,
    chunked_token_logprobs_and_entropy,
    kl_estimate,
    masked_sum_and_count,
)

__all__ = [
    "CRITICS",
    "KLController",
    "RLHFPPOConfig",
    "adaptive_kl_coef",
    "completion_outputs",
    "group_advantages",
    "init_rlhf_ppo_state",
    "kl_penalty_rewards",
    "last_token_mask",
    "make_rlhf_ppo_update",
    "make_rlhf_trpo_update",
    "penalize_missing_eos",
    "sequence_kl",
    "token_gae",
]

CRITICS = ("head", "separate", "none")


# ------------------------------------------------------------------------------ reward shaping


def last_token_mask(mask: jax.Array) -> jax.Array:
    """``bool [B, N]``: True at the last valid position of each row (none for an empty row)."""
    valid = mask.astype(bool)
    n = valid.shape[-1]
    last = n - 1 - jnp.argmax(valid[..., ::-1], axis=-1)
    return (jnp.arange(n) == last[..., None]) & jnp.any(valid, axis=-1, keepdims=True)


def penalize_missing_eos(
    scores: jax.Array, finished: jax.Array, penalty: float | jax.Array | None
) -> jax.Array:
    """``scores - penalty`` for the rows that did not emit an EOS (TRL's
    ``missing_eos_penalty``); unchanged for ``penalty=None``."""
    chex.assert_equal_shape([scores, finished])
    if penalty is None:
        return scores
    return jnp.where(finished.astype(bool), scores, scores - penalty)


def kl_penalty_rewards(
    scores: jax.Array,
    logps: jax.Array,
    ref_logps: jax.Array,
    mask: jax.Array,
    *,
    kl_coef: float | jax.Array,
    estimator: str = "k1",
) -> tuple[jax.Array, jax.Array]:
    r"""Per-token rewards with a KL penalty against the reference policy.

    Ziegler et al. (2019), arXiv:1909.08593, Eq. 2 (and Stiennon et al., 2020):
    :math:`R(x, y) = r(x, y) - \beta \log(\pi(y|x) / \rho(y|x))`, spread over tokens as TRL
    does: every completion token gets :math:`-\beta\,\mathrm{kl}_t` and the last valid token
    gets the score as well.

    Args:
      scores: ``[B]`` sequence scores (reward model or oracle).
      logps, ref_logps: ``[B, N]`` per-token log-probs of the sampled tokens under the
        sampling policy and the reference.
      mask: ``[B, N]`` completion mask.
      kl_coef: :math:`\beta` (may be traced: an adaptive controller's value).
      estimator: per-token KL estimator, ``"k1"`` (``logp - ref_logp``, TRL's default),
        ``"k2"`` or ``"k3"`` (Schulman, 2020, "Approximating KL divergence").

    Returns:
      ``(rewards [B, N], kl [B, N])``, both 0 at padding.
    """
    chex.assert_rank([scores, logps], [1, 2])
    chex.assert_equal_shape([logps, ref_logps, mask])
    chex.assert_equal_shape_prefix([scores, logps], 1)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} unknown; valid: {list(KL_ESTIMATORS)}")
    valid = mask.astype(bool)
    kl = jnp.where(valid, kl_estimate(logps, ref_logps, estimator), 0.0)
    rewards = -kl_coef * kl
    rewards = rewards + jnp.where(last_token_mask(valid), scores[:, None], 0.0)
    return jnp.where(valid, rewards, 0.0), kl


def adaptive_kl_coef(
    coef: jax.Array,
    kl: jax.Array,
    n_steps: int | jax.Array,
    *,
    target: float,
    horizon: float,
) -> jax.Array:
    r"""One step of the adaptive KL controller of Ziegler et al. (2019), Sec. 2.2:

    .. math:: e = \mathrm{clip}(\mathrm{KL} / \mathrm{KL}_{target} - 1, -0.2, 0.2), \qquad
              \beta \leftarrow \beta (1 + e\, n / \mathrm{horizon})

    with ``kl`` the mean sequence KL of the last batch and ``n_steps`` its number of samples.
    """
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)


@dataclasses.dataclass(frozen=True)
class KLController:
    """The KL coefficient :math:`\\beta`: fixed (``target=None``) or adaptive
    (:func:`adaptive_kl_coef` towards ``target`` nats per sequence).

    ``update(coef, kl, n_steps)`` is pure and jit-able; the coefficient lives in the train
    state, so it is checkpointed with it.
    """

    init_coef: float = 0.05
    target: float | None = None
    horizon: float = 10_000.0

    def __post_init__(self):
        if not self.init_coef >= 0:
            raise ValueError(f"KLController.init_coef must be >= 0, got {self.init_coef}")
        if self.target is not None and not self.target > 0:
            raise ValueError(f"KLController.target must be > 0 or None, got {self.target}")
        if not self.horizon > 0:
            raise ValueError(f"KLController.horizon must be > 0, got {self.horizon}")

    def init(self) -> jax.Array:
        return jnp.asarray(self.init_coef, jnp.float32)

    def update(self, coef: jax.Array, kl: jax.Array, n_steps: int | jax.Array) -> jax.Array:
        if self.target is None:
            return jnp.asarray(coef, jnp.float32)
        return adaptive_kl_coef(
            jnp.asarray(coef, jnp.float32), kl, n_steps, target=self.target, horizon=self.horizon
        ).astype(jnp.float32)


# ------------------------------------------------------------------------------ advantages


def token_gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """GAE over completion tokens (:func:`rljax.advantages.gae`): each row is one episode that
    ends at its last valid token (EOS or the length limit; no bootstrap after it), and padding
    is skipped. ``rewards``, ``values``, ``mask`` are ``[B, N]``; returns ``(advantages,
    returns)``, 0 at padding. TRL's defaults: ``gamma=1``, ``lam=0.95``."""
    chex.assert_equal_shape([rewards, values, mask])
    dones = last_token_mask(mask)
    values = jnp.concatenate([values, jnp.zeros_like(values[:, :1])], axis=1)
    return gae(rewards, values, dones, gamma=gamma, lam=lam, mask=mask)


def group_advantages(
    scores: jax.Array,
    group_size: int,
    *,
    baseline: str = "mean",
    scale: str = "std",
    eps: float = 1e-4,
) -> jax.Array:
    r"""Critic-free sequence advantages from ``group_size`` samples per prompt.

    Rows are grouped contiguously: rows ``g * k .. g * k + k - 1`` share a prompt.

    * ``baseline="mean"``: :math:`A_i = r_i - \bar r` (GRPO, Shao et al., 2024,
      arXiv:2402.03300, Sec. 4.1.2);
    * ``baseline="leave_one_out"``: :math:`A_i = r_i - \frac{1}{k-1}\sum_{j \ne i} r_j`
      (RLOO, Ahmadian et al., 2024, arXiv:2402.14740, Eq. 7);
    * ``scale="std"`` divides by the group's sample standard deviation plus ``eps`` (GRPO,
      TRL's ``scale_rewards="group"``); ``"none"`` keeps the raw difference (Dr. GRPO, RLOO).

    Returns ``[B]`` advantages (broadcast them over the completion tokens).
    """
    chex.assert_rank(scores, 1)
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (a baseline needs other samples), got {group_size}"
        )
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not form groups of group_size={group_size}")
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(f"baseline must be 'mean' or 'leave_one_out', got {baseline!r}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    r = scores.astype(jnp.promote_types(scores.dtype, jnp.float32)).reshape(-1, group_size)
    mean = jnp.mean(r, axis=1, keepdims=True)
    if baseline == "mean":
        adv = r - mean
    else:
        adv = (r - mean) * group_size / (group_size - 1)  # r_i - mean of the others
    if scale == "std":
        adv = adv / (jnp.std(r, axis=1, keepdims=True, ddof=1) + eps)
    return adv.reshape(-1)


# ------------------------------------------------------------------------------ model glue


def completion_outputs(
    graphdef: Any,
    params: Any,
    tokens: jax.Array,
    mask: jax.Array,
    num_completion: int,
    *,
    chunk_size: int = 1024,
    values: bool = False,
) -> dict[str, jax.Array]:
    """One forward pass: per-token log-probs and entropies of the last ``num_completion``
    tokens (``[B, N]``, chunked, no ``[B, N, V]`` float32 logits), and with ``values=True``
    the scalar head at the same positions (the model needs a value head)."""
    model = lm.merge(graphdef, params)
    hidden, _ = model.decode(tokens, mask)
    n = num_completion
    h = hidden[:, -n - 1 : -1]
    logps, entropy = chunked_token_logprobs_and_entropy(
        h, model.unembedding(), tokens[:, -n:], chunk_size=chunk_size
    )
    out = {"logps": logps, "entropy": entropy}
    if values:
        out["values"] = model.scores(h)
    return out


# ------------------------------------------------------------------------------ PPO


@dataclasses.dataclass(frozen=True)
class RLHFPPOConfig:
    """Static settings of :func:`make_rlhf_ppo_update` (defaults follow TRL's PPO trainer).

    Attributes:
      critic: ``"head"`` (a value head on the policy model, one forward pass),
        ``"separate"`` (a critic model of its own) or ``"none"`` (critic-free: the batch's
        advantages are group-relative, no value loss).
      clip_eps: clip range of the probability ratio (TRL ``cliprange``).
      value_clip_eps: clip range of the value update (``cliprange_value``); ``None`` = off.
      value_coef: weight of the value loss (``vf_coef``).
      entropy_coef: weight of the entropy bonus.
      num_epochs: passes over the rollout (``num_ppo_epochs``).
      num_minibatches: minibatches per pass (the rollout's rows must divide evenly).
      normalize_advantages: whiten advantages per minibatch over valid tokens (TRL whitens
        over the whole rollout; use one minibatch for the same).
      target_kl: stop the remaining minibatch steps once the k3 KL to the rollout policy
        exceeds this; ``None`` = never.
      chunk_size: token rows per chunk of the log-prob computation.
    """

    critic: str = "head"
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    num_epochs: int = 4
    num_minibatches: int = 1
    normalize_advantages: bool = True
    target_kl: float | None = None
    chunk_size: int = 1024

    def __post_init__(self):
        if self.critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {self.critic!r}")
        # PPOConfig validates the rest with the same messages.
        ppo.PPOConfig(
            clip_eps=self.clip_eps,
            value_clip_eps=self.value_clip_eps,
            num_epochs=self.num_epochs,
            num_minibatches=self.num_minibatches,
            target_kl=self.target_kl,
        )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


ROLLOUT_KEYS = ("tokens", "mask", "completion_mask", "old_logps", "advantages")


def _check_rollout(batch: dict, keys) -> int:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(
            f"RLHF batch is missing {missing}; it has {sorted(batch)} (tokens/mask [B, P + N], "
            "completion_mask and per-token arrays [B, N])"
        )
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


def init_rlhf_ppo_state(policy_params, optimizer, key: jax.Array, value_params=None):
    """Initial :class:`rljax.ppo.PPOState` of :func:`make_rlhf_ppo_update`: ``params =
    {"policy": ...}`` plus ``"value"`` for a separate critic."""
    params = {"policy": policy_params}
    if value_params is not None:
        params["value"] = value_params
    return ppo.PPOState(params, optimizer.init(params), key, jnp.zeros((), jnp.int32))


def make_rlhf_ppo_update(
    graphdef: Any,
    optimizer,
    config: RLHFPPOConfig = RLHFPPOConfig(),
    value_graphdef: Any = None,
) -> Callable:
    """Build the pure PPO step on a policy LM, ``update(state, batch) -> (state, metrics)``.

    Epochs of shuffled minibatch steps (:func:`rljax.ppo.minibatch_epochs`) on the clipped
    surrogate (Schulman et al., 2017), the clipped value loss and an entropy bonus
    (:func:`rljax.ppo.ppo_loss`), over the tokens of a rollout, as in Ouyang et al. (2022) and
    TRL's PPO trainer. The KL penalty to the reference is in the rewards
    (:func:`kl_penalty_rewards`), hence in the advantages, not in this loss.

    Args:
      graphdef: the policy model (with a value head when ``config.critic == "head"``).
      optimizer: optax transformation over ``state.params``.
      config: :class:`RLHFPPOConfig`.
      value_graphdef: the critic model (value head) for ``config.critic == "separate"``.

    ``batch``: ``tokens``, ``mask`` ``[B, P + N]``; ``completion_mask``, ``old_logps``,
    ``advantages`` ``[B, N]``; with a critic also ``returns`` and ``old_values`` ``[B, N]``.
    State: :func:`init_rlhf_ppo_state`. Metrics (TRL names): ``policy/approxkl_avg``,
    ``policy/clipfrac_avg``, ``policy/entropy_avg``, ``loss/policy_avg``, ``val/ratio``, and
    with a critic ``loss/value_avg``, ``val/clipfrac_avg``, ``val/vpred``; plus ``updates``.
    """
    if not isinstance(config, RLHFPPOConfig):
        raise TypeError(f"config must be an RLHFPPOConfig, got {type(config).__name__}")
    if (config.critic == "separate") != (value_graphdef is not None):
        raise ValueError(
            f"critic={config.critic!r}: pass value_graphdef exactly when critic='separate'"
        )
    with_critic = config.critic != "none"
    keys = ROLLOUT_KEYS + (("returns", "old_values") if with_critic else ())

    def loss_fn(params, mb):
        n = mb["completion_mask"].shape[1]
        out = completion_outputs(
            graphdef,
            params["policy"],
            mb["tokens"],
            mb["mask"],
            n,
            chunk_size=config.chunk_size,
            values=config.critic == "head",
        )
        if config.critic == "separate":
            model = lm.merge(value_graphdef, params["value"])
            hidden, _ = model.decode(mb["tokens"], mb["mask"])
            out["values"] = model.scores(hidden[:, -n - 1 : -1])
        mask = mb["completion_mask"]
        advantages = mb["advantages"]
        if config.normalize_advantages:
            advantages = whiten(advantages, mask)
        if with_critic:
            values, old_values, returns = out["values"], mb["old_values"], mb["returns"]
            value_coef = config.value_coef
        else:  # no critic: a zero value loss keeps one code path
            values = old_values = returns = jnp.zeros_like(out["logps"])
            value_coef = 0.0
        return ppo.ppo_loss(
            out["logps"],
            mb["old_logps"],
            advantages,
            values,
            old_values,
            returns,
            out["entropy"],
            mask,
            clip_eps=config.clip_eps,
            value_clip_eps=config.value_clip_eps,
            value_coef=value_coef,
            entropy_coef=config.entropy_coef,
        )

    names = {
        "policy/approxkl_k3": "policy/approxkl_avg",
        "policy/clipfrac": "policy/clipfrac_avg",
        "policy/entropy": "policy/entropy_avg",
        "policy/ratio": "val/ratio",
        "loss/policy": "loss/policy_avg",
        "loss/value": "loss/value_avg",
        "loss/total": "loss/total",
        "val/clipfrac": "val/clipfrac_avg",
        "val/vpred": "val/vpred",
        "updates": "updates",
        "early_stopped": "early_stopped",
    }
    critic_only = {"loss/value_avg", "val/clipfrac_avg", "val/vpred"}

    def update(state: ppo.PPOState, batch: dict):
        _check_rollout(batch, keys)
        batch = {k: batch[k] for k in keys}
        params, opt_state, key, metrics = ppo.minibatch_epochs(
            loss_fn,
            optimizer,
            state.params,
            state.opt_state,
            state.key,
            batch,
            num_epochs=config.num_epochs,
            num_minibatches=config.num_minibatches,
            target_kl=config.target_kl,
        )
        metrics = {
            names[k]: v
            for k, v in metrics.items()
            if k in names and (with_critic or names[k] not in critic_only)
        }
        return ppo.PPOState(params, opt_state, key, state.step + 1), metrics

    return update


# ------------------------------------------------------------------------------ TRPO


def make_rlhf_trpo_update(
    graphdef: Any,
    value_optimizer,
    config: trpo.TRPOConfig | None = None,
    value_graphdef: Any = None,
) -> Callable:
    """Build the pure TRPO step on a policy LM, ``update(state, batch) -> (state, metrics)``.

    :func:`rljax.trpo.make_trpo_update` with the LM as the categorical policy over completion
    tokens: the natural direction by conjugate gradient on Gauss-Newton Fisher-vector products
    (``jax.jvp`` of the logits, the softmax Fisher, and the transpose back), the step scaled to
    the trust region ``max_kl`` on the mean per-token KL, and a backtracking line search. The
    critic is a separate value-head model (``value_graphdef``) fitted afterwards, or none
    (``value_graphdef=None``: critic-free with group-relative advantages; ``returns`` is then
    not needed and no value fitting runs).

    ``batch``: as :func:`make_rlhf_ppo_update`'s (``returns`` with a critic). The state is a
    :class:`rljax.trpo.TRPOState` (:func:`rljax.trpo.init_trpo_state`; ``value_params={}``
    without a critic). The FVP works on the full ``[B, N, V]`` logits of the completion
    positions, fine for small vocabularies; subsample rows with ``config.fvp_subsample``.
    """
    config = trpo.TRPOConfig() if config is None else config
    if value_graphdef is None and config.n_critic_updates:
        config = dataclasses.replace(config, n_critic_updates=0)

    def policy_fn(params, inputs):
        n = inputs["completion_mask"].shape[1]
        model = lm.merge(graphdef, params)
        hidden, _ = model.decode(inputs["tokens"], inputs["mask"])
        # float32 accumulation, as the chunked log-probs of the rollout (old_logps) use, so
        # the ratio starts at exactly 1 for a bfloat16 model too.
        h = hidden[:, -n - 1 : -1]
        return jnp.einsum(
            "bnd,dv->bnv",
            h,
            model.unembedding(),
            preferred_element_type=jnp.promote_types(h.dtype, jnp.float32),
        )

    def value_fn(params, inputs):
        n = inputs["completion_mask"].shape[1]
        if value_graphdef is None:
            return jnp.zeros(inputs["completion_mask"].shape, jnp.float32)
        model = lm.merge(value_graphdef, params)
        hidden, _ = model.decode(inputs["tokens"], inputs["mask"])
        return model.scores(hidden[:, -n - 1 : -1])

    inner = trpo.make_trpo_update(policy_fn, value_fn, value_optimizer, config)
    keys = ROLLOUT_KEYS + (("returns",) if value_graphdef is not None else ())

    def update(state: trpo.TRPOState, batch: dict):
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
        )

    return update


def sequence_kl(kl: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B]`` sequence KL estimates: the sum of per-token estimates over valid tokens."""
    return masked_sum_and_count(kl, mask, axis=-1)[0]
