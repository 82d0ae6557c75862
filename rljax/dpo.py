"""Direct Preference Optimization and its variants (Rafailov et al., 2023, arXiv:2305.18290).

"DPO" here always means Direct Preference Optimization (not Discovered Policy Optimisation).

:func:`dpo_loss` implements every loss type of TRL 1.16's ``DPOTrainer`` with TRL's formulas,
defaults and metric names, so identical sequence log-probs give identical losses and
gradients. Each variant is one small function of the per-pair log-ratios in ``LOSS_FUNCTIONS``;
one dispatcher combines several types with weights as TRL does:
``loss = sum_k w_k * mean_i loss_k(i)``.

Inputs are per-example *sequence* log-probs (sums of token log-probs over the completion),
shape ``[batch]``, for the chosen and the rejected completion of each pair.

:func:`make_dpo_update` builds the pure training step on a Flax NNX language model
(``update(state, batch) -> (state, metrics)``, :class:`DPOConfig`, :class:`DPOState`) and
:func:`make_dpo_eval` the matching metrics-only step for held-out pairs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax import checks
from rljax.finite import count_nonfinite, step_if_finite
from rljax.lm import pair_sequence_logps

__all__ = [
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "LOSS_FUNCTIONS",
    "LOSS_TYPES",
    "REFERENCE_MODES",
    "DPOConfig",
    "DPOState",
    "PairTerms",
    "dpo_loss",
    "init_dpo_state",
    "make_dpo_eval",
    "make_dpo_update",
]


@dataclasses.dataclass(frozen=True)
class PairTerms:
    """Per-pair quantities every variant is written in (all ``[batch]`` except scalars).

    ``*_logratios`` are :math:`\\log\\pi_\\theta(y|x) - \\log\\pi_{ref}(y|x)`; ``*_scores`` are the
    f-divergence transforms of them (equal to the log-ratios for the reverse KL of standard
    DPO); ``delta_score = chosen_scores - rejected_scores``.
    """

    beta: jax.Array
    label_smoothing: jax.Array
    discopop_tau: jax.Array
    chosen_logps: jax.Array
    rejected_logps: jax.Array
    ref_chosen_logps: jax.Array
    ref_rejected_logps: jax.Array
    chosen_logratios: jax.Array
    rejected_logratios: jax.Array
    chosen_scores: jax.Array
    rejected_scores: jax.Array
    delta_score: jax.Array
    chosen_lengths: jax.Array | None
    rejected_lengths: jax.Array | None
    sft_scale: jax.Array | None


log_sigmoid = jax.nn.log_sigmoid


def _sigmoid(t: PairTerms) -> jax.Array:
    """DPO (Rafailov et al., 2023, Eq. 7), with conservative label smoothing 0 as in TRL 1.16:
    :math:`-\\log\\sigma(\\beta\\Delta)`."""
    return -log_sigmoid(t.beta * t.delta_score)


def _hinge(t: PairTerms) -> jax.Array:
    """SLiC hinge loss (Zhao et al., 2023, arXiv:2305.10425): :math:`\\max(0, 1 - \\beta\\Delta)`."""
    return jax.nn.relu(1.0 - t.beta * t.delta_score)


def _length_normalised_delta(t: PairTerms) -> jax.Array:
    chosen = t.chosen_scores / jnp.maximum(t.chosen_lengths, 1.0)
    rejected = t.rejected_scores / jnp.maximum(t.rejected_lengths, 1.0)
    return chosen - rejected


def _ipo(t: PairTerms) -> jax.Array:
    """IPO (Azar et al., 2023, arXiv:2310.12036, Eq. 17) on per-token averaged log-ratios, as
    TRL normalises them: :math:`(\\bar\\Delta - 1/(2\\beta))^2`; here ``beta`` is IPO's tau."""
    return jnp.square(_length_normalised_delta(t) - 1.0 / (2.0 * t.beta))


def _exo_pair(t: PairTerms) -> jax.Array:
    """EXO-pref (Ji et al., 2024, arXiv:2402.00856, Eq. 16): ``KL(p_f || p_rh)`` over the pair,
    with ``p_rh = (1 - eps, eps)`` and ``eps = label_smoothing``."""
    eps = t.label_smoothing
    logits = t.beta * t.delta_score
    q_w, q_l = jax.nn.sigmoid(logits), jax.nn.sigmoid(-logits)
    log_q_w, log_q_l = log_sigmoid(logits), log_sigmoid(-logits)
    return q_w * (log_q_w - jnp.log1p(-eps)) + q_l * (log_q_l - jnp.log(eps))


def _nca_pair(t: PairTerms) -> jax.Array:
    """NCA (Chen et al., 2024, arXiv:2402.05369), pairwise form as in TRL."""
    chosen = t.beta * t.chosen_logratios
    rejected = t.beta * t.rejected_logratios
    return -log_sigmoid(chosen) - 0.5 * log_sigmoid(-chosen) - 0.5 * log_sigmoid(-rejected)


def _robust(t: PairTerms) -> jax.Array:
    """Robust DPO (Chowdhury et al., 2024, arXiv:2403.00409, Eq. 8), unbiased under label flips
    with probability ``label_smoothing`` in [0, 0.5)."""
    eps = t.label_smoothing
    logits = t.beta * t.delta_score
    clean = -(1.0 - eps) * log_sigmoid(logits)
    flipped = -eps * log_sigmoid(-logits)
    return (clean - flipped) / (1.0 - 2.0 * eps)


def _bco_pair(t: PairTerms) -> jax.Array:
    """BCO, pairwise form (Jung et al., 2024, arXiv:2404.04656) as in TRL (no running delta)."""
    return -log_sigmoid(t.beta * t.chosen_logratios) - log_sigmoid(-t.beta * t.rejected_logratios)


def _sppo_hard(t: PairTerms) -> jax.Array:
    """SPPO with hard win probabilities (Wu et al., 2024, arXiv:2405.00675, Eq. 4.7, P in {0, 1})."""
    return jnp.square(t.chosen_logratios - 0.5 / t.beta) + jnp.square(
        t.rejected_logratios + 0.5 / t.beta
    )


def _smoothed_logistic(t: PairTerms, delta: jax.Array) -> jax.Array:
    logits = t.beta * delta
    return -log_sigmoid(logits) * (1.0 - t.label_smoothing) - log_sigmoid(-logits) * (
        t.label_smoothing
    )


def _aot(t: PairTerms) -> jax.Array:
    """AOT, paired (Melnyk et al., 2024, arXiv:2406.05882): sorted policy log-ratio margins
    against sorted reference margins. Sorting is over the (local) batch."""
    policy_margins = jnp.sort(t.chosen_logps - t.rejected_logps, axis=0)
    ref_margins = jnp.sort(t.ref_chosen_logps - t.ref_rejected_logps, axis=0)
    return _smoothed_logistic(t, policy_margins - ref_margins)


def _aot_unpaired(t: PairTerms) -> jax.Array:
    """AOT, unpaired (Melnyk et al., 2024): sorted chosen against sorted rejected log-ratios."""
    chosen = jnp.sort(t.chosen_logratios, axis=0)
    rejected = jnp.sort(t.rejected_logratios, axis=0)
    return _smoothed_logistic(t, chosen - rejected)


def _apo_zero(t: PairTerms) -> jax.Array:
    """APO-zero (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 7)."""
    return (1.0 - jax.nn.sigmoid(t.beta * t.chosen_logratios)) + jax.nn.sigmoid(
        t.beta * t.rejected_logratios
    )


def _apo_down(t: PairTerms) -> jax.Array:
    """APO-down (D'Oosterlinck et al., 2024, Eq. 8)."""
    return jax.nn.sigmoid(t.beta * t.chosen_logratios) + (
        1.0 - jax.nn.sigmoid(t.beta * (t.chosen_logratios - t.rejected_logratios))
    )


def _discopop(t: PairTerms) -> jax.Array:
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al., 2024, arXiv:2406.08414, Eq. 5)."""
    logits = t.beta * t.delta_score
    modulation = jax.nn.sigmoid(logits / t.discopop_tau)
    return -log_sigmoid(logits) * (1.0 - modulation) + jnp.exp(-logits) * modulation


def _sft(t: PairTerms) -> jax.Array:
    """Negative log-likelihood of the chosen completions per chosen token (the RPO term, Pang
    et al., 2024, arXiv:2404.19733). As a per-pair term whose batch mean is
    ``-sum(chosen_logps) / sum(chosen_lengths)``."""
    return -t.chosen_logps * t.sft_scale


def _sigmoid_norm(t: PairTerms) -> jax.Array:
    """Length-normalised sigmoid loss (as in SimPO's normalisation, Meng et al., 2024,
    arXiv:2405.14734, with the reference kept): :math:`-\\log\\sigma(\\beta\\bar\\Delta)`."""
    return -log_sigmoid(t.beta * _length_normalised_delta(t))


LOSS_FUNCTIONS: dict[str, Callable[[PairTerms], jax.Array]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}
LOSS_TYPES = tuple(LOSS_FUNCTIONS)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation only cancels log Z(x) in the chosen-rejected difference.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
_NEEDS_LENGTHS = {
    "ipo": ("chosen", "rejected"),
    "sigmoid_norm": ("chosen", "rejected"),
    "sft": ("chosen",),
}


def _f_scores(logratios: jax.Array, f_divergence_type: str, alpha: float) -> jax.Array:
    """f'(pi/pi_ref) of the f-DPO paper (Wang et al., 2023, arXiv:2309.16240, Table 1)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + log_sigmoid(logratios)
    # alpha_divergence: f'(t) = (t^(alpha - 1) - 1) / (alpha - 1)
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    clamp_max = 11.0 if logratios.dtype == jnp.float16 else 80.0
    exponent = jnp.minimum(
        (alpha - 1.0) * logratios.astype(jnp.promote_types(logratios.dtype, jnp.float32)), clamp_max
    )
    return (jnp.expm1(exponent) / (alpha - 1.0)).astype(logratios.dtype)


def _concrete(value) -> float | None:
    """The Python value of a concrete scalar, or ``None`` when it is traced."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _validate(
    loss_types,
    loss_weights,
    label_smoothing,
    f_divergence_type,
    lengths,
    weights,
    f_alpha_divergence_coef,
):
    if isinstance(loss_types, str):
        loss_types = [loss_types]
    loss_types = list(loss_types)
    if not loss_types:
        raise ValueError(f"loss_type is empty; valid choices: {list(LOSS_TYPES)}")
    unknown = [lt for lt in loss_types if lt not in LOSS_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown}; valid choices: {list(LOSS_TYPES)}")
    if loss_weights is None:
        loss_weights = [1.0] * len(loss_types)
    loss_weights = list(loss_weights)
    if len(loss_weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(loss_weights)} entries for {len(loss_types)} loss types "
            f"{loss_types}; give one weight per loss type"
        )
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}; valid choices: "
            f"{list(F_DIVERGENCE_TYPES)}"
        )
    if f_divergence_type != "reverse_kl":
        unsupported = [lt for lt in loss_types if lt not in F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is only defined for loss types "
                f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {unsupported}"
            )
    if not isinstance(f_alpha_divergence_coef, int | float):
        raise ValueError("f_alpha_divergence_coef must be a Python float (it selects a formula)")
    smoothing = _concrete(label_smoothing)
    if smoothing is not None:
        if "robust" in loss_types and not 0.0 <= smoothing < 0.5:
            raise ValueError(
                f"loss_type 'robust' needs label_smoothing in [0.0, 0.5) (the label flip "
                f"probability); got {smoothing}"
            )
        if "exo_pair" in loss_types and not 0.0 < smoothing < 1.0:
            raise ValueError(
                f"loss_type 'exo_pair' needs label_smoothing in (0.0, 1.0) (EXO's epsilon; the "
                f"paper recommends 1e-3); got {smoothing}"
            )
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1]; got {smoothing}")
    for lt in loss_types:
        for side in _NEEDS_LENGTHS.get(lt, ()):
            if lengths[side] is None:
                raise ValueError(
                    f"loss_type {lt!r} needs {side}_lengths (number of completion tokens per "
                    f"example, shape [batch])"
                )
    if weights is not None and {"aot", "aot_unpaired"} & set(loss_types):
        raise ValueError(
            "per-pair weights are not defined for 'aot'/'aot_unpaired': those losses sort the "
            "batch, which would misalign the weights"
        )
    return loss_types, loss_weights


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float | jax.Array = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float | jax.Array = 0.05,
    weights: jax.Array | None = None,
    normalizer: float | jax.Array | None = None,
    sft_normalizer: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Direct Preference Optimization loss and its variants, as TRL 1.16 computes them.

    With :math:`h_w = \log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x)` (chosen) and :math:`h_l`
    (rejected), standard DPO (Rafailov et al., 2023, Eq. 7) is

    .. math:: \mathcal L = -\mathbb E\,\log\sigma\big(\beta (h_w - h_l)\big).

    Args:
      policy_chosen_logps: ``[batch]`` sequence log-probs of the chosen completions under the
        policy (sum over completion tokens).
      policy_rejected_logps: ``[batch]``, rejected completions.
      ref_chosen_logps, ref_rejected_logps: ``[batch]`` under the reference policy, or both
        ``None`` for reference-free training (the reference log-probs are taken as 0).
      beta: :math:`\beta` (for ``ipo``, the :math:`\tau` of the IPO paper). May be traced.
      loss_type: one name or a list of names from ``LOSS_TYPES``.
      loss_weights: one weight per loss type (default 1 each); the loss is
        :math:`\sum_k w_k\,\mathrm{mean}_i\,\ell_k(i)`.
      label_smoothing: flip probability for ``robust`` (in [0, 0.5)), :math:`\epsilon` for
        ``exo_pair`` (> 0), smoothing for ``aot``/``aot_unpaired``.
      chosen_lengths, rejected_lengths: ``[batch]`` completion token counts, required by
        ``ipo`` and ``sigmoid_norm`` (both) and ``sft`` (chosen).
      f_divergence_type: f-DPO regulariser (Wang et al., 2023): ``reverse_kl`` (standard),
        ``forward_kl``, ``js_divergence``, ``alpha_divergence``.
      f_alpha_divergence_coef: :math:`\alpha` for ``alpha_divergence`` (Python float).
      discopop_tau: temperature of ``discopop``.
      weights: optional ``[batch]`` per-pair weights multiplying every per-pair loss (e.g. WPO
        weights, Zhou et al., 2024, arXiv:2406.11827, computed by the caller). As in TRL, the
        ``sft`` term is then its batch value times ``mean(weights)`` (exact per local batch; with
        a global ``normalizer`` this is exact only when the weights are constant).
      normalizer: divide per-pair sums by this instead of the local batch size (the number of
        pairs in the global batch, for exact gradient accumulation / data parallelism).
      sft_normalizer: the ``sft`` term's token count (default ``sum(chosen_lengths)``; set it
        to the global batch's chosen-token count together with ``normalizer``).

    Returns:
      ``(loss, metrics)``; metrics use TRL's names: ``rewards/chosen``, ``rewards/rejected``,
      ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, and
      ``loss/<type>`` for each type.

    Raises:
      ValueError: an unknown ``loss_type`` or ``f_divergence_type`` (the message lists the valid
        choices), mismatched ``loss_weights``, a ``label_smoothing`` outside the range a type
        needs (checked when it is a concrete number), or missing lengths.
    """
    lengths = {"chosen": chosen_lengths, "rejected": rejected_lengths}
    loss_types, loss_weights = _validate(
        loss_type,
        loss_weights,
        label_smoothing,
        f_divergence_type,
        lengths,
        weights,
        f_alpha_divergence_coef,
    )
    chex.assert_rank([policy_chosen_logps, policy_rejected_logps], 1)
    chex.assert_equal_shape([policy_chosen_logps, policy_rejected_logps])
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            "give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)"
        )
    dtype = jnp.promote_types(policy_chosen_logps.dtype, jnp.float32)
    chosen_logps = policy_chosen_logps.astype(dtype)
    rejected_logps = policy_rejected_logps.astype(dtype)
    if ref_chosen_logps is None:
        ref_chosen = ref_rejected = jnp.zeros_like(chosen_logps)
    else:
        chex.assert_equal_shape([policy_chosen_logps, ref_chosen_logps, ref_rejected_logps])
        ref_chosen = jax.lax.stop_gradient(ref_chosen_logps.astype(dtype))
        ref_rejected = jax.lax.stop_gradient(ref_rejected_logps.astype(dtype))
    for side, value in lengths.items():
        if value is not None:
            chex.assert_equal_shape([policy_chosen_logps, value])
            lengths[side] = value.astype(dtype)
    if weights is not None:
        chex.assert_equal_shape([policy_chosen_logps, weights])
        weights = jax.lax.stop_gradient(weights.astype(dtype))

    batch = chosen_logps.shape[0]
    if normalizer is None:
        normalizer = batch
    sft_scale = None
    if "sft" in loss_types:
        tokens = (
            jnp.maximum(jnp.sum(lengths["chosen"]), 1.0)
            if sft_normalizer is None
            else sft_normalizer
        )
        sft_scale = normalizer / tokens

    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    chosen_scores = _f_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = _f_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    terms = PairTerms(
        beta=jnp.asarray(beta, dtype),
        label_smoothing=jnp.asarray(label_smoothing, dtype),
        discopop_tau=jnp.asarray(discopop_tau, dtype),
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        delta_score=chosen_scores - rejected_scores,
        chosen_lengths=lengths["chosen"],
        rejected_lengths=lengths["rejected"],
        sft_scale=sft_scale,
    )

    loss = jnp.zeros((), dtype)
    metrics = {}
    for lt, weight in zip(loss_types, loss_weights, strict=True):
        per_pair = LOSS_FUNCTIONS[lt](terms)
        if weights is not None:
            if lt == "sft":  # TRL weights the batch-level NLL per pair: NLL * mean(weights)
                per_pair = jnp.full_like(per_pair, jnp.mean(per_pair))
            per_pair = per_pair * weights
        term = jnp.sum(per_pair) / normalizer
        metrics[f"loss/{lt}"] = jax.lax.stop_gradient(term)
        loss = loss + weight * term

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    metrics.update(
        {
            "rewards/chosen": jnp.mean(chosen_rewards),
            "rewards/rejected": jnp.mean(rejected_rewards),
            "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(dtype)),
            "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
            "logps/chosen": jnp.mean(jax.lax.stop_gradient(chosen_logps)),
            "logps/rejected": jnp.mean(jax.lax.stop_gradient(rejected_logps)),
        }
    )
    return loss, metrics


# ---------------------------------------------------------------------------- update step

REFERENCE_MODES = ("precomputed", "model", "none")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Static settings of :func:`make_dpo_update` and :func:`make_dpo_eval`.

    Attributes:
      beta: :math:`\\beta` of :func:`dpo_loss`.
      loss_type: one name or a tuple of names from ``LOSS_TYPES``.
      loss_weights: one weight per loss type (``None``: 1 each).
      label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau: as in
        :func:`dpo_loss`.
      rpo_alpha: weight of the chosen-completion NLL per token (RPO, Pang et al., 2024,
        arXiv:2404.19733; TRL's ``rpo_alpha``): adds ``"sft"`` with this weight to the loss
        types. ``None`` = off. Same as ``loss_type=(..., "sft")`` with that weight.
      reference: where the reference log-probs come from: ``"precomputed"`` (the batch's
        ``ref_chosen_logps`` / ``ref_rejected_logps``, e.g. from
        :func:`rljax.lm.reference_logps`), ``"model"`` (a forward pass of the frozen
        ``state.ref_params`` in every step) or ``"none"`` (reference-free: log-probs 0, as in
        SimPO-style training and TRL's ``reference_free=True``).
      chunk_size: rows per chunk of the chunked log-prob computation.
    """

    beta: float = 0.1
    loss_type: str | tuple[str, ...] = "sigmoid"
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    rpo_alpha: float | None = None
    reference: str = "precomputed"
    chunk_size: int = 1024

    def __post_init__(self):
        if not isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if self.reference not in REFERENCE_MODES:
            raise ValueError(
                f"DPOConfig.reference={self.reference!r}; valid choices: {list(REFERENCE_MODES)}"
            )
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"DPOConfig.chunk_size must be a positive int, got {self.chunk_size}")
        checks.check(
            self, {"beta": "> 0", "discopop_tau": "> 0", "rpo_alpha": ">= 0"}, library=True
        )
        types, weights = self.loss_types_and_weights()
        # Validate the loss-type combination now rather than at the first trace.
        _validate(
            types,
            weights,
            self.label_smoothing,
            self.f_divergence_type,
            {"chosen": 1.0, "rejected": 1.0},
            None,
            self.f_alpha_divergence_coef,
        )

    def loss_types_and_weights(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """The loss types and weights passed to :func:`dpo_loss` (with the RPO term)."""
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        weights = (1.0,) * len(types) if self.loss_weights is None else tuple(self.loss_weights)
        if len(weights) != len(types):
            raise ValueError(
                f"DPOConfig.loss_weights has {len(weights)} entries for {len(types)} loss types "
                f"{list(types)}; give one weight per loss type"
            )
        if self.rpo_alpha is not None:
            types, weights = (*types, "sft"), (*weights, float(self.rpo_alpha))
        return types, weights


class DPOState(NamedTuple):
    """Train state of :func:`make_dpo_update` (a pytree).

    ``params``: the policy's parameters (``nnx.split(model)[1]``); ``opt_state``: the optax
    state; ``step``: int32 count of updates; ``ref_params``: the frozen reference policy's
    parameters for ``DPOConfig(reference="model")``, else ``None`` (never updated);
    ``nonfinite_updates``: int32 count of updates skipped as non-finite
    (:func:`rljax.finite.step_if_finite`).
    """

    params: Any
    opt_state: Any
    step: jax.Array
    ref_params: Any = None
    nonfinite_updates: Any = np.int32(0)


def init_dpo_state(params, optimizer, ref_params=None) -> DPOState:
    """Initial :class:`DPOState`. For ``reference="model"`` pass ``ref_params`` (typically a
    copy of the initial policy: ``jax.tree.map(jnp.copy, params)``)."""
    step, skipped = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers: donated
    return DPOState(params, optimizer.init(params), step, ref_params, skipped)


def _dpo_objective(graphdef, config: DPOConfig) -> Callable:
    """``objective(params, ref_params, batch) -> (loss, metrics)`` of one preference batch."""
    types, weights = config.loss_types_and_weights()

    def reference(ref_params, batch):
        if config.reference == "none":
            return None, None
        if config.reference == "precomputed":
            missing = [k for k in ("ref_chosen_logps", "ref_rejected_logps") if k not in batch]
            if missing:
                raise KeyError(
                    f"DPOConfig(reference='precomputed') needs {missing} in the batch (compute "
                    "them with rljax.lm.reference_logps), or use reference='model' / 'none'"
                )
            return jnp.asarray(batch["ref_chosen_logps"]), jnp.asarray(batch["ref_rejected_logps"])
        if ref_params is None:
            raise ValueError(
                "DPOConfig(reference='model') needs state.ref_params (init_dpo_state(params, "
                "optimizer, ref_params=...))"
            )
        ref_chosen, ref_rejected, _, _ = pair_sequence_logps(
            graphdef, jax.lax.stop_gradient(ref_params), batch, chunk_size=config.chunk_size
        )
        return jax.lax.stop_gradient(ref_chosen), jax.lax.stop_gradient(ref_rejected)

    def objective(params, ref_logps, batch):
        chosen, rejected, chosen_lengths, rejected_lengths = pair_sequence_logps(
            graphdef, params, batch, chunk_size=config.chunk_size
        )
        loss, metrics = dpo_loss(
            chosen,
            rejected,
            *ref_logps,
            beta=config.beta,
            loss_type=types,
            loss_weights=weights,
            label_smoothing=config.label_smoothing,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            f_divergence_type=config.f_divergence_type,
            f_alpha_divergence_coef=config.f_alpha_divergence_coef,
            discopop_tau=config.discopop_tau,
        )
        return loss, {"loss": loss, **metrics}

    return reference, objective


def make_dpo_update(
    graphdef, optimizer, config: DPOConfig = DPOConfig()
) -> Callable[[DPOState, dict], tuple[DPOState, dict[str, jax.Array]]]:
    """Build the pure Direct Preference Optimization step ``update(state, batch) -> (state,
    metrics)`` for a Flax NNX language model.

    One optax step on :func:`dpo_loss` of the batch's sequence log-probs. The policy runs
    chosen and rejected as ONE ``[2B, T]`` batch (:func:`rljax.lm.concatenated_sequence_logps`,
    chunked log-probs: no ``[2B, T, V]`` logits); the reference log-probs come from the batch,
    from a forward pass of the frozen ``state.ref_params`` under ``stop_gradient``, or are 0
    (``config.reference``). Gradient clipping and schedules belong to ``optimizer``.

    Args:
      graphdef: ``nnx.split(model)[0]`` of a :class:`rljax.models.transformer.Transformer`.
      optimizer: optax ``GradientTransformation`` over ``state.params``.
      config: :class:`DPOConfig`.

    The ``batch`` follows the :mod:`rljax.data` contract: ``chosen_tokens``, ``chosen_mask``,
    ``chosen_loss_mask``, ``rejected_tokens``, ``rejected_mask``, ``rejected_loss_mask`` (all
    ``[B, T]``), or the shared-prompt layout of :func:`rljax.data.share_prompts` (each prompt
    run once, then both completions against its key/value cache: same losses, fewer FLOPs;
    :func:`rljax.lm.pair_sequence_logps` picks the forward by the keys), plus
    ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]`` for ``reference="precomputed"``.

    Metrics (TRL's names, all scalars): ``loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
    ``loss/<type>`` per loss type (``loss/sft`` is the RPO NLL), ``grad_norm`` (global norm
    of the gradient before the optimizer), ``nonfinite`` (1.0 if the loss, the gradients or
    the new parameters or optimizer state had a NaN or inf: the update is then skipped, the
    parameters and optimizer state stay bitwise unchanged) and ``nonfinite_updates`` (the
    running count of skipped updates, also ``state.nonfinite_updates``).

    Not jitted; jit it with the state and batch shardings and donate the state::

        step = jax.jit(update, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)

    or use :func:`rljax.lm.compile_update`. The batch is one global array, so every mean in
    the loss (over pairs, and the RPO term's over chosen tokens) is the exact global-batch
    mean under data parallelism.
    """
    if not isinstance(config, DPOConfig):
        raise TypeError(f"config must be a DPOConfig, got {type(config).__name__}")
    reference, objective = _dpo_objective(graphdef, config)

    def update(state: DPOState, batch: dict) -> tuple[DPOState, dict[str, jax.Array]]:
        ref_logps = reference(state.ref_params, batch)
        grads, metrics = jax.grad(objective, has_aux=True)(state.params, ref_logps, batch)
        params, opt_state, finite = step_if_finite(
            optimizer, grads, state.opt_state, state.params, metrics["loss"]
        )
        count, guard_metrics = count_nonfinite(state.nonfinite_updates, finite)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics.update(guard_metrics)
        return DPOState(params, opt_state, state.step + 1, state.ref_params, count), metrics

    return update


def make_dpo_eval(
    graphdef, config: DPOConfig = DPOConfig()
) -> Callable[[DPOState, dict], dict[str, jax.Array]]:
    """The metrics of :func:`make_dpo_update` on held-out pairs, without an update:
    ``evaluate(state, batch) -> metrics`` (no ``grad_norm``). Pure; jit it as the update
    (``in_shardings=(state_shardings, batch_sharding), out_shardings=replicated``)."""
    if not isinstance(config, DPOConfig):
        raise TypeError(f"config must be a DPOConfig, got {type(config).__name__}")
    reference, objective = _dpo_objective(graphdef, config)

    def evaluate(state: DPOState, batch: dict) -> dict[str, jax.Array]:
        _, metrics = objective(state.params, reference(state.ref_params, batch), batch)
        return metrics

    return evaluate
