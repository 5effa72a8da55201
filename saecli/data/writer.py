"""`ChunkWriter`: chunks go to disk in background threads; the manifest follows in chunk order.

Workers take chunks from a bounded queue, wait for their device→host copy if any, serialise, hash
and atomically write them (in parallel: hashing and writing release the GIL), then commit one at a
time in submission order: append to the manifest and rewrite it atomically. The manifest therefore
always lists a prefix of the chunks, each complete on disk; a file written ahead of an uncommitted
one is an unlisted leftover after a kill, which a resumed run deletes and writes again.
"""

from __future__ import annotations

import hashlib
import json
import queue
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saecli import fsio
from saecli.data.manifest import MANIFEST, act_key, chunk_name, mean_norms
from saecli.errors import RunError

_ST_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> tuple[int, str]:
    """Write a safetensors file straight from the tensors' memory; return (bytes, sha256 of the file).

    The same bytes as a careful serialiser (tensors ordered by descending item size then name, so every
    tensor is aligned; header padded to 8 bytes) without the in-memory copies of `safetensors.torch.save`
    (which also holds the GIL while copying): hashing and writing go chunk by chunk and release it.
    """
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    views: list[bytes | memoryview] = []
    offset = 0
    for name, t in items:
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        views.append(t.reshape(-1).view(torch.uint8).numpy().data if nbytes else b"")
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        parts: list[bytes | memoryview] = [struct.pack("<Q", len(text)), text, *views]
        for part in parts:
            for start in range(0, len(part), 1 << 24):  # 16 MiB pieces: GIL released in hash and write
                piece = part[start : start + (1 << 24)]
                digest.update(piece)
                f.write(piece)
    return 8 + len(text) + offset, digest.hexdigest()


@dataclass
class Job:
    """One chunk (or, with no tensors, only a final manifest update)."""

    tensors: dict[str, torch.Tensor]
    contexts_consumed: int
    documents_consumed: int
    complete: bool
    exhausted: bool = False
    norm_sums: torch.Tensor | None = None  # float64 [n_hooks], computed here when None
    ready: object = None  # a CUDA event to wait for before the tensors are read
    seq: int = field(default=-1)
    index: int = field(default=-1)


class ChunkWriter:
    def __init__(self, folder: Path, manifest: dict, *, workers: int = 2, queue_size: int = 2):
        self.folder = folder
        self.manifest = manifest
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._submitted = 0
        self._committed = 0
        self._next_index = len(manifest["chunks"])
        self._threads = [
            threading.Thread(target=self._run, name=f"saecli-chunk-writer-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: Job) -> None:
        """Queue a chunk (blocks while the queue is full: the bound on memory)."""
        self._raise()
        job.seq = self._submitted
        if job.tensors:
            job.index = self._next_index
            self._next_index += 1
        self._submitted += 1
        while True:
            try:
                self._queue.put(job, timeout=0.2)
                return
            except queue.Full:
                self._raise()

    def close(self) -> dict:
        """Wait until every submitted chunk is committed; return the final manifest."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._raise()
        return self.manifest

    def _raise(self) -> None:
        if self._error is not None:
            raise RunError(f"writing the activation cache in {self.folder} failed: {self._error}") from self._error

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue  # drain after a failure; the main thread raises
            try:
                entry = self._write_file(job) if job.tensors else None
            except BaseException as exc:
                self._fail(exc)
                continue
            with self._cond:
                while self._committed != job.seq and self._error is None:
                    self._cond.wait()
                if self._error is not None:
                    continue
                try:
                    self._commit(job, entry)
                except BaseException as exc:
                    self._error = exc
                self._committed += 1
                self._cond.notify_all()

    def _write_file(self, job: Job) -> dict:
        if job.ready is not None:
            job.ready.synchronize()  # type: ignore[attr-defined]
        tensors = job.tensors
        hooks = self.manifest["hook_points"]
        if job.norm_sums is None:
            sums = [float(torch.linalg.vector_norm(tensors[act_key(h)].float(), dim=1).double().sum()) for h in hooks]
        else:
            sums = job.norm_sums.tolist()
        name = chunk_name(job.index)
        with fsio.atomic_path(self.folder / name) as tmp:
            size, digest = write_safetensors(tmp, tensors)
        return {
            "file": name,
            "n_tokens": int(tensors["tokens"].shape[0]),
            "bytes": size,
            "sha256": digest,
            "norm_sums": dict(zip(hooks, sums)),
            "contexts_end": job.contexts_consumed,
        }

    def _commit(self, job: Job, entry: dict | None) -> None:
        m = self.manifest
        if entry is not None:
            m["chunks"].append(entry)
            m["total_tokens"] += entry["n_tokens"]
        m["contexts_consumed"] = job.contexts_consumed
        m["documents_consumed"] = job.documents_consumed
        m["complete"] = job.complete
        if job.exhausted:
            m["exhausted"] = True
        m["mean_norms"] = mean_norms(m)
        fsio.write_json(self.folder / MANIFEST, m)
