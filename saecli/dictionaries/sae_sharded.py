"""The SAE / transcoder training step with its latents split over tensor-parallel ranks.

The same maths as `SparseAutoEncoder._loss_dense` (the reference every fast path is tested against), on
this rank's latent slice (`sharding.LatentShard`): h_local = x W_enc,localᵀ + b_enc,local; the
activation with the global selection (`shard.select`); ŷ = Σ_ranks f_local W_dec,local (`shard.reduce`)
+ b_dec. Every latent-separable term (the sparsity penalties, JumpReLU's L0 and pre-activation loss)
is computed on the local latents and summed over ranks the same way; AuxK takes its global top-k_aux
over the dead latents (`shard.auxk`). TopK/BatchTopK training steps run on the sparse kernels
(`_sparse_loss`: the encoder product without gradient for the global selection, then only the selected
pre-activations and decoder rows, like the unsharded "topk-sparse" path; its one-pass top-k kernel is not
used, since the selection needs the all-gather in between); other steps are the dense reference above.

The loss is replicated (identical on every tp rank), so replicated parameters (b_dec, a transcoder's
W_skip) get identical gradients on every rank, and sharded ones get the gradient of their own slice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from saecli.dictionaries import kernels
from saecli.dictionaries import losses as L
from saecli.dictionaries.activations import gated_pre
from saecli.dictionaries.base import LossOutput, StepContext
from saecli.dictionaries.sharding import LatentShard, local

if TYPE_CHECKING:
    from saecli.dictionaries.sae import SparseAutoEncoder


def sharded_loss(
    sae: SparseAutoEncoder, x: torch.Tensor, y: torch.Tensor, ctx: StepContext, shard: LatentShard
) -> LossOutput:
    """LossOutput of one step; `feature_acts` are this rank's columns [N, d_local] (dense, or sparse CSR
    on the sparse path)."""
    if _sparse_ok(sae, x, ctx):
        return _sparse_loss(sae, x, y, ctx, shard)
    w_enc, b_enc, w_dec, b_dec = local(sae.W_enc), local(sae.b_enc), local(sae.W_dec), local(sae.b_dec)
    x_in = x - b_dec.to(x.dtype) if (sae.cfg.apply_decoder_bias_to_pre_encoder and b_dec is not None) else x
    h = torch.nn.functional.linear(x_in.to(w_enc.dtype), w_enc, b_enc)
    norms = sae.norms_of(w_dec)  # [d_local], differentiable
    gate = norms.detach() if sae.gated else None
    f = shard.select(sae.activation, h, gate, sae._k(ctx), bool(ctx.training))
    recon = shard.reduce(f.to(w_dec.dtype) @ w_dec)
    if b_dec is not None:
        recon = recon + b_dec
    terms, extra = sae._common_terms(recon, y)
    acc = L.TermSum(terms, extra, terms["mse"])
    act, kind = sae.cfg.activation, ctx.sparsity_loss_type or "none"
    pen_norms = norms if sae.cfg.sparsity_include_decoder_norm else None
    if act == "jumprelu":
        theta = local(sae.activation.theta_parameter()).exp()
    if kind == "l0":
        if act != "jumprelu":
            raise ValueError("sparsity_loss_type 'l0' needs activation = 'jumprelu'")
        acc.add("sparsity", ctx.l1_coefficient, shard.reduce(L.jumprelu_l0(h, theta, sae.activation.bandwidth, gate)))
    elif kind != "none":
        acc.add(
            "sparsity",
            ctx.l1_coefficient,
            shard.reduce(L.step_sparsity_penalty(ctx, f, pen_norms)),
        )
    if act in ("topk", "batchtopk") and ctx.auxk_coefficient > 0 and ctx.dead_mask is not None:
        acc.add(
            "aux",
            ctx.auxk_coefficient,
            shard.auxk(h, ctx.dead_mask, int(ctx.k_aux or sae.d_model // 2), y - recon, L.gather_decode(w_dec), gate),
        )
    if act == "jumprelu" and ctx.lp_coefficient > 0:
        acc.add("lp", ctx.lp_coefficient, shard.reduce(L.jumprelu_preact_loss(h, theta, pen_norms, gated=sae.gated)))
    if act == "batchtopk":
        extra["threshold"] = sae.activation.theta().detach().clone()
    sae.last_path = "tensor-parallel"
    extra["path"] = sae.last_path
    assert acc.total is not None
    return sae._output(acc.total, terms, f, recon, y, extra)


def _sparse_ok(sae: SparseAutoEncoder, x: torch.Tensor, ctx: StepContext) -> bool:
    """TopK/BatchTopK training steps take the sparse path (as the unsharded SAE's "topk-sparse")."""
    return (
        sae.cfg.activation in ("topk", "batchtopk")
        and bool(getattr(sae.cfg, "sparse_kernels", True))
        and bool(ctx.training)
        and torch.is_grad_enabled()
        and x.dim() == 2
        and x.shape[0] > 0
        and (ctx.sparsity_loss_type or "none") != "l0"
        and not torch.is_autocast_enabled(x.device.type)
    )


def _sparse_loss(
    sae: SparseAutoEncoder, x: torch.Tensor, y: torch.Tensor, ctx: StepContext, shard: LatentShard
) -> LossOutput:
    """The TopK/BatchTopK step on the sparse kernels: the encoder product without gradient (for the global
    selection), then only the selected (and AuxK's) pre-activations, differentiably, through
    `kernels.gather_pre`, and the decoder's partial sums through `kernels.sparse_decode` — per rank the
    work of the unsharded "topk-sparse" path on d_sae / tp latents."""
    w_enc, b_enc, w_dec, b_dec = local(sae.W_enc), local(sae.b_enc), local(sae.W_dec), local(sae.b_dec)
    x_in = x - b_dec.to(x.dtype) if (sae.cfg.apply_decoder_bias_to_pre_encoder and b_dec is not None) else x
    x_enc = x_in.to(w_enc.dtype)
    n_tok, d_local = x.shape[0], w_enc.shape[0]
    norms = sae.norms_of(w_dec)
    gate = norms.detach() if sae.gated else None

    def active(mask: torch.Tensor, h0: torch.Tensor) -> tuple[kernels.SparsePattern, torch.Tensor]:
        """The pattern of the selected latents that fire (ReLU > 0), and their differentiable values."""
        with torch.no_grad():
            pattern, values = kernels.SparsePattern.from_dense(torch.where(mask, h0.clamp_min(0), 0.0))
        return pattern, kernels.gather_pre(x_enc, w_enc, b_enc, values.float(), pattern)

    with torch.no_grad():
        h0 = torch.nn.functional.linear(x_enc, w_enc, b_enc)
        keys = gated_pre(h0, gate)
        if sae.cfg.activation == "topk":
            keep = shard.topk_mask(keys, sae._k(ctx))
        else:
            keep, smallest = shard.batch_topk_mask(keys, sae._k(ctx))
            sae.activation.update_threshold(smallest)
    pattern, f = active(keep, h0)
    recon = shard.reduce(kernels.sparse_decode(f, pattern, w_dec))
    if b_dec is not None:
        recon = recon + b_dec
    terms, extra = sae._common_terms(recon, y)
    acc = L.TermSum(terms, extra, terms["mse"])
    if (ctx.sparsity_loss_type or "none") != "none":
        pen_norms = norms if sae.cfg.sparsity_include_decoder_norm else None
        active_cols = L.Active(pattern.col.long(), n_tok, d_local)
        acc.add(
            "sparsity", ctx.l1_coefficient, shard.reduce(L.step_sparsity_penalty(ctx, f, pen_norms, active=active_cols))
        )
    chosen = None
    if ctx.auxk_coefficient > 0 and ctx.dead_mask is not None:
        chosen = shard.auxk_select(h0, ctx.dead_mask, int(ctx.k_aux or sae.d_model // 2), gate)
    if chosen is not None:
        aux_pattern, acts = active(shard.scatter_mask(*chosen, d_local), h0)
        aux = L.normalized_residual_loss(
            shard.reduce(kernels.sparse_decode(acts, aux_pattern, w_dec)), (y - recon).detach()
        )
        acc.add("aux", ctx.auxk_coefficient, aux)
    if sae.cfg.activation == "batchtopk":
        extra["threshold"] = sae.activation.theta().detach().clone()
    sae.last_path = "tensor-parallel-sparse"
    extra["path"] = sae.last_path
    assert acc.total is not None
    return sae._output(acc.total, terms, pattern.csr(f.detach()), recon, y, extra)
