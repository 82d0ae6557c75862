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

import chex
import jax
import jax.numpy as jnp

from rljax.advantages import gae
from rljax.logprobs import (
    KL_ESTIMATORS,
    kl_estimate,
    masked_sum_and_count,
)

__all__ = [
    "CRITICS",
    "IMPORTANCE_SAMPLING_LEVELS",
    "POLICY_LOSS_TYPES",
    "KLController",
    "adaptive_kl_coef",
    "group_advantages",
    "kl_penalty_rewards",
    "last_token_mask",
    "penalize_missing_eos",
    "policy_loss",
    "sequence_kl",
    "token_gae",
]

CRITICS = ("head", "separate", "none")


# ------------------------------------------------------------------------------ policy loss
# The GRPO family's policy loss as TRL 1.16 GRPOTrainer._compute_loss defines it. One
# per-token objective per kind of ratio use, one aggregation per loss type, one dispatcher.


def _clipped_objective(ratio, advantages, logps, clip_eps, clip_eps_high):
    """``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` (PPO's clipped surrogate)."""
    del logps
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
    return -jnp.minimum(ratio * advantages, clipped * advantages)


def _cispo_objective(ratio, advantages, logps, clip_eps, clip_eps_high):
    """``-sg(min(r, eps_max)) A logp`` (CISPO: the weight is clipped, never the gradient)."""
    del clip_eps
    return -jax.lax.stop_gradient(jnp.minimum(ratio, clip_eps_high)) * advantages * logps


def _sequence_mean_then_batch_mean(loss_sum_b, count_b, max_completion_len, num_items):
    del max_completion_len, num_items
    return jnp.mean(loss_sum_b / jnp.maximum(count_b, 1.0))


def _token_mean(loss_sum_b, count_b, max_completion_len, num_items):
    del max_completion_len, num_items
    return jnp.sum(loss_sum_b) / jnp.maximum(jnp.sum(count_b), 1.0)


def _constant_normaliser(loss_sum_b, count_b, max_completion_len, num_items):
    del count_b, num_items
    return jnp.sum(loss_sum_b) / (loss_sum_b.shape[0] * max_completion_len)


def _global_token_mean(loss_sum_b, count_b, max_completion_len, num_items):
    del max_completion_len
    total = jnp.sum(count_b) if num_items is None else num_items
    return jnp.sum(loss_sum_b) / jnp.maximum(total, 1.0)


def _sequence_sum_then_batch_mean(loss_sum_b, count_b, max_completion_len, num_items):
    del count_b, max_completion_len, num_items
    return jnp.mean(loss_sum_b)


# loss_type -> (per-token objective, aggregation of the masked per-row sums and counts,
# optional arguments that this type reads).
_POLICY_LOSSES = {
    "grpo": (_clipped_objective, _sequence_mean_then_batch_mean, ()),
    "bnpo": (_clipped_objective, _token_mean, ()),
    "dr_grpo": (_clipped_objective, _constant_normaliser, ("max_completion_len",)),
    "dapo": (_clipped_objective, _global_token_mean, ("num_items",)),
    "cispo": (_cispo_objective, _global_token_mean, ("num_items",)),
    "luspo": (_clipped_objective, _sequence_sum_then_batch_mean, ()),
}
POLICY_LOSS_TYPES = tuple(_POLICY_LOSSES)
r"""The ``loss_type`` values of :func:`policy_loss`, which aggregates the masked per-row sums
:math:`S_i = \sum_t m_{i,t} \ell_{i,t}` and counts :math:`n_i = \sum_t m_{i,t}` as:

- ``grpo`` (Shao et al. 2024, arXiv:2402.03300): :math:`\frac1B \sum_i S_i / \max(1, n_i)`.
- ``bnpo``: :math:`\sum_i S_i / \max(1, \sum_i n_i)` (token mean of this batch).
- ``dr_grpo`` (Liu et al. 2025, arXiv:2503.20783): :math:`\sum_i S_i / (B \cdot L)`,
  :math:`L` = ``max_completion_len`` (required: TRL uses its ``max_completion_length``
  setting, default 512, never the padded width ``T``).
- ``dapo`` (Yu et al. 2025, arXiv:2503.14476): :math:`\sum_i S_i / \max(1, N)`, :math:`N`
  = ``num_items``, the valid-token count of the whole optimizer step (all devices and
  accumulation steps; TRL's ``num_items_in_batch``); ``None`` = this batch's count, which
  makes it equal to ``bnpo``.
- ``cispo`` (MiniMax-M1, arXiv:2506.13585; :math:`\epsilon_{max}` as in ScaleRL,
  arXiv:2510.13786): aggregated like ``dapo``.
- ``luspo`` (LUSPO, arXiv:2602.05261): :math:`\frac1B \sum_i S_i` (GSPO with each
  sequence's loss scaled by its length; meant for ``importance_sampling_level="sequence"``).

The loss is TRL's before its division by the gradient-accumulation step count (what TRL
logs as ``policy_loss``); with ``dapo``/``cispo`` TRL's normaliser
``num_items_in_batch / num_processes`` under a data-parallel gradient mean is ``num_items``
here, since :func:`policy_loss` sees the global batch. Not covered: TRL's ``delta`` (two-sided
clipping), ``use_bias_correction_kl``, ``off_policy_mask_threshold``, the entropy mask and
bonus, the vLLM importance-sampling correction (multiply ``advantages`` by the weights),
and the ``sapo``/``vespo`` loss types."""
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _is_number_zero(x) -> bool:
    """True for a concrete 0 (Python number or concrete array); False when traced."""
    try:
        return float(x) == 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False


def _check_policy_loss_args(
    loss_type, importance_sampling_level, optional, clip_eps_high, ref_logps, beta
):
    if loss_type not in _POLICY_LOSSES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {POLICY_LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level {importance_sampling_level!r} is not one of "
            f"{IMPORTANCE_SAMPLING_LEVELS}"
        )
    reads = _POLICY_LOSSES[loss_type][2]
    for name, value in optional.items():
        if value is not None and name not in reads:
            readers = [t for t, (_, _, r) in _POLICY_LOSSES.items() if name in r]
            raise ValueError(
                f"{name} is given but loss_type {loss_type!r} does not read it (only "
                f"{readers} do); pass {name}=None"
            )
    if loss_type == "dr_grpo" and optional["max_completion_len"] is None:
        raise ValueError(
            "loss_type 'dr_grpo' divides by batch * max_completion_len; pass max_completion_len "
            "(TRL's max_completion_length, the generation limit; not inferred from the width)"
        )
    if loss_type == "cispo" and clip_eps_high is None:
        raise ValueError(
            "loss_type 'cispo' caps the ratio itself at clip_eps_high (ScaleRL's epsilon_max, "
            "recommended 5.0); pass it. TRL would fall back to epsilon (0.2), capping every "
            "ratio near 1 at 0.2"
        )
    if ref_logps is None and not _is_number_zero(beta):
        raise ValueError(
            "beta is not the number 0 (or is traced), so the KL term needs ref_logps [B, T] "
            "(log-probs of the reference policy); pass ref_logps, or beta=0.0"
        )


def _policy_loss_metrics(ratio_b1_or_bt, advantages, kl, valid, loss_type, eps_low, eps_high):
    r"""TRL 1.16's logged statistics of :func:`policy_loss` (local to this batch), gradient-free.

    ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``: the fraction
    of valid tokens (or of rows, for sequence-level ratios with ``[B]`` advantages) where the
    ratio is below :math:`1-\epsilon_{low}` with :math:`A<0`, above :math:`1+\epsilon_{high}`
    with :math:`A>0`, or either; ``clip_ratio/low_min`` / ``clip_ratio/high_max``: min / max
    over rows of the per-row fraction (0 where TRL gives nan for a batch with no valid token).
    For ``cispo`` instead ``cispo_clip_ratio``: the ratio above :math:`\epsilon_{max}` with
    :math:`A>0`. ``kl``: mean k3 over valid tokens (when ``kl`` is given). ``policy/ratio``,
    ``policy/ratio_min``, ``policy/ratio_max``: over valid tokens, a sequence's ratio counted
    once per token (0 with no valid token). ``count``: valid tokens.
    """
    ratio = jax.lax.stop_gradient(ratio_b1_or_bt)
    kl = None if kl is None else jax.lax.stop_gradient(kl)
    m = valid.astype(ratio.dtype)
    count = jnp.sum(m)

    def token_mean(x):  # TRL's global_masked_mean
        if x.shape[1] == 1:  # one value per sequence (sequence level, [B] advantages)
            return jnp.mean(x[:, 0])
        return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(count, 1.0)

    def row_values(x):  # TRL's masked_seq_mean, with rows that have no token dropped
        if x.shape[1] == 1:
            return x[:, 0], jnp.ones(x.shape[0], bool)
        row_count = jnp.sum(m, axis=-1)
        row_sum = jnp.sum(jnp.where(valid, x, 0.0), axis=-1)
        return row_sum / jnp.maximum(row_count, 1.0), row_count > 0

    def extreme(values, keep, reduce, fill):
        return jnp.where(jnp.any(keep), reduce(jnp.where(keep, values, fill)), 0.0)

    ratio_bt = jnp.broadcast_to(ratio, valid.shape)
    metrics = {
        "policy/ratio": jnp.sum(jnp.where(valid, ratio_bt, 0.0)) / jnp.maximum(count, 1.0),
        "policy/ratio_min": extreme(ratio_bt, valid, jnp.min, jnp.inf),
        "policy/ratio_max": extreme(ratio_bt, valid, jnp.max, -jnp.inf),
        "count": count,
    }
    if kl is not None:
        metrics["kl"] = jnp.sum(jnp.where(valid, kl, 0.0)) / jnp.maximum(count, 1.0)
    if loss_type == "cispo":
        clipped = ((ratio > eps_high) & (advantages > 0)).astype(ratio.dtype)
        metrics["cispo_clip_ratio"] = token_mean(clipped)
        return metrics
    low = ((ratio < 1.0 - eps_low) & (advantages < 0)).astype(ratio.dtype)
    high = ((ratio > 1.0 + eps_high) & (advantages > 0)).astype(ratio.dtype)
    region = jnp.maximum(low, high)
    low_rows, low_keep = row_values(low)
    high_rows, high_keep = row_values(high)
    metrics |= {
        "clip_ratio/low_mean": token_mean(low),
        "clip_ratio/high_mean": token_mean(high),
        "clip_ratio/region_mean": token_mean(region),
        "clip_ratio/low_min": extreme(low_rows, low_keep, jnp.min, jnp.inf),
        "clip_ratio/high_max": extreme(high_rows, high_keep, jnp.max, -jnp.inf),
    }
    return metrics


def _check_policy_loss_shapes(logps, old_logps, advantages, mask, ref_logps) -> None:
    """Trace-time shape checks of :func:`policy_loss`'s arrays."""
    chex.assert_rank([logps, old_logps, mask], 2)
    chex.assert_equal_shape([logps, old_logps, mask])
    chex.assert_type([logps, old_logps], float)
    chex.assert_rank(advantages, {1, 2})
    chex.assert_shape(advantages, logps.shape[: advantages.ndim])
    if ref_logps is not None:
        chex.assert_equal_shape([logps, ref_logps])


def _k3(logps, ref_logps, valid):
    """Schulman's k3 estimate of KL(pi || pi_ref) per token, 0 at masked positions; the
    reference carries no gradient."""
    ref_minus = jnp.where(valid, jax.lax.stop_gradient(ref_logps) - logps, 0.0)
    return jnp.exp(ref_minus) - ref_minus - 1.0


def _ratio_and_advantages(logps, old_logps, advantages, valid, count_b, level):
    """``(ratio, advantages, raw_advantages)`` of :func:`policy_loss`: the importance ratio
    (``[B, T]``, or ``[B, 1]`` at the sequence level: the exp of the row's mean log-ratio), the
    advantages with masked tokens (or empty rows) zeroed, and the unmasked advantages the
    metrics' flags see; ``[B]`` advantages act as ``[B, 1]``, as in TRL."""
    sg = jax.lax.stop_gradient
    raw_advantages = sg(advantages[:, None] if advantages.ndim == 1 else advantages)
    log_ratio = jnp.where(valid, logps - sg(old_logps), 0.0)  # padding neutralised before exp
    if advantages.ndim == 1:
        advantages = jnp.where(count_b > 0, raw_advantages[:, 0], 0.0)[:, None]
    else:
        advantages = jnp.where(valid, raw_advantages, 0.0)
    if level == "sequence":
        log_ratio = (jnp.sum(log_ratio, axis=-1) / jnp.maximum(count_b, 1.0))[:, None]
    return jnp.exp(log_ratio), advantages, raw_advantages


def policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    clip_eps: float | jax.Array = 0.2,
    clip_eps_high: float | jax.Array | None = None,
    ref_logps: jax.Array | None = None,
    beta: float | jax.Array = 0.0,
    max_completion_len: int | jax.Array | None = None,
    num_items: int | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Policy loss of the GRPO family; equals TRL 1.16 ``GRPOTrainer._compute_loss``.

    With :math:`m_{i,t}` the mask, :math:`A_{i,t}` the advantage and the importance ratio

    .. math::
        r_{i,t} = \exp(\log\pi_{i,t} - \log\pi^{old}_{i,t}) \quad (\text{token}), \qquad
        r_{i} = \exp\Big(\frac{\sum_t m_{i,t} (\log\pi_{i,t} - \log\pi^{old}_{i,t})}
                             {\max(1, \sum_t m_{i,t})}\Big) \quad (\text{sequence, GSPO}),

    the per-token loss is, for every type but cispo, the clipped surrogate (clip-higher:
    separate :math:`\epsilon_{low}` = ``clip_eps``, :math:`\epsilon_{high}` = ``clip_eps_high``)
    :math:`\ell_{i,t} = -\min(r A_{i,t}, \mathrm{clip}(r, 1-\epsilon_{low}, 1+\epsilon_{high})
    A_{i,t}) + \beta k_{i,t}`,

    and for cispo :math:`\ell_{i,t} = -\mathrm{sg}(\min(r, \epsilon_{max})) A_{i,t}
    \log\pi_{i,t} + \beta k_{i,t}` with :math:`\epsilon_{max}` = ``clip_eps_high``. The KL
    term is Schulman's k3 estimator of KL(pi || pi_ref) ("Approximating KL divergence", 2020),
    :math:`k_{i,t} = e^{\log\pi^{ref} - \log\pi} - (\log\pi^{ref} - \log\pi) - 1` (TRL's
    ``beta * per_token_kl``, not multiplied by the ratio). How each ``loss_type`` aggregates
    :math:`\ell`, and what of TRL's loss is not covered: :data:`POLICY_LOSS_TYPES`.

    ``importance_sampling_level="sequence"`` is GSPO (Zheng et al. 2025, arXiv:2507.18071) as
    TRL computes it. A row with no valid token adds exactly 0 to the loss and the gradient
    (masked positions are neutralised before ``exp``, so padding may hold anything).

    Args:
      logps: ``[B, T]`` log-probs of the sampled tokens under the policy (differentiated).
      old_logps: ``[B, T]`` log-probs under the policy that sampled them.
      advantages: ``[B]`` (per sequence: the same for every token of a row) or ``[B, T]``.
      mask: ``[B, T]``, 1 at valid completion tokens.
      loss_type, importance_sampling_level: one of :data:`POLICY_LOSS_TYPES`; ``"token"`` or
        ``"sequence"`` (both static).
      clip_eps: :math:`\epsilon_{low}` (TRL's ``epsilon``); not read by ``cispo``.
      clip_eps_high: :math:`\epsilon_{high}` (TRL's ``epsilon_high``; DAPO recommends 0.28;
        ``None`` = ``clip_eps``, as in TRL). Required by ``cispo``, where it is
        :math:`\epsilon_{max}`, the cap of the ratio itself (recommended 5.0).
      ref_logps: ``[B, T]`` reference log-probs (for the KL term and the ``kl`` metric).
      beta: weight of the k3 KL (may be traced); the number 0 leaves the term out, as in TRL.
      max_completion_len: ``dr_grpo``'s constant; an error for the other types.
      num_items: ``dapo``/``cispo``'s token count; an error for the other types.

    Returns:
      ``(loss, metrics)``, scalar metrics named as TRL logs them (``_policy_loss_metrics``):
      ``clip_ratio/*`` (or ``cispo_clip_ratio``), ``kl`` (given ``ref_logps``),
      ``policy/ratio{,_min,_max}`` and ``count`` (valid tokens).

    Raises:
      ValueError: an unknown type or level, an argument the type does not read, or a required
        one missing (``max_completion_len``, ``clip_eps_high``, ``ref_logps`` for beta != 0).

    Example (two completions, the second one token long)::

        >>> import jax.numpy as jnp
        >>> from rljax.rlhf import policy_loss
        >>> logps = jnp.log(jnp.array([[0.5, 0.4], [0.2, 0.9]]))
        >>> old_logps = jnp.log(jnp.array([[0.4, 0.4], [0.25, 0.9]]))
        >>> mask = jnp.array([[True, True], [True, False]])
        >>> loss, metrics = policy_loss(logps, old_logps, jnp.array([1.0, -1.0]), mask)
        >>> round(float(loss), 4)
        -0.4667
    """
    _check_policy_loss_shapes(logps, old_logps, advantages, mask, ref_logps)
    optional = {"max_completion_len": max_completion_len, "num_items": num_items}
    _check_policy_loss_args(
        loss_type, importance_sampling_level, optional, clip_eps_high, ref_logps, beta
    )
    objective, aggregate, _ = _POLICY_LOSSES[loss_type]
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    valid = mask.astype(bool)
    count_b = jnp.sum(valid.astype(logps.dtype), axis=-1)
    ratio, masked_advantages, raw_advantages = _ratio_and_advantages(
        logps, old_logps, advantages, valid, count_b, importance_sampling_level
    )
    # Padding may hold anything; neutralise it, or 0 * inf reaches the gradient.
    safe_logps = jnp.where(valid, logps, 0.0)
    per_token = objective(ratio, masked_advantages, safe_logps, clip_eps, clip_eps_high)
    kl = None if ref_logps is None else _k3(logps, ref_logps, valid)
    if kl is not None and not _is_number_zero(beta):  # TRL adds the term only for beta != 0
        per_token = per_token + beta * kl
    per_token = jnp.broadcast_to(per_token, logps.shape)
    loss_sum_b = jnp.sum(jnp.where(valid, per_token, 0.0), axis=-1)
    loss = aggregate(loss_sum_b, count_b, max_completion_len, num_items)
    return loss, _policy_loss_metrics(
        ratio, raw_advantages, kl, valid, loss_type, clip_eps, clip_eps_high
    )


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


def sequence_kl(kl: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B]`` sequence KL estimates: the sum of per-token estimates over valid tokens."""
    return masked_sum_and_count(kl, mask, axis=-1)[0]
