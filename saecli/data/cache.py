"""Writing an activation cache: model + text → safetensors chunks + manifest (see manifest.py).

The model is kept busy: contexts are tokenised in a background thread; activations stay on the
device until a chunk is full, then go to pinned host memory without a wait, and are serialised,
hashed and written (atomically, then the manifest) by writer threads behind a bounded queue
(writer.py). Norm sums are taken on the device, per model batch. A chunk holds
the kept tokens of whole model batches (a chunk closes once it has >= chunk_tokens tokens), so a
killed run resumes exactly: it re-tokenises to skip the contexts its manifest says were consumed
and runs the model only on new ones, ending byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saecli import fsio
from saecli.config.base import to_dict
from saecli.config.load import write_resolved
from saecli.data.manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    act_key,
    identity_mismatch,
    read_manifest,
    shard_dir,
    shard_target,
)
from saecli.data.open import need_activations, need_model
from saecli.data.producer import context_batches, use_process
from saecli.data.tokens import Contexts, packer_for
from saecli.data.writer import ChunkWriter, Job
from saecli.dtypes import DTYPES
from saecli.errors import ConfigError, RunError, UsageError
from saecli.lm.hooks import HOOK_NAMES, hook_width

if TYPE_CHECKING:
    from saecli.config.activations import ActivationsConfig
    from saecli.config.experiment import Experiment
    from saecli.data.tokens import Packer
    from saecli.lm.loading import LanguageModel


_CHUNK_RE = re.compile(r"^chunk-\d{6}\.safetensors$")


def tokens_written(cache_dir: str | Path, shard: int) -> int:
    """Tokens the shard's manifest lists (0 when there is none yet)."""
    path = shard_dir(cache_dir, shard) / MANIFEST
    if not path.exists():
        return 0
    return int(read_manifest(path)["total_tokens"])


def new_manifest(
    exp: Experiment, lm: LanguageModel, packer: Packer, shard: int, n_shards: int, d_model: dict[str, int]
) -> dict:
    acts, model = need_activations(exp), need_model(exp)
    return {
        "format": FORMAT,
        "version": VERSION,
        "hook_names": HOOK_NAMES,
        "shard": shard,
        "n_shards": n_shards,
        "model": {
            "name": model.name,
            "gguf_file": model.gguf_file,
            "revision": model.revision,
            "dtype": model.dtype,
            "family": lm.family,
            "d_model": int(lm.d_model),
            "n_layers": int(lm.n_layers),
        },
        "dataset": to_dict(exp.dataset),
        "hook_points": list(acts.hook_points),
        "d_model": d_model,
        "dtype": acts.override_dtype or model.dtype,
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
            raise RunError(
                f"{f} is missing or has the wrong size; the cache is damaged (run `saecli check {folder.parent}`)"
            )
    for f in folder.iterdir():
        if (_CHUNK_RE.match(f.name) and f.name not in listed) or (f.name.startswith(".") and f.name.endswith(".tmp")):
            f.unlink()
    return stored


def generate_shard(
    exp: Experiment,
    lm: LanguageModel,
    run_to_hooks: Callable,
    shard: int,
    n_shards: int,
    progress: Callable[[int, dict], None] | None = None,
) -> dict:
    """Fill `cache_dir/shard-{shard}` up to this shard's token target; returns its final manifest.

    `progress(n_new_tokens, metrics)` is called after each model batch.
    """
    acts, model = need_activations(exp), need_model(exp)
    root = cache_root(acts)
    hooks = list(acts.hook_points)
    folder = shard_dir(root, shard)
    folder.mkdir(parents=True, exist_ok=True)
    packer = packer_for(lm, acts, model)
    target = shard_target(acts.total_tokens, shard, n_shards)
    store_dtype = DTYPES[acts.override_dtype or model.dtype]
    manifest = new_manifest(exp, lm, packer, shard, n_shards, {h: hook_width(lm, h) for h in hooks})
    stored = _resume_state(folder, manifest)
    if stored is not None:
        manifest = stored
    write_resolved(exp, root)
    manifest["target_tokens"] = target
    done = int(manifest["total_tokens"])
    if done >= target or manifest.get("exhausted"):
        return manifest
    check_space(exp, manifest["d_model"], shard, n_shards)

    contexts = context_batches(
        packer,
        exp.dataset,
        shard,
        n_shards,
        acts.model_batch_size,
        skip=int(manifest["contexts_consumed"]),
        process=use_process(lm.device),
    )
    writer = ChunkWriter(folder, manifest, workers=writer_threads())
    pending: list[dict[str, torch.Tensor]] = []
    n_pending = 0
    documents = int(manifest["documents_consumed"])
    consumed = int(manifest["contexts_consumed"])
    exhausted = True
    chunks = len(manifest["chunks"])  # written or queued: what the bar shows, as the summary will
    try:
        for ctx in contexts:
            piece = _forward(lm, run_to_hooks, ctx, hooks, store_dtype, limit=target - done - n_pending)
            if not manifest["chunks"] and not pending:  # the widths as the model gives them (writer still idle)
                manifest["d_model"] = {h: int(piece[act_key(h)].shape[1]) for h in hooks}
            pending.append(piece)
            n = int(piece["tokens"].shape[0])
            n_pending += n
            consumed = ctx.first + len(ctx)
            documents = max(documents, int(ctx.doc.max()) + 1)
            reached = done + n_pending >= target
            if n_pending >= acts.chunk_tokens or reached:
                writer.submit(_job(pending, consumed, documents, complete=reached))
                chunks += 1
                done += n_pending
                pending, n_pending = [], 0
            if progress is not None:
                progress(n, {"chunks": chunks})
            if reached:
                exhausted = False
                break
        if exhausted:
            final = _job(pending, consumed, documents, complete=True) if pending else Job({}, consumed, documents, True)
            final.exhausted = True
            writer.submit(final)
            if pending and progress is not None:
                progress(0, {"chunks": chunks + 1})
    finally:
        contexts.close()
        manifest = writer.close()
    return manifest


def cache_root(acts: ActivationsConfig) -> str:
    """`activations.cache_dir`, a ConfigError naming the key when it is unset (generate writes there)."""
    if not acts.cache_dir:
        raise ConfigError("generating a cache needs activations.cache_dir", key="activations.cache_dir")
    return acts.cache_dir


def check_space(exp: Experiment, d_model: dict[str, int], shard: int, n_shards: int) -> None:
    """Refuse (UsageError) when the disk holding the cache cannot take this shard's remaining tokens."""
    acts, model = need_activations(exp), need_model(exp)
    root = cache_root(acts)
    todo = shard_target(acts.total_tokens, shard, n_shards) - min(
        tokens_written(root, shard), shard_target(acts.total_tokens, shard, n_shards)
    )
    if todo > 0:
        dtype = DTYPES[acts.override_dtype or model.dtype]
        fsio.require_space(
            shard_dir(root, shard), estimated_bytes(d_model, dtype, todo), f"the cache's remaining {todo:,} tokens"
        )


def estimated_bytes(d_model: dict[str, int], dtype: torch.dtype, n_tokens: int) -> int:
    """Disk space `n_tokens` more tokens take: activations per hook plus tokens/doc/pos, and headers."""
    per_token = sum(d_model.values()) * dtype.itemsize + 4 + 8 + 4
    return int(per_token * n_tokens * 1.01) + (1 << 20)


def writer_threads() -> int:
    """Background writers: hashing and writing release the GIL, so two keep up with a fast GPU."""
    return max(1, min(4, (os.cpu_count() or 2) // 4)) if torch.cuda.is_available() else 1


def _forward(
    lm: LanguageModel, run_to_hooks: Callable, ctx: Contexts, hooks: list[str], dtype: torch.dtype, limit: int
) -> dict[str, torch.Tensor]:
    """The kept tokens of one model batch (at most `limit`): activations and norm sums stay on the device."""
    keep = ctx.kept()[: max(limit, 0)]
    out = run_to_hooks(lm, ctx.tokens.to(lm.device), hooks)
    keep_dev = keep.to(lm.device, non_blocking=True)
    piece = {}
    sums = []
    for h in hooks:
        a = out[h]
        a = a.reshape(-1, a.shape[-1]).index_select(0, keep_dev).to(dtype)
        piece[act_key(h)] = a
        sums.append(torch.linalg.vector_norm(a.float(), dim=1).double().sum())
    piece["norm_sums"] = torch.stack(sums)
    piece["tokens"] = ctx.tokens.reshape(-1)[keep].to(torch.int32)
    piece["doc"] = ctx.doc.reshape(-1)[keep].to(torch.int64)
    piece["pos"] = ctx.pos.reshape(-1)[keep].to(torch.int32)
    return piece


def _job(pieces: list[dict[str, torch.Tensor]], consumed: int, documents: int, complete: bool) -> Job:
    """One chunk from the pieces of several batches; from a GPU, copied to pinned memory without waiting."""
    tensors = {k: (torch.cat([p[k] for p in pieces]) if len(pieces) > 1 else pieces[0][k]) for k in pieces[0]}
    sums = torch.stack([p["norm_sums"] for p in pieces]).sum(0) if len(pieces) > 1 else tensors["norm_sums"]
    del tensors["norm_sums"]
    ready = None
    if any(t.is_cuda for t in tensors.values()):
        host = {}
        for k, t in {**tensors, "norm_sums": sums}.items():
            host[k] = (
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) if t.is_cuda else t
            )
        ready = torch.cuda.Event()
        ready.record()
        sums = host.pop("norm_sums")
        tensors = host
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return Job(tensors, consumed, documents, complete, norm_sums=sums, ready=ready)


def write_cache(
    cache_dir: str | Path,
    chunks: Iterable[dict[str, torch.Tensor]],
    *,
    hook_points: list[str],
    dtype: str = "float32",
    chunk_tokens: int | None = None,
    shard: int = 0,
    n_shards: int = 1,
    info: dict | None = None,
) -> dict:
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
                    "format": FORMAT,
                    "version": VERSION,
                    "hook_names": HOOK_NAMES,
                    "shard": shard,
                    "n_shards": n_shards,
                    "model": info.get("model", {"name": "unknown"}),
                    "dataset": info.get("dataset", {}),
                    "hook_points": list(hook_points),
                    "d_model": {h: int(tensors[act_key(h)].shape[1]) for h in hook_points},
                    "dtype": dtype,
                    "context_size": info.get("context_size", 0),
                    "model_batch_size": info.get("model_batch_size", 0),
                    "chunk_tokens": chunk_tokens or int(tensors["tokens"].shape[0]),
                    "prepend_bos": info.get("prepend_bos", False),
                    "bos_token_id": info.get("bos_token_id"),
                    "separator_token_id": info.get("separator_token_id"),
                    "ignore_token_ids": info.get("ignore_token_ids", []),
                    "target_tokens": 0,
                    "total_tokens": 0,
                    "contexts_consumed": 0,
                    "documents_consumed": 0,
                    "complete": False,
                    "mean_norms": {h: 0.0 for h in hook_points},
                    "chunks": [],
                }
                writer = ChunkWriter(folder, manifest)
            consumed += 1
            if tensors["doc"].numel():
                documents = max(documents, int(tensors["doc"].max()) + 1)
            writer.submit(Job(tensors, consumed, documents, complete=False))
    finally:
        if writer is not None:
            manifest = writer.close()
    if writer is None:
        raise UsageError("write_cache got no chunks")
    manifest["complete"] = True
    manifest["target_tokens"] = manifest["total_tokens"]
    fsio.write_json(folder / MANIFEST, manifest)
    return manifest
