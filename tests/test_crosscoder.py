"""Crosscoder (kind = "crosscoder"): shared latents over several heads, per-head decoders, model diffing."""

from __future__ import annotations

import math

import pytest
import torch
from kinds_contract import assert_resume_after_ctrl_c_is_exact, train_with_auxk

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.data.synthetic import SyntheticStream
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.crosscoder import Crosscoder
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.errors import ConfigError

# the same layer of two models (base vs chat): hook names carry a model prefix
HEADS = ["base/blocks.1.hook_resid_post", "chat/blocks.1.hook_resid_post"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster


def make(d_model: int = 2, d_sae: int = 2, heads: list[str] = HEADS, **kw) -> Crosscoder:
    table = {"kind": "crosscoder", "d_sae": d_sae, "k": 1, "norm_activation": "none", **kw}
    return build_dictionary(parse(DictionaryConfig, table, key="sae"), d_model, heads)


def hand_set(cc: Crosscoder) -> None:
    with torch.no_grad():
        # latent 0 reads x0[0] + x1[1]; latent 1 reads x0[1] + x1[0]
        cc.W_enc.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]))
        cc.b_enc.copy_(torch.tensor([0.0, -1.0]))
        # latent 0 writes only to head 0 (norms 1, 0); latent 1 to both (norms 1, 2)
        cc.W_dec.copy_(torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [2.0, 0.0]]]))
        cc.b_dec.copy_(torch.tensor([[0.5, 0.0], [0.0, 1.0]]))


X = {HEADS[0]: torch.tensor([[1.0, 2.0]]), HEADS[1]: torch.tensor([[3.0, 4.0]])}


def test_forward_math_on_hand_set_weights():
    # h = Σ_heads x_h W_enc[h]ᵀ + b_enc = [1 + 4, 2 + 3 − 1] = [5, 4]
    # ŷ_0 = 5·[1, 0] + 4·[0, 1] + [0.5, 0] = [5.5, 4];  ŷ_1 = 5·[0, 0] + 4·[2, 0] + [0, 1] = [8, 1]
    cc = make(activation="relu")
    hand_set(cc)
    assert torch.allclose(cc.encode(X), torch.tensor([[5.0, 4.0]]))
    y = cc.reconstruct(X)
    assert torch.allclose(y[HEADS[0]], torch.tensor([[5.5, 4.0]]))
    assert torch.allclose(y[HEADS[1]], torch.tensor([[8.0, 1.0]]))
    out = cc(X, StepContext(sparsity_loss_type="power", l1_coefficient=0.5, training=True))
    # mse = Σ over both heads: ‖[4.5, 2]‖² + ‖[5, −3]‖² = 24.25 + 34
    assert out.terms["mse"].item() == pytest.approx(58.25)
    # L1 weighted by the SUM of per-head decoder norms: 5·(1 + 0) + 4·(1 + 2) = 17
    assert out.extra["raw/sparsity"].item() == pytest.approx(17.0)
    assert out.loss.item() == pytest.approx(58.25 + 0.5 * 17.0)
    assert out.extra[f"mse/{HEADS[1]}"].item() == pytest.approx(34.0)


@pytest.mark.parametrize("reduction, norms", [("sum", [1.0, 3.0]), ("norm", [1.0, math.sqrt(5.0)])])
def test_decoder_norm_reduction_and_ratios(reduction, norms):
    cc = make(activation="relu", decoder_norm_reduction=reduction)
    hand_set(cc)
    assert torch.allclose(cc.decoder_norms(), torch.tensor(norms))
    assert torch.allclose(cc.head_decoder_norms(), torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    # head shares: latent 0 is exclusive to head 0, latent 1 writes 1/3 to head 0 and 2/3 to head 1
    assert torch.allclose(cc.decoder_norm_ratios(), torch.tensor([[1.0, 1 / 3], [0.0, 2 / 3]]))


def test_topk_ranks_by_decoder_norm_weighted_preactivation():
    # h = [5, 4]; gated by the summed decoder norms [1, 3] → [5, 12]: latent 1 wins k = 1
    gated = make(activation="topk", k=1)
    hand_set(gated)
    assert torch.allclose(gated.encode(X), torch.tensor([[0.0, 4.0]]))
    plain = make(activation="topk", k=1, sparsity_include_decoder_norm=False)
    hand_set(plain)
    assert torch.allclose(plain.encode(X), torch.tensor([[5.0, 0.0]]))


@pytest.mark.parametrize("activation, reduction", [("topk", "sum"), ("topk", "norm"), ("relu", "norm")])
def test_sparse_training_path_matches_dense(activation, reduction):
    """The SAE's fast paths run on the concatenated heads with the per-head-reduced norms: same loss and grads.
    (ReLU with "sum" always takes the dense path: the fused ReLU-L1 kernel knows only the concatenated norm.)"""
    torch.manual_seed(0)
    kw = dict(d_model=8, d_sae=32, activation=activation, k=3, decoder_norm_reduction=reduction)
    fast, dense = make(**kw), make(sparse_kernels=False, **kw)
    dense.load_state_dict(fast.state_dict())
    x = {h: torch.randn(64, 8) for h in HEADS}
    ctx = StepContext(
        k=3, training=True, sparsity_loss_type="power" if activation == "relu" else "none", l1_coefficient=0.1
    )
    outs = []
    for cc in (fast, dense):
        out = cc(x, ctx)
        out.loss.backward()
        outs.append(out)
    assert fast.core.last_path != "dense" and dense.core.last_path == "dense"
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-5)
    for (name, a), (_, b) in zip(fast.named_parameters(), dense.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_training_on_teacher_data_recovers_decoders_and_exclusive_latents():
    """Teacher: latents 0–7 write only to head 0, 8–15 only to head 1, the rest to both. A student trained on
    its outputs finds the decoders, and its norm ratios say which latents are exclusive to which head."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    d, s, k = 24, 48, 3
    teacher = make(d_model=d, d_sae=s, k=k)
    with torch.no_grad():
        w = torch.nn.functional.normalize(torch.randn(s, 2, d, generator=gen), dim=-1)
        w[:8, 1] = 0
        w[8:16, 0] = 0
        teacher.W_dec.copy_(w)
        teacher.b_dec.copy_(torch.randn(2, d, generator=gen) * 0.2)

    def sample(n: int) -> dict[str, torch.Tensor]:
        idx = torch.rand(n, s, generator=gen).argsort(1)[:, :k]
        f = torch.zeros(n, s).scatter(1, idx, torch.rand(n, k, generator=gen) + 0.5)
        with torch.no_grad():
            return {h: y + 0.01 * torch.randn(y.shape, generator=gen) for h, y in teacher.decode_hooks(f).items()}

    student = make(d_model=d, d_sae=96, activation="topk", k=k)
    first, final_mse, final = train_with_auxk(student, sample, steps=150, k=k)
    assert final_mse < 0.1 * first
    for head in HEADS:
        assert final.extra[f"explained_variance/{head}"] > 0.9
    cos, match = (
        torch.nn.functional.normalize(teacher.W_dec.reshape(s, -1), dim=1)
        @ torch.nn.functional.normalize(student.W_dec.detach().reshape(96, -1), dim=1).T
    ).max(1)
    assert (cos > 0.9).float().mean() > 0.8, cos
    share = student.decoder_norm_ratios()
    assert (share[0, match[:8]] > 0.8).all() and (share[1, match[8:16]] > 0.8).all()
    assert ((share[0, match[16:]] - 0.5).abs() < 0.15).all()


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("reduction", ["sum", "norm"])
def test_fold_scale_keeps_raw_reconstruction(activation, reduction, tmp_path):
    torch.manual_seed(1)
    cc = make(
        d_model=8,
        d_sae=16,
        k=3,
        activation=activation,
        decoder_norm_reduction=reduction,
        norm_activation="dataset-wise",
        apply_decoder_bias_to_pre_encoder=True,
    )
    cc.scale(HEADS[0]).fill_(2.5)
    cc.scale(HEADS[1]).fill_(0.3)
    with torch.no_grad():
        for p in cc.parameters():
            p.normal_()
    raw = {HEADS[0]: torch.randn(64, 8), HEADS[1]: torch.randn(64, 8) * 5}
    normed = cc.normalize(raw)
    gated = (cc.core.pre_acts(cc._cat(normed)) * cc.decoder_norms()).detach()
    theta = float(gated[gated > 0].median()) * 1.0123
    if activation == "jumprelu":
        cc.activation.log_threshold.data.fill_(math.log(theta))
    if activation == "batchtopk":
        cc.activation.threshold.fill_(theta)
    before, f_before = cc.reconstruct(raw), cc.encode(normed)
    cc.fold_activation_scale()
    after = cc.reconstruct(raw)
    assert torch.allclose(cc.encode(raw), f_before, atol=1e-4, rtol=1e-4)  # latents keep their units
    for h in HEADS:
        assert torch.allclose(before[h], after[h], atol=1e-4, rtol=1e-4), h
    cc.save(tmp_path / "cc")
    loaded = load_dictionary(tmp_path / "cc")
    assert loaded.folded
    assert torch.allclose(loaded.reconstruct(raw)[HEADS[1]], after[HEADS[1]], atol=1e-6)


def test_save_load_round_trip_and_directions(tmp_path):
    torch.manual_seed(2)
    heads = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    cc = make(
        d_model=8,
        d_sae=16,
        heads=heads,
        activation="jumprelu",
        norm_activation="dataset-wise",
        decoder_norm_reduction="norm",
    )
    for i, h in enumerate(heads):
        cc.scale(h).fill_(1.0 + i)
    cc.save(tmp_path / "cc")
    loaded = load_dictionary(tmp_path / "cc")
    assert isinstance(loaded, Crosscoder) and loaded.heads == heads
    assert loaded.cfg.decoder_norm_reduction == "norm"
    for (name, a), (_, b) in zip(cc.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # directions as stored (normalised units until folded); DLA reads the last head in raw units (÷ its scale 3)
    assert torch.equal(loaded.decoder_directions(heads[1]), cc.W_dec[:, 1].detach())
    assert torch.equal(loaded.decoder_directions(), loaded.decoder_directions(heads[2]))
    raw_last = cc.W_dec[:, 2].detach() / 3.0
    assert torch.allclose(loaded.dla_directions(), raw_last)
    loaded.fold_activation_scale()
    assert torch.allclose(loaded.decoder_directions(heads[2]), raw_last)
    assert torch.allclose(loaded.dla_directions(), raw_last)


def test_heads_default_to_every_hook_point_and_must_be_streamed():
    cfg = parse(DictionaryConfig, {"kind": "crosscoder", "d_sae": 8, "k": 2}, key="sae")
    assert build_dictionary(cfg, 4, HEADS).heads == HEADS
    cfg = parse(DictionaryConfig, {"kind": "crosscoder", "d_sae": 8, "k": 2, "hook_points": ["a", "b"]}, key="sae")
    with pytest.raises(ConfigError, match="not in activations.hook_points"):
        build_dictionary(cfg, 4, HEADS)


def test_resume_after_ctrl_c_is_exact(tmp_path):
    """Killed mid-run and resumed, a crosscoder ends with the weights of an uninterrupted run."""
    assert_resume_after_ctrl_c_is_exact(
        tmp_path,
        {"kind": "crosscoder", "d_sae": 32, "k": 3, "activation": "jumprelu"},
        {"total_training_tokens": 128 * 24, "log_frequency": 5, "dead_threshold_tokens": 512},
        lambda: SyntheticStream(
            d_model=16, n_atoms=32, k=3, batch_size=128, hook_points=HEADS + ["blocks.2.hook_resid_post"]
        ),
        at=10,
        saved="core.activation.log_threshold",
    )
