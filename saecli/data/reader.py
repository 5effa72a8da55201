"""`CacheStream`: a cache written by `generate`, read back in random order through a bounded buffer.

Per epoch the chunks are permuted (seeded by (seed, epoch)); rank r of `world_size` takes every
world_size-th chunk of that order and groups them into windows of G = shuffle_buffer_tokens //
chunk_tokens whole chunks. A window's chunk files are read straight into one of two reusable buffers
(the other holds the window being consumed, while this one loads in a background thread), and its
tokens are permuted together and cut into batches (see shuffle.py). Memory is two windows, whatever
the size of the cache; the stream loops over epochs (each with a new order) unless `epochs` is given.

Damage is found, not trained on: every chunk's size is checked against the manifest when the stream
opens, and each chunk's sha256 once, as it is first read (in the loading thread, off the training
loop). `verify = "fail"` stops naming the chunk; `"skip"` leaves it out with a `SaecliWarning`.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saecli.data.batch import Batch
from saecli.data.manifest import CacheIndex, ChunkRef, act_key, open_cache
from saecli.data.shuffle import Rows, Window, WindowStream, permutation
from saecli.dtypes import DTYPES
from saecli.errors import RunError, SaecliWarning, UsageError

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel


_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}
_INDEX_DTYPES = {"tokens": torch.int32, "doc": torch.int64, "pos": torch.int32}


class CacheStream(WindowStream):
    """Token batches from an activation cache; implements saecli.data.stream.ActivationStream."""

    contexts = False
    lm: LanguageModel | None = None  # a cache has no model behind it

    def __init__(
        self,
        cache: CacheIndex | str | Path,
        *,
        hook_points: list[str] | None = None,
        batch_size: int = 4096,
        shuffle: bool = True,
        buffer_tokens: int = 262144,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        dtype: torch.dtype | None = None,
        prefetch: bool = True,
        max_norm_ratio: float = 0.0,
        verify: str = "fail",
    ):
        self.index = cache if isinstance(cache, CacheIndex) else open_cache(cache)
        if verify not in ("fail", "skip", "off"):
            raise ValueError(f"verify must be 'fail', 'skip' or 'off', found {verify!r}")
        self.verify = verify
        self._verified: set[Path] = set()
        self.skipped_chunks: list[Path] = []
        self._check_sizes()
        self.max_norm_ratio = float(max_norm_ratio)
        available = self.index.hook_points
        self.hook_points = list(hook_points or available)
        missing = [h for h in self.hook_points if h not in available]
        if missing:
            raise UsageError(
                f"hook point(s) {', '.join(missing)} are not in the cache {self.index.root}; it holds: {', '.join(available)}"
            )
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside [0, world_size={world_size})")
        if len(self.index.chunks) < world_size:
            raise UsageError(
                f"the cache {self.index.root} has {len(self.index.chunks)} chunk(s), fewer than the {world_size} "
                "data-parallel ranks reading it (generate more tokens or smaller chunks)"
            )
        if batch_size <= 0:
            raise UsageError(f"batch_size must be > 0, found {batch_size}")
        self.d_model = {h: self.index.d_model[h] for h in self.hook_points}
        norms = self.index.mean_norms
        self.mean_norms = {h: norms[h] for h in self.hook_points} if self.index.total_tokens else None
        self.batch_rows = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs
        self.dtype = dtype
        self.prefetch = prefetch
        self.window_chunks = max(1, buffer_tokens // max(1, self.index.chunk_tokens))
        self._stored = DTYPES[self.index.dtype]
        self._capacity = self.window_chunks * max(c.n_tokens for c in self.index.chunks)
        self._free: list[Rows] = []
        self._lock = threading.Lock()
        self._init_cursor()

    def documents_consumed(self) -> int:
        return self.index.documents_consumed

    def _check_sizes(self) -> None:
        """Every chunk is there with the size its manifest records (cheap: one stat per chunk)."""
        for chunk in self.index.chunks:
            try:
                size = chunk.path.stat().st_size
            except OSError:
                raise UsageError(
                    f"cache chunk {chunk.path} is missing: the cache is damaged (run `saecli check {self.index.root}`)"
                ) from None
            if chunk.bytes is not None and size != chunk.bytes:
                raise UsageError(
                    f"cache chunk {chunk.path} has {size:,} bytes, its manifest says {chunk.bytes:,} "
                    f"(truncated?): the cache is damaged (run `saecli check {self.index.root}`)"
                )

    def _intact(self, chunk: ChunkRef) -> bool:
        """Whether the chunk's bytes hash to the manifest's sha256 (checked once per chunk; in the loading thread)."""
        if self.verify == "off" or chunk.path in self._verified or not chunk.sha256:
            return True
        digest = hashlib.sha256()
        with open(chunk.path, "rb") as f:
            while piece := f.read(1 << 24):  # hashlib releases the GIL on large pieces
                digest.update(piece)
        if digest.hexdigest() == chunk.sha256:
            self._verified.add(chunk.path)
            return True
        message = (
            f"cache chunk {chunk.path} does not match its manifest (sha256 differs): the cache is damaged "
            f"(run `saecli check {self.index.root}`)"
        )
        if self.verify == "fail":
            raise UsageError(message + "; activations.verify_chunks = 'skip' trains on without it")
        if chunk.path not in self.skipped_chunks:
            self.skipped_chunks.append(chunk.path)
            if len(self.skipped_chunks) == len(self.index.chunks):
                raise UsageError(message + "; every chunk of the cache is damaged, nothing is left to read")
            warnings.warn(
                message + f"; skipped ({chunk.n_tokens:,} tokens, activations.verify_chunks = 'skip')",
                SaecliWarning,
                stacklevel=2,
            )
        return False

    # -- the plan of an epoch: this rank's windows of chunks (cheap: a permutation of the chunk list)
    def _plan(self, epoch: int) -> list[list[ChunkRef]]:
        n = len(self.index.chunks)
        order = permutation(n, self.seed, epoch) if self.shuffle else torch.arange(n)
        mine = [self.index.chunks[i] for i in order[self.rank :: self.world_size].tolist()]
        return [mine[i : i + self.window_chunks] for i in range(0, len(mine), self.window_chunks)]

    def _successor(self, epoch: int, window: int) -> tuple[int, int] | None:
        if window + 1 < len(self._plan(epoch)):
            return epoch, window + 1
        return epoch + 1, 0

    # -- windows in reusable buffers
    def _acquire(self) -> Rows:
        with self._lock:
            if self._free:
                return self._free.pop()
        cap = self._capacity
        bufs = {key: torch.empty(cap, dtype=dtype) for key, dtype in _INDEX_DTYPES.items()}
        for h in self.hook_points:
            bufs[act_key(h)] = torch.empty(cap, self.d_model[h], dtype=self._stored)
        return bufs

    def _release(self, window: Window) -> None:
        if window.buffers is not None:
            with self._lock:
                self._free.append(window.buffers)  # type: ignore[arg-type]

    def _load(self, epoch: int, window: int) -> Window | None:
        plan = self._plan(epoch)
        if window >= len(plan):
            return None
        bufs = self._acquire()
        start = 0
        try:
            for chunk in plan[window]:
                if self._intact(chunk):
                    self._read_into(chunk, bufs, start)
                    start += chunk.n_tokens
        except BaseException:
            with self._lock:
                self._free.append(bufs)
            raise
        perm = permutation(start, self.seed, epoch, window, self.rank) if self.shuffle else None
        return Window({k: v[:start] for k, v in bufs.items()}, perm, start, buffers=bufs)

    def _read_into(self, chunk: ChunkRef, bufs: Rows, start: int) -> None:
        """Read the needed tensors of one chunk file into rows start.. of the buffers (no allocation)."""
        n = chunk.n_tokens
        try:
            with open(chunk.path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
                base = 8 + size
                for key, buf in bufs.items():
                    meta = header.get(key)
                    dest = buf[start : start + n]
                    if (
                        meta is None
                        or _ST_DTYPES.get(meta["dtype"]) != dest.dtype
                        or tuple(meta["shape"]) != tuple(dest.shape)
                    ):
                        found = "missing" if meta is None else f"{meta['dtype']} {meta['shape']}"
                        raise RunError(
                            f"cache chunk {chunk.path}: `{key}` is {found}, expected {dest.dtype} {tuple(dest.shape)}"
                        )
                    begin, end = meta["data_offsets"]
                    f.seek(base + begin)
                    _read_exactly(f, dest, end - begin)
        except RunError:
            raise
        except (OSError, ValueError, KeyError, struct.error) as exc:
            raise UsageError(
                f"cannot read cache chunk {chunk.path}: {exc} (run `saecli check {self.index.root}`)"
            ) from None

    def _to_batch(self, rows: Rows) -> Batch:
        acts = {
            h: rows[act_key(h)] if self.dtype is None else rows[act_key(h)].to(self.dtype) for h in self.hook_points
        }
        return Batch(acts, rows["tokens"].long(), rows["doc"], rows["pos"].long(), None)

    # -- exact position
    def state_dict(self) -> dict:
        return {
            "kind": "cache",
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_rows,
            "rank": self.rank,
            "world_size": self.world_size,
            "n_chunks": len(self.index.chunks),
            "window_chunks": self.window_chunks,
            **self.cursor_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("kind", "seed", "shuffle", "batch_size", "rank", "world_size", "n_chunks", "window_chunks"):
            if state.get(key) != mine[key]:
                raise UsageError(
                    f"cannot resume this cache stream: its {key} was {state.get(key)!r}, now {mine[key]!r}"
                )
        self.load_cursor(state)


def _read_exactly(f, dest: torch.Tensor, nbytes: int) -> None:
    view = dest.view(torch.uint8).numpy().data.cast("B")
    if len(view) != nbytes:
        raise RunError(f"{f.name}: a tensor takes {nbytes} bytes on disk but {len(view)} in memory")
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise RunError(f"{f.name} is truncated")
        got += n
