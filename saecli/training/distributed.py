"""The few collective operations the training loop needs, so one loop serves 1 process or N.

`LocalSync` is the single-process case (every call is a no-op). `TorchSync` uses an initialised
`torch.distributed` process group (what `accelerate launch` or torchrun set up; gloo on CPU, nccl on
GPU): gradients are averaged over ranks, firing statistics summed, and rank 0 gathers every rank's
stream position for the checkpoint it alone writes.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable
from typing import Any, Protocol

import torch


class Sync(Protocol):
    rank: int
    world_size: int

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None: ...

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor: ...

    def gather_objects(self, obj: Any) -> list[Any]: ...

    def broadcast_object(self, obj: Any) -> Any: ...

    def barrier(self) -> None: ...

    @property
    def is_main(self) -> bool: ...


class LocalSync:
    """One process: nothing to synchronise."""

    rank = 0
    world_size = 1
    is_main = True

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        return None

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        return flags

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        return None


class TorchSync:
    """Data parallel over an initialised torch.distributed process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchSync needs an initialised torch.distributed process group")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        # one flat buffer: one collective per step instead of one per parameter
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor)
        return tensor

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        """Summed over every process (decisions all ranks must take together)."""
        return self.all_reduce_sum_(flags)

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier()


def default_sync() -> Sync:
    """TorchSync when this process is one of several ranks, else LocalSync.

    Launched by torchrun or `accelerate launch` (WORLD_SIZE > 1 in the environment) without a process
    group yet, one is started: nccl when CUDA is available, else gloo.
    """
    import os

    import torch.distributed as dist

    if not dist.is_available():
        return LocalSync()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(shutdown, graceful=False)
    if dist.is_initialized() and dist.get_world_size() > 1:
        return TorchSync()
    return LocalSync()


def shutdown(graceful: bool = True) -> None:
    """Close the process group that `default_sync` started, if any.

    A rank that exits while a peer still holds its gloo connections can make that peer abort at exit
    ("terminate called without an active exception", exit -6) after a run that succeeded. `graceful`
    (the end of a successful command): wait for every rank, then destroy the group. Not graceful (the
    atexit fallback, e.g. after an error): destroy only, since a barrier would hang on a failed peer.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if graceful:
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # best effort: never turn a finished run into a failure at exit
        pass
