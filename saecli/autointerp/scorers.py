"""Which contexts the explainer and the scorers see, and the scores (delphi's detection and fuzzing).

A feature's analysis record holds its top contexts, lower tiers and non-activating contexts. The
explainer sees the first `explain_top` top contexts plus `explain_per_tier` of each tier; everything
else activating is held out for scoring, so no scored context was shown to the explainer.

Detection: the held-out activating contexts and the non-activating ones, unmarked, shuffled; the scorer
says which fire. Fuzzing (delphi's default): the held-out activating contexts with their truly
activating tokens marked, and the non-activating contexts with as many tokens marked at random as an
activating context has firing tokens on average (rounded up); the scorer says which are marked right.

Scores over the answered contexts (unparseable answers count as failed, not as wrong): accuracy,
precision, recall, F1, balanced accuracy — overall and per tier (that tier's activating contexts
against all the non-activating ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from saecli.autointerp.prompts import Example, above, highlight, plain
from saecli.dashboard.site import peak_window

NON_ACTIVATING = "non-activating"


@dataclass(frozen=True)
class Sample:
    text: str
    activating: bool
    tier: str


@dataclass
class FeatureExamples:
    shown: list[Example]  # to the explainer, strongest first
    held_out: list[Example]  # activating, for scoring
    negatives: list[Example]  # non-activating, for scoring


def feature_examples(
    record: dict,
    vocab: dict[int, str],
    *,
    explain_top: int,
    explain_per_tier: int,
    window: tuple[int, int],
    rng: np.random.Generator,
) -> FeatureExamples:
    """Cut every context of a feature record (`AnalysisResult.feature`) to a window and split it.

    A context that appears in several samplings (a rare feature's tiers overlap its top) is used once."""
    out = FeatureExamples([], [], [])
    seen: set[tuple[int, int]] = set()
    for s in record["samplings"]:
        negative = s["name"] == NON_ACTIVATING
        kept = 0
        for j in range(len(s["tokens"])):
            where = (int(s["doc"][j]), int(s["pos"][j]))
            if where in seen:
                continue
            seen.add(where)
            acts = s["acts"][j].astype(np.float32)
            n = len(acts)
            peak = int(acts.argmax()) if acts.max() > 0 else int(rng.integers(n))
            lo, hi = peak_window(n, peak, *window)
            toks = tuple(vocab.get(int(t), f"<{int(t)}>") for t in s["tokens"][j, lo:hi])
            ex = Example(toks, acts[lo:hi], s["name"], not negative)
            if negative:
                out.negatives.append(ex)
            elif kept < (explain_top if s["name"] == "top" else explain_per_tier):
                out.shown.append(ex)
                kept += 1
            else:
                out.held_out.append(ex)
    return out


def detection_samples(ex: FeatureExamples) -> list[Sample]:
    return [Sample(plain(e.tokens), e.activating, e.tier) for e in ex.held_out + ex.negatives]


def fuzzing_samples(ex: FeatureExamples, threshold: float, rng: np.random.Generator) -> list[Sample]:
    out = [Sample(highlight(e.tokens, above(e.acts, threshold)), True, e.tier) for e in ex.held_out]
    if not ex.held_out:
        return out
    n_marks = math.ceil(sum(int((e.acts > 0).sum()) for e in ex.held_out) / len(ex.held_out))
    for e in ex.negatives:
        marks = np.zeros(len(e.tokens), dtype=bool)
        marks[rng.choice(len(e.tokens), size=min(n_marks, len(e.tokens)), replace=False)] = True
        out.append(Sample(highlight(e.tokens, marks), False, e.tier))
    return out


def samples_for(kind: str, ex: FeatureExamples, threshold: float, rng: np.random.Generator) -> list[Sample]:
    """The scorer's contexts, shuffled (so tiers and classes are mixed within each request)."""
    samples = detection_samples(ex) if kind == "detection" else fuzzing_samples(ex, threshold, rng)
    order = rng.permutation(len(samples))
    return [samples[i] for i in order]


def batches(samples: Sequence[Sample], size: int) -> list[list[Sample]]:
    return [list(samples[i : i + size]) for i in range(0, len(samples), size)]


def classification(truth: Sequence[bool], predicted: Sequence[bool | None]) -> dict:
    """Confusion counts and scores over the answered items (delphi's definitions; 0 where undefined)."""
    pairs = [(t, p) for t, p in zip(truth, predicted) if p is not None]
    tp = sum(t and p for t, p in pairs)
    tn = sum((not t) and (not p) for t, p in pairs)
    fp = sum((not t) and p for t, p in pairs)
    fn = sum(t and (not p) for t, p in pairs)
    pos, neg, n = tp + fn, tn + fp, len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / pos if pos else 0.0
    specificity = tn / neg if neg else 0.0
    return {
        "n": n,
        "failed": len(truth) - n,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "balanced_accuracy": (recall + specificity) / 2,
    }


def score(samples: Sequence[Sample], predicted: Sequence[bool | None]) -> dict:
    """Overall scores plus `tiers`: each activating tier against all the non-activating contexts."""
    out = classification([s.activating for s in samples], predicted)
    tiers = {}
    for tier in dict.fromkeys(s.tier for s in samples if s.activating):
        keep = [i for i, s in enumerate(samples) if s.tier == tier or not s.activating]
        tiers[tier] = classification([samples[i].activating for i in keep], [predicted[i] for i in keep])
    out["tiers"] = tiers
    return out
