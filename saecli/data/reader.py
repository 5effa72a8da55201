"""`CacheStream`: a cache written by `generate`, read back in random order through a bounded buffer.

Per epoch the chunks are permuted (seeded by (seed, epoch)); rank r of `world_size` takes every
world_size-th chunk of that order, and groups them into windows of G = shuffle_buffer_tokens //
chunk_tokens whole chunks. A window's tokens are permuted together and cut into batches (see
shuffle.py), while the next window loads in a background thread. Memory is two windows, whatever the
size of the cache; the stream loops over epochs (each with a new order) unless `epochs` is given.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from saecli.data.batch import Batch
from saecli.data.manifest import CacheIndex, ChunkRef, act_key, open_cache
from saecli.data.shuffle import Rows, WindowStream, permutation
from saecli.errors import RunError, UsageError


class CacheStream(WindowStream):
    """Token batches from an activation cache; implements saecli.data.stream.ActivationStream."""

    contexts = False

    def __init__(self, cache: CacheIndex | str | Path, *, hook_points: list[str] | None = None, batch_size: int = 4096,
                 shuffle: bool = True, buffer_tokens: int = 262144, seed: int = 42, rank: int = 0,
                 world_size: int = 1, epochs: int | None = None, dtype: torch.dtype | None = None,
                 prefetch: bool = True):
        self.index = cache if isinstance(cache, CacheIndex) else open_cache(cache)
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
        self._init_cursor()

    def documents_consumed(self) -> int:
        return self.index.documents_consumed

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

    def _load(self, epoch: int, window: int) -> Rows | None:
        plan = self._plan(epoch)
        if window >= len(plan):
            return None
        pieces = [self._read_chunk(c) for c in plan[window]]
        rows = {k: torch.cat([p[k] for p in pieces]) if len(pieces) > 1 else pieces[0][k] for k in pieces[0]}
        n = int(rows["tokens"].shape[0])
        if self.shuffle and n:
            perm = permutation(n, self.seed, epoch, window, self.rank)
            rows = {k: v.index_select(0, perm) for k, v in rows.items()}
        return rows

    def _read_chunk(self, chunk: ChunkRef) -> Rows:
        try:
            with safe_open(str(chunk.path), framework="pt") as f:
                rows = {"tokens": f.get_tensor("tokens").long(), "doc": f.get_tensor("doc"), "pos": f.get_tensor("pos").long()}
                for h in self.hook_points:
                    a = f.get_tensor(act_key(h))
                    rows[act_key(h)] = a if self.dtype is None else a.to(self.dtype)
        except (OSError, KeyError) as exc:
            raise RunError(f"cannot read cache chunk {chunk.path}: {exc} (run `saecli check {self.index.root}`)") from None
        except Exception as exc:  # safetensors raises its own error type on corrupt headers
            raise RunError(f"cannot read cache chunk {chunk.path}: {exc} (run `saecli check {self.index.root}`)") from None
        if int(rows["tokens"].shape[0]) != chunk.n_tokens:
            raise RunError(f"cache chunk {chunk.path} holds {rows['tokens'].shape[0]} tokens, its manifest says {chunk.n_tokens}")
        return rows

    def _to_batch(self, rows: Rows) -> Batch:
        acts = {h: rows[act_key(h)] for h in self.hook_points}
        return Batch(acts, rows["tokens"], rows["doc"], rows["pos"], None)

    # -- exact position
    def state_dict(self) -> dict:
        return {"kind": "cache", "seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_rows,
                "rank": self.rank, "world_size": self.world_size, "n_chunks": len(self.index.chunks),
                "window_chunks": self.window_chunks, **self.cursor_state()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("kind", "seed", "shuffle", "batch_size", "rank", "world_size", "n_chunks", "window_chunks"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise UsageError(f"cannot resume this cache stream: its {key} was {state.get(key)!r}, now {mine!r}")
        self.load_cursor(state)
