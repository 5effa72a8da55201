"""Every stream class has the whole ActivationStream interface (saecli/data/stream.py) with the declared
types, so the trainer, eval and sweep use plain attribute access (`stream.lm`, `stream.close()`, ...)."""

from __future__ import annotations

import pytest
import torch
from test_streams import _exp, synthetic_cache

from saecli.data.batch import Batch
from saecli.data.stream import ActivationStream, BatchSource
from saecli.lm.loading import LanguageModel

MEMBERS = sorted(
    {n for proto in (ActivationStream, BatchSource) for n in vars(proto) if not n.startswith("_")} | {"__iter__"}
)


@pytest.fixture(scope="module")
def model(tiny_llama):
    from saecli.config.model import ModelConfig
    from saecli.lm import load_model

    return tiny_llama, load_model(ModelConfig(name=str(tiny_llama), device="cpu"))


def _synthetic(tmp_path, model):
    from saecli.data.synthetic import SyntheticStream

    return SyntheticStream(d_model=8, n_atoms=16, k=2, batch_size=32, hook_points=("a", "b"))


def _cache(tmp_path, model):
    from saecli.data.reader import CacheStream

    return CacheStream(
        synthetic_cache(tmp_path / "cache", 3, 100), batch_size=32, buffer_tokens=100, max_norm_ratio=10.0
    )


def _live(tmp_path, model):
    from saecli.data.open import open_stream

    path, lm = model
    return open_stream(_exp(tmp_path, path, source="live"), lm=lm)


@pytest.mark.parametrize("build", [_synthetic, _cache, _live], ids=["synthetic", "cache", "live"])
def test_stream_has_the_declared_interface(build, tmp_path, model):
    stream = build(tmp_path, model)
    assert set(MEMBERS) >= {"hook_points", "d_model", "mean_norms", "lm", "close", "dropped_tokens", "state_dict"}
    missing = [name for name in MEMBERS if not hasattr(stream, name)]
    assert not missing, f"{type(stream).__name__} lacks {missing}"
    assert isinstance(stream, ActivationStream)
    hooks = stream.hook_points
    assert isinstance(hooks, list) and hooks and all(isinstance(h, str) for h in hooks)
    assert set(stream.d_model) == set(hooks) and all(isinstance(v, int) and v > 0 for v in stream.d_model.values())
    assert isinstance(stream.contexts, bool)
    assert stream.lm is None or isinstance(stream.lm, LanguageModel)
    start = stream.state_dict()
    batch = next(iter(stream))
    assert isinstance(batch, Batch) and set(batch.acts) == set(hooks)
    norms = stream.mean_norms
    assert norms is None or (set(norms) == set(hooks) and all(v > 0 for v in norms.values()))
    assert isinstance(stream.dropped_tokens, int) and stream.dropped_tokens >= 0
    stream.load_state_dict(start)  # back to the first batch
    again = next(iter(stream))
    for hook in hooks:
        torch.testing.assert_close(again.acts[hook], batch.acts[hook], rtol=0, atol=0)
    stream.close()
