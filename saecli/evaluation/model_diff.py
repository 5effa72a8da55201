"""Per-model numbers of a crosscoder over several models (model diffing): what `eval` adds to eval.json.

    "model_diff": {
      "models": ["base", "chat"],
      "heads": {"base": ["base/blocks.3.hook_resid_post"], "chat": [...]},
      "explained_variance": {"base": 0.81, "chat": 0.79},   # per model: the mean over its heads' EV
      "norm_share_mean": {"base": 0.5, "chat": 0.5},        # mean share of a latent's decoder norm
      # two models only:
      "relative_decoder_norm": {"edges": [0, 0.05, ..., 1], "counts": [...]},   # ‖d_chat‖/(‖d_base‖+‖d_chat‖)
      "labels": {"base-only": 12, "shared": 230, "chat-only": 14},
      "exclusive_ratio": 0.1
    }

The histogram of the relative decoder norm is the one in Anthropic's model-diffing crosscoder note
(Lindsey et al. 2024): a mass at 0 (latents of the first model only), at 1 (the second only), and
around 0.5 (shared). Labels use `saecli.dictionaries.crosscoder.diff_label`'s thresholds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from saecli.dictionaries.base import Dictionary


HIST_BINS = 20


def model_diff_report(dictionary: Dictionary, per_hook: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The "model_diff" block for a dictionary whose heads span several models (it declares their shares), else None."""
    from saecli.dictionaries.crosscoder import EXCLUSIVE_RATIO, diff_label

    shares = dictionary.model_norm_shares()
    if shares is None:
        return None

    labels, share = shares
    heads = dictionary.model_heads()
    ev: dict[str, float | None] = {}
    for label, names in heads.items():
        values = [
            per_hook[h]["explained_variance"]
            for h in names
            if h in per_hook and per_hook[h].get("explained_variance") is not None
        ]
        ev[label] = sum(values) / len(values) if values else None
    report: dict[str, Any] = {
        "models": labels,
        "heads": heads,
        "explained_variance": ev,
        "norm_share_mean": {label: float(share[i].mean()) for i, label in enumerate(labels)},
    }
    if len(labels) == 2:
        r = share[1].float().cpu()
        edges = torch.linspace(0, 1, HIST_BINS + 1)
        counts = torch.histc(r, bins=HIST_BINS, min=0.0, max=1.0)
        names = [f"{labels[0]}-only", "shared", f"{labels[1]}-only"]
        tally = dict.fromkeys(names, 0)
        for x in r.tolist():
            tally[diff_label(x, labels[0], labels[1])] += 1
        report.update(
            relative_decoder_norm={"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]},
            labels=tally,
            exclusive_ratio=EXCLUSIVE_RATIO,
        )
    return report


def show_model_diff(report: dict[str, Any]) -> None:
    """The per-model table, and for two models the relative-decoder-norm histogram, on the terminal."""
    from saecli import ui

    rows = [
        {
            "model": label,
            "explained_variance": report["explained_variance"][label],
            "mean decoder-norm share": report["norm_share_mean"][label],
        }
        for label in report["models"]
    ]
    ui.table("per model", rows)
    hist = report.get("relative_decoder_norm")
    if hist is None:
        return
    a, b = report["models"]
    peak = max(max(hist["counts"]), 1)
    lines = [
        f"relative decoder norm ‖d_{b}‖/(‖d_{a}‖+‖d_{b}‖) of {sum(hist['counts']):,} latents "
        f"(≤ {report['exclusive_ratio']:g}: {a}-only, ≥ {1 - report['exclusive_ratio']:g}: {b}-only)"
    ]
    for lo, hi, c in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"]):
        lines.append(f"  [{lo:.2f}, {hi:.2f})  {c:6d}  {'█' * round(40 * c / peak)}")
    lines.append("  " + " · ".join(f"{k} {v:,}" for k, v in report["labels"].items()))
    ui.info("\n".join(lines))
