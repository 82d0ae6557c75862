"""Command-line flags from a frozen config dataclass (``--field-name VALUE`` per field).

Experiments declare their configuration once, as a dataclass with defaults and a docstring
``Attributes:`` section; :func:`parse` turns it into flags with help text, so defaults live in
one place. Booleans take ``--flag``/``--no-flag``; ``X | None`` fields take ``none``.

A field whose type is itself a config dataclass (an algorithm's settings nested in a run
configuration, e.g. ``GRPORunConfig.grpo: GRPOConfig``) contributes its fields as flags of their
own (``--loss-type``, not ``--grpo-loss-type``), so the algorithm's settings are declared once,
in the algorithm's config; two fields with one flag name are refused.
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


def _default(field: dataclasses.Field, instance=None):
    if instance is not None:
        return getattr(instance, field.name)
    if field.default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _add_flags(
    parser, cls, owners: dict[str, str], prefix: str, defaults=None, repeated=None
) -> None:
    """Flags of ``cls``'s fields; ``defaults``: an instance whose values are the defaults (a
    nested config's default in its run configuration)."""
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            nested = _default(field, defaults)
            if nested is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{field.name}: a nested config needs a default")
            _add_flags(parser, kind, owners, f"{prefix}{field.name}.", nested, repeated)
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.name in owners:
            raise TypeError(
                f"{cls.__name__}.{field.name}: flag {flag} is also "
                f"{owners[field.name] or 'a field'} of the run configuration"
            )
        owners[field.name] = prefix + field.name
        help_text = helps.get(field.name, "").replace("%", "%%")  # argparse formats help with %
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            inner = [a for a in typing.get_args(kind) if a is not type(None)]
            if len(inner) != 1:
                raise TypeError(f"field {field.name}: unsupported type {kind}")
            kind = _optional(inner[0])
            help_text += " (default: none = preset)" if field.default is None else ""
        default = _default(field, defaults)
        if typing.get_origin(kind) is tuple:  # tuple[str, ...]: a repeatable flag
            item = typing.get_args(kind)[0]
            parser.add_argument(
                flag,
                type=item,
                action="append",
                default=None,
                help=help_text + f" (repeatable; default: {list(default) or 'none'})",
            )
            repeated[field.name] = tuple(default)
        elif kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def _build(cls, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        kwargs[field.name] = (
            _build(kind, values) if dataclasses.is_dataclass(kind) else values[field.name]
        )
    return cls(**kwargs)


def parse(cls, argv: list[str] | None = None, description: str | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``cls``
    (nested config dataclasses built from their own flags)."""
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    repeated: dict[str, tuple] = {}  # repeatable flags and their defaults
    _add_flags(parser, cls, {}, "", None, repeated)
    values = vars(parser.parse_args(argv))
    for name, default in repeated.items():
        values[name] = default if values[name] is None else tuple(values[name])
    try:
        return _build(cls, values)
    except ValueError as err:
        parser.error(str(err))
