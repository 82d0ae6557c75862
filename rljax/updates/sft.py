"""The supervised fine-tuning update: :func:`make_sft_update` and :func:`make_sft_eval` bind
:func:`rljax.sft.sft_loss` to a language model, on padded or packed rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rljax.logprobs import chunked_token_logprobs, chunked_token_logprobs_and_entropy
from rljax.models.moe import load_balancing_loss
from rljax.sft import NORMALIZATIONS, sft_loss
from rljax.updates.common import (
    OptaxState,
    check_config,
    init_optax_state,
    make_objective_eval,
    make_optax_update,
    require_keys,
)
from rljax.updates.lm import merge

__all__ = [
    "SFT_BATCH_KEYS",
    "SFTConfig",
    "SFTState",
    "init_sft_state",
    "make_sft_eval",
    "make_sft_update",
    "sft_token_logps",
]

SFT_BATCH_KEYS = ("tokens", "mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Static settings of :func:`make_sft_update` and :func:`make_sft_eval`.

    Attributes:
      normalize: ``"tokens"`` (TRL's SFT loss) or ``"sequences"``, as :func:`rljax.sft.sft_loss`.
      chunk_size: rows per chunk of :func:`rljax.logprobs.chunked_token_logprobs`.
      token_accuracy: report ``mean_token_accuracy`` (one more chunked ``hidden @ W`` pass,
        without gradient, for the argmax).
      entropy: report ``entropy`` (the chunked log-prob pass also computes entropies).
      router_aux_loss_coef: weight of a mixture-of-experts model's load-balancing loss
        (:func:`rljax.models.moe.load_balancing_loss` over the real tokens of the batch, the
        Switch Transformer's auxiliary loss) added to the loss and reported as
        ``router_aux_loss``; 0 leaves it out. transformers adds
        ``config.router_aux_loss_coef`` (0.001 in Qwen3-MoE and Mixtral) times it when
        ``output_router_logits`` is set. Static: a new value recompiles the step.
    """

    normalize: str = "tokens"
    chunk_size: int = 1024
    token_accuracy: bool = True
    entropy: bool = False
    router_aux_loss_coef: float = 0.0

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(
                f"SFTConfig.normalize: {self.normalize!r} is not one of {NORMALIZATIONS}"
            )
        if int(self.chunk_size) < 1:
            raise ValueError(f"SFTConfig.chunk_size: must be >= 1, got {self.chunk_size}")
        if float(self.router_aux_loss_coef) < 0:
            raise ValueError(
                f"SFTConfig.router_aux_loss_coef: must be >= 0, got {self.router_aux_loss_coef}"
            )


class SFTState(OptaxState):
    """Train state of :func:`make_sft_update`: a :class:`rljax.updates.common.OptaxState`
    (``params``, ``opt_state``, ``step``, ``nonfinite_updates``; a pytree)."""

    __slots__ = ()


def init_sft_state(params, optimizer) -> SFTState:
    """Initial :class:`SFTState`."""
    return init_optax_state(SFTState, params, optimizer)


def _check_batch(batch: Mapping[str, Any]) -> None:
    hint = (
        "tokens, mask, loss_mask [B, T]: rljax.data.tokenize_completions; packed rows add "
        "segment_ids and positions: rljax.data.pack"
    )
    require_keys(batch, SFT_BATCH_KEYS, "SFT", hint)
    shape = np.shape(batch["tokens"])
    keys = (*SFT_BATCH_KEYS, "segment_ids", "positions")
    bad = {k: np.shape(batch[k]) for k in keys if k in batch and np.shape(batch[k]) != shape}
    if bad or len(shape) != 2:
        raise ValueError(f"SFT batch arrays must all be [B, T] like tokens {shape}: {bad}")


def _chunked_argmax(hidden: jax.Array, unembedding: jax.Array, chunk_size: int) -> jax.Array:
    """``argmax(hidden @ unembedding, -1)`` ``[...]``, one chunk of rows at a time, no
    gradient (for the token accuracy)."""
    hidden, unembedding = jax.lax.stop_gradient((hidden, unembedding))
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    flat = hidden.reshape(-1, d)
    n = flat.shape[0]
    chunk = min(chunk_size, n)
    pad = -n % chunk
    flat = jnp.pad(flat, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    best = jax.lax.map(lambda h: jnp.argmax(h @ unembedding, axis=-1).astype(jnp.int32), flat)
    return best.reshape(-1)[:n].reshape(lead)


def sft_token_logps(
    graphdef: Any, params: Any, batch: Mapping[str, Any], config: SFTConfig = SFTConfig()
) -> dict[str, jax.Array]:
    """The per-token quantities :func:`rljax.sft.sft_loss` takes, from one forward pass.

    ``batch``: ``tokens``, ``mask``, ``loss_mask`` ``[B, T]`` (padded rows), plus
    ``segment_ids`` and ``positions`` for packed rows (:func:`rljax.data.pack`; the model
    attends within segments). Entry ``t - 1`` of each output belongs to ``tokens[:, t]``.

    Returns ``{"logps", "mask", "segment_ids" (or None), "correct" (or None), "entropy" (or
    None)}``, each ``[B, T - 1]``; ``mask`` is ``loss_mask & mask`` shifted; and
    ``"router_aux_loss"``, the load-balancing loss (a scalar) with
    ``config.router_aux_loss_coef > 0``, else None.
    """
    _check_batch(batch)
    model = merge(graphdef, params)
    tokens = jnp.asarray(batch["tokens"])
    mask = jnp.asarray(batch["mask"]).astype(bool)
    segment_ids = batch.get("segment_ids")
    positions = batch.get("positions")
    aux = bool(config.router_aux_loss_coef)
    decoded = model.decode(
        tokens,
        mask,
        positions=None if positions is None else jnp.asarray(positions),
        segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
        return_router_logits=aux,
    )
    hidden, router_aux_loss = decoded[0], None
    if aux:  # decoded = (hidden, cache, router_logits [L, B, T, E])
        top_k = model.config.num_experts_per_tok
        router_aux_loss = load_balancing_loss(decoded[2], top_k, mask)
    hidden, targets, w = hidden[:, :-1], tokens[:, 1:], model.unembedding()
    softcap = model.config.final_logit_softcap  # monotone: the argmax below needs none
    entropy = correct = None
    if config.entropy:
        logps, entropy = chunked_token_logprobs_and_entropy(
            hidden, w, targets, chunk_size=config.chunk_size, softcap=softcap
        )
    else:
        logps = chunked_token_logprobs(
            hidden, w, targets, chunk_size=config.chunk_size, softcap=softcap
        )
    if config.token_accuracy:
        correct = _chunked_argmax(hidden, w, config.chunk_size) == targets
    counted = jnp.asarray(batch["loss_mask"]).astype(bool)[:, 1:] & mask[:, 1:]
    return {
        "logps": logps,
        "mask": counted,
        "segment_ids": None if segment_ids is None else jnp.asarray(segment_ids)[:, 1:],
        "correct": correct,
        "entropy": entropy,
        "router_aux_loss": router_aux_loss,
    }


def _sft_objective(graphdef, config: SFTConfig) -> Callable:
    def objective(params, _, batch):
        out = sft_token_logps(graphdef, params, batch, config)
        loss, metrics = sft_loss(
            out["logps"],
            out["mask"],
            normalize=config.normalize,
            segment_ids=out["segment_ids"],
            correct=out["correct"],
            entropy=out["entropy"],
        )
        if out["router_aux_loss"] is not None:
            loss = loss + config.router_aux_loss_coef * out["router_aux_loss"]
            metrics = {**metrics, "loss": loss, "router_aux_loss": out["router_aux_loss"]}
        return loss, metrics

    return objective


def make_sft_update(
    graphdef, optimizer, config: SFTConfig = SFTConfig()
) -> Callable[[SFTState, dict], tuple[SFTState, dict[str, jax.Array]]]:
    """Build the pure supervised fine-tuning step ``update(state, batch) -> (state, metrics)``.

    One optax step on :func:`rljax.sft.sft_loss` of the model's per-token log-probs
    (:func:`sft_token_logps`: padded rows, or packed rows with ``segment_ids`` and
    ``positions``). A non-finite loss or gradient skips the step
    (:func:`rljax.finite.step_if_finite`) and is counted in ``state.nonfinite_updates``.

    Metrics: those of :func:`rljax.sft.sft_loss` (``loss``, ``nll_sum``, ``num_tokens``,
    ``num_sequences``, ``mean_token_accuracy``, ``entropy`` as configured; ``loss`` includes
    the load-balancing term and ``router_aux_loss`` is added with ``router_aux_loss_coef``),
    ``grad_norm``, ``nonfinite`` and ``nonfinite_updates``. Not jitted: jit it with
    :func:`rljax.lm.compile_update` (sharded, donated); means are over the global batch.
    """
    check_config(config, SFTConfig, "make_sft_update")
    return make_optax_update(_sft_objective(graphdef, config), optimizer)


def make_sft_eval(
    graphdef, config: SFTConfig = SFTConfig()
) -> Callable[[SFTState, dict], dict[str, jax.Array]]:
    """The metrics of :func:`make_sft_update` on held-out rows, without an update:
    ``evaluate(state, batch) -> metrics`` (no ``grad_norm``; ``nll_sum`` / ``num_tokens``
    add up over batches to the exact held-out token mean)."""
    check_config(config, SFTConfig, "make_sft_eval")
    return make_objective_eval(_sft_objective(graphdef, config))
