r"""Direct Preference Optimization and its variants (Rafailov et al., 2023, arXiv:2305.18290).

"DPO" here always means Direct Preference Optimization (not Discovered Policy Optimisation).

:func:`dpo_loss` implements every loss type of TRL 1.16's ``DPOTrainer`` with TRL's formulas,
defaults and metric names, so identical sequence log-probs give identical losses and
gradients. One dispatcher combines several types with weights as TRL does:
``loss = sum_k w_k * mean_i loss_k(i)``; ``reduction="none"`` returns the per-pair
``sum_k w_k * loss_k(i)`` instead.

Writing a variant: each loss type is one small function ``loss_fn(terms) -> [batch]`` of the
per-pair quantities in :class:`PairTerms` (log-probs, log-ratios, their f-divergence scores,
``beta``, ...). ``LOSS_FUNCTIONS`` maps each built-in name to its function (read it; do not
add to it). Pass a function of your own as the loss type, alone or next to built-in names,
and :func:`dpo_loss` gives it the same terms, weights, normalisation and metrics::

    def cdpo(t: PairTerms) -> jax.Array:  # conservative DPO with label smoothing 0.1
        logits = t.beta * t.delta_score
        return -0.9 * jax.nn.log_sigmoid(logits) - 0.1 * jax.nn.log_sigmoid(-logits)

    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=cdpo)  # metrics["loss/cdpo"]

Inputs are per-example *sequence* log-probs (sums of token log-probs over the completion),
shape ``[batch]``, for the chosen and the rejected completion of each pair.

Which loss type reads which optional argument of :func:`dpo_loss` (TRL 1.16;
``ARGUMENT_READERS``):

==============================  ==========================================================
argument                        read by
==============================  ==========================================================
``label_smoothing``             ``robust`` (flip probability, [0, 0.5)), ``exo_pair``
                                (:math:`\epsilon`, (0, 1)), ``aot``, ``aot_unpaired``
``discopop_tau``                ``discopop``
``chosen_lengths``              ``ipo``, ``sigmoid_norm``, ``sft`` (required by them)
``rejected_lengths``            ``ipo``, ``sigmoid_norm`` (required by them)
``sft_normalizer``              ``sft``
``f_alpha_divergence_coef``     ``f_divergence_type="alpha_divergence"``
``beta``, ``weights``,          every type (``beta`` also scales the reward metrics;
``normalizer``                  ``weights`` is refused by ``aot``/``aot_unpaired``)
==============================  ==========================================================

An argument that none of the requested loss types reads raises ``ValueError`` naming the
argument and the types, rather than being ignored: in TRL 1.16 ``sigmoid`` has no label
smoothing, so ``loss_type="sigmoid", label_smoothing=0.3`` is an error, not conservative
DPO (``label_smoothing=0``, "no smoothing", is accepted anywhere). A custom loss type (a
function) may read any of them, so a call with one is not checked this way.

The rest of the preference family lives here too, as pure functions of sequence log-probs with
TRL 1.16's formulas and metric names: :func:`kto_loss` (KTO and unpaired APO-zero, on unpaired
desirable/undesirable examples), :func:`orpo_loss` (ORPO, reference-free, with the odds ratio)
and :func:`cpo_loss` (CPO's sigmoid/hinge/IPO types and SimPO, reference-free). The same rule
holds for them: an argument the chosen loss type does not read is a ``ValueError``.

:func:`make_dpo_update` builds the pure training step on a Flax NNX language model
(``update(state, batch, hyperparams=None) -> (state, metrics)``, :class:`DPOConfig`,
:class:`DPOState`) and :func:`make_dpo_eval` the matching metrics-only step for held-out pairs;
``hyperparams`` carries the swept coefficients (``beta``, ...) as traced values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ARGUMENT_READERS",
    "CPO_ARGUMENT_READERS",
    "CPO_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KTO_ARGUMENT_READERS",
    "KTO_LOSS_TYPES",
    "LOSS_FUNCTIONS",
    "LOSS_TYPES",
    "REDUCTIONS",
    "PairTerms",
    "cpo_loss",
    "dpo_loss",
    "kto_loss",
    "orpo_loss",
]


@dataclasses.dataclass(frozen=True)
class PairTerms:
    r"""The per-pair quantities every Direct Preference Optimization variant is written in.

    A variant is a function ``loss_fn(terms: PairTerms) -> jax.Array`` returning the ``[batch]``
    per-pair losses (``LOSS_FUNCTIONS`` holds the built-in ones); :func:`dpo_loss` builds the
    terms, calls each loss type's function, weights, normalises and reports it. Arrays are in
    the working dtype (the inputs' promoted to at least float32); reference quantities carry no
    gradient.

    Attributes:
      beta: scalar :math:`\beta` (may be traced).
      label_smoothing: scalar; 0 when the call did not give it.
      discopop_tau: scalar temperature of ``discopop``; TRL's 0.05 when not given.
      chosen_logps, rejected_logps: ``[batch]`` policy sequence log-probs
        :math:`\log\pi_\theta(y_w|x)`, :math:`\log\pi_\theta(y_l|x)`.
      ref_chosen_logps, ref_rejected_logps: ``[batch]`` reference sequence log-probs (zeros when
        reference-free).
      chosen_logratios, rejected_logratios: ``[batch]``
        :math:`h_w = \log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x)` and :math:`h_l`.
      chosen_scores, rejected_scores: ``[batch]`` the f-divergence transforms :math:`f'` of the
        log-ratios (Wang et al., 2023); equal to the log-ratios for the default ``reverse_kl``.
      delta_score: ``[batch]`` ``chosen_scores - rejected_scores`` (:math:`\Delta`; the DPO
        logit is :math:`\beta\Delta`).
      chosen_lengths, rejected_lengths: ``[batch]`` completion token counts, or ``None`` when
        the call did not give them.
      sft_scale: ``normalizer / chosen token count`` when ``sft`` is a loss type (so the batch
        mean of ``-chosen_logps * sft_scale`` is the per-token NLL), else ``None``.
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
    """DPO (Rafailov et al., 2023, Eq. 7): :math:`-\\log\\sigma(\\beta\\Delta)`.

    As in TRL 1.16, no label smoothing: conservative DPO (cDPO, the smoothed form older TRL
    releases applied here) is not a TRL 1.16 loss type; write it from :class:`PairTerms`."""
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
"""Built-in loss type name -> ``loss_fn(terms: PairTerms) -> [batch]`` per-pair losses, one per
TRL 1.16 ``loss_type``. Read-only by convention: pass a function of your own as
``dpo_loss(..., loss_type=fn)`` rather than adding it here."""
LOSS_TYPES = tuple(LOSS_FUNCTIONS)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation only cancels log Z(x) in the chosen-rejected difference.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
ARGUMENT_READERS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "label_smoothing": frozenset({"exo_pair", "robust", "aot", "aot_unpaired"}),
        "discopop_tau": frozenset({"discopop"}),
        "chosen_lengths": frozenset({"ipo", "sigmoid_norm", "sft"}),
        "rejected_lengths": frozenset({"ipo", "sigmoid_norm"}),
        "sft_normalizer": frozenset({"sft"}),
    }
)
"""Optional argument of :func:`dpo_loss` -> the built-in loss types whose formula reads it (as
TRL 1.16's ``DPOTrainer`` does). Giving one that none of the requested types reads is an
error; the lengths are also required by the types listed for them."""
REDUCTIONS = ("mean", "none")


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


def _name(loss_type) -> str:
    """The name of a loss type in messages and metrics (``loss/<name>``)."""
    if isinstance(loss_type, str):
        return loss_type
    return getattr(loss_type, "__name__", None) or type(loss_type).__name__


def _given(argument: str, value) -> bool:
    """Whether an optional argument was given a value that could change the loss
    (``label_smoothing`` 0, a concrete number, means no smoothing and counts as not given)."""
    if value is None:
        return False
    return not (argument == "label_smoothing" and _concrete(value) == 0.0)


def _shown(value) -> str:
    concrete = _concrete(value) if np.ndim(value) == 0 else None
    if concrete is not None:
        return repr(concrete)
    return "a traced value" if isinstance(value, jax.core.Tracer) else "an array"


def _check_arguments_read(loss_types, optional: Mapping[str, Any], label: Callable, where: str):
    """Raise for an optional argument none of ``loss_types`` reads, or a missing length."""
    names = [lt for lt in loss_types if isinstance(lt, str)]
    custom = len(names) < len(loss_types)  # a custom function may read anything
    for argument, value in optional.items():
        readers = ARGUMENT_READERS[argument]
        if _given(argument, value) and not custom and not readers & set(names):
            hint = ""
            if argument == "label_smoothing" and "sigmoid" in names:
                hint = (
                    " TRL 1.16's 'sigmoid' loss has no label smoothing; conservative DPO "
                    "(cDPO) is a custom loss type written from PairTerms (see rljax.dpo's "
                    "docstring and examples/custom_dpo_variant.py)."
                )
            raise ValueError(
                f"{where}: {label(argument)}={_shown(value)} is not read by loss_type "
                f"{names if len(names) > 1 else names[0]!r}; only {sorted(readers)} read it "
                f"(TRL 1.16). Leave it out, or add a loss type that reads it.{hint}"
            )
        if argument.endswith("_lengths") and value is None:
            for lt in names:
                if lt in readers:
                    raise ValueError(
                        f"{where}: loss_type {lt!r} needs {label(argument)} (number of "
                        f"completion tokens per example, shape [batch])"
                    )


def _loss_types_and_weights(loss_types, loss_weights, label: Callable, where: str):
    """``loss_types`` as a list of names and functions, each name known, and one weight each
    (default 1)."""
    if isinstance(loss_types, str) or callable(loss_types):
        loss_types = [loss_types]
    loss_types = list(loss_types)
    if not loss_types:
        raise ValueError(f"{where}: loss_type is empty; valid choices: {list(LOSS_TYPES)}")
    unknown = [lt for lt in loss_types if not callable(lt) and lt not in LOSS_FUNCTIONS]
    if unknown:
        raise ValueError(
            f"{where}: unknown loss_type {unknown}; valid choices: {list(LOSS_TYPES)} or a "
            "function of PairTerms returning the [batch] per-pair losses"
        )
    if loss_weights is None:
        loss_weights = [1.0] * len(loss_types)
    loss_weights = list(loss_weights)
    if len(loss_weights) != len(loss_types):
        raise ValueError(
            f"{where}: {label('loss_weights')} has {len(loss_weights)} entries for "
            f"{len(loss_types)} loss types {[_name(lt) for lt in loss_types]}; give one weight "
            "per loss type"
        )
    return loss_types, loss_weights


def _check_f_divergence(names, f_divergence_type, f_alpha_divergence_coef, label, where):
    """Raise for an unknown f-divergence, one the named loss types are not defined with, or an
    alpha without ``alpha_divergence`` or not a Python number."""
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"{where}: unknown f_divergence_type {f_divergence_type!r}; valid choices: "
            f"{list(F_DIVERGENCE_TYPES)}"
        )
    if f_divergence_type != "reverse_kl":
        unsupported = [lt for lt in names if lt not in F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"{where}: f_divergence_type={f_divergence_type!r} is only defined for loss "
                f"types {sorted(F_DIVERGENCE_LOSS_TYPES)}; got {unsupported}"
            )
    if f_alpha_divergence_coef is not None:
        if f_divergence_type != "alpha_divergence":
            raise ValueError(
                f"{where}: {label('f_alpha_divergence_coef')}={f_alpha_divergence_coef!r} is "
                f"only read with f_divergence_type='alpha_divergence'; got "
                f"{f_divergence_type!r}. Leave it out."
            )
        if not isinstance(f_alpha_divergence_coef, int | float):
            raise ValueError(
                f"{where}: {label('f_alpha_divergence_coef')} must be a Python float (it "
                f"selects a formula); got {type(f_alpha_divergence_coef).__name__}"
            )


def _check_label_smoothing(names, given_smoothing, label, where):
    """Raise for a concrete ``label_smoothing`` outside [0, 1] or the range a named type needs
    (a traced one is not checked)."""
    smoothing = 0.0 if given_smoothing is None else _concrete(given_smoothing)
    if smoothing is None:
        return
    if "robust" in names and not 0.0 <= smoothing < 0.5:
        raise ValueError(
            f"{where}: loss_type 'robust' needs {label('label_smoothing')} in [0.0, 0.5) "
            f"(the label flip probability); got {smoothing}"
        )
    if "exo_pair" in names and not 0.0 < smoothing < 1.0:
        raise ValueError(
            f"{where}: loss_type 'exo_pair' needs {label('label_smoothing')} in (0.0, 1.0) "
            f"(EXO's epsilon; the paper recommends 1e-3); got {smoothing}"
        )
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"{where}: {label('label_smoothing')} must lie in [0, 1]; got {smoothing}")


def _check_reduction(names, weights, reduction: str, where: str):
    """Raise for an unknown ``reduction``, or for per-pair weights or ``reduction="none"`` with
    a loss type that sorts the batch (so its positions do not belong to pairs)."""
    sorting = sorted({"aot", "aot_unpaired"} & set(names))
    if weights is not None and sorting:
        raise ValueError(
            f"{where}: per-pair weights are not defined for {sorting}: those losses sort the "
            "batch, which would misalign the weights"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{where}: unknown reduction {reduction!r}; valid choices: {list(REDUCTIONS)}"
        )
    if reduction == "none" and sorting:
        raise ValueError(
            f"{where}: reduction='none' is not defined for {sorting}: those losses sort the "
            "batch, so their per-position losses do not belong to pairs"
        )


def _validate(
    loss_types,
    loss_weights,
    f_divergence_type,
    f_alpha_divergence_coef,
    *,
    optional: Mapping[str, Any],
    weights=None,
    reduction: str = "mean",
    label: Callable[[str], str] = str,
    where: str = "dpo_loss",
):
    """Check a loss-type combination and the arguments given with it; returns the loss types
    (names or functions) and one weight each."""
    loss_types, loss_weights = _loss_types_and_weights(loss_types, loss_weights, label, where)
    names = [lt for lt in loss_types if isinstance(lt, str)]
    _check_f_divergence(names, f_divergence_type, f_alpha_divergence_coef, label, where)
    _check_arguments_read(loss_types, optional, label, where)
    _check_label_smoothing(names, optional.get("label_smoothing"), label, where)
    _check_reduction(names, weights, reduction, where)
    return loss_types, loss_weights


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str | Callable | Sequence[str | Callable] = "sigmoid",
    loss_weights: Sequence[float | jax.Array] | None = None,
    label_smoothing: float | jax.Array | None = None,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float | None = None,
    discopop_tau: float | jax.Array | None = None,
    weights: jax.Array | None = None,
    normalizer: float | jax.Array | None = None,
    sft_normalizer: float | jax.Array | None = None,
    reduction: str = "mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Direct Preference Optimization loss and its variants, as TRL 1.16 computes them.

    With :math:`h_w = \log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x)` (chosen) and :math:`h_l`
    (rejected), standard DPO (Rafailov et al., 2023, Eq. 7) is
    :math:`\mathcal L = -\mathbb E\,\log\sigma\big(\beta (h_w - h_l)\big)`. Which loss type
    reads which optional argument: the module's table (``ARGUMENT_READERS``); an argument no
    requested type reads is a ``ValueError``, not ignored.

    Args:
      policy_chosen_logps, policy_rejected_logps: ``[batch]`` summed completion log-probs.
      ref_chosen_logps, ref_rejected_logps: the same under the reference, or both ``None``
        (reference-free: taken as 0).
      beta: :math:`\beta` (for ``ipo``, the :math:`\tau` of the IPO paper). May be traced.
      loss_type: a name from ``LOSS_TYPES``, a function ``PairTerms -> [batch]`` per-pair
        losses (a variant of your own, reported as ``loss/<function name>``), or a list of them.
      loss_weights: one weight per type (default 1; may be traced): :math:`\sum_k w_k\bar\ell_k`.
      label_smoothing: ``None`` = 0; may be traced (counts as given, range-checked if concrete).
      chosen_lengths, rejected_lengths: ``[batch]`` completion token counts (see the table).
      f_divergence_type: f-DPO (Wang et al., 2023): ``reverse_kl`` (standard DPO),
        ``forward_kl``, ``js_divergence`` or ``alpha_divergence``.
      f_alpha_divergence_coef: :math:`\alpha` of ``alpha_divergence`` (float; ``None`` = 0.5).
      discopop_tau: temperature of ``discopop`` (``None`` = TRL's 0.05). May be traced.
      weights: optional ``[batch]`` per-pair weights on every per-pair loss (e.g. WPO weights,
        Zhou et al., 2024, computed by the caller); the ``sft`` term is scaled by their mean
        (exact per local batch; with a global ``normalizer``, only for constant weights).
      normalizer, sft_normalizer: divide per-pair sums by ``normalizer`` instead of the local
        batch size, and the ``sft`` term by ``sft_normalizer`` instead of
        ``sum(chosen_lengths)`` (the global batch's counts, for exact gradient accumulation).
      reduction: ``"mean"`` (the scalar loss) or ``"none"``: the ``[batch]`` per-pair losses
        :math:`\sum_k w_k\,\ell_k(i)` whose ``sum / normalizer`` is the mean loss (not for
        ``aot``/``aot_unpaired``, which sort the batch).

    Returns:
      ``(loss, metrics)``: scalar metrics with TRL's names: ``rewards/{chosen,rejected,
      accuracies,margins}``, ``logps/{chosen,rejected}`` and ``loss/<type>`` for each type (its
      weighted mean before its ``loss_weights`` entry).

    Raises:
      ValueError: naming the argument: an unknown choice, an argument no type reads, a missing
        or out-of-range one, or a custom loss type that does not return ``[batch]``.

    Example (the policy prefers the first pair's chosen answer more than the reference does)::

        >>> import jax.numpy as jnp
        >>> from rljax.dpo import dpo_loss
        >>> loss, metrics = dpo_loss(
        ...     jnp.array([-1.0, -2.0]), jnp.array([-3.0, -2.5]),  # policy: chosen, rejected
        ...     jnp.array([-1.5, -2.0]), jnp.array([-2.5, -2.5]),  # reference: chosen, rejected
        ...     beta=0.1,
        ... )
        >>> round(float(loss), 4), float(metrics["rewards/accuracies"])
        (0.6688, 0.5)
    """
    optional = {
        "label_smoothing": label_smoothing,
        "discopop_tau": discopop_tau,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "sft_normalizer": sft_normalizer,
    }
    loss_types, loss_weights = _validate(
        loss_type,
        loss_weights,
        f_divergence_type,
        f_alpha_divergence_coef,
        optional=optional,
        weights=weights,
        reduction=reduction,
    )
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_inputs(*logps, chosen_lengths, rejected_lengths, weights)
    normalizer = policy_chosen_logps.shape[0] if normalizer is None else normalizer
    terms = _pair_terms(*logps, optional, beta, f_divergence_type, f_alpha_divergence_coef)
    if "sft" in loss_types:
        terms = dataclasses.replace(terms, sft_scale=_sft_scale(terms, normalizer, sft_normalizer))
    loss, per_pair_loss, metrics = _weighted_losses(
        terms, loss_types, loss_weights, weights, normalizer, reduction
    )
    metrics.update(_reward_metrics(terms, beta))
    return (per_pair_loss if reduction == "none" else loss), metrics


def _check_inputs(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    weights,
) -> None:
    """Check the shapes of :func:`dpo_loss`'s arrays: every one ``[batch]``; the reference
    log-probs both given or both ``None``."""
    chex.assert_rank([policy_chosen_logps, policy_rejected_logps], 1)
    chex.assert_equal_shape([policy_chosen_logps, policy_rejected_logps])
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            "dpo_loss: give both ref_chosen_logps and ref_rejected_logps, or neither "
            "(reference-free)"
        )
    if ref_chosen_logps is not None:
        chex.assert_equal_shape([policy_chosen_logps, ref_chosen_logps, ref_rejected_logps])
    for value in (chosen_lengths, rejected_lengths, weights):
        if value is not None:
            chex.assert_equal_shape([policy_chosen_logps, value])


def _pair_terms(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    optional: Mapping[str, Any],
    beta,
    f_divergence_type: str,
    f_alpha_divergence_coef: float | None,
) -> PairTerms:
    """The :class:`PairTerms` of checked inputs, in the working dtype (the inputs' promoted to
    at least float32); ``sft_scale`` is left ``None``."""
    dtype = jnp.promote_types(policy_chosen_logps.dtype, jnp.float32)
    chosen_logps = policy_chosen_logps.astype(dtype)
    rejected_logps = policy_rejected_logps.astype(dtype)
    if ref_chosen_logps is None:
        ref_chosen = ref_rejected = jnp.zeros_like(chosen_logps)
    else:
        ref_chosen = jax.lax.stop_gradient(ref_chosen_logps.astype(dtype))
        ref_rejected = jax.lax.stop_gradient(ref_rejected_logps.astype(dtype))
    lengths = {}
    for side in ("chosen", "rejected"):
        value = optional[f"{side}_lengths"]
        lengths[side] = None if value is None else value.astype(dtype)
    alpha = 0.5 if f_alpha_divergence_coef is None else f_alpha_divergence_coef
    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    chosen_scores = _f_scores(chosen_logratios, f_divergence_type, alpha)
    rejected_scores = _f_scores(rejected_logratios, f_divergence_type, alpha)
    label_smoothing, discopop_tau = optional["label_smoothing"], optional["discopop_tau"]
    return PairTerms(
        beta=jnp.asarray(beta, dtype),
        label_smoothing=jnp.asarray(0.0 if label_smoothing is None else label_smoothing, dtype),
        discopop_tau=jnp.asarray(0.05 if discopop_tau is None else discopop_tau, dtype),
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
        sft_scale=None,
    )


def _sft_scale(terms: PairTerms, normalizer, sft_normalizer):
    """``normalizer / chosen token count`` (``sft_normalizer``, default the batch's)."""
    if sft_normalizer is None:
        return normalizer / jnp.maximum(jnp.sum(terms.chosen_lengths), 1.0)
    return normalizer / sft_normalizer


def _weighted_losses(terms: PairTerms, loss_types, loss_weights, weights, normalizer, reduction):
    """``(loss, per_pair_loss, metrics)``: each loss type's per-pair losses times ``weights``,
    summed over the batch and divided by ``normalizer`` (reported as ``loss/<type>``), then
    weighted by ``loss_weights`` and added up. ``per_pair_loss`` is the weighted sum of the
    per-pair losses for ``reduction="none"`` (zeros otherwise). As in TRL, the ``sft`` term with
    ``weights`` is its batch value times each pair's weight."""
    dtype = terms.chosen_logps.dtype
    shape = terms.chosen_logps.shape
    if weights is not None:
        weights = jax.lax.stop_gradient(weights.astype(dtype))
    loss = jnp.zeros((), dtype)
    per_pair_loss = jnp.zeros_like(terms.chosen_logps)
    metrics = {}
    for lt, weight in zip(loss_types, loss_weights, strict=True):
        per_pair = LOSS_FUNCTIONS[lt](terms) if isinstance(lt, str) else lt(terms)
        if jnp.shape(per_pair) != shape:
            raise ValueError(
                f"dpo_loss: loss_type {_name(lt)!r} returned shape {jnp.shape(per_pair)}; a "
                f"loss function returns the per-pair losses, shape {shape}"
            )
        per_pair = jnp.asarray(per_pair).astype(dtype)
        if weights is not None:
            if lt == "sft":  # TRL weights the batch-level NLL per pair: NLL * mean(weights)
                per_pair = jnp.full_like(per_pair, jnp.mean(per_pair))
            per_pair = per_pair * weights
        term = jnp.sum(per_pair) / normalizer
        metrics[f"loss/{_name(lt)}"] = jax.lax.stop_gradient(term)
        loss = loss + weight * term
        if reduction == "none":
            per_pair_loss = per_pair_loss + weight * per_pair
    return loss, per_pair_loss, metrics


def _reward_metrics(terms: PairTerms, beta) -> dict[str, jax.Array]:
    """TRL's implicit-reward and log-prob metrics (``beta`` times the log-ratios), gradient-free."""
    chosen_rewards = jax.lax.stop_gradient(beta * terms.chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * terms.rejected_logratios)
    accurate = (chosen_rewards > rejected_rewards).astype(terms.chosen_logps.dtype)
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean(accurate),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(terms.chosen_logps)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(terms.rejected_logps)),
    }


# --------------------------------------------------------------------------------------------
# The preference family beyond DPO: KTO, ORPO, CPO / SimPO (TRL 1.16's formulas, pure).
# --------------------------------------------------------------------------------------------

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
KTO_ARGUMENT_READERS: Mapping[str, frozenset[str]] = MappingProxyType(
    {"kl_policy_logps": frozenset({"kto"}), "kl_reference_logps": frozenset({"kto"})}
)
"""Optional argument of :func:`kto_loss` -> the loss types that read it (TRL 1.16 computes the
KL reference point only for ``kto``)."""


def _working_dtype(array: jax.Array):
    """The inputs' dtype promoted to at least float32 (the dtype every loss here computes in)."""
    return jnp.promote_types(jnp.asarray(array).dtype, jnp.float32)


def _check_read(where: str, loss_type: str, argument: str, value, readers, given: bool, hint=""):
    """Raise when ``argument`` was ``given`` but ``loss_type`` is not one of its ``readers``."""
    if given and loss_type not in readers:
        raise ValueError(
            f"{where}: {argument}={_shown(value)} is not read by loss_type {loss_type!r}; only "
            f"{sorted(readers)} read it (TRL 1.16). Leave it out.{hint}"
        )


def _check_loss_type(where: str, loss_type, valid: Sequence[str]) -> None:
    if not isinstance(loss_type, str) or loss_type not in valid:
        raise ValueError(f"{where}: unknown loss_type {loss_type!r}; valid choices: {list(valid)}")


def _kto(logratios: jax.Array, z0: jax.Array, beta: jax.Array):
    """KTO (Ethayarajh et al., 2024, arXiv:2402.01306, Eq. 7, as TRL computes it): the value
    :math:`\\sigma(\\beta(r - z_0))` of a desirable and :math:`\\sigma(\\beta(z_0 - r))` of an
    undesirable example, loss one minus it; ``(desirable losses, undesirable losses)``."""
    desirable_losses = 1.0 - jax.nn.sigmoid(beta * (logratios - z0))
    undesirable_losses = 1.0 - jax.nn.sigmoid(beta * (z0 - logratios))
    return desirable_losses, undesirable_losses


def _apo_zero_unpaired(logratios: jax.Array, z0: jax.Array, beta: jax.Array):
    """APO-zero, unpaired (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 7 split per
    example): push desirable log-ratios up and undesirable ones down, no reference point.
    (Algebraically KTO with :math:`z_0 = 0`.)"""
    del z0  # not read: TRL 1.16 computes no KL term for this type
    return 1.0 - jax.nn.sigmoid(beta * logratios), jax.nn.sigmoid(beta * logratios)


_KTO_LOSS_FUNCTIONS = {"kto": _kto, "apo_zero_unpaired": _apo_zero_unpaired}


def _check_kto_inputs(
    policy_logps, reference_logps, desirable, kl_policy_logps, kl_reference_logps
):
    chex.assert_rank([policy_logps, reference_logps, desirable], 1)
    chex.assert_equal_shape([policy_logps, reference_logps, desirable])
    if jnp.asarray(desirable).dtype != jnp.bool_:
        raise ValueError(
            "kto_loss: desirable must be a bool array, shape [batch] (True = a desirable "
            f"example, False = an undesirable one); got dtype {jnp.asarray(desirable).dtype}. "
            "Convert labels with labels.astype(bool)."
        )
    if (kl_policy_logps is None) != (kl_reference_logps is None):
        raise ValueError(
            "kto_loss: give both kl_policy_logps and kl_reference_logps (the KL batch under the "
            "policy and the reference), or neither (reference point z0 = 0)"
        )
    if kl_policy_logps is not None:
        chex.assert_rank([kl_policy_logps, kl_reference_logps], 1)
        chex.assert_equal_shape([kl_policy_logps, kl_reference_logps])


def kto_loss(
    policy_logps: jax.Array,
    reference_logps: jax.Array,
    desirable: jax.Array,
    kl_policy_logps: jax.Array | None = None,
    kl_reference_logps: jax.Array | None = None,
    *,
    beta: float | jax.Array = 0.1,
    desirable_weight: float | jax.Array = 1.0,
    undesirable_weight: float | jax.Array = 1.0,
    loss_type: str = "kto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""KTO, Kahneman-Tversky Optimization (Ethayarajh et al., 2024, arXiv:2402.01306), as TRL
    1.16's ``KTOTrainer`` computes it, on unpaired examples each labelled desirable or not.

    With the implied reward :math:`r = \log\pi_\theta(y|x) - \log\pi_{ref}(y|x)` and the
    reference point :math:`z_0 = \max(0, \mathrm{mean}_j[\log\pi_\theta(y'_j|x_j) -
    \log\pi_{ref}(y'_j|x_j)])` over the KL batch (mismatched prompt/completion pairs; TRL
    pairs each prompt with the next example's completion), without gradient (Eq. 7):

    .. math::
        \ell(x, y) = \lambda_D\,(1 - \sigma(\beta(r - z_0)))\ \text{(desirable)},\quad
        \lambda_U\,(1 - \sigma(\beta(z_0 - r)))\ \text{(undesirable)},

    and the loss is their mean over the whole batch, :math:`\frac1B\sum_i \ell_i` (TRL
    concatenates the weighted desirable and undesirable losses and takes the mean: the weights
    are not renormalised and the two classes are not averaged separately).
    ``loss_type="apo_zero_unpaired"`` (APO-zero, D'Oosterlinck et al., 2024,
    arXiv:2408.06266) uses :math:`1 - \sigma(\beta r)` and :math:`\sigma(\beta r)`: KTO with
    :math:`z_0 = 0`; TRL computes no KL term for it, so the KL inputs are an error there.

    Where rljax differs from TRL: ``loss_type="kto"`` without the KL inputs uses
    :math:`z_0 = 0` (TRL always computes the KL batch for ``kto``); :math:`z_0` is the mean
    over the KL batch this call sees (under ``jit`` on a sharded global batch that is the
    global mean, which equals TRL's mean of per-process means when the processes hold equal
    shares); metrics of a class with no example in the batch are 0 where TRL logs nothing,
    and ``count/chosen``/``count/rejected`` are added so that a caller can average metrics
    across batches exactly.

    Args:
      policy_logps: ``[batch]`` sequence log-probs (sums over completion tokens) under the
        policy.
      reference_logps: ``[batch]`` the same under the reference policy (no gradient).
      desirable: ``[batch]`` bool, True for a desirable ("chosen") example.
      kl_policy_logps, kl_reference_logps: ``[kl_batch]`` sequence log-probs of the KL batch
        under the policy and the reference (both or neither; no gradient flows through them).
      beta: :math:`\beta`. May be traced.
      desirable_weight, undesirable_weight: :math:`\lambda_D`, :math:`\lambda_U`. May be traced.
      loss_type: ``"kto"`` or ``"apo_zero_unpaired"`` (``KTO_LOSS_TYPES``).

    Returns:
      ``(loss, metrics)``: scalar ``loss`` and scalar metrics with TRL's names: ``kl``
      (:math:`z_0`), ``rewards/{chosen,rejected}`` (mean :math:`\beta r` per class),
      ``rewards/margins`` (their difference), ``logps/{chosen,rejected}`` (mean policy
      log-probs per class), plus ``count/{chosen,rejected}``.

    Raises:
      ValueError: an unknown ``loss_type``; a non-bool ``desirable``; only one of the KL
        inputs; KL inputs with ``apo_zero_unpaired``. Shape mismatches fail chex's checks.

    Example::

        >>> import jax.numpy as jnp
        >>> from rljax.dpo import kto_loss
        >>> loss, metrics = kto_loss(
        ...     jnp.array([-1.0, -2.0, -3.0]), jnp.array([-1.5, -2.0, -2.5]),  # policy, reference
        ...     jnp.array([True, True, False]),  # desirable?
        ...     jnp.array([-4.0, -5.0, -6.0]), jnp.array([-4.5, -5.0, -6.0]),  # the KL batch
        ... )
        >>> round(float(loss), 4), round(float(metrics["kl"]), 4)
        (0.4931, 0.1667)
    """
    where = "kto_loss"
    _check_loss_type(where, loss_type, KTO_LOSS_TYPES)
    for argument, value in (
        ("kl_policy_logps", kl_policy_logps),
        ("kl_reference_logps", kl_reference_logps),
    ):
        _check_read(
            where, loss_type, argument, value, KTO_ARGUMENT_READERS[argument], value is not None
        )
    _check_kto_inputs(policy_logps, reference_logps, desirable, kl_policy_logps, kl_reference_logps)
    dtype = _working_dtype(policy_logps)
    desirable = jnp.asarray(desirable)
    logps = policy_logps.astype(dtype)
    logratios = logps - jax.lax.stop_gradient(reference_logps.astype(dtype))
    beta = jnp.asarray(beta, dtype)
    if kl_policy_logps is None:
        z0 = jnp.zeros((), dtype)
    else:
        kl = jnp.mean(kl_policy_logps.astype(dtype) - kl_reference_logps.astype(dtype))
        z0 = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    desirable_losses, undesirable_losses = _KTO_LOSS_FUNCTIONS[loss_type](logratios, z0, beta)
    weights = jnp.where(
        desirable, jnp.asarray(desirable_weight, dtype), jnp.asarray(undesirable_weight, dtype)
    )
    per_example = weights * jnp.where(desirable, desirable_losses, undesirable_losses)
    loss = jnp.mean(per_example)
    return loss, _kto_metrics(logps, logratios, desirable, beta, z0)


def _kto_metrics(logps, logratios, desirable, beta, z0) -> dict[str, jax.Array]:
    """TRL's KTO metrics (per-class sums over per-class counts), gradient-free."""
    rewards = jax.lax.stop_gradient(beta * logratios)
    logps = jax.lax.stop_gradient(logps)
    metrics = {"kl": z0}
    for side, mask in (("chosen", desirable), ("rejected", jnp.logical_not(desirable))):
        count = jnp.sum(mask.astype(logps.dtype))
        metrics[f"count/{side}"] = count
        metrics[f"rewards/{side}"] = jnp.sum(jnp.where(mask, rewards, 0.0)) / jnp.maximum(count, 1)
        metrics[f"logps/{side}"] = jnp.sum(jnp.where(mask, logps, 0.0)) / jnp.maximum(count, 1)
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def _check_pair_inputs(where: str, chosen_logps, rejected_logps, chosen_nll):
    """``[batch]`` chosen and rejected log-probs of equal shape; ``chosen_nll`` a scalar."""
    chex.assert_rank([chosen_logps, rejected_logps], 1)
    chex.assert_equal_shape([chosen_logps, rejected_logps])
    if chosen_nll is not None and jnp.ndim(chosen_nll) != 0:
        raise ValueError(
            f"{where}: chosen_nll must be a scalar (the mean token negative log-likelihood of "
            f"the chosen completions); got shape {jnp.shape(chosen_nll)}"
        )


def _nll(chosen_nll, dtype) -> jax.Array:
    return jnp.zeros((), dtype) if chosen_nll is None else jnp.asarray(chosen_nll).astype(dtype)


def _policy_reward_metrics(chosen_logps, rejected_logps, beta) -> dict[str, jax.Array]:
    """Reference-free reward metrics of ORPO and CPO (TRL: reward = beta * policy log-prob)."""
    chosen_logps = jax.lax.stop_gradient(chosen_logps)
    rejected_logps = jax.lax.stop_gradient(rejected_logps)
    chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(beta.dtype)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(chosen_logps),
        "logps/rejected": jnp.mean(rejected_logps),
    }


def _log1mexp(x: jax.Array) -> jax.Array:
    """:math:`\\log(1 - e^x)` for :math:`x \\le 0`, switching formulas at :math:`-\\log 2`
    (Maechler, 2012, "Accurately computing log(1 - exp(-|a|))"), as TRL does; each branch gets
    an input it is finite at, so the unused one cannot put NaN into the gradient."""
    threshold = -math.log(2.0)
    small = x < threshold
    below = jnp.log1p(-jnp.exp(jnp.where(small, x, threshold)))
    above = jnp.log(-jnp.expm1(jnp.where(small, threshold, x)))
    return jnp.where(small, below, above)


def orpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    chosen_nll: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""ORPO, monolithic preference optimization without a reference model (Hong et al., 2024,
    arXiv:2403.07691), as TRL 1.16's ``ORPOTrainer`` computes it.

    With per-sequence *mean* token log-probs :math:`\ell_w, \ell_l` (so
    :math:`P = e^{\ell}` is the geometric-mean token probability) the log odds ratio
    (Eqs. 4 and 7) is

    .. math::
        \log\frac{\mathrm{odds}(y_w)}{\mathrm{odds}(y_l)} = (\ell_w - \ell_l)
            - \big(\log(1 - e^{\ell_w}) - \log(1 - e^{\ell_l})\big),

    and :math:`\mathcal L = \mathcal L_{SFT} - \mathrm{mean}\,\beta\log\sigma(\text{log odds})`
    (``beta`` is the paper's :math:`\lambda`; :math:`\mathcal L_{SFT}` is ``chosen_nll``, taken
    as 0 when ``None``, and is not scaled by ``beta``).

    Where rljax differs from TRL: the NLL term is an input (TRL computes it from the logits;
    pass the mean token NLL over all chosen tokens of the batch to match it), and TRL's
    ``logits/*`` metrics need logits, so they are absent. The inputs must be log-probs
    (:math:`\le 0`): at exactly 0 the odds are infinite and the gradient is not finite, in
    TRL too.

    Args:
      chosen_logps, rejected_logps: ``[batch]`` per-token *mean* log-probs of the chosen and
        rejected completions under the policy (TRL's ``average_log_prob=True``).
      beta: :math:`\lambda`, the weight of the odds-ratio term. May be traced.
      chosen_nll: scalar negative log-likelihood of the chosen completions (with gradient), or
        ``None`` for the odds-ratio term alone.

    Returns:
      ``(loss, metrics)`` with TRL's metric names: ``rewards/{chosen,rejected}`` (mean
      ``beta * logps``), ``rewards/accuracies``, ``rewards/margins``, ``logps/{chosen,rejected}``,
      ``nll_loss``, ``log_odds_ratio`` (TRL's name for the mean of
      :math:`\log\sigma(\text{log odds})`) and ``log_odds_chosen`` (the mean log odds ratio).

    Raises:
      ValueError: ``chosen_nll`` not a scalar. Shape mismatches fail chex's checks.

    Example::

        >>> import jax.numpy as jnp
        >>> from rljax.dpo import orpo_loss
        >>> loss, metrics = orpo_loss(jnp.array([-0.5, -1.0]), jnp.array([-1.5, -1.2]),
        ...                           chosen_nll=jnp.array(0.75))
        >>> round(float(loss), 4), round(float(metrics["log_odds_chosen"]), 4)
        (0.7863, 0.9903)
    """
    _check_pair_inputs("orpo_loss", chosen_logps, rejected_logps, chosen_nll)
    dtype = _working_dtype(chosen_logps)
    chosen_logps, rejected_logps = chosen_logps.astype(dtype), rejected_logps.astype(dtype)
    beta = jnp.asarray(beta, dtype)
    log_odds = (chosen_logps - rejected_logps) - (
        _log1mexp(chosen_logps) - _log1mexp(rejected_logps)
    )
    ratio = log_sigmoid(log_odds)
    nll = _nll(chosen_nll, dtype)
    loss = nll - jnp.mean(beta * ratio)
    metrics = _policy_reward_metrics(chosen_logps, rejected_logps, beta)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    metrics["log_odds_ratio"] = jax.lax.stop_gradient(jnp.mean(ratio))
    metrics["log_odds_chosen"] = jax.lax.stop_gradient(jnp.mean(log_odds))
    return loss, metrics


def _logistic(z: jax.Array, label_smoothing: jax.Array) -> jax.Array:
    """Conservative logistic loss (cDPO, Mitchell, 2023): labels flipped with probability
    ``label_smoothing``."""
    return -log_sigmoid(z) * (1.0 - label_smoothing) - log_sigmoid(-z) * label_smoothing


def _cpo_sigmoid(margin, beta, label_smoothing, simpo_gamma):
    """CPO (Xu et al., 2024, arXiv:2401.08417, Eq. 3), with cDPO's label smoothing as in TRL."""
    del simpo_gamma
    return _logistic(beta * margin, label_smoothing)


def _cpo_hinge(margin, beta, label_smoothing, simpo_gamma):
    """SLiC hinge (Zhao et al., 2023, arXiv:2305.10425) on the policy margin."""
    del label_smoothing, simpo_gamma
    return jax.nn.relu(1.0 - beta * margin)


def _cpo_ipo(margin, beta, label_smoothing, simpo_gamma):
    """IPO (Azar et al., 2023, arXiv:2310.12036, Eq. 17) on the policy margin of per-token mean
    log-probs; ``beta`` is IPO's tau."""
    del label_smoothing, simpo_gamma
    return jnp.square(margin - 1.0 / (2.0 * beta))


def _cpo_simpo(margin, beta, label_smoothing, simpo_gamma):
    """SimPO (Meng et al., 2024, arXiv:2405.14734, Eq. 6) on per-token mean log-probs:
    :math:`-\\log\\sigma(\\beta(\\bar\\ell_w - \\bar\\ell_l) - \\gamma)`, written as TRL does with
    the margin ``simpo_gamma / beta`` subtracted inside, and TRL's label smoothing."""
    return _logistic(beta * (margin - simpo_gamma / beta), label_smoothing)


_CPO_LOSS_FUNCTIONS = {
    "sigmoid": _cpo_sigmoid,
    "hinge": _cpo_hinge,
    "ipo": _cpo_ipo,
    "simpo": _cpo_simpo,
}
CPO_LOSS_TYPES = tuple(_CPO_LOSS_FUNCTIONS)
CPO_ARGUMENT_READERS: Mapping[str, frozenset[str]] = MappingProxyType(
    {"label_smoothing": frozenset({"sigmoid", "simpo"}), "simpo_gamma": frozenset({"simpo"})}
)
"""Optional argument of :func:`cpo_loss` -> the loss types that read it (TRL 1.16: ``hinge``
and ``ipo`` ignore ``label_smoothing`` with a warning; only ``simpo`` reads ``simpo_gamma``).
``label_smoothing`` 0 and ``simpo_gamma`` at its default 0.5 count as not given."""
_SIMPO_GAMMA_DEFAULT = 0.5


def cpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | jax.Array = 0.0,
    simpo_gamma: float | jax.Array = _SIMPO_GAMMA_DEFAULT,
    cpo_alpha: float | jax.Array = 1.0,
    chosen_nll: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""CPO, Contrastive Preference Optimization (Xu et al., 2024, arXiv:2401.08417), and SimPO
    (Meng et al., 2024, arXiv:2405.14734), as TRL 1.16's ``CPOTrainer`` computes them.

    Reference-free: with the policy margin :math:`m = \ell_w - \ell_l` of the chosen and
    rejected log-probs, ``loss = mean_i loss_type(m_i) + cpo_alpha * chosen_nll``, where

    * ``sigmoid`` (CPO, Eq. 3): :math:`-(1-\epsilon)\log\sigma(\beta m) - \epsilon\log\sigma(-\beta m)`
      (:math:`\epsilon` = ``label_smoothing``, cDPO-style);
    * ``hinge`` (SLiC): :math:`\max(0, 1 - \beta m)`;
    * ``ipo`` (IPO, Eq. 17): :math:`(m - 1/(2\beta))^2`;
    * ``simpo`` (SimPO, Eq. 6): the ``sigmoid`` form of :math:`\beta(m - \gamma/\beta)
      = \beta m - \gamma`, :math:`\gamma` = ``simpo_gamma`` (SimPO's target reward margin;
      TRL subtracts ``simpo_gamma / beta`` from the log-prob margin, so the margin in reward
      units is ``simpo_gamma`` itself). SimPO proper is ``cpo_alpha=0``.

    TRL feeds ``sigmoid``/``hinge`` *summed* sequence log-probs and ``ipo``/``simpo`` per-token
    *mean* (length-normalised) log-probs; pass the same to match it. The CPO NLL term is an
    input here (TRL computes it from the logits: the mean token NLL over all chosen tokens of
    the batch); ``None`` makes it 0, so ``cpo_alpha`` then has no effect.

    Where rljax differs from TRL: an argument the loss type does not read raises (TRL warns
    about ``label_smoothing`` with ``hinge``/``ipo`` and ignores it; ``simpo_gamma`` counts as
    given when it is not the default 0.5); AlphaPO's reward transform (TRL's ``alpha``, default
    0) is not covered; TRL's ``logits/*`` metrics need logits and are absent.

    Args:
      chosen_logps, rejected_logps: ``[batch]`` policy log-probs (see above for sum vs mean).
      beta: :math:`\beta` (IPO's :math:`\tau` for ``ipo``). May be traced.
      loss_type: one of ``CPO_LOSS_TYPES``: ``sigmoid``, ``hinge``, ``ipo``, ``simpo``.
      label_smoothing: :math:`\epsilon` in [0, 1] (read by ``sigmoid`` and ``simpo``). May be
        traced (a traced value counts as given).
      simpo_gamma: SimPO's :math:`\gamma` (read by ``simpo``; TRL's default 0.5). May be traced.
      cpo_alpha: weight of the NLL term. May be traced.
      chosen_nll: scalar negative log-likelihood of the chosen completions (with gradient), or
        ``None``.

    Returns:
      ``(loss, metrics)`` with TRL's metric names: ``rewards/{chosen,rejected}`` (mean
      ``beta * logps``), ``rewards/accuracies``, ``rewards/margins``, ``logps/{chosen,rejected}``
      and ``nll_loss``.

    Raises:
      ValueError: an unknown ``loss_type``; ``label_smoothing`` or ``simpo_gamma`` with a type
        that does not read it; a concrete ``label_smoothing`` outside [0, 1]; ``chosen_nll`` not
        a scalar. Shape mismatches fail chex's checks.

    Example::

        >>> import jax.numpy as jnp
        >>> from rljax.dpo import cpo_loss
        >>> loss, metrics = cpo_loss(jnp.array([-0.5, -1.0]), jnp.array([-1.5, -1.2]),
        ...                          beta=2.0, loss_type="simpo", cpo_alpha=0.0)
        >>> round(float(loss), 4), round(float(metrics["rewards/margins"]), 4)
        (0.4729, 1.2)
    """
    where = "cpo_loss"
    _check_loss_type(where, loss_type, CPO_LOSS_TYPES)
    smoothing_given = _given("label_smoothing", label_smoothing)
    gamma_given = _concrete(simpo_gamma) != _SIMPO_GAMMA_DEFAULT or np.ndim(simpo_gamma) != 0
    for argument, value, given in (
        ("label_smoothing", label_smoothing, smoothing_given),
        ("simpo_gamma", simpo_gamma, gamma_given),
    ):
        hint = " (simpo_gamma is SimPO's margin: use loss_type='simpo')" * (
            argument == "simpo_gamma"
        )
        _check_read(where, loss_type, argument, value, CPO_ARGUMENT_READERS[argument], given, hint)
    _check_label_smoothing([loss_type], label_smoothing, str, where)
    _check_pair_inputs(where, chosen_logps, rejected_logps, chosen_nll)
    dtype = _working_dtype(chosen_logps)
    chosen_logps, rejected_logps = chosen_logps.astype(dtype), rejected_logps.astype(dtype)
    beta = jnp.asarray(beta, dtype)
    per_pair = _CPO_LOSS_FUNCTIONS[loss_type](
        chosen_logps - rejected_logps,
        beta,
        jnp.asarray(label_smoothing, dtype),
        jnp.asarray(simpo_gamma, dtype),
    )
    nll = _nll(chosen_nll, dtype)
    loss = jnp.mean(per_pair) + jnp.asarray(cpo_alpha, dtype) * nll
    metrics = _policy_reward_metrics(chosen_logps, rejected_logps, beta)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    return loss, metrics
