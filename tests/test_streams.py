"""Activation streams: every token once per epoch, shuffled, exact resume, bounded memory; cache ≡ live."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_toml

from saecli.data.cache import write_cache
from saecli.data.reader import CacheStream
from saecli.errors import UsageError

HOOK = "blocks.0.hook_resid_post"


def synthetic_cache(root: Path, n_chunks: int, chunk_tokens: int, d: int = 8, sizes: list[int] | None = None) -> Path:
    """Token i of the cache has id i and activation row [i, i, ...]: easy to follow through a shuffle."""

    def chunks():
        start = 0
        for c in range(n_chunks):
            n = sizes[c] if sizes else chunk_tokens
            ids = torch.arange(start, start + n)
            yield {
                f"acts.{HOOK}": ids.float()[:, None].expand(n, d),
                "tokens": ids,
                "doc": ids // 100,
                "pos": ids % 100,
            }
            start += n

    write_cache(root, chunks(), hook_points=[HOOK], chunk_tokens=chunk_tokens)
    return root


def _take(stream, n):
    out = []
    for _ in range(n):
        b = next(stream)
        assert torch.equal(b.acts[HOOK][:, 0].long(), b.tokens)  # rows stay with their tokens
        out.append(b.tokens.clone())
    return out


def test_every_token_once_per_epoch_in_shuffled_order(tmp_path):
    sizes = [100, 97, 103, 100, 88, 100, 100, 12]  # chunks of uneven size
    cache = synthetic_cache(tmp_path / "c", len(sizes), 100, sizes=sizes)
    total = sum(sizes)
    stream = CacheStream(cache, batch_size=64, buffer_tokens=300, seed=1, epochs=2)
    assert stream.window_chunks == 3 and stream.hook_points == [HOOK] and stream.d_model == {HOOK: 8}
    batches = [b.tokens for b in stream]
    assert all(len(b) == 64 for b in batches[:-1])
    seq = torch.cat(batches)
    first, second = seq[:total], seq[total:]
    assert len(second) == total
    assert torch.equal(first.sort().values, torch.arange(total))
    assert torch.equal(second.sort().values, torch.arange(total))
    assert not torch.equal(first, second) and not torch.equal(first, torch.arange(total))
    # without shuffling: the cache's own order
    plain = torch.cat([b.tokens for b in CacheStream(cache, batch_size=64, shuffle=False, epochs=1)])
    assert torch.equal(plain, torch.arange(total))
    assert stream.mean_norms[HOOK] == pytest.approx(float((torch.arange(total).float() * 8**0.5).mean()), rel=1e-6)


@pytest.mark.parametrize("skip", [0, 3, 11, 25])  # 25 batches: past the end of the first epoch
def test_state_dict_resume_gives_the_same_remaining_batches(tmp_path, skip):
    cache = synthetic_cache(tmp_path / "c", 6, 100)
    make = lambda: CacheStream(cache, batch_size=48, buffer_tokens=200, seed=7)  # noqa: E731
    a = make()
    _take(a, skip)
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint file
    rest = _take(a, 12)
    b = make()
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, _take(b, 12)))
    with pytest.raises(UsageError, match="seed"):
        CacheStream(cache, batch_size=48, buffer_tokens=200, seed=8).load_state_dict(state)


def test_ranks_read_disjoint_parts(tmp_path):
    cache = synthetic_cache(tmp_path / "c", 7, 50)
    parts = [
        torch.cat(
            [b.tokens for b in CacheStream(cache, batch_size=32, buffer_tokens=100, rank=r, world_size=2, epochs=1)]
        )
        for r in range(2)
    ]
    assert len(set(parts[0].tolist()) & set(parts[1].tolist())) == 0
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(350))
    with pytest.raises(UsageError, match="fewer than the 8"):
        CacheStream(cache, world_size=8, rank=0)


_PEAK = """
import resource, sys
from saecli.data.reader import CacheStream
n = 0
for batch in CacheStream(sys.argv[1], batch_size=4096, buffer_tokens=4 * 8192, epochs=1):
    n += batch.n_tokens
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_reader_memory_does_not_grow_with_the_cache(tmp_path):
    peaks = {}
    for n_chunks in (8, 80):  # 8 MiB and 80 MiB of activations (4 MiB each), one 16 MiB shuffle window
        cache = synthetic_cache(tmp_path / f"c{n_chunks}", n_chunks, 8192, d=128)
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, str(cache)], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.split()
        assert int(out[0]) == n_chunks * 8192
        peaks[n_chunks] = int(out[1]) / 1024  # MiB
    assert peaks[80] <= 1.10 * peaks[8], peaks


# ----------------------------------------------------------------------------- live streams and open_stream


def _exp(tmp_path: Path, model: Path, extra: str = "", source: str = "auto"):
    from saecli.config.load import load_experiment

    toml = write_toml(
        tmp_path / "exp.toml",
        f"""
[model]
name = "{model}"
device = "cpu"

[activations]
hook_points = ["{HOOK}", "blocks.1.hook_mlp_out"]
context_size = 32
model_batch_size = 4
batch_size = 100
total_tokens = 1500
chunk_tokens = 400
shuffle_buffer_tokens = 256
cache_dir = "{tmp_path / "cache"}"
source = "{source}"
{extra}
""",
    )
    return load_experiment(toml)


@pytest.fixture(scope="module")
def lm(tiny_llama):
    from saecli.config.model import ModelConfig
    from saecli.lm import load_model

    return load_model(ModelConfig(name=str(tiny_llama), device="cpu"))


def test_live_stream_resumes_exactly_and_matches_the_cache(tmp_path, tiny_llama, lm):
    from saecli.data.cache import generate_shard
    from saecli.data.live import LiveStream
    from saecli.data.open import open_stream
    from saecli.lm import run_to_hooks

    exp = _exp(tmp_path, tiny_llama)
    live = open_stream(exp, lm=lm)
    assert isinstance(live, LiveStream) and not live.contexts
    assert live.window_contexts == 8  # 256 buffer tokens / 32 per context, whole model batches of 4
    first = [next(live) for _ in range(4)]
    assert all(b.tokens.shape == (100,) and b.acts[HOOK].shape == (100, 64) for b in first)
    state = live.state_dict()
    rest = [next(live) for _ in range(5)]
    again = open_stream(exp, lm=lm)
    again.load_state_dict(state)
    for x, y in zip(rest, (next(again) for _ in range(5))):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.acts[HOOK], y.acts[HOOK])
    assert live.mean_norms[HOOK] > 0 and live.documents_consumed() >= 1

    # unshuffled, live and cache give the same tokens and activations in the same order
    generate_shard(exp, lm, run_to_hooks, 0, 1)
    cached = open_stream(_exp(tmp_path, tiny_llama, "shuffle = false"), lm=lm)
    assert isinstance(cached, CacheStream)
    live = open_stream(_exp(tmp_path, tiny_llama, "shuffle = false", source="live"), lm=lm)
    for _ in range(15):
        a, b = next(cached), next(live)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc, b.doc) and torch.equal(a.pos, b.pos)
        assert torch.equal(a.acts[HOOK], b.acts[HOOK])
    assert cached.mean_norms[HOOK] == pytest.approx(live.mean_norms[HOOK], rel=0.2)  # all tokens vs first window


def test_live_contexts_for_lorsa(tmp_path, tiny_llama, lm):
    from saecli.data.open import open_stream

    exp = _exp(tmp_path, tiny_llama, source="live")
    stream = open_stream(exp, lm=lm, contexts=True)
    b = next(stream)
    assert stream.contexts and b.is_context
    assert b.acts[HOOK].shape == (3, 32, 64) and b.tokens.shape == b.mask.shape == (3, 32)  # 100 tokens // 32
    assert not b.mask[:, 0].any() and b.mask[:, 1:].float().mean() > 0.9  # BOS masked, kept in place
    state = stream.state_dict()
    nxt = next(stream)
    again = open_stream(exp, lm=lm, contexts=True)
    again.load_state_dict(state)
    assert torch.equal(next(again).acts[HOOK], nxt.acts[HOOK])


def test_open_stream_errors(tmp_path, tiny_llama, lm):
    from saecli.data.cache import generate_shard
    from saecli.data.open import open_stream
    from saecli.lm import run_to_hooks

    exp = _exp(tmp_path, tiny_llama)
    generate_shard(exp, lm, run_to_hooks, 0, 1)
    with pytest.raises(UsageError, match="whole contexts"):
        open_stream(exp, contexts=True)
    with pytest.raises(UsageError, match=r"blocks\.3\.hook_resid_post.*it holds: blocks\.0\.hook_resid_post"):
        open_stream(exp, hook_points=["blocks.3.hook_resid_post"])
    with pytest.raises(UsageError, match="not found"):
        open_stream(_exp(tmp_path / "x", tiny_llama, source="cache"))
    ev = open_stream(exp, purpose="eval")
    assert sum(b.n_tokens for b in ev) == 1500 and ev.documents_consumed() >= 1
