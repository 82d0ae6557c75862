"""Read data rows (one dict per example) from JSONL, JSON, parquet or a saved HF datasets folder.

``pyarrow`` and ``datasets`` are imported only when a parquet file or a datasets folder is
read, so the rest of :mod:`rljax.data` works without them (``pip install 'rljax[data]'``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RowNumbers", "load_numbered_rows", "load_rows"]

_JSON_LINES = (".jsonl", ".ndjson")
_FIRST = 5  # row numbers listed by RowNumbers.labels before "..."


@dataclasses.dataclass(frozen=True)
class RowNumbers:
    """Where each row of a list came from, so that messages name the row in the user's file.

    Row ``i`` of the list is ``numbers[i]`` of ``source``, counted by ``unit``:

    - ``"line"``: the 1-based line of a JSON-lines file (blank lines count);
    - ``"row"``: the 0-based row of a JSON array, a parquet table or a datasets split;
    - ``"index"``: the 0-based index in a list given in Python (the default; messages then
      say ``row i``, as before files were tracked).

    :meth:`take` follows the rows through a selection (a held-out split, the rows that
    survived validation), so numbers stay those of the file.
    """

    numbers: tuple[int, ...]
    unit: str = "index"
    source: str | None = None

    @classmethod
    def of(cls, count: int) -> RowNumbers:
        """Plain 0-based indices of a list of ``count`` rows."""
        return cls(tuple(range(count)))

    def __len__(self) -> int:
        return len(self.numbers)

    def take(self, index: Sequence[int]) -> RowNumbers:
        """The numbers of the rows ``index`` (positions in this list), in that order."""
        return dataclasses.replace(self, numbers=tuple(self.numbers[int(i)] for i in index))

    def _unit(self, plural: bool) -> tuple[str, str]:
        word = {"line": "line", "row": "row", "index": "row"}[self.unit]
        note = {"line": " (1-based)", "row": " (0-based)", "index": ""}[self.unit]
        return word + ("s" if plural else ""), note

    def label(self, i: int) -> str:
        """Row ``i`` of the list, as the user's file numbers it: ``data.jsonl line 7
        (1-based)``, ``data.parquet row 6 (0-based)``, or ``row 6`` for a plain list."""
        word, note = self._unit(False)
        where = f"{self.source} " if self.source else ""
        return f"{where}{word} {self.numbers[i]}{note}"

    def labels(self, numbers: Sequence[int], count: int | None = None) -> str:
        """``lines 3, 9 (1-based)`` for file numbers already mapped (``numbers[:5]`` shown,
        ``...`` when ``count`` says there are more)."""
        count = len(numbers) if count is None else count
        word, note = self._unit(True)
        shown = ", ".join(map(str, list(numbers)[:_FIRST]))
        more = ", ..." if count > min(len(numbers), _FIRST) else ""
        return f"{word} {shown}{more}{note}"


def _note_first(first: list[int], number: int, limit: int) -> None:
    """Append ``number`` to ``first`` unless it already holds ``limit`` numbers: the reports
    (validation, tokenization, packing) name the first few rows of each kind beside a count
    of them all."""
    if len(first) < limit:
        first.append(number)


def _read_json_lines(path: Path) -> tuple[list[dict], list[int]]:
    """The rows and the 1-based line of each."""
    rows, lines = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines hold no row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}: line {number}: invalid JSON ({error.msg} at column {error.colno}); "
                    "each line must be one JSON object: fix or remove the line"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}: line {number}: a JSON {type(row).__name__}, expected a JSON object "
                    "(one row per line)"
                )
            rows.append(row)
            lines.append(number)
    return rows, lines


def _read_json(path: Path) -> tuple[list[dict], list[int] | None]:
    """The rows, and their lines if the file is JSON lines (``None`` for a JSON array)."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_json_lines(path)  # a .json file written as JSON lines
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})"
        ) from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: element {i} is a {type(row).__name__}, expected an object")
    return rows, None


def _import(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        raise ImportError(
            f"reading this file needs {name.split('.')[0]!r}: pip install 'rljax[data]'"
        ) from None


def _read_parquet(path: Path) -> list[dict]:
    parquet = _import("pyarrow.parquet")
    return parquet.read_table(path).to_pylist()


def _read_datasets_folder(path: Path, split: str | None) -> list[dict]:
    datasets = _import("datasets")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        splits = sorted(data)
        if split is None:
            if len(splits) != 1:
                raise ValueError(
                    f"{path} holds a DatasetDict with splits {splits}: pass split=<one of them>"
                )
            split = splits[0]
        if split not in data:
            raise ValueError(f"{path}: no split {split!r}; the splits are {splits}")
        data = data[split]
    elif split is not None:
        raise ValueError(f"{path} holds a single Dataset, not a DatasetDict: drop split={split!r}")
    return data.to_list()


def load_rows(path: str | os.PathLike, *, split: str | None = None) -> list[dict]:
    """Rows (a list of dicts) from a data file or folder.

    - ``*.jsonl`` / ``*.ndjson``: one JSON object per line (blank lines ignored); a bad line
      raises ``ValueError`` naming its (1-based) line number;
    - ``*.json``: a JSON array of objects, or JSON lines;
    - ``*.parquet``: a parquet table (needs ``pyarrow``); list-of-struct columns become lists
      of dicts, so conversational rows survive;
    - a folder written by ``datasets``' ``save_to_disk`` (needs ``datasets``): a ``Dataset``,
      or a ``DatasetDict`` with ``split`` naming the split (optional if it has only one).

    Rows are returned as read; check them with :func:`rljax.data.validate_preferences` or
    :func:`rljax.data.validate_completions`.
    """
    return load_numbered_rows(path, split=split)[0]


def load_numbered_rows(
    path: str | os.PathLike, *, split: str | None = None
) -> tuple[list[dict], RowNumbers]:
    """:func:`load_rows`, and the :class:`RowNumbers` that name each row as the file does:
    its 1-based line in a JSON-lines file (blank lines are skipped but counted), otherwise
    its 0-based row."""
    path = Path(path)
    rows, lines = _load(path, split)
    if lines is not None:
        return rows, RowNumbers(tuple(lines), "line", str(path))
    return rows, RowNumbers(tuple(range(len(rows))), "row", str(path))


def _load(path: Path, split: str | None) -> tuple[list[dict], list[int] | None]:
    """The rows, and the 1-based line of each in a JSON-lines file (else ``None``)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_datasets_folder(path, split), None
    if split is not None:
        raise ValueError(f"{path}: split={split!r} applies only to a datasets folder; drop it")
    suffix = path.suffix.lower()
    if suffix in _JSON_LINES:
        return _read_json_lines(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path), None
    raise ValueError(
        f"{path}: unknown data format {suffix!r}; expected .jsonl, .ndjson, .json, .parquet or a "
        "folder saved by datasets' save_to_disk"
    )
