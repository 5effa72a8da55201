"""Writing an activation cache: model + text → safetensors chunks + manifest (see manifest.py).

The model is kept busy: contexts are tokenised in a background thread, and chunks are serialised,
hashed and written (atomically, then the manifest) in another, behind a bounded queue. A chunk holds
the kept tokens of whole model batches (a chunk closes once it has >= chunk_tokens tokens), so a
killed run resumes exactly: it re-tokenises to skip the contexts its manifest says were consumed
and runs the model only on new ones, ending byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save as st_save

from saecli import fsio
from saecli.config.base import to_dict
from saecli.config.load import write_resolved
from saecli.data.manifest import (  # noqa: F401  (shard_plan, shard_target: re-exported)
    FORMAT, MANIFEST, VERSION, act_key, chunk_name, identity_mismatch, mean_norms, read_manifest, shard_dir, shard_plan,
    shard_target,
)
from saecli.data.prefetch import Prefetch
from saecli.data.text import iter_documents
from saecli.data.tokens import Contexts, packer_for
from saecli.errors import RunError, UsageError

_CHUNK_RE = re.compile(r"^chunk-\d{6}\.safetensors$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def tokens_written(cache_dir: str | Path, shard: int) -> int:
    """Tokens the shard's manifest lists (0 when there is none yet)."""
    path = shard_dir(cache_dir, shard) / MANIFEST
    if not path.exists():
        return 0
    return int(read_manifest(path)["total_tokens"])


def new_manifest(exp: Any, lm: Any, packer: Any, shard: int, n_shards: int, d_model: dict[str, int]) -> dict:
    acts = exp.activations
    return {
        "format": FORMAT,
        "version": VERSION,
        "shard": shard,
        "n_shards": n_shards,
        "model": {
            "name": exp.model.name, "gguf_file": exp.model.gguf_file, "revision": exp.model.revision,
            "dtype": exp.model.dtype, "family": lm.family, "d_model": int(lm.d_model), "n_layers": int(lm.n_layers),
        },
        "dataset": to_dict(exp.dataset),
        "hook_points": list(acts.hook_points),
        "d_model": d_model,
        "dtype": acts.override_dtype or exp.model.dtype,
        "context_size": acts.context_size,
        "model_batch_size": acts.model_batch_size,
        "chunk_tokens": acts.chunk_tokens,
        "prepend_bos": packer.prepend_bos,
        "bos_token_id": packer.bos_id,
        "separator_token_id": packer.sep_id,
        "ignore_token_ids": list(packer.ignore_ids),
        "target_tokens": 0,
        "total_tokens": 0,
        "contexts_consumed": 0,
        "documents_consumed": exp.dataset.skip_documents,
        "complete": False,
        "mean_norms": {h: 0.0 for h in acts.hook_points},
        "chunks": [],
    }


@dataclass
class _Job:
    tensors: dict[str, torch.Tensor]
    contexts_consumed: int
    documents_consumed: int
    complete: bool
    exhausted: bool = False


class ChunkWriter:
    """Background thread: serialise, hash and atomically write chunks, then rewrite the manifest."""

    def __init__(self, folder: Path, manifest: dict, queue_size: int = 2):
        self.folder = folder
        self.manifest = manifest
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="saecli-chunk-writer", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        self._raise()
        while True:
            try:
                self._queue.put(job, timeout=0.2)
                return
            except queue.Full:
                self._raise()

    def close(self) -> dict:
        """Wait for every queued chunk to be on disk; return the final manifest."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
        return self.manifest

    def _raise(self) -> None:
        if self._error is not None:
            raise RunError(f"writing the activation cache in {self.folder} failed: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue  # drain after a failure; the main thread raises
            try:
                self._write(job)
            except BaseException as exc:
                self._error = exc

    def _write(self, job: _Job) -> None:
        m = self.manifest
        tensors = job.tensors
        if tensors:
            name = chunk_name(len(m["chunks"]))
            # one metadata key only: safetensors writes several in a random (hash) order
            data = st_save(tensors, metadata={"format": "pt"})
            fsio.write_bytes(self.folder / name, data)
            sums = {
                h: float(torch.linalg.vector_norm(tensors[act_key(h)].float(), dim=1).double().sum())
                for h in m["hook_points"]
            }
            n = int(tensors["tokens"].shape[0])
            m["chunks"].append({
                "file": name, "n_tokens": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "norm_sums": sums, "contexts_end": job.contexts_consumed,
            })
            m["total_tokens"] += n
        m["contexts_consumed"] = job.contexts_consumed
        m["documents_consumed"] = job.documents_consumed
        m["complete"] = job.complete
        if job.exhausted:
            m["exhausted"] = True
        m["mean_norms"] = mean_norms(m)
        fsio.write_json(self.folder / MANIFEST, m)


def _resume_state(folder: Path, wanted: dict) -> dict | None:
    """The manifest to continue from (identity checked, stray files removed), or None to start fresh."""
    path = folder / MANIFEST
    if not path.exists():
        for stale in folder.glob("chunk-*.safetensors"):
            if _CHUNK_RE.match(stale.name):
                stale.unlink()
        return None
    stored = read_manifest(path)
    diff = identity_mismatch(stored, wanted)
    if diff:
        raise UsageError(
            f"{folder.parent} already holds a different activation cache ({diff}); "
            "use another activations.cache_dir or delete that folder"
        )
    listed = {c["file"]: c for c in stored["chunks"]}
    for name, c in listed.items():
        f = folder / name
        if not f.exists() or f.stat().st_size != c["bytes"]:
            raise RunError(f"{f} is missing or has the wrong size; the cache is damaged (run `saecli check {folder.parent}`)")
    for f in folder.iterdir():
        if (_CHUNK_RE.match(f.name) and f.name not in listed) or (f.name.startswith(".") and f.name.endswith(".tmp")):
            f.unlink()
    return stored


def generate_shard(exp: Any, lm: Any, run_to_hooks: Callable, shard: int, n_shards: int,
                   progress: Callable[[int, dict], None] | None = None) -> dict:
    """Fill `cache_dir/shard-{shard}` up to this shard's token target; returns its final manifest.

    `progress(n_new_tokens, metrics)` is called after each model batch.
    """
    acts = exp.activations
    hooks = list(acts.hook_points)
    folder = shard_dir(acts.cache_dir, shard)
    folder.mkdir(parents=True, exist_ok=True)
    packer = packer_for(lm, acts, exp.model)
    target = shard_target(acts.total_tokens, shard, n_shards)
    store_dtype = DTYPES[acts.override_dtype or exp.model.dtype]
    manifest = new_manifest(exp, lm, packer, shard, n_shards, {h: int(lm.d_model) for h in hooks})
    stored = _resume_state(folder, manifest)
    if stored is not None:
        manifest = stored
    write_resolved(exp, acts.cache_dir)
    manifest["target_tokens"] = target
    done = int(manifest["total_tokens"])
    if done >= target or manifest.get("exhausted"):
        return manifest

    docs = iter_documents(exp.dataset, shard, n_shards)
    contexts = Prefetch(packer.contexts(docs, acts.model_batch_size, skip=int(manifest["contexts_consumed"])), size=4,
                        name="saecli-tokenise")
    writer = ChunkWriter(folder, manifest)
    pending: list[dict[str, torch.Tensor]] = []
    n_pending = 0
    documents = int(manifest["documents_consumed"])
    consumed = int(manifest["contexts_consumed"])
    exhausted = True
    try:
        for ctx in contexts:
            piece = _forward(lm, run_to_hooks, ctx, hooks, store_dtype, limit=target - done - n_pending)
            pending.append(piece)
            n = int(piece["tokens"].shape[0])
            n_pending += n
            consumed = ctx.first + len(ctx)
            documents = max(documents, int(ctx.doc.max()) + 1)
            reached = done + n_pending >= target
            if n_pending >= acts.chunk_tokens or reached:
                writer.submit(_Job(_concat(pending), consumed, documents, complete=reached))
                done += n_pending
                pending, n_pending = [], 0
            if progress is not None:
                progress(n, {"chunks": len(manifest["chunks"])})
            if reached:
                exhausted = False
                break
        if exhausted:
            writer.submit(_Job(_concat(pending) if pending else {}, consumed, documents, complete=True, exhausted=True))
    finally:
        contexts.close()
        manifest = writer.close()
    return manifest


def _forward(lm: Any, run_to_hooks: Callable, ctx: Contexts, hooks: list[str], dtype: torch.dtype,
             limit: int) -> dict[str, torch.Tensor]:
    """Activations of the kept tokens of one model batch (at most `limit` of them), on the CPU."""
    keep = ctx.kept()[: max(limit, 0)]
    out = run_to_hooks(lm, ctx.tokens.to(lm.device), hooks)
    keep_dev = keep.to(lm.device)
    piece = {}
    for h in hooks:
        a = out[h]
        piece[act_key(h)] = a.reshape(-1, a.shape[-1]).index_select(0, keep_dev).to(dtype).cpu()
    piece["tokens"] = ctx.tokens.reshape(-1)[keep].to(torch.int32)
    piece["doc"] = ctx.doc.reshape(-1)[keep].to(torch.int64)
    piece["pos"] = ctx.pos.reshape(-1)[keep].to(torch.int32)
    return piece


def _concat(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(pieces) == 1:
        return {k: v.contiguous() for k, v in pieces[0].items()}
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


def write_cache(cache_dir: str | Path, chunks: Any, *, hook_points: list[str], dtype: str = "float32",
                chunk_tokens: int | None = None, shard: int = 0, n_shards: int = 1, info: dict | None = None) -> dict:
    """Write activations you already have as a cache that every reader accepts.

    `chunks` yields dicts with `acts.<hook>` [n, d] per hook point and `tokens`/`doc`/`pos` [n]
    (converted to int32/int64/int32); `info` fills the manifest's model/dataset/packing fields.
    """
    info = dict(info or {})
    folder = shard_dir(cache_dir, shard)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST).exists():
        raise UsageError(f"{folder} already holds a cache")
    writer: ChunkWriter | None = None
    manifest: dict = {}
    consumed = documents = 0
    try:
        for chunk in chunks:
            tensors = {act_key(h): chunk[act_key(h)].to(DTYPES[dtype]).contiguous() for h in hook_points}
            tensors["tokens"] = chunk["tokens"].to(torch.int32).contiguous()
            tensors["doc"] = chunk["doc"].to(torch.int64).contiguous()
            tensors["pos"] = chunk["pos"].to(torch.int32).contiguous()
            if writer is None:
                manifest = {
                    "format": FORMAT, "version": VERSION, "shard": shard, "n_shards": n_shards,
                    "model": info.get("model", {"name": "unknown"}), "dataset": info.get("dataset", {}),
                    "hook_points": list(hook_points),
                    "d_model": {h: int(tensors[act_key(h)].shape[1]) for h in hook_points}, "dtype": dtype,
                    "context_size": info.get("context_size", 0), "model_batch_size": info.get("model_batch_size", 0),
                    "chunk_tokens": chunk_tokens or int(tensors["tokens"].shape[0]),
                    "prepend_bos": info.get("prepend_bos", False), "bos_token_id": info.get("bos_token_id"),
                    "separator_token_id": info.get("separator_token_id"),
                    "ignore_token_ids": info.get("ignore_token_ids", []), "target_tokens": 0, "total_tokens": 0,
                    "contexts_consumed": 0, "documents_consumed": 0, "complete": False,
                    "mean_norms": {h: 0.0 for h in hook_points}, "chunks": [],
                }
                writer = ChunkWriter(folder, manifest)
            consumed += 1
            if tensors["doc"].numel():
                documents = max(documents, int(tensors["doc"].max()) + 1)
            writer.submit(_Job(tensors, consumed, documents, complete=False))
    finally:
        if writer is not None:
            manifest = writer.close()
    if writer is None:
        raise UsageError("write_cache got no chunks")
    manifest["complete"] = True
    manifest["target_tokens"] = manifest["total_tokens"]
    fsio.write_json(folder / MANIFEST, manifest)
    return manifest
