"""Initialising SAE-like dictionaries (anything with W_enc, W_dec [..., d_sae, d], b_enc, b_dec).

- `initialize(model, init_cfg, seed)`: data-independent. W_dec ~ U(±bound) (default bound 1/√d_sae,
  so rows start small: ‖row‖ ≈ √(d/(3·d_sae))), rows rescaled to `decoder_init_norm` when given (to 1
  with `decoder_unit_norm`), W_enc = W_dec (our W_enc is stored like W_dec, [d_sae, d], so this is the
  "encoder = decoder transpose" of the papers) × factor, biases zero.
- `init_sae_from_data(model, batches, init_cfg)`: the full initialisation the trainer asks for
  (`Dictionary.init_from_data`): `initialize` with the global RNG, then b_dec at the zero / mean /
  geometric median of the (normalised) targets, `init_encoder_bias_with_mean_hidden_pre`, and
  `grid_search_init_norm`.
- `geometric_median`: Weiszfeld's algorithm (lm_saes' "geometric_median" is the mean, which an
  outlier drags; the geometric median is what the option promises).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from saecli.config.init import InitConfig

if TYPE_CHECKING:
    from saecli.dictionaries.sae import SparseAutoEncoder


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def initialize(model: SparseAutoEncoder, init_cfg: InitConfig | None = None, seed: int | None = None) -> None:
    """Data-independent init; `seed` → a private generator (None: torch's global RNG)."""
    cfg = init_cfg or InitConfig()
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    w_dec = model.W_dec
    d_sae = w_dec.shape[-2]
    bound = cfg.decoder_uniform_bound if cfg.decoder_uniform_bound is not None else 1.0 / math.sqrt(d_sae)
    w = (torch.rand(w_dec.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    if model.cfg.decoder_unit_norm:
        w = _unit_rows(w)
    elif cfg.decoder_init_norm is not None:
        w = _unit_rows(w) * cfg.decoder_init_norm
    w_dec.copy_(w.to(w_dec.device, w_dec.dtype))
    w_enc = model.W_enc
    if cfg.init_encoder_with_decoder_transpose and w_enc.shape == w_dec.shape:
        w_enc.copy_(w_dec * cfg.init_encoder_with_decoder_transpose_factor)
    else:
        b = 1.0 / math.sqrt(w_enc.shape[-1])
        w_enc.copy_(((torch.rand(w_enc.shape, generator=gen) * 2 - 1) * b).to(w_enc.device, w_enc.dtype))
    model.b_enc.zero_()
    if model.b_dec is not None:
        model.b_dec.zero_()


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 200, tol: float = 1e-7, eps: float = 1e-10
                     ) -> torch.Tensor:
    """argmin_y Σ_i ‖x_i − y‖ of points [n, d] by Weiszfeld's iterations (float64, from the mean).

    y ← Σ w_i x_i / Σ w_i with w_i = 1/‖x_i − y‖; distances are floored at `eps` so an iterate landing
    on a data point stays finite. Stops when the step is below `tol` × the points' scale.
    """
    x = points.reshape(-1, points.shape[-1]).double()
    y = x.mean(0)
    scale = x.norm(dim=-1).mean().clamp_min(1e-12)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(eps)
        y_new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * scale
        y = y_new
        if done:
            break
    return y.to(points.dtype)


def grid_search(loss_at: Callable[[float], float], coarse: Sequence[float], fine_radius: float = 0.1,
                fine_points: int = 20) -> tuple[float, float]:
    """Lowest `loss_at(v)` over `coarse`, then over linspace(best ± fine_radius, fine_points): (v, loss)."""
    best = min((loss_at(float(v)), float(v)) for v in coarse)
    lo = max(best[1] - fine_radius, 1e-6)
    fine = torch.linspace(lo, best[1] + fine_radius, fine_points).tolist()
    best = min([best] + [(loss_at(float(v)), float(v)) for v in fine])
    return best[1], best[0]


def _stack(batches: list[dict[str, torch.Tensor]], hook: str, max_rows: int | None = None) -> torch.Tensor:
    xs = [b[hook].reshape(-1, b[hook].shape[-1]) for b in batches]
    x = torch.cat(xs) if len(xs) > 1 else xs[0]
    return x[:max_rows] if max_rows else x


@torch.no_grad()
def _init_mse(model: SparseAutoEncoder, x: torch.Tensor, y: torch.Tensor) -> float:
    """Reconstruction loss of the current weights on one batch (no threshold estimate is updated)."""
    from saecli.dictionaries.losses import mse

    h = model.pre_acts(x)
    f = model.activation(h, model._gate(), k=int(model.cfg.k), training=True, update=False)
    recon = model.decode_hooks(f)[model.out_hook]
    return float(mse(recon, y))


@torch.no_grad()
def _set_encoder_bias_to_mean_pre(model: SparseAutoEncoder, x: torch.Tensor) -> None:
    model.b_enc.zero_()
    model.b_enc.sub_(model.pre_acts(x).float().mean(0).to(model.b_enc.dtype))


@torch.no_grad()
def init_sae_from_data(model: SparseAutoEncoder, batches: list[dict[str, torch.Tensor]], init_cfg: InitConfig | None,
                       median_rows: int = 16384) -> None:
    """Full initialisation of an SAE-like model from a few batches of NORMALISED activations."""
    cfg = init_cfg or InitConfig()
    initialize(model, cfg)
    dev, dt = model.W_dec.device, model.W_dec.dtype
    x = _stack(batches, model.in_hook).to(dev)
    y = _stack(batches, model.out_hook).to(dev)
    if model.b_dec is not None:
        if cfg.bias_init_method == "mean":
            model.b_dec.copy_(y.float().mean(0).to(dt))
        elif cfg.bias_init_method == "geometric_median":
            model.b_dec.copy_(geometric_median(y[:median_rows].float()).to(dt))
    n_first = batches[0][model.in_hook].reshape(-1, x.shape[-1]).shape[0]
    x1, y1 = x[:n_first], y[:n_first]
    tied = cfg.init_encoder_with_decoder_transpose and model.W_enc.shape == model.W_dec.shape
    if cfg.grid_search_init_norm and not model.cfg.decoder_unit_norm:
        directions = _unit_rows(model.W_dec.float())

        def set_norm(norm: float) -> None:
            model.W_dec.copy_((directions * norm).to(dt))
            if tied:
                model.W_enc.copy_(model.W_dec * cfg.init_encoder_with_decoder_transpose_factor)
            if cfg.init_encoder_bias_with_mean_hidden_pre:
                _set_encoder_bias_to_mean_pre(model, x1)

        def loss_at(norm: float) -> float:
            set_norm(norm)
            return _init_mse(model, x1, y1)

        best, _ = grid_search(loss_at, torch.linspace(0.1, 5.0, 50).tolist())
        set_norm(best)
        model.init_norm = best
    elif cfg.init_encoder_bias_with_mean_hidden_pre:
        _set_encoder_bias_to_mean_pre(model, x1)
