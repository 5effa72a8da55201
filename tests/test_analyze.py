"""Feature analysis: the streaming bookkeeping equals brute force; the analyzer's outputs and atomicity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from saecli.analysis.topk import FeatureBook, default_specs, hashed_uniform
from saecli.config.dictionary import DictionaryConfig
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


def test_huge_activations_are_clamped_to_float16():
    acts = torch.zeros(2, 3, 40)
    acts[:, 1, :] = 1e6  # every feature, both contexts: many rows take the contiguous-copy path
    acts[0, 2, 5] = 7e4
    book = FeatureBook(40, 3, default_specs(2, [], 0, 0))
    book.update(acts, torch.zeros(2, 3, dtype=torch.long))
    kept = book.sets[0].sorted()
    assert torch.all(kept["acts"][:, :, 1] == 65504) and kept["acts"].isfinite().all()
    assert book.max_act[5] == 1e6 and kept["value"][5, 0] == 1e6
    one = FeatureBook(40, 3, default_specs(2, [], 0, 0))
    few = torch.zeros(2, 3, 40)
    few[0, 1, 3] = 1e6  # one row: gathered directly
    one.update(few, torch.zeros(2, 3, dtype=torch.long))
    assert one.sets[0].sorted()["acts"][3, 0].tolist() == [0, 65504, 0]


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

    def __init__(
        self,
        d_model: int,
        d_sae: int,
        in_hooks: list[str],
        out_hooks: list[str] | None = None,
        norm: str = "none",
        seed: int = 0,
    ):
        super().__init__(DictionaryConfig(d_sae=d_sae, norm_activation=norm), d_model, in_hooks, out_hooks or in_hooks)
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_sae, d_model, generator=g) / d_model**0.5)
        self.b_enc = torch.nn.Parameter(torch.full((d_sae,), -0.1))
        self.W_dec = torch.nn.Parameter(torch.randn(len(self.out_hooks), d_sae, d_model, generator=g))

    def encode(self, inputs, ctx=None):
        x = sum(inputs[h] for h in self.in_hooks)
        return torch.relu(x @ self.W_enc.T + self.b_enc)

    def decode_hooks(self, feature_acts, inputs=None):
        return {h: feature_acts @ self.W_dec[i] for i, h in enumerate(self.out_hooks)}

    def loss(self, inputs, targets, ctx, mask=None):
        f = self.encode(inputs)
        recon = self.decode_hooks(f)
        mse = sum((recon[h] - targets[h]).pow(2).mean() for h in self.out_hooks)
        return LossOutput(mse, {"mse": mse}, f, recon, targets)

    def decoder_directions(self, hook=None):
        return self.W_dec[self.out_hooks.index(hook or self.out_hooks[0])]

    def decoder_norms(self):
        return self.W_dec.norm(dim=-1).sum(0)

    def fold_activation_scale(self):
        self.folded = True


# --------------------------------------------------------------------------- the analyzer on a tiny model

HOOK = "blocks.1.hook_resid_post"
CTX = 32


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    from saecli.config.model import ModelConfig
    from saecli.lm import load_model

    return load_model(ModelConfig(name=str(tiny_llama), device="cpu"))


def real_sae(d_sae: int = 96, k: int = 6):
    from saecli.config.base import parse
    from saecli.config.dictionary import DictionaryConfig
    from saecli.dictionaries.registry import build_dictionary

    torch.manual_seed(0)
    cfg = parse(
        DictionaryConfig,
        {"kind": "sae", "d_sae": d_sae, "activation": "topk", "k": k, "norm_activation": "none"},
        key="sae",
    )
    return build_dictionary(cfg, 64, [HOOK]).eval()


def analyze_tiny(lm, dictionary, tokens: int = 1500, **overrides):
    from saecli.analysis.analyzer import FeatureAnalyzer, context_batches, decoder_for, run_analysis
    from saecli.config.activations import ActivationsConfig
    from saecli.config.analyze import AnalyzeConfig
    from saecli.config.dataset import DatasetConfig
    from saecli.lm import run_to_hooks

    cfg = AnalyzeConfig(
        total_analyzing_tokens=tokens, top_samples=4, tier_samples=2, non_activating_samples=2, **overrides
    )
    analyzer = FeatureAnalyzer(dictionary, cfg, CTX)
    batches = context_batches(
        lm,
        DatasetConfig(),
        ActivationsConfig(hook_points=[HOOK], context_size=CTX),
        [HOOK],
        context_size=CTX,
        batch_contexts=8,
    )
    n = run_analysis(analyzer, batches, tokens)
    forward = lambda t: run_to_hooks(lm, t, [HOOK])  # noqa: E731
    return n, analyzer.result(decode=decoder_for(lm.tokenizer), forward=forward, batch_contexts=8)


def test_analysis_contexts_match_a_fresh_forward(tiny_lm):
    """A kept context re-run through model + SAE gives the stored activations, and (doc, pos) locate it."""
    from saecli.config.dataset import DatasetConfig
    from saecli.data.text import iter_documents
    from saecli.lm import run_to_hooks

    sae = real_sae()
    n, res = analyze_tiny(tiny_lm, sae)
    assert res.n_analyzed_tokens == n >= 1500
    assert res.meta["context_size"] == CTX and res.d_sae == 96
    f = int(res.act_times.argmax())
    rec = res.feature(f)
    top = rec["samplings"][0]
    assert top["name"] == "top" and len(top["tokens"]) == 4
    assert np.all(np.diff(top["max"]) <= 0)
    assert rec["max_act"] == pytest.approx(float(top["max"][0]))
    assert rec["density"] == pytest.approx(rec["act_times"] / n)
    assert rec["histogram"]["counts"].sum() == rec["act_times"]

    tokens = torch.from_numpy(top["tokens"].astype(np.int64))
    with torch.no_grad():
        acts = run_to_hooks(tiny_lm, tokens, [HOOK])[HOOK]
        feats = sae.encode({HOOK: acts.reshape(-1, 64)}).reshape(len(tokens), CTX, -1)[..., f]
    feats[tokens == tiny_lm.bos_token_id] = 0  # BOS is an ignored token
    torch.testing.assert_close(torch.from_numpy(top["acts"]).float(), feats, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.from_numpy(top["max"]), feats.amax(1), atol=1e-5, rtol=1e-5)

    # (doc, pos) is where the context's first counted token sits in the data
    docs = dict(iter_documents(DatasetConfig(max_documents=int(top["doc"].max()) + 1)))
    for j in range(len(tokens)):
        ids = tiny_lm.tokenizer(docs[int(top["doc"][j])], add_special_tokens=False)["input_ids"]
        start = int(top["pos"][j])
        span = tokens[j, 1:].tolist()  # after the BOS
        k = min(len(span), len(ids) - start)
        assert ids[start : start + k] == span[:k]
    # the vocabulary table covers every stored token
    assert set(np.unique(top["tokens"]).tolist()) <= set(res.vocab)
    assert res.vocab[int(tokens[0, 0])] == "<|bos|>"


def test_optional_extras_hooks(tiny_lm):
    """`decoder_norm_per_hook` for several out hooks, `analysis_extras` and `context_extras` when defined."""

    class WithExtras(ToyDictionary):
        def analysis_extras(self):
            return {"enc_norm": self.W_enc.norm(dim=-1)}

        def context_extras(self, inputs, features, positions):
            x = inputs[HOOK]
            return {"input_norm": x.norm(dim=-1), "peak": positions.float()}

    d = WithExtras(64, 40, [HOOK], [HOOK, "blocks.2.hook_resid_post"]).eval()
    with torch.no_grad():  # residual norms of the tiny model are ≈ 0.2: pre-activations ≈ N(0, 1)
        d.W_enc.mul_(40)
        d.b_enc.fill_(-1.5)
        d.b_enc[::7] = -100.0  # these never fire
    n, res = analyze_tiny(tiny_lm, d, tokens=600)
    assert res.extras["decoder_norm_per_hook"].shape == (40, 2)
    assert res.meta["extra_columns"]["decoder_norm_per_hook"] == [HOOK, "blocks.2.hook_resid_post"]
    np.testing.assert_allclose(res.extras["enc_norm"], d.W_enc.norm(dim=-1).detach().numpy(), rtol=1e-6)
    assert res.extras["input_norm"].shape == (40, CTX)
    fired = res.samplings["top"]["count"] > 0
    assert fired.any() and (~fired).any()
    assert np.all(res.extras["input_norm"][~fired] == 0)
    f = int(np.nonzero(fired)[0][0])
    peak = int(res.samplings["top"]["acts"][f, 0].astype(np.float32).argmax())
    assert res.extras["peak"][f] == peak
    from saecli.lm import run_to_hooks

    toks = torch.from_numpy(res.samplings["top"]["tokens"][f, :1].astype(np.int64))
    want = run_to_hooks(tiny_lm, toks, [HOOK])[HOOK][0].norm(dim=-1)
    np.testing.assert_allclose(res.extras["input_norm"][f], want.numpy(), rtol=1e-4)
    assert res.feature(f)["decoder_norm_per_hook"].shape == (2,)


def test_result_file_round_trip(tiny_lm, tmp_path):
    from saecli.analysis.records import AnalysisResult

    _, res = analyze_tiny(tiny_lm, real_sae(), tokens=400)
    path = res.save(tmp_path / "a")
    assert path.name == "features.safetensors" and (tmp_path / "a" / "meta.json").exists()
    back = AnalysisResult.load(tmp_path / "a")
    assert back.n_analyzed_tokens == res.n_analyzed_tokens and back.vocab == res.vocab
    for i in (0, 7, 95):
        a, b = res.feature(i), back.feature(i)
        assert a["act_times"] == b["act_times"] and a["max_act"] == b["max_act"]
        for sa, sb in zip(a["samplings"], b["samplings"]):
            assert sa["name"] == sb["name"]
            for key in ("tokens", "acts", "max", "doc", "pos"):
                np.testing.assert_array_equal(sa[key], sb[key])


def test_interrupting_an_analysis_leaves_the_previous_one(tiny_lm, tmp_path, monkeypatch):
    """Interrupted while streaming, while writing the file, or while writing the store: nothing changes."""
    try:
        from saecli.store import open_store
    except ImportError:
        pytest.skip("saecli.store is not there yet (another helper is writing it)")
    from saecli.analysis.analyzer import FeatureAnalyzer, publish, run_analysis
    from saecli.analysis.records import AnalysisResult, analysis_dir
    from saecli.config.analyze import AnalyzeConfig
    from saecli.config.run import StoreConfig

    sae = real_sae()
    folder = tmp_path / "sae"
    store = open_store(StoreConfig(backend="sqlite", path=str(tmp_path / "store.db")))
    store.put_sae("tiny", "default", path=str(folder), cfg={})
    _, first = analyze_tiny(tiny_lm, sae, tokens=300)
    publish(first, folder, store, sae_name="tiny")
    file = analysis_dir(folder, "default") / "features.safetensors"
    before = file.read_bytes()
    feature_before = store.get_feature("tiny", "default", 5)

    def unchanged():
        assert file.read_bytes() == before
        assert store.get_analysis("tiny", "default", "default")["n_analyzed_tokens"] == first.n_analyzed_tokens
        got = store.get_feature("tiny", "default", 5)
        assert got["act_times"] == feature_before["act_times"]
        np.testing.assert_array_equal(got["samplings"][0]["acts"], feature_before["samplings"][0]["acts"])
        assert AnalysisResult.load(file.parent).n_analyzed_tokens == first.n_analyzed_tokens

    # 1. Ctrl-C while streaming: nothing is written before the stream ends
    _, second = analyze_tiny(tiny_lm, sae, tokens=700)

    def stream():
        from saecli.data.batch import Batch

        yield Batch({HOOK: torch.randn(2, CTX, 64)}, torch.randint(0, 100, (2, CTX)))
        raise KeyboardInterrupt

    analyzer = FeatureAnalyzer(sae, AnalyzeConfig(), CTX)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(analyzer, stream(), 10_000)
        publish(analyzer.result(), folder, store, sae_name="tiny")
    unchanged()

    # 2. Ctrl-C in the middle of writing the file
    import safetensors.numpy

    real_save = safetensors.numpy.save_file

    def half_then_interrupt(arrays, path, metadata=None):
        real_save(arrays, path, metadata=metadata)
        with open(path, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        publish(second, folder, store, sae_name="tiny")
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    unchanged()

    # 3. Ctrl-C after 10 of the 96 features reached the store
    def records():
        for i, rec in enumerate(second.records()):
            if i == 10:
                raise KeyboardInterrupt
            yield rec

    with pytest.raises(KeyboardInterrupt):
        store.replace_analysis("tiny", "default", "default", records(), second.store_meta())
    unchanged()

    # and a complete run does replace it
    publish(second, folder, store, sae_name="tiny")
    assert store.get_analysis("tiny", "default", "default")["n_analyzed_tokens"] == second.n_analyzed_tokens
    assert AnalysisResult.load(file.parent).n_analyzed_tokens == second.n_analyzed_tokens
    store.close()


# --------------------------------------------------------------------------- the command


def experiment(tmp_path, model, *, tokens: int = 1200, store: str = "sqlite") -> Path:
    """A saved (untrained) TopK SAE on the tiny llama and an experiment file pointing at it."""
    from conftest import write_toml

    folder = tmp_path / "run"
    real_sae().save(folder)
    return write_toml(
        tmp_path / "exp.toml",
        f"""
[run]
name = "tiny-sae"
output_dir = "{folder}"

[model]
name = "{model}"
device = "cpu"

[activations]
hook_points = ["{HOOK}"]
context_size = {CTX}
model_batch_size = 8

[analyze]
total_analyzing_tokens = {tokens}
top_samples = 5
tier_samples = 3
non_activating_samples = 3

[store]
backend = "{store}"
path = "{tmp_path / "store.db"}"
""",
    )


def test_analyze_command_writes_file_store_site_and_shows(tmp_path, tiny_llama, cli):
    exp = experiment(tmp_path, tiny_llama)
    res = cli("analyze", exp, "--html", "--show", "3")
    assert res.exit_code == 0, res
    analysis = tmp_path / "run" / "analysis" / "default"
    assert (analysis / "features.safetensors").exists() and (analysis / "meta.json").exists()
    assert (analysis / "html" / "index.html").exists() and (tmp_path / "run" / "dla.json").exists()
    assert "feature 3" in res.stdout and "top (5 contexts)" in res.stdout
    assert "dashboard:" in res.stdout

    from saecli.config.run import StoreConfig
    from saecli.store import open_store

    with open_store(StoreConfig(backend="sqlite", path=str(tmp_path / "store.db"))) as store:
        meta = store.get_analysis("tiny-sae", "default", "default")
        assert meta["n_features"] == 96 and meta["n_analyzed_tokens"] >= 1200
        rec = store.get_feature("tiny-sae", "default", 3)
        assert rec["samplings"][0]["name"] == "top" and "top_positive" in rec["logits"]
        best = next(store.iter_features("tiny-sae", "default", order_by="act_times", descending=True, limit=1))
        assert best["act_times"] == max(r["act_times"] for r in store.iter_features("tiny-sae", "default"))

        store.put_interpretation("tiny-sae", "default", 3, {"explanation": "a test <explanation>"})
    again = cli("analyze", exp, "--reuse", "--html", "--show", "3")  # no model needed: the site is rebuilt
    assert again.exit_code == 0, again
    assert "top (5 contexts)" in again.stdout
    page = (analysis / "html" / "features" / "3.html").read_text()
    assert "a test \\u003cexplanation\\u003e" in page
    assert "a test \\u003cexplanation\\u003e" in (analysis / "html" / "index.html").read_text()
    bad = cli("analyze", exp, "--reuse", "--show", "500")
    assert bad.exit_code == 2 and "feature 500 does not exist" in bad.output


def test_ctrl_c_during_analyze_keeps_the_previous_analysis(tmp_path, tiny_llama):
    """A real SIGINT to `saecli analyze` mid-stream: exit 130, the earlier analysis file untouched."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from saecli.analysis.records import AnalysisResult

    exp = experiment(tmp_path, tiny_llama, tokens=800, store="none")
    env = dict(os.environ, COLUMNS="200")
    first = subprocess.run(
        [sys.executable, "-m", "saecli", "analyze", str(exp)], capture_output=True, text=True, env=env, timeout=600
    )
    assert first.returncode == 0, first.stderr
    file = tmp_path / "run" / "analysis" / "default" / "features.safetensors"
    before = file.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "saecli", "analyze", str(exp), "--set", "analyze.total_analyzing_tokens=100000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = b""
    try:
        while b"analysing" not in seen:  # the line printed just before the stream starts
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"saecli ended before analysing: {seen!r}"
            seen += chunk
        time.sleep(3.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (seen + err).decode(errors="replace")[-3000:]
    assert b"interrupted" in err
    assert file.read_bytes() == before
    assert AnalysisResult.load(file.parent).n_analyzed_tokens < 2000
    assert not [p for p in file.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
