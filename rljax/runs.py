"""Run folders for the language-model experiments: metrics log, progress lines, plots.

Experiments write ``DIR/metrics.jsonl`` (one JSON object per logged step), ``DIR/summary.json``
and PNG plots. A run resumed from a checkpoint at step ``s`` keeps the log lines up to ``s`` and
drops later ones (they were written after the checkpoint and will be recomputed), so the log of
an interrupted-and-resumed run equals the log of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_COMPILATION_CACHE",
    "MetricsLog",
    "plot_metrics",
    "to_json",
    "use_compilation_cache",
    "write_summary",
]


DEFAULT_COMPILATION_CACHE = "~/.cache/rljax/jax-compilation"


def use_compilation_cache(folder: str | None) -> str | None:
    """Point JAX's persistent compilation cache (``jax_compilation_cache_dir``) at ``folder``,
    so that a second run of the same program loads it instead of compiling it again.

    Does nothing for ``folder=None`` or when a cache folder is already configured (e.g. by
    ``JAX_COMPILATION_CACHE_DIR`` or the test suite). Returns the folder in use, or ``None``.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current or folder is None:
        return current or None
    folder = os.path.expanduser(folder)
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder


def to_json(value: Any) -> Any:
    """Arrays and numpy scalars as plain JSON values (NaN/inf as None)."""
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if hasattr(value, "shape") or isinstance(value, np.generic):
        array = np.asarray(value)
        if array.ndim:
            return [to_json(v) for v in array.tolist()]
        value = array.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only ``metrics.jsonl`` with a progress line on stdout.

    Args:
      path: the JSONL file.
      label: prefix of progress lines.
      total_steps: for ``step/total`` in progress lines.
      resume_step: keep only lines with ``step <= resume_step`` of an existing file (None:
        start a new file).
      keys: metric names shown in progress lines (all are logged).
      write: ``False`` (the processes other than 0 of a multi-process run) writes and prints
        nothing; :meth:`rows` then returns only the rows logged through this object.
    """

    def __init__(
        self,
        path: str | pathlib.Path,
        label: str,
        total_steps: int,
        *,
        resume_step: int | None = None,
        keys: Sequence[str] = (),
        write: bool = True,
    ):
        self.path = pathlib.Path(path)
        self.label, self.total_steps, self.keys = label, total_steps, tuple(keys)
        self.write, self._rows = write, []
        self.start = time.perf_counter()
        if not write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: Mapping[str, Any], *, print_line: bool = True) -> dict:
        row = {"step": int(step), **to_json(dict(metrics))}
        if not self.write:
            self._rows.append(row)
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if print_line:
            shown = "  ".join(
                f"{k} {row[k]:.4g}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}"
                for k in self.keys
                if k in row
            )
            elapsed = time.perf_counter() - self.start
            print(
                f"[{self.label}] step {step}/{self.total_steps}  {shown}  [{elapsed:.1f}s]",
                flush=True,
            )
        return row

    def rows(self) -> list[dict]:
        if not self.write:
            return list(self._rows)
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def write_summary(folder: str | pathlib.Path, summary: Mapping[str, Any]) -> pathlib.Path:
    path = pathlib.Path(folder) / "summary.json"
    path.write_text(json.dumps(to_json(dict(summary)), indent=2))
    return path


def plot_metrics(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    path: str | pathlib.Path,
    *,
    title: str,
    x: str = "step",
) -> pathlib.Path:
    """One panel per metric in ``keys`` (rows lacking a metric are skipped), against ``x``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r and r[k] is not None for r in rows)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * max(len(keys), 1)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        points = [(r[x], r[key]) for r in rows if r.get(key) is not None]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x)
    fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
