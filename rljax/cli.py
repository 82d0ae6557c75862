"""Command-line flags from a frozen config dataclass (``--field-name VALUE`` per field).

Experiments declare their configuration once, as a dataclass with defaults and a docstring
``Attributes:`` section; :func:`parse` turns it into flags with help text, so defaults live in
one place. Booleans take ``--flag``/``--no-flag``; ``X | None`` fields take ``none``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing


def _optional(kind):
    """Parse ``none`` as ``None``, anything else with ``kind``."""

    def convert(text: str):
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = kind.__name__
    return convert


def _field_help(cls) -> dict[str, str]:
    # Base classes first, so a subclass's docstring overrides what it redefines.
    doc = "\n\n".join(
        getattr(base, "__doc__", None) or ""
        for base in reversed(cls.__mro__)
        if dataclasses.is_dataclass(base)
    )
    helps, current = {}, None
    for line in doc.splitlines():
        match = re.match(r"\s{2,}(\w+):\s*(.*)", line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            current = match.group(1)
            helps[current] = match.group(2)
        elif current and line.strip():
            helps[current] += " " + line.strip()
        else:
            current = None
    return helps


def parse(cls, argv: list[str] | None = None, description: str | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = helps.get(field.name, "").replace("%", "%%")  # argparse formats help with %
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            inner = [a for a in typing.get_args(kind) if a is not type(None)]
            if len(inner) != 1:
                raise TypeError(f"field {field.name}: unsupported type {kind}")
            kind = _optional(inner[0])
            help_text += " (default: none = preset)" if field.default is None else ""
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text
            )
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as err:
        parser.error(str(err))
