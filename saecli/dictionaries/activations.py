"""Sparse activation functions over pre-activations `h` of shape [..., d_sae], shared by every kind.

Everything here is kind-agnostic: a function takes pre-activations and (optionally) the decoder norms
`n` ([d_sae], or anything broadcastable to `h`) and returns latent activations of the same shape.

Decoder-norm gating (`sparsity_include_decoder_norm`, as in lm_saes): the activation is applied to
the *gated* pre-activation `x = h·n` and divided back, `f = act(h·n) / n`. For ReLU this changes
nothing (n > 0); for TopK/BatchTopK it changes which latents win (a latent whose decoder row is long
writes more, so it ranks higher); for JumpReLU/BatchTopK the threshold θ lives in gated units.
`gated_pre(h, n)` returns `x` and is the only place the convention is written.

JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"): θ = exp(log_threshold) > 0 per latent,
forward `x·H(x−θ)`. Straight-through pseudo-gradients with the rectangle kernel K(u) = 1[|u| < ½] and
bandwidth ε:
    ∂/∂θ  JumpReLU(x) = −(θ/ε)·K((x−θ)/ε)        ∂/∂x JumpReLU(x) = H(x−θ)   (the mask)
    ∂/∂θ  H(x−θ)      = −(1/ε)·K((x−θ)/ε)        ∂/∂x H(x−θ)      = 0        (used by the L0 penalty)
The functions take θ (not log θ): autograd chains ∂θ/∂logθ = θ through `log_threshold.exp()`.

BatchTopK (Bussmann et al. 2024): in training keep the k·N largest (gated) activations of the whole
batch; at inference use a threshold θ estimated during training as a running average of the
smallest kept positive activation per batch, then `x·1[x > θ]` like a JumpReLU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


def gated_pre(h: torch.Tensor, decoder_norm: torch.Tensor | None) -> torch.Tensor:
    """The pre-activation the sparsifier sees: `h·‖W_d‖` with decoder-norm gating, else `h`."""
    return h if decoder_norm is None else h * decoder_norm


# ---------------------------------------------------------------------------------------- ReLU / TopK
def relu(h: torch.Tensor) -> torch.Tensor:
    return torch.relu(h)


def topk_indices(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k of `x` [..., d_sae]: (values, indices), both [..., k]."""
    return torch.topk(x, k, dim=-1, sorted=False)


def topk(h: torch.Tensor, k: int, decoder_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per token, keep the k largest (gated) pre-activations, ReLU them, zero the rest.

    The kept value is `relu(h)` at the selected latents (gating only changes the selection).
    Gradient flows to the kept entries only.
    """
    x = gated_pre(h, decoder_norm)
    _, idx = topk_indices(x.detach(), k)
    kept = torch.gather(h, -1, idx)
    return torch.zeros_like(h).scatter(-1, idx, torch.relu(kept))


# ------------------------------------------------------------------------------------------ BatchTopK
def batch_topk(h: torch.Tensor, k: int, decoder_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k·N largest (gated, ReLU'd) activations over the whole batch (N = tokens).

    Returns (feature_acts, smallest kept positive gated activation) — the latter (a 0-dim tensor,
    NaN if nothing positive was kept) feeds the inference-threshold estimate.
    """
    x = gated_pre(h, decoder_norm)
    d_sae = h.shape[-1]
    n_tokens = h.numel() // d_sae
    flat = torch.relu(x.detach()).reshape(-1)
    n_keep = min(k * n_tokens, flat.numel())
    vals, idx = torch.topk(flat, n_keep, sorted=False)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, vals > 0).view_as(h)
    positive = vals[vals > 0]
    smallest = positive.min() if positive.numel() else torch.full((), float("nan"), device=h.device)
    return torch.where(keep, torch.relu(h), torch.zeros((), dtype=h.dtype, device=h.device)), smallest


# ------------------------------------------------------------------------------------------- JumpReLU
def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1[|u| < ½] (the rectangle kernel of the paper, integral 1)."""
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reduce a broadcast gradient back to the shape of a parameter (e.g. [N, d_sae] → [d_sae])."""
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


class _JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        mask = x > theta
        ctx.save_for_backward(x, theta, mask)
        ctx.bandwidth = bandwidth
        return x * mask

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, theta, mask = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_x = g * mask if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _sum_to(-(theta / eps) * _rectangle((x - theta) / eps) * g, theta)
        return grad_x, grad_theta, None


class _StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _sum_to(-(1.0 / eps) * _rectangle((x - theta) / eps) * g, theta)
        return None, grad_theta, None  # no pseudo-gradient to x through the step


def jumprelu(x: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """`x·H(x−θ)` with the straight-through ∂θ of the paper; x's gradient is the mask."""
    return _JumpReLUFn.apply(x, theta.to(x.dtype), float(bandwidth))


def step(x: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """`H(x−θ)` (0/1) with ∂θ = −(1/ε)K((x−θ)/ε) and no gradient to x; Σ over latents is the L0."""
    return _StepFn.apply(x, theta.to(x.dtype), float(bandwidth))


def jumprelu_gated(
    h: torch.Tensor, theta: torch.Tensor, bandwidth: float, decoder_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """JumpReLU with optional decoder-norm gating: `JumpReLU(h·n)/n` (= h·1[h·n > θ])."""
    if decoder_norm is None:
        return jumprelu(h, theta, bandwidth)
    return jumprelu(h * decoder_norm, theta, bandwidth) / decoder_norm


def threshold(h: torch.Tensor, theta: torch.Tensor, decoder_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Inference-time hard threshold `h·1[h·n > θ]` (BatchTopK at inference; no special gradient)."""
    return h * (gated_pre(h, decoder_norm) > theta)


# ------------------------------------------------------------------------------------- the module
class SparseActivation(nn.Module):
    """Holds an activation's state (JumpReLU log-threshold parameter, BatchTopK threshold buffers).

    `shape` is the latent shape (`d_sae`, or e.g. `(n_layers, d_sae)` for a CLT); thresholds broadcast
    against pre-activations [..., *shape]. State-dict keys: `log_threshold` (jumprelu),
    `threshold` and `threshold_weight` (batchtopk: the running estimate and its EMA weight).
    """

    log_threshold: nn.Parameter  # jumprelu only
    threshold: torch.Tensor  # batchtopk only (buffers)
    threshold_weight: torch.Tensor

    def __init__(
        self,
        name: str,
        shape: int | tuple[int, ...],
        *,
        jumprelu_threshold_init: float = 0.1,
        bandwidth: float = 2.0,
        batchtopk_threshold_decay: float = 0.999,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
        self.name = name
        self.bandwidth = float(bandwidth)
        self.decay = float(batchtopk_threshold_decay)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if name == "jumprelu":
            # thresholds stay float32 even for bf16 weights (a bf16 log-threshold stops learning)
            init = torch.full(shape, float(jumprelu_threshold_init), dtype=torch.float32).log()
            self.log_threshold = nn.Parameter(init)
        if name == "batchtopk":
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
            self.register_buffer("threshold_weight", torch.zeros((), dtype=torch.float32))

    @property
    def is_topk(self) -> bool:
        return self.name in ("topk", "batchtopk")

    def theta(self) -> torch.Tensor:
        """The threshold in gated units (jumprelu: exp(log_threshold); batchtopk: the estimate)."""
        if self.name == "jumprelu":
            return self.log_threshold.exp()
        if self.name == "batchtopk":
            return self.threshold
        raise AttributeError(f"activation {self.name!r} has no threshold")

    def theta_parameter(self) -> torch.Tensor:
        """JumpReLU's log-threshold parameter itself (a DTensor shard when the latents are split)."""
        if self.name != "jumprelu":
            raise AttributeError(f"activation {self.name!r} has no threshold parameter")
        return self.log_threshold

    @torch.no_grad()
    def update_threshold(self, smallest_kept: torch.Tensor) -> None:
        """BatchTopK: fold one batch's smallest kept positive activation into the running average.

        A bias-corrected exponential moving average: the first batch sets θ exactly, later batches
        weigh in with decay `batchtopk_threshold_decay` (so an early large-k estimate is forgotten).
        """
        if torch.isnan(smallest_kept):
            return
        w = self.threshold_weight * self.decay + 1.0
        self.threshold.add_((smallest_kept.float() - self.threshold) / w)
        self.threshold_weight.copy_(w)

    def forward(
        self,
        h: torch.Tensor,
        decoder_norm: torch.Tensor | None = None,
        k: int | None = None,
        training: bool = True,
        update: bool = True,
    ) -> torch.Tensor:
        """Pre-activations [..., *shape] → latent activations (same shape).

        `k` is the current k (topk/batchtopk, after the trainer's schedule). BatchTopK uses the batch
        rule when `training` (and then updates θ unless `update=False`), the threshold otherwise.
        """
        if self.name == "relu":
            return torch.relu(h)
        if self.name == "topk":
            assert k is not None, "topk needs k"
            return topk(h, k, decoder_norm)
        if self.name == "batchtopk":
            if training:
                assert k is not None, "batchtopk needs k"
                acts, smallest = batch_topk(h, k, decoder_norm)
                if update:
                    self.update_threshold(smallest)
                return acts
            return threshold(h, self.threshold.to(h.dtype), decoder_norm)
        return jumprelu_gated(h, self.log_threshold.exp(), self.bandwidth, decoder_norm)

    @torch.no_grad()
    def rescale_threshold(self, factor: float | torch.Tensor) -> None:
        """θ ← θ·factor (used when folding the activation scale into the weights)."""
        if self.name == "jumprelu":
            self.log_threshold.add_(torch.log(torch.as_tensor(factor, dtype=torch.float32)))
        elif self.name == "batchtopk":
            self.threshold.mul_(factor)
