"""Training statistics kept on the device, read (one sync) only when metrics are logged.

- `FeatureStats`: per-latent firing counts over tumbling windows of `window` steps (dead / almost-dead /
  dense counts are reported from the last complete window, or from the current one before the first
  window completes), and tokens since each latent last fired, which gives AuxK's dead mask.
- `MetricWindow`: sums of loss terms and reconstruction errors since the last log, so the logged values
  are means over the whole logging window rather than one noisy step.

A latent "fires" on a token when its activation is non-zero. Both objects have exact
`state_dict()` / `load_state_dict()` so a resumed run logs and masks exactly like an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def flat_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[N, d] or [B, T, d] (+ [B, T] mask) → [n, d] rows that count."""
    if x.dim() == 2:
        return x if mask is None else x[mask.reshape(-1)]
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1)]


def firing_counts(feature_acts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[d_sae] int64: on how many (counted) tokens each latent is non-zero. Handles sparse COO/CSR."""
    d_sae = feature_acts.shape[-1]
    if feature_acts.layout == torch.sparse_coo:
        if mask is not None or feature_acts.dim() != 2:
            feature_acts = feature_acts.to_dense()
        else:
            fa = feature_acts.coalesce()
            cols = fa.indices()[1][fa.values() != 0]
            return torch.bincount(cols, minlength=d_sae)
    if feature_acts.layout == torch.sparse_csr:
        if mask is not None:
            feature_acts = feature_acts.to_dense()
        else:  # index_add_ rather than bincount or boolean indexing: no device sync on a GPU
            values = feature_acts.values()
            counts = torch.zeros(d_sae, dtype=torch.int64, device=values.device)
            return counts.index_add_(0, feature_acts.col_indices(), (values != 0).to(torch.int64))
    fired = feature_acts.detach() != 0
    if mask is not None:
        fired = fired & mask.reshape(*fired.shape[:-1], 1)
    return fired.reshape(-1, d_sae).sum(0)


class FeatureStats:
    """Dead / dense bookkeeping for one dictionary, vectorised over latents."""

    def __init__(self, d_sae: int, *, window: int, dead_threshold_tokens: int, device: torch.device | str = "cpu"):
        self.d_sae = d_sae
        self.window = max(1, int(window))
        self.dead_threshold_tokens = int(dead_threshold_tokens)
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)  # tokens since last fire
        self.counts = torch.zeros(d_sae, dtype=torch.int64, device=device)  # current window
        self.tokens = 0  # tokens in the current window
        self.steps = 0  # steps in the current window
        self.last_counts: torch.Tensor | None = None  # last complete window
        self.last_tokens = 0

    def update(self, counts: torch.Tensor, n_tokens: int) -> None:
        """Add one batch's firing counts ([d_sae]) over `n_tokens` tokens."""
        counts = counts.to(self.counts.device, torch.int64)
        self.counts += counts
        self.tokens += int(n_tokens)
        self.since_fired = torch.where(counts > 0, torch.zeros_like(self.since_fired), self.since_fired + int(n_tokens))

    def end_step(self) -> None:
        """Call once per optimizer step: closes the window after `window` steps."""
        self.steps += 1
        if self.steps >= self.window:
            self.last_counts, self.last_tokens = self.counts.clone(), self.tokens
            self.counts.zero_()
            self.tokens = 0
            self.steps = 0

    def dead_mask(self) -> torch.Tensor:
        """[d_sae] bool: latents that have not fired for `dead_threshold_tokens` tokens (for AuxK)."""
        return self.since_fired >= self.dead_threshold_tokens

    def frequencies(self) -> torch.Tensor:
        """[d_sae] firing frequency over the last complete window (or the current one if none yet)."""
        if self.last_counts is not None:
            return self.last_counts.double() / max(self.last_tokens, 1)
        return self.counts.double() / max(self.tokens, 1)

    def summary(self, dead_threshold: float, dense_threshold: float) -> dict[str, float]:
        """dead = never fired in the window; almost_dead = frequency < dead_threshold (dead included);
        dense = frequency > dense_threshold; auxk_dead = the current AuxK mask's size."""
        freq = self.frequencies()
        if self.last_counts is None and self.tokens == 0:
            return {}
        counts = torch.stack(
            [
                (freq == 0).sum(),
                (freq < dead_threshold).sum(),
                (freq > dense_threshold).sum(),
                self.dead_mask().sum(),
            ]
        ).tolist()
        return dict(zip(("dead", "almost_dead", "dense", "auxk_dead"), map(int, counts)))

    def state_dict(self) -> dict:
        return {
            "since_fired": self.since_fired.cpu(),
            "counts": self.counts.cpu(),
            "tokens": self.tokens,
            "steps": self.steps,
            "last_tokens": self.last_tokens,
            "last_counts": None if self.last_counts is None else self.last_counts.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        dev = self.counts.device
        self.since_fired = state["since_fired"].to(dev)
        self.counts = state["counts"].to(dev)
        self.tokens, self.steps, self.last_tokens = state["tokens"], state["steps"], state["last_tokens"]
        self.last_counts = None if state["last_counts"] is None else state["last_counts"].to(dev)


class MetricWindow:
    """Sums since the last log: loss terms, ‖x̂−x‖², ‖x−x̄‖², firing latents (on the device), tokens."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.host: dict[str, float] = {}  # sums of plain numbers (token counts): no device traffic
        self.counts: dict[str, int] = {}
        self.steps = 0

    def add(self, key: str, value: torch.Tensor | float, count: int = 1) -> None:
        """Accumulate a scalar; tensors stay on the device (no sync)."""
        if isinstance(value, torch.Tensor):
            value = value.detach().to(self.device, torch.float64).reshape(())
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        else:
            self.host[key] = self.host.get(key, 0.0) + float(value)
        self.counts[key] = self.counts.get(key, 0) + count

    def read(self, fn: Callable[[dict[str, float], dict[str, int]], dict[str, float]]) -> dict[str, float]:
        """One sync: the sums as floats, handed with their counts to `fn`, which makes the metrics."""
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).tolist() if keys else []
        return fn({**dict(zip(keys, values)), **self.host}, dict(self.counts))

    def state_dict(self) -> dict:
        return {
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "host": dict(self.host),
            "counts": dict(self.counts),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.host = dict(state.get("host", {}))
        self.counts = dict(state["counts"])
        self.steps = state["steps"]
