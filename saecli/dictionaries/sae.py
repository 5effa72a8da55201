"""The sparse autoencoder (kind = "sae"): h = (x − b_dec?) W_encᵀ + b_enc, f = act(h), ŷ = f W_dec + b_dec.

`in_hook` may differ from `out_hook` (a transcoder is this class with two hooks): every formula below
keeps the input scale s_in and the output scale s_out apart.

Weights: W_enc [d_sae, d_model] (row i = latent i's encoder direction, rows contiguous so the sparse
encoder gradient is one CSR product), b_enc [d_sae], W_dec [d_sae, d_model], b_dec [d_model]
(absent if `use_decoder_bias = false`), and the activation's state under `activation.` (JumpReLU
`log_threshold`, BatchTopK `threshold`).

Matryoshka (`matryoshka_prefixes`, Bussmann et al. 2025): the latents [0, p) of each prefix p (and the
whole dictionary) must reconstruct the input on their own; the loss is the mean of those prefix losses
(losses.prefix_mse), so early latents learn general features and later ones refine them. Encoding and
decoding are unchanged: only the training loss differs, in the sparse TopK and the dense paths alike.

Multi-TopK (`trainer.multi_topk_coefficient` > 0, Gao et al. 2024; sparsify trains every TopK dictionary
with it): the top MULTI_TOPK_FACTOR·k latents reconstruct the target too, that loss weighted in, so four
times as many latents get a gradient each step and fewer die young. Encoding keeps the top k.

Training paths (`last_path` says which ran): "topk-sparse" (sparse products on the backend kernels.py
chooses once per device: compiled CPU loops, Triton on CUDA, or the pure-torch reference),
"relu-sparse" (ReLU when few latents fire), "relu-dense-fused" (ReLU-L1 in the dense regime) and
"dense" (plain autograd: every other case, and the reference the fast paths are tested against).
In the sparse paths `LossOutput.feature_acts` is a sparse CSR tensor [N, d_sae]; in "relu-dense-fused" it
is a work buffer that the next `loss()` call overwrites (read it before the next step).
The GPU choices (CUDA_SPARSE_RELU_MIN_TOKENS, dense TopK under autocast without Triton) come from H100
measurements with benchmarks/bench_train_step.py (benchmarks/gpu_check.sh repeats them with Triton).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from saecli.config.dictionary import DictionaryConfig
from saecli.config.init import InitConfig
from saecli.dictionaries import kernels
from saecli.dictionaries import losses as L
from saecli.dictionaries.activations import SparseActivation
from saecli.dictionaries.base import Dictionary, LossOutput, StepContext, own_config
from saecli.dictionaries.sae_config import SAEConfig
from saecli.dictionaries.sharding import LatentShard, local
from saecli.dtypes import DTYPES
from saecli.errors import ConfigError

# ReLU switches to the sparse path when at most this fraction of (token, latent) pairs fire
SPARSE_RELU_MAX_DENSITY = 0.05
CUDA_SPARSE_RELU_MIN_TOKENS = 16384
RELU_REPROBE_STEPS = 50
MULTI_TOPK_FACTOR = 4  # Multi-TopK reconstructs from the top 4k latents too (Gao et al. 2024)


class SparseAutoEncoder(Dictionary):
    kind = "sae"
    # parameters with a latent dimension, and its axis (what tensor parallelism splits over ranks)
    latent_axes: ClassVar[dict[str, int]] = {"W_enc": 0, "b_enc": 0, "W_dec": 0, "activation.log_threshold": 0}
    latent_shard: LatentShard | None = None  # set by tensor_parallel.shard_dictionary

    b_dec: nn.Parameter | None  # None when cfg.use_decoder_bias is off
    activation: SparseActivation
    init_norm: float  # the decoder row norm init's grid search chose (set when it runs; dictionaries/init.py)

    def __init__(self, cfg: DictionaryConfig, d_model: int, in_hook: str, out_hook: str | None = None):
        out_hook = out_hook or in_hook
        super().__init__(cfg, d_model, [in_hook], [out_hook])
        self.in_hook, self.out_hook = in_hook, out_hook
        dtype = DTYPES[cfg.dtype]
        s = self.d_sae
        self.W_enc = nn.Parameter(torch.empty(s, d_model, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(s, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(s, d_model, dtype=dtype))
        if cfg.use_decoder_bias:
            self.b_dec = nn.Parameter(torch.zeros(d_model, dtype=dtype))
        else:
            self.register_parameter("b_dec", None)
        self.activation = SparseActivation(
            cfg.activation,
            s,
            jumprelu_threshold_init=cfg.jumprelu_threshold_init,
            bandwidth=cfg.jumprelu_bandwidth,
            batchtopk_threshold_decay=cfg.batchtopk_threshold_decay,
        )
        self.prefixes = matryoshka_prefixes(cfg, s)
        self.last_path = ""
        self._work: dict[str, Any] = {}
        self._hooked = 0
        self._relu_density, self._relu_calls = 0.0, 0  # ReLU path choice: last step's firing density
        self._ensure_grad_hook()
        from saecli.dictionaries.init import initialize

        initialize(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DictionaryConfig, d_model: int, hook_points: list[str]) -> SparseAutoEncoder:
        hook = own_config(cfg, SAEConfig).hook_point or hook_points[0]
        return cls(cfg, d_model, hook)

    @classmethod
    def from_saved(cls, cfg: DictionaryConfig, meta: dict[str, Any]) -> SparseAutoEncoder:
        return cls(cfg, int(meta["d_model"]), meta["in_hooks"][0], meta["out_hooks"][0])

    # ------------------------------------------------------------------ pieces of the math
    @property
    def gated(self) -> bool:
        """Decoder-norm gating of the activation (a no-op for ReLU, so skipped there)."""
        return bool(self.cfg.sparsity_include_decoder_norm) and self.cfg.activation != "relu"

    def decoder_norms(self) -> torch.Tensor:
        """[d_sae] ‖W_dec,i‖ in float32 (differentiable)."""
        return self.norms_of(self.W_dec)

    def norms_of(self, w_dec: torch.Tensor) -> torch.Tensor:
        """The decoder norm of each row of `w_dec` (all latents, or a tensor-parallel rank's rows)."""
        return w_dec.float().norm(dim=1)

    def decoder_directions(self, hook: str | None = None) -> torch.Tensor:
        return self.W_dec

    def _penalty_norms(self) -> torch.Tensor | None:
        return self.decoder_norms() if self.cfg.sparsity_include_decoder_norm else None

    def _gate(self) -> torch.Tensor | None:
        return self.decoder_norms().detach() if self.gated else None

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.apply_decoder_bias_to_pre_encoder and self.b_dec is not None:
            return x - self.b_dec.to(x.dtype)
        return x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """h = (x − b_dec?) W_encᵀ + b_enc for normalised inputs [..., d_model]."""
        x_in = self.encoder_input(x).to(self.W_enc.dtype)
        return torch.nn.functional.linear(x_in, self.W_enc, self.b_enc)

    def _k(self, ctx: StepContext | None) -> int:
        return int(ctx.k) if ctx is not None and ctx.k is not None else int(self.cfg.k)

    # ------------------------------------------------------------------ interface
    def encode(self, inputs: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        h = self.pre_acts(inputs[self.in_hook])
        training = bool(ctx.training) if ctx is not None else False
        return self.activation(h, self._gate(), k=self._k(ctx), training=training)

    def decode_hooks(
        self, feature_acts: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        y = feature_acts.to(self.W_dec.dtype) @ self.W_dec  # dense or sparse CSR
        if self.b_dec is not None:
            y = y + self.b_dec
        return {self.out_hook: y}

    def loss(
        self,
        inputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        ctx: StepContext,
        mask: torch.Tensor | None = None,
    ) -> LossOutput:
        x, y = inputs[self.in_hook], targets[self.out_hook]
        self._ensure_grad_hook()
        if self.latent_shard is not None:
            from saecli.dictionaries.sae_sharded import sharded_loss

            return sharded_loss(self, x, y, ctx, self.latent_shard)
        path = self._choose_path(x, ctx, mask)
        if path == "topk-sparse":
            return self._loss_topk_sparse(x, y, ctx)
        if path == "relu":
            out = self._loss_relu_fast(x, y, ctx)
            if out is not None:
                return out
        return self._loss_dense(x, y, ctx, mask)

    # ------------------------------------------------------------------ path choice
    def _choose_path(self, x: torch.Tensor, ctx: StepContext, mask: torch.Tensor | None) -> str:
        ok = (
            self.cfg.sparse_kernels
            and ctx.training
            and torch.is_grad_enabled()
            and x.dim() == 2
            and mask is None
            and x.shape[0] > 0
        )
        if not ok:
            return "dense"
        cuda = x.is_cuda
        if self.cfg.activation == "topk":
            # under autocast on a GPU the bf16 dense step beat torch's float32 CSR products (H100); the
            # Triton kernels read bf16 weights directly (benchmarks/gpu_check.sh measures both)
            if cuda and torch.is_autocast_enabled(x.device.type):
                return "topk-sparse" if kernels.backend_for(x.device).sparse_under_autocast else "dense"
            return "topk-sparse"
        if self.cfg.activation == "relu":
            # on a GPU the sparse ReLU path only pays off on large batches (H100: slower at 4k, 2× at 64k tokens)
            if cuda and x.shape[0] < CUDA_SPARSE_RELU_MIN_TOKENS:
                return "dense"
            # dense regime without a fused step: skip the probe (it would cost an extra encoder matmul),
            # but look again every RELU_REPROBE_STEPS steps in case training made the codes sparse
            self._relu_calls += 1
            if (
                not self._relu_fusable(x, ctx)
                and self._relu_density > SPARSE_RELU_MAX_DENSITY
                and self._relu_calls % RELU_REPROBE_STEPS
            ):
                return "dense"
            return "relu"
        return "dense"

    def _relu_fusable(self, x: torch.Tensor, ctx: StepContext) -> bool:
        kind = ctx.sparsity_loss_type or "none"
        return (
            (kind == "none" or (kind == "power" and ctx.p == 1.0))
            and bool(self.cfg.sparsity_include_decoder_norm)
            and x.dtype == self.W_enc.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A work buffer reused across steps (no page faults from fresh [N, d_sae] allocations)."""
        buf = self._work.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self._work[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def _matmul_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return self.W_enc.dtype

    def _native_pre(self, x_in: torch.Tensor) -> bool:
        """The backend's one-pass top-k applies the encoder bias (and gate) itself: the encoder is a plain
        float32 matmul into the buffer (no bias broadcast pass, no gated copy of W_enc)."""
        return self._matmul_dtype(x_in) == torch.float32 and kernels.backend_for(x_in.device).fused_topk

    @torch.no_grad()
    def _pre_into_buffer(self, x_in: torch.Tensor, gate: torch.Tensor | None, raw: bool = False) -> torch.Tensor:
        """Dense encoder matmul into the reused buffer: h (or h·‖W_d‖ when gated); `raw`: x W_encᵀ only."""
        dt = self._matmul_dtype(x_in)
        buf = self._buffer("pre", (x_in.shape[0], self.d_sae), dt, x_in.device)
        if raw:
            with torch.autocast(x_in.device.type, enabled=False):
                return torch.mm(x_in.to(dt), self.W_enc.to(dt).t(), out=buf)
        w: torch.Tensor = self.W_enc
        b: torch.Tensor = self.b_enc
        if gate is not None:  # rank h·‖W_d‖: scale the encoder rows instead of the [N, d_sae] output
            w = torch.mul(w, gate.to(w.dtype).unsqueeze(1), out=self._buffer("w_gated", w.shape, w.dtype, w.device))
            b = b * gate.to(b.dtype)
        with torch.autocast(x_in.device.type, enabled=False):
            torch.addmm(b.to(dt), x_in.detach().to(dt), w.to(dt).t(), out=buf)
        return buf

    # ------------------------------------------------------------------ sparse TopK
    def _loss_topk_sparse(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput:
        n_tok, s = x.shape[0], self.d_sae
        k = min(self._k(ctx), s)
        k_wide = min(MULTI_TOPK_FACTOR * k, s) if ctx.multi_topk_coefficient > 0 else k
        x_in = self.encoder_input(x)
        gate = self._gate()
        raw = self._native_pre(x_in)
        buf = self._pre_into_buffer(x_in, gate, raw)
        with torch.no_grad():
            if raw:  # one compiled pass: top-k of (h + b_enc)·gate, returning h + b_enc
                vals, idx = kernels.topk_pre(buf, k_wide, self.b_enc, gate)
            else:
                vals, idx = kernels.two_level_topk(buf, k_wide)
                vals = vals.float()
                if gate is not None:
                    vals = vals / gate[idx]
            wide = (vals, idx)
            if k_wide > k:  # the top k among the top 4k, by the same (gated) key
                pick = torch.topk(vals if gate is None else vals * gate[idx.long()], k, dim=1, sorted=False).indices
                vals, idx = vals.gather(1, pick), idx.gather(1, pick)
        pattern = kernels.SparsePattern.from_topk(idx, s)
        x_enc = x_in.to(self.W_enc.dtype) if x_in.dtype != self.W_enc.dtype else x_in
        pre = kernels.gather_pre(x_enc, self.W_enc, self.b_enc, vals.reshape(-1), pattern)
        f = torch.relu(pre)
        recon = kernels.sparse_decode(f, pattern, self.W_dec, self.b_dec)

        def prefix_recon(p: int) -> torch.Tensor:  # the values of latents >= p zeroed, same pattern
            return kernels.sparse_decode(f * (pattern.col < p).to(f.dtype), pattern, self.W_dec, self.b_dec)

        terms, extra = self._common_terms(recon, y, prefix_recon=prefix_recon)
        loss = terms["mse"]
        pen = self._sparse_penalty(f, pattern, ctx, n_tok)
        if pen is not None:
            terms["sparsity"] = ctx.l1_coefficient * pen
            extra["raw/sparsity"] = pen.detach()
            loss = loss + terms["sparsity"]
        if k_wide > k:
            wide_pattern = kernels.SparsePattern.from_topk(wide[1], s)
            f_wide = torch.relu(kernels.gather_pre(x_enc, self.W_enc, self.b_enc, wide[0].reshape(-1), wide_pattern))
            loss = self._add_multi_topk(
                loss, kernels.sparse_decode(f_wide, wide_pattern, self.W_dec, self.b_dec), y, None, ctx, terms, extra
            )
        aux = self._auxk_sparse(buf, x_enc, y, recon, gate, ctx, raw)
        if aux is not None:
            terms["aux"] = ctx.auxk_coefficient * aux
            extra["raw/aux"] = aux.detach()
            loss = loss + terms["aux"]
        self.last_path = "topk-sparse"
        extra["path"] = self.last_path
        extra["l0"] = (f.detach() > 0).sum() / n_tok
        feature_acts = pattern.csr(f.detach())
        return self._output(loss, terms, feature_acts, recon, y, extra)

    def _auxk_sparse(
        self,
        buf: torch.Tensor,
        x_enc: torch.Tensor,
        y: torch.Tensor,
        recon: torch.Tensor,
        gate: torch.Tensor | None,
        ctx: StepContext,
        raw: bool = False,
    ) -> torch.Tensor | None:
        """AuxK (losses.auxk_loss) on the sparse path: selected from the encoder buffer (`raw`: x W_encᵀ
        without bias, ranked by the gated value; else the gated pre-activations), gathered and decoded
        with the sparse products."""
        dead = ctx.dead_mask
        if ctx.auxk_coefficient <= 0 or dead is None or self.cfg.activation not in ("topk", "batchtopk"):
            return None
        patterns: list[kernels.SparsePattern] = []

        def gather(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            values = values.float()
            if gate is not None and not raw:  # the buffer held h·‖W_d‖: back to h
                values = values / gate[idx]
            patterns.append(kernels.SparsePattern.from_topk(idx, self.d_sae))
            return kernels.gather_pre(x_enc, self.W_enc, self.b_enc, values.reshape(-1), patterns[-1])

        def decode(acts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return kernels.sparse_decode(acts, patterns[-1], self.W_dec)

        return L.auxk_loss(
            buf,
            dead,
            int(ctx.k_aux or self.d_model // 2),
            (y - recon).detach(),
            decode,
            gate if raw else None,
            bias=self.b_enc if raw else None,
            gather=gather,
        )

    def _sparse_penalty(
        self, f: torch.Tensor, pattern: kernels.SparsePattern, ctx: StepContext, n_tok: int
    ) -> torch.Tensor | None:
        """The sparsity penalty (losses.sparsity_penalty) on the active values only."""
        kind = ctx.sparsity_loss_type or "none"
        if kind in ("none", "l0"):
            return None
        return L.sparsity_penalty(
            kind,
            f,
            self._penalty_norms(),
            p=ctx.p,
            c=ctx.tanh_stretch_coefficient,
            frequency_scale=ctx.frequency_scale,
            active=L.Active(pattern.col.long(), n_tok, self.d_sae),
        )

    # ------------------------------------------------------------------ fast ReLU
    def _loss_relu_fast(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossOutput | None:
        """ReLU: sparse kernels when few latents fire, else the fused dense L1 step; None = use dense."""
        n_tok, s = x.shape[0], self.d_sae
        kind = ctx.sparsity_loss_type or "none"
        x_in = self.encoder_input(x)
        raw = self._native_pre(x_in)
        buf = self._pre_into_buffer(x_in, None, raw)
        counts = colsum = None
        with torch.no_grad():
            # raw: bias + ReLU + counts + column sums in one compiled pass; else ReLU + count in torch
            nnz, counts, colsum = kernels.relu_bias_(buf, self.b_enc if raw else None)
        self._relu_density = nnz / max(buf.numel(), 1)
        x_enc = x_in.to(self.W_enc.dtype) if x_in.dtype != self.W_enc.dtype else x_in
        if nnz <= SPARSE_RELU_MAX_DENSITY * n_tok * s:
            with torch.no_grad():
                pattern, vals = kernels.SparsePattern.from_dense(buf, counts)
            f = kernels.gather_pre(x_enc, self.W_enc, self.b_enc, vals.float(), pattern)  # all > 0
            recon = kernels.sparse_decode(f, pattern, self.W_dec, self.b_dec)
            pen = self._sparse_penalty(f, pattern, ctx, n_tok)
            self.last_path = "relu-sparse"
            feature_acts = pattern.csr(f.detach())
            l0 = torch.tensor(nnz / n_tok)
        else:
            if not self._relu_fusable(x_enc, ctx):  # other penalties, AMP: the dense path (recomputes h)
                return None
            b_dec = self.b_dec if self.b_dec is not None else None
            recon, pen_fused = kernels.dense_relu_l1(
                x_enc, self.W_enc, self.b_enc, self.W_dec, b_dec, buf, self._work, colsum
            )
            pen = pen_fused if kind == "power" else None  # unused: backward gets a zero gradient for it
            self.last_path = "relu-dense-fused"
            feature_acts = buf
            l0 = torch.tensor(nnz / n_tok)
        terms, extra = self._common_terms(recon, y)
        loss = terms["mse"]
        if pen is not None:
            terms["sparsity"] = ctx.l1_coefficient * pen
            extra["raw/sparsity"] = pen.detach()
            loss = loss + terms["sparsity"]
        extra["path"] = self.last_path
        extra["l0"] = l0
        return self._output(loss, terms, feature_acts, recon, y, extra)

    # ------------------------------------------------------------------ dense reference path
    def _loss_dense(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext, mask: torch.Tensor | None) -> LossOutput:
        h = self.pre_acts(x)
        gate = self._gate()
        f = self.activation(h, gate, k=self._k(ctx), training=bool(ctx.training))
        recon = self.decode_hooks(f)[self.out_hook]

        def prefix_recon(p: int) -> torch.Tensor:
            out = f[..., :p].to(self.W_dec.dtype) @ self.W_dec[:p]
            return out + self.b_dec if self.b_dec is not None else out

        terms, extra = self._common_terms(recon, y, mask, prefix_recon=prefix_recon)
        loss = terms["mse"]
        kind = ctx.sparsity_loss_type or "none"
        norms = self._penalty_norms()
        act = self.cfg.activation
        pen = None
        if kind == "l0":
            if act != "jumprelu":
                raise ValueError("sparsity_loss_type 'l0' needs activation = 'jumprelu'")
            pen = L.jumprelu_l0(h, self.activation.theta(), self.activation.bandwidth, gate)
        elif kind != "none":
            pen = L.sparsity_penalty(
                kind, f, norms, p=ctx.p, c=ctx.tanh_stretch_coefficient, frequency_scale=ctx.frequency_scale
            )
        if pen is not None:
            terms["sparsity"] = ctx.l1_coefficient * pen
            extra["raw/sparsity"] = pen.detach()
            loss = loss + terms["sparsity"]
        if act in ("topk", "batchtopk") and ctx.multi_topk_coefficient > 0:
            k_wide = min(MULTI_TOPK_FACTOR * self._k(ctx), self.d_sae)
            f_wide = self.activation(h, gate, k=k_wide, training=True, update=False)
            loss = self._add_multi_topk(loss, self.decode_hooks(f_wide)[self.out_hook], y, mask, ctx, terms, extra)
        if act in ("topk", "batchtopk") and ctx.auxk_coefficient > 0 and ctx.dead_mask is not None:
            aux = L.auxk_loss(
                h,
                ctx.dead_mask.to(h.device),
                int(ctx.k_aux or self.d_model // 2),
                (y - recon).detach(),
                L.gather_decode(self.W_dec),
                gate,
            )
            terms["aux"] = ctx.auxk_coefficient * aux
            extra["raw/aux"] = aux.detach()
            loss = loss + terms["aux"]
        if act == "jumprelu" and ctx.lp_coefficient > 0:
            lp = L.jumprelu_preact_loss(
                h, self.activation.theta(), norms if norms is not None else None, gated=self.gated
            )
            terms["lp"] = ctx.lp_coefficient * lp
            extra["raw/lp"] = lp.detach()
            loss = loss + terms["lp"]
        if act == "jumprelu":
            extra["mean_threshold"] = self.activation.theta().detach().mean()
        if act == "batchtopk":
            extra["threshold"] = self.activation.threshold.detach().clone()
        self.last_path = "dense"
        extra["path"] = self.last_path
        fd = f.detach()
        extra["l0"] = (fd > 0).sum(-1).float().mean() if fd.numel() else torch.zeros(())
        return self._output(loss, terms, f, recon, y, extra)

    # ------------------------------------------------------------------ shared
    def _common_terms(
        self,
        recon: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        prefix_recon: Callable[[int], torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The reconstruction term: the MSE, or with Matryoshka prefixes the mean of the prefixes' MSEs
        (`prefix_recon(p)`: the reconstruction from latents [0, p) only; the full one is `recon`)."""
        mse = L.mse(recon, y, mask)
        extra = {"mse_per_element": mse.detach() / y.shape[-1]}  # same mean, per element
        if not self.prefixes or prefix_recon is None:
            return {"mse": mse}, extra
        full = self.d_sae

        def decode(p: int) -> torch.Tensor:
            return recon if p == full else prefix_recon(p)

        return {"mse": L.prefix_mse(decode, self.prefixes, y, mask, full_mse=mse)}, extra

    @staticmethod
    def _add_multi_topk(
        loss: torch.Tensor,
        recon_wide: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None,
        ctx: StepContext,
        terms: dict,
        extra: dict,
    ) -> torch.Tensor:
        """loss + coefficient × the MSE of the top-4k reconstruction (the Multi-TopK term)."""
        wide = L.mse(recon_wide, y, mask)
        terms["multi_topk"] = ctx.multi_topk_coefficient * wide
        extra["raw/multi_topk"] = wide.detach()
        return loss + terms["multi_topk"]

    def _output(
        self,
        loss: torch.Tensor,
        terms: dict,
        feature_acts: torch.Tensor,
        recon: torch.Tensor,
        y: torch.Tensor,
        extra: dict,
    ) -> LossOutput:
        return LossOutput(
            loss=loss,
            terms={k: v.detach() for k, v in terms.items()},
            feature_acts=feature_acts,
            reconstruction={self.out_hook: recon},
            target={self.out_hook: y},
            extra=extra,
        )

    # ------------------------------------------------------------------ training hooks
    @staticmethod
    def _unit_rows(w: torch.Tensor) -> torch.Tensor:
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _ensure_grad_hook(self) -> None:
        """With unit-norm decoder rows, register the gradient projection on the current W_dec
        (again after a deep copy, which drops tensor hooks)."""
        if self.cfg.decoder_unit_norm and self._hooked != id(self.W_dec):
            self.W_dec.register_post_accumulate_grad_hook(_remove_parallel_grad)
            self._hooked = id(self.W_dec)

    @torch.no_grad()
    def post_step(self) -> None:
        if self.cfg.decoder_unit_norm:
            w = local(self.W_dec)  # a tensor-parallel rank normalises its own rows
            w.copy_(self._unit_rows(w.float()).to(w.dtype))

    @torch.no_grad()
    def init_from_data(self, batches: list[dict[str, torch.Tensor]], init_cfg: InitConfig) -> None:
        from saecli.dictionaries.init import init_sae_from_data

        init_sae_from_data(self, batches, init_cfg)

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Fold the dataset-wise scales into the weights so raw x ↦ raw ŷ with no normalisation.

        With x = s_in·x_raw and y = s_out·y_raw, keep W_enc and divide everything downstream:
            b_enc ← b_enc/s_in   ⇒ h' = h/s_in,  f' = f/s_in
            W_dec ← W_dec·s_in/s_out,  b_dec ← b_dec/s_out   ⇒ ŷ' = ŷ/s_out = denormalised ŷ
            (b_dec is subtracted from x before encoding only when s_in = s_out, an SAE.)
            threshold θ (JumpReLU, BatchTopK): ungated it compares h ⇒ θ ← θ/s_in; gated it compares
            h·‖W_d‖ ⇒ h'·‖W_d'‖ = h·‖W_d‖/s_out ⇒ θ ← θ/s_out.
        TopK's ranking is unchanged (every h, or h·‖W_d‖, is divided by the same positive number).
        Token-/batch-wise normalisation depends on each input and cannot be folded: a no-op there.
        """
        mode = self.cfg.norm_activation
        if self.folded or mode in ("token-wise", "batch-wise"):
            return
        if mode == "dataset-wise":
            s_in = float(self.scale(self.in_hook))
            s_out = float(self.scale(self.out_hook))
            if self.cfg.apply_decoder_bias_to_pre_encoder and self.b_dec is not None and s_in != s_out:
                raise ValueError("cannot fold: b_dec is subtracted from the input but s_in != s_out")
            self.b_enc.div_(s_in)
            self.W_dec.mul_(s_in / s_out)
            if self.b_dec is not None:
                self.b_dec.div_(s_out)
            if self.cfg.activation in ("jumprelu", "batchtopk"):
                self.activation.rescale_threshold(1.0 / (s_out if self.gated else s_in))
        self.folded = True


def matryoshka_prefixes(cfg: Any, d_sae: int) -> tuple[int, ...]:
    """The nested dictionary sizes, ending with d_sae (appended when the list stops short); () = off."""
    given = getattr(cfg, "matryoshka_prefixes", None)  # only the sae kind's config declares it
    if not given:
        return ()
    if given[-1] > d_sae:  # d_sae from expansion_factor is known only here
        raise ConfigError(f"prefix {given[-1]} exceeds d_sae ({d_sae})", key="dictionary.matryoshka_prefixes")
    return tuple(int(p) for p in given) + (() if given[-1] == d_sae else (d_sae,))


@torch.no_grad()
def _remove_parallel_grad(w: torch.Tensor) -> None:
    """Remove from each decoder row's gradient its component along the row (which would only change
    the row's norm, undone by the projection after the step) — as sparsify and saev do."""
    if w.grad is None:
        return
    u = SparseAutoEncoder._unit_rows(local(w.detach()).float())
    grad = local(w.grad)
    g = grad.float()
    grad.copy_((g - (g * u).sum(1, keepdim=True) * u).to(grad.dtype))
