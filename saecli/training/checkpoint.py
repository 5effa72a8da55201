"""Checkpoints: when to take them, and writing/reading them so that a kill at any moment loses nothing.

Layout of a member's run folder:

    checkpoints/step_00000120/   one complete checkpoint (the folder name is its commit marker)
        weights.safetensors      the dictionary's state_dict (unfolded, training units)
        trainer.pt               optimizer, scheduler, step, tokens, statistics, RNG states and the
                                 stream's exact position (one state per data-parallel rank)
    checkpoints/.step_00000180.tmp-<pid>/   a checkpoint being written (ignored, removed later)

A checkpoint is written into a temporary folder (every file fsynced) and then renamed to its final
name in one `os.rename`, so `step_*` folders are always complete; a kill during the write leaves the
previous ones untouched. The last `keep` checkpoints are kept.

When: `n_checkpoints` steps spaced linearly (⌊i·T/n⌋) or logarithmically (⌈T^(i/n)⌉) in optimizer
steps, i = 1..n (so the last one is the final step), plus one every `every_seconds` of wall time.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from saecli.errors import RunError

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "trainer.pt"
DCP_DIR = "dcp"  # a tensor-parallel run's sharded weights + optimizer (training/dcp.py), instead of WEIGHTS_FILE
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_steps(total_steps: int, n: int, mode: str = "linear") -> list[int]:
    """The optimizer steps (1-based counts of completed steps) after which to checkpoint."""
    if n <= 0 or total_steps <= 0:
        return []
    if mode == "linear":
        steps = {(i * total_steps) // n for i in range(1, n + 1)}
    elif mode == "log":
        steps = {min(total_steps, math.ceil(total_steps ** (i / n) - 1e-9)) for i in range(1, n + 1)}
    else:
        raise ValueError(f"unknown checkpoint mode {mode!r}; expected 'linear' or 'log'")
    return sorted(s for s in steps if s >= 1)


class CheckpointTimer:
    """Due every `every_seconds` of wall time since the last checkpoint (0 = never)."""

    def __init__(self, every_seconds: float):
        self.every = float(every_seconds)
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.every > 0 and time.monotonic() - self.last >= self.every

    def reset(self) -> None:
        self.last = time.monotonic()


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / CHECKPOINTS_DIR / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder, oldest first."""
    folder = Path(root) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists() and ((p / WEIGHTS_FILE).exists() or (p / DCP_DIR).is_dir()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves (before the commit rename)."""
    for p in sorted(folder.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        _fsync(p)
    _fsync(folder)


def _write_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(path))


def _write_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def save_checkpoint(
    root: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint `step` of the run folder `root` atomically; keep the newest `keep`."""
    final = step_dir(Path(root), step)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # this exact step is already saved (e.g. Ctrl-C right after a scheduled checkpoint)
        return final
    tmp = parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_weights(tmp / WEIGHTS_FILE, weights)
        _write_state(tmp / STATE_FILE, state)
        for f in (WEIGHTS_FILE, STATE_FILE):
            _fsync(tmp / f)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(exc, root, final, checkpoint_bytes(weights, state))
        if full is not None:
            raise full from exc
        raise
    prune(root, keep)
    return final


def disk_full_error(exc: BaseException, root: str | Path, final: Path, needed: int) -> RunError | None:
    """The one-paragraph error for a checkpoint write that failed because the disk filled up (None when
    `exc` is another failure): which checkpoint, about how big, and which earlier one is intact."""
    from saecli.fsio import human_bytes, is_disk_full

    if not is_disk_full(exc, final.parent, needed):
        return None
    last = latest_checkpoint(root)
    kept = (
        f"the last checkpoint, {last[1]}, is intact (resume from it with --resume)"
        if last
        else "no earlier checkpoint exists"
    )
    return RunError(
        f"the disk is full: writing checkpoint {final} (about {human_bytes(needed)}) failed; "
        f"{kept}. Free some space and run again"
    )


def checkpoint_bytes(weights: dict[str, Any], state: Any) -> int:
    """About how many bytes a checkpoint takes on disk: its tensors (weights, optimizer moments...)."""

    def walk(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(weights) + walk(state) + (1 << 16)


def prune(root: str | Path, keep: int = 2) -> None:
    """Remove all but the newest `keep` complete checkpoints, and leftovers of interrupted writes."""
    folder = Path(root) / CHECKPOINTS_DIR
    for _step, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".step_") and ".tmp-" in p.name and p.name.rsplit("-", 1)[-1] != str(os.getpid()):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, trainer state) of a checkpoint folder; weights are {} for a sharded (DCP) checkpoint,
    which `dcp.load_sharded` reads into the model and optimizer."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = {} if (path / DCP_DIR).is_dir() else load_file(str(path / WEIGHTS_FILE), device=str(device))
    # our own file, holding RNG states and the stream's state (arbitrary picklable values)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return weights, state
