"""`saecli autointerp`: prompts, answer parsing, delphi's scores by hand, retries, resume, outputs.

The loop runs against `FakeChat` (tests/fake_chat.py), a loopback OpenAI-compatible server with
scripted answers; tests/test_autointerp_serve.py runs it against transformers' own server and in process.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fake_chat import FakeChat

from saecli.analysis.records import AnalysisResult, analysis_dir
from saecli.autointerp.backends import OpenAIChat, Usage
from saecli.autointerp.prompts import (
    EXPLAIN_SYSTEM,
    Example,
    explainer_prompt,
    highlight,
    parse_explanation,
    parse_labels,
    scorer_prompt,
)
from saecli.autointerp.results import summarize
from saecli.autointerp.scorers import FeatureExamples, Sample, feature_examples, fuzzing_samples, score
from saecli.config.autointerp import AutointerpConfig, LLMConfig
from saecli.errors import RunError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ prompts
def test_explainer_prompt_marks_runs_and_lists_strengths():
    examples = [
        Example(("The", " cat", " sat", "\n", " mat"), np.array([0, 2.0, 1.2, 0.1, 0], np.float32), "top", True),
        Example(("a", "b"), np.array([1.6, 0.0], np.float32), "tier@0.5", True),
    ]
    messages = explainer_prompt(examples, feature_max=4.0, threshold=0.3, dla_tokens=["x", " y"])
    assert messages[0] == {"role": "system", "content": EXPLAIN_SYSTEM}
    # 0.1 < 0.3 × 2.0: not marked; cat and sat form one run; strengths are 10 × act / 4.0, rounded
    assert messages[1]["content"] == (
        "Excerpts, strongest first:\n"
        "\n"
        "Example 1: The<< cat sat>>\\n mat\n"
        'Strength: " cat" 5, " sat" 3\n'
        "\n"
        "Example 2: <<a>>b\n"
        'Strength: "a" 4\n'
        "\n"
        'When it fires, the feature makes these next tokens more likely: "x", " y"'
    )


def test_scorer_prompt_numbers_the_excerpts():
    messages = scorer_prompt("fuzzing", "the word cat", ["<<cat>> sat", "a dog"])
    assert "marked <<like this>>" in messages[0]["content"]
    assert (
        messages[1]["content"]
        == "Feature explanation: the word cat\n\nExcerpts:\nExample 1: <<cat>> sat\nExample 2: a dog"
    )
    assert "marked" not in scorer_prompt("detection", "x", ["a"])[0]["content"]


def record_of(acts_by_sampling: dict[str, list[list[float]]], T: int) -> dict:
    samplings = []
    for k, (name, rows) in enumerate(acts_by_sampling.items()):
        n = len(rows)
        samplings.append(
            {
                "name": name,
                "tokens": np.tile(np.arange(T, dtype=np.int32), (n, 1)),
                "acts": np.array(rows, dtype=np.float16).reshape(n, T),
                "max": np.array([max(r) for r in rows], np.float32),
                "doc": np.arange(n) + 100 * k,
                "pos": np.zeros(n, np.int64),
            }
        )
    return {"samplings": samplings, "max_act": 4.0}


def test_examples_are_windows_around_the_peak_and_held_out_from_the_explainer():
    T = 10
    vocab = {i: f"t{i}" for i in range(T)}
    peak7 = [0.0] * 7 + [4.0] + [0.0] * 2
    peak1 = [0.0, 3.0] + [0.0] * 8
    rec = record_of({"top": [peak7, peak1, peak7], "tier@0.5": [peak1, peak1], "non-activating": [[0.0] * T]}, T)
    ex = feature_examples(rec, vocab, explain_top=2, explain_per_tier=1, window=(2, 1), rng=np.random.default_rng(0))
    assert [e.tokens for e in ex.shown] == [
        ("t5", "t6", "t7", "t8"),
        ("t0", "t1", "t2", "t3"),
        ("t0", "t1", "t2", "t3"),
    ]
    assert [e.tier for e in ex.shown] == ["top", "top", "tier@0.5"]
    assert [(e.tier, e.activating) for e in ex.held_out] == [("top", True), ("tier@0.5", True)]
    assert len(ex.negatives) == 1 and not ex.negatives[0].activating and len(ex.negatives[0].tokens) == 4


def test_fuzzing_marks_true_tokens_and_as_many_random_ones_on_negatives():
    held = [
        Example(tuple("abcd"), np.array([0, 3.0, 0.5, 0]), "top", True),  # 2 firing, 1 marked (0.5 < 0.9)
        Example(tuple("efgh"), np.array([1.0, 1.0, 1.0, 0]), "top", True),
    ]  # 3 firing
    neg = [Example(tuple("ijklmn"), np.zeros(6), "non-activating", False)]
    samples = fuzzing_samples(FeatureExamples([], held, neg), threshold=0.3, rng=np.random.default_rng(0))
    assert [s.text for s in samples[:2]] == ["a<<b>>cd", "<<efg>>h"]
    assert samples[2].text.count("<<") >= 1 and sum(c in "ijklmn" for c in samples[2].text) == 6
    marked = "".join(samples[2].text.split("<<")[i].split(">>")[0] for i in range(1, samples[2].text.count("<<") + 1))
    assert len(marked) == 3  # ceil((2 + 3) / 2) random marks
    assert highlight(tuple("xyz"), np.array([True, False, True])) == "<<x>>y<<z>>"


# ------------------------------------------------------------------ scores
def test_scores_by_hand():
    samples = [
        Sample("a", True, "top"),
        Sample("b", True, "top"),
        Sample("c", True, "tier@0.5"),
        Sample("d", False, "non-activating"),
        Sample("e", False, "non-activating"),
        Sample("f", False, "non-activating"),
    ]
    s = score(samples, [True, False, True, False, True, None])  # the last answer was unusable
    # answered 5: tp 2 (a, c), fn 1 (b), tn 1 (d), fp 1 (e)
    assert (s["n"], s["failed"], s["tp"], s["fn"], s["tn"], s["fp"]) == (5, 1, 2, 1, 1, 1)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    top, tier = s["tiers"]["top"], s["tiers"]["tier@0.5"]
    # each tier against all negatives: top has tp 1, fn 1, tn 1, fp 1
    assert (top["precision"], top["recall"], top["f1"], top["balanced_accuracy"]) == (0.5, 0.5, 0.5, 0.5)
    # tier@0.5: tp 1, fn 0, tn 1, fp 1 → precision 1/2, recall 1, F1 2/3, balanced (1 + 1/2) / 2
    assert tier["f1"] == pytest.approx(2 / 3) and tier["balanced_accuracy"] == pytest.approx(0.75)
    assert tier["accuracy"] == pytest.approx(2 / 3)
    empty = score(samples[:1], [None])
    assert empty["n"] == 0 and empty["failed"] == 1 and empty["f1"] == 0.0


def test_summary_mean_f1_by_density_decile():
    recs = {
        i: {
            "index": i,
            "density": 10.0 ** -(i + 1),
            "explanation": "x",
            "scores": {
                "detection": {
                    "n": 4,
                    "f1": (i + 0.5) / 10,
                    "accuracy": 0.5,
                    "precision": 0.5,
                    "recall": 0.5,
                    "balanced_accuracy": 0.5,
                }
            },
        }
        for i in range(10)
    }
    recs[10] = {"index": 10, "density": 1e-3, "explanation": None, "scores": {}}
    s = summarize(recs, ["detection", "fuzzing"])
    assert (s["features"], s["explained"], s["bad_answers"]) == (11, 10, 1)
    d = s["scorers"]["detection"]
    assert d["mean_f1"] == pytest.approx(0.5) and d["f1_histogram"]["counts"] == [1] * 10
    # one feature per decile; the rarest decile holds the feature with density 1e-10 (F1 0.95)
    assert [x["mean_f1"] for x in d["mean_f1_by_density_decile"]] == pytest.approx(
        [0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05]
    )
    assert "fuzzing" not in s["scorers"]


# ------------------------------------------------------------------ answers
def test_explanation_parser_takes_json_then_plain_text():
    assert parse_explanation('```json\n{"explanation": "closing brackets"}\n```') == "closing brackets"
    assert parse_explanation('Sure. {"explanation": "the word \\"the\\""} Hope it helps') == 'the word "the"'
    assert parse_explanation("Looking at these...\n[EXPLANATION]: numbers in dates") == "numbers in dates"
    assert parse_explanation("Explanation: 'cat names'") == "cat names"
    assert parse_explanation("Plural nouns after 'the'") == "Plural nouns after 'the'"
    assert parse_explanation("") is None and parse_explanation("  \n ") is None
    assert parse_explanation("x" * 1000) is None


def test_label_parser():
    assert parse_labels("[1, 0, 1]", 3) == [True, False, True]
    assert parse_labels("Answer: [true, false]", 2) == [True, False]
    assert parse_labels("yes, no, yes", 3) == [True, False, True]
    assert parse_labels("[1, 0]", 3) is None and parse_labels("I cannot tell", 2) is None


# ------------------------------------------------------------------ config and selection
def toy_analysis(folder: Path, n_features: int = 8, T: int = 16) -> AnalysisResult:
    """Feature f fires on token f + 10 wherever it occurs; feature n_features - 1 never fires."""
    rng = np.random.default_rng(0)
    F = n_features
    vocab = {i: f" w{i}" for i in range(64)}

    def sampling(n, fire: bool, doc0: int):
        tokens = rng.integers(0, 64, size=(F, n, T)).astype(np.int32)
        acts = np.zeros((F, n, T), np.float16)
        if fire:
            for f in range(F - 1):
                tokens[f, :, T // 2] = f + 10
                acts[f, :, T // 2] = np.linspace(4, 1, n)
                acts[f, :, T // 2 + 1] = 0.5
        return {
            "count": np.full(F, n, np.int64) * np.r_[np.ones(F - 1), 0 if fire else 1].astype(np.int64),
            "value": acts.max(-1).astype(np.float32),
            "tokens": tokens,
            "acts": acts,
            "doc": np.arange(F * n).reshape(F, n) + doc0,
            "pos": np.zeros((F, n), np.int64),
        }

    samplings = {
        "top": sampling(6, True, 0),
        "tier@0.5": sampling(2, True, 1000),
        "non-activating": sampling(3, False, 2000),
    }
    act_times = np.r_[np.arange(F - 1) + 1, 0].astype(np.int64)
    meta = {
        "vocab": {str(k): v for k, v in vocab.items()},
        "context_size": T,
        "samplings": {
            "top": {"kind": "top"},
            "tier@0.5": {"kind": "tier", "fraction": 0.5},
            "non-activating": {"kind": "non-activating"},
        },
    }
    result = AnalysisResult(
        "default",
        1000,
        act_times,
        np.r_[np.full(F - 1, 4.0), 0].astype(np.float32),
        np.zeros((F, 4), np.int64),
        np.logspace(-3, 3, 5),
        samplings,
        {},
        meta,
    )
    result.save(analysis_dir(folder, "default"))
    return result


def test_feature_selection(tmp_path):
    from saecli.autointerp.runner import select_features
    from saecli.errors import ConfigError

    result = toy_analysis(tmp_path / "sae")  # densities (f + 1) / 1000, the last one 0
    assert select_features(result, AutointerpConfig()) == [0, 1, 2, 3, 4, 5, 6]  # alive only
    assert select_features(result, AutointerpConfig(min_density=0.003, max_density=0.006)) == [3, 4, 5]
    assert select_features(result, AutointerpConfig(features=[7, 2])) == [2]
    assert select_features(result, AutointerpConfig(feature_range=(5, 100))) == [5, 6]
    picked = select_features(result, AutointerpConfig(sample=3, seed=1))
    assert len(picked) == 3 and picked == select_features(result, AutointerpConfig(sample=3, seed=1))
    with pytest.raises(ConfigError, match="autointerp.features"):
        select_features(result, AutointerpConfig(features=[8]))


def test_features_option_picks_a_list_or_a_range(tmp_path, run_cli):
    toy_analysis(tmp_path / "sae")
    folder = tmp_path / "sae" / "analysis" / "default" / "autointerp" / "default" / "features"
    with FakeChat() as server:
        path = experiment(tmp_path, server.url, "features = [0]")
        assert run_cli("autointerp", path, "--features", "3,5").exit_code == 0
        assert sorted(p.name for p in folder.iterdir()) == ["3.json", "5.json"]
        assert run_cli("autointerp", path, "--features", "5:7").exit_code == 0
        assert sorted(p.name for p in folder.iterdir()) == ["3.json", "5.json", "6.json"]
        res = run_cli("autointerp", path, "--features", "5-7")
        assert res.exit_code == 2 and "'100:200'" in res.output


def experiment(tmp_path: Path, url: str, extra: str = "", store: str = 'backend = "none"') -> Path:
    path = tmp_path / "autointerp.toml"
    path.write_text(
        textwrap.dedent(f"""
        [run]
        name = "toy"
        output_dir = "{tmp_path / "sae"}"
        [store]
        {store}
        [autointerp]
        max_workers = 2
        explain_top = 3
        explain_per_tier = 1
        window_before = 4
        window_after = 2
        {extra}
        [autointerp.explainer]
        model = "fake-model"
        base_url = "{url}"
        price_input_per_mtok = 1.0
        price_output_per_mtok = 2.0
        retry_initial_s = 0.01
    """)
    )
    return path


def test_a_key_written_in_the_toml_is_a_config_error(tmp_path, run_cli):
    path = experiment(tmp_path, "http://127.0.0.1:9/v1")
    path.write_text(path.read_text() + 'api_key = "sk-live-123"\n')
    res = run_cli("autointerp", path)
    assert res.exit_code == 2 and "autointerp.explainer.api_key" in res.output and "api_key_env" in res.output
    assert "sk-live-123" not in res.output
    path.write_text(path.read_text().replace('api_key = "sk-live-123"', 'api_key_env = "sk-live-123"'))
    res = run_cli("autointerp", path)
    assert res.exit_code == 2 and "NAME of an environment variable" in res.output and "sk-live-123" not in res.output


def test_the_key_comes_from_the_named_variable_and_is_never_written(tmp_path, run_cli, monkeypatch):
    toy_analysis(tmp_path / "sae")
    with FakeChat() as server:
        path = experiment(tmp_path, server.url, "features = [0]")
        path.write_text(path.read_text() + 'api_key_env = "SAECLI_TEST_KEY"\n')
        res = run_cli("autointerp", path)
        assert res.exit_code == 2 and "SAECLI_TEST_KEY" in res.output  # not set: said before any request
        assert server.log == []
        monkeypatch.setenv("SAECLI_TEST_KEY", "sk-secret-999")
        res = run_cli("autointerp", path)
        assert res.exit_code == 0, res.output
    out = tmp_path / "sae" / "analysis" / "default" / "autointerp" / "default"
    for f in [*out.rglob("*"), tmp_path / "autointerp.toml"]:
        if f.is_file():
            assert "sk-secret-999" not in f.read_text()
    assert 'api_key_env = "SAECLI_TEST_KEY"' in (out / "config.toml").read_text()


# ------------------------------------------------------------------ requests
def test_retries_429_and_500_with_exponential_backoff_then_succeeds():
    usage = Usage()
    with FakeChat() as server:
        chat = OpenAIChat(LLMConfig(model="m", base_url=server.url, retry_initial_s=0.2, retry_max_s=5), usage)
        server.fail = [429, 500]
        t = time.perf_counter()
        reply = chat.chat([{"role": "user", "content": "Find what the marked tokens..."}])
        waited = time.perf_counter() - t
        assert [s for _, s in server.log] == [429, 500, 200]
    assert json.loads(reply.text) == {"explanation": "the token ' the' after a verb"}
    assert usage.retries == 2 and usage.requests == 1 and (reply.prompt_tokens, reply.completion_tokens) == (100, 10)
    assert waited < 0.2 * (1 + 2) + 1.0  # full jitter: each wait is at most 0.2 × 2^attempt


def test_a_refused_key_stops_at_once_and_an_unreachable_server_after_the_retries():
    with FakeChat() as server:
        chat = OpenAIChat(LLMConfig(model="m", base_url=server.url, retry_initial_s=0.01), Usage())
        server.fail = [401]
        with pytest.raises(RunError, match="refused model 'm'"):
            chat.chat([{"role": "user", "content": "hi"}])
        assert len(server.log) == 1
        url = server.url
    usage = Usage()
    chat = OpenAIChat(LLMConfig(model="m", base_url=url, retry_initial_s=0.01, max_retries=2), usage)
    with pytest.raises(RunError, match="failed 3 times in a row"):
        chat.chat([{"role": "user", "content": "hi"}])
    assert usage.retries == 2


# ------------------------------------------------------------------ the loop
def test_loop_records_files_store_costs_and_bad_answers(tmp_path, run_cli):
    from saecli.config.run import StoreConfig
    from saecli.store import open_store

    toy_analysis(tmp_path / "sae")
    db = tmp_path / "s.db"
    with open_store(StoreConfig(backend="sqlite", path=str(db))) as store:
        store.put_sae("toy", "default", path=str(tmp_path / "sae"), cfg={"kind": "sae"})
    with FakeChat() as server:
        server.garbage = 1  # one unusable answer: asked again
        path = experiment(
            tmp_path,
            server.url,
            "features = [0, 1]\nmax_answer_retries = 1",
            store=f'backend = "sqlite"\npath = "{db}"',
        )
        res = run_cli("autointerp", path)
        assert res.exit_code == 0, res.output
        assert "cost this run" in res.output and "mean F1 by density decile" in res.output
    folder = tmp_path / "sae" / "analysis" / "default" / "autointerp" / "default"
    recs = [json.loads((folder / "features" / f"{i}.json").read_text()) for i in (0, 1)]
    assert sorted(r["explainer"]["attempts"] for r in recs) == [1, 2]
    det = recs[0]["scores"]["detection"]
    # the fake says "fires" to everything: 3 held-out top + 1 tier vs 3 non-activating → recall 1, precision 4/7
    assert (det["tp"], det["fp"], det["failed"]) == (4, 3, 0) and det["precision"] == pytest.approx(4 / 7)
    assert set(det["tiers"]) == {"top", "tier@0.5"}
    assert recs[0]["usage"]["cost"] == pytest.approx(recs[0]["usage"]["requests"] * (100 * 1 + 10 * 2) / 1e6)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["explained"] == 2 and summary["scorers"]["fuzzing"]["n"] == 2
    with open_store(StoreConfig(backend="sqlite", path=str(db))) as store:
        interp = store.get_feature("toy", "default", 1)["interpretation"]
    assert interp["explanation"] == "the token ' the' after a verb"
    assert interp["scores"]["detection"]["recall"] == 1.0

    with FakeChat() as server:  # a model that never answers usably: recorded, not crashed
        server.garbage = 100
        path = experiment(tmp_path, server.url, "features = [2]\nmax_answer_retries = 2")
        res = run_cli("autointerp", path)
        assert res.exit_code == 0, res.output
        assert server.count("explain") == 3 and server.count("score") == 0
    bad = json.loads((folder / "features" / "2.json").read_text())
    assert bad["explanation"] is None and bad["explainer"]["bad_answer"] == "" and bad["scores"] == {}

    res = run_cli("analyze", path, "--reuse", "--show", "1")
    assert "the token ' the' after a verb" in res.output and "detection F1" in res.output


def test_resume_after_sigkill_pays_for_no_finished_feature_twice(tmp_path, cli):
    toy_analysis(tmp_path / "sae", n_features=13)
    folder = tmp_path / "sae" / "analysis" / "default" / "autointerp" / "default" / "features"
    with FakeChat(delay=0.05) as server:
        path = experiment(tmp_path, server.url)
        proc = subprocess.Popen(
            [sys.executable, "-m", "saecli", "-q", "autointerp", str(path)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while time.time() < deadline and len(list(folder.glob("*.json"))) < 3:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = {p.name: p.read_bytes() for p in folder.glob("*.json")}
        assert 3 <= len(finished) < 12, "the run ended before it could be killed"
        assert not list(folder.glob(".*.tmp")) or True  # a temporary may remain; it is never read as a result
        paid = server.count("explain")
        res = cli("-q", "autointerp", path)
        assert res.exit_code == 0, res.output
        # the second run explains only what had no file: no finished feature is asked again
        assert server.count("explain") - paid == 12 - len(finished)
    for name, data in finished.items():
        assert (folder / name).read_bytes() == data
    assert len(list(folder.glob("*.json"))) == 12  # 12 alive features of 13
    with FakeChat() as server:
        path = experiment(tmp_path, server.url, "features = [0, 1]")
        res = cli("-q", "autointerp", path)
        assert res.exit_code == 0 and server.count("explain") == 0  # all done: nothing to pay
        res = cli("-q", "autointerp", path, "--force")
        assert res.exit_code == 0 and server.count("explain") == 2  # --force redoes them


# ------------------------------------------------------------------ dashboard
def test_dashboard_shows_explanations_and_sortable_filterable_scores(tmp_path):
    from test_dashboard import browse, synthetic_result

    from saecli.dashboard.site import build_site

    site = tmp_path / "site"
    build_site(
        synthetic_result(),
        site,
        explanations={0: "the nasty token", 1: "weak one"},
        title="toy",
        scores={0: {"detection": 0.25, "fuzzing": 0.9}, 1: {"detection": 0.75, "fuzzing": 0.5}},
    )
    dom = browse((site / "features" / "0.html").as_uri(), tmp_path, "--dump-dom")
    assert "the nasty token" in dom and "detection F1 0.25 · fuzzing F1 0.9" in dom
    dom = browse((site / "index.html").as_uri(), tmp_path, "--dump-dom")
    assert 'class="sortable">detection F1</th>' in dom and 'class="sortable">fuzzing F1</th>' in dom
    assert re.search(r"weak one</td><td class=\"num\">0\.75</td><td class=\"num\">0\.5</td>", dom)
    dom = browse((site / "index.html").as_uri() + "#q=detection%3E0.5", tmp_path, "--dump-dom")
    assert re.findall(r'<a href="features/(\d+).html">', dom) == ["1"] and "1 of 3 features" in dom
    dom = browse((site / "index.html").as_uri() + "#q=fuzzing%3E%3D0.9", tmp_path, "--dump-dom")
    assert re.findall(r'<a href="features/(\d+).html">', dom) == ["0"]


# ------------------------------------------------------------------ store backends
from test_store import backend  # noqa: E402,F401  (sqlite, mongomock, and a real MongoDB when configured)


def test_interpretations_land_in_every_store_backend(backend, tmp_path):  # noqa: F811
    from saecli.autointerp.results import Results, interpretation
    from saecli.autointerp.runner import Interpreter, run_features

    result = toy_analysis(tmp_path / "sae")
    with FakeChat() as server, backend.open() as store:
        store.put_sae("toy", "default", path=str(tmp_path / "sae"), cfg={"kind": "sae"})
        chat = OpenAIChat(LLMConfig(model="m", base_url=server.url), Usage())
        interpreter = Interpreter(
            result, AutointerpConfig(explain_top=3, explain_per_tier=1), chat, chat, None, "default/t"
        )
        n = run_features(
            interpreter,
            [0, 1, 2],
            Results(tmp_path / "out"),
            max_workers=2,
            on_done=lambda r: store.put_interpretation("toy", "default", r["index"], interpretation(r)),
        )
        assert n == 3
        got = store.get_feature("toy", "default", 2)["interpretation"]
    assert got == {
        "explanation": "the token ' the' after a verb",
        "model": "m",
        "autointerp": "default/t",
        "scores": {
            k: {
                "accuracy": 4 / 7,
                "precision": 4 / 7,
                "recall": 1.0,
                "f1": pytest.approx(8 / 11),
                "balanced_accuracy": 0.5,
            }
            for k in ("detection", "fuzzing")
        },
    }
