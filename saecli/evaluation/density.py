"""The log10 feature-density histogram: how often each latent fires, on a log scale.

A healthy dictionary shows one bump well below 1 (most latents fire on ~1e-4..1e-2 of tokens); a
second bump near 0 (log10 = 0: fires on every token) means dense latents, a long left tail means
latents on their way to dying. Latents that never fired have no logarithm: they are counted apart
(`n_dead`) and named in the title instead of being pushed into a fake bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class DensityHistogram:
    edges: list[float]  # len(counts) + 1 bin edges in log10(frequency)
    counts: list[int]
    n_dead: int  # latents that never fired (not in `counts`)
    n_tokens: int

    def to_dict(self) -> dict:
        return {"edges": self.edges, "counts": self.counts, "n_dead": self.n_dead, "n_tokens": self.n_tokens}


def log_density_histogram(frequency: torch.Tensor, n_tokens: int, bins_per_decade: int = 4) -> DensityHistogram:
    """Histogram of log10(frequency) over latents that fired at least once.

    Bins are `1 / bins_per_decade` wide, from the lowest frequency the eval could observe (1 / n_tokens,
    rounded down to a bin edge) up to 0 (a latent firing on every token), so histograms of two evals
    of the same length are directly comparable.
    """
    freq = frequency.detach().to(torch.float64).cpu()
    live = freq > 0
    n_dead = int((~live).sum())
    lo = math.floor(math.log10(1.0 / max(n_tokens, 1)) * bins_per_decade) / bins_per_decade
    lo = min(lo, -1.0 / bins_per_decade)
    n_bins = int(round(-lo * bins_per_decade))
    edges = torch.linspace(lo, 0.0, n_bins + 1, dtype=torch.float64)
    logs = freq[live].log10().clamp(lo, 0.0)
    # bucketize with right=True: a value equal to an inner edge falls in the bin that starts at it
    idx = (torch.bucketize(logs, edges, right=True) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(idx, minlength=n_bins)
    return DensityHistogram(
        edges=[round(float(e), 6) for e in edges], counts=[int(c) for c in counts], n_dead=n_dead, n_tokens=n_tokens
    )


def density_title(hist: DensityHistogram) -> str:
    return f"log10 latent density, {hist.n_tokens:,} tokens ({hist.n_dead:,} latents never fired: not shown)"


def save_density_png(hist: DensityHistogram, path: str | Path, title: str | None = None) -> Path:
    """Draw the histogram to a PNG (matplotlib's Agg renderer, written atomically)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (renders with Agg)

    from saecli.fsio import write_with

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    lefts = hist.edges[:-1]
    widths = [b - a for a, b in zip(hist.edges[:-1], hist.edges[1:])]
    ax.bar(lefts, hist.counts, width=widths, align="edge", color="#3b7dd8", edgecolor="white", linewidth=0.5)
    ax.set_xlabel("log10(fraction of tokens on which the latent fires)")
    ax.set_ylabel("latents")
    ax.set_xlim(hist.edges[0], hist.edges[-1])
    ax.set_title(title or density_title(hist), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    write_with(path, lambda p: fig.savefig(p, format="png"))
    return path


def show_density(hist: DensityHistogram, title: str | None = None) -> None:
    """Print the histogram in the terminal (saecli.ui)."""
    from saecli import ui

    ui.histogram(title or density_title(hist), hist.counts, hist.edges)
