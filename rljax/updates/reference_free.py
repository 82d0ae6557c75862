"""Reference-free preference updates: ORPO (:func:`rljax.dpo.orpo_loss`, Hong et al., 2024)
and CPO / SimPO (:func:`rljax.dpo.cpo_loss`, Xu et al., 2024; Meng et al., 2024) bound to a
language model, on the same preference batches as :func:`rljax.updates.make_dpo_update`.

Neither method has a reference model: one forward pass of the policy on chosen and rejected
(either batch layout of :func:`rljax.lm.pair_sequence_logps`) gives the summed completion
log-probs and token counts, from which each method takes what TRL 1.16 feeds it:

* ORPO (``ORPOTrainer``): per-token *mean* log-probs, and the NLL term on the chosen
  completions (the mean token NLL over all chosen tokens of the batch);
* CPO (``CPOTrainer``): *summed* log-probs for ``sigmoid``/``hinge``, per-token *mean* ones for
  ``ipo``/``simpo``, plus ``cpo_alpha`` times the same NLL term (SimPO proper:
  ``loss_type="simpo", cpo_alpha=0``).

The chosen NLL is one global ratio (summed log-probs over summed counts of the whole batch),
so under data parallelism it is the exact global-batch value, as TRL's cross-entropy on one
device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rljax import checks
from rljax.dpo import CPO_ARGUMENT_READERS, CPO_LOSS_TYPES, cpo_loss, orpo_loss
from rljax.updates.common import (
    OptaxState,
    check_config,
    float_coefficients,
    init_optax_state,
    make_objective_eval,
    make_optax_update,
    traced_config,
)
from rljax.updates.lm import pair_sequence_logps

__all__ = [
    "CPOConfig",
    "ORPOConfig",
    "ReferenceFreeState",
    "init_reference_free_state",
    "make_reference_free_eval",
    "make_reference_free_update",
]

#: CPO loss types that TRL feeds per-token mean (length-normalised) log-probs.
_MEAN_LOGP_TYPES = ("ipo", "simpo")


def _check_chunk_size(config) -> None:
    if not isinstance(config.chunk_size, int) or config.chunk_size < 1:
        raise ValueError(
            f"{type(config).__name__}.chunk_size must be a positive int, got {config.chunk_size}"
        )


@dataclasses.dataclass(frozen=True)
class ORPOConfig:
    """Settings of an ORPO step (:func:`make_reference_free_update`).

    Attributes:
      beta: :math:`\\lambda`, the weight of the odds-ratio term (TRL's ``beta``).
      chunk_size: rows per chunk of the chunked log-prob computation.
    """

    beta: float = 0.1
    chunk_size: int = 1024

    def __post_init__(self):
        checks.check(self, {"beta": "> 0"}, library=True)
        _check_chunk_size(self)

    def traced_coefficients(self) -> tuple[str, ...]:
        """The ``hyperparams`` keys a step traces: ``("beta",)``."""
        return float_coefficients(self)


@dataclasses.dataclass(frozen=True)
class CPOConfig:
    """Settings of a CPO / SimPO step (:func:`make_reference_free_update`).

    Attributes:
      beta: :math:`\\beta` of :func:`rljax.dpo.cpo_loss` (IPO's :math:`\\tau` for ``ipo``).
      loss_type: one of ``rljax.dpo.CPO_LOSS_TYPES``: ``sigmoid`` (CPO), ``hinge``, ``ipo``,
        ``simpo``.
      label_smoothing: :math:`\\epsilon` (``sigmoid`` and ``simpo`` only); ``None`` = 0.
      simpo_gamma: SimPO's target margin :math:`\\gamma` (``simpo`` only); ``None`` = TRL's 0.5.
      cpo_alpha: weight of the NLL term on the chosen completions (0 = SimPO proper).
      chunk_size: rows per chunk of the chunked log-prob computation.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float | None = None
    simpo_gamma: float | None = None
    cpo_alpha: float = 1.0
    chunk_size: int = 1024

    def __post_init__(self):
        checks.check_choice(self, "loss_type", CPO_LOSS_TYPES, library=True)
        checks.check(
            self,
            {"beta": "> 0", "cpo_alpha": ">= 0", "label_smoothing": ">= 0"},
            library=True,
        )
        for field in ("label_smoothing", "simpo_gamma"):
            readers = CPO_ARGUMENT_READERS[field]
            if getattr(self, field) is not None and self.loss_type not in readers:
                raise ValueError(
                    f"CPOConfig.{field} is set but loss_type={self.loss_type!r} does not read it "
                    f"(read by {sorted(readers)}); leave it None"
                )
        _check_chunk_size(self)

    def traced_coefficients(self) -> tuple[str, ...]:
        """The ``hyperparams`` keys a step traces: ``beta``, ``cpo_alpha`` and whichever of
        ``label_smoothing`` / ``simpo_gamma`` the config sets."""
        return float_coefficients(self)


class ReferenceFreeState(OptaxState):
    """Train state of :func:`make_reference_free_update` (an :class:`OptaxState`: ``params``,
    ``opt_state``, ``step``, ``nonfinite_updates``)."""


def init_reference_free_state(params, optimizer) -> ReferenceFreeState:
    """The initial :class:`ReferenceFreeState` (``optimizer.init(params)``, step 0)."""
    return init_optax_state(ReferenceFreeState, params, optimizer)


def _loss(config: ORPOConfig | CPOConfig, chosen, rejected, chosen_len, rejected_len, nll):
    """The method's loss on summed log-probs and counts (mean ones where TRL uses them)."""
    mean_chosen = chosen / jnp.maximum(chosen_len, 1.0)
    mean_rejected = rejected / jnp.maximum(rejected_len, 1.0)
    if isinstance(config, ORPOConfig):
        return orpo_loss(mean_chosen, mean_rejected, beta=config.beta, chosen_nll=nll)
    mean = config.loss_type in _MEAN_LOGP_TYPES
    optional = {
        k: getattr(config, k)
        for k in ("label_smoothing", "simpo_gamma")
        if getattr(config, k) is not None
    }
    return cpo_loss(
        mean_chosen if mean else chosen,
        mean_rejected if mean else rejected,
        beta=config.beta,
        loss_type=config.loss_type,
        cpo_alpha=config.cpo_alpha,
        chosen_nll=nll,
        **optional,
    )


def _objective(graphdef, config) -> tuple[Callable, Callable]:
    where = f"make_reference_free_update({type(config).__name__})"

    def prepare(state, batch, hyperparams: Mapping[str, Any] | None = None):
        return traced_config(config, hyperparams, where=where)

    def objective(params, step_config, batch):
        chosen, rejected, chosen_len, rejected_len = pair_sequence_logps(
            graphdef, params, batch, chunk_size=config.chunk_size
        )
        nll = -jnp.sum(chosen) / jnp.maximum(jnp.sum(chosen_len), 1.0)
        loss, metrics = _loss(step_config, chosen, rejected, chosen_len, rejected_len, nll)
        return loss, {"loss": loss, **metrics}

    return prepare, objective


def make_reference_free_update(
    graphdef, optimizer, config: ORPOConfig | CPOConfig = ORPOConfig()
) -> Callable[..., tuple[ReferenceFreeState, dict[str, jax.Array]]]:
    """The pure step ``update(state, batch, hyperparams=None) -> (state, metrics)`` of ORPO
    (an :class:`ORPOConfig`) or CPO / SimPO (a :class:`CPOConfig`) on a language model.

    One guarded optax step (:func:`rljax.finite.guarded_step`) on the method's loss; the batch
    is a preference batch as for :func:`rljax.updates.make_dpo_update` (padded pairs or the
    shared-prompt layout), with no reference log-probs. ``hyperparams``: a dict with any of
    ``config.traced_coefficients()`` (traced under jit: a sweep compiles once; equal to the
    step built with ``dataclasses.replace(config, **hyperparams)``).

    Metrics (TRL's names): ``loss``, ``rewards/{chosen,rejected,accuracies,margins}``,
    ``logps/{chosen,rejected}``, ``nll_loss`` (and for ORPO ``log_odds_ratio``,
    ``log_odds_chosen``), plus ``grad_norm``, ``nonfinite`` and ``nonfinite_updates``.

    Example (a sweep over ORPO's weight with one compilation)::

        step = jax.jit(make_reference_free_update(graphdef, optax.adamw(1e-4), ORPOConfig()))
        state = init_reference_free_state(params, optax.adamw(1e-4))
        for beta in (0.05, 0.1, 0.2):
            state, metrics = step(state, batch, {"beta": beta})
    """
    check_config(config, (ORPOConfig, CPOConfig), "make_reference_free_update")
    prepare, objective = _objective(graphdef, config)
    return make_optax_update(objective, optimizer, prepare)


def make_reference_free_eval(
    graphdef, config: ORPOConfig | CPOConfig = ORPOConfig()
) -> Callable[..., dict[str, jax.Array]]:
    """The metrics of :func:`make_reference_free_update` on held-out pairs, without an update:
    ``evaluate(state, batch, hyperparams=None) -> metrics``."""
    check_config(config, (ORPOConfig, CPOConfig), "make_reference_free_eval")
    prepare, objective = _objective(graphdef, config)
    return make_objective_eval(objective, prepare)
