"""Deterministic, resumable minibatches over a dict of numpy arrays (rows on axis 0)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["Batches"]


class Batches:
    """Minibatches of ``batch_size`` rows from ``arrays`` (a dict of arrays, all ``[N, ...]``).

    Epoch ``e`` visits the rows in the order ``np.random.default_rng([seed, e]).permutation(N)``
    (or ``0..N-1`` with ``shuffle=False``), so the order depends only on ``(seed, epoch)``.
    ``drop_last=True`` leaves the last ``N % batch_size`` rows of each epoch's order out (other
    rows each epoch when shuffling; :attr:`rows_left_out` says how many); ``drop_last=False``
    yields them as a final, smaller batch (which a jitted step compiles for separately).

    The position is ``{"epoch": e, "index": i}``: the next batch is batch ``i`` of epoch ``e``.
    :meth:`state` returns it (store it with the checkpoint); ``Batches(..., state=s)`` or
    :meth:`restore` continue exactly there.

    ``next(batches)`` gives the next batch, moving on to the next epoch after the last one
    (an endless stream for step-based loops); ``for batch in batches.epoch():`` yields the rest
    of the current epoch (epoch-based loops). ``len(batches)`` is the batches per epoch.
    """

    def __init__(
        self,
        arrays: Mapping[str, Any],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        state: Mapping[str, int] | None = None,
    ):
        if not arrays:
            raise ValueError("Batches: arrays is empty; pass a dict of arrays with rows on axis 0")
        self.arrays = {name: np.asarray(value) for name, value in arrays.items()}
        sizes = {name: (a.shape[0] if a.ndim else None) for name, a in self.arrays.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(
                f"Batches: every array needs the same number of rows on axis 0, got {sizes}"
            )
        self.num_rows = next(iter(sizes.values()))
        if batch_size < 1:
            raise ValueError(f"Batches: batch_size={batch_size}, need >= 1")
        if drop_last and self.num_rows < batch_size:
            raise ValueError(
                f"Batches: {self.num_rows} rows make no full batch of {batch_size}; lower "
                "batch_size or pass drop_last=False"
            )
        if self.num_rows == 0:
            raise ValueError("Batches: the arrays have no rows")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        #: rows of each epoch that no batch holds (``drop_last=True``), ``N % batch_size``.
        self.rows_left_out = self.num_rows % self.batch_size if self.drop_last else 0
        self._epoch, self._index = 0, 0
        self._order_epoch, self._order = None, None
        if state is not None:
            self.restore(state)

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __repr__(self) -> str:
        return (
            f"Batches({self.num_rows} rows, batch_size={self.batch_size}, {len(self)} per epoch, "
            f"{self.rows_left_out} rows left out per epoch by drop_last, seed={self.seed}, "
            f"shuffle={self.shuffle}, position={self.state()})"
        )

    def state(self) -> dict[str, int]:
        """The position of the next batch: ``{"epoch": int, "index": int}``."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a position returned by :meth:`state`."""
        if not isinstance(state, Mapping) or set(state) != {"epoch", "index"}:
            raise ValueError(
                f"Batches.restore: expected {{'epoch': int, 'index': int}} from state(), got {state!r}"
            )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise ValueError(
                f"Batches.restore: position {dict(state)} is outside 0 <= index <= {len(self)} "
                "(batches per epoch); was it saved with another batch_size or data set?"
            )
        self._epoch, self._index = epoch, index
        self._normalize()

    def order(self, epoch: int) -> np.ndarray:
        """The row order of ``epoch`` (``int64 [N]``)."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def _normalize(self) -> None:
        if self._index >= len(self):
            self._epoch, self._index = self._epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._order_epoch != self._epoch:
            self._order_epoch, self._order = self._epoch, self.order(self._epoch)
        start = self._index * self.batch_size
        rows = self._order[start : start + self.batch_size]
        self._index += 1
        self._normalize()
        return {name: array[rows] for name, array in self.arrays.items()}

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield the remaining batches of the current epoch (all of it from index 0)."""
        epoch = self._epoch
        while self._epoch == epoch:
            yield next(self)
