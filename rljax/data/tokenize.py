"""Tokenize prompt / completion rows with a ``transformers`` tokenizer into padded numpy arrays.

One core serves the three entry points (:func:`tokenize_preferences`,
:func:`tokenize_completions`, :func:`tokenize_prompts`):

1. *render* a row to token ids: a plain-text prompt is encoded with the tokenizer's own
   special tokens (e.g. a BOS where the tokenizer adds one), a completion without. A
   conversational row is rendered with ``tokenizer.apply_chat_template``, as TRL does: the
   prompt with ``add_generation_prompt=True``; the completion is the rendering of prompt +
   completion minus the rendered prompt (which must be its prefix), both encoded without
   extra special tokens (the template has its own);
2. *fit* a row to the lengths: EOS appended to each completion unless it already ends with
   one; the prompt truncated to ``max_prompt_length`` (``truncation_mode="keep_end"`` keeps its
   last tokens, ``"keep_start"`` its first) and, if it would still leave no room for a
   completion token, to ``max_length - 1``; then each completion cut at its end to fit
   ``max_length``. With ``overflow="drop"`` a row that needs any cut is dropped instead;
3. *pad* the rows to one length ``T``: right-padded for training, left-padded for generation.

Array conventions (numpy): ``tokens`` ``int32 [N, T]`` padded with the tokenizer's pad id;
``mask`` ``bool [N, T]``, 1 at real tokens (prompt + completion); ``loss_mask`` ``bool [N, T]``,
1 at completion tokens incl. EOS, the tokens whose log-probs count. Token ``t`` is predicted by
the logits at ``t - 1``, and every prompt has at least one token, so ``loss_mask[:, 0]`` is 0.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import numpy as np

from rljax.data.load import RowNumbers, _note_first
from rljax.data.preference import (
    _check_value,
    _RowError,
    validate_completions,
    validate_preferences,
)

__all__ = [
    "CompletionArrays",
    "PreferenceArrays",
    "TokenizationReport",
    "tokenize_completions",
    "tokenize_preferences",
    "tokenize_prompts",
]

_FIRST_ROWS = 5

TruncationMode = Literal["keep_end", "keep_start"]
Overflow = Literal["truncate", "drop"]


class PreferenceArrays(TypedDict):
    """Output of :func:`tokenize_preferences`: ``[N, T]`` arrays (chosen and rejected padded to
    the same ``T``) and ``prompt_lengths [N]``."""

    chosen_tokens: np.ndarray
    chosen_mask: np.ndarray
    chosen_loss_mask: np.ndarray
    rejected_tokens: np.ndarray
    rejected_mask: np.ndarray
    rejected_loss_mask: np.ndarray
    prompt_lengths: np.ndarray


class CompletionArrays(TypedDict):
    """Output of :func:`tokenize_completions`: ``[N, T]`` arrays."""

    tokens: np.ndarray
    mask: np.ndarray
    loss_mask: np.ndarray


@dataclasses.dataclass
class TokenizationReport:
    """What tokenisation kept, truncated and dropped, and how many tokens were unknown (rows
    numbered as given, or as the user's file numbers them when tokenized with ``numbering``).

    Attributes:
      total: rows given. kept: rows in the arrays (``total - dropped``).
      truncated: kept rows that were cut (prompt or a completion).
      prompt_truncated / completion_truncated: rows whose prompt / some completion needed a
        cut (counted whether the row was then kept or dropped).
      dropped: rows left out (``overflow="drop"``).
      truncated_rows / dropped_rows: the first few row numbers of each.
      unknown_tokens: tokens the tokenizer mapped to its unknown id (``unk_token_id``) although
        the text did not spell its unknown token (e.g. characters outside the vocabulary),
        counted over every row before truncation.
      unknown_rows: rows with at least one; unknown_first_rows: the first few of them.
      kept_rows: the index (in the list given) of each output row, in order.
      length: ``T``, the padded length.
    """

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    truncated_rows: list[int] = dataclasses.field(default_factory=list)
    dropped_rows: list[int] = dataclasses.field(default_factory=list)
    unknown_tokens: int = 0
    unknown_rows: int = 0
    unknown_first_rows: list[int] = dataclasses.field(default_factory=list)
    kept_rows: list[int] = dataclasses.field(default_factory=list)
    length: int = 0
    numbering: RowNumbers | None = dataclasses.field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        numbering = self.numbering or RowNumbers(())

        def rows(numbers, count):
            return f" ({numbering.labels(numbers, count)})"

        text = f"tokenization: kept {self.kept} of {self.total} rows, padded to {self.length}"
        text += f"; truncated {self.truncated}" + (
            rows(self.truncated_rows, self.truncated) if self.truncated else ""
        )
        text += f"; dropped {self.dropped}" + (
            rows(self.dropped_rows, self.dropped) if self.dropped else ""
        )
        if self.prompt_truncated or self.completion_truncated:
            text += (
                f" [too long: prompt {self.prompt_truncated}, "
                f"completion {self.completion_truncated}]"
            )
        if self.unknown_tokens:
            text += (
                f"; {self.unknown_tokens} unknown tokens (outside the vocabulary) in "
                f"{self.unknown_rows} rows" + rows(self.unknown_first_rows, self.unknown_rows)
            )
        return text


# ----------------------------------------------------------------------------- 1. render


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat(tokenizer, messages: list, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _unknown(tokenizer, text: str, ids: list[int], *, special: bool) -> int:
    """Tokens of ``text`` (encoded as ``ids``) mapped to the tokenizer's unknown id although
    ``text`` did not spell the unknown token itself: characters or words outside the
    vocabulary. 0 for tokenizers without an unknown token (byte-level BPE)."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if unk_id is None or unk_id not in ids:
        return 0
    if special:  # count without the special tokens added around the text
        ids = _encode(tokenizer, text, special=False)
    return max(0, ids.count(unk_id) - text.count(str(tokenizer.unk_token)))


def _render(
    where: str, tokenizer, prompt: Any, completions: dict[str, Any]
) -> tuple[list[int], dict[str, list[int]], int]:
    """Token ids of the prompt and of each completion (no EOS added, nothing cut), and the
    number of unknown tokens among them (:func:`_unknown`). ``where`` names the row."""
    if isinstance(prompt, str):
        prompt_ids = _encode(tokenizer, prompt, special=True)
        unknown = _unknown(tokenizer, prompt, prompt_ids, special=True)
        completion_ids = {}
        for f, text in completions.items():
            completion_ids[f] = _encode(tokenizer, text, special=False)
            unknown += _unknown(tokenizer, text, completion_ids[f], special=False)
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{where}: conversational rows need a tokenizer with a chat_template; set "
                "tokenizer.chat_template or render the rows to text first"
            )
        prompt_text = _chat(tokenizer, prompt, generation_prompt=True)
        prompt_ids = _encode(tokenizer, prompt_text, special=False)
        unknown = _unknown(tokenizer, prompt_text, prompt_ids, special=False)
        completion_ids = {}
        for field, messages in completions.items():
            full = _chat(tokenizer, list(prompt) + list(messages), generation_prompt=False)
            if not full.startswith(prompt_text):
                raise ValueError(
                    f"{where}: field {field!r}: the chat template applied to prompt + "
                    "completion does not start with the template applied to the prompt (with "
                    "add_generation_prompt=True), so the completion cannot be split off; use a "
                    f"prefix-preserving template. prompt: {prompt_text!r}; full: {full!r}"
                )
            text = full[len(prompt_text) :]
            completion_ids[field] = _encode(tokenizer, text, special=False)
            unknown += _unknown(tokenizer, text, completion_ids[field], special=False)
    if not prompt_ids:
        raise ValueError(f"{where}: field 'prompt' tokenizes to no tokens")
    for field, ids in completion_ids.items():
        if not ids:
            raise ValueError(f"{where}: field {field!r} tokenizes to no tokens")
    return prompt_ids, completion_ids, unknown


# ----------------------------------------------------------------------------- 2. fit


def _cut(ids: list[int], length: int, mode: TruncationMode) -> list[int]:
    if len(ids) <= length:
        return ids
    return ids[len(ids) - length :] if mode == "keep_end" else ids[:length]


def _check_options(max_length, max_prompt_length, truncation_mode, overflow, pad_to):
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ValueError(
            f"truncation_mode={truncation_mode!r}: expected 'keep_end' or 'keep_start'"
        )
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow={overflow!r}: expected 'truncate' or 'drop'")
    if max_length is not None and max_length < 2:
        raise ValueError(
            f"max_length={max_length}: need >= 2 (one prompt and one completion token)"
        )
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length}: need >= 1")
    if pad_to is not None and max_length is not None and pad_to < max_length:
        raise ValueError(
            f"pad_to={pad_to} is shorter than max_length={max_length}: pass pad_to >= max_length"
        )


def _special_id(tokenizer, which: str, fix: str) -> int:
    """The tokenizer's ``<which>_token_id`` (``pad``, ``eos``), or an error saying ``fix``."""
    token_id = getattr(tokenizer, f"{which}_token_id")
    if token_id is None:
        raise ValueError(f"the tokenizer has no {which} token: {fix}")
    return int(token_id)


def _pad_id(tokenizer) -> int:
    return _special_id(tokenizer, "pad", "set tokenizer.pad_token (e.g. to its eos_token)")


def _eos_id(tokenizer) -> int:
    return _special_id(tokenizer, "eos", "set tokenizer.eos_token or pass add_eos=False")


# ----------------------------------------------------------------------------- 3. pad


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int, *, left: bool):
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for i, ids in enumerate(sequences):
        span = slice(length - len(ids), length) if left else slice(0, len(ids))
        tokens[i, span] = ids
        mask[i, span] = True
    return tokens, mask


def _fits(report, row: int, number: int, prompt_cut: bool, completion_cut: bool, overflow) -> bool:
    """Count a row whose prompt or completion did not fit (truncated, or dropped with
    ``overflow="drop"``) in ``report``; False when the row is dropped. A kept row's index
    goes into ``report.kept_rows``."""
    report.prompt_truncated += prompt_cut
    report.completion_truncated += completion_cut
    if prompt_cut or completion_cut:
        if overflow == "drop":
            report.dropped += 1
            _note_first(report.dropped_rows, number, _FIRST_ROWS)
            return False
        report.truncated += 1
        _note_first(report.truncated_rows, number, _FIRST_ROWS)
    report.kept_rows.append(row)
    return True


def _tokenize_rows(
    rows: Sequence[dict],
    tokenizer,
    fields: Sequence[str],
    *,
    max_length: int,
    max_prompt_length: int | None,
    truncation_mode: TruncationMode,
    overflow: Overflow,
    add_eos: bool,
    pad_to: int | None,
    numbering: RowNumbers | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, TokenizationReport]:
    """The shared core: render, fit and right-pad ``fields`` (the completions) of each row.

    Returns ``({field: (tokens, mask, loss_mask)}, prompt_lengths, report)``.
    """
    numbering = RowNumbers.of(len(rows)) if numbering is None else numbering
    _check_options(max_length, max_prompt_length, truncation_mode, overflow, pad_to)
    pad_id = _pad_id(tokenizer)
    eos_id = _eos_id(tokenizer) if add_eos else None
    prompt_limit = max_length - 1
    if max_prompt_length is not None:
        prompt_limit = min(prompt_limit, max_prompt_length)
    report = TokenizationReport(total=len(rows), numbering=numbering)
    prompts, completions = [], {f: [] for f in fields}
    for row, example in enumerate(rows):
        number = numbering.numbers[row]  # the row as the user's file numbers it
        prompt_ids, completion_ids, unknown = _render(
            numbering.label(row), tokenizer, example["prompt"], {f: example[f] for f in fields}
        )
        if unknown:
            report.unknown_tokens += unknown
            report.unknown_rows += 1
            _note_first(report.unknown_first_rows, number, _FIRST_ROWS)
        prompt_cut = len(prompt_ids) > prompt_limit
        prompt_ids = _cut(prompt_ids, prompt_limit, truncation_mode)
        budget = max_length - len(prompt_ids)
        completion_cut = False
        for field, ids in completion_ids.items():
            if eos_id is not None and ids[-1] != eos_id:
                ids = [*ids, eos_id]
            completion_cut |= len(ids) > budget
            completion_ids[field] = ids[:budget]
        if not _fits(report, row, number, prompt_cut, completion_cut, overflow):
            continue
        prompts.append(prompt_ids)
        for field, ids in completion_ids.items():
            completions[field].append(ids)
    report.kept = len(prompts)
    longest = max(
        (len(p) + len(c[i]) for c in completions.values() for i, p in enumerate(prompts)),
        default=0,
    )
    length = longest if pad_to is None else pad_to
    report.length = length
    prompt_lengths = np.array([len(p) for p in prompts], np.int32)
    arrays = {}
    for field, ids in completions.items():
        tokens, mask = _pad(
            [p + c for p, c in zip(prompts, ids, strict=True)], pad_id, length, left=False
        )
        loss_mask = mask.copy()
        loss_mask[np.arange(length)[None, :] < prompt_lengths[:, None]] = False
        arrays[field] = (tokens, mask, loss_mask)
    return arrays, prompt_lengths, report


def tokenize_preferences(
    rows: Sequence[dict],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: TruncationMode = "keep_end",
    overflow: Overflow = "truncate",
    add_eos: bool = True,
    pad_to: int | None = None,
    numbering: RowNumbers | None = None,
) -> tuple[PreferenceArrays, TokenizationReport]:
    """Tokenize preference rows (``prompt``/``chosen``/``rejected``; see the module docstring).

    Rows are checked with :func:`rljax.data.validate_preferences` first (an invalid row raises;
    validate with ``skip_invalid=True`` beforehand to skip them). Chosen and rejected are padded
    to the same ``T``: the longest prompt + completion, or ``pad_to`` (``>= max_length``).
    ``numbering`` (:class:`rljax.data.RowNumbers`) makes errors and the report name each row
    as the user's file numbers it.

    Returns ``(arrays, report)``; ``arrays`` has ``chosen_tokens``, ``chosen_mask``,
    ``chosen_loss_mask``, ``rejected_tokens``, ``rejected_mask``, ``rejected_loss_mask``
    (``[N, T]``) and ``prompt_lengths`` (``int32 [N]``, after truncation).
    """
    rows, _ = validate_preferences(rows, numbering=numbering)
    arrays, prompt_lengths, report = _tokenize_rows(
        rows,
        tokenizer,
        ("chosen", "rejected"),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        overflow=overflow,
        add_eos=add_eos,
        pad_to=pad_to,
        numbering=numbering,
    )
    out = {}
    for field, (tokens, mask, loss_mask) in arrays.items():
        out[f"{field}_tokens"], out[f"{field}_mask"], out[f"{field}_loss_mask"] = (
            tokens,
            mask,
            loss_mask,
        )
    out["prompt_lengths"] = prompt_lengths
    return PreferenceArrays(**out), report


def tokenize_completions(
    rows: Sequence[dict],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: TruncationMode = "keep_end",
    overflow: Overflow = "truncate",
    add_eos: bool = True,
    pad_to: int | None = None,
    numbering: RowNumbers | None = None,
) -> tuple[CompletionArrays, TokenizationReport]:
    """Tokenize prompt-completion (SFT) rows: same rules as :func:`tokenize_preferences`.

    Returns ``(arrays, report)``; ``arrays`` has ``tokens``, ``mask``, ``loss_mask`` (``[N, T]``).
    """
    rows, _ = validate_completions(rows, numbering=numbering)
    arrays, _, report = _tokenize_rows(
        rows,
        tokenizer,
        ("completion",),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        overflow=overflow,
        add_eos=add_eos,
        pad_to=pad_to,
        numbering=numbering,
    )
    tokens, mask, loss_mask = arrays["completion"]
    return CompletionArrays(tokens=tokens, mask=mask, loss_mask=loss_mask), report


def _warn_rows(what: str, rows: list[int]) -> None:
    """A warning from :func:`tokenize_prompts` (to its caller) naming the first ``rows``."""
    more = " ..." if len(rows) > _FIRST_ROWS else ""
    warnings.warn(f"tokenize_prompts: {what}; rows {rows[:_FIRST_ROWS]}{more}", stacklevel=3)


def tokenize_prompts(
    prompts: Sequence[Any],
    tokenizer,
    max_prompt_length: int,
    *,
    truncation_mode: TruncationMode = "keep_end",
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """LEFT-padded prompts for generation (:mod:`rljax.models.generate`).

    Each prompt is a string or a list of messages (or a row dict with a ``prompt`` field),
    rendered exactly as the prompts of :func:`tokenize_preferences` (a conversational prompt
    ends with the generation prompt) and cut to ``max_prompt_length`` by ``truncation_mode``;
    a warning says how many were cut. ``T`` is the longest prompt, or ``pad_to``
    (``>= max_prompt_length``, for a fixed compiled shape).

    Returns ``(tokens int32 [N, T], mask bool [N, T])``, padded with the pad id on the left.
    """
    _check_options(None, max_prompt_length, truncation_mode, "truncate", None)
    if pad_to is not None and pad_to < max_prompt_length:
        raise ValueError(
            f"pad_to={pad_to} is shorter than max_prompt_length={max_prompt_length}: pass "
            "pad_to >= max_prompt_length"
        )
    pad_id = _pad_id(tokenizer)
    sequences, cut_rows, unknown_rows, unknown = [], [], [], 0
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, dict):
            if "prompt" not in prompt:
                raise ValueError(f"row {row}: field 'prompt' is missing")
            prompt = prompt["prompt"]
        try:
            _check_value(row, "prompt", prompt, role="prompt")
        except _RowError as error:
            raise ValueError(str(error)) from None
        ids, _, row_unknown = _render(f"row {row}", tokenizer, prompt, {})
        if row_unknown:
            unknown += row_unknown
            unknown_rows.append(row)
        if len(ids) > max_prompt_length:
            cut_rows.append(row)
        sequences.append(_cut(ids, max_prompt_length, truncation_mode))
    if cut_rows:
        _warn_rows(
            f"truncated {len(cut_rows)} of {len(sequences)} prompts to "
            f"max_prompt_length={max_prompt_length} ({truncation_mode})",
            cut_rows,
        )
    if unknown:
        _warn_rows(
            f"{unknown} unknown tokens (outside the tokenizer's vocabulary) in "
            f"{len(unknown_rows)} of {len(sequences)} prompts",
            unknown_rows,
        )
    length = max((len(s) for s in sequences), default=0) if pad_to is None else pad_to
    return _pad(sequences, pad_id, length, left=True)
