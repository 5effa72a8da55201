"""Mixture of linear transforms (kind = "molt"; Lindsey et al. 2025, "Sparse mixtures of linear
transforms", Transformer Circuits). Replaces an MLP: reads `hook_point_in` (its input, mlp_in) and
reconstructs `hook_point_out` (its output, mlp_out) with n = Σ rank_counts low-rank transforms:

    f = φ(x W_Eᵀ + b_E)                   a sparse gate over the n transforms (TopK / BatchTopK / JumpReLU / ReLU)
    ŷ = Σ_i f_i U_i (V_i x) + b_D         U_i [d, r_i], V_i [r_i, d]

Storage: the transforms' factors are stacked into two matrices V [R, d] and U [R, d], R = Σ_i r_i
(transform i owns rows row_start[i] … row_start[i]+r_i−1; transforms ordered by rank): row a of
transform i's block of V is V_i's row a, of U it is U_i's column a. Then, with `owner[j]` the
transform of row j,

    ŷ = ((x Vᵀ) ⊙ f[:, owner]) U + b_D

two matmuls for all transforms at once (no loop over transforms or ranks). That is the "dense" path:
2·N·R·d FLOP per matmul. The "sparse" path computes x·V_j only for the rows of ACTIVE transforms
(a sampled matmul over the [N, R] pattern of those rows, then a sparse decode): 2·d FLOP per
(token, active row), i.e. Σ_active r_i instead of R per token. It is used when that fraction of R is
at most `SPARSE_MAX_DENSITY` (sparse CSR products cost several dense FLOPs each on a CPU),
`sparse_kernels` is on and the gate is not JumpReLU (whose threshold gradient needs ∂L/∂f_i at shut gates
too); both paths give the same values and gradients (tested).

Sparsity (as in the paper): the gate and every penalty are weighted by each transform's size
‖U_i V_i‖_F (`sparsity_include_decoder_norm`), computed without forming the d×d products:
‖U V‖_F² = Σ_ab (UᵀU)_ab (V Vᵀ)_ab with the r×r Gram matrices, one batched product per distinct rank.

Tensor parallelism (`trainer.tensor_parallel`, `molt_sharded.py`): the transforms are split over the
ranks whole — gate rows (W_E, b_E, JumpReLU thresholds) and exactly their rows of V and U. Each rank gets
count/tp transforms of every rank group (so R/tp rows), which needs tp to divide every count. The split
order (`latent_order`) deals the transforms in u = gcd(counts) units, unit j holding the j-th count/u
transforms of every group, one group after the other: a contiguous split of that order into tp parts
(tp divides u) gives each rank u/tp whole units, and the order is the same for every tp, so sharded
checkpoints reshard to any tp. A rank's slice is `Layout(groups with count/u each, units u/tp)`.

Decoding needs the input too (ŷ depends on x): `decode_hooks(f, inputs)` with the normalised inputs f came
from, or the raw-tensor `decode(f, x)` (equal to `molt(x)`); without it either is a UsageError.

Folding keeps the gate (f) as trained: W_E ← W_E·s_in, V ← V·s_in, U ← U/s_out, b_D ← b_D/s_out, so
‖U_i V_i‖ becomes ·s_in/s_out and gated thresholds θ ← θ·s_in/s_out (ungated ones are unchanged).

Direction of a transform (DLA, `decoder_directions`): a transform has no single output direction, but its
column space does: we use σ₁·u₁, the top left singular vector of U_i V_i scaled by its singular value —
the output direction the transform can write most strongly. Its sign is arbitrary (the output flips with
the input); it is fixed so that the largest-magnitude entry is positive, so read both ends in DLA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Any, ClassVar

import torch
from torch import nn

from saecli.config.base import to_dict
from saecli.config.dictionary import DictionaryConfig
from saecli.config.init import InitConfig
from saecli.dictionaries import kernels
from saecli.dictionaries import losses as L
from saecli.dictionaries.activations import SparseActivation
from saecli.dictionaries.base import Dictionary, LossOutput, StepContext, own_config
from saecli.dictionaries.helpers import fold_threshold, io_hooks, latent_terms
from saecli.dictionaries.molt_config import MOLTConfig
from saecli.dictionaries.sharding import LatentShard, local
from saecli.dtypes import DTYPES
from saecli.errors import ConfigError, UsageError

# the sparse path runs when the active transforms own at most this fraction of the R factor rows
# (benchmarks/bench_molt_paths.py, d 576, 2 CPU threads: sparse/dense 2.1× at 2 %, 1.9× at 6 %, 0.7× at 14 %)
SPARSE_MAX_DENSITY = 0.10


@dataclass(frozen=True)
class Layout:
    """Where transforms sit in stacked factors V/U: `units` repeats of `groups` [(rank, count)], each group's
    transforms one after the other (a whole MOLT: one unit; a tensor-parallel rank's slice: its units of
    the split order). `rank_of` [n]: each transform's rank, `row_start` [n]: its first row, `owner` [rows]:
    each row's transform (local indices)."""

    groups: tuple[tuple[int, int], ...]
    units: int
    rank_of: torch.Tensor
    row_start: torch.Tensor
    owner: torch.Tensor

    @classmethod
    def of(cls, groups: list[tuple[int, int]], units: int = 1) -> Layout:
        rank_of = torch.cat([torch.full((c,), r, dtype=torch.long) for r, c in groups]).repeat(units)
        owner = torch.repeat_interleave(torch.arange(rank_of.numel()), rank_of)
        return cls(tuple(groups), units, rank_of, torch.cumsum(rank_of, 0) - rank_of, owner)

    @property
    def total_rank(self) -> int:
        return int(self.owner.numel())

    def to(self, device: torch.device) -> Layout:
        if self.owner.device == device:
            return self
        return Layout(
            self.groups, self.units, self.rank_of.to(device), self.row_start.to(device), self.owner.to(device)
        )

    def blocks(self, w: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Per group: (rank r, view [units, count, r, d]) of a stacked factor matrix (V or U)."""
        per_unit = w.view(self.units, -1, w.shape[-1])
        out, start = [], 0
        for r, c in self.groups:
            out.append((r, per_unit[:, start : start + r * c].unflatten(1, (c, r))))
            start += r * c
        return out


class MixtureOfLinearTransforms(Dictionary):
    kind = "molt"
    # tensor parallelism: these split over ranks along their transform (V, U: row) axis, in `latent_order`
    latent_axes: ClassVar[dict[str, int]] = {"W_E": 0, "b_E": 0, "V": 0, "U": 0, "activation.log_threshold": 0}
    latent_shard: LatentShard | None = None  # set by tensor_parallel.shard_dictionary

    cfg: MOLTConfig
    rank_of: torch.Tensor  # buffers: each transform's rank, its first row in U/V, each row's transform
    row_start: torch.Tensor
    owner: torch.Tensor

    def __init__(self, cfg: MOLTConfig, d_model: int, in_hook: str, out_hook: str):
        super().__init__(cfg, d_model, [in_hook], [out_hook])
        self.in_hook, self.out_hook = in_hook, out_hook
        self.groups: list[tuple[int, int]] = cfg.ranks()  # [(rank, count)] by rank
        whole = Layout.of(self.groups)
        self.d_sae = int(whole.rank_of.numel())
        self.total_rank = whole.total_rank
        self.register_buffer("rank_of", whole.rank_of, persistent=False)
        self.register_buffer("row_start", whole.row_start, persistent=False)
        self.register_buffer("owner", whole.owner, persistent=False)
        self._local_layout: tuple[LatentShard, Layout] | None = None
        dtype = DTYPES[cfg.dtype]
        n, d, r = self.d_sae, d_model, self.total_rank
        self.W_E = nn.Parameter(torch.empty(n, d, dtype=dtype))
        self.b_E = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.V = nn.Parameter(torch.empty(r, d, dtype=dtype))
        self.U = nn.Parameter(torch.empty(r, d, dtype=dtype))
        if cfg.use_decoder_bias:
            self.b_D = nn.Parameter(torch.zeros(d, dtype=dtype))
        else:
            self.register_parameter("b_D", None)
        self.activation = SparseActivation(
            cfg.activation,
            n,
            jumprelu_threshold_init=cfg.jumprelu_threshold_init,
            bandwidth=cfg.jumprelu_bandwidth,
            batchtopk_threshold_decay=cfg.batchtopk_threshold_decay,
        )
        self.last_path = ""
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DictionaryConfig, d_model: int, hook_points: list[str]) -> MixtureOfLinearTransforms:
        cfg = own_config(cfg, MOLTConfig)
        return cls(cfg, d_model, *io_hooks(cfg.hook_point_in, cfg.hook_point_out, hook_points, "MOLT"))

    @classmethod
    def from_saved(cls, cfg: DictionaryConfig, meta: dict[str, Any]) -> MixtureOfLinearTransforms:
        return cls(own_config(cfg, MOLTConfig), int(meta["d_model"]), meta["in_hooks"][0], meta["out_hooks"][0])

    def config_dict(self) -> dict:
        out = super().config_dict()
        out["cfg"] = to_dict(self.cfg)  # rank_counts keys as strings, as in TOML
        return out

    def layout(self) -> Layout:
        """The layout of the factors this process holds: the whole MOLT, or its tensor-parallel slice."""
        shard = self.latent_shard
        if shard is None:
            return Layout(tuple(self.groups), 1, self.rank_of, self.row_start, self.owner)
        if self._local_layout is None or self._local_layout[0] is not shard:
            units = _units(self.groups)
            local_layout = Layout.of([(r, c // units) for r, c in self.groups], units // shard.size)
            self._local_layout = (shard, local_layout.to(self.rank_of.device))
        return self._local_layout[1]

    # ------------------------------------------------------------------ tensor parallelism
    def latent_order(self) -> dict[str, torch.Tensor]:
        """The split order (module docstring): the transforms unit by unit, and their rows of V and U."""
        units = _units(self.groups)
        starts = torch.cumsum(torch.tensor([0] + [c for _, c in self.groups]), 0)
        order = torch.cat(
            [
                torch.arange(int(g0) + j * (c // units), int(g0) + (j + 1) * (c // units))
                for j in range(units)
                for g0, (_, c) in zip(starts, self.groups)
            ]
        )
        ranks = self.rank_of.cpu()[order]
        first = torch.repeat_interleave(torch.cumsum(ranks, 0) - ranks, ranks)
        rows = torch.repeat_interleave(self.row_start.cpu()[order], ranks) + torch.arange(self.total_rank) - first
        return {"W_E": order, "b_E": order, "V": rows, "U": rows, "activation.log_threshold": order}

    @classmethod
    def check_split(cls, cfg: DictionaryConfig, tp: int) -> None:
        counts = own_config(cfg, MOLTConfig).ranks()
        if tp > 1 and any(c % tp for _, c in counts):
            raise ConfigError(
                f"trainer.tensor_parallel = {tp} must divide every count of dictionary.rank_counts "
                f"({', '.join(f'{r}: {c}' for r, c in counts)}): each rank holds count / {tp} transforms "
                "of every rank",
                key="dictionary.rank_counts",
            )

    @torch.no_grad()
    def reset_parameters(self, init_cfg: InitConfig | None = None) -> None:
        """Data-independent init (global RNG): W_E ~ U(±1/√d); V ~ N(0, 1/d) (so V_i x is O(1) for
        ‖x‖ ≈ √d); U ~ U(±decoder_uniform_bound, default 1/√n), then ‖U_i V_i‖_F set to `decoder_init_norm`
        (1 with decoder_unit_norm) when given; biases zero. (No encoder-decoder tie: the gate and the
        transforms live in different spaces.)"""
        from saecli.config.init import InitConfig

        cfg = init_cfg or InitConfig()
        n, d = self.d_sae, self.d_model
        self.W_E.copy_((torch.rand(n, d) * 2 - 1) / math.sqrt(d))
        self.V.copy_(torch.randn(self.V.shape) / math.sqrt(d))
        bound = cfg.decoder_uniform_bound if cfg.decoder_uniform_bound is not None else 1.0 / math.sqrt(n)
        self.U.copy_((torch.rand(self.U.shape) * 2 - 1) * bound)
        target = 1.0 if self.cfg.decoder_unit_norm else cfg.decoder_init_norm
        if target is not None:
            self.set_transform_norms(target)
        for b in (self.b_E, self.b_D):
            if b is not None:
                b.zero_()

    # ------------------------------------------------------------------ pieces of the math
    def transform_norms(self) -> torch.Tensor:
        """[n] ‖U_i V_i‖_F in float32 (differentiable), from r×r Gram matrices: one batched product per rank."""
        lay, out = self.layout(), []
        for (_, u), (_, v) in zip(lay.blocks(local(self.U).float()), lay.blocks(local(self.V).float())):
            gram_u = u @ u.transpose(-1, -2)  # [units, c, r, r]: (U_iᵀU_i)_ab = u_a·u_b
            gram_v = v @ v.transpose(-1, -2)  # (V_i V_iᵀ)_ab = v_a·v_b
            out.append((gram_u * gram_v).sum((-2, -1)))
        return torch.cat(out, dim=1).reshape(-1).clamp_min(1e-24).sqrt()

    @torch.no_grad()
    def set_transform_norms(self, norm: float | torch.Tensor) -> None:
        """Rescale each U_i so that ‖U_i V_i‖_F = norm (a number or [n]; a tensor-parallel rank: its own)."""
        u = local(self.U)
        factor = torch.as_tensor(norm, dtype=torch.float32, device=u.device) / self.transform_norms()
        u.mul_(factor[self.layout().owner].unsqueeze(1).to(u.dtype))

    @property
    def gated(self) -> bool:
        return bool(self.cfg.sparsity_include_decoder_norm) and self.cfg.activation != "relu"

    def decoder_norms(self) -> torch.Tensor:
        """[n] ‖U_i V_i‖_F: how strongly each transform can write (weights the gate and penalties)."""
        return self.transform_norms()

    def _gate(self) -> torch.Tensor | None:
        return self.transform_norms().detach() if self.gated else None

    def _k(self, ctx: StepContext | None) -> int:
        return int(ctx.k) if ctx is not None and ctx.k is not None else int(self.cfg.k)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Gate pre-activations x W_Eᵀ + b_E, [N, n]."""
        return torch.nn.functional.linear(x.to(self.W_E.dtype), self.W_E, self.b_E)

    def apply_transforms(self, f: torch.Tensor, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """Σ_i f_i U_i V_i x (no bias) for gates f [N, n] and inputs x [N, d]; `path` "dense" | "sparse" |
        None (choose by the density of the active rows). A tensor-parallel rank: its transforms' part."""
        v, u, lay = local(self.V), local(self.U), self.layout()
        x = x.to(v.dtype)
        path = path or self._choose_path(f, lay)
        self.last_path = path
        if path == "dense":
            vx = x @ v.t()  # [N, R]
            return (vx * f.to(vx.dtype).index_select(1, lay.owner)) @ u
        return self._apply_sparse(f, x, v, u, lay)

    def _choose_path(self, f: torch.Tensor, lay: Layout) -> str:
        # JumpReLU's threshold gradient needs ∂L/∂f at gates that stayed shut, which only the dense path has
        if not self.cfg.sparse_kernels or f.shape[0] == 0 or self.activation.name == "jumprelu":
            return "dense"
        with torch.no_grad():
            active_rows = float(((f != 0).to(torch.float32) @ lay.rank_of.to(torch.float32)).sum())
        return "sparse" if active_rows <= SPARSE_MAX_DENSITY * f.shape[0] * lay.total_rank else "dense"

    def _apply_sparse(
        self, f: torch.Tensor, x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, lay: Layout
    ) -> torch.Tensor:
        """The active-rows path: pattern over [N, R] of the rows of each token's active transforms."""
        n_tok = x.shape[0]
        with torch.no_grad():
            rows, cols = torch.nonzero(f.detach(), as_tuple=True)  # active (token, transform), row-major
            ranks = lay.rank_of[cols]
            nnz = int(ranks.sum())
            pair = torch.repeat_interleave(torch.arange(rows.numel(), device=x.device), ranks, output_size=nnz)
            first = torch.repeat_interleave(torch.cumsum(ranks, 0) - ranks, ranks, output_size=nnz)
            col = lay.row_start[cols][pair] + (torch.arange(nnz, device=x.device) - first)
            counts = torch.bincount(rows, weights=ranks.to(torch.float64), minlength=n_tok).long()
            itype = torch.int32 if nnz < 2**31 - 1 else torch.int64
            crow = torch.zeros(n_tok + 1, dtype=itype, device=x.device)
            torch.cumsum(counts, 0, out=crow[1:])
            pattern = kernels.SparsePattern(crow, col.to(itype), n_tok, lay.total_rank)
            cd = kernels._compute_dtype(v)
            vals = torch.sparse.sampled_addmm(
                pattern.csr(torch.zeros(nnz, dtype=cd, device=x.device)),
                x.detach().to(cd),
                v.detach().to(cd).t(),
                beta=0.0,
            ).values()
        vx = kernels.gather_pre(x, v, None, vals, pattern)  # x·V_j at the active rows, sparse backward
        w = vx * f[rows, cols].to(vx.dtype)[pair]
        return kernels.sparse_decode(w, pattern, u).to(u.dtype)

    # ------------------------------------------------------------------ interface
    def encode(self, inputs: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        """Normalised inputs [..., d] → gates f [..., n]."""
        x = inputs[self.in_hook]
        training = bool(ctx.training) if ctx is not None else False
        return self.activation(self.pre_acts(x), self._gate(), k=self._k(ctx), training=training)

    def decode_hooks(
        self, feature_acts: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Gates f [..., n] + the normalised inputs {in_hook: x [..., d]} f came from → ŷ."""
        if feature_acts.layout != torch.strided:
            feature_acts = feature_acts.to_dense()
        x = None if inputs is None else inputs[self.in_hook]
        if x is None or x.shape[:-1] != feature_acts.shape[:-1]:
            raise UsageError(
                "a MOLT's output depends on its input as well as on the gates f: pass decode(f, x) with "
                "the raw input f was encoded from, or decode_hooks(f, inputs) with the normalised one "
                f"(gates {tuple(feature_acts.shape)}, input {None if x is None else tuple(x.shape)})"
            )
        lead = feature_acts.shape[:-1]
        y = self.apply_transforms(feature_acts.reshape(-1, self.d_sae), x.reshape(-1, self.d_model))
        if self.b_D is not None:
            y = y + self.b_D
        return {self.out_hook: y.reshape(*lead, self.d_model)}

    def decode_needs_input(self) -> str:
        return "its transforms U_i V_i apply to the input x, weighted by f"

    def loss(
        self,
        inputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        ctx: StepContext,
        mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """Inputs/targets [N, d] (or [B, T, d] with a [B, T] mask of the positions that count)."""
        lead = inputs[self.in_hook].shape[:-1]
        x = inputs[self.in_hook].reshape(-1, self.d_model)
        y = targets[self.out_hook].reshape(-1, self.d_model)
        keep = None if mask is None else mask.reshape(-1).to(torch.bool)
        if self.latent_shard is not None:
            from saecli.dictionaries.molt_sharded import sharded_loss

            return sharded_loss(self, x, y, keep, lead, ctx, self.latent_shard)
        h = self.pre_acts(x)
        norms = self.transform_norms() if self.cfg.sparsity_include_decoder_norm else None
        gate = norms.detach() if (norms is not None and self.gated) else None
        f = self.activation(h, gate, k=self._k(ctx), training=bool(ctx.training))
        recon = self.apply_transforms(f, x)
        if self.b_D is not None:
            recon = recon + self.b_D
        path = self.last_path
        mse = L.mse(recon, y, keep)
        rows = (lambda t: t) if keep is None else (lambda t: t[keep])  # noqa: E731
        x_kept = rows(x)

        def decode_rows(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            dense = torch.zeros(values.shape[0], self.d_sae, dtype=h.dtype, device=h.device)
            return self.apply_transforms(dense.scatter(1, indices, values.to(h.dtype)), x_kept)

        extra_loss, terms, extra = latent_terms(
            rows(h),
            rows(f),
            ctx,
            self.activation,
            gate=gate,
            norms=norms,
            gated=self.gated,
            residual=rows(y - recon),
            decode_rows=decode_rows,
            k_aux_default=self.d_model // 2,
        )
        loss = mse if extra_loss is None else mse + extra_loss
        self.last_path = path
        fired = (rows(f).detach() != 0).to(torch.float32)
        extra["path"] = path
        extra["mse_per_element"] = L.mse_per_element(rows(recon).detach(), rows(y))
        extra["active_rank"] = (fired @ self.rank_of.to(torch.float32)).mean() if fired.shape[0] else torch.zeros(())
        return LossOutput(
            loss=loss,
            terms={"mse": mse.detach(), **{k: v.detach() for k, v in terms.items()}},
            feature_acts=f.reshape(*lead, self.d_sae),
            reconstruction={self.out_hook: recon.reshape(*lead, self.d_model)},
            target={self.out_hook: y.reshape(*lead, self.d_model)},
            extra=extra,
        )

    # ------------------------------------------------------------------ directions (DLA, analysis)
    @torch.no_grad()
    def decoder_directions(self, hook: str | None = None) -> torch.Tensor:
        """[n, d] σ₁·u₁ of each U_i V_i (see the module docstring), via QR of U_i and an SVD of the r×d
        factor: U_i V_i = Q (R V_i), so its left singular vectors are Q times those of R V_i."""
        out, lay = [], self.layout()
        for (_, u4), (_, v4) in zip(lay.blocks(self.U.float()), lay.blocks(self.V.float())):
            u, v = u4[0], v4[0]  # the whole MOLT: one unit
            q, r = torch.linalg.qr(u.transpose(1, 2))  # U_i = Q R: Q [c, d, r], R [c, r, r]
            p, s, _ = torch.linalg.svd(r @ v, full_matrices=False)  # R V_i = P S Wᵀ
            top = (q @ p[:, :, :1]).squeeze(2) * s[:, :1]  # [c, d]
            sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
            out.append(top * torch.where(sign == 0, torch.ones_like(sign), sign))
        return torch.cat(out).to(self.U.dtype)

    def analysis_extras(self) -> dict[str, torch.Tensor]:
        """Per transform: its rank (for the dashboard)."""
        return {"rank": self.rank_of.clone()}

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def post_step(self) -> None:
        if self.cfg.decoder_unit_norm:
            self.set_transform_norms(1.0)

    @torch.no_grad()
    def init_from_data(self, batches: list[dict[str, torch.Tensor]], init_cfg: InitConfig | None) -> None:
        """`reset_parameters(init_cfg)`, b_D at the zero / mean / geometric median of the (normalised)
        targets, b_E ← −mean pre-activation (`init_encoder_bias_with_mean_hidden_pre`), and with
        `grid_search_init_norm` the common ‖U_i V_i‖_F with the lowest loss on the first batch."""
        from saecli.config.init import InitConfig
        from saecli.dictionaries.init import geometric_median, grid_search

        cfg = init_cfg or InitConfig()
        self.reset_parameters(cfg)
        dev = self.U.device
        if self.b_D is not None and cfg.bias_init_method != "zero":
            y = torch.cat([b[self.out_hook].reshape(-1, self.d_model) for b in batches]).to(dev).float()
            centre = y.mean(0) if cfg.bias_init_method == "mean" else geometric_median(y[:16384])
            self.b_D.copy_(centre.to(self.b_D.dtype))
        x1 = batches[0][self.in_hook].reshape(-1, self.d_model).to(dev)
        y1 = batches[0][self.out_hook].reshape(-1, self.d_model).to(dev)
        if cfg.init_encoder_bias_with_mean_hidden_pre:
            self.b_E.zero_()
            self.b_E.sub_(self.pre_acts(x1).float().mean(0).to(self.b_E.dtype))
        if cfg.grid_search_init_norm and not self.cfg.decoder_unit_norm:

            def loss_at(norm: float) -> float:
                self.set_transform_norms(norm)
                f = self.activation(self.pre_acts(x1), self._gate(), k=int(self.cfg.k), training=True, update=False)
                recon = self.apply_transforms(f, x1) + (self.b_D if self.b_D is not None else 0.0)
                return float(L.mse(recon, y1))

            best, _ = grid_search(loss_at, torch.linspace(0.1, 5.0, 50).tolist())
            self.set_transform_norms(best)

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """See the module docstring: the gate unchanged, raw x ↦ raw ŷ with no normalisation afterwards."""
        mode = self.cfg.norm_activation
        if self.folded or mode in ("token-wise", "batch-wise"):
            return
        if mode == "dataset-wise":
            s_in, s_out = float(self.scale(self.in_hook)), float(self.scale(self.out_hook))
            self.W_E.mul_(s_in)
            self.V.mul_(s_in)
            self.U.div_(s_out)
            if self.b_D is not None:
                self.b_D.div_(s_out)
            if self.gated:
                fold_threshold(self.activation, s_in / s_out)
        self.folded = True


def _units(groups: list[tuple[int, int]]) -> int:
    """The split order's number of units: gcd of the counts (every tp dividing all counts divides it)."""
    return reduce(math.gcd, (c for _, c in groups))
