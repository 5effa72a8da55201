"""Initialisation: uniform decoder + tied encoder, geometric median, encoder bias, grid search."""

import pytest
import torch

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.config.init import InitConfig
from saecli.dictionaries import init as I
from saecli.dictionaries.init import _init_mse
from saecli.dictionaries.sae import SparseAutoEncoder

D = 8


def make(activation="topk", d_sae=32, **over):
    cfg = parse(DictionaryConfig, {"d_sae": d_sae, "activation": activation, "k": 4, **over}, key="sae")
    return SparseAutoEncoder(cfg, D, "x")


def test_geometric_median_of_collinear_points_is_the_middle_one():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])
    med = I.geometric_median(pts)
    assert torch.allclose(med, torch.tensor([2.0, 0.0]), atol=1e-3)
    assert pts.mean(0)[0].item() == pytest.approx(21.2)  # the mean is dragged by the outlier


def test_geometric_median_is_robust_and_minimises_the_sum_of_distances():
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.randn(300, 6, generator=g), torch.full((20, 6), 500.0)])
    med = I.geometric_median(pts)
    assert med.norm() < 1.0 < pts.mean(0).norm()

    def cost(y):
        return (pts.double() - y.double()).norm(dim=1).sum()

    for _ in range(20):  # no nearby point does better
        assert cost(med) <= cost(med + 1e-2 * torch.randn(6, generator=g)) + 1e-6


def test_initialize_draws_a_uniform_decoder_and_ties_the_encoder():
    sae = make()
    I.initialize(sae, InitConfig(decoder_uniform_bound=0.2, init_encoder_with_decoder_transpose_factor=0.5), seed=3)
    assert sae.W_dec.abs().max() <= 0.2
    assert torch.equal(sae.W_enc, sae.W_dec * 0.5)
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.count_nonzero(sae.b_dec) == 0
    first = sae.W_dec.clone()
    I.initialize(sae, InitConfig(decoder_uniform_bound=0.2, init_encoder_with_decoder_transpose_factor=0.5), seed=3)
    assert torch.equal(sae.W_dec, first)  # the seed decides


def test_initialize_rescales_rows_to_the_requested_norm():
    sae = make()
    I.initialize(sae, InitConfig(decoder_init_norm=0.3), seed=0)
    assert torch.allclose(sae.decoder_norms(), torch.full((32,), 0.3), atol=1e-6)
    unit = make(decoder_unit_norm=True)
    I.initialize(unit, InitConfig(decoder_init_norm=0.3), seed=0)
    assert torch.allclose(unit.decoder_norms(), torch.ones(32), atol=1e-6)


def _batches(n=2, rows=64, shift=3.0):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(rows, D, generator=g) + shift} for _ in range(n)]


@pytest.mark.parametrize("method", ["zero", "mean", "geometric_median"])
def test_decoder_bias_init(method):
    sae = make()
    batches = _batches()
    sae.init_from_data(batches, InitConfig(bias_init_method=method))
    x = torch.cat([b["x"] for b in batches])
    expected = {"zero": torch.zeros(D), "mean": x.mean(0), "geometric_median": I.geometric_median(x)}[method]
    assert torch.allclose(sae.b_dec, expected, atol=1e-5)


def test_encoder_bias_from_the_mean_pre_activation():
    sae = make(apply_decoder_bias_to_pre_encoder=True)
    batches = _batches()
    sae.init_from_data(batches, InitConfig(init_encoder_bias_with_mean_hidden_pre=True))
    mean_pre = sae.pre_acts(batches[0]["x"]).mean(0)
    assert mean_pre.abs().max() < 1e-5


def _latents_that_fire(centre_encoder: bool) -> int:
    """TopK latents that win a slot for at least one of 2048 tokens whose mean is far from 0."""
    torch.manual_seed(0)
    d = 64
    cfg = parse(DictionaryConfig, {"d_sae": 512, "activation": "topk", "k": 8}, key="sae")
    sae = SparseAutoEncoder(cfg, d, "x")
    g = torch.Generator().manual_seed(2)
    offset = 3.0 * torch.randn(d, generator=g)  # like a residual stream: ‖mean‖ ≈ the spread around it
    x = torch.randn(2048, d, generator=g) + offset
    sae.init_from_data([{"x": x}], InitConfig(init_encoder_bias_with_mean_hidden_pre=centre_encoder))
    with torch.no_grad():
        fired = sae.encode({"x": x}) > 0
    return int(fired.any(0).sum())


def test_by_default_the_encoder_starts_centred_so_every_topk_latent_fires():
    """Without centring, latents pointing against the data's mean never reach the top k and start dead."""
    assert InitConfig().init_encoder_bias_with_mean_hidden_pre
    assert _latents_that_fire(centre_encoder=True) >= 0.98 * 512  # measured 510
    assert _latents_that_fire(centre_encoder=False) < 0.5 * 512  # measured 90


def test_grid_search_finds_the_minimum_of_a_known_curve():
    best, loss = I.grid_search(lambda v: (v - 1.234) ** 2, torch.linspace(0.1, 5.0, 50).tolist())
    assert best == pytest.approx(1.234, abs=0.006)  # within the fine grid's step (0.2 / 19)
    assert loss == pytest.approx((best - 1.234) ** 2)


def test_grid_search_init_norm_picks_the_lowest_initial_loss():
    torch.manual_seed(0)
    sae = make("topk", d_sae=32)
    batches = _batches(shift=0.0)
    sae.init_from_data(batches, InitConfig(grid_search_init_norm=True, bias_init_method="zero"))
    chosen = _init_mse(sae, batches[0]["x"], batches[0]["x"])
    norms = sae.decoder_norms().detach()
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-5)  # every row at the chosen norm
    assert float(norms[0]) == pytest.approx(sae.init_norm, rel=1e-5)
    directions = sae.W_dec / norms.unsqueeze(1)
    for other in (0.1, 0.5, 1.0, 2.0, 5.0):  # any other norm reconstructs the batch worse
        with torch.no_grad():
            sae.W_dec.copy_(directions * other)
            sae.W_enc.copy_(sae.W_dec)
        assert _init_mse(sae, batches[0]["x"], batches[0]["x"]) >= chosen - 1e-6


def test_a_transcoder_s_encoder_is_untied_by_default_and_tied_when_asked():
    """A transcoder's encoder reads another space than its decoder writes: by default it is drawn on its own
    (U(±1/√d)); `init_encoder_with_decoder_transpose = true` still ties it. An SAE ties by default."""
    from saecli.dictionaries.transcoder import Transcoder

    cfg = parse(DictionaryConfig, {"kind": "transcoder", "d_sae": 32, "k": 4}, key="sae")
    tc = Transcoder(cfg, D, "in", "out")
    I.initialize(tc, InitConfig(), seed=0)
    assert not torch.equal(tc.W_enc, tc.W_dec)
    assert tc.W_enc.abs().max() <= D**-0.5 and tc.W_enc.abs().max() > 0.5 * D**-0.5
    I.initialize(tc, InitConfig(init_encoder_with_decoder_transpose=True, decoder_init_norm=0.5), seed=0)
    cos = torch.nn.functional.cosine_similarity(tc.W_enc, tc.W_dec, dim=1)
    assert torch.allclose(cos, torch.ones(32), atol=1e-6)
    sae = make()
    I.initialize(sae, InitConfig(), seed=0)
    assert torch.allclose(sae.W_enc, sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True) * 3**-0.5)
    assert InitConfig().tie_encoder() and not InitConfig(init_encoder_with_decoder_transpose=False).tie_encoder()


def test_a_tied_encoder_s_rows_start_at_norm_one_over_root_3_whatever_d_sae():
    """The default tied encoder: the decoder's directions, rows of an nn.Linear's norm (U(±1/√d): 1/√3), so
    pre-activations start at the same scale for any d_sae; an explicit factor multiplies W_dec instead."""
    for d_sae in (32, 512):
        sae = make(d_sae=d_sae)
        I.initialize(sae, InitConfig(), seed=1)
        assert torch.allclose(sae.W_enc.norm(dim=1), torch.full((d_sae,), 3**-0.5), atol=1e-6)
        cos = torch.nn.functional.cosine_similarity(sae.W_enc, sae.W_dec, dim=1)
        assert torch.allclose(cos, torch.ones(d_sae), atol=1e-6)
        assert sae.W_dec.norm(dim=1).mean() < 0.9 * 3**-0.5  # the decoder keeps its own (small) rows
    assert (
        InitConfig().tie_factor() == 1.0 and InitConfig(init_encoder_with_decoder_transpose_factor=2).tie_factor() == 2
    )


def test_an_ungated_transcoder_starts_with_a_zero_decoder_and_a_gated_one_cannot():
    """Default transcoders: ungated, zero decoder (the decoder learns where each latent writes before the
    encoder moves); explicit 0 with decoder-norm gating is a ConfigError naming the key."""
    from saecli.dictionaries.transcoder import Transcoder
    from saecli.errors import ConfigError

    cfg = parse(DictionaryConfig, {"kind": "transcoder", "d_sae": 32, "k": 4}, key="sae")
    assert cfg.sparsity_include_decoder_norm is False
    tc = Transcoder(cfg, D, "in", "out")
    I.initialize(tc, InitConfig(), seed=0)
    assert torch.count_nonzero(tc.W_dec) == 0 and torch.count_nonzero(tc.W_enc) > 0
    gated = Transcoder(
        parse(
            DictionaryConfig,
            {"kind": "transcoder", "d_sae": 32, "k": 4, "sparsity_include_decoder_norm": True},
            key="sae",
        ),
        D,
        "in",
        "out",
    )
    I.initialize(gated, InitConfig(), seed=0)
    assert torch.count_nonzero(gated.W_dec) > 0  # the default keeps drawn rows when gated
    with pytest.raises(ConfigError, match="decoder_init_norm"):
        I.initialize(gated, InitConfig(decoder_init_norm=0.0), seed=0)
    sae = make()
    I.initialize(sae, InitConfig(), seed=0)
    assert torch.count_nonzero(sae.W_dec) > 0
