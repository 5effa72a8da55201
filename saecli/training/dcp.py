"""Sharded checkpoints with torch.distributed.checkpoint (DCP), loadable into any tensor-parallel size.

A tensor-parallel run's checkpoint folder holds, instead of `weights.safetensors`:

    checkpoints/step_00000120/
        dcp/            DCP folder: {"model": ..., "optim": ...} from `get_state_dict` — parameters and
                        Adam moments as DTensors (each rank writes its own shards, rank 0 the metadata)
        trainer.pt      the member's other state (step, schedules, statistics, stream position), rank 0

Because the saved tensors carry their placements, DCP reshards on load: `load_sharded` fills whatever
the target holds — DTensors of another tp size, or the plain tensors of an unsharded dictionary in a
single process (no process group needed). The reverse direction, an ordinary (safetensors) checkpoint
into a sharded dictionary, goes through DCP's full-state-dict loading (`set_model_state_dict` /
`set_optimizer_state_dict` with `full_state_dict=True`, which scatters full tensors into the shards).

The folder is written under a temporary name and renamed by rank 0 once every rank's shards are in,
like every other checkpoint (`checkpoint.py`); a full disk on any rank is the same one-paragraph error
(which checkpoint, about how big, which earlier one is intact) on every rank. DCP's file writer needs a filesystem that all ranks
share (one machine, or a network filesystem across nodes).

A kind split in another order than it stores its latents (`Dictionary.latent_order`: a MOLT) has its
sharded tensors, and so its DCP checkpoints, in the split order, which does not depend on the number of
ranks; the full tensors of an unsharded dictionary are reordered on the way in and out (`_reordered`).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from saecli.dictionaries.sharding import latent_axes, latent_orders, shard_of, to_split_layout
from saecli.training.checkpoint import (
    DCP_DIR,
    STATE_FILE,
    checkpoint_bytes,
    disk_full_error,
    fsync_tree,
    prune,
    step_dir,
)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_sharded_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    is_main: bool,
    keep: int = 2,
) -> Path:
    """Collective: write checkpoint `step` of run folder `root` (every rank its shards); keep `keep`."""
    final = step_dir(Path(root), step)
    tmp = final.parent / f".{final.name}.tmp-dcp"
    if is_main and not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    if final.exists():  # this step is already saved (a signal right after a scheduled checkpoint)
        return final
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        if is_main:
            torch.save(state, tmp / STATE_FILE)
            fsync_tree(tmp)
            tmp.rename(final)
    except BaseException as exc:  # DCP raises the same CheckpointException on every rank
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        needed = checkpoint_bytes({"model": model_sd, "optim": optim_sd}, state)
        for failure in _failures(exc):
            full = disk_full_error(failure, root, final, needed)
            if full is not None:
                raise full from exc
        raise
    if is_main:
        prune(root, keep)
    _barrier()
    return final


def _failures(exc: BaseException) -> list[BaseException]:
    """The exceptions behind a failed DCP call: each rank's for a CheckpointException, else `exc` itself."""
    if isinstance(exc, CheckpointException):
        return [failure for failure, _trace in exc.failures.values()]
    return [exc]


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Fill `model` and `optimizer` (sharded or not, any tp size) from the DCP folder of checkpoint `path`."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # one process without a process group is intended here (resharding to tp 1)
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(sd, checkpoint_id=str(Path(path) / DCP_DIR), no_dist=single)
    if shard_of(model) is None:  # the checkpoint's split order → this dictionary's own
        sd = _reordered(model, sd, inverse=True)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """An unsharded state dict into a (sharded) model: each rank keeps its shards."""
    split = _reordered(model, {"model": dict(weights)})["model"]
    set_model_state_dict(model, split, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """`torch.optim.Optimizer.state_dict()` of an unsharded run (parameters numbered in group order) into
    the optimizer of the sharded model built the same way: renumbered to parameter names, then scattered."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(order):
        raise ValueError(f"the checkpoint's optimizer has {len(saved_ids)} parameters, this dictionary {len(order)}")
    fqn = dict(zip(saved_ids, order, strict=True))
    osd: dict[str, Any] = {
        "state": {fqn[i]: st for i, st in saved["state"].items()},
        "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    osd = _reordered(model, {"optim": osd})["optim"]
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def _reordered(model: nn.Module, sd: dict[str, Any], inverse: bool = False) -> dict[str, Any]:
    """{"model": parameters, "optim": {"state": {name: moments}, ...}} (either optional) of `model` in full
    tensors, from its own latent order to the split one (`inverse`: back)."""
    orders, axes = latent_orders(model), latent_axes(model)
    if not orders:
        return sd
    out = dict(sd)
    if "model" in sd:
        out["model"] = to_split_layout(sd["model"], orders, axes, inverse)
    if "optim" in sd:
        states = sd["optim"]["state"]
        kinds = {k for st in states.values() for k in st}
        moved = {
            k: to_split_layout({n: st[k] for n, st in states.items() if k in st}, orders, axes, inverse) for k in kinds
        }
        out["optim"] = {**sd["optim"], "state": {n: {k: moved[k][n] for k in st} for n, st in states.items()}}
    return out
