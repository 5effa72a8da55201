"""Massive-activation tokens (norm ≫ the batch's median) are dropped from training and eval batches."""

from __future__ import annotations

import pytest
import torch

from saecli.config.activations import ActivationsConfig
from saecli.config.base import parse
from saecli.data.batch import Batch
from saecli.data.cache import write_cache
from saecli.data.outliers import drop_outliers, typical_norm_mask
from saecli.data.reader import CacheStream
from saecli.errors import ConfigError


def rows_with_norms(*norms: float, d: int = 4) -> torch.Tensor:
    """Rows along the first axis with the given Euclidean norms."""
    x = torch.zeros(len(norms), d)
    x[:, 0] = torch.tensor(norms)
    return x


def test_a_token_many_times_the_median_norm_is_dropped_with_its_metadata():
    acts = rows_with_norms(1.0, 1.2, 0.9, 2.0, 30.0)  # median 1.2: the limit at ratio 10 is 12
    batch = Batch(
        {"h": acts},
        tokens=torch.tensor([10, 11, 12, 13, 14]),
        doc=torch.zeros(5, dtype=torch.long),
        pos=torch.arange(5),
    )
    kept, dropped = drop_outliers(batch, 10.0)
    assert dropped == 1
    assert kept.tokens.tolist() == [10, 11, 12, 13] and kept.pos.tolist() == [0, 1, 2, 3]
    assert torch.equal(kept.acts["h"], acts[:4])
    assert drop_outliers(batch, 40.0) == (batch, 0)  # nothing above the limit: the same batch, no copy


def test_an_outlier_at_any_hook_drops_the_token_at_every_hook():
    """Crosscoders read several hooks: their rows must stay aligned."""
    a = rows_with_norms(1.0, 1.0, 50.0, 1.0)
    b = rows_with_norms(1.0, 50.0, 1.0, 1.0)
    assert typical_norm_mask({"a": a, "b": b}, 10.0).tolist() == [True, False, False, True]


def test_whole_contexts_keep_their_shape_and_mask_the_outlier():
    acts = rows_with_norms(1.0, 1.0, 1.0, 1.0, 1.0, 99.0).reshape(2, 3, 4)
    mask = torch.tensor([[False, True, True], [True, True, True]])  # position 0 (BOS) does not count
    batch = Batch({"h": acts}, tokens=torch.zeros(2, 3, dtype=torch.long), mask=mask)
    kept, dropped = drop_outliers(batch, 10.0)
    assert dropped == 1 and kept.acts["h"] is acts
    assert kept.mask.tolist() == [[False, True, True], [True, True, False]]


def test_the_median_ignores_tokens_that_do_not_count():
    acts = rows_with_norms(100.0, 100.0, 100.0, 1.0, 1.0).reshape(1, 5, 4)
    counted = torch.tensor([[False, False, False, True, True]])  # median of the counted tokens: 1
    assert typical_norm_mask({"h": acts}, 10.0, counted).tolist() == [[False, False, False, True, True]]


def test_the_cache_stream_drops_outliers_and_stays_exactly_resumable(tmp_path):
    n, d = 400, 8
    ids = torch.arange(n)
    acts = 1.0 + torch.rand(n, d, generator=torch.Generator().manual_seed(0))
    acts[[7, 123, 350]] *= 200.0  # three massive activations
    write_cache(
        tmp_path / "c",
        iter([{"acts.h": acts, "tokens": ids, "doc": ids // 50, "pos": ids % 50}]),
        hook_points=["h"],
        chunk_tokens=n,
    )

    def stream(ratio: float) -> CacheStream:
        return CacheStream(tmp_path / "c", batch_size=64, buffer_tokens=128, seed=3, epochs=1, max_norm_ratio=ratio)

    seen = torch.cat([b.tokens for b in stream(10.0)])
    assert sorted(seen.tolist()) == sorted(set(range(n)) - {7, 123, 350})
    assert len(torch.cat([b.tokens for b in stream(0.0)])) == n  # 0 turns the filter off

    s = stream(10.0)
    first = [next(s) for _ in range(3)]
    state = s.state_dict()
    rest = [b.tokens for b in s]
    again = stream(10.0)
    again.load_state_dict(state)
    assert [b.tokens.tolist() for b in again] == [t.tolist() for t in rest]
    assert s.dropped_tokens == 3 and sum(len(b.tokens) for b in first) + sum(len(t) for t in rest) == n - 3


def test_max_norm_ratio_is_validated():
    assert parse(ActivationsConfig, {"hook_points": ["h"]}).max_norm_ratio == 10.0
    assert parse(ActivationsConfig, {"hook_points": ["h"], "max_norm_ratio": 0}).max_norm_ratio == 0
    with pytest.raises(ConfigError, match="max_norm_ratio"):
        parse(ActivationsConfig, {"hook_points": ["h"], "max_norm_ratio": 0.5}, key="activations")
