"""The MOLT's training step with its transforms split over tensor-parallel ranks.

The same maths as `MixtureOfLinearTransforms.loss` on this rank's whole transforms (`LatentShard`, the
split order of `molt.latent_order`): the gate h_local = x W_E,localᵀ + b_E,local; the gate weights
‖U_i V_i‖_F of the local transforms (`transform_norms` on the local factors: per transform, no
communication); the activation with the global TopK/BatchTopK selection (`shard.select`); ŷ = Σ_ranks
Σ_{local i} f_i U_i V_i x (`apply_transforms` on the local factors, its dense or sparse path, then
`shard.reduce`) + b_D. The latent-separable terms (sparsity penalties, JumpReLU's L0 and pre-activation
loss) are summed over ranks the same way; AuxK takes its global top-k_aux over the dead transforms
(`shard.auxk`), decoded through the local transforms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from saecli.dictionaries import losses as L
from saecli.dictionaries.base import LossOutput, StepContext
from saecli.dictionaries.sharding import LatentShard, local

if TYPE_CHECKING:
    from saecli.dictionaries.molt import MixtureOfLinearTransforms


def sharded_loss(
    molt: MixtureOfLinearTransforms,
    x: torch.Tensor,
    y: torch.Tensor,
    keep: torch.Tensor | None,
    lead: torch.Size,
    ctx: StepContext,
    shard: LatentShard,
) -> LossOutput:
    """LossOutput of one step on inputs/targets [N, d] (`keep` [N]: the rows that count); `feature_acts`
    are this rank's gates [..., n_local] (in the split order)."""
    w_e, b_e, b_d = local(molt.W_E), local(molt.b_E), local(molt.b_D)
    act = molt.activation
    h = torch.nn.functional.linear(x.to(w_e.dtype), w_e, b_e)  # [N, n_local]
    norms = molt.transform_norms() if molt.cfg.sparsity_include_decoder_norm else None  # local, differentiable
    gate = norms.detach() if (norms is not None and molt.gated) else None
    f = shard.select(act, h, gate, molt._k(ctx), bool(ctx.training))
    recon = shard.reduce(molt.apply_transforms(f, x))
    if b_d is not None:
        recon = recon + b_d
    path = molt.last_path
    mse = L.mse(recon, y, keep)
    rows = (lambda t: t) if keep is None else (lambda t: t[keep])  # noqa: E731
    x_kept = rows(x)

    terms: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    acc = L.TermSum(terms, extra, mse)
    kind = ctx.sparsity_loss_type or "none"
    theta = local(act.theta_parameter()).exp() if act.name == "jumprelu" else None
    if kind == "l0":
        if theta is None:
            raise ValueError("sparsity_loss_type 'l0' needs activation = 'jumprelu'")
        acc.add("sparsity", ctx.l1_coefficient, shard.reduce(L.jumprelu_l0(rows(h), theta, act.bandwidth, gate)))
    elif kind != "none":
        acc.add("sparsity", ctx.l1_coefficient, shard.reduce(L.step_sparsity_penalty(ctx, rows(f), norms)))
    if act.name in ("topk", "batchtopk") and ctx.auxk_coefficient > 0 and ctx.dead_mask is not None:

        def decode_rows(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            # indices of other ranks' transforms arrive clamped with value 0: add, never overwrite
            dense = torch.zeros(values.shape[0], h.shape[-1], dtype=h.dtype, device=h.device)
            return molt.apply_transforms(dense.scatter_add(1, indices, values.to(h.dtype)), x_kept)

        aux = shard.auxk(
            rows(h), ctx.dead_mask, int(ctx.k_aux or molt.d_model // 2), rows(y - recon), decode_rows, gate
        )
        acc.add("aux", ctx.auxk_coefficient, aux)
    if theta is not None and ctx.lp_coefficient > 0:
        acc.add("lp", ctx.lp_coefficient, shard.reduce(L.jumprelu_preact_loss(rows(h), theta, norms, gated=molt.gated)))
    fired = (rows(f).detach() != 0).to(torch.float32)  # [n_kept, n_local]
    n_kept = max(fired.shape[0], 1)
    if theta is not None:
        extra["mean_threshold"] = shard.reduce(theta.detach().sum()) / molt.d_sae
    if act.name == "batchtopk":
        extra["threshold"] = act.threshold.detach().clone()
    extra["l0"] = shard.reduce(fired.sum()) / n_kept
    extra["active_rank"] = shard.reduce((fired @ molt.layout().rank_of.to(torch.float32)).sum()) / n_kept
    molt.last_path = f"tensor-parallel-{path}"
    extra["path"] = molt.last_path
    extra["mse_per_element"] = L.mse_per_element(rows(recon).detach(), rows(y))
    assert acc.total is not None
    return LossOutput(
        loss=acc.total,
        terms={"mse": mse.detach(), **{k: v.detach() for k, v in terms.items()}},
        feature_acts=f.reshape(*lead, f.shape[-1]),
        reconstruction={molt.out_hook: recon.reshape(*lead, molt.d_model)},
        target={molt.out_hook: y.reshape(*lead, molt.d_model)},
        extra=extra,
    )
