"""Same-shape SAEs trained as one batched computation: a `StackedSAE` and its `StackedMember`s.

Peers (saev, SAELens, dictionary_learning) train a sweep by looping over the members in Python: n
small matmuls, n top-k calls and n optimizer steps per batch. Members of one shape (same kind,
activation, d_model, d_sae, dtype and device) are stacked instead:

- weights as [M, ...] tensors: W_enc [M, d_sae, d], b_enc [M, d_sae], W_dec [M, d_sae, d],
  b_dec [M, d]. Each member's own `SparseAutoEncoder` keeps parameters that alias its slice, so its
  `state_dict()`, `save()`, `fold_activation_scale()` and checkpoints see the live weights and write
  the normal per-member files (sae_weights.safetensors + cfg.json, checkpoints, metrics.jsonl).
- one `bmm` for the encoder of every member ([M, N, d_sae] pre-activations, the input shared by
  broadcast), then each member's top-k with its own k (on the CPU the plain SAE's compiled one-pass
  kernel per member; elsewhere one top-k call per run of members with equal k: the stack orders its
  members by k), and one sparse encoder gather and one sparse decode for all: the active latents of
  all members form one CSR matrix [M·N, M·d_sae] (member m's latents are columns m·d_sae…), so the
  decoder and every sparse gradient are single products over the block-diagonal structure.
- per-member hyper-parameters as tensors: k, the l1 coefficient (after its warm-up), the AuxK
  coefficient and k_aux, the dead-latent masks.
- the optimizer: each member keeps its own fused torch Adam over its parameter views; after the one
  stacked backward, member m's gradients are its slices of the stacked gradients (views, no copy)
  and it takes exactly a plain member's step (per-member lr and schedule, clipping, unit-norm
  projection). Adam is elementwise and memory-bound, so M fused calls over M slices cost what one
  call over the stack would, and the optimizer state and checkpoints stay in the normal format
  (a stacked member's checkpoint resumes as a plain `saecli train` run).

Members stay independent: every product is block-diagonal, so a member whose loss turns NaN only
poisons its own slice; it is reported and stops while the others go on. The math is the SAE's
sparse TopK path (and its ReLU paths), so a stacked member trains to the weights a separate `train`
with the same seed reaches, within float rounding (tests/test_sweep.py).

Members that cannot be stacked (other kinds or activations, AMP, half precision) train as plain
`Member`s in the same loop, on the same batches. `sweep.stack = "auto"` (the default) stacks on CUDA
devices only: on the CPU the block-diagonal products touch all M members' weights at once and run
slower than one compiled kernel call per member (a plain Member loop measured 0.91× of sequential
runs on a cache, the stack 1.24×; both ~0.18× on a live model), while on a GPU the stack replaces M
small kernel launches per operation by one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from saecli.data.batch import Batch
from saecli.dictionaries import kernels
from saecli.dictionaries.kernels import SparsePattern, gather_pre, sparse_decode, two_level_topk
from saecli.training.member import Member, default_sparsity_loss
from saecli.training.distributed import LocalSync, Sync

STACKABLE_ACTIVATIONS = ("topk", "relu")
# ReLU uses the sparse products when at most this fraction of (token, latent) pairs fire (as sae.py)
SPARSE_RELU_MAX_DENSITY = 0.05
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def stack_key(exp: Any) -> tuple | None:
    """Members with equal keys can share one StackedSAE; None: this member trains on its own.

    Decided from the config alone (so --dry-run shows it): kind "sae" with a TopK or ReLU activation,
    float32/float64 weights, no AMP. Per member may differ: k and every trainer setting that is a
    number fed per step (lr, Adam's betas and eps, the schedules, l1 coefficient and warm-up, AuxK
    coefficient and k_aux, dead thresholds, clipping, logging and checkpoint settings) and the
    seed/init. The rest must be equal (the same hook point within one group means the same d_model).
    """
    sae, t = exp.sae, exp.trainer
    if sae is None or sae.kind != "sae" or sae.activation not in STACKABLE_ACTIVATIONS:
        return None
    if sae.dtype not in ("float32", "float64") or t.amp_dtype is not None:
        return None
    loss_type = t.sparsity_loss_type or default_sparsity_loss(sae.activation)
    cfg = {k: v for k, v in dataclasses.asdict(sae).items() if k != "k"}
    trainer = (int(t.gradient_accumulation_steps), loss_type, float(t.p), float(t.tanh_stretch_coefficient),
               float(t.frequency_scale))
    return (repr(sorted(cfg.items())), trainer)


def planned_stack_key(exp: Any, setting: str | bool = "auto") -> tuple | None:
    """`stack_key` where stacking is on for this member (sweep.stack): true, or "auto" and the member
    trains on a CUDA device. On the CPU, one compiled kernel call per member keeps each member's
    weights in cache, and a loop over plain members measured as fast as the stack or faster
    (benchmarks/bench_sweep.py); on a GPU the stack turns M small kernel launches into one."""
    if setting is False:
        return None
    if setting == "auto":
        from saecli.training.run import resolve_device

        if resolve_device(exp).type != "cuda":
            return None
    return stack_key(exp)


@dataclasses.dataclass
class StackOutput:
    loss: torch.Tensor  # [M]
    terms: dict[str, torch.Tensor]  # name → [M] ("mse", "sparsity", "aux"; 0 for members without it)
    counts: torch.Tensor  # [M, d_sae] int64 firing counts
    sse: torch.Tensor  # [M] Σ‖ŷ − y‖²
    raw: dict[str, torch.Tensor]  # bare penalty terms [M] for the metrics ("raw/sparsity", "raw/aux")


class StackedSAE:
    """M SparseAutoEncoders of one shape as one set of [M, ...] tensors: one forward and one backward
    per batch for all of them; each member then steps its own optimizer over its slices."""

    def __init__(self, dictionaries: list[Any], sync: Sync | None = None):
        if not dictionaries:
            raise ValueError("a stack needs at least one dictionary")
        keys = {repr([d.cfg.activation, d.d_model, d.d_sae, d.in_hooks, d.out_hooks]) for d in dictionaries}
        if len(keys) != 1:
            raise ValueError("stacked dictionaries must have the same shape (kind, activation, d_model, d_sae, hooks)")
        from saecli.dictionaries.sae import SparseAutoEncoder

        if any(type(d) is not SparseAutoEncoder for d in dictionaries):
            raise ValueError("only SparseAutoEncoder (kind 'sae') dictionaries can be stacked")
        d0 = dictionaries[0]
        self.dictionaries = list(dictionaries)
        self.M = len(dictionaries)
        self.cfg = d0.cfg
        self.in_hook, self.out_hook = d0.in_hook, d0.out_hook
        self.hooks = list(dict.fromkeys([self.in_hook, self.out_hook]))
        self.d_model, self.d_sae = d0.d_model, d0.d_sae
        self.sync = sync or LocalSync()
        for hook in self.hooks:
            scales = torch.stack([d.scale(hook).detach().float() for d in dictionaries])
            if not torch.allclose(scales, scales[0].expand_as(scales), rtol=1e-6, atol=0):
                raise ValueError(f"stacked dictionaries normalise {hook} differently ({scales.tolist()}): they must "
                                 "read one stream with one dataset norm")
        self.params: dict[str, nn.Parameter] = {}
        for name in _PARAMS:
            if getattr(d0, name, None) is None:
                continue
            stacked = nn.Parameter(torch.stack([getattr(d, name).detach() for d in dictionaries]).contiguous())
            self.params[name] = stacked
            for m, d in enumerate(dictionaries):
                view = nn.Parameter(stacked.data[m])  # aliases the slice: the member sees every update
                setattr(d, name, view)
        self.device, self.dtype = self.params["W_enc"].device, self.params["W_enc"].dtype
        self.bad_step = torch.full((self.M,), -1, dtype=torch.int64, device=self.device)  # first non-finite loss
        if self.cfg.decoder_unit_norm:
            self.params["W_dec"].register_post_accumulate_grad_hook(_remove_parallel_grad)
        self.members: list["StackedMember"] = []
        self.micro = 0
        self.last_path = ""
        self._batch: Batch | None = None
        self._stepped = False
        self._work: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._adds = 0
        self._tokens = 0.0
        self._elements: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def gated(self) -> bool:
        return bool(self.cfg.sparsity_include_decoder_norm) and self.cfg.activation != "relu"

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._work.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._work[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def _vec(self, values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _member_sum(self, member_of: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Σ of `values` per member (differentiable), `member_of` the member index of each value."""
        return torch.zeros(self.M, dtype=values.dtype, device=values.device).index_add(0, member_of, values)

    # ------------------------------------------------------------------ the step
    def feed(self, member: "StackedMember", batch: Batch) -> bool:
        """Called by every member for each batch: the first call runs the stacked step for all."""
        if self._batch is not batch:
            self._batch = batch
            self._stepped = self._step(batch)
        return self._stepped

    def release(self) -> None:
        """Drop the reference to the last batch and the work buffers (after training)."""
        self._batch = None
        self._work.clear()

    def _step(self, batch: Batch) -> bool:
        running = [m for m in self.members if m.running]
        ctxs = [m.context() for m in self.members]
        raw = {h: batch.acts[h] for h in self.hooks}
        normed = self.dictionaries[0].normalize(raw)
        x, y = normed[self.in_hook], normed[self.out_hook]
        out = self.loss(x, y, ctxs)
        with torch.no_grad():
            steps = torch.tensor([m.step for m in self.members], dtype=torch.int64, device=self.device)
            bad = ~torch.isfinite(out.loss.detach())
            self.bad_step.copy_(torch.where(bad & (self.bad_step < 0), steps, self.bad_step))
        n_tokens = self._record(out, y, batch.n_tokens, running)
        acc = running[0].accumulation if running else 1
        (out.loss.sum() / acc).backward()
        self.micro += 1
        for m in running:
            m.micro += 1
            m.tokens += n_tokens
        if self.micro < acc:
            return False
        self.micro = 0
        for m in running:
            m.micro = 0
        self._optimizer_step(running)
        return True

    def loss(self, x: torch.Tensor, y: torch.Tensor, ctxs: list[Any]) -> StackOutput:
        """Normalised inputs [N, d] and targets [N, d] → per-member losses and statistics."""
        if self.cfg.activation == "topk":
            return self._loss_topk(x, y, ctxs)
        return self._loss_relu(x, y, ctxs)

    def _encoder_input(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The encoder's input: x itself (shared by all members) or x − b_dec per member [M·N, d]."""
        b_dec = self.params.get("b_dec")
        if self.cfg.apply_decoder_bias_to_pre_encoder and b_dec is not None:
            xm = x.to(self.dtype).unsqueeze(0) - b_dec.unsqueeze(1)
            return xm.reshape(-1, x.shape[-1]), False
        return x.to(self.dtype), True

    def _native(self) -> bool:
        """The compiled CPU kernels (kernels.topk_pre) take the bias and gate: the encoder is a plain matmul."""
        return self.device.type == "cpu" and self.dtype == torch.float32 and kernels.native_available()

    @torch.no_grad()
    def _pre(self, x_in: torch.Tensor, shared: bool, n: int, gate: torch.Tensor | None, raw: bool = False
             ) -> torch.Tensor:
        """[M, N, d_sae] pre-activations in a reused buffer, one bmm for all members: x W_encᵀ (`raw`),
        else x W_encᵀ + b_enc, times ‖W_d‖ when gated."""
        M, s, d = self.M, self.d_sae, x_in.shape[-1]
        w, b = self.params["W_enc"], self.params["b_enc"]
        xb = x_in.detach().expand(M, n, d) if shared else x_in.detach().view(M, n, d)
        pre = self._buffer("pre", (M, n, s), w.dtype)
        if raw:
            return torch.bmm(xb, w.transpose(1, 2), out=pre)
        if gate is not None:
            w = w * gate.to(w.dtype).unsqueeze(-1)
            b = b * gate.to(b.dtype)
        return torch.baddbmm(b.unsqueeze(1), xb, w.transpose(1, 2), out=pre)

    def _rows(self, x_in: torch.Tensor, shared: bool, n: int) -> torch.Tensor:
        """The encoder input of every row m·N + n ([M·N, d]; the shared input repeated per member)."""
        return x_in.expand(self.M, n, x_in.shape[-1]).reshape(self.M * n, -1) if shared else x_in

    def _gather(self, x_rows: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
        """Differentiable active pre-activations of all members: one sparse product over the stack."""
        w_enc, b_enc = self.params["W_enc"], self.params["b_enc"]
        return gather_pre(x_rows, w_enc.view(-1, w_enc.shape[-1]), b_enc.view(-1), values, pattern)

    def _rows_of(self, n: int) -> torch.Tensor:
        """Member index of each of the M·N rows."""
        key = f"rows{n}"
        if key not in self._work:
            self._work[key] = torch.arange(self.M, device=self.device).repeat_interleave(n)
        return self._work[key]

    def _select(self, values: torch.Tensor, idx: torch.Tensor, per_row: torch.Tensor, n_rows: int,
                col_offset: torch.Tensor, keys: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the `per_row[r]` candidates of each row with the largest `keys` (default: the values)
        → (crow, col, values)."""
        width = values.shape[1]
        if bool((per_row == width).all()):
            keep_vals, keep_idx = values.reshape(-1), (idx + col_offset.unsqueeze(1)).reshape(-1)
        else:
            order = (values if keys is None else keys).argsort(dim=1, descending=True)
            values, idx = values.gather(1, order), idx.gather(1, order)
            keep = torch.arange(width, device=values.device).unsqueeze(0) < per_row.unsqueeze(1)
            keep_vals, keep_idx = values[keep], (idx + col_offset.unsqueeze(1))[keep]
        itype = torch.int32 if n_rows * max(width, 1) < 2**31 - 1 and self.M * self.d_sae < 2**31 - 1 else torch.int64
        crow = torch.zeros(n_rows + 1, dtype=itype, device=values.device)
        torch.cumsum(per_row.to(itype), 0, out=crow[1:])
        return crow, keep_idx.to(itype), keep_vals

    @staticmethod
    def _crow(per_row: list[int], n: int, itype: torch.dtype, device: torch.device) -> torch.Tensor:
        counts = torch.tensor(per_row, device=device, dtype=itype).repeat_interleave(n)
        crow = torch.zeros(len(per_row) * n + 1, dtype=itype, device=device)
        torch.cumsum(counts, 0, out=crow[1:])
        return crow

    def _topk(self, pre: torch.Tensor, ks: list[int], gate: torch.Tensor | None, raw: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each member's top-k rows of [M, N, d_sae] as one CSR (crow, col, values = h + b_enc at them).

        `raw` (CPU float32): one compiled pass per member ranks (h + b_enc)·gate. Otherwise members
        with equal k next to each other share one top-k call (the stack orders members by k)."""
        M, n, s = pre.shape
        itype = torch.int32 if M * n * max(ks) < 2**31 - 1 and M * s < 2**31 - 1 else torch.int64
        values, cols = [], []
        if raw:
            b_enc = self.params["b_enc"]
            for m in range(M):
                v, i = kernels.topk_pre(pre[m], ks[m], b_enc[m], None if gate is None else gate[m])
                values.append(v.reshape(-1))
                cols.append((i + m * s).reshape(-1))
        else:
            a = 0
            for b in range(1, M + 1):
                if b < M and ks[b] == ks[a]:
                    continue
                v, i = two_level_topk(pre[a:b].reshape(-1, s), ks[a])
                offset = torch.arange(a, b, device=pre.device).repeat_interleave(n) * s
                col = (i + offset.unsqueeze(1)).reshape(-1)
                v = v.reshape(-1).float()
                values.append(v if gate is None else v / gate.reshape(-1)[col])
                cols.append(col)
                a = b
        value = values[0] if len(values) == 1 else torch.cat(values)
        col = (cols[0] if len(cols) == 1 else torch.cat(cols)).to(itype)
        return self._crow(ks, n, itype, pre.device), col, value

    def _decode(self, f: torch.Tensor, pattern: SparsePattern, n: int) -> torch.Tensor:
        """ŷ [M, N, d_out] = Σ active f·W_dec rows (one CSR product for all members) + b_dec."""
        w_dec = self.params["W_dec"]
        recon = sparse_decode(f, pattern, w_dec.view(-1, w_dec.shape[-1])).view(self.M, n, -1)
        b_dec = self.params.get("b_dec")
        return recon + b_dec.to(recon.dtype).unsqueeze(1) if b_dec is not None else recon

    def _loss_topk(self, x: torch.Tensor, y: torch.Tensor, ctxs: list[Any]) -> StackOutput:
        M, s, n = self.M, self.d_sae, x.shape[0]
        x_in, shared = self._encoder_input(x)
        gate = self.params["W_dec"].detach().float().norm(dim=-1) if self.gated else None  # [M, s]
        raw = self._native()
        pre = self._pre(x_in, shared, n, gate, raw)
        ks = [min(int(c.k), s) for c in ctxs]
        with torch.no_grad():
            crow, col, values = self._topk(pre, ks, gate, raw)
        pattern = SparsePattern(crow, col, M * n, M * s)
        x_rows = self._rows(x_in, shared, n)
        f = torch.relu(self._gather(x_rows, values, pattern))
        recon = self._decode(f, pattern, n)
        sse = (recon - y.to(recon.dtype).unsqueeze(0)).pow(2).sum(dim=(1, 2))  # per member: Σ_d, Σ_tokens
        mse = sse / n
        sse = sse.detach()
        loss = mse
        terms: dict[str, torch.Tensor] = {"mse": mse.detach()}
        raw_terms: dict[str, torch.Tensor] = {}
        col64 = col.long()
        member_of = torch.div(col64, s, rounding_mode="floor")
        pen = self._sparse_penalty(f, col64, member_of, ctxs[0], n)
        if pen is not None:
            coef = self._vec([float(c.l1_coefficient) for c in ctxs], pen.dtype)
            loss = loss + coef * pen
            terms["sparsity"] = (coef * pen).detach()
            raw_terms["raw/sparsity"] = pen.detach()
        aux = self._auxk(pre, raw, x_rows, y, recon, gate, ctxs, n)
        if aux is not None:
            coef = self._vec([float(c.auxk_coefficient) for c in ctxs], aux.dtype)
            loss = loss + coef * aux
            terms["aux"] = (coef * aux).detach()
            raw_terms["raw/aux"] = aux.detach()
        with torch.no_grad():
            counts = torch.bincount(col64[f.detach() != 0], minlength=M * s).view(M, s)
        self.last_path = "stacked-topk-sparse"
        return StackOutput(loss, terms, counts, sse, raw_terms)

    def _sparse_penalty(self, f: torch.Tensor, col: torch.Tensor, member_of: torch.Tensor, ctx: Any,
                        n: int) -> torch.Tensor | None:
        """The per-member sparsity penalty on the active values only (as sae.py's sparse path)."""
        kind = ctx.sparsity_loss_type or "none"
        if kind in ("none", "l0"):
            return None
        norms = self.params["W_dec"].float().norm(dim=-1).reshape(-1) if self.cfg.sparsity_include_decoder_norm else None
        w = f if norms is None else f * norms[col]
        if kind == "power":
            return self._member_sum(member_of, w.abs() if ctx.p == 1.0 else w.abs().pow(ctx.p)) / n
        t = torch.tanh(ctx.tanh_stretch_coefficient * w)
        if kind == "tanh":
            return self._member_sum(member_of, t) / n
        if kind == "tanh-quad":
            p_hat = torch.zeros(self.M * self.d_sae, dtype=t.dtype, device=t.device).index_add(0, col, t) / n
            p_hat = p_hat.view(self.M, self.d_sae)
            return (p_hat * (1.0 + p_hat / ctx.frequency_scale)).sum(dim=1)
        raise ValueError(f"unknown sparsity_loss_type {kind!r}")

    def _auxk(self, pre: torch.Tensor, raw: bool, x_rows: torch.Tensor, y: torch.Tensor, recon: torch.Tensor,
              gate: torch.Tensor | None, ctxs: list[Any], n: int) -> torch.Tensor | None:
        """AuxK (Gao et al. 2024) for every member at once: the top-k_aux dead latents of each member
        reconstruct its residual; loss = ‖e − ê‖² / ‖e − ē‖² per member (0 where none is dead)."""
        on = [c.auxk_coefficient > 0 and c.dead_mask is not None for c in ctxs]
        if not any(on):
            return None
        M, s = self.M, self.d_sae
        with torch.no_grad():
            dead = torch.stack([c.dead_mask.to(self.device) if c.dead_mask is not None and use
                                else torch.zeros(s, dtype=torch.bool, device=self.device) for c, use in zip(ctxs, on)])
            n_dead = dead.sum(dim=1)
            k_aux = torch.minimum(self._vec([int(c.k_aux or self.d_model // 2) for c in ctxs], torch.int64), n_dead)
        if int(k_aux.max()) == 0:
            return recon.new_zeros(M, dtype=torch.float32)
        with torch.no_grad():
            width, kx = int(n_dead.max()), int(k_aux.max())
            dead_idx = torch.sort(dead.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]  # [M, D]
            valid = torch.arange(width, device=self.device).unsqueeze(0) < n_dead.unsqueeze(1)
            cand = pre.gather(2, dead_idx.unsqueeze(1).expand(M, n, width))  # [M, N, D]
            if raw:  # the buffer holds x W_encᵀ: add the bias, rank by the gated value, keep h + b_enc
                cand.add_(self.params["b_enc"].detach().gather(1, dead_idx).unsqueeze(1))
                keys = cand * gate.gather(1, dead_idx).unsqueeze(1).to(cand.dtype) if gate is not None else cand.clone()
            else:
                keys = cand
            keys.masked_fill_(~valid.unsqueeze(1), float("-inf"))
            top, j = torch.topk(keys.view(M * n, width), kx, dim=-1, sorted=False)
            vals = cand.view(M * n, width).gather(1, j)
            rows = self._rows_of(n)
            idx = dead_idx.unsqueeze(1).expand(M, n, width).gather(2, j.view(M, n, kx)).view(M * n, kx)
            crow, col, values = self._select(vals, idx, k_aux[rows], M * n, rows * s, keys=top)
            values = values.float()
            if gate is not None and not raw:
                values = values / gate.reshape(-1)[col.long()]
        pattern = SparsePattern(crow, col, M * n, M * s)
        f = torch.relu(self._gather(x_rows, values, pattern))
        w_dec = self.params["W_dec"]
        e_hat = sparse_decode(f, pattern, w_dec.view(-1, w_dec.shape[-1])).view(M, n, -1).float()
        e = (y.float().unsqueeze(0) - recon.detach().float())
        var = (e - e.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
        aux = (e_hat - e).pow(2).sum(dim=(1, 2)) / var.clamp_min(1e-12)
        return torch.where(self._vec([float(u) for u in on]).bool(), aux, torch.zeros_like(aux))

    def _loss_relu(self, x: torch.Tensor, y: torch.Tensor, ctxs: list[Any]) -> StackOutput:
        M, s, n = self.M, self.d_sae, x.shape[0]
        x_in, shared = self._encoder_input(x)
        pre = self._pre(x_in, shared, n, None)
        with torch.no_grad():
            pre.relu_()
            nnz = int(torch.count_nonzero(pre))
        W_enc, b_enc, W_dec = self.params["W_enc"], self.params["b_enc"], self.params["W_dec"]
        kind = ctxs[0].sparsity_loss_type or "none"
        norms = W_dec.float().norm(dim=-1) if self.cfg.sparsity_include_decoder_norm else None  # [M, s]
        if nnz <= SPARSE_RELU_MAX_DENSITY * M * n * s:
            with torch.no_grad():
                r, c = torch.nonzero(pre.view(M * n, s), as_tuple=True)
                values = pre.view(M * n, s)[r, c].float()
                rows = self._rows_of(n)
                per_row = torch.bincount(r, minlength=M * n)
                col = c + rows[r] * s
                itype = torch.int32 if r.numel() < 2**31 - 1 else torch.int64
                crow = torch.zeros(M * n + 1, dtype=itype, device=self.device)
                torch.cumsum(per_row.to(itype), 0, out=crow[1:])
            pattern = SparsePattern(crow, col.to(itype), M * n, M * s)
            f = self._gather(self._rows(x_in, shared, n), values, pattern)  # all > 0
            recon = self._decode(f, pattern, n)
            pen = self._sparse_penalty(f, col, torch.div(col, s, rounding_mode="floor"), ctxs[0], n)
            with torch.no_grad():
                counts = torch.bincount(col, minlength=M * s).view(M, s)
            self.last_path = "stacked-relu-sparse"
        else:
            xb = x_in.expand(M, n, x_in.shape[-1]) if shared else x_in.view(M, n, -1)
            h = torch.baddbmm(b_enc.unsqueeze(1), xb, W_enc.transpose(1, 2))
            f = torch.relu(h)
            b_dec = self.params.get("b_dec")
            recon = torch.bmm(f, W_dec) if b_dec is None else torch.baddbmm(b_dec.unsqueeze(1), f, W_dec)
            pen = None
            if kind not in ("none", "l0"):
                w = f if norms is None else f * norms.to(f.dtype).unsqueeze(1)
                ctx = ctxs[0]
                if kind == "power":
                    pen = (w.abs() if ctx.p == 1.0 else w.abs().pow(ctx.p)).sum(-1).mean(-1)
                elif kind == "tanh":
                    pen = torch.tanh(ctx.tanh_stretch_coefficient * w).sum(-1).mean(-1)
                elif kind == "tanh-quad":
                    p_hat = torch.tanh(ctx.tanh_stretch_coefficient * w).mean(1)
                    pen = (p_hat * (1.0 + p_hat / ctx.frequency_scale)).sum(-1)
                else:
                    raise ValueError(f"unknown sparsity_loss_type {kind!r}")
            with torch.no_grad():
                counts = (f.detach() != 0).sum(dim=1)
            self.last_path = "stacked-relu-dense"
        sse = (recon - y.to(recon.dtype).unsqueeze(0)).pow(2).sum(dim=(1, 2))  # per member: Σ_d, Σ_tokens
        mse = sse / n
        sse = sse.detach()
        loss = mse
        terms = {"mse": mse.detach()}
        raw = {}
        if pen is not None:
            coef = self._vec([float(c.l1_coefficient) for c in ctxs], pen.dtype)
            loss = loss + coef * pen
            terms["sparsity"] = (coef * pen).detach()
            raw["raw/sparsity"] = pen.detach()
        return StackOutput(loss, terms, counts, sse, raw)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def _record(self, out: StackOutput, y: torch.Tensor, n_tokens: int, running: list["StackedMember"]) -> int:
        """Firing statistics of every running member (one collective), and the metric sums."""
        counts = out.counts
        if self.sync.world_size > 1:  # every rank keeps the same statistics (same AuxK masks)
            both = self.sync.all_reduce_sum_(torch.cat([counts.reshape(-1).to(torch.int64),
                                                        counts.new_tensor([n_tokens], dtype=torch.int64)]))
            counts, n_tokens = both[:-1].view_as(counts), int(both[-1])
        for m in running:
            m.stats.update(counts[m.index], n_tokens)
        yf = y.float()
        sst = (yf - yf.mean(0)).pow(2).sum()
        add = {"loss": out.loss.detach(), **{f"loss/{k}": v for k, v in out.terms.items()},
               "fires": counts.sum(dim=1), f"sse/{self.out_hook}": out.sse, f"sst/{self.out_hook}": sst.expand(self.M)}
        for key, value in add.items():
            value = value.to(torch.float64)
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
        self._adds += 1
        self._tokens += float(n_tokens)
        self._elements[self.out_hook] = self._elements.get(self.out_hook, 0.0) + float(y.numel())
        for m in running:
            i = m.index
            extra: dict[str, Any] = {"path": self.last_path, "mse_per_element": out.terms["mse"][i] / y.shape[-1]}
            for key, value in out.raw.items():
                if (m.has_aux if key == "raw/aux" else m.has_sparsity):
                    extra[key] = value[i]
            m._last_extra = extra
        return n_tokens

    def flush(self) -> None:
        """Hand the sums since the last flush to each member's MetricWindow (before logs/checkpoints)."""
        if not self._adds:
            return
        for m in self.members:
            i, w = m.index, m.window
            for key, value in self._sums.items():
                if key == "loss/sparsity" and not m.has_sparsity or key == "loss/aux" and not m.has_aux:
                    continue
                w.add(key, value[i], count=self._adds)
            w.add("tokens", self._tokens, count=self._adds)
            for hook, e in self._elements.items():
                w.add(f"elements/{hook}", e, count=self._adds)
        self._sums, self._adds, self._tokens, self._elements = {}, 0, 0.0, {}

    # ------------------------------------------------------------------ the optimizer
    @torch.no_grad()
    def _optimizer_step(self, running: list["StackedMember"]) -> None:
        """Each running member steps its own fused Adam over its slices: the stacked gradients are
        handed to the members' parameter views (no copy), so lr, its schedule, clipping, the unit-norm
        projection and the optimizer state are exactly a plain member's (and its checkpoints too)."""
        for m in running:
            m.step_optimizer()
        for p in self.params.values():
            p.grad = None


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _remove_parallel_grad(w: torch.Tensor) -> None:
    """Unit-norm decoder rows: drop each row's gradient component along the row (as sae.py does)."""
    if w.grad is None:
        return
    u = _unit_rows(w.detach().float())
    g = w.grad.float()
    w.grad.copy_((g - (g * u).sum(-1, keepdim=True) * u).to(w.grad.dtype))


class StackedMember(Member):
    """One member of a StackedSAE: its own schedules, statistics, metrics, folder and checkpoints;
    its forward/backward and optimizer step are the stack's (run once per batch for all)."""

    def __init__(self, dictionary: Any, cfg: Any, *, stack: StackedSAE, index: int, **kwargs: Any):
        super().__init__(dictionary, cfg, **kwargs)
        self.stack, self.index = stack, index
        self.views = {name: getattr(dictionary, name) for name in stack.params}  # alias the stack's slices
        self._bad_step = stack.bad_step[index]  # a view: the stack writes it
        ctx = self.context()
        self.has_sparsity = (ctx.sparsity_loss_type or "none") not in ("none", "l0")
        self.has_aux = dictionary.cfg.activation == "topk" and cfg.auxk_coefficient > 0

    def feed(self, batch: Batch) -> bool:
        return self.stack.feed(self, batch)

    def metrics(self) -> dict[str, Any]:
        self.stack.flush()
        rec = super().metrics()
        rec["stacked"] = self.stack.M
        return rec

    def state_dict(self) -> dict[str, Any]:
        self.stack.flush()
        return super().state_dict()

    def step_optimizer(self) -> None:
        """Point this member's parameter views' gradients at its slices of the stacked gradients, then
        take a plain member's optimizer step (all-reduce, clipping, Adam, scheduler, post_step)."""
        for name, view in self.views.items():
            grad = self.stack.params[name].grad
            view.grad = None if grad is None else grad[self.index]
        self._optimizer_step()


def build_stack(dictionaries: list[Any], cfgs: list[Any], *, sync: Sync | None = None,
                **member_kwargs: list[Any]) -> list[StackedMember]:
    """Stack `dictionaries` (same stack_key) and wrap each in a StackedMember.

    `member_kwargs` are lists, one value per member, of Member's keyword arguments (total_steps,
    batch_tokens, folder, name, wandb).
    """
    # inside the stack, members are ordered by k: equal k side by side share one top-k call
    order = sorted(range(len(dictionaries)), key=lambda i: (int(dictionaries[i].cfg.k), i))
    stack = StackedSAE([dictionaries[i] for i in order], sync=sync)
    members: list[StackedMember | None] = [None] * len(dictionaries)
    for index, i in enumerate(order):
        kwargs = {k: v[i] for k, v in member_kwargs.items()}
        members[i] = StackedMember(dictionaries[i], cfgs[i], stack=stack, index=index, sync=sync, **kwargs)
    stack.members = [members[i] for i in order]
    return [m for m in members if m is not None]
