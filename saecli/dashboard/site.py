"""A static, self-contained HTML site for one feature analysis: open `index.html` from disk, no server.

    build_site(result, "runs/x/analysis/default/html", dla=dla, explanations={12: "closing brackets"})

Layout: `index.html` (every feature in a table, sortable by density and max activation, searchable by
explanation or token) and `features/<index>.html` per feature that fired (contexts with activating
tokens highlighted by strength, activation histogram, DLA tokens, explanation, kind-specific extras).
Every page carries its own CSS and JS inline (from `assets/`) and its data as JSON in a
`<script type="application/json">` element with `<`, `>` and `&` escaped; the scripts put text into
the page only through `textContent`, so a token such as `</script>` or `<b>` shows as itself. The two
SVG charts are generated here from numbers (and escaped labels).

A crosscoder over two models (model diffing, heads "<label>/<hook>") also shows which model each feature
belongs to: its relative decoder norm r = ‖d_B‖/(‖d_A‖+‖d_B‖) and the label "A-only" (r <= 0.1),
"shared" or "B-only" (r >= 0.9) (`saecli.dictionaries.crosscoder.diff_label`), as a sortable and
searchable column of the index (with the histogram of r) and a line of each feature page.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from saecli.analysis.dla import DLAResult
from saecli.analysis.records import AnalysisResult
from saecli.errors import UsageError
from saecli.fsio import write_text

STORED_WINDOW_FACTOR = 3  # a context keeps 3× the shown window around its peak (click to unfold)


def _asset(name: str) -> str:
    return resources.files("saecli.dashboard").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def script_json(obj: Any) -> str:
    """JSON safe inside a <script> element (no `</script>`, no `<!--`, no line separators)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(a, b)
    return text


def page(title: str, data: Any, script: str) -> str:
    return (
        _asset("page.html")
        .replace("@@TITLE@@", html.escape(title))
        .replace("@@STYLE@@", _asset("style.css"))
        .replace("@@BODY@@", "<p>Loading… (this page needs JavaScript)</p>")
        .replace("@@COMMON@@", _asset("common.js"))
        .replace("@@SCRIPT@@", _asset(script))
        .replace("@@DATA@@", script_json(data))
    )


def _num(x: float, digits: int = 4) -> float:
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return 0.0
    return float(f"{x:.{digits}g}")


def _label(x: float) -> str:
    return f"{x:.3g}" if 1e-2 <= abs(x) < 1e4 else f"{x:.0e}"


def histogram_svg(
    counts: np.ndarray,
    edges: np.ndarray,
    *,
    width: int = 268,
    height: int = 120,
    caption: str = "activation (log scale)",
) -> str:
    """Bars of the non-empty range of a histogram with log-spaced edges; one <title> per bar."""
    nz = np.nonzero(counts)[0]
    if len(nz) == 0:
        return ""
    lo, hi = max(int(nz[0]) - 1, 0), min(int(nz[-1]) + 2, len(counts))
    counts, edges = counts[lo:hi], edges[lo : hi + 1]
    peak = max(int(counts.max()), 1)
    top, bottom, left = 8, 22, 4
    plot_h = height - top - bottom
    bw = (width - 2 * left) / len(counts)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(caption)}">'
    ]
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        h = max(1.0, plot_h * float(c) / peak)
        x, y = left + i * bw, top + plot_h - h
        tip = f"[{_label(edges[i])}, {_label(edges[i + 1])}): {int(c):,}"
        parts.append(
            f'<rect class="bar" x="{x:.2f}" y="{y:.2f}" width="{max(bw - 1, 0.8):.2f}" height="{h:.2f}">'
            f"<title>{html.escape(tip)}</title></rect>"
        )
    base = top + plot_h
    parts.append(f'<line class="axis" x1="{left}" y1="{base}" x2="{width - left}" y2="{base}"/>')
    parts.append(f'<text x="{left}" y="{height - 6}">{html.escape(_label(edges[0]))}</text>')
    parts.append(f'<text x="{width - left}" y="{height - 6}" text-anchor="end">{html.escape(_label(edges[-1]))}</text>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height - 6}" text-anchor="middle">{html.escape(caption)}</text>')
    parts.append(f'<text x="{width - left}" y="{top + 2}" text-anchor="end">max {peak:,}</text>')
    parts.append("</svg>")
    return "".join(parts)


def density_svg(density: np.ndarray) -> str:
    """Histogram of log10(density) over the features that fired, with the dead count in the caption."""
    alive = density[density > 0]
    if len(alive) == 0:
        return ""
    edges = 10.0 ** np.arange(-8.0, 0.01, 0.25)
    counts, _ = np.histogram(np.clip(alive, edges[0], 1.0), bins=edges)
    dead = int((density <= 0).sum())
    return histogram_svg(counts, edges, width=560, height=130, caption=f"density (log scale) · {dead:,} never fired")


def _sampling_label(name: str, kind: str, fraction: float | None) -> tuple[str, str]:
    if kind == "top":
        return "Top activations", "the contexts where it fires most strongly"
    if kind == "tier":
        return f"Activations ≤ {fraction:g} × max", "the strongest contexts below this fraction of its max"
    if kind == "non-activating":
        return "Not firing", "random contexts where it never fires, for contrast"
    return name, ""


class _Vocab:
    """Page-local token table: contexts refer to tokens by position in it."""

    def __init__(self, texts: dict[int, str]):
        self.texts = texts
        self.index: dict[int, int] = {}
        self.strings: list[str] = []

    def __call__(self, token_id: int) -> int:
        if token_id not in self.index:
            self.index[token_id] = len(self.strings)
            self.strings.append(self.texts.get(token_id, f"<{token_id}>"))
        return self.index[token_id]


def peak_window(n: int, peak: int, before: int, after: int) -> tuple[int, int]:
    """[lo, hi) of `before` tokens before the peak and `after` after it, slid to stay full at the ends."""
    span = before + after + 1
    lo = max(0, min(peak - before, n - span)) if peak >= 0 else 0
    return lo, min(n, lo + span)


def _context(
    tokens: np.ndarray, acts: np.ndarray, value: float, doc: int, pos: int, window: tuple[int, int], vocab: _Vocab
) -> dict:
    a = acts.astype(np.float32)
    peak = int(a.argmax()) if value > 0 and a.max() > 0 else -1
    lo, hi = peak_window(len(tokens), peak, *(w * STORED_WINDOW_FACTOR for w in window))
    nz = np.nonzero(a[lo:hi])[0]
    return {
        "t": [vocab(int(t)) for t in tokens[lo:hi]],
        "a": [[int(i), _num(a[lo + i])] for i in nz],
        "p": peak - lo if peak >= 0 else -1,
        "m": _num(value),
        "d": int(doc),
        "s": int(pos),
        "cut_before": lo > 0,
        "cut_after": hi < len(tokens),
    }


def feature_page_data(
    result: AnalysisResult,
    index: int,
    *,
    dla: DLAResult | None,
    explanation: str | None,
    title: str,
    window: tuple[int, int],
    prev: int | None,
    next_: int | None,
) -> dict:
    rec = result.feature(index)
    texts = result.vocab
    vocab = _Vocab(texts)
    kinds = result.meta.get("samplings", {})
    samplings = []
    seen: set[tuple[int, int]] = set()
    for s in rec["samplings"]:
        spec = kinds.get(s["name"], {})
        label, hint = _sampling_label(s["name"], spec.get("kind", ""), spec.get("fraction"))
        contexts, repeated = [], 0
        for j in range(len(s["tokens"])):
            where = (int(s["doc"][j]), int(s["pos"][j]))
            if where in seen:  # a rare feature's tiers overlap its top contexts: show each context once
                repeated += 1
                continue
            seen.add(where)
            contexts.append(_context(s["tokens"][j], s["acts"][j], float(s["max"][j]), *where, window, vocab))
        if repeated:
            hint += f" ({repeated} more shown above)"
        samplings.append({"name": s["name"], "label": label, "hint": hint, "contexts": contexts})
    scalars, vectors = {}, []
    T = int(result.meta.get("context_size", -1))
    columns = result.meta.get("extra_columns", {})
    for name, value in rec.items():
        if name not in result.extras:
            continue
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 0:
            scalars[name] = _num(float(arr))
        elif arr.ndim == 1 and arr.shape[0] == T and samplings and samplings[0]["contexts"]:
            # a per-token pattern over the top context (e.g. an attention pattern row)
            top = rec["samplings"][0]
            ctx = _context(
                top["tokens"][0],
                arr.astype(np.float32),
                float(arr.max()),
                int(top["doc"][0]),
                int(top["pos"][0]),
                window,
                vocab,
            )
            samplings.append(
                {
                    "name": name,
                    "label": name.replace("_", " "),
                    "hint": "over the top context",
                    "contexts": [ctx],
                    "scale": _num(arr.max()),
                }
            )
        elif arr.ndim == 1 and arr.shape[0] <= 256:
            vectors.append({"name": name, "values": [_num(v) for v in arr], "labels": columns.get(name)})
    data = {
        "index": int(index),
        "title": title,
        "prev": prev,
        "next": next_,
        "density": rec["density"],
        "act_times": rec["act_times"],
        "n_tokens": rec["n_analyzed_tokens"],
        "max_act": _num(rec["max_act"], 6),
        "scalars": scalars,
        "vectors": vectors,
        "hist_svg": histogram_svg(rec["histogram"]["counts"], result.hist_edges),
        "explanation": explanation,
        "dla": None,
        "window": list(window),
        "samplings": samplings,
    }
    if dla is not None and index < dla.d_sae:
        d = dla.feature(index)
        data["dla"] = {
            "pos": [[t["token"], _num(t["logit"])] for t in d["top_positive"]],
            "neg": [[t["token"], _num(t["logit"])] for t in d["top_negative"]],
        }
    data["vocab"] = vocab.strings
    return data


def top_tokens(result: AnalysisResult, index: int, dla: DLAResult | None, n: int = 3) -> list[str]:
    """A few tokens that characterise a feature: its DLA top tokens, else its most frequent peak tokens."""
    if dla is not None and index < dla.d_sae:
        return [dla.vocab.get(int(t), str(int(t))) for t in dla.pos_ids[index, :n]]
    top = result.samplings.get("top")
    if top is None:
        return []
    k = int(top["count"][index])
    if k == 0:
        return []
    peaks = top["acts"][index, :k].astype(np.float32).argmax(-1)
    ids = top["tokens"][index, np.arange(k), peaks]
    texts = result.vocab
    return [texts.get(int(t), str(int(t))) for t, _ in Counter(ids.tolist()).most_common(n)]


def diff_models(result: AnalysisResult) -> tuple[str, str] | None:
    """(A, B): the two model labels when the analysed dictionary is a two-model crosscoder, else None."""
    from saecli.config.models import split_head

    if "relative_decoder_norm" not in result.extras:
        return None
    labels = list(dict.fromkeys(split_head(h)[0] for h in result.meta.get("out_hooks", [])))
    first, second = (labels + [None, None])[:2]
    if len(labels) != 2 or first is None or second is None:
        return None
    return first, second


def model_of_feature(result: AnalysisResult, index: int, models: tuple[str, str]) -> dict:
    """{"ratio": r, "label": 'A-only' | 'shared' | 'B-only', "models": [A, B]} of one feature."""
    from saecli.dictionaries.crosscoder import diff_label

    r = float(result.extras["relative_decoder_norm"][index])
    return {"ratio": _num(r, 3), "label": diff_label(r, *models), "models": list(models)}


def build_site(
    result: AnalysisResult,
    out_dir: str | Path,
    *,
    dla: DLAResult | None = None,
    explanations: dict[int, str] | None = None,
    title: str = "",
    window: tuple[int, int] = (24, 8),
    max_features: int | None = None,
    progress: Callable[[int], None] | None = None,
    scores: dict[int, dict[str, float]] | None = None,
) -> Path:
    """Write index.html and one page per feature that fired (the most active first when limited).

    `scores` maps a feature to its autointerp F1 per scorer ({"detection": 0.8, "fuzzing": 0.7}); they
    become sortable columns of the index and a line under the explanation.

    The site is built in a staging folder beside `out_dir` that then replaces the previous site in one
    rename, so a reader never sees a half-written site and the pages need no fsync each.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "index.html").exists():
        raise UsageError(f"{out} exists and is not a saecli dashboard; choose another dashboard.output_dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_site(
            result,
            staging,
            dla=dla,
            explanations=explanations or {},
            title=title,
            window=window,
            max_features=max_features,
            progress=progress,
            scores=scores or {},
        )
        staging.chmod(0o755)
        _swap(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "index.html"


def _swap(new: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_site(
    result: AnalysisResult,
    out: Path,
    *,
    dla: DLAResult | None,
    explanations: dict[int, str],
    title: str,
    window: tuple[int, int],
    max_features: int | None,
    progress: Callable[[int], None] | None,
    scores: dict[int, dict[str, float]],
) -> None:
    title = title or f"analysis {result.name}"
    (out / "features").mkdir(parents=True, exist_ok=True)
    density = result.density()
    alive = np.nonzero(result.act_times > 0)[0]
    if max_features is not None and len(alive) > max_features:
        alive = np.sort(alive[np.argsort(-result.act_times[alive], kind="stable")[:max_features]])
    pages = [int(i) for i in alive]
    models = diff_models(result)
    for j, i in enumerate(pages):
        data = feature_page_data(
            result,
            i,
            dla=dla,
            explanation=explanations.get(i),
            title=title,
            window=window,
            prev=pages[j - 1] if j > 0 else None,
            next_=pages[j + 1] if j + 1 < len(pages) else None,
        )
        data["scores"] = {k: _num(v, 3) for k, v in scores.get(i, {}).items()}
        if models is not None:
            data["model"] = model_of_feature(result, i, models)
        (out / "features" / f"{i}.html").write_text(page(f"#{i} · {title}", data, "feature.js"), encoding="utf-8")
        if progress is not None:
            progress(1)
    has_page = set(pages)
    scorers = sorted({k for v in scores.values() for k in v})
    rows = [
        [
            i,
            int(result.act_times[i]),
            float(density[i]),
            _num(result.max_act[i]),
            top_tokens(result, i, dla),
            explanations.get(i, ""),
            i in has_page,
            *(_num(scores[i][k], 3) if k in scores.get(i, {}) else None for k in scorers),
        ]
        for i in range(result.d_sae)
    ]
    diff = None
    if models is not None:  # two more columns per row: r and its label
        for i, row in enumerate(rows):
            m = model_of_feature(result, i, models)
            row += [m["ratio"], m["label"]]
        from saecli.dictionaries.crosscoder import EXCLUSIVE_RATIO

        r = np.asarray(result.extras["relative_decoder_norm"], dtype=np.float64)
        edges = np.linspace(0.0, 1.0, 21)
        counts, _ = np.histogram(np.clip(r, 0.0, 1.0), bins=edges)
        diff = {
            "models": list(models),
            "col": 7 + len(scorers),
            "exclusive_ratio": EXCLUSIVE_RATIO,
            "svg": histogram_svg(
                counts, edges, width=560, height=130, caption=f"‖d_{models[1]}‖ / (‖d_{models[0]}‖ + ‖d_{models[1]}‖)"
            ),
        }
    n_alive = int((result.act_times > 0).sum())
    subtitle = f"{result.d_sae:,} features · {n_alive:,} fired · {result.n_analyzed_tokens:,} tokens analysed" + (
        f" · {len(pages):,} pages" if len(pages) < n_alive else ""
    )
    index = {
        "title": title,
        "subtitle": subtitle,
        "features": rows,
        "density_svg": density_svg(density),
        "tokens_label": "promotes (DLA)" if dla is not None else "peak tokens",
        "scorers": scorers,
        "model_diff": diff,
    }
    write_text(out / "index.html", page(title, index, "index.js"))
