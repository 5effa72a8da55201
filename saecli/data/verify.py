"""Checking an activation cache: every problem found, each with the file it is in.

What is checked: the manifests (readable, shards agree, totals and mean norms add up); manifest vs
files (missing, unlisted, size); SHA-256 of every chunk; inside each chunk the keys, dtypes and shapes
per hook point (one row per kept token, the same count for every hook and for tokens/doc/pos), NaN and
inf, no ignored token id left in, and the stored norm sums; and with `against`, that another cache
of the same text holds the same token ids, documents and positions in the same order (as lm_saes'
check_activation_consistency does across hook points).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from saecli.data.manifest import MANIFEST, SHARD_GLOB, act_key, mean_norms, read_manifest
from saecli.dtypes import DTYPES
from saecli.errors import SaecliError

_CHUNK_RE = re.compile(r"^chunk-\d{6}\.safetensors$")
_INDEX_DTYPES = {"tokens": torch.int32, "doc": torch.int64, "pos": torch.int32}


@dataclass
class Problem:
    file: str
    check: str
    detail: str

    def row(self) -> dict[str, str]:
        return {"file": self.file, "check": self.check, "problem": self.detail}


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def shard_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(SHARD_GLOB) if p.is_dir())


def count_chunks(root: Path) -> int:
    total = 0
    for folder in shard_folders(root):
        try:
            total += len(read_manifest(folder / MANIFEST)["chunks"])
        except SaecliError:
            pass
    return total


def check_cache(root: str | Path, *, on_chunk: Callable[[], None] | None = None) -> list[Problem]:
    """Every problem in the cache at `root` (an empty list when it is sound)."""
    root = Path(root)
    problems: list[Problem] = []
    folders = shard_folders(root)
    if not folders:
        return [Problem(str(root), "layout", "no shard-NNN folder: not an activation cache")]
    first: dict | None = None
    for folder in folders:
        path = folder / MANIFEST
        try:
            m = read_manifest(path)
        except SaecliError as exc:
            problems.append(Problem(_rel(path, root), "manifest", str(exc)))
            continue
        if first is None:
            first = m
        else:
            for key in ("hook_points", "d_model", "dtype", "context_size", "model", "dataset", "n_shards"):
                if m.get(key) != first.get(key):
                    problems.append(Problem(_rel(path, root), "manifest", f"`{key}` differs from the other shards"))
        problems += _check_shard(root, folder, m, on_chunk)
    return problems


def _check_shard(root: Path, folder: Path, m: dict, on_chunk: Callable[[], None] | None) -> list[Problem]:
    problems: list[Problem] = []
    mpath = _rel(folder / MANIFEST, root)
    if f"shard-{int(m.get('shard', -1)):03d}" != folder.name:
        problems.append(Problem(mpath, "manifest", f"says shard {m.get('shard')} but lies in {folder.name}"))
    chunks = m.get("chunks", [])
    listed = {c["file"] for c in chunks}
    total = sum(int(c["n_tokens"]) for c in chunks)
    if total != m.get("total_tokens"):
        problems.append(Problem(mpath, "manifest", f"total_tokens {m.get('total_tokens')} but its chunks hold {total}"))
    for f in sorted(folder.iterdir()):
        if f.name != MANIFEST and f.name not in listed:
            what = "a leftover temporary file" if f.name.endswith(".tmp") else "not listed in the manifest"
            if _CHUNK_RE.match(f.name) or f.name.endswith(".tmp"):
                problems.append(Problem(_rel(f, root), "extra file", what))
    norms_ok = True
    for c in chunks:
        path = folder / c["file"]
        found = _check_chunk(root, path, c, m)
        norms_ok &= not any(p.check == "norms" for p in found)
        problems += found
        if on_chunk is not None:
            on_chunk()
    if chunks:
        stated, recomputed = m.get("mean_norms", {}), mean_norms(m)
        for h, v in recomputed.items():
            s = stated.get(h)
            if s is None or not math.isfinite(s) or not math.isclose(s, v, rel_tol=1e-9, abs_tol=1e-12):
                problems.append(Problem(mpath, "norms", f"mean norm of {h} is {s}, its chunks give {v:.6g}"))
            elif v <= 0:
                problems.append(Problem(mpath, "norms", f"mean norm of {h} is {v}: all activations are zero"))
    return problems


def _check_chunk(root: Path, path: Path, c: dict, m: dict) -> list[Problem]:
    name = _rel(path, root)
    if not path.exists():
        return [Problem(name, "missing file", "listed in the manifest but not on disk")]
    data = path.read_bytes()
    out: list[Problem] = []
    if "bytes" in c and len(data) != c["bytes"]:
        out.append(Problem(name, "size", f"{len(data)} bytes, the manifest says {c['bytes']}"))
    digest = hashlib.sha256(data).hexdigest()
    if digest != c.get("sha256"):
        out.append(
            Problem(name, "sha256", f"hash {digest[:12]}… does not match the manifest's {str(c.get('sha256'))[:12]}…")
        )
    try:
        tensors = st_load(data)
    except Exception as exc:  # a corrupt header: nothing more to look at
        out.append(Problem(name, "format", f"not a readable safetensors file ({exc})"))
        return out
    n = int(c["n_tokens"])
    for key, dtype in _INDEX_DTYPES.items():
        t = tensors.get(key)
        if t is None:
            out.append(Problem(name, "keys", f"no `{key}` tensor"))
        elif t.dtype != dtype or tuple(t.shape) != (n,):
            out.append(Problem(name, "shape", f"`{key}` is {t.dtype} {tuple(t.shape)}, expected {dtype} ({n},)"))
    want_dtype = DTYPES[m["dtype"]]
    for h in m["hook_points"]:
        key = act_key(h)
        t = tensors.get(key)
        if t is None:
            out.append(Problem(name, "keys", f"no `{key}` tensor"))
            continue
        d = int(m["d_model"][h])
        if t.dtype != want_dtype or tuple(t.shape) != (n, d):
            out.append(
                Problem(name, "shape", f"`{key}` is {t.dtype} {tuple(t.shape)}, expected {want_dtype} ({n}, {d})")
            )
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan = int(torch.isnan(t).sum())
            rows = bad.any(dim=1).nonzero().flatten()[:3].tolist()
            out.append(
                Problem(name, "finite", f"{h}: {n_nan} NaN and {int(bad.sum()) - n_nan} inf values (rows {rows}…)")
            )
            continue
        s = float(torch.linalg.vector_norm(t.float(), dim=1).double().sum())
        stated = c.get("norm_sums", {}).get(h)
        if stated is None or not math.isclose(s, stated, rel_tol=1e-6, abs_tol=1e-9):
            out.append(Problem(name, "norms", f"{h}: norm sum {s:.6g}, the manifest says {stated}"))
    unknown = sorted(set(tensors) - set(_INDEX_DTYPES) - {act_key(h) for h in m["hook_points"]})
    if unknown:
        out.append(Problem(name, "keys", f"unexpected tensors {unknown}"))
    tokens = tensors.get("tokens")
    if tokens is not None and m.get("ignore_token_ids"):
        left = torch.isin(tokens.long(), torch.tensor(m["ignore_token_ids"], dtype=torch.int64))
        if bool(left.any()):
            out.append(Problem(name, "tokens", f"{int(left.sum())} ignored token ids were kept"))
    return out


# --------------------------------------------------------------------------- two caches, one text


def _token_stream(root: Path, folder: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    m = read_manifest(folder / MANIFEST)
    for c in m["chunks"]:
        path = folder / c["file"]
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            yield _rel(path, root), f.get_tensor("tokens").long(), f.get_tensor("doc"), f.get_tensor("pos").long()


def check_against(root: str | Path, other: str | Path) -> list[Problem]:
    """Token ids, documents and positions of two caches of the same text agree, shard by shard."""
    root, other = Path(root), Path(other)
    problems: list[Problem] = []
    mine = {f.name: f for f in shard_folders(root) if (f / MANIFEST).exists()}
    theirs = {f.name: f for f in shard_folders(other) if (f / MANIFEST).exists()}
    if not theirs:
        return [Problem(str(other), "against", "no activation cache there to compare with")]
    common = sorted(set(mine) & set(theirs))
    if not common:
        return [Problem(str(other), "against", f"no shard in common (here: {sorted(mine)}, there: {sorted(theirs)})")]
    for shard in common:
        try:
            problems += _compare(_token_stream(root, mine[shard]), _token_stream(other, theirs[shard]), str(other))
        except SaecliError as exc:
            problems.append(Problem(shard, "against", str(exc)))
        except Exception as exc:
            problems.append(Problem(shard, "against", f"cannot read tokens: {exc}"))
    return problems


def _compare(a: Iterator, b: Iterator, other_name: str) -> list[Problem]:
    """Walk two token streams chunk by chunk; report the first disagreement (with both file names)."""
    buf_a: list = []
    buf_b: list = []
    seen = 0
    while True:
        if not buf_a:
            buf_a = list(next(a, ()))
        if not buf_b:
            buf_b = list(next(b, ()))
        if not buf_a or not buf_b:
            return []  # one cache is longer: its extra tokens have nothing to compare with
        name_a, *ta = buf_a
        name_b, *tb = buf_b
        n = min(len(ta[0]), len(tb[0]))
        for label, x, y in zip(("token id", "document", "position"), ta, tb):
            diff = (x[:n] != y[:n]).nonzero()
            if len(diff):
                i = int(diff[0])
                return [
                    Problem(
                        name_a,
                        "against",
                        f"{label} at token {seen + i:,} is {int(x[i])} here but "
                        f"{int(y[i])} in {other_name}/{name_b}: the caches are not of the same text",
                    )
                ]
        seen += n
        buf_a = [name_a, *(t[n:] for t in ta)] if len(ta[0]) > n else []
        buf_b = [name_b, *(t[n:] for t in tb)] if len(tb[0]) > n else []
