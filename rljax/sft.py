r"""Supervised fine-tuning (SFT): the masked next-token negative log-likelihood.

.. math::

    \mathcal{L}_\text{tokens} = -\frac{\sum_{b,t} m_{bt} \log\pi(y_{bt} \mid y_{b,<t})}
                                      {\sum_{b,t} m_{bt}}
    \qquad
    \mathcal{L}_\text{sequences} = \frac{1}{|S|} \sum_{s \in S}
        -\frac{\sum_{t \in s} m_t \log\pi(y_t \mid y_{<t})}{\sum_{t \in s} m_t}

``m`` is the loss mask: 1 at the completion tokens (TRL's ``completion_only_loss``, its
default for prompt-completion data) or at every real token (``completion_only_loss=False`` /
plain ``text`` data). ``"tokens"`` is TRL's SFT loss (every counted token weighs the same;
the mean over the global batch, ``num_items_in_batch``); ``"sequences"`` weighs every sequence
the same (the mean of per-sequence mean NLLs, as ``loss_type="dapo"`` vs ``"grpo"`` in
:mod:`rljax.rlhf`). With packed rows (:func:`rljax.data.pack`) pass ``segment_ids`` so that a
sequence is one segment of a row, not the row: the packed loss then equals the unpacked one.

Arrays in, ``(loss, metrics)`` out: no model, no optimizer. The per-token log-probs come from
any forward pass (e.g. :func:`rljax.lm.token_logps`, aligned with ``tokens[:, 1:]``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

__all__ = ["NORMALIZATIONS", "sft_loss"]

NORMALIZATIONS = ("tokens", "sequences")


def _sequence_means(nll, mask_f, segment_ids):
    """Mean NLL of every sequence with a counted token, and the number of such sequences.

    A sequence is a row (``segment_ids`` None) or a ``(row, segment id)`` pair; the segment
    sums use one ``segment_sum`` over ``row * (T + 1) + segment`` (ids are < T + 1: a row of
    ``T`` tokens holds at most ``T`` segments)."""
    if segment_ids is None:
        sums, counts = jnp.sum(nll * mask_f, axis=-1), jnp.sum(mask_f, axis=-1)
    else:
        b, t = nll.shape
        ids = jnp.clip(segment_ids.astype(jnp.int32), 0, t)
        flat = (jnp.arange(b, dtype=jnp.int32)[:, None] * (t + 1) + ids).reshape(-1)
        sums = jax.ops.segment_sum((nll * mask_f).reshape(-1), flat, num_segments=b * (t + 1))
        counts = jax.ops.segment_sum(mask_f.reshape(-1), flat, num_segments=b * (t + 1))
    present = counts > 0
    means = jnp.where(present, sums / jnp.where(present, counts, 1.0), 0.0)
    return jnp.sum(means), jnp.sum(present.astype(nll.dtype))


def sft_loss(
    logps: jax.Array,
    mask: jax.Array,
    *,
    normalize: str = "tokens",
    segment_ids: jax.Array | None = None,
    num_items: jax.Array | float | None = None,
    correct: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The masked next-token loss of supervised fine-tuning (see the module docstring).

    Args:
      logps: ``[B, T]`` per-token log-probs of the target tokens (natural log).
      mask: ``[B, T]`` loss mask, 1 at the tokens whose log-probs count (the completion only,
        or the whole sequence). Masked entries of ``logps`` may hold anything finite or not:
        they are replaced by 0 before any arithmetic, so they reach neither loss nor gradient.
      normalize: ``"tokens"`` (TRL: mean over every counted token of the batch) or
        ``"sequences"`` (mean over sequences of each sequence's mean token NLL; sequences with
        no counted token are left out).
      segment_ids: optional ``int [B, T]`` segment ids of packed rows (0 = padding), aligned
        with ``logps``; a sequence is then a ``(row, segment)`` pair. Only read by
        ``"sequences"`` (the token mean needs no segments).
      num_items: for ``"tokens"``, the normaliser to divide the summed NLL by instead of this
        batch's count (the global token count when accumulating gradients over micro-batches,
        TRL's ``num_items_in_batch``).
      correct: optional ``[B, T]`` bool, True where the model's most likely token is the
        target: adds ``mean_token_accuracy`` (TRL's metric) over counted tokens.
      entropy: optional ``[B, T]`` per-token entropy of the model's distribution: adds
        ``entropy`` (mean over counted tokens; no gradient flows through the metric).

    Returns:
      ``(loss, metrics)``: ``loss`` (the returned loss), ``nll_sum`` and ``num_tokens`` (the
      summed NLL and the count of counted tokens: they add exactly across micro-batches and
      shards), ``num_sequences`` (sequences with a counted token), and the optional
      ``mean_token_accuracy`` and ``entropy``.
    """
    chex.assert_rank([logps, mask], 2)
    chex.assert_equal_shape([logps, mask])
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    dtype = jnp.promote_types(logps.dtype, jnp.float32)
    counted = mask.astype(bool)
    mask_f = counted.astype(dtype)
    nll = -jnp.where(counted, logps.astype(dtype), 0.0)
    nll_sum, num_tokens = jnp.sum(nll), jnp.sum(mask_f)
    if segment_ids is not None:
        chex.assert_equal_shape([logps, segment_ids])
    seq_sum, num_sequences = _sequence_means(nll, mask_f, segment_ids)
    if normalize == "tokens":
        denominator = jnp.maximum(num_tokens, 1.0) if num_items is None else num_items
        loss = nll_sum / jnp.asarray(denominator, dtype)
    else:
        loss = seq_sum / jnp.maximum(num_sequences, 1.0)
    metrics = {
        "loss": loss,
        "nll_sum": nll_sum,
        "num_tokens": num_tokens,
        "num_sequences": num_sequences,
    }
    denominator = jnp.maximum(num_tokens, 1.0)
    if correct is not None:
        chex.assert_equal_shape([logps, correct])
        hits = jnp.sum(jnp.where(counted, correct.astype(dtype), 0.0))
        metrics["mean_token_accuracy"] = hits / denominator
    if entropy is not None:
        chex.assert_equal_shape([logps, entropy])
        summed = jnp.sum(jnp.where(counted, jax.lax.stop_gradient(entropy).astype(dtype), 0.0))
        metrics["entropy"] = summed / denominator
    return loss, metrics
