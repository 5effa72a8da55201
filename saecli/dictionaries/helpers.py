"""Pieces shared by the kinds with dense latents that read one hook and write another (LORSA, MOLT).

- `io_hooks(cfg, hook_points, kind)`: the (in, out) hook pair from `hook_point_in` / `hook_point_out`,
  defaulting to the first two of `activations.hook_points`, with errors that name the key to fix.
- `latent_terms(...)`: every loss term on the latents besides the reconstruction — the sparsity penalty
  (power / tanh / tanh-quad, or JumpReLU's L0), AuxK and the JumpReLU pre-activation loss — exactly as
  the SAE's dense path combines them from `losses.py`, for latents given as rows [n, d_sae].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from saecli.dictionaries import losses as L
from saecli.dictionaries.activations import SparseActivation
from saecli.dictionaries.base import StepContext
from saecli.errors import ConfigError


def io_hooks(
    hook_point_in: str | None, hook_point_out: str | None, hook_points: list[str], kind: str, same: str = ""
) -> tuple[str, str]:
    """(hook read, hook reconstructed) for a kind with `hook_point_in` / `hook_point_out` config keys (the
    transcoder, LORSA, MOLT); unset, the first listed hook and the next other one. `same`: the advice when
    both are the same hook."""
    hook_in = hook_point_in or hook_points[0]
    if hook_point_out:
        hook_out = hook_point_out
    else:
        rest = [h for h in hook_points if h != hook_in]
        if not rest:
            raise ConfigError(
                f"a {kind} reads one hook point and reconstructs another: list both in "
                "activations.hook_points or set dictionary.hook_point_out",
                key="dictionary.hook_point_out",
            )
        hook_out = rest[0]
    for key, hook in (("hook_point_in", hook_in), ("hook_point_out", hook_out)):
        if hook not in hook_points:
            raise ConfigError(
                f"{hook!r} is not in activations.hook_points ({', '.join(hook_points)}): the stream "
                f"must carry every hook the {kind} reads or writes",
                key=f"sae.{key}",
            )
    if hook_in == hook_out:
        raise ConfigError(
            f"hook_point_in equals hook_point_out: {same or f'a {kind} reconstructs another hook point'}",
            key="dictionary.hook_point_out",
        )
    return hook_in, hook_out


def masked_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[..., c] → [n, c]: the rows (tokens) that count."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).to(torch.bool)]


def latent_terms(
    h: torch.Tensor,
    f: torch.Tensor,
    ctx: StepContext,
    activation: SparseActivation,
    *,
    gate: torch.Tensor | None,
    norms: torch.Tensor | None,
    gated: bool,
    residual: torch.Tensor,
    decode_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    k_aux_default: int,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], dict[str, Any]]:
    """The non-reconstruction loss terms on counted rows of pre-activations `h` and activations `f` [n, s].

    `gate`: detached decoder norms the activation was gated by (None: ungated); `norms`: the norms that
    weight the penalties (with gradient; None: unweighted); `residual` [n, d]: target − reconstruction
    (AuxK's target, detached here); `decode_rows(values, indices)` [n, k] → [n, d]: the kind's decoder
    without bias, for AuxK. Returns (sum of the scaled terms or None, scaled terms, extra metrics).
    """
    terms: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    acc = L.TermSum(terms, extra)

    act, kind = activation.name, ctx.sparsity_loss_type or "none"
    if kind == "l0":
        if act != "jumprelu":
            raise ValueError("sparsity_loss_type 'l0' needs activation = 'jumprelu'")
        acc.add("sparsity", ctx.l1_coefficient, L.jumprelu_l0(h, activation.theta(), activation.bandwidth, gate))
    elif kind != "none":
        acc.add(
            "sparsity",
            ctx.l1_coefficient,
            L.step_sparsity_penalty(ctx, f, norms),
        )
    if act in ("topk", "batchtopk") and ctx.auxk_coefficient > 0 and ctx.dead_mask is not None:
        aux = L.auxk_loss(
            h, ctx.dead_mask.to(h.device), int(ctx.k_aux or k_aux_default), residual.detach(), decode_rows, gate
        )
        acc.add("aux", ctx.auxk_coefficient, aux)
    if act == "jumprelu" and ctx.lp_coefficient > 0:
        acc.add("lp", ctx.lp_coefficient, L.jumprelu_preact_loss(h, activation.theta(), norms, gated=gated))
    if act == "jumprelu":
        extra["mean_threshold"] = activation.theta().detach().mean()
    if act == "batchtopk":
        extra["threshold"] = activation.threshold.detach().clone()
    fd = f.detach()
    extra["l0"] = (fd != 0).sum(-1).float().mean() if fd.shape[0] else torch.zeros(())
    return acc.total, terms, extra


def fold_threshold(activation: SparseActivation, factor: float) -> None:
    """θ ← θ·factor for the activations that have a threshold (JumpReLU, BatchTopK's inference θ)."""
    if activation.name in ("jumprelu", "batchtopk"):
        activation.rescale_threshold(factor)
