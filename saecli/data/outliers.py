"""Dropping "massive activation" tokens: rows whose norm is many times the batch's median.

Many language models give a handful of tokens (attention sinks: often the first token of a context or a
delimiter) a residual norm 10-1000× the typical one (Sun et al. 2024, "Massive activations in large
language models"). In SmolLM2-135M's layer 12 about 1 token in 10⁴ has a norm ~100× the median: one
such token in a batch of 4096 carries more squared error than all the others together, so it steers the
MSE gradient and a batch's explained variance swings from 0.85 to 0.3. The cache and live streams
(`activations.max_norm_ratio`, 10 by default) and `analyze` drop, in every batch, the tokens whose
norm exceeds `max_norm_ratio` × the batch's median norm at any hook point (the same tokens for every
hook, so crosscoders stay aligned); whole-context batches keep their shape and mask the tokens out
instead. It is a pure function of each batch, so streams stay exactly resumable. The cache itself
keeps every token.
"""

from __future__ import annotations

import torch

from saecli.data.batch import Batch


def typical_norm_mask(acts: dict[str, torch.Tensor], ratio: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool over the rows (all dims but the last): True where every hook's ‖x‖ ≤ ratio × its median.

    `valid` (same shape, optional) restricts the median to the tokens that count.
    """
    keep: torch.Tensor | None = None
    for a in acts.values():
        norms = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32)
        counted = norms[valid.to(norms.device)] if valid is not None else norms.reshape(-1)
        if counted.numel() == 0:
            continue
        ok = norms <= ratio * counted.median()
        keep = ok if keep is None else keep & ok
    if keep is None:
        leading = next(iter(acts.values())).shape[:-1]
        return torch.ones(leading, dtype=torch.bool, device=next(iter(acts.values())).device)
    return keep


def drop_outliers(batch: Batch, ratio: float) -> tuple[Batch, int]:
    """(batch without its outlier tokens, how many were dropped); the batch itself when none are."""
    keep = typical_norm_mask(batch.acts, ratio, batch.mask)
    if batch.is_context:
        keep = keep.to(batch.tokens.device)
        counted = batch.mask if batch.mask is not None else torch.ones_like(keep)
        dropped = int((counted & ~keep).sum())
        if dropped == 0:
            return batch, 0
        return Batch(batch.acts, batch.tokens, batch.doc, batch.pos, counted & keep, dict(batch.meta)), dropped
    dropped = int(keep.numel() - keep.sum())
    if dropped == 0:
        return batch, 0
    rows = keep.nonzero().squeeze(1)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, rows.to(t.device))

    acts = {h: a.index_select(0, rows) for h, a in batch.acts.items()}
    tokens = batch.tokens.index_select(0, rows.to(batch.tokens.device))
    return Batch(acts, tokens, take(batch.doc), take(batch.pos), take(batch.mask), dict(batch.meta)), dropped
