"""Streaming reconstruction and sparsity metrics: feed batches, read one result at the end.

Units: everything is computed in **raw** activation units. A saved dictionary has its dataset-wise
scale folded into its weights (raw in, raw out), so raw is what a user of the saved file sees; for
token-/batch-wise normalisation the reconstruction is mapped back with `Dictionary.denormalize`.
Explained variance and FVU are scale-free, so they are the same in either unit.

Every accumulator works on whole tensors (no Python loop over latents or tokens) and keeps its sums
in float64 so that a million-token eval is exact to many digits:

- explained variance EV = 1 − Σ‖x̂ − x‖² / Σ‖x − x̄‖², x̄ the mean over the *whole* eval set. The
  denominator is accumulated in one pass with Chan et al.'s pairwise update of (count, mean, M2)
  rather than as Σ‖x‖² − N‖x̄‖², which cancels catastrophically on residual streams with a large mean.
  FVU = 1 − EV.
- `explained_variance_legacy`: the mean over tokens of 1 − ‖x̂ − x‖² / ‖x − x̄_batch‖² (x̄ of the
  batch), as older tools log it. It depends on the batch size; kept only for comparison.
- relative reconstruction bias γ = Σ‖x̂‖² / Σ x̂·x (Rajamanoharan et al. 2024, "Gated SAEs": the γ
  minimising E‖x̂/γ − x‖²; γ < 1 means the dictionary shrinks its reconstructions).
- latent statistics: a latent fires on a token when its activation is non-zero. L0 = mean number of
  firing latents per token, L1 = mean Σ|f| per token, frequency = fires / tokens; mean activation is
  taken over the tokens where the latent fires; max over all tokens (0 for a latent that never fires).
  Dead / almost-dead / dense follow saev's EvalMetrics: dead = frequency < dead_threshold,
  almost dead = frequency < almost_dead_threshold (dead ones included), dense = frequency >
  dense_threshold.

A dictionary with several out hooks (crosscoder heads, CLT layers) gets the totals over the
concatenation of its out hooks plus one block of reconstruction metrics per hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

_F64 = torch.float64


class ReconstructionStats:
    """Σ-accumulators of one reconstructed activation (one out hook, or all of them concatenated)."""

    def __init__(self) -> None:
        self.n = 0
        self.d = 0
        self.mean: torch.Tensor | None = None  # [d] running mean of x (float64)
        self.m2 = 0.0  # Σ‖x − x̄‖² around the running mean
        self.sq_err = 0.0  # Σ‖x̂ − x‖²
        self.sq_x = 0.0  # Σ‖x‖²
        self.sq_recon = 0.0  # Σ‖x̂‖²
        self.dot = 0.0  # Σ x̂·x
        self.cos = 0.0  # Σ_t cos(x̂_t, x_t)
        self.l2_ratio = 0.0  # Σ_t ‖x̂_t‖ / ‖x_t‖
        self.legacy_ev = 0.0  # Σ_t (1 − ‖x̂_t − x_t‖² / ‖x_t − x̄_batch‖²)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add a batch: `x` (targets) and `x_hat` (reconstructions), both [N, d]."""
        if x.shape != x_hat.shape or x.dim() != 2:
            raise ValueError(f"expected two [N, d] tensors of one shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        n = x.shape[0]
        if n == 0:
            return
        x = x.to(_F64)
        x_hat = x_hat.to(_F64)
        err = (x_hat - x).pow(2).sum(-1)  # [N]
        nx = x.pow(2).sum(-1)
        nr = x_hat.pow(2).sum(-1)
        dot = (x_hat * x).sum(-1)
        batch_mean = x.mean(0)
        centred = (x - batch_mean).pow(2).sum(-1)  # [N]
        batch_m2 = centred.sum()

        tiny = torch.finfo(_F64).tiny
        cos = dot / (nx * nr).sqrt().clamp_min(tiny)
        ratio = nr.sqrt() / nx.sqrt().clamp_min(tiny)
        legacy = 1.0 - err / centred.clamp_min(tiny)
        sums = torch.stack([err.sum(), nx.sum(), nr.sum(), dot.sum(), cos.sum(), ratio.sum(), legacy.sum(), batch_m2])
        err_s, nx_s, nr_s, dot_s, cos_s, ratio_s, legacy_s, m2_b = sums.tolist()  # one device sync

        if self.mean is None:
            self.mean, self.m2, self.d = batch_mean, m2_b, x.shape[1]
        else:
            # Chan et al.: merge (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b)
            total = self.n + n
            delta = batch_mean - self.mean
            self.m2 += m2_b + float(delta.pow(2).sum()) * self.n * n / total
            self.mean = self.mean + delta * (n / total)
        self.n += n
        self.sq_err += err_s
        self.sq_x += nx_s
        self.sq_recon += nr_s
        self.dot += dot_s
        self.cos += cos_s
        self.l2_ratio += ratio_s
        self.legacy_ev += legacy_s

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        ev = 1.0 - self.sq_err / self.m2 if self.m2 > 0 else float("nan")
        return {
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "explained_variance_legacy": self.legacy_ev / n,
            "mse": self.sq_err / (n * max(self.d, 1)),  # per element
            "mse_per_token": self.sq_err / n,  # Σ over d, mean over tokens
            "cosine_similarity": self.cos / n,
            "l2_ratio": self.l2_ratio / n,
            "relative_reconstruction_bias": self.sq_recon / self.dot if self.dot != 0 else float("nan"),
            "mean_norm": (self.sq_x / n) ** 0.5,  # RMS ‖x‖, to read mse against
        }


class LatentStats:
    """Per-latent firing counts, activation sums and maxima over streamed [N, F] latent activations."""

    def __init__(self) -> None:
        self.n = 0
        self.counts: torch.Tensor | None = None  # [F] int64
        self.sums: torch.Tensor | None = None  # [F] float64 Σ f (zeros add nothing)
        self.maxs: torch.Tensor | None = None  # [F]
        self.abs_sum = 0.0  # Σ |f| over tokens and latents

    @torch.no_grad()
    def update(self, feature_acts: torch.Tensor) -> None:
        """Add a batch of latent activations [N, F] (dense, or sparse CSR/COO: never densified)."""
        f = feature_acts
        if f.dim() != 2:
            raise ValueError(f"expected [N, F] latent activations, got shape {tuple(f.shape)}")
        if f.shape[0] == 0:
            return
        if f.layout == torch.strided:
            counts = (f != 0).sum(0)
            sums = f.sum(0, dtype=_F64)
            maxs = f.amax(0).to(_F64)
            abs_sum = f.abs().sum(dtype=_F64)
        else:
            counts, sums, maxs, abs_sum = _sparse_column_stats(f)
        if self.counts is None or self.sums is None or self.maxs is None:  # the first batch (all three set)
            self.counts, self.sums, self.maxs = counts, sums, maxs
        else:
            self.counts += counts
            self.sums += sums
            self.maxs = torch.maximum(self.maxs, maxs)
        self.abs_sum += float(abs_sum)
        self.n += f.shape[0]

    def per_latent(self) -> dict[str, torch.Tensor]:
        """[F] tensors on the CPU: fires, frequency, mean activation when firing, max activation."""
        if self.counts is None or self.sums is None or self.maxs is None:
            raise ValueError("no batch was added")
        counts = self.counts.cpu()
        freq = counts.to(_F64) / max(self.n, 1)
        mean = torch.where(counts > 0, self.sums.cpu() / counts.clamp_min(1), torch.zeros((), dtype=_F64))
        maxs = torch.where(counts > 0, self.maxs.cpu(), torch.zeros((), dtype=_F64))
        return {"fires": counts, "frequency": freq, "mean_activation": mean, "max_activation": maxs}

    def result(self, dead_threshold: float, almost_dead_threshold: float, dense_threshold: float) -> dict[str, float]:
        stats = self.per_latent()
        freq, counts = stats["frequency"], stats["fires"]
        n = max(self.n, 1)
        d_sae = int(freq.numel())
        n_dead = int((freq < dead_threshold).sum())
        live = counts > 0
        return {
            "l0": float(counts.sum()) / n,
            "l1": self.abs_sum / n,
            "d_sae": d_sae,
            "n_dead": n_dead,
            "n_almost_dead": int((freq < almost_dead_threshold).sum()),
            "n_dense": int((freq > dense_threshold).sum()),
            "n_never_fired": int((~live).sum()),
            "frac_dead": n_dead / max(d_sae, 1),
            "mean_activation_when_firing": float(stats["mean_activation"][live].mean()) if live.any() else 0.0,
        }


def _sparse_column_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-column (fires, Σ, max) and Σ|f| of a sparse [N, F] matrix from its stored entries only."""
    n, width = f.shape
    if f.layout == torch.sparse_csr:
        cols, vals = f.col_indices(), f.values()
    else:
        f = f.coalesce()
        cols, vals = f.indices()[1], f.values()
    nz = vals != 0
    counts = torch.zeros(width, dtype=torch.int64, device=vals.device).index_add_(0, cols, nz.long())
    sums = torch.zeros(width, dtype=_F64, device=vals.device).index_add_(0, cols, vals.to(_F64))
    # max over all N tokens: implicit zeros count unless every token of the column has a stored entry
    stored = torch.zeros(width, dtype=torch.int64, device=vals.device).index_add_(0, cols, torch.ones_like(cols))
    maxs = torch.full((width,), float("-inf"), dtype=_F64, device=vals.device)
    maxs = maxs.scatter_reduce(0, cols, vals.to(_F64), reduce="amax", include_self=True)
    maxs = torch.where(stored < n, maxs.clamp_min(0.0), maxs)
    return counts, sums, maxs, vals.abs().sum(dtype=_F64)


@dataclass
class Thresholds:
    dead: float = 1e-6
    almost_dead: float = 1e-5
    dense: float = 0.1


class EvalAccumulator:
    """All reconstruction and latent metrics of one dictionary over a stream of batches.

    `update(targets, reconstructions, feature_acts)` takes raw targets and raw reconstructions per out
    hook ([N, d] each) and the latent activations ([N, ...]; trailing dims are flattened into latents).
    """

    def __init__(self, out_hooks: list[str], thresholds: Thresholds | None = None):
        self.out_hooks = list(out_hooks)
        self.thresholds = thresholds or Thresholds()
        self.per_hook = {h: ReconstructionStats() for h in self.out_hooks}
        # one out hook: the totals are that hook's stats (not accumulated twice)
        self.total = self.per_hook[self.out_hooks[0]] if len(self.out_hooks) == 1 else ReconstructionStats()
        self.latents = LatentStats()

    @torch.no_grad()
    def update(
        self,
        targets: Mapping[str, torch.Tensor],
        reconstructions: Mapping[str, torch.Tensor],
        feature_acts: torch.Tensor,
    ) -> None:
        xs = [targets[h] for h in self.out_hooks]
        ys = [reconstructions[h] for h in self.out_hooks]
        for h, x, y in zip(self.out_hooks, xs, ys):
            self.per_hook[h].update(x, y)
        if len(xs) > 1:
            self.total.update(torch.cat(xs, dim=-1), torch.cat(ys, dim=-1))
        f = feature_acts
        self.latents.update(f if f.layout != torch.strided else f.reshape(f.shape[0], -1))

    @property
    def n_tokens(self) -> int:
        return self.total.n

    def result(self) -> dict:
        t = self.thresholds
        out: dict = {"n_tokens": self.n_tokens}
        out.update(self.latents.result(t.dead, t.almost_dead, t.dense))
        out.update(self.total.result())
        out["thresholds"] = {"dead": t.dead, "almost_dead": t.almost_dead, "dense": t.dense}
        if len(self.out_hooks) > 1:
            out["per_hook"] = {h: s.result() for h, s in self.per_hook.items()}
        return out

    def per_latent(self) -> dict[str, torch.Tensor]:
        return self.latents.per_latent()
