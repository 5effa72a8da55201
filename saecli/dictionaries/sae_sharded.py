"""The SAE / transcoder training step with its latents split over tensor-parallel ranks.

The same maths as `SparseAutoEncoder._loss_dense` (the reference every fast path is tested against), on
this rank's latent slice (`sharding.LatentShard`): h_local = x W_enc,localᵀ + b_enc,local; the
activation with the global selection (`shard.select`); ŷ = Σ_ranks f_local W_dec,local (`shard.reduce`)
+ b_dec. Every latent-separable term (the sparsity penalties, JumpReLU's L0 and pre-activation loss)
is computed on the local latents and summed over ranks the same way; AuxK takes its global top-k_aux
over the dead latents (`shard.auxk`). The fast sparse kernels are bypassed: they fuse the selection into
the encoder product, which the global selection splits in two.

The loss is replicated (identical on every tp rank), so replicated parameters (b_dec, a transcoder's
W_skip) get identical gradients on every rank, and sharded ones get the gradient of their own slice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from saecli.dictionaries import losses as L
from saecli.dictionaries.base import LossOutput, StepContext
from saecli.dictionaries.sharding import LatentShard, local

if TYPE_CHECKING:
    from saecli.dictionaries.sae import SparseAutoEncoder


def sharded_loss(sae: SparseAutoEncoder, x: torch.Tensor, y: torch.Tensor, ctx: StepContext, shard: LatentShard) -> LossOutput:
    """LossOutput of one step; `feature_acts` are this rank's columns [N, d_local] (dense)."""
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
    loss = terms["mse"]
    act, kind = sae.cfg.activation, ctx.sparsity_loss_type or "none"
    pen_norms = norms if sae.cfg.sparsity_include_decoder_norm else None

    def add(name: str, coefficient: float, raw: torch.Tensor) -> None:
        nonlocal loss
        terms[name] = coefficient * raw
        extra[f"raw/{name}"] = raw.detach()
        loss = loss + terms[name]

    if act == "jumprelu":
        theta = local(sae.activation.theta_parameter()).exp()
    if kind == "l0":
        if act != "jumprelu":
            raise ValueError("sparsity_loss_type 'l0' needs activation = 'jumprelu'")
        add("sparsity", ctx.l1_coefficient, shard.reduce(L.jumprelu_l0(h, theta, sae.activation.bandwidth, gate)))
    elif kind != "none":
        add("sparsity", ctx.l1_coefficient, shard.reduce(L.sparsity_penalty(
            kind, f, pen_norms, p=ctx.p, c=ctx.tanh_stretch_coefficient, frequency_scale=ctx.frequency_scale)))
    if act in ("topk", "batchtopk") and ctx.auxk_coefficient > 0 and ctx.dead_mask is not None:
        add("aux", ctx.auxk_coefficient,
            shard.auxk(h, ctx.dead_mask, int(ctx.k_aux or sae.d_model // 2), y - recon,
                       L.gather_decode(w_dec), gate))
    if act == "jumprelu" and ctx.lp_coefficient > 0:
        add("lp", ctx.lp_coefficient, shard.reduce(L.jumprelu_preact_loss(h, theta, pen_norms, gated=sae.gated)))
    if act == "batchtopk":
        extra["threshold"] = sae.activation.theta().detach().clone()
    sae.last_path = "tensor-parallel"
    extra["path"] = sae.last_path
    return sae._output(loss, terms, f, recon, y, extra)
