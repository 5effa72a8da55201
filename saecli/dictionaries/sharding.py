"""Latent (tensor) parallelism: the operations a kind needs when its latents are split over ranks.

Each rank of the tensor-parallel ("tp") axis of a device mesh holds a contiguous slice of the latents:
rows [offset, offset + d_local) of W_enc, b_enc, W_dec (and every other parameter a kind lists in its
`latent_axes`), as DTensor shards. A kind's sharded loss runs on the local slices (`DTensor.to_local()`,
which keeps autograd to the sharded parameter) and calls the operations below, which are the only
places that communicate:

- `select(...)`: the activation. ReLU/JumpReLU are per latent (no communication). TopK and BatchTopK
  need the *global* top-k: each rank takes its own top-k candidates (values + global indices), ONE
  all-gather over the tp group (values and indices packed in one float64 tensor: indices < 2^53 and
  float32 values are exact there), then every rank computes the exact global top-k of the candidates
  (the global top-k is always among the union of the per-rank top-k's: no approximation) and keeps the
  selected latents that are its own.
- `reduce(partial)`: the decoder's partial sums f_local W_dec,local summed over tp ranks, autograd-aware
  through DTensor: a `Partial()` tensor redistributed to `Replicate()` (forward all-reduce, backward
  identity — the gradient of the replicated loss w.r.t. each rank's partial sum is the gradient w.r.t.
  the sum). `torch.distributed.nn.functional.all_reduce` would all-reduce the gradient as well, which
  multiplies it by the tp size when every rank computes the same loss.
- `auxk(...)`: AuxK's top-k_aux over the dead latents, the same candidates-then-gather pattern.
- `gather_latents(t)`: a per-latent statistic [..., d_local] → [..., d_sae] (firing counts for metrics).

Why DTensor and not FSDP2 (`fully_shard`): FSDP2 shards parameters for *memory* but all-gathers each
parameter before computing with it, so every rank still computes the full [N, d_sae] pre-activations;
the latent dimension of the computation is not split. Splitting it is tensor parallelism, which is
what lm_saes does with DTensor (its docs/distributed-guidelines.md: a DeviceMesh with `data` and `model`
axes, every parameter sharded on `model` along its d_sae dimension). DTensor also gives
torch.distributed.checkpoint the placements it needs to reshard a checkpoint into any world size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, cast, overload

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from saecli.dictionaries import losses as L
from saecli.dictionaries.activations import SparseActivation, gated_pre, jumprelu_gated


@overload
def local(t: torch.Tensor) -> torch.Tensor: ...


@overload
def local(t: None) -> None: ...


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The rank's own part of a (possibly) DTensor parameter, differentiable; plain tensors unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


class Shardable(Protocol):
    """What a kind declares to be split over tensor-parallel ranks: its parameters with a latent dimension
    (dotted names, as in `named_parameters()`) and that dimension's axis, and where its shard is recorded."""

    latent_axes: ClassVar[dict[str, int]]
    latent_shard: LatentShard | None


def latent_axes(module: object) -> dict[str, int]:
    """A kind's `latent_axes` ({} for a kind that cannot be split)."""
    return dict(getattr(module, "latent_axes", None) or {})


def shard_of(module: object) -> LatentShard | None:
    """The shard a dictionary was split into by `tensor_parallel.shard_dictionary`, or None."""
    shard = getattr(module, "latent_shard", None)
    return shard if isinstance(shard, LatentShard) else None


def set_shard(module: object, shard: LatentShard) -> None:
    cast(Shardable, module).latent_shard = shard


def latent_orders(module: object) -> dict[str, torch.Tensor]:
    """A dictionary's `latent_order()` ({} for any other module: split in its own order)."""
    from saecli.dictionaries.base import Dictionary

    return module.latent_order() if isinstance(module, Dictionary) else {}


def to_split_layout(
    state: dict[str, torch.Tensor], orders: dict[str, torch.Tensor], axes: dict[str, int], inverse: bool = False
) -> dict[str, torch.Tensor]:
    """`state` (parameters, or one kind of Adam moment, by parameter name) in the layout that is split over
    ranks (`Dictionary.latent_order`); `inverse`: back to the dictionary's own layout. Other entries unchanged."""
    out = dict(state)
    for name, order in orders.items():
        t = state.get(name)
        if t is None or t.dim() == 0:
            continue
        axis, idx = axes[name], order.to(t.device)
        out[name] = torch.empty_like(t).index_copy_(axis, idx, t) if inverse else t.index_select(axis, idx)
    return out


@dataclass(frozen=True)
class LatentShard:
    """This rank's slice of the latents: `mesh` is the 1-D tp mesh, latents [offset, offset + d_local) of
    each of `blocks` blocks of `d_sae` (a CLT: one block per layer; latent b·d_sae + j is latent j of block
    b, and a rank holds columns [offset, offset + d_local) of every block, stored block-major).

    `order`: for a kind whose latents are split in another order than its own (`Dictionary.latent_order`,
    a MOLT), the dictionary's latent at each position of the split layout; the per-latent tensors the
    trainer sees (`gather_latents`, the dead mask given to `own`) stay in the dictionary's order."""

    mesh: DeviceMesh
    d_sae: int
    blocks: int = 1
    order: torch.Tensor | None = field(default=None, compare=False)

    def per_block(self) -> LatentShard:
        """The same slice seen as one block (for a selection within one block's [rows, d_local])."""
        return LatentShard(self.mesh, self.d_sae)

    @property
    def size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    @property
    def d_local(self) -> int:
        return self.d_sae // self.size

    @property
    def offset(self) -> int:
        return self.rank * self.d_local

    # ------------------------------------------------------------------ communication
    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over tp ranks of each rank's `partial` (decoder partial sums, per-shard penalty sums)."""
        if self.size == 1:
            return partial
        t = DTensor.from_local(partial, self.mesh, [Partial()], run_check=False)
        return t.redistribute(self.mesh, [Replicate()]).to_local()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[n, ...] from every tp rank → [size·n, ...] in rank order (no gradient)."""
        if self.size == 1:
            return t
        return DTensor.from_local(t.contiguous(), self.mesh, [Shard(0)], run_check=False).full_tensor()

    def gather_latents(self, t: torch.Tensor) -> torch.Tensor:
        """A per-latent tensor [..., blocks·d_local] → [..., blocks·d_sae] (the latent axis last)."""
        if self.size == 1:
            return t
        lead = t.shape[:-1]
        parts = self.all_gather(t.reshape(*lead, self.blocks, self.d_local).movedim(-1, 0))  # [d_sae, ..., blocks]
        split = parts.movedim(0, -1).reshape(*lead, self.blocks * self.d_sae)
        if self.order is None:
            return split
        return torch.empty_like(split).index_copy_(-1, self.order.to(split.device), split)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        """The local slice [..., blocks·d_local] of a global per-latent tensor [..., blocks·d_sae]."""
        if self.order is not None:
            t = t.index_select(-1, self.order.to(t.device))
        lead = t.shape[:-1]
        blocked = t.reshape(*lead, self.blocks, self.d_sae)[..., self.offset : self.offset + self.d_local]
        return blocked.reshape(*lead, self.blocks * self.d_local)

    def to_global(self, local_idx: torch.Tensor) -> torch.Tensor:
        """Global latent ids of local ones (block-major on both sides)."""
        return (local_idx // self.d_local) * self.d_sae + self.offset + local_idx % self.d_local

    # ------------------------------------------------------------------ global selections
    def _gather_candidates(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each rank's candidates [rows, c] (values, global indices) → everyone's [rows, size·c], in one
        all-gather of a packed float64 tensor."""
        packed = torch.stack([values.double(), indices.double()], dim=-1)  # [rows, c, 2]
        every = self.all_gather(packed.unsqueeze(0))  # [size, rows, c, 2]
        every = every.permute(1, 0, 2, 3).reshape(packed.shape[0], -1, 2)
        return every[..., 0], every[..., 1].long()

    def topk_rows(self, keys: torch.Tensor, k: int, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact per-row global top-k of `keys` [N, blocks·d_local] (this rank's columns of [N, blocks·d_sae]):
        (selected values [N, k], global indices [N, k]), identical on every tp rank; `ordered`: largest first."""
        v, i = torch.topk(keys, min(k, keys.shape[-1]), dim=-1, sorted=False)
        return self.topk_rows_from(v, self.to_global(i), k, ordered)

    def mine(self, global_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(is this rank's, local index — clamped into range where not) for global latent indices."""
        block, j = global_idx // self.d_sae, global_idx % self.d_sae
        ok = (global_idx >= 0) & (j >= self.offset) & (j < self.offset + self.d_local)
        return ok, block.clamp_min(0) * self.d_local + (j - self.offset).clamp(0, self.d_local - 1)

    def topk_mask(self, keys: torch.Tensor, k: int, row_k: torch.Tensor | None = None) -> torch.Tensor:
        """[N, d_local] bool: the latents of this rank among each row's global top-k (top `row_k[r]` of
        row r when given, all ≤ k: one all-gather for rows that keep different numbers)."""
        _, gidx = self.topk_rows(keys, k, ordered=row_k is not None)
        ok, lidx = self.mine(gidx)
        if row_k is not None:
            ok = ok & (torch.arange(gidx.shape[-1], device=gidx.device) < row_k.unsqueeze(-1))
        return self.scatter_mask(ok, lidx, keys.shape[-1])

    def batch_topk_mask(self, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchTopK's k·N largest of relu(keys) over the whole [N, d_sae] batch: (this rank's [N, d_local]
        kept mask, the smallest kept positive value — NaN if none — identical on every rank)."""
        n, d_local = keys.shape
        flat = torch.relu(keys).reshape(-1)
        n_keep = min(k * n, n * self.d_sae)
        v, i = torch.topk(flat, min(n_keep, flat.numel()), sorted=False)
        global_flat = (i // d_local) * self.d_sae + (i % d_local) + self.offset  # row·d_sae + global column
        v_all, g_all = self._gather_candidates(v.unsqueeze(0), global_flat.unsqueeze(0))
        top_v, j = torch.topk(v_all[0], n_keep, sorted=False)
        g = g_all[0][j]
        rows, cols = g // self.d_sae, g % self.d_sae
        ok, lcol = self.mine(cols)
        ok = ok & (top_v > 0)
        keep = torch.zeros(n * d_local, dtype=torch.bool, device=keys.device)
        keep[(rows * d_local + lcol)[ok]] = True
        positive = top_v[top_v > 0]
        smallest = positive.min().float() if positive.numel() else torch.full((), float("nan"), device=keys.device)
        return keep.view(n, d_local), smallest

    # ------------------------------------------------------------------ the activation
    def select(
        self, activation: SparseActivation, h: torch.Tensor, gate: torch.Tensor | None, k: int | None, training: bool
    ) -> torch.Tensor:
        """`activation(h, gate, k, training)` on this rank's columns h [N, d_local] with the global
        selection; `gate` [d_local] (detached decoder norms) or None. Same values as the unsharded
        activation at this rank's latents."""
        name = activation.name
        if name == "relu":
            return torch.relu(h)
        if name == "jumprelu":
            return jumprelu_gated(h, local(activation.theta_parameter()).exp(), activation.bandwidth, gate)
        keys = gated_pre(h, gate).detach()
        if name == "topk":
            assert k is not None, "topk needs k"
            keep = self.topk_mask(keys, int(k))
        elif training:
            assert k is not None, "batchtopk needs k"
            keep, smallest = self.batch_topk_mask(keys, int(k))
            activation.update_threshold(smallest)
        else:
            keep = keys > activation.theta().to(keys.dtype)
            return torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device))
        return torch.where(keep, torch.relu(h), torch.zeros((), dtype=h.dtype, device=h.device))

    # ------------------------------------------------------------------ AuxK
    def auxk_select(
        self, h: torch.Tensor, dead_mask: torch.Tensor, k_aux: int, gate: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per row the global top-min(k_aux, #dead) DEAD latents by (gated) pre-activation `h` [N,
        blocks·d_local] (this rank's columns), as (is this rank's, local index) [N, k]; None when none is
        dead. `dead_mask` is the GLOBAL [blocks·d_sae] mask; ranks hold different numbers of dead latents,
        so each pads its candidates to k with -inf (never selected) before the one all-gather."""
        dead = dead_mask.to(device=h.device, dtype=torch.bool)
        n_dead = int(dead.sum())
        if n_dead == 0 or k_aux <= 0:
            return None
        k = min(int(k_aux), n_dead)
        dead_idx = torch.nonzero(self.own(dead), as_tuple=True)[0]  # local indices of local dead latents
        sub = h.detach().index_select(-1, dead_idx)
        keys = sub if gate is None else gated_pre(sub, gate.detach()[dead_idx])
        v, j = torch.topk(keys, min(k, dead_idx.numel()), dim=-1, sorted=False)
        pad = k - v.shape[-1]
        v = torch.cat([v, v.new_full((v.shape[0], pad), float("-inf"))], -1)
        gidx = torch.cat([self.to_global(dead_idx[j]), j.new_full((j.shape[0], pad), -1)], -1)
        _, g = self.topk_rows_from(v, gidx, k)
        return self.mine(g)

    def auxk(
        self,
        h: torch.Tensor,
        dead_mask: torch.Tensor,
        k_aux: int,
        residual: torch.Tensor,
        decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        gate: torch.Tensor | None,
    ) -> torch.Tensor:
        """`losses.auxk_loss` with the dead latents spread over ranks: `auxk_select` on `h` (with grad),
        the chosen latents' ReLU'd pre-activations decoded by `decode(values, local ids)` [N, k] → [N, d]
        (this rank's part of the decoder, no bias; e.g. `losses.gather_decode(w_dec_local)`), summed over
        ranks, against the residual."""
        chosen = self.auxk_select(h, dead_mask, k_aux, gate)
        if chosen is None:
            return h.new_zeros((), dtype=torch.float32)
        ok, lidx = chosen
        acts = torch.relu(torch.gather(h, -1, lidx)) * ok.to(h.dtype)
        return L.normalized_residual_loss(self.reduce(decode(acts, lidx)), residual.detach())

    def scatter_mask(self, ok: torch.Tensor, lidx: torch.Tensor, n_cols: int) -> torch.Tensor:
        """[N, n_cols] bool: True at (row, lidx) where ok (clamped foreign indices add nothing)."""
        hits = torch.zeros(ok.shape[0], n_cols, dtype=torch.int32, device=ok.device)
        return hits.scatter_add_(-1, lidx, ok.to(torch.int32)) > 0

    def topk_rows_from(
        self, values: torch.Tensor, gidx: torch.Tensor, k: int, ordered: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global top-k of candidates already chosen per rank: (values, global indices) [N, k]."""
        v_all, i_all = self._gather_candidates(values, gidx)
        top_v, j = torch.topk(v_all, min(k, v_all.shape[-1]), dim=-1, sorted=ordered)
        return top_v, i_all.gather(-1, j)
