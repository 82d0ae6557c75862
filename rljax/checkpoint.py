"""Save, restore and resume training: a thin wrapper over ``orbax.checkpoint``.

One :class:`Checkpointer` per run directory. Each checkpoint is a step folder
``<directory>/<step>/`` holding two items: ``state`` (any pytree of arrays: a
:class:`rljax.updates.DPOState`, a ``(params, opt_state, step)`` tuple, ...) and ``extra`` (a small
JSON-able dict: data position, config, RNG seed, ...). ::

    ckpt = Checkpointer("runs/dpo/checkpoints", max_to_keep=3, save_interval_steps=100)
    start = 0
    if ckpt.latest_step() is not None:                    # resume
        abstract = abstract_like(state)                   # shapes, dtypes and shardings
        state, extra = ckpt.restore(abstract_state=abstract)
        start = extra["data_position"]
    for step in range(start, num_steps):
        state, metrics = train_step(state, next_batch())
        ckpt.save(step + 1, state, {"data_position": step + 1, "seed": seed})
    ckpt.close()                                          # waits for the last save

Semantics, all orbax's:

- **Asynchronous and atomic.** :meth:`Checkpointer.save` returns once the arrays are copied
  off the devices; the files are written in a background thread, first into a temporary folder
  (``<step>.orbax-checkpoint-tmp...``) that is renamed to ``<step>`` when complete. A save
  killed midway leaves only the temporary folder, which :meth:`latest_step` and
  :meth:`restore` ignore, so the previous checkpoint stays the latest. :meth:`wait` blocks
  until pending saves are on disk; :meth:`close` waits and releases the manager.
- **Retention.** ``max_to_keep`` newest checkpoints are kept; ``save_interval_steps`` skips
  steps that are not multiples of it (``save(..., force=True)`` overrides).
- **Multi-host.** Every process calls ``save`` / ``restore`` with its global ``jax.Array``\\ s;
  each writes only the shards it owns and the primary process (``jax.process_index() == 0``)
  writes the metadata and ``extra`` and finalises the folder, so a checkpoint is written once.
  The directory must be shared by all hosts (a network file system or a bucket path).
- **Shardings.** :meth:`restore` places every array with the sharding of the matching leaf of
  ``abstract_state`` (``jax.ShapeDtypeStruct`` with ``.sharding``, see :func:`abstract_like`),
  which may differ from the sharding it was saved with (e.g. a different mesh).

Damaged checkpoints (rljax's addition): :meth:`restore_latest` (and :meth:`restore` without a
step) tries the step folders newest first and restores the newest one that reads back whole. A
step that fails (a truncated array file, a garbage ``_METADATA``, an empty step folder, a
missing ``extra/`` item, ...) gets a warning naming its folder; once an older step restored,
the damaged newer folders are renamed to ``<step>.damaged`` (kept for inspection, invisible to
orbax, so the run can save those steps again). When no step restores, :class:`CheckpointError`
names the folder and each step's error.

Random keys: typed keys (``jax.random.key``) are saved as their raw ``uint32`` data
(``jax.random.key_data``) and wrapped back (``jax.random.wrap_key_data`` with the implementation
of the matching abstract leaf) on restore, so states may hold either kind of key.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "abstract_like"]


class CheckpointError(RuntimeError):
    """No checkpoint of a folder can be restored (each step's error is in the message)."""


_STATE = "state"
_EXTRA = "extra"


def abstract_like(state: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves with each array's shape, dtype and sharding (a restore
    target for :meth:`Checkpointer.restore`; works on placed states and on
    ``jax.eval_shape`` outputs that carry shardings)."""

    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, state)


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _abstract_keys_to_data(abstract: Any) -> Any:
    def one(x):
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        # A NamedSharding's spec leaves the trailing key-data axis replicated.
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, abstract)


def _key_impl(x: Any):
    if isinstance(x, jax.Array):
        return jax.random.key_impl(x)
    return x.dtype._impl  # the PRNG implementation behind a key dtype


def _data_to_keys(restored: Any, abstract: Any) -> Any:
    return jax.tree.map(
        lambda a, r: jax.random.wrap_key_data(r, impl=_key_impl(a)) if _is_key(a) else r,
        abstract,
        restored,
    )


class Checkpointer:
    """Periodic, asynchronous, atomic checkpoints of a train state and a JSON dict.

    Args:
      directory: the run's checkpoint folder (created if missing; shared by all hosts).
      max_to_keep: newest checkpoints kept (``None``: all).
      save_interval_steps: save only steps divisible by this (unless ``force=True``).
      async_save: write in a background thread (:meth:`wait` / :meth:`close` to finish).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        *,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _EXTRA)
        )

    def save(
        self,
        step: int,
        state: Any,
        extra: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Start saving ``state`` and the JSON-able ``extra`` as checkpoint ``step``.

        Returns whether a save was started (``False`` when ``save_interval_steps`` skips this
        step). The arrays may be donated or overwritten once this returns (orbax copies them
        to host memory first). Raises ``TypeError`` naming a non-JSON-able ``extra``.
        """
        extra = {} if extra is None else dict(extra)
        try:
            json.dumps(extra)
        except TypeError as e:
            raise TypeError(
                f"Checkpointer.save: extra must be JSON-able (numbers, strings, lists, dicts): {e}"
            ) from None
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardSave(_keys_to_data(state)),
                    _EXTRA: ocp.args.JsonSave(extra),
                }
            ),
            force=force,
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None`` (unfinished saves excluded)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def restore(
        self, step: int | None = None, abstract_state: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """``(state, extra)`` of checkpoint ``step`` (default: the newest one that restores,
        see :meth:`restore_latest`).

        ``abstract_state`` (e.g. :func:`abstract_like` of a freshly initialised state) gives
        the pytree structure and each array's dtype and sharding; arrays are restored straight
        into those shardings. Without it orbax restores the saved tree as nested dicts/lists
        with the saved shardings, which needs the same devices as when saving.

        Raises ``FileNotFoundError`` when there is no (complete) checkpoint, and
        :class:`CheckpointError` naming the step folder when the given ``step`` is damaged.
        """
        self.wait()
        if step is None:
            latest = self.restore_latest(abstract_state)
            if latest is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return latest[1:]
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; "
                f"steps on disk: {self.all_steps()}"
            )
        try:
            return self._restore(step, abstract_state)
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {self._step_dir(step)} cannot be restored: {_brief(err)}"
            ) from err

    def restore_latest(self, abstract_state: Any = None) -> tuple[int, Any, dict] | None:
        """``(step, state, extra)`` of the newest checkpoint that restores, or ``None`` when
        the folder holds no checkpoint (``abstract_state`` as in :meth:`restore`).

        Steps are tried newest first; a step that fails to restore gets a warning naming its
        folder, and once an older one restored, the failed newer folders are renamed to
        ``<step>.damaged``. In a multi-process run a step counts as restored only when every
        process restored it. Raises :class:`CheckpointError` naming the folder and each step's
        error when none restores (a damaged folder, or a train state of another shape than the
        saved one).
        """
        self.wait()
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, extra = self._restore(step, abstract_state)
                error = None
            except Exception as err:  # whatever orbax, tensorstore or json raise
                state = extra = None
                error = err
            if _everywhere(error is None):
                if failed:
                    self._set_aside([s for s, _ in failed])
                return step, state, extra
            error = error or RuntimeError("restored here but not on every process")
            failed.append((step, error))
            warnings.warn(
                f"checkpoint {self._step_dir(step)} is damaged ({_brief(error)}); trying the "
                "previous one",
                stacklevel=2,
            )
        if not failed:
            return None
        lines = "\n".join(f"  {self._step_dir(s)}: {_brief(e)}" for s, e in failed)
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored:\n{lines}\nIf the model or "
            "the train state changed shape since they were saved, use a new output folder; if "
            f"they are damaged, delete {self.directory} to start the run over."
        ) from failed[0][1]

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _set_aside(self, steps: list[int]) -> None:
        """Rename damaged step folders to ``<step>.damaged`` (process 0, once every process is
        done reading them) and refresh orbax's list of steps."""
        _sync("rljax.checkpoint.set_aside")
        if jax.process_index() == 0:
            for step in steps:
                source, target = self._step_dir(step), self._step_dir(step) + ".damaged"
                n = 1
                while os.path.exists(target):
                    n, target = n + 1, f"{self._step_dir(step)}.damaged{n + 1}"
                os.rename(source, target)
                warnings.warn(f"moved the damaged checkpoint {source} to {target}", stacklevel=3)
        _sync("rljax.checkpoint.set_aside.done")
        self._manager.reload()

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        target = None if abstract_state is None else _abstract_keys_to_data(abstract_state)
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(target), _EXTRA: ocp.args.JsonRestore()}
            ),
        )
        state = restored[_STATE]
        if abstract_state is not None:
            state = _data_to_keys(state, abstract_state)
        return state, dict(restored[_EXTRA] or {})

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _brief(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters (TensorStore's are long)."""
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def _everywhere(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (the value itself on one process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
