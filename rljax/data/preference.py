"""Validation of TRL's standard preference and prompt-completion rows.

Accepted row forms (TRL's "standard" and "conversational" formats):

- preference, plain text: ``{"prompt": str, "chosen": str, "rejected": str}``;
- preference, conversational: the same three fields as lists of ``{"role", "content"}``
  messages (the prompt ends with a non-assistant turn, each completion starts with an
  assistant turn);
- preference, conversational with an *implicit* prompt: only ``chosen`` and ``rejected``, each
  the whole conversation; the longest shared leading run of messages becomes the prompt;
- prompt-completion (SFT): ``{"prompt": ..., "completion": ...}``, plain or conversational.

Other keys of a row (scores, ids) are kept untouched. Rows are numbered by their index in the
list given (0-based), which is what every error and report names, unless ``numbering`` (a
:class:`rljax.data.RowNumbers`, from :func:`rljax.data.load_numbered_rows`) says where each row
lies in the user's file (its 1-based line in a JSON-lines file, else its 0-based row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rljax.data.load import RowNumbers, _note_first

__all__ = [
    "SKIP_REASONS",
    "ValidationReport",
    "is_conversational",
    "validate_completions",
    "validate_preferences",
]

#: Why a row can be rejected; the keys of :attr:`ValidationReport.skipped`.
SKIP_REASONS = (
    "missing_field",
    "empty_field",
    "wrong_type",
    "malformed_messages",
    "identical_completions",
)

_FIRST_ROWS = 5  # how many row numbers a report keeps per reason


@dataclasses.dataclass
class ValidationReport:
    """What :func:`validate_preferences` / :func:`validate_completions` kept and skipped.

    Attributes:
      total: rows given.
      kept: rows returned.
      skipped: reason -> number of rows skipped for it (reasons from :data:`SKIP_REASONS`).
      first_rows: reason -> the first few row numbers skipped for it (numbered as the file
        numbers them when validated with ``numbering``).
      first_errors: reason -> the message of the first row skipped for it.
      kept_rows: the index (in the list given) of every returned row, in order (maps results
        back to input; ``numbering.take(kept_rows)`` numbers the returned rows).
      numbering: how rows are numbered in ``first_rows`` and messages.
    """

    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_rows: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    first_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    kept_rows: list[int] = dataclasses.field(default_factory=list)
    numbering: RowNumbers | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def _skip(self, row: int, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        _note_first(self.first_rows.setdefault(reason, []), row, _FIRST_ROWS)
        self.first_errors.setdefault(reason, message)

    def __str__(self) -> str:
        text = f"validation: kept {self.kept} of {self.total} rows"
        if not self.skipped:
            return text + " (none skipped)"
        numbering = self.numbering or RowNumbers(())
        parts = [
            f"{reason}: {count} ({numbering.labels(self.first_rows[reason], count)}"
            + f"; first: {self.first_errors[reason]})"
            for reason, count in self.skipped.items()
        ]
        return text + f", skipped {self.num_skipped}: " + "; ".join(parts)


class _RowError(ValueError):
    def __init__(self, row: int, reason: str, message: str):
        super().__init__(f"row {row}: {message}")
        self.row = row
        self.reason = reason
        self.detail = message  # the message without the row


def is_conversational(value: Any) -> bool:
    """True if ``value`` looks like a list of chat messages (``[{"role", "content"}, ...]``)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and isinstance(value[0], dict)
        and "role" in value[0]
        and "content" in value[0]
    )


def _check_messages(row: int, field: str, messages: list, *, role: str) -> None:
    """Each message a dict with a non-empty string ``role`` and a string ``content``. ``role``
    is "prompt" (must end with a non-assistant turn) or "completion" (starts with assistant)."""
    if not messages:
        raise _RowError(row, "empty_field", f"field {field!r} is an empty list of messages")
    for i, message in enumerate(messages):
        where = f"field {field!r}, message {i}"
        if not isinstance(message, dict):
            raise _RowError(
                row,
                "malformed_messages",
                f"{where} is a {type(message).__name__}, expected a dict with 'role' and 'content'",
            )
        for key in ("role", "content"):
            if key not in message:
                raise _RowError(row, "malformed_messages", f"{where} has no {key!r} key")
            if not isinstance(message[key], str):
                raise _RowError(
                    row,
                    "malformed_messages",
                    f"{where}: {key!r} is a {type(message[key]).__name__}, expected a string",
                )
        if not message["role"]:
            raise _RowError(row, "malformed_messages", f"{where} has an empty 'role'")
    if role == "prompt" and messages[-1]["role"] == "assistant":
        raise _RowError(
            row,
            "malformed_messages",
            f"field {field!r} ends with an assistant message; a prompt must end with the turn "
            "the model answers (user, system or tool)",
        )
    if role == "completion":
        if messages[0]["role"] != "assistant":
            raise _RowError(
                row,
                "malformed_messages",
                f"field {field!r} starts with role {messages[0]['role']!r}; a completion must "
                "start with an assistant message",
            )
        if all(not m["content"].strip() for m in messages):
            raise _RowError(row, "empty_field", f"field {field!r} has only empty messages")


def _check_value(row: int, field: str, value: Any, *, role: str) -> str:
    """Check one field; return its form, "text" or "messages"."""
    if value is None:
        raise _RowError(row, "missing_field", f"field {field!r} is missing (null)")
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(row, "empty_field", f"field {field!r} is empty")
        return "text"
    if isinstance(value, list):
        _check_messages(row, field, value, role=role)
        return "messages"
    raise _RowError(
        row,
        "wrong_type",
        f"field {field!r} is a {type(value).__name__}; expected a string or a list of "
        "{'role', 'content'} messages",
    )


def _check_fields(row: int, example: Any, fields: dict[str, str]) -> str:
    """Check ``fields`` (name -> "prompt"/"completion") of one row; all in one form."""
    if not isinstance(example, dict):
        raise _RowError(
            row, "wrong_type", f"is a {type(example).__name__}, expected a dict of fields"
        )
    for field in fields:
        if field not in example:
            raise _RowError(
                row,
                "missing_field",
                f"field {field!r} is missing (the row has {sorted(example)})",
            )
    forms = {field: _check_value(row, field, example[field], role=r) for field, r in fields.items()}
    if len(set(forms.values())) > 1:
        raise _RowError(
            row,
            "wrong_type",
            "mixes plain text and messages ("
            + ", ".join(f"{f!r}: {form}" for f, form in forms.items())
            + "); use one form for every field of a row",
        )
    return next(iter(forms.values()))


def _split_implicit_prompt(row: int, example: dict) -> dict:
    """Conversational row without ``prompt``: the shared leading messages become the prompt."""
    for field in ("chosen", "rejected"):
        if field not in example:
            raise _RowError(row, "missing_field", f"field {field!r} is missing")
        value = example[field]
        if not isinstance(value, list):
            raise _RowError(
                row,
                "missing_field" if value is None or isinstance(value, str) else "wrong_type",
                "field 'prompt' is missing; only conversational rows (lists of messages) may "
                f"leave the prompt implicit, but {field!r} is a {type(value).__name__}",
            )
        _check_messages(row, field, value, role="conversation")
    chosen, rejected = example["chosen"], example["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen == rejected:
        raise _RowError(
            row, "identical_completions", "fields 'chosen' and 'rejected' are identical"
        )
    if shared == 0:
        raise _RowError(
            row,
            "missing_field",
            "field 'prompt' is missing and 'chosen' and 'rejected' share no leading messages to "
            "take it from; add a 'prompt' field",
        )
    return {
        **example,
        "prompt": chosen[:shared],
        "chosen": chosen[shared:],
        "rejected": rejected[shared:],
    }


def _numbering(rows: Sequence[Any], numbering: RowNumbers | None) -> RowNumbers:
    if numbering is None:
        return RowNumbers.of(len(rows))
    if len(numbering) != len(rows):
        raise ValueError(f"numbering has {len(numbering)} row numbers for {len(rows)} rows")
    return numbering


def _validate(
    rows: Sequence[Any],
    fields: dict[str, str],
    *,
    pair: bool,
    skip_invalid: bool,
    numbering: RowNumbers | None,
) -> tuple[list[dict], ValidationReport]:
    def check(row: int, example: Any) -> Any:
        if pair and isinstance(example, dict) and "prompt" not in example:
            example = _split_implicit_prompt(row, example)
        _check_fields(row, example, fields)
        if pair and example["chosen"] == example["rejected"]:
            raise _RowError(
                row, "identical_completions", "fields 'chosen' and 'rejected' are identical"
            )
        return example

    return _validate_each(rows, check, skip_invalid=skip_invalid, numbering=numbering)


def _validate_each(
    rows: Sequence[Any], check, *, skip_invalid: bool, numbering: RowNumbers | None
) -> tuple[list[Any], ValidationReport]:
    """The rows ``check(row_index, example)`` accepts (it returns the example, possibly
    normalised, or raises :class:`_RowError`), and the report: the first rejected row raises
    ``ValueError`` naming it, or with ``skip_invalid`` every rejected row is counted."""
    numbering = _numbering(rows, numbering)
    report = ValidationReport(total=len(rows), numbering=numbering)
    valid = []
    for row, example in enumerate(rows):
        try:
            example = check(row, example)
        except _RowError as error:
            message = f"{numbering.label(row)}: {error.detail}"
            if not skip_invalid:
                raise ValueError(
                    f"{message} (pass skip_invalid=True, --skip-invalid in the scripts, to skip "
                    "and count such rows)"
                ) from None
            report._skip(numbering.numbers[row], error.reason, message)
            continue
        valid.append(example)
        report.kept_rows.append(row)
    report.kept = len(valid)
    return valid, report


def validate_preferences(
    rows: Sequence[Any], *, skip_invalid: bool = False, numbering: RowNumbers | None = None
) -> tuple[list[dict], ValidationReport]:
    """Check preference rows (``prompt``/``chosen``/``rejected``, plain or conversational).

    A row with a missing or empty field, a field of the wrong type, malformed messages, plain
    text mixed with messages, or identical ``chosen`` and ``rejected`` raises ``ValueError``
    naming the row and the field; with ``skip_invalid=True`` it is skipped and counted in the
    report instead. Conversational rows without ``prompt`` (TRL's implicit prompt) come back
    with the shared leading messages split off as ``prompt``. ``numbering``
    (:class:`rljax.data.RowNumbers`) makes errors and the report name each row as the user's
    file numbers it.

    Returns ``(valid_rows, report)``.
    """
    fields = {"prompt": "prompt", "chosen": "completion", "rejected": "completion"}
    return _validate(rows, fields, pair=True, skip_invalid=skip_invalid, numbering=numbering)


def validate_completions(
    rows: Sequence[Any], *, skip_invalid: bool = False, numbering: RowNumbers | None = None
) -> tuple[list[dict], ValidationReport]:
    """Check prompt-completion (SFT) rows (``prompt``/``completion``); same rules and report as
    :func:`validate_preferences` (no identical-completions check)."""
    fields = {"prompt": "prompt", "completion": "completion"}
    return _validate(rows, fields, pair=False, skip_invalid=skip_invalid, numbering=numbering)
