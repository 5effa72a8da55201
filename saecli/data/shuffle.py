"""The shuffle-window bookkeeping shared by the cache and live streams.

A stream is a sequence of windows (a few whole cache chunks, or a buffer's worth of live contexts).
A window keeps its rows in the order they were read plus a permutation seeded by (seed, epoch,
window, rank); a batch gathers its rows through that permutation into fresh tensors, so no batch
aliases a window's buffers and those buffers can be reused for the next window (memory stays at two
windows, current and prefetched, and does not creep with allocator fragmentation). Batches are cut
from the concatenation of the permuted windows, so one may straddle two windows. The position
(epoch, window, offset in window) is all the state there is: a resumed stream reloads one window.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from saecli.data.outliers import drop_outliers
from saecli.errors import UsageError

Rows = dict[str, torch.Tensor]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every machine and Python version."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def permutation(n: int, *seed_parts: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derived_seed(*seed_parts))
    return torch.randperm(n, generator=gen)


class Window:
    """`rows` (each [n, ...], read order) seen through `perm` (None: read order)."""

    def __init__(self, rows: Rows, perm: torch.Tensor | None, n: int | None = None, buffers: object = None):
        self.rows = rows
        self.n = int(next(iter(rows.values())).shape[0]) if n is None else n
        self.perm = None if perm is None else perm.to(next(iter(rows.values())).device)
        self.buffers = buffers  # handed back to the stream's pool when the window is dropped

    def __len__(self) -> int:
        return self.n

    def take(self, start: int, stop: int) -> Rows:
        """Rows start..stop of the permuted window, as new tensors."""
        if self.perm is None:
            return {k: v[start:stop].clone() for k, v in self.rows.items()}
        index = self.perm[start:stop]
        return {k: v.index_select(0, index) for k, v in self.rows.items()}


def cat_rows(parts: list[Rows]) -> Rows:
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class WindowStream:
    """Batches of `batch_rows` rows cut from a sequence of windows, with an exact (epoch, window, offset).

    Subclasses define `_load(epoch, window)` (a Window, or None past an epoch's end) and
    `_to_batch(rows)`; `_successor` names the window to prefetch when the subclass can load ahead,
    and `_release(window)` takes back a dropped window's buffers.
    """

    batch_rows: int
    epochs: int | None = None
    prefetch: bool = False
    max_norm_ratio: float = 0.0  # > 0: drop massive-activation tokens from each batch (see data/outliers.py)
    dropped_tokens: int = 0  # how many this stream dropped since it was built

    def _init_cursor(self) -> None:
        self._epoch, self._window, self._offset, self._batches = 0, 0, 0, 0
        self._current: tuple[tuple[int, int], Window | None] | None = None
        self._ahead: tuple[tuple[int, int], Future] | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- to define
    def _load(self, epoch: int, window: int) -> Window | None:
        raise NotImplementedError

    def _to_batch(self, rows: Rows) -> object:
        raise NotImplementedError

    def _successor(self, epoch: int, window: int) -> tuple[int, int] | None:
        return None

    def _release(self, window: Window) -> None:
        pass

    # -- iteration
    def __iter__(self):
        return self

    def __next__(self):
        parts: list[Rows] = []
        need = self.batch_rows
        while need > 0:
            win = self._window_here()
            if win is None:
                break
            take = min(need, len(win) - self._offset)
            if take > 0:
                parts.append(win.take(self._offset, self._offset + take))
                self._offset += take
                need -= take
            if self._offset >= len(win):
                self._window, self._offset = self._window + 1, 0
        if not parts:
            raise StopIteration
        self._batches += 1
        batch = self._to_batch(cat_rows(parts))
        if self.max_norm_ratio:  # a pure function of the batch: the position stays exact
            batch, dropped = drop_outliers(batch, self.max_norm_ratio)
            self.dropped_tokens += dropped
        return batch

    def _window_here(self) -> Window | None:
        """The window under the cursor, moving to the next epoch past an epoch's end."""
        for _ in range(2):
            if self.epochs is not None and self._epoch >= self.epochs:
                return None
            win = self._get(self._epoch, self._window)
            if win is not None:
                return win
            if self._window == 0:
                raise UsageError(
                    "an epoch of this activation stream holds no tokens (is the text shorter than one context?)"
                )
            self._epoch, self._window, self._offset = self._epoch + 1, 0, 0
        return None

    def _get(self, epoch: int, window: int) -> Window | None:
        key = (epoch, window)
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        self._drop_current()
        if self._ahead is not None and self._ahead[0] == key:
            win = self._ahead[1].result()
            self._ahead = None
        else:
            self._drop_ahead()
            win = self._load(epoch, window)
        self._current = (key, win)
        nxt = self._successor(epoch, window) if self.prefetch and win is not None else None
        if nxt is not None and (self.epochs is None or nxt[0] < self.epochs):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saecli-window")
            self._ahead = (nxt, self._pool.submit(self._load, *nxt))
        return win

    def _drop_current(self) -> None:
        if self._current is not None and self._current[1] is not None:
            self._release(self._current[1])
        self._current = None

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            future = self._ahead[1]
            self._ahead = None
            if not future.cancel():
                try:
                    win = future.result()
                except Exception:
                    win = None
                if win is not None:
                    self._release(win)

    # -- exact position
    def cursor_state(self) -> dict:
        return {"epoch": self._epoch, "window": self._window, "offset": self._offset, "batches": self._batches}

    def load_cursor(self, state: dict) -> None:
        self._drop_ahead()
        self._drop_current()
        self._epoch, self._window = int(state["epoch"]), int(state["window"])
        self._offset, self._batches = int(state["offset"]), int(state["batches"])

    def close(self) -> None:
        """Stop the prefetch thread (a stream is also usable without ever calling this)."""
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
