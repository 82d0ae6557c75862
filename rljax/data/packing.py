"""Sequence packing: several sequences in one ``[max_length]`` row, so that no compute is
spent on padding.

Each row holds whole sequences side by side, told apart by ``segment_ids`` (1, 2, ... within a
row; 0 at the padding after the last one). A model run with those ids
(``Transformer.decode(tokens, segment_ids=...)``) attends only within a segment and restarts
positions at 0 in each, so every sequence's log-probs are those it has alone; the loss mask is
0 at each segment's first token (no earlier token of its own predicts it). This is TRL's
``padding_free`` packing (``packing=True, packing_strategy="bfd"``), with the segment ids in
place of its ``position_ids``.

Strategies: ``"bfd"`` (best-fit decreasing, TRL's default: longest first, each into the row
with the least room that fits it) and ``"greedy"`` (in the given order, a new row when the
next sequence does not fit). A sequence longer than ``max_length`` is truncated (its first
``max_length`` tokens kept), dropped or refused (``overflow``); either way it is counted and
named in the :class:`PackingReport`, never lost silently.

numpy only.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal, TypedDict

import numpy as np

from rljax.data.load import _note_first

__all__ = ["PACKING_STRATEGIES", "PackedArrays", "PackingReport", "pack", "pack_arrays"]

PACKING_STRATEGIES = ("bfd", "greedy")
_FIRST_FEW = 10


class PackedArrays(TypedDict):
    """Output of :func:`pack`: ``[R, max_length]`` arrays (``R`` rows)."""

    tokens: np.ndarray  # int32, pad_id at padding
    segment_ids: np.ndarray  # int32, 1.. per row, 0 at padding
    positions: np.ndarray  # int32, 0.. restarting per segment, 0 at padding
    mask: np.ndarray  # bool, segment_ids > 0
    loss_mask: np.ndarray  # bool, the counted tokens (never a segment's first token)


@dataclasses.dataclass
class PackingReport:
    """What :func:`pack` did.

    Attributes:
      sequences: sequences given. packed: sequences in the rows (``sequences - dropped``).
      rows: rows built. max_length: their length.
      tokens: real tokens in the rows (after truncation).
      truncated / dropped: sequences cut to ``max_length`` / left out (``overflow="drop"``);
      truncated_tokens: tokens cut off; truncated_sequences / dropped_sequences: the first few
      indices (in the list given) of each.
    """

    sequences: int = 0
    packed: int = 0
    rows: int = 0
    max_length: int = 0
    tokens: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: int = 0
    truncated_sequences: list[int] = dataclasses.field(default_factory=list)
    dropped_sequences: list[int] = dataclasses.field(default_factory=list)

    @property
    def efficiency(self) -> float:
        """Fraction of the rows' slots that hold a real token."""
        return self.tokens / max(self.rows * self.max_length, 1)

    def summary(self) -> str:
        text = (
            f"packed {self.packed} of {self.sequences} sequences into {self.rows} rows of "
            f"{self.max_length} ({self.efficiency:.1%} of slots used)"
        )
        if self.truncated:
            text += f"; truncated {self.truncated} (first: {self.truncated_sequences})"
        if self.dropped:
            text += f"; dropped {self.dropped} (first: {self.dropped_sequences})"
        return text


def _assign_bfd(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: rows as lists of sequence indices (longest first, each into the
    row with the least room that still fits it; ties by row index, so deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row)
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            room, row = max_length - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def _assign_greedy(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """In order: a new row whenever the next sequence does not fit the current one."""
    rows: list[list[int]] = []
    room = 0
    for i, length in enumerate(lengths):
        if not rows or length > room:
            rows.append([])
            room = max_length
        rows[-1].append(i)
        room -= length
    return rows


def _fit(
    sequences, loss_masks, max_length: int, overflow: str, report: PackingReport
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """The sequences (and loss masks) that go into rows, cut to ``max_length``; their indices."""
    kept_ids, kept_masks, kept = [], [], []
    for i, ids in enumerate(sequences):
        ids = np.asarray(ids, np.int32).reshape(-1)
        loss = np.ones(len(ids), bool) if loss_masks is None else np.asarray(loss_masks[i], bool)
        if loss.shape != ids.shape:
            raise ValueError(
                f"sequence {i}: loss mask has {loss.size} entries for {ids.size} tokens"
            )
        if len(ids) == 0:
            raise ValueError(f"sequence {i} is empty; remove it before packing")
        if len(ids) > max_length:
            if overflow == "error":
                raise ValueError(
                    f"sequence {i} has {len(ids)} tokens > max_length {max_length}; raise "
                    "max_length, or pass overflow='truncate' or 'drop'"
                )
            if overflow == "drop":
                report.dropped += 1
                _note_first(report.dropped_sequences, i, _FIRST_FEW)
                continue
            report.truncated += 1
            report.truncated_tokens += len(ids) - max_length
            _note_first(report.truncated_sequences, i, _FIRST_FEW)
            ids, loss = ids[:max_length], loss[:max_length]
        kept_ids.append(ids)
        kept_masks.append(loss)
        kept.append(i)
    return kept_ids, kept_masks, kept


def pack(
    sequences: Sequence[Sequence[int]],
    max_length: int,
    *,
    loss_masks: Sequence[Sequence[bool]] | None = None,
    strategy: Literal["bfd", "greedy"] = "bfd",
    overflow: Literal["truncate", "drop", "error"] = "truncate",
    pad_id: int = 0,
) -> tuple[PackedArrays, PackingReport]:
    """Pack token sequences into ``[R, max_length]`` rows (see the module docstring).

    Args:
      sequences: token ids, one sequence each (no padding), e.g. prompt + completion + EOS.
      max_length: row length.
      loss_masks: per sequence, 1 at the tokens whose log-probs count (e.g. the completion);
        default: every token (the whole sequence). A segment's first token is never counted.
      strategy: ``"bfd"`` (best-fit decreasing) or ``"greedy"`` (keeps the order).
      overflow: a sequence longer than ``max_length``: ``"truncate"`` (keep its first
        ``max_length`` tokens), ``"drop"`` or ``"error"``.
      pad_id: token id at padding.

    Returns:
      ``(arrays, report)``: :class:`PackedArrays` and a :class:`PackingReport`.
    """
    if int(max_length) < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"strategy must be one of {PACKING_STRATEGIES}, got {strategy!r}")
    if overflow not in ("truncate", "drop", "error"):
        raise ValueError(f"overflow must be 'truncate', 'drop' or 'error', got {overflow!r}")
    if loss_masks is not None and len(loss_masks) != len(sequences):
        raise ValueError(f"{len(loss_masks)} loss masks for {len(sequences)} sequences")
    report = PackingReport(sequences=len(sequences), max_length=int(max_length))
    ids, losses, _ = _fit(sequences, loss_masks, int(max_length), overflow, report)
    lengths = [len(x) for x in ids]
    assign = _assign_bfd if strategy == "bfd" else _assign_greedy
    rows = assign(lengths, int(max_length))

    shape = (len(rows), int(max_length))
    tokens = np.full(shape, pad_id, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, bool)
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, start=1):
            span = slice(start, start + lengths[i])
            tokens[r, span] = ids[i]
            segment_ids[r, span] = segment
            positions[r, span] = np.arange(lengths[i])
            loss_mask[r, span] = losses[i]
            loss_mask[r, start] = False
            start += lengths[i]
    report.packed, report.rows, report.tokens = len(ids), len(rows), int(sum(lengths))
    arrays = PackedArrays(
        tokens=tokens,
        segment_ids=segment_ids,
        positions=positions,
        mask=segment_ids > 0,
        loss_mask=loss_mask,
    )
    return arrays, report


def pack_arrays(
    arrays: Mapping[str, np.ndarray], max_length: int, **options
) -> tuple[PackedArrays, PackingReport]:
    """:func:`pack` on padded ``[N, T]`` arrays (``tokens``, ``mask``, ``loss_mask``: the
    output of :func:`rljax.data.tokenize_completions`): each row's real tokens (``mask``, any
    padding side) become one sequence, its ``loss_mask`` there its loss mask."""
    tokens, mask = np.asarray(arrays["tokens"]), np.asarray(arrays["mask"], bool)
    loss = np.asarray(arrays.get("loss_mask", mask), bool)
    sequences = [row[keep] for row, keep in zip(tokens, mask, strict=True)]
    loss_masks = [row[keep] for row, keep in zip(loss, mask, strict=True)]
    return pack(sequences, max_length, loss_masks=loss_masks, **options)
