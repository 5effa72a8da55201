"""`Batch`: what every activation stream yields and every loop consumes.

Token streams (the default) yield flat batches: `acts[hook]` is [N, d] and `tokens`, `doc`, `pos`
are [N]. Context streams (for dictionaries with `needs_context`, e.g. LORSA) yield whole windows:
`acts[hook]` is [B, T, d], `tokens`/`doc`/`pos`/`mask` are [B, T], and `mask` marks the positions that
count in losses and metrics (ignored tokens are False but still present, so attention sees them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    acts: dict[str, torch.Tensor]
    tokens: torch.Tensor
    doc: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Tokens that count (mask True), the unit of every token budget."""
        if self.mask is not None:
            return int(self.mask.sum())
        return int(self.tokens.numel())

    @property
    def is_context(self) -> bool:
        return self.tokens.dim() == 2

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        acts = {k: v.to(device=device, dtype=dtype or v.dtype, non_blocking=True) for k, v in self.acts.items()}

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        tokens = self.tokens.to(device, non_blocking=True)
        return Batch(acts, tokens, mv(self.doc), mv(self.pos), mv(self.mask), dict(self.meta))
