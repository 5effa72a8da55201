"""The activation cache's layout and manifests.

    cache_dir/config.toml                         the resolved experiment that made the cache
    cache_dir/shard-000/manifest.json             one manifest per shard (one writing process each)
    cache_dir/shard-000/chunk-000000.safetensors  acts.<hook> [n, d], tokens [n] int32, doc [n] int64,
                                                  pos [n] int32: the n kept tokens of whole contexts

A shard's manifest is rewritten atomically after every chunk, so it always lists exactly the chunks
that are complete on disk; it holds the identity of the cache (model, text, hook points, packing,
dtype) that a resumed `generate` must match, the running token and norm sums, and how many contexts
and documents were consumed. `CacheIndex` is the reader's view of all shards together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from saecli.errors import RunError, UsageError

FORMAT = "saecli-activation-cache"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-[0-9][0-9][0-9]"
# keys that define what a cache holds: a resumed generate must match all of them
IDENTITY_KEYS = (
    "shard",
    "n_shards",
    "model",
    "dataset",
    "hook_points",
    "dtype",
    "context_size",
    "model_batch_size",
    "chunk_tokens",
    "prepend_bos",
    "bos_token_id",
    "separator_token_id",
    "ignore_token_ids",
)


def shard_dir(cache_dir: str | Path, shard: int) -> Path:
    return Path(cache_dir) / f"shard-{shard:03d}"


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.safetensors"


def act_key(hook: str) -> str:
    return f"acts.{hook}"


def shard_plan(n_shards: int, start_shard: int, env: dict[str, str] | None = None) -> tuple[int, int]:
    """(shard this process writes, n_shards): `start_shard`, or `start_shard + RANK` under a launcher.

    With WORLD_SIZE > 1 and the default n_shards = 1 the text is split into WORLD_SIZE shards.
    """
    given: Mapping[str, str] = os.environ if env is None else env
    world = int(given.get("WORLD_SIZE", "1") or 1)
    rank = int(given.get("RANK", "0") or 0)
    if world <= 1:
        return start_shard, n_shards
    if n_shards == 1 and start_shard == 0:
        n_shards = world
    if start_shard + world > n_shards:
        raise UsageError(
            f"{world} processes from start_shard {start_shard} need activations.n_shards >= {start_shard + world}, "
            f"found {n_shards}"
        )
    return start_shard + rank, n_shards


def shard_target(total_tokens: int, shard: int, n_shards: int) -> int:
    """This shard's part of activations.total_tokens (the first shards take the remainder)."""
    return total_tokens // n_shards + (1 if shard < total_tokens % n_shards else 0)


def read_manifest(path: str | Path) -> dict:
    """Load one shard manifest, checking that it is ours and of a version we read."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no cache manifest at {path}") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"unreadable cache manifest {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path} is not a saecli activation-cache manifest")
    if data.get("version") != VERSION:
        raise UsageError(f"{path} has cache format version {data.get('version')}; this saecli reads version {VERSION}")
    from saecli.lm.hooks import check_saved_hook_names

    check_saved_hook_names(list(data.get("hook_points") or []), data.get("hook_names"), f"the cache manifest {path}")
    return data


def identity_mismatch(stored: dict, wanted: dict) -> str | None:
    """The first identity key on which two manifests differ, described; None when they agree."""
    for key in IDENTITY_KEYS:
        a, b = stored.get(key), wanted.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                return f"{key}.{sub} is {a.get(sub)!r} in the cache but {b.get(sub)!r} now"
            return f"{key} is {a!r} in the cache but {b!r} now"
    return None


def mean_norms(manifest: dict) -> dict[str, float]:
    """Mean ‖x‖ per hook over all chunks listed (0 when none)."""
    total = sum(c["n_tokens"] for c in manifest["chunks"])
    sums = {h: 0.0 for h in manifest["hook_points"]}
    for c in manifest["chunks"]:
        for h in sums:
            sums[h] += c["norm_sums"][h]
    return {h: (s / total if total else 0.0) for h, s in sums.items()}


@dataclass
class ChunkRef:
    path: Path
    n_tokens: int
    sha256: str
    shard: int
    index: int
    bytes: int | None = None  # the file's size the manifest records


@dataclass
class CacheIndex:
    """All shards of a cache as one: the chunk list (sorted by shard, chunk) and the shared metadata."""

    root: Path
    manifests: list[dict]
    chunks: list[ChunkRef]

    @property
    def first(self) -> dict:
        return self.manifests[0]

    @property
    def hook_points(self) -> list[str]:
        return list(self.first["hook_points"])

    @property
    def d_model(self) -> dict[str, int]:
        return {h: int(d) for h, d in self.first["d_model"].items()}

    @property
    def dtype(self) -> str:
        return self.first["dtype"]

    @property
    def context_size(self) -> int:
        return int(self.first["context_size"])

    @property
    def chunk_tokens(self) -> int:
        return int(self.first["chunk_tokens"])

    @property
    def total_tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)

    @property
    def documents_consumed(self) -> int:
        """A `skip_documents` past every document any shard read (for held-out evaluation text)."""
        return max(int(m["documents_consumed"]) for m in self.manifests)

    @property
    def mean_norms(self) -> dict[str, float]:
        """Token-weighted mean ‖x‖ per hook over all shards."""
        total = self.total_tokens
        sums = {h: 0.0 for h in self.hook_points}
        for m in self.manifests:
            for c in m["chunks"]:
                for h in sums:
                    sums[h] += c["norm_sums"][h]
        return {h: (s / total if total else 0.0) for h, s in sums.items()}


def open_cache(cache_dir: str | Path) -> CacheIndex:
    """Read every shard manifest under `cache_dir`; raise UsageError when there is no cache there."""
    root = Path(cache_dir)
    if not root.is_dir():
        raise UsageError(
            f"activation cache not found: {root} (run `saecli generate` first, or check activations.cache_dir)"
        )
    folders = sorted(p for p in root.glob(SHARD_GLOB) if (p / MANIFEST).exists())
    if not folders:
        raise UsageError(f"{root} holds no activation cache (no shard-NNN/{MANIFEST})")
    manifests = [read_manifest(p / MANIFEST) for p in folders]
    ref = manifests[0]
    for folder, m in zip(folders[1:], manifests[1:]):
        for key in ("hook_points", "d_model", "dtype", "context_size", "model", "dataset", "n_shards"):
            if m.get(key) != ref.get(key):
                raise RunError(
                    f"{folder / MANIFEST}: `{key}` differs from {folders[0] / MANIFEST}; the shards are of different caches"
                )
    chunks = [
        ChunkRef(
            folder / c["file"],
            int(c["n_tokens"]),
            c["sha256"],
            int(m["shard"]),
            i,
            int(c["bytes"]) if c.get("bytes") is not None else None,
        )
        for folder, m in zip(folders, manifests)
        for i, c in enumerate(m["chunks"])
    ]
    return CacheIndex(root, manifests, chunks)
