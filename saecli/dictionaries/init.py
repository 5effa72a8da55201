"""Initialising SAE-like dictionaries (anything with W_enc, W_dec [..., d_sae, d], b_enc, b_dec).

- `initialize(model, init_cfg, seed)`: data-independent. W_dec ~ U(±bound) (default bound 1/√d_sae,
  so rows start small: ‖row‖ ≈ √(d/(3·d_sae))), rows rescaled to `decoder_init_norm` when given (to 1
  with `decoder_unit_norm`), W_enc = W_dec (our W_enc is stored like W_dec, [d_sae, d], so this is the
  "encoder = decoder transpose" of the papers) × factor (default: rescaled to rows of norm 1/√3) — by default only when the encoder reads the space
  the decoder writes (a transcoder's encoder is drawn U(±1/√d) on its own) — biases zero.
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


def _tied(model: SparseAutoEncoder, cfg: InitConfig) -> bool:
    """Encoder = decoder transpose: by default only when the encoder reads the space the decoder writes
    (an SAE, not a transcoder: there the tie made 50 % of the latents die, untied 16 %, bench_quality.py)."""
    return cfg.tie_encoder(model.in_hook == model.out_hook) and model.W_enc.shape == model.W_dec.shape


# a tied encoder's row norm when init_encoder_with_decoder_transpose_factor is unset: an nn.Linear row's,
# U(±1/√d) (sparsify's encoder; the untied draw's too): pre-activations of std ≈ 0.58 for E‖x‖ = √d. The
# decoder's own rows (norm √(d/(3·d_sae)) ≈ 0.2 at 8×) tied as they are gave 3.3 % dead latents, this 1.3 %
# (bench_quality.py, SmolLM2 layer 12, 300k tokens, lr 4e-3)
TIED_ENCODER_ROW_NORM = 3**-0.5


def _tied_encoder(model: SparseAutoEncoder, w_dec: torch.Tensor, cfg: InitConfig) -> torch.Tensor:
    """The tied encoder: W_dec × factor; by default, for the sae kind (where it was measured), W_dec's
    directions at norm TIED_ENCODER_ROW_NORM, for the others (a crosscoder's concatenated heads) W_dec × 1."""
    f = cfg.init_encoder_with_decoder_transpose_factor
    if f is None and model.cfg.kind == "sae":
        return _unit_rows(w_dec.float()).to(w_dec.dtype) * TIED_ENCODER_ROW_NORM
    return w_dec * cfg.tie_factor()


def _decoder_row_norm(model: SparseAutoEncoder, cfg: InitConfig) -> float | None:
    """The decoder rows' norm at init: `decoder_init_norm` when set; unset, ZERO for a transcoder without
    decoder-norm gating, else None (the uniform draw's norms). With a zero decoder the encoder gets no
    gradient until the decoder rows have learned where their latents should write, so no latent is pushed
    below zero by a random decoder direction first (sparsify's transcoder init). SmolLM2 layer-12 skip
    transcoder, 300k tokens, lr 4e-3, untied, ungated: dead 13.9 % → 2.1 %, EV 0.713 → 0.717."""
    norm: float | None
    if cfg.decoder_init_norm is not None:
        norm = float(cfg.decoder_init_norm)
    else:
        norm = None if model.in_hook == model.out_hook or model.gated else 0.0  # gating divides by the norms
    if norm == 0.0 and model.gated:
        from saecli.errors import ConfigError

        raise ConfigError(
            "a zero decoder cannot rank latents by h·‖W_dec‖: set dictionary.sparsity_include_decoder_norm = false",
            key="init.decoder_init_norm",
        )
    return norm


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
    norm = _decoder_row_norm(model, cfg)
    if model.cfg.decoder_unit_norm:
        w = _unit_rows(w)
    elif norm is not None and norm > 0:
        w = _unit_rows(w) * norm
    w_dec.copy_(w.to(w_dec.device, w_dec.dtype) if norm != 0 else torch.zeros_like(w_dec))
    w_enc = model.W_enc
    if _tied(model, cfg):  # from the drawn directions (a zero decoder has none)
        w_enc.copy_(_tied_encoder(model, w.to(w_enc.device, w_enc.dtype), cfg))
    else:
        b = 1.0 / math.sqrt(w_enc.shape[-1])
        w_enc.copy_(((torch.rand(w_enc.shape, generator=gen) * 2 - 1) * b).to(w_enc.device, w_enc.dtype))
    model.b_enc.zero_()
    if model.b_dec is not None:
        model.b_dec.zero_()


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 200, tol: float = 1e-7, eps: float = 1e-10) -> torch.Tensor:
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


def grid_search(
    loss_at: Callable[[float], float], coarse: Sequence[float], fine_radius: float = 0.1, fine_points: int = 20
) -> tuple[float, float]:
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
def init_sae_from_data(
    model: SparseAutoEncoder,
    batches: list[dict[str, torch.Tensor]],
    init_cfg: InitConfig | None,
    median_rows: int = 16384,
) -> None:
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
    tied = _tied(model, cfg)
    if cfg.grid_search_init_norm and not model.cfg.decoder_unit_norm:
        directions = _unit_rows(model.W_dec.float())

        def set_norm(norm: float) -> None:
            model.W_dec.copy_((directions * norm).to(dt))
            if tied:
                model.W_enc.copy_(_tied_encoder(model, model.W_dec, cfg))
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
