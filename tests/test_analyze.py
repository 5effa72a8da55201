"""Feature analysis: the streaming bookkeeping equals brute force; the analyzer's outputs and atomicity."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saecli.analysis.topk import FeatureBook, default_specs, hashed_uniform
from saecli.dictionaries.base import Dictionary, LossOutput

F, T, B, N_BATCHES = 7, 6, 5, 6


def random_stream(seed: int = 0, n_batches: int = N_BATCHES):
    """Sparse random activations (about 1/3 of tokens fire per feature); feature 6 never fires."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        acts = torch.rand(B, T, F, generator=g) * torch.linspace(0.5, 40.0, F)
        acts *= torch.rand(B, T, F, generator=g) < 0.33
        acts[..., 6] = 0
        tokens = torch.randint(0, 500, (B, T), generator=g)
        mask = torch.rand(B, T, generator=g) > 0.1
        doc = torch.arange(i * B, (i + 1) * B)[:, None].expand(B, T)
        pos = torch.arange(T)[None, :].expand(B, T) + 100 * i
        batches.append((acts, tokens, doc, pos, mask))
    return batches


def brute_force(batches, n_top: int, tiers: list[float], n_tier: int, n_non: int, seed: int = 0):
    """The same quantities by looking at all contexts at once (per feature Python loops, on purpose)."""
    acts = torch.cat([b[0] * b[4][..., None] for b in batches])  # masked [C, T, F]
    tokens = torch.cat([b[1] for b in batches])
    doc = torch.cat([b[2][:, 0] for b in batches])
    first = [int(m.nonzero()[0]) for b in batches for m in b[4]]  # first counted token of each context
    pos = torch.cat([b[3] for b in batches])[torch.arange(len(first)), first]
    ctx_max = acts.amax(1)  # [C, F]
    # running max as seen after each batch, for the tier admission rule
    batch_of = torch.arange(len(batches)).repeat_interleave(B)
    per_batch_max = torch.stack([b[0].mul(b[4][..., None]).amax((0, 1)) for b in batches])
    running = per_batch_max.cummax(0).values  # [n_batches, F]
    keys = hashed_uniform(torch.arange(acts.shape[0]), F, seed)  # [F, C]
    out = {}
    for f in range(F):
        s = ctx_max[:, f].double()
        fires = s > 0
        chosen = {}
        idx = [c for c in range(len(s)) if fires[c]]
        chosen["top"] = sorted(idx, key=lambda c: -s[c])[:n_top]
        for p in tiers:
            ok = [c for c in idx if s[c] <= p * running[batch_of[c], f]]
            chosen[f"tier@{p:g}"] = sorted(ok, key=lambda c: -s[c])[:n_tier]
        quiet = [c for c in range(len(s)) if not fires[c]]
        chosen["non-activating"] = sorted(quiet, key=lambda c: -keys[f, c])[:n_non]
        out[f] = {name: (cs, tokens[cs], acts[cs, :, f].half(), doc[cs], pos[cs]) for name, cs in chosen.items()}
    vals = acts[acts > 0]
    return out, acts, ctx_max, vals


def test_bookkeeping_equals_brute_force():
    batches = random_stream()
    tiers = [0.9, 0.5, 0.1]
    book = FeatureBook(F, T, default_specs(3, tiers, 2, 4), bins=12, hist_range=(0.1, 50.0), seed=0)
    for acts, tokens, doc, pos, mask in batches:
        book.update(acts, tokens, doc, pos, mask)
    expected, acts, ctx_max, _ = brute_force(batches, 3, tiers, 2, 4)

    # count, max, histogram
    assert book.n_tokens == int(sum(b[4].sum() for b in batches))
    assert torch.equal(book.act_times(), (acts > 0).sum((0, 1)))
    assert torch.equal(book.max_act, acts.amax((0, 1)))
    log_lo, step = math.log10(0.1), (math.log10(50.0) - math.log10(0.1)) / 12
    for f in range(F):
        v = acts[..., f][acts[..., f] > 0].double()
        bins = ((v.log10() - log_lo) / step).floor().clamp(0, 11).long()
        assert torch.equal(book.hist[f], torch.bincount(bins, minlength=12)), f
    assert book.hist[6].sum() == 0 and book.hist[:6].sum() > 0

    # every sampled set: same contexts, same order, same per-token activations and tokens
    for cs in book.sets:
        got = cs.sorted()
        for f in range(F):
            ctxs, toks, fa, docs, poss = expected[f][cs.spec.name]
            k = int(got["count"][f])
            assert k == len(ctxs), (cs.spec.name, f)
            assert torch.equal(got["tokens"][f, :k], toks.to(torch.int32)), (cs.spec.name, f)
            assert torch.equal(got["acts"][f, :k], fa), (cs.spec.name, f)
            assert torch.equal(got["doc"][f, :k], docs), (cs.spec.name, f)
            assert torch.equal(got["pos"][f, :k], poss), (cs.spec.name, f)
            if cs.spec.kind != "non-activating":
                assert torch.equal(got["value"][f, :k], ctx_max[ctxs, f]), (cs.spec.name, f)
    tops = book.sets[0].sorted()
    assert tops["count"][6] == 0 and int(tops["count"][0]) == 3


def test_bookkeeping_is_independent_of_batching():
    """Top contexts and the non-activating sample do not depend on how contexts were grouped."""
    batches = random_stream(seed=3)
    specs = default_specs(4, [], 0, 3)
    one = FeatureBook(F, T, specs, seed=5)
    for acts, tokens, doc, pos, mask in batches:
        one.update(acts, tokens, doc, pos, mask)
    merged = FeatureBook(F, T, default_specs(4, [], 0, 3), seed=5)
    cat = [torch.cat([b[i] for b in batches]) for i in range(5)]
    merged.update(*cat)
    for a, b in zip(one.sets, merged.sets):
        sa, sb = a.sorted(), b.sorted()
        for key in ("count", "tokens", "acts", "doc"):
            assert torch.equal(sa[key], sb[key]), (a.spec.name, key)


def test_tiers_never_exceed_fraction_of_final_max():
    batches = random_stream(seed=1, n_batches=8)
    book = FeatureBook(F, T, default_specs(2, [0.5], 5, 0))
    for b in batches:
        book.update(*b)
    tier = book.sets[1].sorted()
    for f in range(F):
        k = int(tier["count"][f])
        assert torch.all(tier["value"][f, :k] <= 0.5 * book.max_act[f])


def test_masked_tokens_never_count():
    acts = torch.full((1, 4, 2), 3.0)
    mask = torch.tensor([[False, True, True, False]])
    acts[0, 0, 1] = 99.0  # only on a masked token
    book = FeatureBook(2, 4, default_specs(1, [], 0, 0))
    book.update(acts, torch.arange(4)[None], mask=mask)
    assert book.n_tokens == 2
    assert book.act_times().tolist() == [2, 2]
    assert book.max_act.tolist() == [3.0, 3.0]
    top = book.sets[0].sorted()
    assert top["acts"][1, 0].tolist() == [0.0, 3.0, 3.0, 0.0]


def test_hashed_keys_are_uniform_and_stable():
    keys = hashed_uniform(torch.arange(20000), 3, seed=1)
    assert keys.shape == (3, 20000)
    assert 0 <= float(keys.min()) and float(keys.max()) < 1
    assert abs(float(keys.mean()) - 0.5) < 0.01
    assert torch.equal(keys[:, 5:9], hashed_uniform(torch.arange(5, 9), 3, seed=1))
    assert not torch.equal(keys, hashed_uniform(torch.arange(20000), 3, seed=2))
    assert len(np.unique(keys[0].numpy())) > 19990


# --------------------------------------------------------------------------- a toy dictionary


class ToyDictionary(Dictionary):
    """A ReLU SAE written against the Dictionary interface only (tests must not depend on a real kind)."""

    kind = "toy"

    def __init__(self, d_model: int, d_sae: int, in_hooks: list[str], out_hooks: list[str] | None = None,
                 norm: str = "none", seed: int = 0):
        super().__init__(SimpleNamespace(d_sae=d_sae, norm_activation=norm), d_model, in_hooks, out_hooks or in_hooks)
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_sae, d_model, generator=g) / d_model**0.5)
        self.b_enc = torch.nn.Parameter(torch.full((d_sae,), -0.1))
        self.W_dec = torch.nn.Parameter(torch.randn(len(self.out_hooks), d_sae, d_model, generator=g))

    def encode(self, inputs, ctx=None):
        x = sum(inputs[h] for h in self.in_hooks)
        return torch.relu(x @ self.W_enc.T + self.b_enc)

    def decode(self, feature_acts):
        return {h: feature_acts @ self.W_dec[i] for i, h in enumerate(self.out_hooks)}

    def loss(self, inputs, targets, ctx, mask=None):
        f = self.encode(inputs)
        recon = self.decode(f)
        mse = sum((recon[h] - targets[h]).pow(2).mean() for h in self.out_hooks)
        return LossOutput(mse, {"mse": mse}, f, recon, targets)

    def decoder_directions(self, hook=None):
        return self.W_dec[self.out_hooks.index(hook or self.out_hooks[0])]

    def decoder_norms(self):
        return self.W_dec.norm(dim=-1).sum(0)

    def fold_activation_scale(self):
        self.folded = True
