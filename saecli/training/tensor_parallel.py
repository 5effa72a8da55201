"""Tensor-parallel training: a dictionary's latents split over the "tp" axis of a 2-D ("dp", "tp") mesh.

    mesh = make_mesh(tp=2)                          # world 2: dp=1 × tp=2; world 4: dp=2 × tp=2
    shard_dictionary(dictionary, mesh)              # latent parameters → DTensor shards
    member = ShardedMember(dictionary, cfg, mesh=mesh, total_steps=..., batch_tokens=...)

Engine: torch's DTensor/DeviceMesh (see `dictionaries/sharding.py` for why not FSDP2). Every parameter
is a DTensor on the 2-D mesh: the ones a kind lists in `latent_axes` are `Shard(axis)` on "tp", the rest
`Replicate()`; all are `Replicate()` on "dp". Adam's moments are created like their parameters, so they
are sharded the same way (each rank holds 1/tp of the parameter + optimizer bytes of the latent tensors).
Data parallelism on "dp" is today's: every tp group reads its own documents (stream rank = dp rank) and
gradients are averaged over "dp" with one flat all-reduce (`TensorParallelSync`); tp ranks of one dp
group read the same batch.

Checkpoints are torch.distributed.checkpoint folders (`training/dcp.py`), which reshard on load into
any tp size (or into an unsharded dictionary); the final weights are gathered unsharded (`unshard`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries.base import Dictionary
from saecli.dictionaries.sharding import (
    LatentShard,
    latent_axes,
    latent_orders,
    local,
    set_shard,
    shard_of,
    to_split_layout,
)
from saecli.errors import ConfigError
from saecli.training.member import Member
from saecli.training.stats import firing_counts

KEY = "trainer.tensor_parallel"


def covered_kinds() -> list[str]:
    """The kinds that can be split over ranks: those whose class declares `latent_axes` (the registry's order)."""
    from saecli.dictionaries.kinds import KIND_MODULES
    from saecli.dictionaries.registry import dictionary_class

    return [k for k in KIND_MODULES if latent_axes(dictionary_class(k))]


def check_tensor_parallel(kind: str, latent_axes: dict[str, int] | None, d_sae: int, tp: int, world_size: int) -> None:
    """ConfigError (naming `trainer.tensor_parallel`) for a split that cannot work; before any work."""
    if tp < 1:
        raise ConfigError(f"{KEY} must be >= 1, got {tp}", key=KEY)
    if tp == 1:
        return
    if not latent_axes:
        raise ConfigError(
            f"{KEY} = {tp}: kind {kind!r} cannot be split over ranks (tensor parallelism covers "
            f"the kinds {', '.join(covered_kinds())}); set it to 1",
            key=KEY,
        )
    if world_size % tp:
        raise ConfigError(
            f"{KEY} = {tp} does not divide the {world_size} processes (data parallel × tensor "
            "parallel must equal the world size)",
            key=KEY,
        )
    if d_sae % tp:
        raise ConfigError(
            f"{KEY} = {tp} does not divide d_sae = {d_sae}: every rank holds d_sae / {tp} latents", key=KEY
        )


def check_run(kind: str, d_sae: int | None, tp: int, dictionary_cfg: DictionaryConfig | None = None) -> None:
    """`check_tensor_parallel` at the start of a run (this process group's size; d_sae when already known;
    the kind's own `check_split` of its config when given)."""
    from saecli.dictionaries.registry import dictionary_class

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if 1 < tp and world < tp:
        raise ConfigError(
            f"{KEY} = {tp} needs at least {tp} processes, this run has {world} (launch it with "
            f"`accelerate launch --num_processes {tp} -m saecli ...` or torchrun)",
            key=KEY,
        )
    cls = dictionary_class(kind)
    axes = latent_axes(cls)
    check_tensor_parallel(kind, axes, d_sae if d_sae is not None else tp, tp, world)
    if dictionary_cfg is not None:
        cls.check_split(dictionary_cfg, tp)


def run_sync(tp: int, base: Any, device_type: str = "cpu") -> Any:
    """A run's `Sync`: `base` (data parallel over every process) when tp = 1, else a `TensorParallelSync`
    on a new ("dp", "tp") mesh over the same processes."""
    return base if tp == 1 else TensorParallelSync(make_mesh(tp, device_type))


def new_member(dictionary: Dictionary, cfg: Any, *, sync: Any, **kwargs: Any) -> Member:
    """A fresh member: sharded over the mesh when `sync` is a `TensorParallelSync`, else an ordinary one."""
    if isinstance(sync, TensorParallelSync):
        return ShardedMember(shard_dictionary(dictionary, sync.mesh), cfg, mesh=sync.mesh, sync=sync, **kwargs)
    return Member(dictionary, cfg, sync=sync, **kwargs)


def resumed_member(
    dictionary: Dictionary, cfg: Any, checkpoint: Path, *, sync: Any, **kwargs: Any
) -> tuple[Member, dict]:
    """A member restored from `checkpoint` (ordinary or DCP, resharded to this run's mesh either way)."""
    if isinstance(sync, TensorParallelSync):
        return ShardedMember.from_checkpoint(
            shard_dictionary(dictionary, sync.mesh), cfg, checkpoint, mesh=sync.mesh, sync=sync, **kwargs
        )
    return Member.from_checkpoint(dictionary, cfg, checkpoint, sync=sync, **kwargs)


def to_save(dictionary: Dictionary) -> Dictionary | None:
    """The dictionary a run saves: itself, or gathered unsharded on rank 0 (None on the other ranks).
    Collective for a sharded dictionary: every rank calls."""
    if shard_of(dictionary) is None:
        return dictionary
    return unshard(dictionary)


def make_mesh(tp: int, device_type: str = "cpu") -> DeviceMesh:
    """The ("dp", "tp") mesh over the initialised process group: dp = world // tp."""
    world = dist.get_world_size()
    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def shard_dictionary(dictionary: Dictionary, mesh: DeviceMesh) -> Dictionary:
    """Turn every parameter into a DTensor on `mesh` (latent ones sharded on "tp", in the kind's
    `latent_order`), in place; rank 0's values are the source (distribute_tensor scatters them), and its
    buffers (scales, thresholds) are broadcast, so ranks need not have initialised identically. Returns
    the dictionary."""
    axes = latent_axes(dictionary)
    params = dict(dictionary.named_parameters())
    # latents per block: the latent axis of the first latent parameter (d_sae; a CLT's per-layer d_sae)
    first = next((n for n in axes if n in params), None)
    width = params[first].shape[axes[first]] if first is not None else dictionary.d_sae
    check_tensor_parallel(dictionary.kind, axes, width, mesh["tp"].size(), mesh.size())
    type(dictionary).check_split(dictionary.cfg, mesh["tp"].size())
    orders = latent_orders(dictionary)
    split = to_split_layout({n: p.detach() for n, p in params.items()}, orders, axes)

    # (distribute_module would turn the buffers into DTensors too; they stay plain, replicated tensors)
    for prefix, module in dictionary.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            full_name = f"{prefix}.{name}" if prefix else name
            axis = axes.get(full_name)
            placements = [Replicate(), Shard(axis) if axis is not None else Replicate()]
            sharded = distribute_tensor(split[full_name], mesh, placements)
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=p.requires_grad))
    for buf in dictionary.buffers():
        dist.broadcast(buf, src=0)
    order = orders.get(first) if first is not None else None
    shard = LatentShard(mesh["tp"], width, blocks=dictionary.d_sae // width, order=order)
    for module in dictionary.modules():  # the dictionary, and a core it delegates to (a crosscoder's SAE)
        if latent_axes(module):
            set_shard(module, shard)
    return dictionary


def unshard(dictionary: Dictionary) -> Dictionary | None:
    """The whole dictionary as an ordinary one, on rank 0 (None elsewhere). Collective: every rank calls.

    The state is gathered with DCP's full-state-dict option (offloaded to CPU, kept on rank 0 only), then
    put back in the dictionary's own order (`latent_order`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from saecli.dictionaries.registry import dictionary_class

    full = get_model_state_dict(dictionary, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    cls = dictionary_class(dictionary.kind)
    plain = cls.from_saved(dictionary.cfg, dictionary.config_dict())  # type: ignore[attr-defined]  # every kind has it
    tensors = cast(dict[str, torch.Tensor], full)  # a model's state dict: tensors only
    plain.load_state_dict(to_split_layout(tensors, latent_orders(dictionary), latent_axes(dictionary), inverse=True))
    plain.folded = dictionary.folded
    return plain


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for `tensors` (a DTensor counts its local shard only)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """This rank's parameter + optimizer-state bytes (what tensor parallelism divides)."""
    opt = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return local_bytes(model.parameters()) + local_bytes(opt)


class TensorParallelSync:
    """The `Sync` of a ("dp", "tp") mesh: data-parallel collectives over "dp", decisions over everyone.

    `rank`/`world_size` are the data-parallel ones (which documents this rank reads, tokens per step);
    `is_main` is global rank 0 (the one writer)."""

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh
        dp = mesh["dp"]
        self._dp = dp.get_group()
        self.rank = dp.get_local_rank()
        self.world_size = dp.size()
        self.tp = mesh["tp"].size()

    @property
    def is_main(self) -> bool:
        return dist.get_rank() == 0

    def all_reduce_grads(self, params: Iterable[nn.Parameter]) -> None:
        grads = [local(p.grad) for p in params if p.grad is not None]
        if self.world_size == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self._dp)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self._dp)
        return tensor

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(flags)
        return flags

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._dp)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


class ShardedMember(Member):
    """A `Member` whose dictionary is sharded by `shard_dictionary`: firing counts are gathered over tp
    (statistics and the AuxK dead mask stay global and identical on every rank), checkpoints are DCP."""

    def __init__(self, dictionary: Dictionary, cfg: Any, *, mesh: DeviceMesh, **kwargs: Any):
        shard = shard_of(dictionary)
        if shard is None:
            raise ValueError("shard_dictionary(dictionary, mesh) first")
        self.mesh, self.shard = mesh, shard
        kwargs.setdefault("sync", TensorParallelSync(mesh))
        super().__init__(dictionary, cfg, **kwargs)

    def latent_counts(self, feature_acts: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.shard.gather_latents(firing_counts(feature_acts, mask))

    def save_checkpoint(self, shared: dict[str, Any]) -> Path | None:
        """Collective: every rank writes its shards, rank 0 the member state."""
        if self.folder is None:
            return None
        from saecli.training.dcp import save_sharded_checkpoint

        state = {"member": self.state_dict(), **shared}
        return save_sharded_checkpoint(
            self.folder, self.step, self.dictionary, self.optimizer, state, is_main=self.sync.is_main
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("optimizer")  # in the DCP folder, sharded
        return state

    # an ordinary (unsharded) checkpoint resumed with tensor parallelism: full tensors scattered to shards
    @staticmethod
    def load_weights(dictionary: Dictionary, weights: dict[str, torch.Tensor]) -> None:
        from saecli.training.dcp import load_full_weights

        load_full_weights(dictionary, weights)

    def load_optimizer(self, saved: dict[str, Any]) -> None:
        from saecli.training.dcp import load_full_optimizer

        load_full_optimizer(self.dictionary, self.optimizer, saved)
