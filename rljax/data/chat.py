"""Conversational SFT rows (TRL's ``messages`` format) with an assistant-only loss.

A row ``{"messages": [{"role", "content"}, ...]}`` is rendered once with the tokenizer's chat
template, and every assistant turn is trained on; everything else (system, user and tool turns,
the template's role headers and generation prompts) is context, masked out of the loss.

**Finding the assistant spans.** Few chat templates mark the assistant's text (``{% generation
%}``), so the spans are found by rendering prefixes of the conversation: for the assistant
message ``k``, its span starts where the rendering of ``messages[:k]`` with
``add_generation_prompt=True`` ends, and ends where the rendering of ``messages[:k + 1]`` ends.
Both renderings must be prefixes of the whole conversation's rendering (text, character for
character), in order. A template that rewrites earlier turns once later ones follow (e.g. drops
the reasoning of earlier replies), renders a reply differently from its generation prompt, or
hides a reply fails that check, and the row is refused with an error naming it (rows in the
``prompt`` / ``completion`` format need only the last turn to be split off). An assistant
message that opens the conversation is context, not trained on: nothing precedes it to answer
(and templates cannot render the empty conversation before it).

**What counts as an assistant token**: all the template writes for the reply after the
generation prompt: the content, the end-of-turn marker (e.g. ChatML's ``<|im_end|>``) and
whatever the template writes after it before the next turn begins (ChatML's ``"\\n"``). TRL's
``assistant_only_loss`` counts what a template's generation block covers: the content and,
typically, the end-of-turn marker.

**Tokens.** The rendering is cut at the span boundaries and each piece is encoded on its own
(no special tokens added: the template has its own), so every boundary is a token boundary; a
conversation with one assistant reply, the last message, gives exactly the tokens of the
``prompt`` / ``completion`` split of :func:`rljax.data.tokenize_completions` (the prompt is
every message before the reply). Then, as there: EOS appended after the last reply unless it
already ends with one (counted in the loss); the context before the first reply cut to its
last ``max_length - 1`` tokens if longer, and the rest cut at its end to fit ``max_length``,
or, with ``overflow="drop"``, a row that needs any cut dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rljax.data.load import RowNumbers, _note_first
from rljax.data.preference import (
    ValidationReport,
    _check_messages,
    _numbering,
    _RowError,
    _validate_each,
)
from rljax.data.tokenize import (
    _FIRST_ROWS,
    Overflow,
    TokenizationReport,
    _chat,
    _check_options,
    _cut,
    _encode,
    _eos_id,
    _fits,
    _unknown,
)

__all__ = ["render_conversation", "tokenize_conversations", "validate_conversations"]

_FIELD = "messages"
_SUGGESTION = (
    "use the 'prompt' + 'completion' format instead (one row per reply, the earlier turns as "
    "the prompt), or render the rows to 'text'"
)


def _check_conversation(row: int, example: Any) -> None:
    """One ``messages`` row: a list of ``{"role", "content"}`` string messages that ends with
    an assistant reply, not every reply empty (:class:`_RowError` with the skip reason). A
    reply is an assistant message after the first message (one that opens the conversation
    has nothing before it to answer: it is context)."""
    if not isinstance(example, dict):
        raise _RowError(
            row, "wrong_type", f"is a {type(example).__name__}, expected a dict of fields"
        )
    if _FIELD not in example or example[_FIELD] is None:
        raise _RowError(
            row, "missing_field", f"field {_FIELD!r} is missing (the row has {sorted(example)})"
        )
    messages = example[_FIELD]
    if not isinstance(messages, list):
        raise _RowError(
            row,
            "wrong_type",
            f"field {_FIELD!r} is a {type(messages).__name__}; expected a list of "
            "{'role', 'content'} messages",
        )
    _check_messages(row, _FIELD, messages, role="conversation")
    replies = [m for m in messages[1:] if m["role"] == "assistant"]
    if not replies:
        raise _RowError(
            row,
            "malformed_messages",
            f"field {_FIELD!r} has no assistant message (roles {[m['role'] for m in messages]}; "
            "one that opens the conversation is context): nothing to train on",
        )
    if messages[-1]["role"] != "assistant":
        raise _RowError(
            row,
            "malformed_messages",
            f"field {_FIELD!r} ends with role {messages[-1]['role']!r}; the conversation must "
            "end with an assistant reply (later turns would not be trained on): drop the "
            "trailing messages",
        )
    if all(not m["content"].strip() for m in replies):
        raise _RowError(row, "empty_field", f"field {_FIELD!r}: every assistant reply is empty")


def validate_conversations(
    rows: Sequence[Any], *, skip_invalid: bool = False, numbering: RowNumbers | None = None
) -> tuple[list[dict], ValidationReport]:
    """Check conversational SFT rows (``messages``): a list of ``{"role", "content"}`` dicts
    (string values, non-empty role) with an assistant reply after the first message, the last
    message the assistant's, not every reply empty. An invalid row raises ``ValueError`` naming the row
    and what is wrong; with ``skip_invalid=True`` it is skipped and counted in the report (as
    :func:`rljax.data.validate_completions`).

    Returns ``(valid_rows, report)``.
    """

    def check(row: int, example: Any) -> Any:
        _check_conversation(row, example)
        return example

    return _validate_each(rows, check, skip_invalid=skip_invalid, numbering=numbering)


def _render(where: str, tokenizer, messages: list, k: int, generation_prompt: bool) -> str:
    """The template applied to ``messages`` (the first ``k`` of the row's), errors named."""
    try:
        return _chat(tokenizer, messages, generation_prompt=generation_prompt)
    except Exception as error:  # a template's own raise_exception, or a jinja error
        raise ValueError(
            f"{where}: the chat template fails on the first {k} messages (add_generation_prompt="
            f"{generation_prompt}), which the assistant spans are found from: {error}; "
            + _SUGGESTION
        ) from error


def _divergence(prefix: str, full: str) -> str:
    """Where ``prefix`` stops being a prefix of ``full``, shown with some context."""
    i = 0
    while i < min(len(prefix), len(full)) and prefix[i] == full[i]:
        i += 1
    start = max(0, i - 30)
    return (
        f"at character {i}, the prefix renders {prefix[start : i + 30]!r} but the whole "
        f"conversation {full[start : i + 30]!r}"
    )


def _spans(where: str, tokenizer, messages: list) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation rendered, and the ``[start, end)`` character span of each
    assistant message in it (see the module docstring)."""
    full = _render(where, tokenizer, messages, len(messages), False)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if k == 0 or message["role"] != "assistant":  # an opening message is context
            continue
        last = k == len(messages) - 1
        before = _render(where, tokenizer, messages[:k], k, True)
        after = full if last else _render(where, tokenizer, messages[: k + 1], k + 1, False)
        for name, prefix in (
            (f"the first {k} messages with the generation prompt", before),
            (f"the first {k + 1} messages", after),
        ):
            if not full.startswith(prefix):
                raise ValueError(
                    f"{where}: the chat template's rendering of {name} is not a prefix of the "
                    f"whole conversation's, so the span of assistant message {k} cannot be "
                    "found (the template rewrites earlier turns once later ones follow, e.g. "
                    "drops earlier replies' reasoning, or renders a reply unlike its "
                    f"generation prompt); {_divergence(prefix, full)}; " + _SUGGESTION
                )
        start, end = len(before), len(after)
        if spans and start < spans[-1][1]:
            raise ValueError(
                f"{where}: the chat template's generation prompt before assistant message {k} "
                f"reaches into the previous reply (characters {start} < {spans[-1][1]}), so the "
                "assistant spans cannot be found; " + _SUGGESTION
            )
        if end <= start:
            raise ValueError(
                f"{where}: the chat template renders assistant message {k} as nothing after its "
                "generation prompt (it hides the reply), so there is no span to train on; "
                + _SUGGESTION
            )
        spans.append((start, end))
    return full, spans


def render_conversation(
    tokenizer, messages: list[dict], *, where: str = "row 0"
) -> tuple[list[int], list[bool], int]:
    """Token ids of a conversation rendered with ``tokenizer``'s chat template, which of them
    are the assistant's (the module docstring says how they are found, and what counts), and
    how many tokens are unknown (outside the vocabulary). Nothing appended or cut. ``where``
    names the row in errors.

    Raises ``ValueError`` (naming ``where``) when the tokenizer has no chat template, when the
    spans cannot be found from the template, or when nothing precedes the first reply.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{where}: conversational rows ('messages') need a tokenizer with a chat_template "
            "(this one has none); set tokenizer.chat_template, or render the rows to 'text' "
            "or 'prompt' + 'completion' first"
        )
    full, spans = _spans(where, tokenizer, messages)
    cuts = [0, *(c for span in spans for c in span), len(full)]
    ids: list[int] = []
    assistant: list[bool] = []
    unknown = 0
    for i in range(len(cuts) - 1):
        text = full[cuts[i] : cuts[i + 1]]
        piece = _encode(tokenizer, text, special=False) if text else []
        if i % 2 == 1 and not piece:
            raise ValueError(
                f"{where}: assistant reply {(i - 1) // 2} ({text!r}) tokenizes to no tokens"
            )
        if i == 0 and not piece:
            raise ValueError(
                f"{where}: the chat template renders no tokens before the first assistant "
                "reply, so its first token cannot be predicted; start the conversation with "
                "a system or user message"
            )
        unknown += _unknown(tokenizer, text, piece, special=False) if piece else 0
        ids += piece
        assistant += [i % 2 == 1] * len(piece)
    return ids, assistant, unknown


def tokenize_conversations(
    rows: Sequence[dict],
    tokenizer,
    *,
    max_length: int,
    overflow: Overflow = "truncate",
    add_eos: bool = True,
    numbering: RowNumbers | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], TokenizationReport]:
    """Tokenize conversational SFT rows (``messages``) for an assistant-only loss: each row
    rendered by :func:`render_conversation`, EOS appended, cut or dropped at ``max_length`` as
    the module docstring says.

    Rows are checked with :func:`validate_conversations` first (an invalid row raises; validate
    with ``skip_invalid=True`` beforehand to skip them). ``numbering``
    (:class:`rljax.data.RowNumbers`) makes errors and the report name each row as the user's
    file numbers it.

    Returns ``(tokens, loss_masks, report)``: per kept row, ``int32 [L]`` token ids and
    ``bool [L]`` (1 at the assistant's tokens and the appended EOS; never at token 0), ready
    for :func:`rljax.data.pack`; the report counts truncated (``prompt_truncated``: the context
    before the first reply, ``completion_truncated``: the rest) and dropped rows, and unknown
    tokens; its ``length`` is the longest kept row.
    """
    numbering = _numbering(rows, numbering)
    rows, _ = validate_conversations(rows, numbering=numbering)
    _check_options(max_length, None, "keep_end", overflow, None)
    eos_id = _eos_id(tokenizer) if add_eos else None
    report = TokenizationReport(total=len(rows), numbering=numbering)
    sequences, masks = [], []
    for row, example in enumerate(rows):
        number = numbering.numbers[row]
        ids, assistant, unknown = render_conversation(
            tokenizer, example[_FIELD], where=numbering.label(row)
        )
        if unknown:
            report.unknown_tokens += unknown
            report.unknown_rows += 1
            _note_first(report.unknown_first_rows, number, _FIRST_ROWS)
        first = assistant.index(True)  # the context before the first reply: the "prompt"
        prompt, rest, rest_mask = ids[:first], ids[first:], assistant[first:]
        if eos_id is not None and rest[-1] != eos_id:
            rest, rest_mask = [*rest, eos_id], [*rest_mask, True]
        prompt_cut = len(prompt) > max_length - 1
        prompt = _cut(prompt, max_length - 1, "keep_end")
        budget = max_length - len(prompt)
        completion_cut = len(rest) > budget
        if not _fits(report, row, number, prompt_cut, completion_cut, overflow):
            continue
        sequences.append(np.asarray(prompt + rest[:budget], np.int32))
        masks.append(np.asarray([False] * len(prompt) + rest_mask[:budget], bool))
    report.kept = len(sequences)
    report.length = max(map(len, sequences), default=0)
    return sequences, masks, report
