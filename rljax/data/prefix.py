"""The shared-prompt ("prefix sharing") layout of a preference batch.

A pair's chosen and rejected sequences start with the same prompt. The standard layout
(:func:`rljax.data.tokenize_preferences`) repeats it: ``chosen_tokens`` and ``rejected_tokens``
are both ``[N, T]`` prompt + completion rows, so a forward pass runs every prompt twice.
:func:`share_prompts` rewrites the arrays so that each prompt is stored, and run, once:

- ``prompt_tokens``, ``prompt_mask``: ``[N, P]``, **left**-padded (the last prompt token of
  every row is at ``P - 1``, so one key/value cache index serves the whole batch);
- ``chosen_completion_tokens``, ``chosen_completion_mask``, ``rejected_completion_tokens``,
  ``rejected_completion_mask``: ``[N, C]``, right-padded.

:func:`rljax.updates.lm.shared_prompt_sequence_logps` runs the prompt once, then both completions
against its key/value cache (the idea of "prefix sharing" for DPO: Wang et al., 2024,
*Accelerating Direct Preference Optimization with Prefix Sharing*, arXiv:2410.20305), and
computes log-probs only at completion positions. The result equals the standard layout's to
float tolerance; the work per pair falls from ``2 (P + C)`` token positions to ``P + 2C``
(64-token prompts and completions: 256 -> 192), and the LM head runs on ``2C`` positions
instead of ``2 (P + C) - 2``.

Every :mod:`rljax.dpo` / :mod:`rljax.updates.lm` function that takes a preference batch accepts either
layout (it is chosen by the keys present); 1-D per-pair arrays (``ref_chosen_logps``, ...) are
carried over unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["SHARED_PROMPT_KEYS", "share_prompts"]

SHARED_PROMPT_KEYS = (
    "prompt_tokens",
    "prompt_mask",
    "chosen_completion_tokens",
    "chosen_completion_mask",
    "rejected_completion_tokens",
    "rejected_completion_mask",
)

_SIDES = ("chosen", "rejected")
_PAIR_SUFFIXES = ("tokens", "mask", "loss_mask")


def _rows(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (f", ... ({len(rows)} rows)" if len(rows) > limit else "")


def _split_side(arrays: Mapping[str, Any], side: str) -> tuple[np.ndarray, ...]:
    """``(tokens, prompt_lengths, completion_lengths)`` of one side, after checking that every
    row is ``[prompt | completion | padding]``: real tokens a prefix of the row, the loss mask
    a non-empty block at the end of them, at least one prompt token."""
    tokens = np.asarray(arrays[f"{side}_tokens"])
    mask = np.asarray(arrays[f"{side}_mask"]).astype(bool)
    loss = np.asarray(arrays[f"{side}_loss_mask"]).astype(bool) & mask
    t = mask.shape[1]
    lengths = mask.sum(axis=1)
    positions = np.arange(t)[None, :]
    bad = np.flatnonzero((mask != (positions < lengths[:, None])).any(axis=1))
    if bad.size:
        raise ValueError(
            f"share_prompts: {side}_mask of row(s) {_rows(bad)} is not one run of real tokens "
            "from position 0 (expected right padding, as rljax.data.tokenize_preferences makes)"
        )
    completion = loss.sum(axis=1)
    prompt = lengths - completion
    expected = (positions >= prompt[:, None]) & (positions < lengths[:, None])
    bad = np.flatnonzero((loss != expected).any(axis=1))
    if bad.size:
        raise ValueError(
            f"share_prompts: {side}_loss_mask of row(s) {_rows(bad)} is not one block at the end "
            "of the real tokens (prompt first, then the completion)"
        )
    for name, values in (("prompt", prompt), ("completion", completion)):
        bad = np.flatnonzero(values < 1)
        if bad.size:
            raise ValueError(f"share_prompts: row(s) {_rows(bad)} have an empty {side} {name}")
    return tokens, prompt, completion


def _check_pair_arrays(arrays: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes of the standard-layout pair arrays, after checking they are all there and
    all ``[N, T]``."""
    missing = [f"{s}_{k}" for s in _SIDES for k in _PAIR_SUFFIXES if f"{s}_{k}" not in arrays]
    if missing:
        raise KeyError(f"share_prompts: missing {missing}; it has {sorted(arrays)}")
    shapes = {f"{s}_{k}": np.shape(arrays[f"{s}_{k}"]) for s in _SIDES for k in _PAIR_SUFFIXES}
    if len(set(shapes.values())) != 1 or len(shapes["chosen_tokens"]) != 2:
        raise ValueError(f"share_prompts: the pair arrays must all be [N, T], got {shapes}")
    return shapes


def _check_same_prompts(c_tok, c_prompt, r_tok, r_prompt) -> None:
    """Raise for pairs whose chosen and rejected prompts differ (in length or in a token)."""
    bad = np.flatnonzero(c_prompt != r_prompt)
    if not bad.size:
        t = c_tok.shape[1]
        in_prompt = np.arange(t)[None, :] < c_prompt[:, None]
        bad = np.flatnonzero(((c_tok != r_tok) & in_prompt).any(axis=1))
    if bad.size:
        raise ValueError(
            f"share_prompts: the chosen and rejected prompts of row(s) {_rows(bad)} differ; "
            "only pairs with one prompt can share it"
        )


def _padded_lengths(c_prompt, c_len, r_len, prompt_length, completion_length) -> tuple[int, int]:
    """``(P, C)``: the given lengths, or the longest prompt and completion; raise when a row
    would not fit (nothing is cut)."""
    longest_prompt = int(c_prompt.max(initial=1))
    longest_completion = int(max(c_len.max(initial=1), r_len.max(initial=1)))
    p = longest_prompt if prompt_length is None else int(prompt_length)
    c = longest_completion if completion_length is None else int(completion_length)
    for name, limit, lengths in (
        ("prompt_length", p, [c_prompt]),
        ("completion_length", c, [c_len, r_len]),
    ):
        if limit < 1:
            raise ValueError(f"share_prompts: {name}={limit}, need >= 1")
        bad = np.flatnonzero(np.maximum.reduce(lengths) > limit)
        if bad.size:
            raise ValueError(
                f"share_prompts: {name}={limit} is shorter than row(s) {_rows(bad)} (longest "
                f"{int(np.maximum.reduce(lengths).max())}); nothing is cut: pass a larger value"
            )
    return p, c


def _shared_layout(sides, p: int, c: int) -> dict[str, np.ndarray]:
    """The :data:`SHARED_PROMPT_KEYS` arrays and ``prompt_lengths`` of the split ``sides``
    (``(tokens, prompt_lengths, completion_lengths)`` per side, chosen first)."""
    (c_tok, c_prompt, _), _ = sides
    out: dict[str, np.ndarray] = {}
    # Prompts, left-padded: prompt token j of row i goes to column P - prompt_i + j.
    cols = np.arange(p)[None, :] - (p - c_prompt[:, None])
    prompt_mask = cols >= 0
    src = np.clip(cols, 0, c_tok.shape[1] - 1)
    out["prompt_tokens"] = np.where(prompt_mask, np.take_along_axis(c_tok, src, axis=1), 0).astype(
        np.int32
    )
    out["prompt_mask"] = prompt_mask
    for side, (tokens, prompt, length) in zip(_SIDES, sides, strict=True):
        cols = np.arange(c)[None, :]
        valid = cols < length[:, None]
        src = np.clip(prompt[:, None] + cols, 0, tokens.shape[1] - 1)
        out[f"{side}_completion_tokens"] = np.where(
            valid, np.take_along_axis(tokens, src, axis=1), 0
        ).astype(np.int32)
        out[f"{side}_completion_mask"] = valid
    out["prompt_lengths"] = c_prompt.astype(np.int32)
    return out


def _per_pair_arrays(arrays: Mapping[str, Any], shapes, n: int) -> dict[str, np.ndarray]:
    """The other arrays, which must be ``[N]`` per-pair arrays (``prompt_lengths`` is left out:
    it is recomputed)."""
    out = {}
    for key, value in arrays.items():
        if key in shapes or key == "prompt_lengths":
            continue
        value = np.asarray(value)
        if value.ndim == 1 and value.shape[0] == n:
            out[key] = value
        else:
            raise ValueError(
                f"share_prompts: cannot carry {key!r} of shape {value.shape} over (only [N] "
                f"per-pair arrays are kept, N = {n}); drop it first"
            )
    return out


def share_prompts(
    arrays: Mapping[str, Any],
    *,
    prompt_length: int | None = None,
    completion_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Rewrite standard-layout preference arrays into the shared-prompt layout (module doc).

    Args:
      arrays: ``chosen_tokens``, ``chosen_mask``, ``chosen_loss_mask``, ``rejected_tokens``,
        ``rejected_mask``, ``rejected_loss_mask`` (``[N, T]``, right-padded prompt + completion
        rows; the loss mask marks the completion); other keys with ``N`` rows and no time axis
        (e.g. ``ref_chosen_logps``) are kept; ``prompt_lengths`` is recomputed.
      prompt_length: ``P``, the padded prompt length (default: the longest prompt). A fixed
        value keeps the compiled shape the same across data sets.
      completion_length: ``C`` (default: the longest chosen or rejected completion).

    Returns:
      A new dict: the :data:`SHARED_PROMPT_KEYS` arrays (int32 tokens padded with 0, bool
      masks), ``prompt_lengths`` (int32 ``[N]``) and the kept 1-D arrays.

    Raises:
      KeyError: a standard-layout key is missing.
      ValueError: naming the rows: a row is not ``[prompt | completion | padding]``, a prompt
        or completion is empty, the chosen and rejected prompts of a pair differ, or a prompt /
        completion is longer than ``prompt_length`` / ``completion_length`` (nothing is cut).
    """
    shapes = _check_pair_arrays(arrays)
    n = shapes["chosen_tokens"][0]
    sides = [_split_side(arrays, s) for s in _SIDES]
    (c_tok, c_prompt, c_len), (r_tok, r_prompt, r_len) = sides
    _check_same_prompts(c_tok, c_prompt, r_tok, r_prompt)
    p, c = _padded_lengths(c_prompt, c_len, r_len, prompt_length, completion_length)
    return {**_shared_layout(sides, p, c), **_per_pair_arrays(arrays, shapes, n)}
