"""Loss terms shared by every kind: reconstruction, sparsity penalties, JumpReLU terms, AuxK.

Conventions (one everywhere):
- Reconstruction `mse` = Σ over the model dimension, mean over tokens (and over out hooks' sum:
  a kind with several outputs adds their per-token sums). `mse_per_element` (mean over everything)
  is reported for metrics only.
- A penalty is a per-token sum over latents, then a mean over tokens; the coefficient is applied by
  the caller (the dictionary's `loss()`), so each function here is the bare term.
- `f` are latent activations [..., d_sae] (leading dims are tokens: [N] or [B, T]), `n` the decoder
  norms, anything broadcastable to `f`. A kind whose latents span several trailing dims (a CLT's
  [N, n_layers, d_sae] with norms [n_layers, d_sae]) passes `latent_dims=2`.
- Sparse train steps pass only the active values (`f` [nnz]) with `active=Active(latents, n_tokens,
  d_sae)`: an inactive latent contributes 0 to every penalty, so the same functions give the same
  numbers without a dense [N, d_sae] tensor. AuxK likewise takes a `gather` for the sparse paths.
  Every penalty and AuxK exists once, here.

The `power` penalty is Σ_i (f_i·‖W_d,i‖)^p — the p-th power of the decoder-weighted activation, summed
over latents. Why not the p-norm ‖f⊙n‖_p (lm_saes, SAELens)? For p ≠ 1 the p-norm couples all latents
of a token (its gradient on f_i depends on the token's total), whereas the penalty of the L_p
sparsity papers (e.g. p-annealing, Karvonen et al. 2024) is separable, Σ_i |f_i|^p. Why weight inside
the power rather than |f_i|^p·‖W_d,i‖ (dictionary_learning)? Only (f·n)^p is invariant under the
rescaling f_i → c·f_i, W_d,i → W_d,i / c that leaves the reconstruction unchanged, which is the whole
point of the decoder-norm weighting (Anthropic, April 2024 update). For p = 1 all three agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from saecli.dictionaries.activations import gated_pre, step

if TYPE_CHECKING:
    from saecli.dictionaries.base import StepContext


class Active(NamedTuple):
    """`f` holds only the active values [nnz]: `latents` [nnz] (int64) is each value's latent."""

    latents: torch.Tensor
    n_tokens: int
    d_sae: int


def _token_mean(per_token: torch.Tensor) -> torch.Tensor:
    return per_token.mean() if per_token.numel() else per_token.sum()


def _sum_per_token(per_entry: torch.Tensor, latent_dims: int, active: Active | None) -> torch.Tensor:
    """mean over tokens of the per-token sum over latents (of the active entries only, if given)."""
    if active is not None:
        return per_entry.sum() / max(active.n_tokens, 1)
    return _token_mean(_per_token(per_entry, latent_dims))


def _per_token(t: torch.Tensor, latent_dims: int) -> torch.Tensor:
    """Sum over the trailing `latent_dims` dims (latents): [..tokens.., *latent] → [..tokens..]."""
    return t.sum(dim=tuple(range(-latent_dims, 0)))


# ---------------------------------------------------------------------------------- reconstruction
class _SquaredError(torch.autograd.Function):
    """Σ (ŷ−y)² / n_tokens in float32 with one saved difference: 3 passes over [N, d] instead of ~7."""

    @staticmethod
    def forward(ctx, recon: torch.Tensor, target: torch.Tensor, n_tokens: int) -> torch.Tensor:
        diff = recon.float() - target.float()
        flat = diff.reshape(-1)
        ctx.save_for_backward(diff)
        ctx.n_tokens = n_tokens
        ctx.dtypes = (recon.dtype, target.dtype)
        return torch.dot(flat, flat) / n_tokens

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (diff,) = ctx.saved_tensors
        grad = diff * (2.0 * g / ctx.n_tokens)
        g_recon = grad.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        g_target = (-grad).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return g_recon, g_target, None


def mse(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_d (ŷ−y)², mean over tokens (over tokens where `mask` is true, if given)."""
    if mask is not None:
        per_token = (reconstruction.float() - target.float()).pow(2).sum(-1)
        m = mask.to(per_token.dtype)
        return (per_token * m).sum() / m.sum().clamp_min(1.0)
    n_tokens = reconstruction.numel() // max(reconstruction.shape[-1], 1) if reconstruction.dim() else 1
    if n_tokens == 0:
        return reconstruction.new_zeros((), dtype=torch.float32)
    return _SquaredError.apply(reconstruction, target, n_tokens)


def prefix_mse(
    decode_prefix: Callable[[int], torch.Tensor],
    prefixes: Sequence[int],
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    full_mse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Matryoshka reconstruction loss: the mean over prefixes p of `mse(decode_prefix(p), target)`, where
    `decode_prefix(p)` reconstructs from latents [0, p) only (decoder bias included).

    The mean (equal weights, as Bussmann et al. 2025 and dictionary_learning) keeps the term on the scale
    of a plain MSE, so the learning rate and the AuxK coefficient mean the same with or without prefixes.
    `full_mse`: the caller's MSE of the last prefix when it already has it (not recomputed).
    """
    losses = [
        full_mse if full_mse is not None and i == len(prefixes) - 1 else mse(decode_prefix(p), target, mask)
        for i, p in enumerate(prefixes)
    ]
    return torch.stack(losses).mean()


def mse_per_element(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of (ŷ−y)² over every element (the convention most papers' plots use)."""
    return (reconstruction.float() - target.float()).pow(2).mean()


# -------------------------------------------------------------------------------------- penalties
def weighted(f: torch.Tensor, decoder_norm: torch.Tensor | None, active: Active | None = None) -> torch.Tensor:
    """f_i·‖W_d,i‖ (or f when no decoder norms are given)."""
    if decoder_norm is None:
        return f
    return f * (decoder_norm[active.latents] if active is not None else decoder_norm)


def power_penalty(
    f: torch.Tensor,
    decoder_norm: torch.Tensor | None,
    p: float = 1.0,
    latent_dims: int = 1,
    active: Active | None = None,
) -> torch.Tensor:
    """mean_tokens Σ_i (|f_i|·‖W_d,i‖)^p  (p = 1: the decoder-weighted L1 of Anthropic's April update)."""
    w = weighted(f.abs(), decoder_norm, active)
    return _sum_per_token(w if p == 1.0 else w.pow(p), latent_dims, active)


def tanh_penalty(
    f: torch.Tensor,
    decoder_norm: torch.Tensor | None,
    c: float = 4.0,
    latent_dims: int = 1,
    active: Active | None = None,
) -> torch.Tensor:
    """mean_tokens Σ_i tanh(c·f_i·‖W_d,i‖)  (a smooth, saturating L0 proxy)."""
    return _sum_per_token(torch.tanh(c * weighted(f, decoder_norm, active)), latent_dims, active)


def tanh_quad_penalty(
    f: torch.Tensor,
    decoder_norm: torch.Tensor | None,
    c: float = 4.0,
    frequency_scale: float = 0.01,
    latent_dims: int = 1,
    active: Active | None = None,
) -> torch.Tensor:
    """Σ_i p̂_i·(1 + p̂_i / frequency_scale), p̂_i = mean_tokens tanh(c·f_i·‖W_d,i‖).

    p̂_i estimates latent i's firing frequency; the quadratic part punishes latents that fire on more
    than ~frequency_scale of the tokens much harder than rare ones. (Not a per-token mean: the
    frequency is a batch statistic.)
    """
    t = torch.tanh(c * weighted(f, decoder_norm, active))
    if active is not None:
        p_hat = torch.zeros(active.d_sae, dtype=t.dtype, device=t.device).index_add(0, active.latents, t)
        p_hat = p_hat / active.n_tokens
    else:
        lat = t.shape[t.dim() - latent_dims :]
        p_hat = t.reshape(-1, *lat).mean(0)
    return (p_hat * (1.0 + p_hat / frequency_scale)).sum()


def sparsity_penalty(
    kind: str,
    f: torch.Tensor,
    decoder_norm: torch.Tensor | None,
    *,
    p: float = 1.0,
    c: float = 4.0,
    frequency_scale: float = 0.01,
    latent_dims: int = 1,
    active: Active | None = None,
) -> torch.Tensor:
    """Dispatch on `sparsity_loss_type` ("power" | "tanh" | "tanh-quad")."""
    if kind == "power":
        return power_penalty(f, decoder_norm, p, latent_dims, active)
    if kind == "tanh":
        return tanh_penalty(f, decoder_norm, c, latent_dims, active)
    if kind == "tanh-quad":
        return tanh_quad_penalty(f, decoder_norm, c, frequency_scale, latent_dims, active)
    raise ValueError(f"unknown sparsity_loss_type {kind!r}")


def step_sparsity_penalty(
    ctx: StepContext,
    f: torch.Tensor,
    decoder_norm: torch.Tensor | None,
    *,
    latent_dims: int = 1,
    active: Active | None = None,
) -> torch.Tensor:
    """`sparsity_penalty` of this step's `sparsity_loss_type` with its coefficients from `ctx` (p, tanh
    stretch, frequency scale), so every kind reads them the same way."""
    return sparsity_penalty(
        ctx.sparsity_loss_type or "none",
        f,
        decoder_norm,
        p=ctx.p,
        c=ctx.tanh_stretch_coefficient,
        frequency_scale=ctx.frequency_scale,
        latent_dims=latent_dims,
        active=active,
    )


class TermSum:
    """The running sum of a step's loss terms: `add` records the scaled term as terms[name] and the raw
    value (detached) as extra["raw/<name>"], the names the trainer logs; `total` is None until a term."""

    def __init__(
        self, terms: dict[str, torch.Tensor], extra: dict[str, Any], total: torch.Tensor | None = None
    ) -> None:
        self.terms, self.extra, self.total = terms, extra, total

    def add(self, name: str, coefficient: float, raw: torch.Tensor) -> None:
        """total += coefficient·raw, recorded under `name`."""
        self.terms[name] = coefficient * raw
        self.extra[f"raw/{name}"] = raw.detach()
        self.total = self.terms[name] if self.total is None else self.total + self.terms[name]


# ---------------------------------------------------------------------------------------- JumpReLU
def jumprelu_l0(
    h: torch.Tensor,
    theta: torch.Tensor,
    bandwidth: float,
    decoder_norm: torch.Tensor | None = None,
    latent_dims: int = 1,
) -> torch.Tensor:
    """mean_tokens Σ_i H(x_i − θ_i), x = gated pre-activation; ∂θ through the step STE, none to x."""
    return _token_mean(_per_token(step(gated_pre(h, decoder_norm), theta, bandwidth), latent_dims))


def jumprelu_preact_loss(
    h: torch.Tensor,
    theta: torch.Tensor,
    decoder_norm: torch.Tensor | None = None,
    gated: bool = False,
    latent_dims: int = 1,
) -> torch.Tensor:
    """Pre-activation loss (Anthropic, Jan 2025): mean_tokens Σ_i ReLU(θ_i − h_i)·‖W_d,i‖.

    Pulls latents that sit below their threshold up towards it (revives dead JumpReLU latents).
    With decoder-norm gating (`gated=True`) θ lives in units of h·‖W_d‖, and the same quantity is
    ReLU(θ_i/‖W_d,i‖ − h_i)·‖W_d,i‖ = ReLU(θ_i − h_i·‖W_d,i‖).
    """
    if gated:
        assert decoder_norm is not None
        per = torch.relu(theta - h * decoder_norm)
    else:
        per = weighted(torch.relu(theta - h), decoder_norm)
    return _token_mean(_per_token(per, latent_dims))


# -------------------------------------------------------------------------------------------- AuxK
def auxk_top_dead(
    pre: torch.Tensor,
    dead_mask: torch.Tensor,
    k_aux: int,
    decoder_norm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per token the top min(k_aux, #dead) DEAD latents by (gated) pre-activation: (their ungated
    pre-activations [..., k], their latent indices [..., k]), detached; None when no latent is dead.

    Only the dead columns are read (#dead ≪ d_sae once training is under way). `bias`: added to the
    dead columns first, for a caller whose `pre` is the bias-free encoder product.
    """
    dead_idx = torch.nonzero(dead_mask.to(device=pre.device, dtype=torch.bool), as_tuple=True)[0]
    if dead_idx.numel() == 0 or k_aux <= 0:
        return None
    k = min(int(k_aux), dead_idx.numel())
    sub = pre.detach().index_select(-1, dead_idx)
    if bias is not None:
        sub = sub.add_(bias.detach()[dead_idx].to(sub.dtype))
    keys = sub if decoder_norm is None else gated_pre(sub, decoder_norm.detach()[..., dead_idx])
    j = torch.topk(keys, k, dim=-1, sorted=False).indices
    return sub.gather(-1, j), dead_idx[j]


def auxk_select(
    pre: torch.Tensor, dead_mask: torch.Tensor, k_aux: int, decoder_norm: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Per token, the indices [..., min(k_aux, #dead)] of the top DEAD latents by (gated) pre-activation
    (None when no latent is dead). Selection is not differentiable (indices only)."""
    top = auxk_top_dead(pre, dead_mask, k_aux, decoder_norm)
    return None if top is None else top[1]


def normalized_residual_loss(e_hat: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """‖e − ê‖² / ‖e − mean_tokens(e)‖² (sums over tokens and d): the AuxK loss of Gao et al. 2024.

    Normalising by the residual's variance (as OpenAI's and sparsify's code do) makes the term
    independent of how good the main reconstruction already is, so one coefficient (1/32) fits.
    """
    e = e.float()
    e2 = e.reshape(-1, e.shape[-1])
    var = (e2 - e2.mean(0)).pow(2).sum()
    return (e_hat.float().reshape_as(e2) - e2).pow(2).sum() / var.clamp_min(1e-12)


def auxk_loss(
    pre: torch.Tensor,
    dead_mask: torch.Tensor | None,
    k_aux: int,
    residual: torch.Tensor,
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    decoder_norm: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the top-k_aux dead latents' ReLU'd pre-activations reconstruct the
    residual e = y − ŷ (detached; no decoder bias in ê); loss = normalised ‖e − ê‖². Zero if none dead.

    `pre` [N, d_sae] pre-activations (with grad), `decode(values, indices [N,k]) → [N, d]` the kind's
    sparse decoder without bias. Sparse paths pass `pre` without grad (a reused buffer, `bias` if it
    lacks the encoder bias) and `gather(values, indices)`: the differentiable pre-activations at the
    chosen latents from their detached values (sae.py: a sparse encoder gather).
    """
    zero = pre.new_zeros((), dtype=torch.float32)
    if dead_mask is None:
        return zero
    top = auxk_top_dead(pre, dead_mask, k_aux, decoder_norm, bias)
    if top is None:
        return zero
    values, idx = top
    acts = torch.relu(gather(values, idx) if gather is not None else torch.gather(pre, -1, idx))
    return normalized_residual_loss(decode(acts, idx), residual.detach())


def gather_decode(weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A dense-friendly `decode(values, indices)` over decoder rows `weight` [d_sae, d]: Σ_j v_j W[i_j]."""

    def decode(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # float32: embedding_bag's per-sample-weight backward has no bf16 kernel on CUDA
        w = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
        return torch.nn.functional.embedding_bag(indices, w, per_sample_weights=values.to(w.dtype), mode="sum")

    return decode
