"""Run an iterator in a background thread, a bounded number of items ahead (tokenising, reading)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


class Prefetch(Iterator[T]):
    """Iterate `source` in a daemon thread holding at most `size` items; errors re-raise here.

    `close()` stops the thread early (it finishes the item it is producing and exits).
    """

    def __init__(self, source: Iterator[T], size: int = 2, name: str = "saecli-prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._source = source
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer
            self._put(_Failure(exc))

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.exc
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        self._done = True
        self._thread.join(timeout=10)

    def __del__(self) -> None:
        self._stop.set()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc
