"""Run folders for the language-model experiments: metrics sinks, progress lines, plots.

Experiments write ``DIR/metrics.jsonl`` (one JSON object per logged step), ``DIR/summary.json``
and PNG plots; :class:`MetricsLog` can also send the metrics to TensorBoard
(``DIR/tensorboard/``) and Weights & Biases (``--log tensorboard,wandb``, :func:`parse_sinks`),
keep sample completions (``DIR/samples.jsonl``) and print progress lines with the elapsed time,
rate and ETA (:class:`Progress`). A run resumed from a checkpoint at step ``s`` keeps what each
sink holds up to ``s`` and drops later steps (they were written after the checkpoint and will
be recomputed; W&B, which cannot drop steps, keeps them and skips their recomputation), so the
log of an interrupted-and-resumed run equals the log of an uninterrupted one.

A run holds its folder (:class:`RunFolder`) while it runs: a lock file (``DIR/run.lock``, one
run per folder) and the stored configuration (``DIR/config.json``), which a resume must match
(see :class:`RunFolder` for what may change and the override).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import importlib
import json
import math
import os
import pathlib
import socket
import struct
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rljax import checks

__all__ = [
    "DEFAULT_COMPILATION_CACHE",
    "SAFE_TO_CHANGE",
    "SINKS",
    "ConfigChangedError",
    "MetricsLog",
    "Progress",
    "RunFolder",
    "RunFolderBusyError",
    "RunLock",
    "RunSettings",
    "config_changes",
    "config_record",
    "format_duration",
    "format_rate",
    "latest_saved_step",
    "parse_sinks",
    "plot_metrics",
    "read_jsonl",
    "to_json",
    "use_compilation_cache",
    "write_json_atomic",
    "write_summary",
]


DEFAULT_COMPILATION_CACHE = "~/.cache/rljax/jax-compilation"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings every training run has beside its own (the preference, SFT and RL run
    configurations subclass it): the device mesh, the seed, the metrics sinks, the
    non-finite stop and the resume rule. Checked at construction.

    Attributes:
      mesh: device mesh such as data=2,fsdp=2,tensor=2; empty = one device.
      seed: data order, sampling and initialisation seed.
      log: metrics sinks, comma-separated: jsonl (out/metrics.jsonl, always written),
        tensorboard (out/tensorboard; pip install 'rljax[tensorboard]'), wandb (Weights &
        Biases; pip install 'rljax[wandb]', WANDB_MODE=offline for local files).
      max_nonfinite_updates: stop after this many consecutive updates with a NaN or inf in
        the loss, gradients or new parameters (each is skipped, parameters unchanged); the
        error names the last good checkpoint.
      allow_config_change: resume even though the settings differ from those stored in
        out/config.json (summary.json then records both); without it such a resume is
        refused, naming each change.
    """

    mesh: str = ""
    seed: int = 0
    log: str = "jsonl"
    max_nonfinite_updates: int = 3
    allow_config_change: bool = False

    def __post_init__(self):
        # numpy's generators take no negative seed
        checks.check(self, {"seed": ">= 0", "max_nonfinite_updates": ">= 1"})
        parse_sinks(self.log)  # an unknown sink fails here, before the run


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


def read_jsonl(path: str | pathlib.Path) -> list[tuple[str, dict]]:
    """``(line, row)`` for each non-blank line of a JSONL log such as ``metrics.jsonl``.

    A last line that does not parse is a write cut short (a full disk, a power loss, a kill in
    mid-write): it is dropped with a warning. Any other line that does not parse raises
    ``ValueError`` naming the file and the line (1-based)."""
    path = pathlib.Path(path)
    lines = path.read_text(errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip(" \t\x00")]
    out = []
    for k, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as err:
            if k == len(numbered) - 1:
                warnings.warn(
                    f"{path}: dropped line {number}, a half-written last line (a write cut "
                    f"short by a crash or a full disk: {err})",
                    stacklevel=2,
                )
                break
            raise ValueError(
                f"{path}, line {number}: not a JSON object ({err}); only the last line may be "
                "cut short by a crash, so this file was edited or damaged: repair or delete "
                "that line"
            ) from None
        out.append((line, row))
    return out


# ---------------------------------------------------------------------------- progress


def format_duration(seconds: float) -> str:
    """``seconds`` as ``"8.2s"``, ``"42s"``, ``"12m05s"``, ``"3h04m"`` or ``"2d03h"``; ``"?"``
    when unknown (negative or not finite)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_rate(seconds_per_step: float, unit: str = "step") -> str:
    """``"2.4s/step"`` (a step or more per second: time per step) or ``"12.5 steps/s"``."""
    if not math.isfinite(seconds_per_step) or seconds_per_step < 0:
        return f"?/{unit}"
    if seconds_per_step >= 1 / 1.05:  # so that 0.96 s reads as "1.0s/step", not "1.0 steps/s"
        return f"{format_duration(seconds_per_step)}/{unit}"
    rate = 1 / seconds_per_step if seconds_per_step > 0 else math.inf
    return f"{rate:.1f} {unit}s/s" if rate < 100 else f"{rate:.0f} {unit}s/s"


class Progress:
    """Elapsed time, rate and ETA of a loop over steps ``start + 1 .. total``.

    Call :meth:`update` when step ``step`` is done; it returns a text such as
    ``"1m02s elapsed, 2.4s/step, ETA 4m10s"``. The time per step is measured over the last
    ``window`` updates (so it follows the current pace, not the average since the start) and the
    ETA is the remaining steps times it. The first update after the start also counts the
    start-up (compilation); later ones measure from the first update on. The text is a plain
    part of one line (no carriage returns, no terminal codes), so logs written to files and CI
    show one readable line per update.

    Args:
      total: the last step.
      start: the step the loop starts after (the resumed step, else 0).
      window: updates the rate is measured over.
      unit: what a step is called (``"2.4s/iteration"``).
      clock: seconds as a float (``time.perf_counter``; tests pass a fake clock).
    """

    def __init__(
        self,
        total: int,
        *,
        start: int = 0,
        window: int = 5,
        unit: str = "step",
        clock: Callable[[], float] = time.perf_counter,
    ):
        if window < 1:
            raise ValueError(f"Progress: window must be >= 1, got {window}")
        self.total, self.unit, self.clock = int(total), unit, clock
        self.started = clock()
        self._start = (int(start), self.started)
        self._points: collections.deque[tuple[int, float]] = collections.deque(maxlen=window + 1)

    def seconds_per_step(self) -> float | None:
        """The recent time per step, or ``None`` before a step past ``start`` is done."""
        first = self._points[0] if len(self._points) > 1 else self._start
        last = self._points[-1] if self._points else self._start
        if last[0] <= first[0]:
            return None
        return (last[1] - first[1]) / (last[0] - first[0])

    def update(self, step: int) -> str:
        now, step = self.clock(), int(step)
        if self._points and step <= self._points[-1][0]:
            self._points[-1] = (self._points[-1][0], now)  # the same step again: it ends later
        else:
            self._points.append((step, now))
        text = f"{format_duration(now - self.started)} elapsed"
        per_step = self.seconds_per_step()
        if per_step is None:
            return text
        eta = per_step * max(self.total - step, 0)
        return f"{text}, {format_rate(per_step, self.unit)}, ETA {format_duration(eta)}"


# ---------------------------------------------------------------------------- metrics sinks

#: The metrics sinks (``--log`` takes a comma-separated list): ``jsonl`` (``metrics.jsonl``,
#: always written), ``tensorboard`` (event files in ``tensorboard/``), ``wandb`` (a Weights &
#: Biases run).
SINKS = ("jsonl", "tensorboard", "wandb")

#: For each optional sink: the module it imports and the rljax extra that installs it.
_SINK_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}


def parse_sinks(spec: str | Sequence[str]) -> tuple[str, ...]:
    """The metrics sinks named by ``spec``: the value of ``--log`` (``"tensorboard,wandb"``) or
    a sequence of names. Returns them in order without repeats, ``"jsonl"`` first: summaries,
    plots and resumes read ``metrics.jsonl``, so it is always written. Raises ``ValueError``
    naming an unknown sink and listing the valid ones."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    sinks = ["jsonl"]
    for raw in names:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name not in SINKS:
            raise ValueError(
                f"unknown metrics sink {str(raw).strip()!r} in --log {spec!r}: the sinks are "
                f"{', '.join(SINKS)} (comma-separated, e.g. --log tensorboard,wandb)"
            )
        if name not in sinks:
            sinks.append(name)
    return tuple(sinks)


def _import_sink_package(sink: str):
    module, extra = _SINK_PACKAGES[sink]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the {sink} metrics sink needs the {module} package, which is not installed "
            f"({err}): pip install 'rljax[{extra}]' (or pip install {module}), or leave "
            f"{sink} out of --log"
        ) from err


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a scalar sink can plot: numbers (Python, numpy, 0-d arrays; booleans as 0/1)
    as floats, NaN and infinities included. Strings, lists, arrays with dimensions, mappings and
    ``None`` are left out (``metrics.jsonl`` keeps them)."""
    scalars = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, str | bytes | Mapping | list | tuple):
            continue
        array = np.asarray(value)
        if array.ndim == 0 and array.dtype.kind in "biuf":
            scalars[str(key)] = float(array)
    return scalars


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys of ``rows`` in order of first appearance."""
    return list(dict.fromkeys(str(k) for row in rows for k in row))


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(to_json(value))
        return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    columns = _columns(rows)
    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _tfrecords(path: pathlib.Path) -> list[tuple[bytes, bytes]]:
    """``(record, payload)`` for each record of a TFRecord file (a TensorBoard event file): an
    8-byte length, its 4-byte CRC, the payload, its 4-byte CRC. A last record cut short (a
    crash in mid-write) is dropped with a warning."""
    data = path.read_bytes()
    records, position = [], 0
    while position < len(data):
        end = position + 12
        if end <= len(data):
            end += struct.unpack_from("<Q", data, position)[0] + 4
        if end > len(data):
            warnings.warn(
                f"{path}: dropped {len(data) - position} bytes at the end, a half-written last "
                "event (a write cut short by a crash or a full disk)",
                stacklevel=3,
            )
            break
        records.append((data[position:end], data[position + 12 : end - 4]))
        position = end
    return records


def _truncate_event_files(folder: pathlib.Path, resume_step: int | None, event_class) -> int:
    """Keep only the events with ``step <= resume_step`` in the event files in ``folder`` (none
    for a new run, ``resume_step=None``), rewriting each file atomically; delete files left
    with no events. Returns the last step kept (-1 when none)."""
    last = -1
    for path in sorted(folder.glob("*tfevents*")):
        records = [] if resume_step is None else _tfrecords(path)
        kept, events = [], 0
        for record, payload in records:
            event = event_class.FromString(payload)
            if event.HasField("file_version") or event.step <= resume_step:
                kept.append(record)
            if event.step <= resume_step and event.HasField("summary"):
                events += 1
                last = max(last, event.step)
        if not events:
            path.unlink()
        elif len(kept) < len(records):
            _write_atomic(path, b"".join(kept))
    return last


class _TensorBoardSink:
    """Scalars (one per metric and step), sample tables (markdown text, tag
    ``samples/text_summary``) and the configuration (text, ``config/text_summary``, step 0) as
    TensorBoard event files in ``folder``, written with tensorboardX (no TensorFlow needed).
    A resume rewrites the existing files without the events after the resumed step and starts
    a new file whose ``purge_step`` tells a running TensorBoard to drop those it already
    loaded."""

    def __init__(self, folder: pathlib.Path, *, label: str, resume_step: int | None, config):
        tensorboardx = _import_sink_package("tensorboard")
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        self.summary_class = Summary
        folder.mkdir(parents=True, exist_ok=True)
        resume_step = resume_step or None  # a run from step 0 is a new run: new files
        self.holds_through = _truncate_event_files(folder, resume_step, Event)
        self.writer = tensorboardx.SummaryWriter(
            str(folder),
            purge_step=None if resume_step is None else resume_step + 1,
            filename_suffix=f".{time.time_ns()}",  # two writers in one second: two files
        )
        if resume_step is None and config is not None:
            text = json.dumps(to_json(dict(config)), indent=2)
            self.writer.add_text("config", f"{label}\n\n```\n{text}\n```", 0)
            self.writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        # One event per step holding every scalar (what add_scalar writes, one per metric,
        # without its warning on each NaN: a NaN metric is data here).
        if values:
            value = self.summary_class.Value
            summary = self.summary_class(
                value=[value(tag=t, simple_value=v) for t, v in values.items()]
            )
            self.writer.file_writer.add_summary(summary, step)
        self.writer.flush()

    def samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        self.writer.add_text("samples", _markdown_table(rows), step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class _WandbSink:
    """A Weights & Biases run: scalars per step, sample tables as ``wandb.Table``, the run's
    configuration as its config. ``wandb.init`` honours ``WANDB_MODE`` (``offline``: local
    files only, ``wandb sync`` uploads them later), ``WANDB_PROJECT`` (default ``rljax``),
    ``WANDB_ENTITY`` and ``WANDB_DIR`` (default: the run folder).

    The run id and the last step sent are kept in ``wandb_run.json`` in the run folder. A
    resume continues that W&B run (``resume="allow"``) and skips the steps it already holds:
    W&B cannot take a step twice, and the values it holds for those steps were computed from
    the same checkpoint."""

    STATE_FILE = "wandb_run.json"

    def __init__(self, folder: pathlib.Path, *, label: str, resume_step: int | None, config):
        wandb = _import_sink_package("wandb")
        self.wandb, self.state_path = wandb, folder / self.STATE_FILE
        stored = self._stored() if resume_step else None  # a new run (None or 0): a new W&B run
        try:
            self.run = wandb.init(
                id=stored["run_id"] if stored else None,  # None: wandb makes a new id
                resume="allow" if stored else None,
                mode=os.environ.get("WANDB_MODE") or None,
                project=os.environ.get("WANDB_PROJECT") or "rljax",
                dir=os.environ.get("WANDB_DIR") or str(folder),
                name=folder.resolve().name,
                job_type=label,
                config=None if config is None else to_json(dict(config)),
                allow_val_change=True,  # a resume with --allow-config-change
                reinit="create_new",  # several runs in one process stay apart
            )
        except Exception as err:
            raise RuntimeError(
                f"the wandb metrics sink could not start a W&B run ({type(err).__name__}: "
                f"{err}); log in with `wandb login`, or set WANDB_MODE=offline to keep the run "
                "in local files (upload them later with `wandb sync`)"
            ) from err
        self.holds_through = max(
            stored["last_step"] if stored else -1, int(self.run.starting_step or 0) - 1
        )
        self.resumed_through = self.holds_through
        self._save()

    def _stored(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        try:
            stored = json.loads(self.state_path.read_text())
            if not (isinstance(stored["run_id"], str) and isinstance(stored["last_step"], int)):
                raise ValueError("'run_id' must be a string and 'last_step' an integer")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{self.state_path} is damaged ({err!r}): it names the W&B run this folder "
                f"logs to; repair it, or delete it to log the rest of the run to a new W&B run"
            ) from None
        return stored

    def _save(self) -> None:
        write_json_atomic(self.state_path, {"run_id": self.run.id, "last_step": self.holds_through})

    def _log(self, step: int, values: Mapping[str, Any]) -> None:
        if step <= self.resumed_through:  # W&B holds this step from before the interruption
            return
        if values:
            self.run.log(dict(values), step=step)
        if step > self.holds_through:
            self.holds_through = step
            self._save()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._log(step, values)

    def samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        columns = _columns(rows)
        data = [[to_json(row.get(c)) for c in columns] for row in rows]
        self._log(step, {"samples": self.wandb.Table(columns=columns, data=data)})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_SINK_CLASSES = {"tensorboard": _TensorBoardSink, "wandb": _WandbSink}


def _keep_lines(path: pathlib.Path, resume_step: int | None) -> list[tuple[str, dict]]:
    """Rewrite the JSONL file ``path`` (atomically) with only its lines with ``step <=
    resume_step`` (none for ``resume_step=None``); returns them."""
    kept = []
    if resume_step is not None and path.exists():
        kept = [(line, row) for line, row in read_jsonl(path) if row.get("step", 0) <= resume_step]
    # Write-then-rename: a crash mid-rewrite leaves the old log or the new one, never half.
    _write_atomic(path, "".join(line + "\n" for line, _ in kept))
    return kept


class MetricsLog:
    """A run's metrics: ``metrics.jsonl`` (one JSON object per logged step), optional
    TensorBoard and Weights & Biases sinks, sample completions, and a progress line on stdout.

    Every sink gets every logged step. ``metrics.jsonl`` holds each value as JSON (NaN and
    infinities as null; strings and lists too); TensorBoard and W&B plot scalars, so they get
    the numbers only (NaN included): strings, lists and arrays with dimensions are kept in
    ``metrics.jsonl`` alone. Sample completions go to every sink through :meth:`log_samples`.

    A resume from step ``s`` (``resume_step``) keeps what every sink holds up to ``s`` and
    drops the rest, so no sink shows a step twice: ``metrics.jsonl`` and ``samples.jsonl`` keep
    their lines with ``step <= s``; the TensorBoard event files are rewritten without later
    events (and the new file's purge step drops them in a TensorBoard already showing them);
    the W&B run stored in ``wandb_run.json`` is continued and the steps it already holds are
    skipped. A sink enabled only at the resume is first filled with the kept lines of
    ``metrics.jsonl``.

    Each progress line (``print_line``) shows ``step/total_steps``, the ``keys`` metrics, the
    elapsed time, the recent time per step and the ETA (:class:`Progress`), as plain lines.

    Args:
      path: the JSONL file; its folder is the run folder (``tensorboard/``, ``samples.jsonl``,
        ``wandb_run.json``).
      label: prefix of progress lines (and the W&B job type).
      total_steps: for ``step/total`` and the ETA in progress lines.
      resume_step: the step resumed from (None: a new run, which starts every sink afresh).
      keys: metric names shown in progress lines (all are logged).
      write: ``False`` (the processes other than 0 of a multi-process run) writes and prints
        nothing and opens no sink; :meth:`rows` then returns only the rows logged through this
        object.
      sinks: a :func:`parse_sinks` spec, e.g. ``("jsonl", "tensorboard")`` or the ``--log``
        value ``"tensorboard,wandb"``. A sink whose package is missing raises ``ImportError``
        naming the extra to install.
      config: the run's settings, recorded by the sinks (W&B config, TensorBoard text).

    Call :meth:`close` at the end (or use the object as a context manager): it flushes the
    TensorBoard files and finishes the W&B run.
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
        sinks: str | Sequence[str] = ("jsonl",),
        config: Mapping[str, Any] | None = None,
    ):
        self.path = pathlib.Path(path)
        self.label, self.total_steps, self.keys = label, total_steps, tuple(keys)
        self.sinks = parse_sinks(sinks)
        self.write, self._rows, self._sinks = write, [], []
        self.samples_path = self.path.with_name("samples.jsonl")
        self.progress = Progress(total_steps, start=resume_step or 0)
        if not write:
            return
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        kept = _keep_lines(self.path, resume_step)
        if self.samples_path.exists():
            _keep_lines(self.samples_path, resume_step)
        folders = {"tensorboard": folder / "tensorboard", "wandb": folder}
        if not resume_step:  # a new run: no sink may continue an earlier run's history later
            (folder / _WandbSink.STATE_FILE).unlink(missing_ok=True)
            for path in folders["tensorboard"].glob("*tfevents*"):
                path.unlink()
        try:
            for name in self.sinks[1:]:
                sink = _SINK_CLASSES[name](
                    folders[name], label=label, resume_step=resume_step, config=config
                )
                self._sinks.append(sink)
                for _, row in kept:  # fill a sink that lacks part of the kept history
                    if row.get("step", 0) > sink.holds_through:
                        sink.scalars(row.get("step", 0), _scalars(row))
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, step: int, metrics: Mapping[str, Any], *, print_line: bool = True) -> dict:
        """Log ``metrics`` at ``step`` to every sink; returns the row as written to
        ``metrics.jsonl``."""
        row = {"step": int(step), **to_json(dict(metrics))}
        progress = self.progress.update(step)
        if not self.write:
            self._rows.append(row)
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._sinks:
            scalars = _scalars(metrics)
            for sink in self._sinks:
                sink.scalars(int(step), scalars)
        if print_line:
            shown = "  ".join(
                f"{k} {row[k]:.4g}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}"
                for k in self.keys
                if k in row
            )
            print(
                f"[{self.label}] step {step}/{self.total_steps}  {shown}  [{progress}]", flush=True
            )
        return row

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Record sample completions of an evaluation at ``step``: one line per row
        (``{"step": step, **row}``, e.g. prompt, completion, reward) in ``samples.jsonl`` next
        to ``metrics.jsonl``, and one table per call in the sinks (a W&B table ``samples``, a
        TensorBoard text ``samples`` holding a markdown table)."""
        if not self.write or not rows:
            return
        rows = [to_json(dict(row)) for row in rows]
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps({"step": int(step), **row}) + "\n" for row in rows)
        for sink in self._sinks:
            sink.samples(int(step), rows)

    def rows(self) -> list[dict]:
        if not self.write:
            return list(self._rows)
        return [row for _, row in read_jsonl(self.path)]

    def close(self, *, failed: bool = False) -> None:
        """Flush and close the sinks (``failed``: mark the W&B run as failed). Idempotent."""
        sinks, self._sinks = self._sinks, []
        errors = []
        for sink in sinks:
            try:
                sink.close(failed)
            except Exception as err:  # close the others first
                errors.append(err)
        if errors:
            raise errors[0]

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(failed=kind is not None)


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


# ---------------------------------------------------------------------------- run folders

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"

#: Settings a resume may change without ``--allow-config-change``: where the run writes and
#: how it is laid out on devices (the results agree to float tolerance), how often and where
#: it logs (``log``: the metrics sinks), evaluates and checkpoints, and when it gives up on
#: non-finite updates. Everything else (including ``steps``/``iterations``: the learning-rate
#: schedule and the prompt draw depend on the run's length) must match the stored
#: configuration.
SAFE_TO_CHANGE = frozenset(
    {
        "out",
        "mesh",
        "chunk_size",
        "log",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "compilation_cache",
        "max_nonfinite_updates",
        "allow_config_change",
    }
)


class ConfigChangedError(ValueError):
    """A resume whose settings differ from those stored in the run folder."""


class RunFolderBusyError(RuntimeError):
    """The run folder is locked by another run (or by a lock this one cannot judge stale)."""


def _write_atomic(path: pathlib.Path, content: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | pathlib.Path, value: Any) -> pathlib.Path:
    """Write ``value`` as JSON to a temporary file, then rename it over ``path``: readers see
    the old file or the new one, never a part."""
    path = pathlib.Path(path)
    _write_atomic(path, json.dumps(to_json(value), indent=2) + "\n")
    return path


def latest_saved_step(directory: str | pathlib.Path) -> int | None:
    """The largest step among the step folders (``<directory>/<integer>/``) of an orbax
    checkpoint folder, complete or not, or ``None`` (a cheap look that opens no checkpoint)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
    return max(steps, default=None)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested configs (an algorithm's settings in a run configuration) as dotted names."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


_ABSENT = "<absent>"


def config_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], ignore: frozenset[str] = SAFE_TO_CHANGE
) -> dict[str, tuple[Any, Any]]:
    """``{field: (old, new)}`` for every setting that differs (compared as JSON values; nested
    configs by dotted name; a field only one side has shows ``"<absent>"``), except those
    whose (last) name is in ``ignore``."""
    old = _flatten(json.loads(json.dumps(to_json(dict(old)))))
    new = _flatten(json.loads(json.dumps(to_json(dict(new)))))
    changes = {}
    for name in sorted(old.keys() | new.keys()):
        if name.rsplit(".", 1)[-1] in ignore:
            continue
        before, after = old.get(name, _ABSENT), new.get(name, _ABSENT)
        if before != after:
            changes[name] = (before, after)
    return changes


def _describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    flag = lambda name: "--" + name.rsplit(".", 1)[-1].replace("_", "-")
    return "\n".join(
        f"  {name} ({flag(name)}): {old!r} -> {new!r}" for name, (old, new) in changes.items()
    )


def run_record(config: Any, folder: str | pathlib.Path, *, resumed_from, start_time, devices):
    """The part of a summary every driver writes: ``resumed_from`` (None for a fresh run),
    ``wall_seconds`` since ``start_time`` (``time.perf_counter()``), ``devices``, the resolved
    ``config`` and, after ``--allow-config-change``, the original settings
    (:func:`config_record`)."""
    return {
        "resumed_from": resumed_from or None,
        "wall_seconds": round(time.perf_counter() - start_time, 2),
        "devices": int(devices),
        "config": dataclasses.asdict(config),
        **config_record(folder),
    }


def config_record(folder: str | pathlib.Path) -> dict[str, Any]:
    """What a summary records about configuration changes on resume: ``{"original_config",
    "config_changes"}`` when the run was resumed with ``--allow-config-change`` and other
    settings, else ``{}`` (read from ``folder/config.json``)."""
    path = pathlib.Path(folder) / CONFIG_FILE
    if not path.exists():
        return {}
    stored = json.loads(path.read_text())
    if not stored.get("changes"):
        return {}
    return {"original_config": stored["original_config"], "config_changes": stored["changes"]}


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """One run per folder: ``<folder>/run.lock``, created with ``O_CREAT | O_EXCL`` (so two
    runs cannot both create it) and holding the owner's pid, host, start time and command.

    :meth:`acquire` fails at once with :class:`RunFolderBusyError` naming the owner when the
    lock is held. A lock left by a process that died (``kill -9``, power loss) on this same host
    is stale: it is taken over with a warning naming the dead owner (a takeover guard file,
    created with ``O_EXCL`` too, keeps two runs from taking it over at once). A lock from
    another host cannot be judged from here: the error says how to clear it.
    """

    def __init__(self, folder: str | pathlib.Path):
        self.path = pathlib.Path(folder) / LOCK_FILE
        self.held = False

    def _owner_text(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def _busy(self, owner: Mapping[str, Any] | None, why: str) -> RunFolderBusyError:
        clear = (
            f"If no run is using {self.path.parent} (the owner was killed or its host is down), "
            f"delete {self.path} and start again."
        )
        if owner is None:
            return RunFolderBusyError(f"{self.path.parent} is locked ({why}). {clear}")
        return RunFolderBusyError(
            f"{self.path.parent} is in use by another run: pid {owner.get('pid')} on host "
            f"{owner.get('host')!r}, started {owner.get('started')} ({owner.get('command')!r}); "
            f"{why}. Wait for it to finish or use another --out. {clear}"
        )

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": _host(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        for attempt in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me))
                    f.flush()
                    os.fsync(f.fileno())
                self.held = True
                return self
            text = self._owner_text()
            if text is None:
                continue  # released in the meantime: try again
            try:
                owner = json.loads(text)
                pid = owner["pid"]
                if not (isinstance(pid, int) and pid > 0):
                    raise ValueError(f"pid {pid!r}")
            except (ValueError, TypeError, KeyError):
                if attempt < 2:
                    time.sleep(0.2)  # another run is writing its owner line
                    continue
                raise self._busy(None, "its lock file names no owner") from None
            if owner.get("host") != _host():
                raise self._busy(
                    owner,
                    "it runs on another host, so this host cannot tell whether it is still alive",
                )
            if _alive(pid):
                raise self._busy(owner, "that process is alive")
            self._take_over(text, owner)
        raise self._busy(None, "other runs keep taking the lock")

    def _take_over(self, stale_text: str, owner: Mapping[str, Any]) -> None:
        guard = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise RunFolderBusyError(
                f"{self.path.parent}: another run is taking over the stale lock {self.path} "
                f"right now (if none is, delete {guard})"
            ) from None
        try:
            if self._owner_text() == stale_text:  # nobody took it over in between
                warnings.warn(
                    f"{self.path}: taking over a stale lock of pid {owner.get('pid')} on this "
                    f"host ({owner.get('command')!r}, started {owner.get('started')}), which is "
                    "no longer running",
                    stacklevel=3,
                )
                self.path.unlink()
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Delete the lock file if this object holds it (and it still names this process)."""
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunFolder:
    """A run's hold on its output folder, for the run's whole duration (a context manager):

    - **One run per folder.** Process 0 (``primary``) takes the folder's :class:`RunLock`; it
      is released on exit, also when the run raises.
    - **A resume must not change the settings.** The first start writes the configuration to
      ``folder/config.json``. When the folder already holds saved progress (``progress(folder)``
      is not ``None``; by default a step folder under ``folder/checkpoints``), the new
      configuration is compared with the stored one and :class:`ConfigChangedError` names each
      changed field (``old -> new``), apart from :data:`SAFE_TO_CHANGE`. With
      ``allow_change=True`` (``--allow-config-change``) the run goes on with a warning, and
      ``config.json`` keeps the original configuration and every change
      (:func:`config_record` gives them to the summary). Without saved progress nothing is
      reused, so a new configuration simply replaces the stored one.
    - **A resume cannot shorten a run.** With ``length_field`` (``"steps"``, ``"iterations"``),
      saved progress beyond the new length is refused even with ``allow_change``: the run
      would export a longer-trained model under the shorter length.

    Every process of a multi-process run checks the configuration (they all read the same
    file); only process 0 writes it.
    """

    def __init__(
        self,
        folder: str | pathlib.Path,
        config: Mapping[str, Any],
        *,
        allow_change: bool = False,
        length_field: str | None = None,
        progress: Callable[[pathlib.Path], int | None] | None = None,
        ignore: frozenset[str] = SAFE_TO_CHANGE,
        primary: bool = True,
    ):
        self.folder = pathlib.Path(folder)
        self.config = json.loads(json.dumps(to_json(dict(config))))
        self.allow_change, self.length_field, self.ignore = allow_change, length_field, ignore
        self.progress = progress or (lambda f: latest_saved_step(f / "checkpoints"))
        self.primary = primary
        self.lock = RunLock(self.folder)
        self.changes: dict[str, tuple[Any, Any]] = {}

    def open(self) -> RunFolder:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.primary:
            self.lock.acquire()
        try:
            self._check_config()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> RunFolder:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _stored(self, path: pathlib.Path) -> dict[str, Any] | None:
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored.get("config"), dict):
                raise ValueError("no 'config' object")
        except ValueError as err:
            raise ValueError(
                f"{path} is damaged ({err}): it records the settings of the run in "
                f"{self.folder}; restore it, or use a new output folder"
            ) from None
        return stored

    def _write(self, record: Mapping[str, Any]) -> None:
        if self.primary:
            write_json_atomic(self.folder / CONFIG_FILE, record)

    def _check_config(self) -> None:
        path = self.folder / CONFIG_FILE
        stored = self._stored(path)
        position = self.progress(self.folder)
        if position is None or stored is None:
            if position is not None:
                warnings.warn(
                    f"{self.folder} holds saved progress but no {CONFIG_FILE} (an older run): "
                    "its settings cannot be checked; storing the current ones",
                    stacklevel=3,
                )
            self._write({"config": self.config})
            return
        length = self.config.get(self.length_field) if self.length_field else None
        if isinstance(length, int) and position > length:
            flag = "--" + self.length_field.replace("_", "-")
            raise ConfigChangedError(
                f"{self.folder} holds progress up to {self.length_field} {position}, past "
                f"{flag} {length}: resuming would export a model trained for {position} "
                f"{self.length_field} labelled as {length}. Use {flag} {position} or more to "
                f"continue it, or a new --out to train {length} {self.length_field} from scratch."
            )
        self.changes = config_changes(stored["config"], self.config, self.ignore)
        if not self.changes:
            return
        described = _describe_changes(self.changes)
        if not self.allow_change:
            raise ConfigChangedError(
                f"{self.folder} holds a run (saved progress up to {position}) with other "
                f"settings than these (stored in {path}):\n{described}\nResuming would splice two "
                "configurations into one run. Rerun with the stored settings, use a new --out, "
                "or pass --allow-config-change to resume with the new ones (summary.json then "
                "records both)."
            )
        warnings.warn(
            f"{self.folder}: resuming from {position} with changed settings "
            f"(--allow-config-change):\n{described}",
            stacklevel=3,
        )
        self._write(
            {
                "config": self.config,
                "original_config": stored.get("original_config", stored["config"]),
                "changes": [
                    *stored.get("changes", []),
                    {
                        "resumed_at": position,
                        "changed": {name: [old, new] for name, (old, new) in self.changes.items()},
                    },
                ],
            }
        )
