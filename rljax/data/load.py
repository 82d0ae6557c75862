"""Read data rows (one dict per example) from JSONL, JSON, parquet or a saved HF datasets folder.

``pyarrow`` and ``datasets`` are imported only when a parquet file or a datasets folder is
read, so the rest of :mod:`rljax.data` works without them (``pip install 'rljax[data]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["load_rows"]

_JSON_LINES = (".jsonl", ".ndjson")


def _read_json_lines(path: Path) -> list[dict]:
    rows = []
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
    return rows


def _read_json(path: Path) -> list[dict]:
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
    return rows


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
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_datasets_folder(path, split)
    if split is not None:
        raise ValueError(f"{path}: split={split!r} applies only to a datasets folder; drop it")
    suffix = path.suffix.lower()
    if suffix in _JSON_LINES:
        return _read_json_lines(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    raise ValueError(
        f"{path}: unknown data format {suffix!r}; expected .jsonl, .ndjson, .json, .parquet or a "
        "folder saved by datasets' save_to_disk"
    )
