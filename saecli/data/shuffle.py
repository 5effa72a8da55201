"""The shuffle-window bookkeeping shared by the cache and live streams.

A stream is a sequence of windows (a few whole cache chunks, or a buffer's worth of live contexts);
each window's rows are permuted with a seed derived from (seed, epoch, window), and batches are cut
from the concatenation of the permuted windows, so a batch may straddle two windows. The position
(epoch, window, offset in window) is all the state there is: a resumed stream reloads one window and
carries on, and memory is two windows (the current one and the prefetched next) whatever the data size.
"""

from __future__ import annotations

import hashlib

import torch

from saecli.errors import UsageError


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every machine and Python version."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def permutation(n: int, *seed_parts: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derived_seed(*seed_parts))
    return torch.randperm(n, generator=gen)


def take_rows(window: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in window.items()}


def cat_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def permute_rows(window: dict[str, torch.Tensor], perm: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if perm is None:
        return window
    return {k: v.index_select(0, perm) for k, v in window.items()}


Rows = dict[str, torch.Tensor]


class WindowStream:
    """Batches of `batch_rows` rows cut from a sequence of windows, with an exact (epoch, window, offset).

    Subclasses define `_load(epoch, window)` (the window's permuted rows, or None past an epoch's end)
    and `_to_batch(rows)`; `_successor` names the window to prefetch when the subclass can load ahead.
    """

    batch_rows: int
    epochs: int | None = None
    prefetch: bool = False

    def _init_cursor(self) -> None:
        self._epoch, self._window, self._offset, self._batches = 0, 0, 0, 0
        self._current: tuple[tuple[int, int], Rows | None] | None = None
        self._ahead: tuple[tuple[int, int], object] | None = None
        self._pool = None

    # -- to define
    def _load(self, epoch: int, window: int) -> Rows | None:
        raise NotImplementedError

    def _to_batch(self, rows: Rows) -> object:
        raise NotImplementedError

    def _successor(self, epoch: int, window: int) -> tuple[int, int] | None:
        return None

    # -- iteration
    def __iter__(self):
        return self

    def __next__(self):
        parts: list[Rows] = []
        need = self.batch_rows
        while need > 0:
            rows = self._rows()
            if rows is None:
                break
            length = _length(rows)
            take = min(need, length - self._offset)
            if take > 0:
                parts.append(take_rows(rows, self._offset, self._offset + take))
                self._offset += take
                need -= take
            if self._offset >= length:
                self._window, self._offset = self._window + 1, 0
        if not parts:
            raise StopIteration
        self._batches += 1
        return self._to_batch(cat_rows(parts))

    def _rows(self) -> Rows | None:
        """The rows of the window under the cursor, moving to the next epoch past an epoch's end."""
        for _ in range(2):
            if self.epochs is not None and self._epoch >= self.epochs:
                return None
            rows = self._get(self._epoch, self._window)
            if rows is not None:
                return rows
            if self._window == 0:
                raise UsageError("an epoch of this activation stream holds no tokens (is the text shorter than one context?)")
            self._epoch, self._window, self._offset = self._epoch + 1, 0, 0
        return None

    def _get(self, epoch: int, window: int) -> Rows | None:
        key = (epoch, window)
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        rows = None
        if self._ahead is not None and self._ahead[0] == key:
            rows = self._ahead[1].result()  # type: ignore[attr-defined]
            self._ahead = None
        else:
            self._drop_ahead()
            rows = self._load(epoch, window)
        self._current = (key, rows)
        nxt = self._successor(epoch, window) if self.prefetch and rows is not None else None
        if nxt is not None and (self.epochs is None or nxt[0] < self.epochs):
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saecli-window")
            self._ahead = (nxt, self._pool.submit(self._load, *nxt))
        return rows

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()  # type: ignore[attr-defined]
            self._ahead = None

    # -- exact position
    def cursor_state(self) -> dict:
        return {"epoch": self._epoch, "window": self._window, "offset": self._offset, "batches": self._batches}

    def load_cursor(self, state: dict) -> None:
        self._drop_ahead()
        self._current = None
        self._epoch, self._window = int(state["epoch"]), int(state["window"])
        self._offset, self._batches = int(state["offset"]), int(state["batches"])

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _length(rows: Rows) -> int:
    return int(next(iter(rows.values())).shape[0])
