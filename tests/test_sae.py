"""SparseAutoEncoder: fast paths agree with autograd, folding, unit-norm decoder, save/load, recovery."""

import copy

import pytest
import torch

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries import kernels
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.dictionaries.sae import SparseAutoEncoder

D = 16


def make(activation="topk", d_sae=64, k=4, seed=0, **over):
    cfg = parse(DictionaryConfig, {"d_sae": d_sae, "activation": activation, "k": k, **over}, key="sae")
    torch.manual_seed(seed)
    sae = build_dictionary(cfg, D, ["blocks.0.hook_resid_post"])
    with torch.no_grad():  # break the encoder/decoder tie and give every parameter a non-trivial value
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae))
        if sae.b_dec is not None:
            sae.b_dec.copy_(0.1 * torch.randn(D))
    return sae


def grads_of(sae, x, ctx):
    sae.zero_grad()
    hook = sae.in_hook
    out = sae.loss({hook: x}, {hook: x}, ctx)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


def dense_twin(sae):
    twin = copy.deepcopy(sae)
    twin.cfg = copy.deepcopy(sae.cfg)
    twin.cfg.sparse_kernels = False
    return twin


def assert_same_step(sae, ctx, x, fast_path):
    out_fast, g_fast = grads_of(sae, x, ctx)
    assert sae.last_path == fast_path
    twin = dense_twin(sae)
    out_ref, g_ref = grads_of(twin, x, ctx)
    assert twin.last_path == "dense"
    assert torch.allclose(out_fast.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    for name in ("mse", "sparsity", "aux"):
        assert (name in out_fast.terms) == (name in out_ref.terms)
        if name in out_ref.terms:
            assert torch.allclose(out_fast.terms[name], out_ref.terms[name], rtol=1e-5, atol=1e-7), name
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        assert torch.allclose(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-6), name
    dense_fa = (
        out_fast.feature_acts.to_dense() if out_fast.feature_acts.layout != torch.strided else out_fast.feature_acts
    )
    assert torch.allclose(dense_fa, out_ref.feature_acts.detach(), atol=1e-6)


# ------------------------------------------------------------------------------------- fast paths
def test_two_level_topk_equals_torch_topk():
    torch.manual_seed(0)
    x = torch.randn(300, 512)
    vals, idx = kernels.two_level_topk(x, 16)
    ref = torch.topk(x, 16, dim=-1).values
    assert torch.equal(vals.sort(-1).values, ref.sort(-1).values)
    assert torch.equal(torch.gather(x, 1, idx), vals)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("pre_bias", [True, False])
def test_sparse_topk_gradients_equal_dense_autograd(gated, pre_bias):
    sae = make("topk", sparsity_include_decoder_norm=gated, apply_decoder_bias_to_pre_encoder=pre_bias)
    x = torch.randn(40, D)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    ctx = StepContext(k=4, auxk_coefficient=0.5, k_aux=6, dead_mask=dead)
    assert_same_step(sae, ctx, x, "topk-sparse")


def test_sparse_topk_with_a_penalty_and_no_decoder_bias():
    sae = make("topk", use_decoder_bias=False)
    ctx = StepContext(k=5, l1_coefficient=0.1, sparsity_loss_type="tanh-quad", frequency_scale=0.2)
    assert_same_step(sae, ctx, torch.randn(30, D), "topk-sparse")


def test_relu_sparse_path_matches_dense():
    sae = make("relu", d_sae=256)
    with torch.no_grad():
        sae.b_enc.fill_(-3.0)  # few latents fire: the sparse regime
    ctx = StepContext(l1_coefficient=0.3, sparsity_loss_type="power")
    assert_same_step(sae, ctx, torch.randn(50, D), "relu-sparse")


def test_relu_fused_dense_path_matches_dense():
    sae = make("relu", d_sae=64)  # fresh init: about half the latents fire
    ctx = StepContext(l1_coefficient=0.3, sparsity_loss_type="power")
    assert_same_step(sae, ctx, torch.randn(50, D), "relu-dense-fused")


def test_relu_fused_path_without_a_penalty_matches_dense():
    assert_same_step(make("relu"), StepContext(sparsity_loss_type="none"), torch.randn(40, D), "relu-dense-fused")


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_every_path_trains_under_bf16_autocast(activation):
    sae = make(activation, jumprelu_threshold_init=0.05)
    ctx = StepContext(
        k=4,
        l1_coefficient=1e-2,
        lp_coefficient=0.1,
        auxk_coefficient=0.1,
        k_aux=8,
        dead_mask=torch.arange(64) % 2 == 0,
        sparsity_loss_type={"relu": "power", "jumprelu": "tanh"}.get(activation, "none"),
    )
    x = torch.randn(32, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.loss({sae.in_hook: x}, {sae.in_hook: x}, ctx)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sae.parameters())
    assert all(p.dtype == torch.float32 for p in sae.parameters())


def test_relu_dense_regime_without_a_fused_step_stops_probing(monkeypatch):
    sae = make("relu")  # about half the latents fire; the tanh penalty has no fused step
    probes = []
    original = sae._pre_into_buffer
    monkeypatch.setattr(sae, "_pre_into_buffer", lambda *a: probes.append(1) or original(*a))
    ctx = StepContext(l1_coefficient=0.1, sparsity_loss_type="tanh")
    x = torch.randn(32, D)
    for _ in range(3):
        sae.loss({sae.in_hook: x}, {sae.in_hook: x}, ctx)
        assert sae.last_path == "dense"
    assert len(probes) == 1  # measured once, then the dense path directly


def test_fast_paths_are_skipped_at_eval_and_when_disabled():
    sae = make("topk")
    x = torch.randn(8, D)
    with torch.no_grad():
        sae.loss({sae.in_hook: x}, {sae.in_hook: x}, StepContext(k=4))
    assert sae.last_path == "dense"
    sae.loss({sae.in_hook: x}, {sae.in_hook: x}, StepContext(k=4, training=False))
    assert sae.last_path == "dense"


def test_bf16_parameters_train_on_the_sparse_path():
    sae = make("topk", dtype="bfloat16")
    out, grads = grads_of(sae, torch.randn(20, D), StepContext(k=4))
    assert sae.last_path == "topk-sparse"
    assert grads["W_dec"].dtype == torch.bfloat16 and torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- other activations
def test_jumprelu_trains_its_thresholds_with_l0_and_preact_loss():
    sae = make("jumprelu", jumprelu_threshold_init=0.05, jumprelu_bandwidth=0.5)
    ctx = StepContext(l1_coefficient=1.0, sparsity_loss_type="l0", lp_coefficient=0.1)
    out, grads = grads_of(sae, torch.randn(64, D), ctx)
    assert {"mse", "sparsity", "lp"} <= out.terms.keys()
    assert torch.count_nonzero(grads["activation.log_threshold"]) > 0
    groups = sae.param_groups(1e-3, jumprelu_lr_factor=10.0)
    assert [g["name"] for g in groups] == ["default", "jumprelu"]
    assert groups[1]["lr"] == pytest.approx(1e-2) and groups[1]["params"][0] is sae.activation.log_threshold


def test_batchtopk_training_step_estimates_its_threshold():
    sae = make("batchtopk")
    out, _ = grads_of(sae, torch.randn(32, D), StepContext(k=4))
    assert int((out.feature_acts > 0).sum()) == 4 * 32
    assert sae.activation.threshold.item() > 0


# ------------------------------------------------------------------------------------- folding
def _scaled(sae, s_in, s_out=None):
    sae.cfg.norm_activation = "dataset-wise"
    sae.scale(sae.in_hook).fill_(s_in)
    sae.scale(sae.out_hook).fill_(s_out if s_out is not None else s_in)


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("gated", [True, False])
def test_fold_activation_scale_keeps_raw_outputs(activation, gated):
    sae = make(
        activation,
        sparsity_include_decoder_norm=gated,
        jumprelu_threshold_init=0.3,
        apply_decoder_bias_to_pre_encoder=True,
    )
    _scaled(sae, 0.25)
    raw = {sae.in_hook: 4.0 * torch.randn(64, D)}
    if activation == "batchtopk":
        sae.loss(sae.normalize(raw), sae.normalize(raw), StepContext(k=4))  # estimate θ
        assert sae.activation.threshold.item() > 0
    before = sae.reconstruct(raw)[sae.out_hook]
    f_before = sae.encode(sae.normalize(raw))
    assert 0 < int((f_before > 0).sum()) < f_before.numel()  # some, not all, latents fire
    sae.fold_activation_scale()
    assert sae.folded
    after = sae.reconstruct(raw)[sae.out_hook]
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(sae.encode(raw) > 0, f_before > 0)  # the same latents fire


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_fold_with_different_input_and_output_scales(activation):
    cfg = parse(
        DictionaryConfig, {"d_sae": 64, "activation": activation, "k": 4, "jumprelu_threshold_init": 0.3}, key="sae"
    )
    torch.manual_seed(1)
    tc = SparseAutoEncoder(cfg, D, "mlp_in", "mlp_out")  # a transcoder's shape
    with torch.no_grad():
        tc.b_dec.normal_()
        tc.b_enc.normal_(std=0.1)
    _scaled(tc, 0.5, 3.0)
    raw = {"mlp_in": 2 * torch.randn(64, D)}
    if activation == "batchtopk":
        tc.activation.threshold.fill_(0.3)
    before = tc.reconstruct(raw)["mlp_out"]
    tc.fold_activation_scale()
    assert torch.allclose(tc.reconstruct(raw)["mlp_out"], before, rtol=1e-5, atol=1e-5)


def test_token_wise_normalisation_is_not_folded():
    sae = make("topk", norm_activation="token-wise")
    sae.fold_activation_scale()
    assert not sae.folded


# ------------------------------------------------------------------------ decoder unit norm
def test_decoder_unit_norm_keeps_rows_at_one_after_a_step():
    sae = make("topk", decoder_unit_norm=True)
    sae.post_step()
    assert torch.allclose(sae.decoder_norms(), torch.ones(64), atol=1e-6)
    opt = torch.optim.Adam(sae.param_groups(1e-2))
    for copy_first in (False, True):
        if copy_first:  # a deep copy (as a sweep makes) keeps the gradient projection
            sae = copy.deepcopy(sae)
            opt = torch.optim.Adam(sae.param_groups(1e-2))
        x = torch.randn(32, D)
        sae.loss({sae.in_hook: x}, {sae.in_hook: x}, StepContext(k=4)).loss.backward()
        parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
        assert parallel.abs().max() < 1e-5  # the gradient has no component along the rows
        opt.step()
        sae.post_step()
        assert torch.allclose(sae.decoder_norms(), torch.ones(64), atol=1e-6)


# ------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("activation", ["topk", "jumprelu", "batchtopk"])
def test_save_load_round_trip(tmp_path, activation):
    sae = make(activation)
    _scaled(sae, 0.7)
    if activation == "batchtopk":
        sae.activation.threshold.fill_(0.25)
    sae.fold_activation_scale()
    sae.save(tmp_path / "sae")
    back = load_dictionary(tmp_path / "sae")
    assert type(back) is SparseAutoEncoder and back.folded
    a, b = sae.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw = {sae.in_hook: torch.randn(10, D)}
    assert torch.equal(back.reconstruct(raw)[sae.in_hook], sae.reconstruct(raw)[sae.in_hook])


# ------------------------------------------------------------------------ synthetic recovery
def test_topk_sae_recovers_a_known_sparse_dictionary():
    """64 unit atoms in d=32, 3 active per sample: a TopK SAE trained with Adam finds them (~5 s)."""
    g = torch.Generator().manual_seed(0)
    d, n_atoms, k = 32, 64, 3
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)

    def sample(n):
        idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :k]
        coef = torch.zeros(n, n_atoms).scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
        return coef @ atoms

    cfg = parse(DictionaryConfig, {"d_sae": 128, "activation": "topk", "k": k}, key="sae")
    torch.manual_seed(0)
    sae = SparseAutoEncoder(cfg, d, "x")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead (and suffer most on a busy machine)
    try:
        _train(sae, sample, k)
    finally:
        torch.set_num_threads(threads)
    assert sae.last_path == "topk-sparse"
    directions = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best_cos = (atoms @ directions.detach().t()).max(dim=1).values
    assert (best_cos > 0.9).float().mean() > 0.9, best_cos


def _train(sae, sample, k):
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    dead = torch.zeros(128, dtype=torch.long)
    for _ in range(300):
        x = sample(512)
        ctx = StepContext(k=k, auxk_coefficient=1 / 32, k_aux=16, dead_mask=dead > 512 * 8)
        out = sae.loss({"x": x}, {"x": x}, ctx)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        fired = torch.bincount(out.feature_acts.col_indices().long(), minlength=128)  # sparse-backed acts
        dead = torch.where(fired > 0, torch.zeros_like(dead), dead + 512)
