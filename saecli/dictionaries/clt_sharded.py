"""The cross-layer transcoder's training step with each layer's latents split over tensor-parallel ranks.

The same maths as `CrossLayerTranscoder.loss`'s dense path, on this rank's columns [offset, offset+d_local)
of every layer (`LatentShard` with one block per layer): h [N, L, d_local] from the local encoder rows;
per-layer TopK as one global selection over the N·L rows (each row keeping its layer's k, one
all-gather), BatchTopK per layer (one all-gather per layer), ReLU/JumpReLU locally; ŷ_t = Σ_ranks
Σ_{i≤t} f_i W_dec,local[i→t] (`shard.reduce`) + b_dec[t]; penalties and per-layer firing counts summed
over ranks; AuxK's global top-k_aux over the dead latents of every layer, decoded through the local
cross-layer blocks. The CLT's fast sparse TopK path is bypassed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from saecli.dictionaries import losses as L
from saecli.dictionaries.activations import gated_pre, jumprelu_gated
from saecli.dictionaries.base import LossOutput, StepContext
from saecli.dictionaries.crosscoder import layered_output
from saecli.dictionaries.sharding import LatentShard, local

if TYPE_CHECKING:
    from saecli.dictionaries.clt import CrossLayerTranscoder


def _activate(
    clt: CrossLayerTranscoder, h: torch.Tensor, gate: torch.Tensor | None, ctx: StepContext, shard: LatentShard
) -> torch.Tensor:
    """`clt.activate` on this rank's columns h [N, L, d_local], with the global selections."""
    name = clt.cfg.activation
    if name == "relu":
        return torch.relu(h)
    if name == "jumprelu":
        assert clt.activation is not None
        return jumprelu_gated(h, local(clt.activation.theta_parameter()).exp(), clt.activation.bandwidth, gate)
    keys = gated_pre(h, gate).detach()
    n, n_layers, d_local = h.shape
    ks = clt.layer_ks(ctx)
    rows = shard.per_block()
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    if name == "topk":
        row_k = torch.tensor(ks, device=h.device).repeat(n)  # rows are (token, layer), layer fastest
        keep = rows.topk_mask(keys.reshape(-1, d_local), max(ks), row_k=row_k).view_as(h)
        return torch.where(keep, torch.relu(h), zero)
    if not bool(ctx.training):
        theta = clt.batchtopk_threshold.to(h.dtype).unsqueeze(-1)  # type: ignore[operator]  # no_grad hides its type
        return torch.where(keys > theta, h, zero)
    masks, smallest = zip(*(rows.batch_topk_mask(keys[:, layer], ks[layer]) for layer in range(n_layers)), strict=True)
    clt._update_batchtopk_threshold(torch.stack(smallest))
    return torch.where(torch.stack(masks, dim=1), torch.relu(h), zero)


def sharded_loss(
    clt: CrossLayerTranscoder,
    inputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    ctx: StepContext,
    shard: LatentShard,
) -> LossOutput:
    """LossOutput of one step; `feature_acts` are this rank's latents [N, L·d_local] (layer-major, dense)."""
    w_enc, b_enc, w_dec, b_dec = local(clt.W_enc), local(clt.b_enc), local(clt.W_dec), local(clt.b_dec)
    x = clt._stack_inputs(inputs)
    y = torch.stack([targets[hk].reshape(-1, clt.d_model) for hk in clt.out_hooks], dim=1)  # [N, L, d]
    h = torch.einsum("nld,lsd->nls", x.to(w_enc.dtype), w_enc) + b_enc  # [N, L, d_local]
    n_tok = h.shape[0]
    norms = clt.layer_decoder_norms(w_dec)  # [L, d_local], differentiable
    gate = norms.detach() if clt.gated else None
    f3 = _activate(clt, h, gate, ctx, shard)
    feature_acts = f3.reshape(n_tok, -1)
    recon = shard.reduce(clt.decode_layers(feature_acts, bias=False, w_dec=w_dec))
    if b_dec is not None:
        recon = recon + b_dec
    mse = L.mse(recon.reshape(n_tok, -1), y.reshape(n_tok, -1))
    terms: dict[str, torch.Tensor] = {"mse": mse}
    extra: dict[str, Any] = {"mse_per_element": L.mse_per_element(recon.detach(), y)}
    acc = L.TermSum(terms, extra, mse)
    act, kind = clt.cfg.activation, ctx.sparsity_loss_type or "none"
    pen_norms = norms if clt.cfg.sparsity_include_decoder_norm else None
    theta = local(clt.activation.theta_parameter()).exp() if act == "jumprelu" and clt.activation else None
    if kind == "l0":
        if theta is None or clt.activation is None:
            raise ValueError("sparsity_loss_type 'l0' needs activation = 'jumprelu'")
        acc.add(
            "sparsity",
            ctx.l1_coefficient,
            shard.reduce(L.jumprelu_l0(h, theta, clt.activation.bandwidth, gate, latent_dims=2)),
        )
    elif kind != "none":
        acc.add(
            "sparsity",
            ctx.l1_coefficient,
            shard.reduce(L.step_sparsity_penalty(ctx, f3, pen_norms, latent_dims=2)),
        )
    if act in ("topk", "batchtopk") and ctx.auxk_coefficient > 0 and ctx.dead_mask is not None:

        def decode(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            return clt.decode_sparse(values, indices, bias=False, w_dec=w_dec).reshape(n_tok, -1)

        acc.add(
            "aux",
            ctx.auxk_coefficient,
            shard.auxk(
                h.reshape(n_tok, -1),
                ctx.dead_mask.reshape(-1),
                int(ctx.k_aux or clt.d_model // 2),
                (y - recon).detach().reshape(n_tok, -1),
                decode,
                gate.reshape(-1) if gate is not None else None,
            ),
        )
    if theta is not None and ctx.lp_coefficient > 0:
        acc.add(
            "lp",
            ctx.lp_coefficient,
            shard.reduce(L.jumprelu_preact_loss(h, theta, pen_norms, gated=clt.gated, latent_dims=2)),
        )
    clt.last_path = "tensor-parallel"
    extra["path"] = clt.last_path
    assert acc.total is not None
    return layered_output(clt.out_hooks, acc.total, terms, feature_acts, recon, y, extra)
