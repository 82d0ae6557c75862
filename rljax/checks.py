"""Range checks of config fields: one error form naming the flag, the value and the range.

A rule is a short string: ``"> 0"``, ``">= 1"``, ``"in (0, 1]"``, ``"in [0, 1]"``, ... A field
that is ``None`` passes (``X | None`` fields use ``None`` for "off" or "preset"), and so does a
value that is not a plain number (a traced coefficient is checked where it is concrete).

Two labels: a script's run configuration (every field a flag) names the flag,
``--steps must be >= 1, got 0``; a library config names the field and the flag it has in the
scripts, ``DPOConfig.beta must be > 0, got 0 (--beta)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence

__all__ = ["check", "check_choice", "flag", "require_folder", "satisfies"]

_COMPARE = re.compile(r"^(>=|<=|>|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^in\s*([\[(])\s*([^,]+),\s*([^\])]+)([\])])$")


def flag(field: str) -> str:
    """The command-line flag of a config field: ``max_kl`` -> ``--max-kl``."""
    return "--" + field.replace("_", "-")


def satisfies(value: float, rule: str) -> bool:
    """Whether ``value`` obeys ``rule`` (``"> 0"``, ``"in (0, 1]"``, ...); NaN never does."""
    if math.isnan(value):
        return False
    if match := _COMPARE.match(rule):
        op, bound = match.group(1), float(match.group(2))
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[
            op
        ]
    if match := _INTERVAL.match(rule):
        left, low, high, right = match.groups()
        low, high = float(low), float(high)
        above = value > low if left == "(" else value >= low
        below = value < high if right == ")" else value <= high
        return above and below
    raise ValueError(f"unknown range rule {rule!r}: use '> 0', '>= 1', 'in (0, 1]', ...")


def _label(config, field: str, library: bool) -> tuple[str, str]:
    """``(name, suffix)`` of ``field`` in an error message."""
    if library:
        return f"{type(config).__name__}.{field}", f" ({flag(field)})"
    return flag(field), ""


def _optional(config, field: str) -> bool:
    for f in dataclasses.fields(config):
        if f.name == field:
            return f.default is None or "None" in str(f.type)
    return False


def check(config, rules: Mapping[str, str], *, library: bool = False) -> None:
    """Raise ``ValueError`` for the first field of ``config`` outside its rule.

    ``rules``: field name -> rule. ``library=False`` (a run configuration) names the flag,
    ``--steps must be >= 1, got 0``; ``library=True`` names the field and its flag,
    ``DPOConfig.beta must be > 0, got 0 (--beta)``. An optional field's range says
    ``or none``."""
    for field, rule in rules.items():
        value = getattr(config, field)
        if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if not satisfies(float(value), rule):
            name, suffix = _label(config, field, library)
            none = " or none" if _optional(config, field) else ""
            raise ValueError(f"{name} must be {rule}{none}, got {value!r}{suffix}")


def check_choice(config, field: str, choices: Sequence[str], *, library: bool = False) -> None:
    """Raise ``ValueError`` unless ``config.field`` is one of ``choices``."""
    value = getattr(config, field)
    if value not in choices:
        name, suffix = _label(config, field, library)
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}{suffix}")


def require_folder(option: str, path: str | os.PathLike | None, what: str = "folder") -> None:
    """Raise ``FileNotFoundError`` at once unless ``path`` (given as ``option``) is a local
    folder: a Hub name such as ``gpt2`` is not downloaded (that would wait on the network),
    and a missing folder is named as missing. ``None`` (the option unset) passes."""
    if path is None or os.path.isdir(path):
        return
    problem = "is a file" if os.path.exists(path) else "does not exist"
    raise FileNotFoundError(
        f"{option} {os.fspath(path)!r} is not a folder ({problem}): pass a local {what} (Hub "
        "names are not downloaded; fetch one first with huggingface_hub.snapshot_download)"
    )
