"""The KTO update: :func:`make_kto_update` and :func:`make_kto_eval` bind
:func:`rljax.dpo.kto_loss` (Kahneman-Tversky Optimization, Ethayarajh et al., 2024,
arXiv:2402.01306) to a language model, on unpaired completions each labelled desirable or not;
:func:`mismatched_pairs` builds the KL batch (each prompt with another row's completion) in
the data step, as TRL's ``KTOTrainer`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rljax import checks
from rljax.dpo import KTO_LOSS_TYPES, kto_loss
from rljax.updates.common import (
    check_config,
    fields_of,
    make_objective_eval,
    make_optax_update,
    reference_params,
)
from rljax.updates.dpo import DPOState, init_dpo_state
from rljax.updates.lm import reference_logps, sequence_logps

__all__ = [
    "KTO_BATCH_KEYS",
    "KTO_KL_KEYS",
    "KTO_REFERENCE_MODES",
    "KTOConfig",
    "init_kto_state",
    "kto_reference_logps",
    "make_kto_eval",
    "make_kto_update",
    "mismatched_pairs",
]

KTO_REFERENCE_MODES = ("precomputed", "model")
#: The unpaired batch: prompt + completion rows ``[B, T]`` and ``desirable`` ``[B]`` bool.
KTO_BATCH_KEYS = ("tokens", "mask", "loss_mask", "desirable")
#: The KL batch of :func:`mismatched_pairs` (``loss_type="kto"`` only).
KTO_KL_KEYS = ("kl_tokens", "kl_mask", "kl_loss_mask")


@dataclasses.dataclass(frozen=True)
class KTOConfig:
    """Settings of :func:`make_kto_update` and :func:`make_kto_eval`.

    Attributes:
      beta: :math:`\\beta` of :func:`rljax.dpo.kto_loss`.
      desirable_weight, undesirable_weight: :math:`\\lambda_D`, :math:`\\lambda_U`.
      loss_type: ``"kto"`` (with the KL reference point :math:`z_0` from the batch's
        mismatched pairs) or ``"apo_zero_unpaired"`` (no KL batch).
      chunk_size: rows per chunk of the chunked log-prob computation.
      reference: ``"precomputed"`` (the batch's ``ref_logps`` and, for ``"kto"``,
        ``ref_kl_logps``: :func:`kto_reference_logps`) or ``"model"`` (a forward pass of the
        frozen ``state.ref_params`` in every step).
      nll_alpha: weight of an NLL term on the desirable completions (the mean token NLL over
        all desirable tokens of the batch, as RPO adds to DPO: Pang et al., 2024); ``None`` =
        off, TRL's KTO. Not in TRL's ``KTOTrainer``: an rljax option.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"
    chunk_size: int = 1024
    reference: str = "precomputed"
    nll_alpha: float | None = None

    def __post_init__(self):
        checks.check_choice(self, "loss_type", KTO_LOSS_TYPES, library=True)
        checks.check_choice(self, "reference", KTO_REFERENCE_MODES, library=True)
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"KTOConfig.chunk_size must be a positive int, got {self.chunk_size}")
        checks.check(
            self,
            {
                "beta": "> 0",
                "desirable_weight": ">= 0",
                "undesirable_weight": ">= 0",
                "nll_alpha": ">= 0",
            },
            library=True,
        )

    @property
    def uses_kl(self) -> bool:
        """Whether the loss reads the KL batch (TRL computes it for ``"kto"`` only)."""
        return self.loss_type == "kto"


def mismatched_pairs(arrays: Mapping[str, Any], group_size: int) -> dict[str, np.ndarray]:
    """TRL's KL batch: within each consecutive group of ``group_size`` rows the completions are
    rotated by one, ``(x_1, y_1), ..., (x_n, y_n) -> (x_1, y_n), (x_2, y_1), ..., (x_n,
    y_{n-1})`` (the last group may be shorter). Rows follow the :mod:`rljax.data` contract
    (``tokens``, ``mask``, ``loss_mask`` ``[N, T]``: a prompt, then the completion in
    ``loss_mask``); each new row is its prompt then the other completion, cut at ``T`` and
    right-padded with token 0 (mask 0).

    Batches drawn in order (``rljax.data.Batches(..., shuffle=False)``, ``batch_size =
    group_size``) then hold as KL completions exactly the completions of the batch, as TRL's
    sequential sampling does. Returns ``{"kl_tokens", "kl_mask", "kl_loss_mask"}`` (numpy).
    """
    if group_size < 1:
        raise ValueError(f"mismatched_pairs: group_size must be >= 1, got {group_size}")
    tokens, mask = np.asarray(arrays["tokens"]), np.asarray(arrays["mask"]).astype(bool)
    loss_mask = np.asarray(arrays["loss_mask"]).astype(bool) & mask
    n, length = tokens.shape
    prompts = [tokens[i][mask[i] & ~loss_mask[i]] for i in range(n)]
    completions = [tokens[i][loss_mask[i]] for i in range(n)]
    kl_tokens = np.zeros_like(tokens)
    kl_mask = np.zeros(tokens.shape, bool)
    kl_loss_mask = np.zeros(tokens.shape, bool)
    for start in range(0, n, group_size):
        group = np.arange(start, min(start + group_size, n))
        for i, j in zip(group, np.roll(group, 1), strict=True):
            row = np.concatenate([prompts[i], completions[j]])[:length]
            kl_tokens[i, : len(row)] = row
            kl_mask[i, : len(row)] = True
            kl_loss_mask[i, len(prompts[i]) : len(row)] = True
    return {"kl_tokens": kl_tokens, "kl_mask": kl_mask, "kl_loss_mask": kl_loss_mask}


def kto_reference_logps(
    graphdef, ref_params, arrays: Mapping[str, Any], *, chunk_size: int = 1024, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """The reference policy's sequence log-probs of the rows (``ref_logps`` ``[N]``) and, where
    ``arrays`` has the KL batch (:func:`mismatched_pairs`), of the KL rows (``ref_kl_logps``),
    for ``KTOConfig(reference="precomputed")`` (one jitted forward per ``batch_size`` rows,
    :func:`rljax.updates.lm.reference_logps`)."""
    kl = "kl_tokens" in arrays
    side = ("kl_" if kl else "") + "{}"
    rows = {
        **{f"chosen_{k}": arrays[k] for k in ("tokens", "mask", "loss_mask")},
        **{f"rejected_{k}": arrays[side.format(k)] for k in ("tokens", "mask", "loss_mask")},
    }
    out = reference_logps(graphdef, ref_params, rows, chunk_size=chunk_size, batch_size=batch_size)
    result = {"ref_logps": out["ref_chosen_logps"]}
    if kl:
        result["ref_kl_logps"] = out["ref_rejected_logps"]
    return result


def _require(batch: Mapping[str, Any], keys, why: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"make_kto_update: the batch lacks {missing} ({why})")


def _desirable_nll(logps: jax.Array, counts: jax.Array, desirable: jax.Array) -> jax.Array:
    """Mean token NLL over the desirable rows' completion tokens (0 if the batch has none)."""
    total = jnp.sum(jnp.where(desirable, logps, 0.0))
    return -total / jnp.maximum(jnp.sum(jnp.where(desirable, counts, 0.0)), 1.0)


def _kto_objective(graphdef, config: KTOConfig) -> tuple[Callable, Callable]:
    """``reference(state, batch) -> (ref_logps, ref_kl_logps)`` and ``objective(params, ref,
    batch) -> (loss, metrics)``."""

    def logps_and_counts(params, batch, prefix=""):
        return sequence_logps(
            graphdef,
            params,
            jnp.asarray(batch[f"{prefix}tokens"]),
            jnp.asarray(batch[f"{prefix}mask"]),
            jnp.asarray(batch[f"{prefix}loss_mask"]),
            chunk_size=config.chunk_size,
        )

    def logps(params, batch, prefix=""):
        return logps_and_counts(params, batch, prefix)[0]

    def reference(state: DPOState, batch):
        ref_params = reference_params(state)
        _require(batch, KTO_BATCH_KEYS, "the unpaired rows")
        if config.uses_kl:
            _require(batch, KTO_KL_KEYS, "loss_type='kto' needs the KL batch: mismatched_pairs")
        if config.reference == "precomputed":
            keys = ("ref_logps", "ref_kl_logps") if config.uses_kl else ("ref_logps",)
            _require(batch, keys, "reference='precomputed': kto_reference_logps")
            ref_kl = jnp.asarray(batch["ref_kl_logps"]) if config.uses_kl else None
            return jnp.asarray(batch["ref_logps"]), ref_kl
        if ref_params is None:
            raise ValueError(
                "KTOConfig(reference='model') needs state.ref_params (init_dpo_state(params, "
                "optimizer, ref_params=...))"
            )
        frozen = jax.lax.stop_gradient(ref_params)
        ref_kl = logps(frozen, batch, "kl_") if config.uses_kl else None
        return jax.lax.stop_gradient(logps(frozen, batch)), jax.lax.stop_gradient(ref_kl)

    def objective(params, ref, batch):
        ref_logps, ref_kl_logps = ref
        kl_logps = None
        if config.uses_kl:  # TRL computes the KL log-probs without gradient
            kl_logps = logps(jax.lax.stop_gradient(params), batch, "kl_")
        policy_logps, counts = logps_and_counts(params, batch)
        desirable = jnp.asarray(batch["desirable"]).astype(bool)
        loss, metrics = kto_loss(
            policy_logps,
            ref_logps,
            desirable,
            kl_logps,
            ref_kl_logps,
            **fields_of(config, "beta", "desirable_weight", "undesirable_weight", "loss_type"),
        )
        if config.nll_alpha is not None:
            nll = _desirable_nll(policy_logps, counts, desirable)
            loss = loss + config.nll_alpha * nll
            metrics["nll_loss"] = jax.lax.stop_gradient(nll)
        return loss, {"loss": loss, **metrics}

    return reference, objective


def make_kto_update(
    graphdef, optimizer, config: KTOConfig = KTOConfig()
) -> Callable[[DPOState, dict], tuple[DPOState, dict[str, jax.Array]]]:
    """Build the pure KTO step ``update(state, batch) -> (state, metrics)`` for a Flax NNX
    language model: one optax step on :func:`rljax.dpo.kto_loss` of the batch's sequence
    log-probs.

    The state is a :class:`rljax.updates.DPOState` (:func:`rljax.updates.init_dpo_state`; pass
    ``ref_params`` for ``reference="model"``). The ``batch`` holds the unpaired rows
    ``tokens``, ``mask``, ``loss_mask`` (``[B, T]``, prompt + completion, the :mod:`rljax.data`
    contract) and ``desirable`` (``[B]`` bool); for ``loss_type="kto"`` the KL batch
    ``kl_tokens``, ``kl_mask``, ``kl_loss_mask`` (:func:`mismatched_pairs`); for
    ``reference="precomputed"`` ``ref_logps`` and (``"kto"``) ``ref_kl_logps`` ``[B]``
    (:func:`kto_reference_logps`). The KL rows' policy log-probs carry no gradient (as in TRL:
    :math:`z_0` is a constant of the step).

    Metrics (TRL's names, scalars): ``loss``, ``kl``, ``rewards/{chosen,rejected}``,
    ``rewards/margins``, ``logps/{chosen,rejected}``, ``count/{chosen,rejected}`` (desirable /
    undesirable rows), ``nll_loss`` (with ``config.nll_alpha``), ``grad_norm``, ``nonfinite`` and ``nonfinite_updates``
    (:func:`rljax.finite.step_if_finite`: a non-finite update is skipped, the parameters and
    optimizer state stay unchanged). Not jitted: jit it with donated state, or use
    :func:`rljax.updates.lm.compile_update`.
    """
    check_config(config, KTOConfig, "make_kto_update")
    reference, objective = _kto_objective(graphdef, config)
    return make_optax_update(objective, optimizer, reference)


def make_kto_eval(graphdef, config: KTOConfig = KTOConfig()) -> Callable[..., dict]:
    """The metrics of :func:`make_kto_update` without an update: ``evaluate(state, batch) ->
    metrics`` (no ``grad_norm``). Pure; jit it."""
    check_config(config, KTOConfig, "make_kto_eval")
    reference, objective = _kto_objective(graphdef, config)
    return make_objective_eval(objective, reference)


init_kto_state = init_dpo_state  # the same train state
