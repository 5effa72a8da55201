"""Per-feature bookkeeping of a feature analysis, vectorised over all features at once, on the device.

`FeatureBook.update(acts, tokens, doc, pos, mask)` takes one batch of whole contexts with the feature
activations of every token (`acts` [B, T, F]) and updates:

- a fixed-bin activation histogram per feature ([F, bins], log-spaced edges; a value outside the range
  lands in the first/last bin), from which the firing count `act_times` is the row sum;
- the running maximum activation per feature;
- sampled contexts, each sampling keeping `n` contexts per feature with the per-token activations of
  that feature (float16) and the context's tokens:
  * "top": the `n` contexts with the highest context score (= the context's max activation of the
    feature), among contexts where the feature fires (score > 0);
  * "tier@p" for each configured fraction p: the `n` highest-scoring contexts among those whose score
    was ≤ p × the feature's running max *when the context was seen* (the max over all batches up to
    and including its own). The estimator: a context is admitted or not once, at its batch; since the
    running max only grows, every kept context is also ≤ p × the final max (the re-filter with the
    final max is a no-op), but contexts seen before the feature reached its final max and rejected
    then are never reconsidered, so a tier is exact once the max is found early and otherwise holds
    somewhat lower contexts than the final threshold would admit;
  * "non-activating": a uniform random sample (bottom-k sampling with a hashed key per
    (context, feature), so it is reproducible and independent of batching) of contexts where the
    feature never fires.

Merging: every sampling's kept scores live in one [S, F, n_max] tensor (a sampling with n < n_max has
its surplus slots pinned at +inf, so they are always "kept" and never written); one top-k over
[kept | this batch's candidates] per (sampling, feature) decides all samplings at once. Empty slots
score −1 and non-candidates −inf, so a non-candidate never displaces anything and each row frees
exactly as many slots as it takes candidates: the two nonzero() lists (sorted by row) pair up element
by element and only the changed slots are rewritten. Memory is `F × Σn × T × 6 bytes` (int32 tokens +
float16 activations), never proportional to the data; a batch costs a handful of passes over its
activations and four host synchronisations, however many samplings there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MASK31 = (1 << 31) - 1
FP16_MAX = 65504.0
EMPTY = -1.0  # score of an empty slot: below every real score (all ≥ 0), above every non-candidate (−inf)


def score_dtype(device: torch.device) -> torch.dtype:
    """Scores are kept in float64 (exact for hashed keys and any float32 activation), except on MPS."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def hashed_uniform(context_ids: torch.Tensor, n_features: int, seed: int = 0) -> torch.Tensor:
    """[F, B] pseudo-random keys in [0, 1), a pure function of (context id, feature, seed).

    Integer mixing in int64 with every product kept below 2**63 (31-bit state), so CPU and CUDA agree.
    """
    c = (context_ids.to(torch.int64) & _MASK31)[None, :]
    f = torch.arange(n_features, device=context_ids.device, dtype=torch.int64)[:, None]
    x = (c * 1103515245 + f * 2654435 + (seed & 0xFFFF) * 40503 + 12345) & _MASK31
    for _ in range(3):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _MASK31
    x = x ^ (x >> 16)
    return x.to(torch.float64) / float(1 << 31)


@dataclass
class SamplingSpec:
    """One kind of sampled contexts: `kind` is "top", "tier" (with `fraction`) or "non-activating"."""

    name: str
    kind: str
    n: int
    fraction: float | None = None


def default_specs(top: int, tiers: list[float], tier_n: int, non_activating: int) -> list[SamplingSpec]:
    specs = [SamplingSpec("top", "top", top)]
    if tier_n > 0:
        specs += [SamplingSpec(f"tier@{p:g}", "tier", tier_n, p) for p in tiers]
    if non_activating > 0:
        specs.append(SamplingSpec("non-activating", "non-activating", non_activating))
    return specs


class ContextSet:
    """A read-only view of one sampling's kept contexts inside a FeatureBook."""

    def __init__(self, book: FeatureBook, index: int):
        self.book, self.index, self.spec = book, index, book.specs[index]

    def sorted(self) -> dict[str, torch.Tensor]:
        """Kept contexts ordered best first: count [F], value [F, n], tokens/acts [F, n, T], doc/pos [F, n]."""
        b, s, n = self.book, self.index, self.spec.n
        score = b.score[s, :, :n]
        order = score.argsort(dim=1, descending=True, stable=True)
        cols = order + b.offsets[s]
        wide = lambda t: t.gather(1, cols[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        return {
            "count": (score > EMPTY).sum(1),
            "value": b.value[s, :, :n].gather(1, order),
            "tokens": wide(b.tokens),
            "acts": wide(b.acts),
            "doc": b.doc[s, :, :n].gather(1, order),
            "pos": b.pos[s, :, :n].gather(1, order),
        }


class BatchView:
    """One batch as the merge reads it; the per-feature float16 copy is made only when worth it."""

    def __init__(self, acts: torch.Tensor, tokens: torch.Tensor):
        self.acts, self.tokens = acts, tokens
        self._by_feature: torch.Tensor | None = None

    def feature_rows(self, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[P, T] float16 activations of feature f[i] over context b[i].

        acts is [B, T, F]: a row is strided by F. Few rows are gathered directly; many rows (early in a
        run, when most candidates get in) read from one contiguous [F, B, T] copy made for the batch.
        Values beyond float16's range are clamped to ±65504.
        """
        B, T, F = self.acts.shape
        if self._by_feature is None and len(f) * 32 < B * F:
            return self.acts[b, :, f].float().clamp(-FP16_MAX, FP16_MAX).half()
        if self._by_feature is None:  # out-of-range values become ±inf here, clamped on the rows below
            self._by_feature = torch.empty(F, B, T, dtype=torch.float16, device=self.acts.device)
            self._by_feature.copy_(self.acts.permute(2, 0, 1))
        return self._by_feature[f, b].nan_to_num_(posinf=FP16_MAX, neginf=-FP16_MAX)


class FeatureBook:
    """All per-feature statistics and sampled contexts of one analysis (see the module docstring)."""

    def __init__(
        self,
        n_features: int,
        context_size: int,
        specs: list[SamplingSpec],
        *,
        bins: int = 60,
        hist_range: tuple[float, float] = (1e-3, 1e3),
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.device = dev = torch.device(device)
        self.n_features = F = n_features
        self.context_size = T = context_size
        self.seed = seed
        self.specs = [s for s in specs if s.n > 0]
        self.edges = torch.logspace(math.log10(hist_range[0]), math.log10(hist_range[1]), bins + 1, dtype=torch.float64)
        self._inner = self.edges[1:-1].to(device=dev, dtype=torch.float32)
        self.hist = torch.zeros(F, bins, dtype=torch.int64, device=dev)
        self.max_act = torch.zeros(F, dtype=torch.float32, device=dev)
        self.n_tokens = 0  # tokens that counted (mask True)
        self.n_contexts = 0

        S = len(self.specs)
        sizes = [s.n for s in self.specs]
        self.n_max = max(sizes, default=0)
        self.offsets = [sum(sizes[:i]) for i in range(S)]
        total = sum(sizes)
        slot = torch.arange(self.n_max, device=dev)
        live = slot[None, :] < torch.tensor(sizes, device=dev)[:, None]  # [S, n_max]
        self.score = torch.where(live, EMPTY, math.inf).to(score_dtype(dev))[:, None, :].repeat(1, F, 1)
        self.value = torch.zeros(S, F, self.n_max, dtype=torch.float32, device=dev)  # the context's max
        self.doc = torch.full((S, F, self.n_max), -1, dtype=torch.int64, device=dev)
        self.pos = torch.full((S, F, self.n_max), -1, dtype=torch.int64, device=dev)
        self.tokens = torch.zeros(F, total, T, dtype=torch.int32, device=dev)
        self.acts = torch.zeros(F, total, T, dtype=torch.float16, device=dev)
        self._column = torch.tensor(self.offsets, device=dev, dtype=torch.int64)
        kinds = [s.kind for s in self.specs]
        self._tier_rows = [i for i, k in enumerate(kinds) if k == "tier"]
        self._fractions = torch.tensor(
            [self.specs[i].fraction for i in self._tier_rows], dtype=torch.float64, device=dev
        )
        self.sets = [ContextSet(self, i) for i in range(S)]

    def memory_bytes(self) -> int:
        n = sum(s.n for s in self.specs)
        return self.n_features * n * (self.context_size * 6 + 36) + self.hist.numel() * 8

    @torch.no_grad()
    def update(
        self,
        acts: torch.Tensor,
        tokens: torch.Tensor,
        doc: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """One batch of contexts: acts [B, T, F], tokens/doc/pos/mask [B, T] (doc/pos may be None).

        Positions where `mask` is False are zeroed in `acts` in place before anything is counted.
        """
        B, T, F = acts.shape
        if T != self.context_size or F != self.n_features:
            raise ValueError(f"expected acts [B, {self.context_size}, {self.n_features}], got {list(acts.shape)}")
        dev = acts.device
        if mask is not None:
            mask = mask.to(device=dev, dtype=torch.bool)
            ignored = (~mask).nonzero(as_tuple=True)
            acts[ignored] = 0  # in place: usually one BOS per context, not a pass over the whole batch
            self.n_tokens += B * T - int(ignored[0].numel())
            first = mask.to(torch.int32).argmax(1, keepdim=True)  # the first counted token (BOS is not one)
        else:
            self.n_tokens += B * T
            first = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        # where each context starts in the data: (doc, pos) of its first counted token
        first_doc = doc.to(dev).gather(1, first)[:, 0].long() if doc is not None else torch.full((B,), -1, device=dev)
        first_pos = pos.to(dev).gather(1, first)[:, 0].long() if pos is not None else first[:, 0].long()

        self._histogram(acts)
        ctx_max = acts.amax(dim=1)  # [B, F]
        self.max_act = torch.maximum(self.max_act, ctx_max.amax(0).float().clamp_min(0))
        if self.specs:
            cand = self._candidates(ctx_max, B)
            self._merge(cand, ctx_max, BatchView(acts, tokens.to(dev)), first_doc, first_pos)
        self.n_contexts += B

    def _candidates(self, ctx_max: torch.Tensor, B: int) -> torch.Tensor:
        """[S, F, B] score of each context for each sampling; −inf where it is not a candidate."""
        s = ctx_max.T.to(self.score.dtype)  # [F, B]
        fires = s > 0
        neg_inf = torch.tensor(-math.inf, dtype=s.dtype, device=s.device)
        cand = torch.empty(len(self.specs), *s.shape, dtype=s.dtype, device=s.device)
        for i, spec in enumerate(self.specs):
            if spec.kind == "top":
                cand[i] = torch.where(fires, s, neg_inf)
            elif spec.kind == "non-activating":
                ids = torch.arange(self.n_contexts, self.n_contexts + B, device=s.device)
                cand[i] = torch.where(fires, neg_inf, hashed_uniform(ids, self.n_features, self.seed).to(s.dtype))
        if self._tier_rows:  # all tiers in one go: s ≤ p × running max (this batch included)
            limit = self._fractions[:, None, None] * self.max_act.to(s.dtype)[None, :, None]
            cand[self._tier_rows] = torch.where(fires & (s <= limit), s, neg_inf)
        return cand

    def _merge(
        self, cand: torch.Tensor, ctx_max: torch.Tensor, batch: BatchView, doc: torch.Tensor, pos: torch.Tensor
    ) -> None:
        n = self.n_max
        both = torch.cat([self.score, cand], dim=2)  # [S, F, n_max + B]
        chosen = both.topk(n, dim=2, sorted=False).indices
        selected = torch.zeros_like(both, dtype=torch.bool).scatter_(2, chosen, True)
        s_new, f_new, b_new = selected[..., n:].nonzero(as_tuple=True)
        s_old, f_old, slot = (~selected[..., :n]).nonzero(as_tuple=True)
        if s_new.numel() == 0:
            return
        col = self._column[s_old] + slot
        self.score[s_old, f_old, slot] = cand[s_new, f_new, b_new]
        self.value[s_old, f_old, slot] = ctx_max[b_new, f_new].float()
        self.doc[s_old, f_old, slot] = doc[b_new]
        self.pos[s_old, f_old, slot] = pos[b_new]
        # a context chosen by several samplings of one feature is read once per choice (cheap rows)
        self.tokens[f_old, col] = batch.tokens[b_new].to(torch.int32)
        self.acts[f_old, col] = batch.feature_rows(f_new, b_new)

    def _histogram(self, acts: torch.Tensor) -> None:
        F = acts.shape[-1]
        flat = acts.reshape(-1, F)
        rows, feats = (flat > 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        vals = flat[rows, feats].float()
        bins = torch.bucketize(vals, self._inner, right=True)
        nb = self.hist.shape[1]
        self.hist += torch.bincount(feats * nb + bins, minlength=F * nb).view(F, nb)

    def act_times(self) -> torch.Tensor:
        """[F] tokens on which each feature fired (> 0): every firing value is in exactly one bin."""
        return self.hist.sum(1)
