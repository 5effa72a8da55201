"""Activations you already have → a saecli cache (what `saecli cache import` runs).

    from saecli.interop.activations import import_activations
    import_activations("acts.npy", "caches/mine", hook_points=["blocks.6.hook_resid_post"])
    # then: [activations] cache_dir = "caches/mine", hook_points = ["blocks.6.hook_resid_post"]

Sources (`source`):
- a `.npy` file: [n_tokens, d] or [n_sequences, seq_len, d] (one hook point);
- a `.safetensors` file: one tensor per hook point (named by `keys[hook]`, else the hook name, else
  `acts.<hook>`; a file with one tensor serves one hook); `tokens`/`input_ids` tensors, if present, are kept;
- a folder of such files (read in name order, each file continuing the previous);
- a `datasets` folder saved with `save_to_disk`, or `.parquet` files (a file, or a folder of them): a column
  per hook point, each row a token [d] or a sequence [seq_len, d].

Rows of one [seq_len, d] block count as one document (positions 0…seq_len−1); flat [n, d] rows are one
document each. Tokens unknown to the source are written as 0. The manifest's dataset is
`imported:<source>`, and a run trained on the cache records that in its config.toml (not a text it never
read); `eval` then evaluates on held-out activations (`eval.cache_dir`) or, failing that, the cache itself.
The lower-level writer is `saecli.data.cache.write_cache(cache_dir, chunks, hook_points=...)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from saecli.errors import UsageError

if TYPE_CHECKING:
    from saecli.config.experiment import Experiment


IMPORTED = "imported:"
_TOKEN_KEYS = ("tokens", "input_ids")


def import_activations(
    source: str | Path,
    cache_dir: str | Path,
    *,
    hook_points: list[str],
    keys: dict[str, str] | None = None,
    dtype: str = "float32",
    chunk_tokens: int = 65536,
    model: str | None = None,
) -> dict:
    """Write the activations at `source` as a saecli cache in `cache_dir`; returns the manifest."""
    from saecli.data.cache import write_cache

    source = Path(source)
    if not hook_points:
        raise UsageError("name the hook point(s) the activations were taken at (--hook blocks.L.hook_resid_post)")
    if not source.exists():
        raise UsageError(f"activations not found: {source}")
    if chunk_tokens <= 0:
        raise UsageError(f"--chunk-tokens must be > 0, found {chunk_tokens}")
    keys = dict(keys or {})
    info = {"model": {"name": model or "unknown"}, "dataset": {"path": f"{IMPORTED}{source.resolve()}"}}
    blocks = _blocks(source, hook_points, keys)
    return write_cache(
        cache_dir,
        _rechunk(blocks, hook_points, chunk_tokens),
        hook_points=hook_points,
        dtype=dtype,
        chunk_tokens=chunk_tokens,
        info=info,
    )


# ------------------------------------------------------------------------------------------ reading
def _blocks(source: Path, hooks: list[str], keys: dict[str, str]) -> Iterator[dict[str, torch.Tensor]]:
    """Blocks of {hook: [n, d] or [b, t, d], "tokens"?: [n] or [b, t]} from any supported source."""
    if source.is_dir():
        if (source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists():
            yield from _hf_blocks(source, hooks, keys)
            return
        parquet = sorted(source.glob("*.parquet"))
        if parquet:
            yield from _hf_blocks(source, hooks, keys, parquet)
            return
        files = sorted(p for p in source.iterdir() if p.suffix in (".npy", ".safetensors"))
        if not files:
            raise UsageError(
                f"{source} holds no .npy, .safetensors or .parquet files and is not a saved `datasets` folder"
            )
        for f in files:
            yield from _blocks(f, hooks, keys)
        return
    if source.suffix == ".parquet":
        yield from _hf_blocks(source, hooks, keys, [source])
        return
    if source.suffix == ".npy":
        if len(hooks) != 1:
            raise UsageError(
                f"{source} is one array: give one --hook (or a .safetensors file with one tensor per hook)"
            )
        arr = np.load(source, mmap_mode="r")  # read in slices: the file may not fit in memory
        step = max(1, 65536 // (arr.shape[1] if arr.ndim == 3 else 1))
        for i in range(0, arr.shape[0], step):
            yield {hooks[0]: torch.from_numpy(np.array(arr[i : i + step]))}
        return
    if source.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as f:
            names = list(f.keys())
            block = {h: f.get_tensor(_key(source, h, keys, names, len(hooks))) for h in hooks}
            for k in _TOKEN_KEYS:
                if k in names:
                    block["tokens"] = f.get_tensor(k)
                    break
        yield block
        return
    raise UsageError(
        f"{source}: unsupported activation file (supported: .npy, .safetensors, a folder of them, "
        "or a `datasets` folder saved with save_to_disk)"
    )


def _key(source: Path, hook: str, keys: dict[str, str], names: list[str], n_hooks: int) -> str:
    for k in (keys.get(hook), hook, f"acts.{hook}"):
        if k is not None and k in names:
            return k
    acts = [n for n in names if n not in _TOKEN_KEYS]
    if n_hooks == 1 and len(acts) == 1:
        return acts[0]
    raise UsageError(
        f"{source} has no tensor for hook {hook!r} (tensors: {', '.join(names)}): name it with --key {hook}=TENSOR"
    )


def _hf_blocks(
    source: Path, hooks: list[str], keys: dict[str, str], parquet: list[Path] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """A `datasets` table (saved with save_to_disk, or parquet files): one column per hook point."""
    import datasets

    if parquet:
        ds = datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")
    else:
        ds = datasets.load_from_disk(str(source))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    columns = {h: keys.get(h, h) for h in hooks}
    missing = [c for c in columns.values() if c not in ds.column_names]
    if missing:
        raise UsageError(
            f"{source} has no column {', '.join(map(repr, missing))} (columns: {', '.join(ds.column_names)}): "
            "name the column of each hook with --key HOOK=COLUMN"
        )
    token_col = next((k for k in _TOKEN_KEYS if k in ds.column_names), None)
    wanted = list(columns.values()) + ([token_col] if token_col else [])
    ds = ds.with_format("torch", columns=wanted)
    for start in range(0, len(ds), 1024):
        rows = ds[start : start + 1024]
        block = {h: _stack(rows[c]) for h, c in columns.items()}
        if token_col:
            block["tokens"] = _stack(rows[token_col])
        yield block


def _stack(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.stack(list(value))


# ------------------------------------------------------------------------------------------ chunks
def _flatten(block: dict[str, torch.Tensor], hooks: list[str], first_doc: int) -> tuple[dict[str, torch.Tensor], int]:
    """One block → token rows with tokens/doc/pos; returns the rows and the next document index."""
    ref = block[hooks[0]]
    if ref.dim() not in (2, 3):
        raise UsageError(
            f"activations for {hooks[0]} have shape {tuple(ref.shape)}: expected [tokens, d] or [sequences, seq_len, d]"
        )
    lead = ref.shape[:-1]
    for h in hooks:
        if block[h].shape[:-1] != lead:
            raise UsageError(
                f"activations for {h} have shape {tuple(block[h].shape)}, those for {hooks[0]} "
                f"{tuple(ref.shape)}: every hook point needs the same tokens"
            )
    if ref.dim() == 3:
        b, t = lead
        doc = torch.arange(b).repeat_interleave(t) + first_doc
        pos = torch.arange(t).repeat(b)
        n_docs = b
    else:
        n = lead[0]
        doc, pos, n_docs = torch.arange(n) + first_doc, torch.zeros(n, dtype=torch.int64), n
    n = doc.numel()
    tokens = block.get("tokens")
    tokens = tokens.reshape(-1) if tokens is not None and tokens.numel() == n else torch.zeros(n, dtype=torch.int64)
    rows = {f"acts.{h}": block[h].reshape(n, block[h].shape[-1]) for h in hooks}
    rows.update(tokens=tokens, doc=doc, pos=pos)
    return rows, first_doc + n_docs


def _rechunk(
    blocks: Iterator[dict[str, torch.Tensor]], hooks: list[str], size: int
) -> Iterator[dict[str, torch.Tensor]]:
    pending: list[dict[str, torch.Tensor]] = []
    held, doc = 0, 0
    for block in blocks:
        rows, doc = _flatten(block, hooks, doc)
        pending.append(rows)
        held += rows["doc"].numel()
        while held >= size:
            merged = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            held -= size
            pending = [rest] if held else []
    if held:
        yield {k: torch.cat([p[k] for p in pending]) for k in pending[0]}


# ------------------------------------------------------------------------------------------ runs
def cache_data_source(exp: Experiment) -> Experiment:
    """`exp` with [dataset] naming the imported activations when it trains on an imported cache (so the
    run's config.toml records where its data came from, not the default text it never read)."""
    from saecli.data.manifest import MANIFEST, read_manifest, shard_dir
    from saecli.data.open import uses_cache

    acts = exp.activations
    if acts is None or not acts.cache_dir or not uses_cache(exp):
        return exp
    path = shard_dir(acts.cache_dir, 0) / MANIFEST
    try:
        dataset = (read_manifest(path).get("dataset") or {}) if path.exists() else {}
    except Exception:  # noqa: BLE001 - an unreadable manifest: the stream reports it
        return exp
    where = str(dataset.get("path", ""))
    if not where.startswith(IMPORTED) or exp.dataset.path == where:
        return exp
    return dataclasses.replace(exp, dataset=dataclasses.replace(exp.dataset, path=where))
