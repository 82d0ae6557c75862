"""Command-line flags and configuration files from a frozen config dataclass.

Experiments declare their configuration once, as a dataclass with defaults and a docstring
``Attributes:`` section; :func:`parse` turns it into flags with help text, so defaults live in
one place. Booleans take ``--flag``/``--no-flag``; ``X | None`` fields take ``none``.

A field whose type is itself a config dataclass (an algorithm's settings nested in a run
configuration, e.g. ``GRPORunConfig.grpo: GRPOConfig``) contributes its fields as flags of their
own, both flat (``--beta``) and dotted (``--grpo.beta``), so the algorithm's settings are
declared once, in the algorithm's config; two fields with one flat flag name are refused.

Values come from, in increasing precedence: the dataclass defaults, ``parse(defaults=...)`` (e.g.
an environment's preset, chosen from the values given), a configuration file (``--config
FILE``, YAML or JSON, nested sections or flat keys), and the flags on the command line.
:func:`as_dict`/:func:`save_config` write a config in the file format, and a run folder's
``config.json`` (:class:`rljax.runs.RunFolder`) reads back as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import pathlib
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import yaml

__all__ = ["as_dict", "parse", "replace", "save_config"]

#: Top-level keys of a run folder's ``config.json`` besides ``config`` (see rljax.runs).
_RUN_RECORD_KEYS = {"config", "original_config", "changes"}


@dataclasses.dataclass(frozen=True)
class _Field:
    """A leaf field of a (possibly nested) config: ``name`` is its flat flag name and the key of
    the flat value dicts, ``path`` its dotted name (``grpo.beta``)."""

    name: str
    path: str
    kind: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def dotted_flag(self) -> str | None:
        if "." not in self.path:
            return None
        prefix, _ = self.path.rsplit(".", 1)
        return f"--{prefix}.{self.name.replace('_', '-')}"


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


def _nested(cls, field: dataclasses.Field) -> bool:
    return dataclasses.is_dataclass(typing.get_type_hints(cls)[field.name])


def _fields(cls, prefix: str = "", found: dict[str, _Field] | None = None) -> dict[str, _Field]:
    """Every leaf field of ``cls`` (nested configs walked), by flat name, in declaration order."""
    found = {} if found is None else found
    helps, hints = _field_help(cls), typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            _fields(hints[field.name], f"{prefix}{field.name}.", found)
            continue
        if field.name in found or (not prefix and field.name == "config"):
            owner = found[field.name].path if field.name in found else "the config-file flag"
            raise TypeError(
                f"{cls.__name__}.{field.name}: flag --{field.name.replace('_', '-')} is also "
                f"{owner} of the run configuration"
            )
        found[field.name] = _Field(
            field.name, prefix + field.name, hints[field.name], helps.get(field.name, "")
        )
    return found


def _flat_values(config) -> dict[str, Any]:
    """The leaf values of a config instance, by flat name."""
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if _nested(type(config), field):
            values.update(_flat_values(value))
        else:
            values[field.name] = value
    return values


def _class_defaults(cls) -> dict[str, Any]:
    """The leaf defaults of ``cls``; a nested config's come from the field's default instance
    (the run configuration's choice), not from the nested class's own defaults."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        elif _nested(cls, field):
            raise TypeError(f"{cls.__name__}.{field.name}: a nested config needs a default")
        else:
            default = dataclasses.MISSING  # a required flag, unless a file or preset sets it
        if _nested(cls, field):
            values.update(_flat_values(default))
        else:
            values[field.name] = default
    return values


def _build(cls, values: Mapping[str, Any]):
    kwargs = {}
    for field in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[field.name]
        kwargs[field.name] = (
            _build(kind, values) if dataclasses.is_dataclass(kind) else values[field.name]
        )
    return cls(**kwargs)


def flat_names(cls) -> list[str]:
    """The flag (flat) names of every leaf field of the config class ``cls``, nested configs
    included, in declaration order."""
    return list(_fields(cls))


def replace(config, /, **values):
    """:func:`dataclasses.replace` that also reaches nested configs: ``values`` name fields by
    their flat (flag) name, ``replace(run, beta=0.05)`` for ``run.grpo.beta``. An unknown name
    raises ``TypeError`` naming it."""
    fields = _fields(type(config))
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TypeError(
            f"{type(config).__name__} has no field {unknown[0]!r}; fields: {sorted(fields)}"
        )
    return _build(type(config), {**_flat_values(config), **values})


# ----------------------------------------------------------------------------- config files


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def as_dict(config) -> dict[str, Any]:
    """``config`` as the nested dict a configuration file holds (a section per nested config,
    tuples as lists): ``parse(type(config), ["--config", path])`` of it saved as YAML or JSON
    gives back an equal config."""
    return _plain(config)


def save_config(config, path: str | os.PathLike) -> pathlib.Path:
    """Write :func:`as_dict` of ``config`` to ``path``: YAML for ``.yaml``/``.yml``, otherwise
    JSON. Pass the file back with ``--config``."""
    path = pathlib.Path(path)
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(as_dict(config), sort_keys=False)
    else:
        text = json.dumps(as_dict(config), indent=2) + "\n"
    path.write_text(text)
    return path


def _read_file(path: str) -> Mapping[str, Any]:
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    is_json = file.suffix == ".json"
    try:
        content = json.loads(file.read_text()) if is_json else yaml.safe_load(file.read_text())
    except (ValueError, yaml.YAMLError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(
            f"--config {path}: not valid {'JSON' if is_json else 'YAML'}: {err}"
        ) from None
    if content is None:
        return {}
    if not isinstance(content, Mapping):
        raise ValueError(
            f"--config {path}: expected a mapping of settings, got a {type(content).__name__}"
        )
    return content


def _file_entries(cls, content: Mapping, path: str, prefix: str = ""):
    """``(field name, value)`` of each setting of a file's mapping, nested sections and
    flat or dotted keys alike; an unknown key raises ``ValueError`` naming it and the file."""
    fields = _fields(cls)
    sections = {f.name: f for f in dataclasses.fields(cls) if _nested(cls, f)}
    for key, value in content.items():
        key = str(key)
        head, _, rest = key.partition(".")
        if head in sections and (rest or isinstance(value, Mapping)):
            kind = typing.get_type_hints(cls)[head]
            inner = {rest: value} if rest else value
            yield from _file_entries(kind, inner, path, f"{prefix}{head}.")
        elif head in sections:
            raise ValueError(
                f"--config {path}: key {prefix + key!r} must be a section of settings "
                f"({sections[head].name}: {{...}}), got {value!r}"
            )
        elif key in fields:
            yield key, value
        else:
            close = difflib.get_close_matches(key, [*fields, *sections], n=3)
            hint = (
                f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
            )
            raise ValueError(
                f"--config {path}: unknown key {prefix + key!r} (not a setting of "
                f"{cls.__name__}{hint}; --help lists them)"
            )


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _convert(field: _Field, value, where: str):
    """A file's ``value`` for ``field`` as the field's type; ``ValueError`` naming the key."""
    kind = field.kind

    def wrong(expected: str):
        return ValueError(f"{where}: key {field.path!r} must be {expected}, got {value!r}")

    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        kind = inner[0]
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(v, item) for v in items):
            raise wrong(f"a list of {_type_name(item)}")
        return tuple(items)
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d[\d_]*", value.strip()):
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong("an integer")
        return value
    if kind is float:
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads 1e-3 (no dot) as a string
            except ValueError:
                raise wrong("a number") from None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise wrong("a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if not isinstance(value, kind):
        raise wrong(f"a {_type_name(kind)}")
    return value


def _file_values(cls, path: str) -> dict[str, Any]:
    """The settings of the configuration file ``path``, by flat name, converted and checked.
    A run folder's ``config.json`` (``{"config": {...}, ...}``) reads as its ``config``."""
    content = _read_file(path)
    fields = _fields(cls)
    if "config" in content and isinstance(content["config"], Mapping):
        if set(content) <= _RUN_RECORD_KEYS:
            content = content["config"]
    values = {}
    for name, value in _file_entries(cls, content, path):
        values[name] = _convert(fields[name], value, f"--config {path}")
    return values


# ----------------------------------------------------------------------------- flags


def _optional(kind):
    """Parse ``none`` as ``None``, anything else with ``kind``."""

    def convert(text: str):
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = kind.__name__
    return convert


def _parser(cls, fields, defaults, description=None, *, final: bool = True):
    """The flags of ``fields`` with ``defaults``; ``final=False``: no ``--help`` and no required
    flag (a first look at what is given, before a file or preset supplies the rest)."""
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=final,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="YAML or JSON file of settings (nested sections or flat keys; a run folder's "
        "config.json too): they replace the defaults below, flags given here replace them",
    )
    for field in fields.values():
        flags = [field.flag] + ([field.dotted_flag] if field.dotted_flag else [])
        help_text = field.help.replace("%", "%%")  # argparse formats help with %
        kind, default = field.kind, defaults[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            inner = [a for a in typing.get_args(kind) if a is not type(None)]
            if len(inner) != 1:
                raise TypeError(f"field {field.path}: unsupported type {kind}")
            kind = _optional(inner[0])
        common = dict(dest=field.name, help=help_text)
        if default is dataclasses.MISSING:
            common["required"], default = final, None
        if typing.get_origin(kind) is tuple:  # tuple[str, ...]: a repeatable flag
            shown = list(default) if default else "none"
            common["help"] += f" (repeatable; default: {shown})"
            parser.add_argument(
                *flags, type=typing.get_args(kind)[0], action="append", default=None, **common
            )
        elif kind is bool:
            parser.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=default, **common
            )
        else:
            parser.add_argument(*flags, type=kind, default=default, **common)
    return parser


def _parse_values(parser, argv, fields, defaults, *, known_only: bool = False) -> dict:
    """Flat values (and ``config``, the file given) of ``argv``; unknown flags and ``--help``
    are left alone with ``known_only``."""
    if known_only:
        namespace, _ = parser.parse_known_args(argv)
    else:
        namespace = parser.parse_args(argv)
    values = vars(namespace)
    for field in fields.values():
        if typing.get_origin(field.kind) is tuple:  # repeated flags replace the default
            given = values[field.name]
            values[field.name] = defaults[field.name] if given is None else tuple(given)
    return values


def parse(
    cls,
    argv: list[str] | None = None,
    description: str | None = None,
    defaults: Callable[[dict[str, Any]], Any] | None = None,
):
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``cls``
    (nested config dataclasses built from their own flags).

    ``defaults(values)``: called with the values given so far (flat names, e.g.
    ``values["env"]``: dataclass defaults, then the ``--config`` file, then the flags), returns
    a config (``cls`` or a dataclass whose fields ``cls`` has) whose values become the defaults
    of the flags; the file and the flags given still win, and ``--help`` shows these defaults.
    A bad value, unknown file key or failed check is a usage error naming it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fields = _fields(cls)
    values = _class_defaults(cls)
    parser = _parser(cls, fields, values, description)

    def given(defaults_so_far):
        first = _parser(cls, fields, defaults_so_far, final=False)
        return _parse_values(first, argv, fields, defaults_so_far, known_only=True)

    try:
        config_file = given(values)["config"]
        file_values = _file_values(cls, config_file) if config_file else {}
        if defaults is not None:
            so_far = given({**values, **file_values})
            del so_far["config"]
            preset = defaults(so_far)
            unknown = sorted(set(_flat_values(preset)) - set(fields))
            if unknown:
                raise TypeError(
                    f"defaults: {type(preset).__name__} has fields {unknown} that "
                    f"{cls.__name__} lacks"
                )
            values.update(_flat_values(preset))
    except ValueError as err:
        parser.error(str(err))
    values.update(file_values)
    parser = _parser(cls, fields, values, description)
    parsed = _parse_values(parser, argv, fields, values)
    del parsed["config"]
    try:
        return _build(cls, parsed)
    except ValueError as err:
        parser.error(str(err))
