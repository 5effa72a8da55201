"""Per-feature bookkeeping of a feature analysis, vectorised over all features at once, on the device.

`FeatureBook.update(acts, tokens, doc, pos, mask)` takes one batch of whole contexts with the feature
activations of every token (`acts` [B, T, F], ignored tokens already zero or masked here) and updates:

- a fixed-bin activation histogram per feature ([F, bins], log-spaced edges; a value outside the range
  lands in the first/last bin), from which the firing count `act_times` is the row sum;
- the running maximum activation per feature;
- sampled contexts (`ContextSet`), each keeping `n` contexts per feature with the per-token activations
  of that feature (float16) and the context's tokens:
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

Merging is a top-k over the concatenation [kept scores | this batch's scores] per feature; only the
slots that change are rewritten (evicted slot ↔ inserted candidate, paired per feature by rank), so
memory is `F × Σn × T × 6 bytes` (int32 tokens + float16 activations), never proportional to the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MASK31 = (1 << 31) - 1
FP16_MAX = 65504.0


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
    """`n` kept contexts per feature. Empty slots have score −inf."""

    def __init__(self, spec: SamplingSpec, n_features: int, context_size: int, device: torch.device):
        self.spec = spec
        n, F, T = spec.n, n_features, context_size
        self.score = torch.full((F, n), -math.inf, dtype=score_dtype(device), device=device)
        self.value = torch.zeros(F, n, dtype=torch.float32, device=device)  # the context's max activation
        self.tokens = torch.zeros(F, n, T, dtype=torch.int32, device=device)
        self.acts = torch.zeros(F, n, T, dtype=torch.float16, device=device)
        self.doc = torch.full((F, n), -1, dtype=torch.int64, device=device)
        self.pos = torch.full((F, n), -1, dtype=torch.int64, device=device)

    def merge(self, cand: torch.Tensor, batch: "BatchView") -> None:
        """Merge candidates `cand` [F, B] (−inf: not a candidate) of one batch into the kept set."""
        n = self.score.shape[1]
        if n == 0:
            return
        both = torch.cat([self.score, cand], dim=1)  # [F, n + B]
        chosen = both.topk(n, dim=1, sorted=False).indices
        selected = torch.zeros_like(both, dtype=torch.bool).scatter_(1, chosen, True)
        inserted = selected[:, n:]
        # A real candidate can only be chosen over a slot it beats; −inf picked over −inf is harmless
        # but skip it to avoid pointless writes (and keep the per-feature counts equal).
        inserted &= cand > -math.inf
        evicted = ~selected[:, :n]
        n_ins = inserted.sum(1)
        if not bool(n_ins.any()):
            return
        # Pair the k-th inserted candidate of feature f with the k-th freed slot of f: both nonzero()
        # lists are sorted by feature, so after dropping surplus freed slots (from skipped −inf picks)
        # they align element by element.
        free_rank = evicted.cumsum(1)
        evicted &= free_rank <= n_ins[:, None]
        f_new, b_new = inserted.nonzero(as_tuple=True)
        f_slot, s_slot = evicted.nonzero(as_tuple=True)
        self.score[f_slot, s_slot] = cand[f_new, b_new]
        self.value[f_slot, s_slot] = batch.ctx_max[b_new, f_new].float()
        self.tokens[f_slot, s_slot] = batch.tokens32()[b_new]
        self.acts[f_slot, s_slot] = batch.feature_rows(f_new, b_new)
        self.doc[f_slot, s_slot] = batch.doc[b_new]
        self.pos[f_slot, s_slot] = batch.pos[b_new]

    def sorted(self) -> dict[str, torch.Tensor]:
        """Kept contexts ordered best first; `count` [F] says how many slots are filled."""
        order = self.score.argsort(dim=1, descending=True, stable=True)
        take = lambda t: t.gather(1, order if t.dim() == 2 else order[..., None].expand_as(t))  # noqa: E731
        return {
            "count": (self.score > -math.inf).sum(1),
            "value": take(self.value),
            "tokens": take(self.tokens),
            "acts": take(self.acts),
            "doc": take(self.doc),
            "pos": take(self.pos),
        }


class BatchView:
    """One batch as the context sets read it; the per-feature float16 copy is made only when worth it."""

    def __init__(self, acts: torch.Tensor, tokens: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor,
                 ctx_max: torch.Tensor):
        self.acts, self.tokens, self.doc, self.pos, self.ctx_max = acts, tokens, doc, pos, ctx_max
        self._tokens32: torch.Tensor | None = None
        self._by_feature: torch.Tensor | None = None

    def tokens32(self) -> torch.Tensor:
        if self._tokens32 is None:
            self._tokens32 = self.tokens.to(torch.int32)
        return self._tokens32

    def feature_rows(self, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[P, T] float16 activations of feature f[i] over context b[i].

        acts is [B, T, F]: a row is strided by F. Few rows are gathered directly; many rows (early in a
        run, when most candidates get in) read from one contiguous [F, B, T] copy made for the batch.
        """
        B, T, F = self.acts.shape
        if self._by_feature is None and len(f) * 32 < B * F:
            return _half(self.acts[b, :, f])
        if self._by_feature is None:
            self._by_feature = torch.empty(F, B, T, dtype=torch.float16, device=self.acts.device)
            self._by_feature.copy_(self.acts.permute(2, 0, 1))
            self._by_feature.nan_to_num_(posinf=FP16_MAX, neginf=-FP16_MAX)
        return self._by_feature[f, b]


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-FP16_MAX, FP16_MAX).half()


class FeatureBook:
    """All per-feature statistics and sampled contexts of one analysis (see the module docstring)."""

    def __init__(self, n_features: int, context_size: int, specs: list[SamplingSpec], *, bins: int = 60,
                 hist_range: tuple[float, float] = (1e-3, 1e3), seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.n_features = n_features
        self.context_size = context_size
        self.seed = seed
        self.edges = torch.logspace(math.log10(hist_range[0]), math.log10(hist_range[1]), bins + 1,
                                    dtype=torch.float64)
        self._inner = self.edges[1:-1].to(device=self.device, dtype=torch.float32)
        self.hist = torch.zeros(n_features, bins, dtype=torch.int64, device=self.device)
        self.max_act = torch.zeros(n_features, dtype=torch.float32, device=self.device)
        self.sets = [ContextSet(s, n_features, context_size, self.device) for s in specs]
        self.n_tokens = 0  # tokens that counted (mask True)
        self.n_contexts = 0

    def memory_bytes(self) -> int:
        n = sum(s.spec.n for s in self.sets)
        return self.n_features * n * (self.context_size * 6 + 36) + self.hist.numel() * 8

    @torch.no_grad()
    def update(self, acts: torch.Tensor, tokens: torch.Tensor, doc: torch.Tensor | None = None,
               pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> None:
        """One batch of contexts: acts [B, T, F], tokens/doc/pos/mask [B, T] (doc/pos may be None).

        Positions where `mask` is False are zeroed in `acts` in place before anything is counted.
        """
        B, T, F = acts.shape
        if T != self.context_size or F != self.n_features:
            raise ValueError(f"expected acts [B, {self.context_size}, {self.n_features}], got {list(acts.shape)}")
        if mask is not None:
            mask = mask.to(device=acts.device, dtype=torch.bool)
            ignored = (~mask).nonzero(as_tuple=True)
            acts[ignored] = 0  # in place: usually one BOS per context, not a pass over the whole batch
            self.n_tokens += B * T - int(ignored[0].numel())
        else:
            self.n_tokens += B * T
        # where each context starts in the data: (doc, pos) of its first counted token (BOS is not one)
        first = mask.to(torch.int32).argmax(1, keepdim=True) if mask is not None else torch.zeros(B, 1, dtype=torch.int64)
        first = first.to(acts.device)
        first_doc = doc.to(acts.device).gather(1, first)[:, 0].long() if doc is not None else torch.full((B,), -1, device=acts.device)
        first_pos = pos.to(acts.device).gather(1, first)[:, 0].long() if pos is not None else first[:, 0].long()

        self._histogram(acts)
        ctx_max = acts.amax(dim=1)  # [B, F]
        self.max_act = torch.maximum(self.max_act, ctx_max.amax(0).float().clamp_min(0))
        s = ctx_max.T.to(self.sets[0].score.dtype) if self.sets else None  # [F, B]
        fires = s > 0 if s is not None else None
        neg_inf = torch.tensor(-math.inf, dtype=s.dtype, device=s.device) if s is not None else None
        view = BatchView(acts, tokens.to(acts.device), first_doc, first_pos, ctx_max)
        for cs in self.sets:
            if cs.spec.kind == "top":
                cand = torch.where(fires, s, neg_inf)
            elif cs.spec.kind == "tier":
                limit = (cs.spec.fraction * self.max_act.to(s.dtype))[:, None]
                cand = torch.where(fires & (s <= limit), s, neg_inf)
            else:
                ids = torch.arange(self.n_contexts, self.n_contexts + B, device=acts.device)
                keys = hashed_uniform(ids, F, self.seed).to(s.dtype)
                cand = torch.where(fires, neg_inf, keys)
            cs.merge(cand, view)
        self.n_contexts += B

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
