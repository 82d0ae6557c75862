"""Run folders for the language-model experiments: metrics log, progress lines, plots.

Experiments write ``DIR/metrics.jsonl`` (one JSON object per logged step), ``DIR/summary.json``
and PNG plots. A run resumed from a checkpoint at step ``s`` keeps the log lines up to ``s`` and
drops later ones (they were written after the checkpoint and will be recomputed), so the log of
an interrupted-and-resumed run equals the log of an uninterrupted one.

A run holds its folder (:class:`RunFolder`) while it runs: a lock file (``DIR/run.lock``, one
run per folder) and the stored configuration (``DIR/config.json``), which a resume must match
(see :class:`RunFolder` for what may change and the override).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_COMPILATION_CACHE",
    "SAFE_TO_CHANGE",
    "ConfigChangedError",
    "MetricsLog",
    "RunFolder",
    "RunFolderBusyError",
    "RunLock",
    "config_changes",
    "config_record",
    "latest_saved_step",
    "plot_metrics",
    "read_jsonl",
    "to_json",
    "use_compilation_cache",
    "write_json_atomic",
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
            for line, row in read_jsonl(self.path):
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        # Write-then-rename: a crash mid-rewrite leaves the old log or the new one, never half.
        _write_text_atomic(self.path, "".join(line + "\n" for line in kept))

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
        return [row for _, row in read_jsonl(self.path)]


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
#: how it is laid out on devices (the results agree to float tolerance), how often it logs,
#: evaluates and checkpoints, and when it gives up on non-finite updates. Everything else
#: (including ``steps``/``iterations``: the learning-rate schedule and the prompt draw depend
#: on the run's length) must match the stored configuration.
SAFE_TO_CHANGE = frozenset(
    {
        "out",
        "mesh",
        "chunk_size",
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


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | pathlib.Path, value: Any) -> pathlib.Path:
    """Write ``value`` as JSON to a temporary file, then rename it over ``path``: readers see
    the old file or the new one, never a part."""
    path = pathlib.Path(path)
    _write_text_atomic(path, json.dumps(to_json(value), indent=2) + "\n")
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
