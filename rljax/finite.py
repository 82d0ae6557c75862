"""Guards against non-finite values (NaN, inf) in training: skip, count, stop.

Inside a jitted update step (no host synchronisation):

- :func:`all_finite` is one boolean scalar: every floating-point value of some pytrees is
  finite.
- :func:`step_if_finite` is one optax step that is applied only if the loss, the gradients,
  the new parameters and the new optimizer state are all finite; otherwise the parameters
  and the optimizer state come back bitwise unchanged (``jnp.where`` on the whole tree, so
  the step keeps its shardings and its donated buffers, and the learning-rate schedule does
  not advance). The update steps of :mod:`rljax.dpo`, :mod:`rljax.reward`, :mod:`rljax.ppo`
  (and so :mod:`rljax.rlhf`) and :mod:`rljax.trpo` (its critic fit; the natural policy step
  uses :func:`select`) report it as the metric ``nonfinite`` (1.0 if this update skipped a
  step, else 0.0) and count skipped updates in their state's ``nonfinite_updates``.

``optax.apply_if_finite`` is not used: it looks at the incoming gradients only (a finite
gradient times a learning rate of 1e20 passes and overflows the parameters), applies the
non-finite update anyway after ``max_consecutive_errors``, adds a zero update rather than
keeping the old values (``-0.0 + 0.0`` is ``+0.0``), and would live inside the optimizer
state that each caller builds.

On the host, :class:`NonfiniteStop` turns the per-update metric into a stop after
``limit`` consecutive skipped updates, and :func:`require_finite` refuses to checkpoint or
export a state with non-finite values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "NonfiniteStop",
    "all_finite",
    "count_nonfinite",
    "guarded_step",
    "require_finite",
    "select",
    "step_if_finite",
]


def all_finite(*trees: Any) -> jax.Array:
    """Boolean scalar: every floating-point (or complex) leaf of ``trees`` is finite.

    Integer, boolean and key leaves are ignored; no such leaf at all gives ``True``."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for tree in trees
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    if not checks:
        return jnp.bool_(True)
    return jnp.all(jnp.stack(checks))


def select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """``on_true`` if the boolean scalar ``pred`` holds, else ``on_false``, leaf by leaf (two
    pytrees of the same structure); the values are copied bit for bit."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def step_if_finite(
    optimizer: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any, *checked: Any
) -> tuple[Any, Any, jax.Array]:
    """One optax step of ``optimizer``, applied only if it is finite.

    Args:
      optimizer: the optax transformation.
      grads, opt_state, params: as for ``optimizer.update``.
      *checked: more values that must be finite for the step to count (the loss).

    Returns:
      ``(params, opt_state, finite)``: the new parameters and optimizer state when ``grads``,
      ``checked``, the new parameters and the new optimizer state are all finite (``finite``
      is then ``True``), else the given ``params`` and ``opt_state`` unchanged.
    """
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = all_finite(grads, checked, new_params, new_opt_state)
    params, opt_state = select(finite, (new_params, new_opt_state), (params, opt_state))
    return params, opt_state, finite


def count_nonfinite(count: jax.Array, finite: jax.Array) -> tuple[jax.Array, dict]:
    """``(count + (not finite), metrics)``: the running count of skipped updates of a train
    state and this update's metrics ``nonfinite`` (float 0/1) and ``nonfinite_updates`` (the
    new count, int32)."""
    count = jnp.asarray(count, jnp.int32) + jnp.logical_not(finite).astype(jnp.int32)
    return count, {
        "nonfinite": jnp.logical_not(finite).astype(jnp.float32),
        "nonfinite_updates": count,
    }


def guarded_step(
    optimizer: optax.GradientTransformation, grads: Any, state: Any, loss: jax.Array
) -> tuple[Any, Any, jax.Array, dict]:
    """One guarded optax step of a train state with ``params``, ``opt_state`` and
    ``nonfinite_updates`` fields (:func:`step_if_finite` on ``loss`` and ``grads``, then
    :func:`count_nonfinite`). Returns ``(params, opt_state, nonfinite_updates, metrics)``,
    ``metrics`` holding ``grad_norm``, ``nonfinite`` and ``nonfinite_updates``."""
    params, opt_state, finite = step_if_finite(
        optimizer, grads, state.opt_state, state.params, loss
    )
    count, guard_metrics = count_nonfinite(state.nonfinite_updates, finite)
    return params, opt_state, count, {"grad_norm": optax.tree.norm(grads), **guard_metrics}


# ---------------------------------------------------------------------------- host side


_all_finite_jit = jax.jit(all_finite)


def _host(tree: Any) -> Any:
    from rljax.sharding import to_host  # lazy: the update steps above need no sharding

    return to_host(tree)


def require_finite(tree: Any, what: str) -> None:
    """Raise ``FloatingPointError`` (``"<what>: ... non-finite ..."``) unless every
    floating-point value of ``tree`` is finite. One jitted reduction and one scalar read;
    call it before a checkpoint or an export."""
    if not bool(_host(_all_finite_jit(tree))):
        names = [
            jax.tree_util.keystr(path)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
            and not bool(_host(_all_finite_jit(x)))
        ]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise FloatingPointError(f"{what}: non-finite values (NaN or inf) in {shown}")


class NonfiniteStop:
    """Stops a training loop after ``limit`` consecutive non-finite updates.

    The update steps skip a non-finite update themselves (parameters unchanged) and report it
    in their metric ``nonfinite``; this reads that metric one step late, so that the next step
    is already queued on the device when the loop waits for it::

        stop = NonfiniteStop(3, "DPO", checkpoint_dir)
        for step in range(first, last + 1):
            state, metrics = step_fn(state, batch)
            stop.observe(step, metrics)      # checks the previous step's metric
            if step % checkpoint_every == 0:
                stop.flush()                 # checks this step's too
                ckpt.save(step, state); stop.saved(step)
        stop.flush()

    Each skipped update prints a line naming its non-finite metrics; the ``limit``-th in a row
    raises ``FloatingPointError`` naming the step, the streak and the last good checkpoint.

    Args:
      limit: consecutive non-finite updates tolerated before stopping (>= 1; 1 stops at the
        first).
      label: prefix of the messages.
      checkpoint_dir: the run's checkpoint folder (named in the error).
      unit: what one update is called in messages (``"step"``, ``"iteration"``).
      flag: the option that sets ``limit`` (named in the error).
    """

    def __init__(
        self,
        limit: int,
        label: str,
        checkpoint_dir: str | os.PathLike,
        *,
        unit: str = "step",
        flag: str = "--max-nonfinite-updates",
    ):
        if not isinstance(limit, int | np.integer) or limit < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {limit!r}")
        self.limit, self.label, self.unit, self.flag = int(limit), label, unit, flag
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        self.last_checkpoint: int | None = None
        self.streak, self.first, self.skipped = 0, None, 0
        self._pending: tuple[int, Mapping[str, Any]] | None = None

    def saved(self, step: int) -> None:
        """Record that checkpoint ``step`` was written (or restored): the last good one."""
        self.last_checkpoint = int(step)

    def observe(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Take update ``step``'s metrics; check the previous update's."""
        pending, self._pending = self._pending, (int(step), metrics)
        if pending is not None:
            self._check(*pending)

    def flush(self) -> None:
        """Check the update taken last (call before a checkpoint and after the loop)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._check(*pending)

    def before_save(self, step: int, state: Any) -> None:
        """:meth:`flush`, then raise ``FloatingPointError`` (naming the last good checkpoint)
        if ``state`` has a non-finite value: never checkpoint one."""
        self.flush()
        try:
            require_finite(state, f"[{self.label}] not saving the checkpoint of {self.unit} {step}")
        except FloatingPointError as error:
            raise FloatingPointError(f"{error}. Last good checkpoint: {self._last()}") from None

    def _last(self) -> str:
        if self.last_checkpoint is None:
            return f"none was saved by this run (folder {self.checkpoint_dir})"
        path = os.path.join(self.checkpoint_dir, str(self.last_checkpoint))
        return f"{self.unit} {self.last_checkpoint} ({path})"

    def _check(self, step: int, metrics: Mapping[str, Any]) -> None:
        if "nonfinite" not in metrics:
            raise KeyError(
                f"{self.label}: the update's metrics have no 'nonfinite' entry (rljax update "
                "steps report it; see rljax.finite.count_nonfinite)"
            )
        if not float(_host(metrics["nonfinite"])):
            self.streak = 0
            return
        self.skipped += 1
        self.streak += 1
        if self.streak == 1:
            self.first = step
        host = _host(dict(metrics))
        bad = [k for k, v in host.items() if np.ndim(v) == 0 and not np.isfinite(v)]
        values = ", ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
        values = values or "the new parameters or optimizer state"
        print(
            f"[{self.label}] {self.unit} {step}: non-finite {values}; the non-finite step was "
            f"skipped, parameters kept ({self.streak}/{self.limit} in a row)",
            flush=True,
        )
        if self.streak >= self.limit:
            raise FloatingPointError(
                f"[{self.label}] stopped at {self.unit} {step}: {self.streak} consecutive updates "
                f"({self.unit}s {self.first}-{step}) had non-finite values (last: {values}); "
                "their non-finite steps were skipped, leaving the parameters finite. "
                f"Last good checkpoint: {self._last()}. Lower the learning rate (or check the data "
                f"and rewards) and run again; {self.flag} (now {self.limit}) sets how many "
                "consecutive skipped updates a run tolerates."
            )
