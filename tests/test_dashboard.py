"""The static HTML dashboard: escaping, layout, and a real headless browser rendering a feature page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from saecli.analysis.dla import DLAResult
from saecli.analysis.records import AnalysisResult
from saecli.dashboard.site import build_site, script_json

REPO = Path(__file__).resolve().parents[1]
NASTY = "</script><b>bold</b>"
VOCAB = {
    0: "<|bos|>",
    1: NASTY,
    2: ' "quoted" & more',
    3: "\n",
    4: " the",
    5: "\t",
    6: "plain",
    7: "\u2028",
    8: " activation",
    9: " highlighted",
    10: ".",
}
T = 10


def synthetic_result() -> AnalysisResult:
    """3 features: 0 fires strongly on the nasty token, 1 fires weakly, 2 never fires."""
    F, n = 3, 2
    tokens = np.array([0, 4, 6, 1, 2, 3, 8, 9, 5, 10], dtype=np.int32)

    def sampling(count, maxes):
        acts = np.zeros((F, n, T), dtype=np.float16)
        vals = np.zeros((F, n), dtype=np.float32)
        for f, ms in enumerate(maxes):
            for j, m in enumerate(ms):
                acts[f, j, [3, 6, 7]] = np.array([m, m / 2, m / 4], dtype=np.float16)
                vals[f, j] = m
        return {
            "count": np.array(count, dtype=np.int64),
            "value": vals,
            "tokens": np.broadcast_to(tokens, (F, n, T)).copy(),
            "acts": acts,
            "doc": np.array([[3, 4], [5, 6], [0, 0]], dtype=np.int64),
            "pos": np.array([[10, 20], [30, 40], [0, 0]], dtype=np.int64),
        }

    samplings = {
        "top": sampling([2, 1, 0], [[4.0, 3.0], [0.5], []]),
        "tier@0.5": sampling([1, 0, 0], [[1.5], [], []]),
        "non-activating": {
            **sampling([1, 1, 0], [[], [], []]),
            "doc": np.array([[9, 0], [8, 0], [0, 0]]),
            "pos": np.array([[0, 0], [5, 0], [0, 0]]),
        },
    }
    edges = np.logspace(-3, 3, 13)
    hist = np.zeros((F, 12), dtype=np.int64)
    hist[0, 7:10] = [5, 9, 3]
    hist[1, 5] = 2
    meta = {
        "vocab": {str(k): v for k, v in VOCAB.items()},
        "context_size": T,
        "samplings": {
            "top": {"kind": "top", "n": 2, "fraction": None},
            "tier@0.5": {"kind": "tier", "n": 2, "fraction": 0.5},
            "non-activating": {"kind": "non-activating", "n": 2, "fraction": None},
        },
    }
    return AnalysisResult(
        "default",
        1000,
        hist.sum(1),
        np.array([4.0, 0.5, 0.0], dtype=np.float32),
        hist,
        edges,
        samplings,
        {"decoder_norm": np.array([1.0, 2.0, 3.0], dtype=np.float32)},
        meta,
    )


def synthetic_dla() -> DLAResult:
    ids = np.array([[1, 2, 6], [4, 8, 9], [10, 6, 4]])
    logits = np.array([[3.0, 2.0, 1.0], [0.3, 0.2, 0.1], [1.0, 0.5, 0.2]], dtype=np.float32)
    return DLAResult(ids, logits, ids[:, ::-1].copy(), -logits, VOCAB, {"top": 3})


def test_site_layout_and_escaping(tmp_path):
    index = build_site(
        synthetic_result(),
        tmp_path / "site",
        dla=synthetic_dla(),
        explanations={0: "fires on <script> & quotes"},
        title="toy <sae>",
    )
    assert index == tmp_path / "site" / "index.html"
    pages = sorted(p.name for p in (tmp_path / "site" / "features").iterdir())
    assert pages == ["0.html", "1.html"]  # feature 2 never fired: no page
    for path in (index, tmp_path / "site" / "features" / "0.html"):
        text = path.read_text()
        assert "<b>bold</b>" not in text and "<script>" not in text.replace("<script>\n", "")
        assert text.count("</script>") == 2  # the data block and the code, nothing from the data
        assert "<title>" in text and "toy &lt;sae&gt;" in text
        assert not re.search(r"""(src|href)=["']https?:""", text)  # self-contained: no CDN, no network
        data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1))
        assert data
    page = json.loads(
        re.search(r'id="data">(.*?)</script>', (tmp_path / "site/features/0.html").read_text(), re.S).group(1)
    )
    assert page["explanation"] == "fires on <script> & quotes"
    assert page["dla"]["pos"][0] == [NASTY, 3.0]
    assert [s["name"] for s in page["samplings"]] == ["top", "tier@0.5", "non-activating"]
    top = page["samplings"][0]["contexts"][0]
    assert page["vocab"][top["t"][top["p"]]] == NASTY and top["m"] == 4.0
    assert page["scalars"] == {"decoder_norm": 1.0}
    assert page["hist_svg"].startswith("<svg") and "<title>" in page["hist_svg"]


def test_script_json_cannot_close_its_element():
    text = script_json({"a": "</script><!-- \u2028 & >"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"a": "</script><!-- \u2028 & >"}


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def browse(url: str, tmp_path: Path, *args: str) -> str:
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_feature_page_in_headless_chromium(tmp_path):
    site = tmp_path / "site"
    build_site(synthetic_result(), site, dla=synthetic_dla(), explanations={0: "the nasty token"}, title="toy")
    url = (site / "features" / "0.html").as_uri()
    dom = browse(url, tmp_path, "--dump-dom")
    # the script ran and built the contexts, with highlighted token spans carrying their values
    assert 'data-sampling="top"' in dom and 'data-sampling="non-activating"' in dom
    spans = re.findall(r'<span class="tok act peak"[^>]*>([^<]*)</span>', dom)
    assert spans == ["&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;"] * 2  # 2 top contexts
    assert "(1 more shown above)" in dom  # the tier's context is one of the top ones: shown once
    assert re.search(r'class="tok act"[^>]*data-act="2"', dom)
    assert "background-color: rgba(255, 122, 0, 0.9)" in dom  # the feature's max: full strength
    assert "<b>bold</b>" not in dom  # shown as text, never parsed as markup
    assert "↵" in dom and "⇥" in dom  # whitespace tokens are visible
    assert "Direct logit attribution" in dom and "the nasty token" in dom
    shot = tmp_path / "feature.png"
    browse(url, tmp_path, f"--screenshot={shot}", "--window-size=1200,1100")
    assert shot.stat().st_size > 10_000
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "dashboard-feature.png")


def test_index_page_in_headless_chromium(tmp_path):
    site = tmp_path / "site"
    build_site(synthetic_result(), site, explanations={1: "weak one"}, title="toy")
    dom = browse((site / "index.html").as_uri(), tmp_path, "--dump-dom")
    rows = re.findall(r'<tr( class="dead")?><td class="num">(?:<a href="features/(\d+).html">)?#(\d+)', dom)
    # sorted by density, most active first; the dead feature has no link
    assert [(r[2], r[1], r[0]) for r in rows] == [("0", "0", ""), ("1", "1", ""), ("2", "", ' class="dead"')]
    assert "weak one" in dom and "peak tokens" in dom
    shot = tmp_path / "index.png"
    browse((site / "index.html").as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,700")
    shutil.copy(shot, (REPO / "artifacts").joinpath("dashboard-index.png") if (REPO / "artifacts").exists() else shot)


def test_index_search_from_the_url(tmp_path):
    site = tmp_path / "site"
    build_site(synthetic_result(), site, dla=synthetic_dla(), explanations={1: "weak one"}, title="toy")
    dom = browse((site / "index.html").as_uri() + "#q=WEAK", tmp_path, "--dump-dom")
    assert re.findall(r'<a href="features/(\d+).html">', dom) == ["1"] and "1 of 3 features" in dom
    dom = browse((site / "index.html").as_uri() + "#q=" + "%22quoted%22", tmp_path, "--dump-dom")
    assert re.findall(r'<a href="features/(\d+).html">', dom) == ["0"]  # by a DLA token


def test_rebuilding_replaces_the_whole_site_and_spares_other_folders(tmp_path):
    from saecli.errors import UsageError

    site = tmp_path / "site"
    build_site(synthetic_result(), site)
    assert (site / "features" / "1.html").exists()
    build_site(synthetic_result(), site, max_features=1)  # only the most active feature now
    assert sorted(p.name for p in (site / "features").iterdir()) == ["0.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no staging or old folder left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a saecli dashboard"):
        build_site(synthetic_result(), other)
    assert (other / "mine.txt").read_text() == "keep me"


def test_peak_window_slides_to_stay_full():
    from saecli.dashboard.site import peak_window

    assert peak_window(100, 50, 10, 5) == (40, 56)
    assert peak_window(100, 2, 10, 5) == (0, 16)  # near the start: more after the peak
    assert peak_window(100, 98, 10, 5) == (84, 100)  # near the end: more before it
    assert peak_window(8, 3, 10, 5) == (0, 8)  # short context: all of it
    assert peak_window(100, -1, 10, 5) == (0, 16)  # no peak (not firing): the start
