"""Multi-TopK (`trainer.multi_topk_coefficient`): the top-4k reconstruction term, by hand and on both
train paths; off by 0; encoding still keeps the top k."""

from __future__ import annotations

import copy

import pytest
import torch

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.config.trainer import TrainerConfig
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.registry import build_dictionary
from saecli.errors import ConfigError

D, S, K = 6, 16, 2


def make(sparse: bool = True, activation: str = "topk", gated: bool = False):
    table = {"d_sae": S, "activation": activation, "k": K, "sparse_kernels": sparse}
    cfg = parse(DictionaryConfig, {**table, "sparsity_include_decoder_norm": gated}, key="sae")
    torch.manual_seed(1)
    sae = build_dictionary(cfg, D, ["x"])
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.W_dec.mul_(torch.rand(S, 1) + 0.5)
        sae.b_enc.copy_(0.1 * torch.randn(S))
        sae.b_dec.copy_(0.1 * torch.randn(D))
    return sae


def by_hand(sae, x, k):
    """mean_tokens Σ_d (ŷ − x)² with ŷ from the top-k (by h, or h·‖W_d‖ when gated) ReLU'd pre-activations."""
    with torch.no_grad():
        h = x @ sae.W_enc.T + sae.b_enc
        keep = torch.topk(h * sae.W_dec.norm(dim=1) if sae.gated else h, k, dim=1).indices
        f = torch.zeros_like(h).scatter(1, keep, torch.relu(h.gather(1, keep)))
        return float(((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(1).mean())


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
def test_the_term_is_the_coefficient_times_the_top_4k_reconstruction_loss(sparse, gated):
    sae = make(sparse, gated=gated)
    assert sae.gated == gated
    x = torch.randn(9, D)
    out = sae.loss({"x": x}, {"x": x}, StepContext(k=K, multi_topk_coefficient=0.5))
    assert sae.last_path == ("topk-sparse" if sparse else "dense")
    assert out.terms["mse"].item() == pytest.approx(by_hand(sae, x, K), rel=1e-5)
    assert out.terms["multi_topk"].item() == pytest.approx(0.5 * by_hand(sae, x, 4 * K), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.terms["mse"].item() + out.terms["multi_topk"].item(), rel=1e-6)
    assert (out.feature_acts.to_dense() if sparse else out.feature_acts).ne(0).sum(1).le(K).all()


def test_both_paths_give_the_same_gradients():
    sae = make(True)
    twin = copy.deepcopy(sae)
    twin.cfg = copy.deepcopy(sae.cfg)
    twin.cfg.sparse_kernels = False
    x = torch.randn(13, D)
    grads = []
    for m in (sae, twin):
        m.loss({"x": x}, {"x": x}, StepContext(k=K, multi_topk_coefficient=0.125)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for name in grads[1]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_zero_is_off_and_a_negative_coefficient_is_a_config_error():
    sae = make()
    x = torch.randn(5, D)
    assert "multi_topk" not in sae.loss({"x": x}, {"x": x}, StepContext(k=K)).terms
    with pytest.raises(ConfigError, match="multi_topk_coefficient"):
        parse(TrainerConfig, {"multi_topk_coefficient": -1.0})


def test_batchtopk_keeps_its_threshold_estimate_untouched_by_the_wide_pass():
    sae, twin = make(False, "batchtopk"), make(False, "batchtopk")
    x = torch.randn(7, D)
    sae.loss({"x": x}, {"x": x}, StepContext(k=K, multi_topk_coefficient=0.5))
    twin.loss({"x": x}, {"x": x}, StepContext(k=K))
    assert torch.equal(sae.activation.threshold, twin.activation.threshold)
