"""Reward functions as a library protocol (TRL's ``GRPOTrainer`` convention).

A reward function scores a batch of completions::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are the data set's other fields, one list per field with one entry per row (for
example ``answer=[...]``); a function takes what it needs and ignores the rest (``**_``).
``None`` means "not applicable to this row" (a math checker on a coding prompt).

**Combination** (:func:`score_completions`, as TRL 1.16's ``GRPOTrainer``): ``None`` becomes
NaN in the per-function table ``S [rows, functions]`` and the row's reward is the weighted sum
over the functions that scored it, :math:`r_i = \\sum_{k:\\,S_{ik} \\ne \\mathrm{NaN}} w_k S_{ik}`
(``nansum``). A row that no function scored is *unscorable*: TRL makes its reward NaN, leaves it
out of the group baseline and sets its advantage to 0. Here its ``reward`` is 0 and ``valid``
is False, and the consumer masks it (invalid rows never reach a baseline as a silent 0).
A function's logged mean is over the rows it scored (``nanmean``), under
``rewards/<name>/mean``.

**Errors.** TRL lets a failing reward function stop the run. Here ``on_error="raise"`` raises
:class:`RewardError` naming the function, its spec and the row; ``on_error="mask"`` marks the
row invalid, counts it and keeps the message. A function that raises on the whole batch is
called again row by row to find the rows that fail; a wrong-length result masks every row of
the batch (no row's value can be trusted). Non-numbers, NaN and infinities are errors (TRL
turns a NaN into "not applicable"; here only ``None`` means that).

**Specs.** Scripts take ``--reward MODULE:FUNCTION[=WEIGHT]`` (:func:`parse_reward_spec`):
``MODULE`` is a module on ``PYTHONPATH`` (``rljax.tasks.arithmetic``) or a path to a ``.py``
file (``my_rewards.py``), ``FUNCTION`` an attribute (dotted names reach into classes).

Usage::

    from rljax import rewards

    reward_set = rewards.RewardSet.from_specs(
        ["rljax.tasks.arithmetic:accuracy_reward", "rljax.tasks.arithmetic:format_reward=0.1"]
    )
    scores = reward_set.score(prompts, completions, {"answer": answers}, on_error="mask")
    scores.rewards, scores.valid, scores.num_errors, scores.metrics()
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "RewardError",
    "RewardFn",
    "RewardScores",
    "RewardSet",
    "RewardSpecError",
    "RewardTerm",
    "from_scorer",
    "parse_reward_spec",
    "score_completions",
    "sorting_reward",
]

ON_ERROR = ("raise", "mask")


@runtime_checkable
class RewardFn(Protocol):
    """A reward function: ``fn(prompts, completions, **columns) -> list[float | None]``.

    One entry per row, in order; ``None`` where the function does not apply. ``columns`` holds
    the data set's other fields (lists as long as ``prompts``). Everything is passed by keyword
    (as TRL does), so ``def reward(completions, **kwargs)`` is a reward function too. TRL also
    passes ``completion_ids``, ``trainer_state``, ``log_extra`` and ``log_metric``; rljax passes
    only the prompts, completions and columns.
    """

    def __call__(
        self, prompts: list[str], completions: list[str], **columns: Any
    ) -> Sequence[float | None]: ...


class RewardSpecError(ValueError):
    """A ``MODULE:FUNCTION[=WEIGHT]`` spec that cannot be resolved; the message names it."""


class RewardError(RuntimeError):
    """A reward function failed on a row (raised, wrong length, non-number, NaN or inf).

    Attributes:
      function: the function's name (its spec in parentheses when it came from one).
      row: the row index, or ``None`` when the failure concerns the whole batch.
    """

    def __init__(self, message: str, *, function: str, row: int | None):
        super().__init__(message)
        self.function = function
        self.row = row


# ---------------------------------------------------------------------------- specs


def _load_module(module: str, spec: str):
    """Import ``module`` (a dotted name on the path, or a ``.py`` file)."""
    if module.endswith(".py") or os.sep in module or (os.altsep and os.altsep in module):
        path = os.path.abspath(os.path.expanduser(module))
        if not os.path.isfile(path):
            raise RewardSpecError(f"reward spec {spec!r}: no file {path!r}")
        stem = os.path.splitext(os.path.basename(path))[0]
        name = f"_rljax_reward_{stem}_{hashlib.sha256(path.encode()).hexdigest()[:10]}"
        if name in sys.modules:
            return sys.modules[name]
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            raise RewardSpecError(f"reward spec {spec!r}: cannot import {path!r} as a module")
        loaded = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = loaded  # so classes and pickling inside the module work
        try:
            file_spec.loader.exec_module(loaded)
        except BaseException as e:
            del sys.modules[name]
            raise RewardSpecError(f"reward spec {spec!r}: importing {path!r} failed: {e!r}") from e
        return loaded
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise RewardSpecError(
                f"reward spec {spec!r}: no module named {module!r} (put its folder on "
                "PYTHONPATH, or give a path ending in .py)"
            ) from e
        raise RewardSpecError(
            f"reward spec {spec!r}: module {module!r} imports {e.name!r}, which is not installed"
        ) from e
    except Exception as e:
        raise RewardSpecError(f"reward spec {spec!r}: importing {module!r} failed: {e!r}") from e


def parse_reward_spec(spec: str) -> RewardTerm:
    """Resolve ``"MODULE:FUNCTION[=WEIGHT]"`` to a :class:`RewardTerm` (weight default 1.0).

    ``MODULE`` is a dotted module name importable from ``PYTHONPATH`` or a path to a ``.py``
    file (loaded with ``importlib.util.spec_from_file_location``); the split is at the last
    ``:``. ``FUNCTION`` may be dotted (``Class.method``). The term's ``name`` is the last part
    of ``FUNCTION`` (TRL logs a function under its ``__name__``).

    Raises:
      RewardSpecError: no ``:``, an empty part, the module is not found or fails to import, the
        attribute is missing or not callable, or the weight is not a finite number; the message
        names the spec.
    """
    if not isinstance(spec, str):
        raise RewardSpecError(f"reward spec {spec!r}: expected a string 'MODULE:FUNCTION[=WEIGHT]'")
    module, colon, target = spec.strip().rpartition(":")
    if not colon:
        raise RewardSpecError(
            f"reward spec {spec!r}: missing ':' (expected 'MODULE:FUNCTION[=WEIGHT]', e.g. "
            "'rljax.tasks.arithmetic:accuracy_reward=1.0' or 'my_rewards.py:length_penalty')"
        )
    attribute, equals, weight_text = target.partition("=")
    attribute, weight_text = attribute.strip(), weight_text.strip()
    if not module.strip() or not attribute:
        raise RewardSpecError(f"reward spec {spec!r}: MODULE and FUNCTION must both be non-empty")
    weight = 1.0
    if equals:
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise RewardSpecError(
                f"reward spec {spec!r}: weight {weight_text!r} is not a finite number"
            )
    obj = _load_module(module.strip(), spec)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise RewardSpecError(
                f"reward spec {spec!r}: {module.strip()!r} has no attribute {attribute!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardSpecError(
            f"reward spec {spec!r}: {attribute!r} is a {type(obj).__name__}, not callable"
        )
    return RewardTerm(obj, weight, name=attribute.rsplit(".", 1)[-1], spec=spec)


# ---------------------------------------------------------------------------- reward sets


def _function_name(fn: Callable) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__name__", None) or type(inner).__name__


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One reward function with its weight.

    Attributes:
      fn: the :class:`RewardFn`.
      weight: its factor in the weighted sum (any finite number; negative penalises).
      name: the name it is logged under (``rewards/<name>/mean``); default ``fn.__name__``.
      spec: the ``MODULE:FUNCTION[=WEIGHT]`` it came from, if any (quoted in errors).
    """

    fn: Callable[..., Sequence[float | None]]
    weight: float = 1.0
    name: str = ""
    spec: str | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"reward term: {self.fn!r} is not callable")
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"reward term {self.name or self.fn!r}: weight {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if not self.name:
            object.__setattr__(self, "name", _function_name(self.fn))

    @property
    def label(self) -> str:
        """``name`` and, when known, ``(spec ...)``: how errors refer to the function."""
        return f"{self.name!r}" + (f" (spec {self.spec!r})" if self.spec else "")


def _as_term(item) -> RewardTerm:
    if isinstance(item, RewardTerm):
        return item
    if isinstance(item, str):
        return parse_reward_spec(item)
    if isinstance(item, tuple) and len(item) == 2:
        fn, weight = item
        if isinstance(fn, RewardTerm):
            return dataclasses.replace(fn, weight=weight)
        return RewardTerm(fn, weight)
    if callable(item):
        return RewardTerm(item)
    raise TypeError(
        f"expected a reward function, a (function, weight) pair, a RewardTerm or a spec "
        f"string, got {item!r}"
    )


@dataclasses.dataclass(frozen=True)
class RewardSet:
    """Weighted reward functions, scored together (:func:`score_completions`).

    Names are made unique (``accuracy``, ``accuracy_1``) so every function gets its own log
    key. A ``RewardSet`` is itself a :class:`RewardFn`: calling it returns the combined reward
    per row (``None`` for unscorable rows) and raises on any error.
    """

    terms: tuple[RewardTerm, ...]

    def __post_init__(self):
        terms = tuple(_as_term(t) for t in self.terms)
        if not terms:
            raise ValueError("a RewardSet needs at least one reward function")
        seen: dict[str, int] = {}
        unique = []
        for term in terms:
            count = seen.get(term.name, 0)
            seen[term.name] = count + 1
            unique.append(
                term if count == 0 else dataclasses.replace(term, name=f"{term.name}_{count}")
            )
        object.__setattr__(self, "terms", tuple(unique))

    @classmethod
    def of(cls, functions_with_weights) -> RewardSet:
        """A set from a ``RewardSet``, one function, or a sequence of functions,
        ``(function, weight)`` pairs, :class:`RewardTerm`\\ s or spec strings."""
        if isinstance(functions_with_weights, RewardSet):
            return functions_with_weights
        if callable(functions_with_weights) or isinstance(functions_with_weights, str):
            return cls((functions_with_weights,))
        return cls(tuple(functions_with_weights))

    @classmethod
    def from_specs(cls, specs: Sequence[str]) -> RewardSet:
        """A set from ``MODULE:FUNCTION[=WEIGHT]`` specs (:func:`parse_reward_spec`)."""
        return cls(tuple(parse_reward_spec(s) for s in specs))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @property
    def weights(self) -> np.ndarray:
        return np.array([t.weight for t in self.terms], np.float64)

    def score(self, prompts, completions, columns=None, *, on_error="raise") -> RewardScores:
        """:func:`score_completions` with this set."""
        return score_completions(self, prompts, completions, columns, on_error=on_error)

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        scores = self.score(prompts, completions, columns)
        return [float(r) if v else None for r, v in zip(scores.rewards, scores.valid, strict=True)]


@dataclasses.dataclass(frozen=True)
class RewardScores:
    """What :func:`score_completions` returns (``B`` rows, ``K`` functions).

    Attributes:
      rewards: ``float32 [B]``, the weighted sum over the functions that scored each row; 0 where
        ``valid`` is False.
      valid: ``bool [B]``, the row has a reward: some function scored it and none failed on it.
      per_function: ``float32 [B, K]``, each function's score; NaN where it returned ``None`` or
        failed.
      names: the ``K`` function names (log keys).
      weights: ``float64 [K]``.
      num_errors: failed (function, row) pairs that ``on_error="mask"`` masked (a wrong-length
        result counts every row of the batch).
      num_unscorable: rows no function scored (all returned ``None``), not counting errors.
      errors: one message per masked failure.
    """

    rewards: np.ndarray
    valid: np.ndarray
    per_function: np.ndarray
    names: tuple[str, ...]
    weights: np.ndarray
    num_errors: int = 0
    num_unscorable: int = 0
    errors: tuple[str, ...] = ()

    @property
    def function_means(self) -> dict[str, float]:
        """Each function's mean over the rows it scored (NaN if none)."""
        return {
            name: _nan_stat(np.nanmean, self.per_function[:, k])
            for k, name in enumerate(self.names)
        }

    def metrics(self) -> dict[str, float]:
        """Log scalars: ``rewards/<name>/mean`` and ``/std`` (over the rows each function
        scored, as TRL), ``reward`` and ``reward_std`` (over valid rows), ``reward_errors`` and
        ``reward_unscorable`` (counts) and ``reward_valid_fraction``."""
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            out[f"rewards/{name}/mean"] = _nan_stat(np.nanmean, self.per_function[:, k])
            out[f"rewards/{name}/std"] = _nan_stat(np.nanstd, self.per_function[:, k])
        valid_rewards = self.rewards[self.valid]
        out["reward"] = float(valid_rewards.mean()) if valid_rewards.size else math.nan
        out["reward_std"] = float(valid_rewards.std()) if valid_rewards.size else math.nan
        out["reward_errors"] = float(self.num_errors)
        out["reward_unscorable"] = float(self.num_unscorable)
        out["reward_valid_fraction"] = float(self.valid.mean()) if self.valid.size else math.nan
        return out


def _nan_stat(stat, values: np.ndarray) -> float:
    return float(stat(values)) if np.isfinite(values).any() else math.nan


# ---------------------------------------------------------------------------- scoring


def _is_number(x) -> bool:
    if isinstance(x, numbers.Real):
        return True
    return (
        getattr(x, "shape", None) == ()
        and hasattr(x, "__float__")
        and not isinstance(x, str | bytes)
    )


def _row_columns(columns: Mapping[str, Sequence], rows: Sequence[int]) -> dict[str, list]:
    return {key: [values[i] for i in rows] for key, values in columns.items()}


def _check_value(value) -> str | None:
    """``None`` if ``value`` is ``None`` or a finite number, else what is wrong with it."""
    if value is None:
        return None
    if not _is_number(value):
        return f"returned {value!r} ({type(value).__name__}), not a number or None"
    if not math.isfinite(float(value)):
        return f"returned {float(value)!r}; use None for 'not applicable'"
    return None


def _call(term: RewardTerm, prompts, completions, columns):
    """What the function returns (anything; checked by the caller). Keyword arguments, as TRL
    calls them, so ``def reward(completions, **kwargs)`` works too."""
    return term.fn(prompts=list(prompts), completions=list(completions), **columns)


def _not_a_list(out) -> bool:
    return isinstance(out, str | bytes | Mapping) or not hasattr(out, "__len__")


class _Failures:
    """Records failures of one function: raises (``on_error="raise"``) or marks rows."""

    def __init__(self, term: RewardTerm, n: int, on_error: str, errors: list[str]):
        self.term, self.n, self.on_error, self.errors = term, n, on_error, errors
        self.failed = np.zeros(n, bool)

    def __call__(self, row: int | None, reason: str, cause=None, *, whole_batch=False):
        """Row ``row`` failed (``whole_batch``: every row is unusable; ``row`` is the one
        named, ``None`` if none in particular)."""
        where = f"row {row}" if row is not None else f"all {self.n} rows"
        message = f"reward function {self.term.label} failed on {where}: {reason}"
        if self.on_error == "raise":
            raise RewardError(message, function=self.term.label, row=row) from cause
        self.errors.append(message)
        if whole_batch or row is None:
            self.failed[:] = True
        else:
            self.failed[row] = True


def _rows_alone(term: RewardTerm, prompts, completions, columns, fail: _Failures, batch_error):
    """After the batch call raised: call the function row by row to find the rows that fail.
    Returns the outputs (``None`` at failed rows)."""
    outputs: list[Any] = [None] * len(prompts)
    for i in range(len(prompts)):
        try:
            single = _call(
                term, prompts[i : i + 1], completions[i : i + 1], _row_columns(columns, [i])
            )
        except Exception as e:
            fail(i, repr(e), e)
            continue
        if _not_a_list(single) or len(single) != 1:
            fail(i, f"returned {single!r} for 1 row (need a list of one reward)")
            continue
        outputs[i] = single[0]
    if not fail.failed.any():
        fail(None, f"the batch call raised {batch_error!r}, every row alone succeeds", batch_error)
    return outputs


def _score_term(term: RewardTerm, prompts, completions, columns, on_error, errors):
    """One function's ``float64 [B]`` scores (NaN = None or failed) and ``bool [B]`` failed."""
    n = len(prompts)
    scores = np.full(n, np.nan)
    fail = _Failures(term, n, on_error, errors)
    try:
        outputs = _call(term, prompts, completions, columns)
    except Exception as batch_error:
        outputs = _rows_alone(term, prompts, completions, columns, fail, batch_error)
    if _not_a_list(outputs):
        fail(None, f"returned {type(outputs).__name__}, not a list of rewards", whole_batch=True)
        return scores, fail.failed
    if len(outputs) != n:
        first_wrong = min(len(outputs), n)
        reason = f"returned {len(outputs)} rewards for {n} rows (need one per row)"
        fail(first_wrong, reason, whole_batch=True)
        return scores, fail.failed
    for i, value in enumerate(outputs):
        if fail.failed[i]:
            continue
        problem = _check_value(value)
        if problem is not None:
            fail(i, problem)
        elif value is not None:
            scores[i] = float(value)
    return scores, fail.failed


def score_completions(
    functions_with_weights,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence] | None = None,
    *,
    on_error: str = "raise",
) -> RewardScores:
    """Score ``B`` completions with every reward function and combine them (TRL 1.16).

    Args:
      functions_with_weights: a :class:`RewardSet`, or what :meth:`RewardSet.of` takes (a
        function, or a list of functions, ``(function, weight)`` pairs, terms or specs).
      prompts, completions: ``B`` each (strings, or conversational message lists, passed on as
        they are).
      columns: the data set's other fields, each a sequence of ``B`` values, passed to every
        function as keyword arguments.
      on_error: ``"raise"``: the first failure raises :class:`RewardError` naming the function
        and the row. ``"mask"``: a failed (function, row) marks the row invalid and is counted
        in ``num_errors``, with its message in ``errors``.

    Returns:
      :class:`RewardScores`: ``rewards[i] = sum_k w_k S[i, k]`` over the functions that scored
      row ``i`` (``nansum``); rows no function scored, or on which one failed, are invalid
      (reward 0, ``valid`` False).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: choose 'raise' or 'mask'")
    reward_set = RewardSet.of(functions_with_weights)
    prompts, completions = list(prompts), list(completions)
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{n} prompts but {len(completions)} completions")
    columns = dict(columns or {})
    for key, values in columns.items():
        if key in ("prompts", "completions"):
            raise ValueError(f"column {key!r} clashes with a reward function argument; rename it")
        if isinstance(values, str | bytes) or not hasattr(values, "__len__") or len(values) != n:
            got = len(values) if hasattr(values, "__len__") else type(values).__name__
            raise ValueError(f"column {key!r}: expected {n} values (one per row), got {got}")
    errors: list[str] = []
    per_function = np.full((n, len(reward_set.terms)), np.nan)
    failed = np.zeros(n, bool)
    num_errors = 0
    for k, term in enumerate(reward_set.terms):
        scores, term_failed = _score_term(term, prompts, completions, columns, on_error, errors)
        per_function[:, k] = scores
        failed |= term_failed
        num_errors += int(term_failed.sum())
    scored = np.isfinite(per_function)
    unscorable = ~scored.any(axis=1) & ~failed
    valid = scored.any(axis=1) & ~failed
    weighted = np.where(scored, per_function * reward_set.weights[None, :], 0.0)
    rewards = np.where(valid, weighted.sum(axis=1), 0.0).astype(np.float32)
    return RewardScores(
        rewards=rewards,
        valid=valid,
        per_function=per_function.astype(np.float32),
        names=reward_set.names,
        weights=reward_set.weights,
        num_errors=num_errors,
        num_unscorable=int(unscorable.sum()),
        errors=tuple(errors),
    )


# ---------------------------------------------------------------------------- adapters


def from_scorer(
    score: Callable[[Any, Any], float | None],
    name: str | None = None,
    *,
    not_applicable: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> RewardFn:
    """A :class:`RewardFn` from a per-pair oracle ``score(prompt, completion) -> float``.

    Columns are ignored. An exception of a type in ``not_applicable`` (say the oracle's "not
    my prompt format" ``ValueError``) becomes ``None`` for that row; any other propagates.
    The function is named ``name`` (default: the oracle's name).
    """

    def reward(prompts, completions, **_columns):
        out: list[float | None] = []
        for prompt, completion in zip(prompts, completions, strict=True):
            try:
                out.append(float(score(prompt, completion)))
            except not_applicable:
                out.append(None)
        return out

    reward.__name__ = reward.__qualname__ = name or _function_name(score)
    reward.__doc__ = (
        f"Reward function of the oracle {_function_name(score)!r} (None where it does not apply)."
    )
    return reward


def sorting_reward(prompts, completions, **_columns) -> list[float | None]:
    """The sorting task's oracle (:func:`rljax.tasks.sorting.score`) as a reward function:
    the fraction of correctly ordered letter pairs, 0 for a non-permutation, and ``None`` for a
    prompt that is not a sorting prompt (so it mixes with other tasks' rewards).

    Spec: ``rljax.rewards:sorting_reward``.
    """
    from rljax.tasks import sorting

    oracle = from_scorer(sorting.score, "sorting_reward", not_applicable=ValueError)
    return oracle(prompts, completions)
