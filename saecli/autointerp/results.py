"""Where autointerp results live and what a run summary holds.

    <dictionary>/analysis/<analysis>/autointerp/<name>/
        features/<index>.json   one finished feature (explanation, scores, usage), written atomically
        summary.json            the run summary (score distributions, mean F1 by density decile)

A feature's file exists only once the feature is finished, so a killed run resumes by skipping them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from saecli.fsio import write_json

SCORE_KEYS = ("accuracy", "precision", "recall", "f1", "balanced_accuracy")


def results_dir(analysis_folder: str | Path, name: str) -> Path:
    return Path(analysis_folder) / "autointerp" / name


class Results:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.features = self.folder / "features"

    def done(self) -> set[int]:
        """Indices of the features finished by earlier runs."""
        if not self.features.is_dir():
            return set()
        return {int(p.stem) for p in self.features.glob("*.json") if p.stem.isdigit()}

    def write(self, record: dict) -> None:
        write_json(self.features / f"{int(record['index'])}.json", record)

    def load(self) -> dict[int, dict]:
        out = {}
        for i in sorted(self.done()):
            try:
                out[i] = json.loads((self.features / f"{i}.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):  # a file replaced while reading: skip it this time
                continue
        return out

    def write_summary(self, summary: dict) -> Path:
        path = self.folder / "summary.json"
        write_json(path, summary)
        return path


def summarize(records: dict[int, dict], scorers: list[str]) -> dict:
    """Counts, cost, and per scorer: mean scores, the F1 histogram (10 bins over [0, 1]) and the
    mean F1 of each density decile of the scored features."""
    recs = list(records.values())
    out: dict = {
        "features": len(recs),
        "explained": sum(r.get("explanation") is not None for r in recs),
        "bad_answers": sum(r.get("explanation") is None for r in recs),
        "usage": {
            k: sum(r.get("usage", {}).get(k, 0) for r in recs)
            for k in ("requests", "prompt_tokens", "completion_tokens", "cost")
        },
        "scorers": {},
    }
    for kind in scorers:
        scored = [r for r in recs if kind in r.get("scores", {}) and r["scores"][kind]["n"] > 0]
        if not scored:
            continue
        f1 = np.array([r["scores"][kind]["f1"] for r in scored])
        density = np.array([r.get("density", 0.0) for r in scored])
        counts, edges = np.histogram(f1, bins=10, range=(0.0, 1.0))
        deciles = []
        cuts = np.quantile(density, np.linspace(0, 1, 11))
        which = np.clip(np.searchsorted(cuts, density, side="right") - 1, 0, 9)
        for d in range(10):
            sel = which == d
            if sel.any():
                deciles.append(
                    {
                        "decile": d + 1,
                        "density_min": float(density[sel].min()),
                        "density_max": float(density[sel].max()),
                        "n": int(sel.sum()),
                        "mean_f1": float(f1[sel].mean()),
                    }
                )
        out["scorers"][kind] = {
            "n": len(scored),
            **{f"mean_{k}": float(np.mean([r["scores"][kind][k] for r in scored])) for k in SCORE_KEYS},
            "median_f1": float(np.median(f1)),
            "f1_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
            "mean_f1_by_density_decile": deciles,
        }
    return out


def interpretation(record: dict) -> dict:
    """What the store and the dashboard keep of a finished feature."""
    return {
        "explanation": record.get("explanation"),
        "model": record.get("explainer", {}).get("model"),
        "scores": {k: {m: v[m] for m in SCORE_KEYS} for k, v in record.get("scores", {}).items() if v["n"] > 0},
        "autointerp": record.get("run"),
    }


def load_interpretations(analysis_folder: str | Path, name: str) -> dict[int, dict]:
    """{index: interpretation(record)} of autointerp run `name` of an analysis, or of its newest run when
    there is none of that name (a run folder's config names "default"); empty when autointerp never ran."""
    folder = results_dir(analysis_folder, name)
    if not folder.is_dir():
        runs = [p for p in (Path(analysis_folder) / "autointerp").glob("*/features") if p.is_dir()]
        if not runs:
            return {}
        folder = max(runs, key=lambda p: p.stat().st_mtime).parent
    return {i: interpretation(r) for i, r in Results(folder).load().items()}
