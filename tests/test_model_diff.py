"""Model diffing: [models.<label>] config, the two-model stream (live and cached), a crosscoder trained
on it, the per-model eval numbers (checked by hand) and the dashboard's model labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from saecli.config.load import experiment_from_dict
from saecli.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def chat_model(tiny_llama, tmp_path_factory) -> Path:
    from saecli.lm.tiny import make_tiny_variant

    return make_tiny_variant(tiny_llama, tmp_path_factory.mktemp("chat") / "model")


def diff_config(base: Path, chat: Path, tmp_path: Path, **acts) -> dict:
    return {
        "run": {"name": "diff", "output_dir": str(tmp_path / "run"), "seed": 0},
        "models": {"base": {"name": str(base), "device": "cpu"}, "chat": {"name": str(chat), "device": "cpu"}},
        "dataset": {"path": "builtin:python-docs"},
        "activations": {
            "hook_points": [HOOK],
            "context_size": 32,
            "model_batch_size": 4,
            "batch_size": 64,
            "shuffle_buffer_tokens": 256,
            "source": "live",
            "max_norm_ratio": 0,
            **acts,
        },
        "sae": {"kind": "crosscoder", "d_sae": 32, "k": 4},
        "trainer": {"total_training_tokens": 640, "lr": 1e-3, "log_frequency": 5, "n_checkpoints": 0},
        "eval": {"total_eval_tokens": 256, "ce_contexts": 2},
        "store": {"backend": "none"},
    }


# ----------------------------------------------------------------------------------------------- config


def test_models_config_and_its_errors_name_the_key(tmp_path):
    cfg = diff_config(Path("a"), Path("b"), tmp_path)
    exp = experiment_from_dict(cfg)
    assert list(exp.models) == ["base", "chat"] and exp.model is None
    from saecli.config.models import stream_hook_points

    assert stream_hook_points(exp) == [f"base/{HOOK}", f"chat/{HOOK}"]

    def key_of(change) -> str:
        bad = json.loads(json.dumps(cfg))
        change(bad)
        with pytest.raises(ConfigError) as info:
            experiment_from_dict(bad)
        return info.value.key

    assert key_of(lambda c: c.update(model={"name": "x"})) == "models"
    assert key_of(lambda c: c["models"].pop("chat")) == "models"
    assert key_of(lambda c: c["models"].update({"a b": {"name": "x"}})) == "models.a b"
    assert key_of(lambda c: c["models"]["chat"].update(devise="cpu")) is None  # unknown key: message names it
    assert key_of(lambda c: c["sae"].update(hook_points=[HOOK])) == "sae.hook_points"  # heads are '<label>/<hook>'
    ok = json.loads(json.dumps(cfg))
    ok["sae"]["hook_points"] = [f"chat/{HOOK}", f"base/{HOOK}"]
    experiment_from_dict(ok)


# ----------------------------------------------------------------------------------------------- stream


def test_live_stream_gives_both_models_on_the_same_tokens_in_order(tmp_path, tiny_llama, chat_model):
    """Each head equals what that model's own one-model stream gives on the same text, batch for batch."""
    import dataclasses

    from saecli.data.live import LiveStream
    from saecli.data.open import open_stream
    from saecli.lm import load_model

    exp = experiment_from_dict(diff_config(tiny_llama, chat_model, tmp_path))
    stream = open_stream(exp)
    assert stream.hook_points == [f"base/{HOOK}", f"chat/{HOOK}"]
    assert stream.d_model == {f"base/{HOOK}": 64, f"chat/{HOOK}": 64}
    singles = {
        label: LiveStream(load_model(cfg), exp.dataset, exp.activations, hook_points=[HOOK])
        for label, cfg in exp.models.items()
    }
    for _ in range(6):  # past one shuffle window (4 contexts)
        b = next(stream)
        for label, single in singles.items():
            s = next(single)
            assert torch.equal(b.tokens, s.tokens) and torch.equal(b.doc, s.doc) and torch.equal(b.pos, s.pos)
            assert torch.equal(b.acts[f"{label}/{HOOK}"], s.acts[HOOK])
        assert not torch.allclose(b.acts[f"base/{HOOK}"], b.acts[f"chat/{HOOK}"])  # the models differ
    # resume: a fresh stream given the state after 3 batches yields batch 4, 5, ... exactly
    first = open_stream(exp)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(3)]
    again = open_stream(exp)
    again.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        got = next(again)
        assert all(torch.equal(got.acts[h], want.acts[h]) for h in want.acts)
    other = dataclasses.replace(exp, models={"chat": exp.models["chat"], "base": exp.models["base"]})
    with pytest.raises(Exception, match="models were"):
        open_stream(other).load_state_dict(state)


def test_misaligned_streams_are_refused_batch_by_batch():
    from saecli.data.models import ModelsStream
    from saecli.data.synthetic import SyntheticStream
    from saecli.errors import UsageError

    same = ModelsStream({"a": SyntheticStream(seed=1, n_batches=2), "b": SyntheticStream(seed=1, n_batches=2)})
    batches = list(same)
    assert len(batches) == 2 and list(batches[0].acts) == ["a/synthetic.0", "b/synthetic.0"]
    other = ModelsStream({"a": SyntheticStream(seed=1), "b": SyntheticStream(seed=2)})
    with pytest.raises(UsageError, match="different tokens"):
        next(other)
    for n_a, n_b in ((2, 1), (1, 2)):  # like zip: the pass ends with the shortest stream
        short = ModelsStream({"a": SyntheticStream(seed=1, n_batches=n_a), "b": SyntheticStream(seed=1, n_batches=n_b)})
        assert len(list(short)) == 1


def test_different_tokenizers_are_refused_naming_the_keys(tmp_path, tiny_llama):
    from saecli.data.open import open_stream
    from saecli.lm.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other", vocab_size=300)
    exp = experiment_from_dict(diff_config(tiny_llama, other, tmp_path))
    with pytest.raises(ConfigError) as info:
        open_stream(exp)
    assert info.value.key == "models.chat.name" and "models.base.name" in str(info.value)
    assert "tokenise" in str(info.value)


def test_cached_pair_is_checked_and_zipped(tmp_path, tiny_llama, chat_model, run_cli):
    """`generate` with [models] writes <cache_dir>/<label>; the stream reads both, checked like check --against."""
    import tomli_w

    from saecli.data.models import ModelsStream
    from saecli.data.open import open_stream
    from saecli.errors import UsageError

    cfg = diff_config(
        tiny_llama,
        chat_model,
        tmp_path,
        source="auto",
        cache_dir=str(tmp_path / "cache"),
        total_tokens=512,
        chunk_tokens=128,
    )
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(cfg))
    result = run_cli("generate", path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "base" / "shard-000").is_dir() and (tmp_path / "cache" / "chat" / "shard-000").is_dir()
    exp = experiment_from_dict(cfg)
    stream = open_stream(exp, purpose="eval")
    assert isinstance(stream, ModelsStream) and type(stream.children["base"]).__name__ == "CacheStream"
    live = open_stream(
        experiment_from_dict({**cfg, "activations": {**cfg["activations"], "source": "live"}}), purpose="eval"
    )
    b, want = next(stream), next(live)  # unshuffled eval streams: the same tokens from the caches as live
    assert torch.equal(b.tokens, want.tokens)
    for h in want.acts:
        torch.testing.assert_close(b.acts[h], want.acts[h], rtol=1e-5, atol=1e-5)
    # a "chat" cache of other text (from document 3 on; same size and chunks) is refused at open
    import shutil

    shutil.rmtree(tmp_path / "cache" / "chat")
    other = {
        **cfg,
        "model": cfg["models"]["chat"],
        "dataset": {"path": "builtin:python-docs", "skip_documents": 3},
        "activations": {**cfg["activations"], "cache_dir": str(tmp_path / "cache" / "chat")},
    }
    other.pop("models")
    path.write_text(tomli_w.dumps(other))
    assert run_cli("generate", path).exit_code == 0
    with pytest.raises(UsageError, match="not of the same text"):
        open_stream(exp)
    # same text, other chunks: refused before reading any token
    shutil.rmtree(tmp_path / "cache" / "chat")
    other["dataset"], other["activations"]["chunk_tokens"] = {"path": "builtin:python-docs"}, 64
    path.write_text(tomli_w.dumps(other))
    assert run_cli("generate", path).exit_code == 0
    with pytest.raises(UsageError, match="different chunks"):
        open_stream(exp)


# ----------------------------------------------------------------------------------------------- numbers


def crafted_crosscoder(k: int = 1):
    """Two models, one head each, d_model 2, three latents whose decoder norms are set by hand:
    latent 0 ‖d_a‖ = 5, ‖d_b‖ = 0 (r = 0); latent 1 1 and 1 (r = 0.5); latent 2 1 and 19 (r = 0.95)."""
    from saecli.config.dictionary import DictionaryConfig  # noqa: F401 - registers the kinds
    from saecli.dictionaries.crosscoder import Crosscoder
    from saecli.dictionaries.crosscoder_config import CrosscoderConfig

    cfg = CrosscoderConfig(kind="crosscoder", d_sae=3, k=k, norm_activation="none")
    cc = Crosscoder(cfg, 2, ["a/h", "b/h"])
    with torch.no_grad():
        cc.W_dec.copy_(torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 19.0]]]))
    return cc


def test_decoder_norm_ratios_and_labels_by_hand():
    from saecli.evaluation.model_diff import model_diff_report

    cc = crafted_crosscoder()
    labels, r = cc.relative_decoder_norm()
    assert labels == ["a", "b"]
    torch.testing.assert_close(r, torch.tensor([0.0, 0.5, 0.95]))
    report = model_diff_report(cc, {"a/h": {"explained_variance": 0.8}, "b/h": {"explained_variance": 0.6}})
    assert report["labels"] == {"a-only": 1, "shared": 1, "b-only": 1}
    assert report["explained_variance"] == {"a": 0.8, "b": 0.6}
    counts = report["relative_decoder_norm"]["counts"]
    assert len(counts) == 20 and counts[0] == 1 and counts[10] == 1 and counts[19] == 1 and sum(counts) == 3
    assert report["norm_share_mean"]["a"] == pytest.approx((1 + 0.5 + 0.05) / 3)
    assert report["heads"] == {"a": ["a/h"], "b": ["b/h"]}


def test_per_model_explained_variance_by_hand():
    """Heads reconstructed exactly (model a) or by their mean only (model b): EV 1 and 0 per head."""
    from saecli.data.batch import Batch
    from saecli.evaluation.evaluate import reconstruction_metrics
    from saecli.evaluation.metrics import Thresholds
    from saecli.evaluation.model_diff import model_diff_report

    cc = crafted_crosscoder(k=2)
    with torch.no_grad():  # latent i reads a's coordinate i and writes it back to a; b gets its bias only
        cc.core.W_enc.zero_()
        cc.W_enc[0, 0, 0] = 1.0
        cc.W_enc[1, 0, 1] = 1.0
        cc.W_dec.zero_()
        cc.W_dec[0, 0, 0] = 1.0
        cc.W_dec[1, 0, 1] = 1.0
        cc.W_dec[2, 1, 0] = 1e-3  # keeps b's decoder norm non-zero (unused: latent 2 never fires)
        cc.core.b_enc.zero_()
        cc.b_dec.zero_()
        cc.b_dec[1] = torch.tensor([2.0, -1.0])  # model b: every token reconstructed as its mean
    a = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 4.0], [5.0, 3.0]])  # positive: ReLU/TopK keep it
    b = torch.tensor([[1.0, -2.0], [3.0, 0.0], [2.0, -1.0], [2.0, -1.0]])  # mean (2, -1)
    batch = Batch({"a/h": a, "b/h": b}, torch.arange(4))
    acc = reconstruction_metrics(cc.eval(), iter([batch]), 4, Thresholds(1e-8, 1e-5, 0.1))
    per_hook = acc.result()["per_hook"]
    assert per_hook["a/h"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert per_hook["b/h"]["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    report = model_diff_report(cc, per_hook)
    assert report["explained_variance"]["a"] == pytest.approx(1.0, abs=1e-6)
    assert report["explained_variance"]["b"] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------- train, eval


def test_crosscoder_trains_and_evaluates_per_model(tmp_path, tiny_llama, chat_model, run_cli):
    from saecli.evaluation import evaluate
    from saecli.runs import train

    exp = experiment_from_dict(diff_config(tiny_llama, chat_model, tmp_path))
    folder = train(exp).folder
    cfg = json.loads((folder / "cfg.json").read_text())
    assert f"chat/{HOOK}" in json.dumps(cfg)
    result = evaluate(exp, folder, show=False)
    diff = result["model_diff"]
    assert diff["models"] == ["base", "chat"]
    assert set(result["per_hook"]) == {f"base/{HOOK}", f"chat/{HOOK}"}
    assert diff["explained_variance"]["base"] == pytest.approx(result["per_hook"][f"base/{HOOK}"]["explained_variance"])
    assert sum(diff["labels"].values()) == 32 and sum(diff["relative_decoder_norm"]["counts"]) == 32
    assert result["data"]["source"] == "live"  # held out from the live text, not the (absent) cache
    assert result["data"]["skip_documents"] > 0  # past the documents training read (found with the first model)
    # analyze + dashboard on both models' contexts: every feature has its model label
    out = run_cli("analyze", folder, "--html", "--set", "analyze.total_analyzing_tokens=256")
    assert out.exit_code == 0, out.output
    index = (folder / "analysis" / "default" / "html" / "index.html").read_text()
    data = json.loads(re.search(r'id="data">(.*?)</script>', index, re.S).group(1))
    col = data["model_diff"]["col"]
    assert {r[col + 1] for r in data["features"]} <= {"base-only", "shared", "chat-only"}
    assert len(data["features"]) == 32


def test_crosscoder_finds_latents_of_one_model_on_a_synthetic_pair(tmp_path):
    """Two 'models' built from one sparse dictionary: atoms 0-7 exist in base only, 8-15 in chat only,
    16-23 in both (same tokens, same coefficients: two SyntheticStreams of one seed, zipped by the
    ModelsStream). The trained crosscoder's latent for each atom has r ≈ 0, ≈ 1 and ≈ 0.5."""
    from saecli.config.base import parse
    from saecli.config.experiment import Experiment
    from saecli.data.models import ModelsStream
    from saecli.data.synthetic import SyntheticStream
    from saecli.dictionaries.registry import load_dictionary
    from saecli.evaluation.model_diff import model_diff_report
    from saecli.runs import train

    def child() -> SyntheticStream:
        return SyntheticStream(d_model=16, n_atoms=24, k=3, batch_size=256, hook_points=["h"], seed=3)

    base, chat = child(), child()
    atoms = base.true_dictionary.clone()
    base.true_dictionary, chat.true_dictionary = atoms.clone(), atoms.clone()
    base.true_dictionary[8:16] = 0
    chat.true_dictionary[0:8] = 0
    exp = parse(
        Experiment,
        {
            "run": {"name": "syn", "output_dir": str(tmp_path / "run")},
            "store": {"backend": "none"},
            "sae": {"kind": "crosscoder", "d_sae": 48, "activation": "topk", "k": 3, "norm_activation": "none"},
            "trainer": {"total_training_tokens": 256 * 800, "lr": 3e-3, "n_checkpoints": 0, "log_frequency": 200},
        },
    )
    cc = load_dictionary(train(exp, stream=ModelsStream({"base": base, "chat": chat})).folder)
    assert cc.heads == ["base/h", "chat/h"]
    target = torch.nn.functional.normalize(torch.cat([base.true_dictionary, chat.true_dictionary], 1), dim=-1)
    cos = target @ torch.nn.functional.normalize(cc.W_dec.detach().reshape(cc.d_sae, -1), dim=-1).T
    assert cos.max(1).values.min() > 0.95  # every atom recovered
    best = cos.argmax(1)
    _, r = cc.relative_decoder_norm()
    assert (r[best[:8]] < 0.1).all() and (r[best[8:16]] > 0.9).all() and ((r[best[16:]] - 0.5).abs() < 0.1).all()
    report = model_diff_report(cc, {})
    assert report["labels"]["base-only"] >= 8 and report["labels"]["chat-only"] >= 8


# ----------------------------------------------------------------------------------------------- dashboard


def test_dashboard_shows_which_model_each_feature_belongs_to(tmp_path):
    import numpy as np

    from saecli.dashboard.site import build_site
    from tests.test_dashboard import synthetic_result

    result = synthetic_result()
    result.extras["relative_decoder_norm"] = np.array([0.02, 0.5, 0.97], dtype=np.float32)
    result.meta["out_hooks"] = [f"base/{HOOK}", f"chat/{HOOK}"]
    site = build_site(result, tmp_path / "site").parent

    def data(path: Path):
        text = path.read_text()
        return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1))

    index = data(site / "index.html")
    assert index["model_diff"]["models"] == ["base", "chat"] and "<svg" in index["model_diff"]["svg"]
    col = index["model_diff"]["col"]
    assert [(r[col], r[col + 1]) for r in index["features"]] == [
        (0.02, "base-only"),
        (0.5, "shared"),
        (0.97, "chat-only"),
    ]
    feature = data(site / "features" / "0.html")
    assert feature["model"] == {"ratio": 0.02, "label": "base-only", "models": ["base", "chat"]}
    # a one-model dictionary: no model column
    plain = build_site(synthetic_result(), tmp_path / "plain").parent
    assert data(plain / "index.html")["model_diff"] is None
