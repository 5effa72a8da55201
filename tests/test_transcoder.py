"""Transcoder (kind = "transcoder"): reads one hook point, reconstructs another, optional linear skip."""

from __future__ import annotations

import pytest
import torch
from kinds_contract import assert_resume_after_ctrl_c_is_exact, train_with_auxk

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.data.synthetic import SyntheticStream
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.dictionaries.transcoder import Transcoder
from saecli.errors import ConfigError, UsageError

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster


def make(d_model: int = 2, d_sae: int = 3, **kw) -> Transcoder:
    table = {"kind": "transcoder", "d_sae": d_sae, "k": 1, "norm_activation": "none", **kw}
    return build_dictionary(parse(DictionaryConfig, table, key="sae"), d_model, [IN, OUT])


def hand_set(tc: Transcoder) -> None:
    with torch.no_grad():
        tc.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        tc.b_enc.copy_(torch.tensor([0.0, -1.0, -0.5]))
        tc.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
        tc.b_dec.copy_(torch.tensor([0.5, 0.5]))
        if tc.W_skip is not None:
            tc.W_skip.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swaps the two coordinates


def test_forward_math_on_hand_set_weights():
    # x = [2, 1]: h = [2, 0, 2.5] → ReLU f = [2, 0, 2.5]; f W_dec = [4.5, -2.5]; + b_dec = [5, -2];
    # skip x W_skip = [1, 2] → ŷ = [6, 0]
    x = torch.tensor([[2.0, 1.0]])
    tc = make(activation="relu", skip_connection=True)
    hand_set(tc)
    assert torch.allclose(tc.encode({IN: x}), torch.tensor([[2.0, 0.0, 2.5]]))
    f = tc.encode({IN: x})
    assert torch.allclose(tc.decode_hooks(f)[OUT], torch.tensor([[5.0, -2.0]]))  # the latent part, no skip
    assert torch.allclose(tc.decode_hooks(f, {IN: x})[OUT], torch.tensor([[6.0, 0.0]]))  # with the skip
    assert torch.allclose(tc.reconstruct({IN: x})[OUT], torch.tensor([[6.0, 0.0]]))
    out = tc({IN: x, OUT: torch.tensor([[6.0, 1.0]])})
    assert torch.allclose(out.reconstruction[OUT], torch.tensor([[6.0, 0.0]]))
    assert out.loss.item() == pytest.approx(1.0)  # Σ_d (ŷ − y)² = 0² + 1²
    # TopK k=1 keeps latent 2 (gated h·‖W_dec‖ = [2, 0, 2.5·√2]): 2.5·[1, −1] + [0.5, 0.5] + [1, 2] = [4, 0]
    tk = make(activation="topk", k=1, skip_connection=True)
    hand_set(tk)
    assert torch.allclose(tk.reconstruct({IN: x})[OUT], torch.tensor([[4.0, 0.0]]))


@pytest.mark.parametrize("sparse", [True, False])
def test_skip_is_trained_through_every_path(sparse):
    """The SAE's training paths see the target y − xW_skip; loss and gradients equal the explicit formula."""
    torch.manual_seed(0)
    tc = make(
        d_model=8,
        d_sae=16,
        activation="topk",
        k=2,
        skip_connection=True,
        sparse_kernels=sparse,
        sparsity_include_decoder_norm=False,
    )
    with torch.no_grad():
        tc.W_skip.normal_()
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    out = tc.loss({IN: x}, {OUT: y}, StepContext(k=2, training=True))
    assert tc.last_path == ("topk-sparse" if sparse else "dense")
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in tc.named_parameters()}
    tc.zero_grad()
    h = x @ tc.W_enc.T + tc.b_enc
    idx = h.topk(2, dim=-1).indices
    f = torch.zeros_like(h).scatter(-1, idx, h.gather(-1, idx).relu())
    ref = f @ tc.W_dec + tc.b_dec + x @ tc.W_skip
    expected = (ref - y).pow(2).sum(-1).mean()
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(out.reconstruction[OUT], ref, atol=1e-5)
    assert torch.equal(out.target[OUT], y)
    for name, p in tc.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5), name


def _teacher_data(skip: bool, d: int = 32, s: int = 48, k: int = 3, seed: int = 0):
    """A known transcoder (unit decoder rows) and a sampler of (x, y): sparse latents f, x = f·D_in + noise,
    y = teacher decode(f) [+ teacher skip(x)]."""
    gen = torch.Generator().manual_seed(seed)
    teacher = make(d_model=d, d_sae=s, k=k, skip_connection=skip)
    with torch.no_grad():
        teacher.W_dec.copy_(torch.nn.functional.normalize(torch.randn(s, d, generator=gen), dim=1))
        teacher.b_dec.copy_(torch.randn(d, generator=gen) * 0.2)
        if skip:
            teacher.W_skip.copy_(torch.randn(d, d, generator=gen) * 0.1)
    d_in = torch.nn.functional.normalize(torch.randn(s, d, generator=gen), dim=1)

    def sample(n: int) -> dict[str, torch.Tensor]:
        idx = torch.rand(n, s, generator=gen).argsort(1)[:, :k]
        f = torch.zeros(n, s).scatter(1, idx, torch.rand(n, k, generator=gen) + 0.5)
        x = f @ d_in + 0.01 * torch.randn(n, d, generator=gen)
        with torch.no_grad():
            y = teacher.decode_hooks(f)[OUT]
            if skip:
                y = y + teacher.skip(x)
        return {IN: x, OUT: y}

    return teacher, sample


def test_training_on_teacher_data_recovers_its_decoder():
    torch.manual_seed(1)
    teacher, sample = _teacher_data(skip=False)
    student = make(d_model=32, d_sae=96, activation="topk", k=3)
    first, final, _ = train_with_auxk(student, sample, steps=200, k=3)
    assert final < 0.1 * first
    cos = (
        (
            torch.nn.functional.normalize(teacher.W_dec, dim=1)
            @ torch.nn.functional.normalize(student.W_dec.detach(), dim=1).T
        )
        .max(1)
        .values
    )
    assert (cos > 0.9).float().mean() > 0.8, cos


def test_skip_transcoder_learns_teacher_with_skip():
    torch.manual_seed(2)
    teacher, sample = _teacher_data(skip=True)
    student = make(d_model=32, d_sae=96, activation="topk", k=3, skip_connection=True)
    first, final, _ = train_with_auxk(student, sample, steps=200, k=3)
    assert final < 0.1 * first
    without = make(d_model=32, d_sae=96, activation="topk", k=3)  # no skip: the linear part costs latents
    _, final_without, _ = train_with_auxk(without, sample, steps=200, k=3)
    assert final < final_without


def _scaled(tc: Transcoder, s_in: float, s_out: float) -> Transcoder:
    tc.scale(IN).fill_(s_in)
    tc.scale(OUT).fill_(s_out)
    return tc


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_fold_scale_keeps_raw_reconstruction(activation, tmp_path):
    torch.manual_seed(3)
    tc = _scaled(
        make(d_model=8, d_sae=16, activation=activation, k=3, skip_connection=True, norm_activation="dataset-wise"),
        s_in=2.5,
        s_out=0.4,
    )
    with torch.no_grad():
        for p in (tc.W_enc, tc.W_dec, tc.b_enc, tc.b_dec, tc.W_skip):
            p.normal_()
    raw = {IN: torch.randn(64, 8) * 3.0, OUT: torch.randn(64, 8)}
    gated = (tc.pre_acts(tc.normalize(raw)[IN]) * tc.decoder_norms()).detach()
    theta = float(gated[gated > 0].median()) * 1.0123  # about half the positive ones pass (none sits on θ)
    if activation == "jumprelu":
        tc.activation.log_threshold.data.fill_(torch.tensor(theta).log().item())
    if activation == "batchtopk":
        tc.activation.threshold.fill_(theta)
    before = tc.reconstruct(raw)[OUT]
    fires_before = tc.encode(tc.normalize(raw)) > 0
    tc.fold_activation_scale()
    assert tc.folded
    after = tc.reconstruct(raw)[OUT]
    assert torch.equal(fires_before, tc.encode(raw) > 0)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    tc.save(tmp_path / "tc")
    loaded = load_dictionary(tmp_path / "tc")
    assert loaded.folded and torch.allclose(loaded.reconstruct(raw)[OUT], after, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(4)
    tc = _scaled(
        make(d_model=8, d_sae=16, activation="jumprelu", skip_connection=True, norm_activation="dataset-wise"),
        s_in=2.0,
        s_out=3.0,
    )
    with torch.no_grad():
        tc.W_skip.normal_()
        tc.activation.log_threshold.data.uniform_(-3, -1)
    tc.save(tmp_path / "tc")
    loaded = load_dictionary(tmp_path / "tc")
    assert isinstance(loaded, Transcoder) and loaded.in_hooks == [IN] and loaded.out_hooks == [OUT]
    assert loaded.cfg.skip_connection and not loaded.folded
    for (name, a), (_, b) in zip(tc.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = {IN: torch.randn(16, 8), OUT: torch.randn(16, 8)}
    assert torch.equal(tc.reconstruct(x)[OUT], loaded.reconstruct(x)[OUT])


def test_hooks_default_to_the_first_two_hook_points_and_must_be_streamed():
    cfg = parse(DictionaryConfig, {"kind": "transcoder", "d_sae": 8, "k": 2}, key="sae")
    tc = build_dictionary(cfg, 4, ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"])
    assert (tc.in_hook, tc.out_hook) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    with pytest.raises(ConfigError, match="hook_point_out"):
        build_dictionary(cfg, 4, ["blocks.1.ln2.hook_normalized"])
    cfg = parse(
        DictionaryConfig,
        {"kind": "transcoder", "d_sae": 8, "k": 2, "hook_point_out": "blocks.3.hook_mlp_out"},
        key="sae",
    )
    with pytest.raises(ConfigError, match="not in activations.hook_points"):
        build_dictionary(cfg, 4, ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"])
    with pytest.raises(ConfigError, match="output space"):
        parse(
            DictionaryConfig,
            {"kind": "transcoder", "d_sae": 8, "k": 2, "apply_decoder_bias_to_pre_encoder": True},
            key="sae",
        )


def test_init_from_mlp_sets_decoder_rows_to_the_mlp_response(tiny_llama):
    from saecli.config.model import ModelConfig
    from saecli.lm import get_mlp, load_model, run_to_hooks

    lm = load_model(ModelConfig(name=str(tiny_llama), device="cpu"))
    hooks = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    tokens = torch.randint(3, lm.vocab_size, (2, 16))
    acts = run_to_hooks(lm, tokens, hooks)
    raw = {h: v.reshape(-1, lm.d_model) for h, v in acts.items()}
    cfg = parse(
        DictionaryConfig, {"kind": "transcoder", "d_sae": 32, "k": 4, "initialize_tc_with_mlp": True}, key="sae"
    )
    tc = build_dictionary(cfg, lm.d_model, hooks)
    assert tc.needs_model_init
    norms = tc.W_dec.norm(dim=1).clone()
    tc.init_from_model(lm, [raw])
    # by hand for latent 5: the MLP's output moves from MLP(x̄) along W_dec[5] when its input moves along û_5
    x = raw[hooks[0]]
    mean, radius = x.mean(0), (x - x.mean(0)).norm(dim=-1).mean()
    u = tc.W_enc[5] / tc.W_enc[5].norm()
    mlp = get_mlp(lm, 1)
    with torch.no_grad():
        probe = mlp((mean + radius * u)[None, None])[0, 0] - mlp(mean[None, None])[0, 0]
    cos = torch.nn.functional.cosine_similarity(tc.W_dec[5], probe, dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)
    kept = torch.where(norms > 0, norms, torch.ones_like(norms))  # the init's row norms; unit from a zero decoder
    assert torch.allclose(tc.W_dec.norm(dim=1), kept, atol=1e-6)
    bad = build_dictionary(
        parse(DictionaryConfig, {"kind": "transcoder", "d_sae": 8, "k": 2}, key="sae"),
        lm.d_model,
        ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"],
    )
    with pytest.raises(UsageError, match="ln2.hook_normalized"):
        bad.init_from_model(lm, [{"blocks.1.hook_resid_post": x}])


def test_resume_after_ctrl_c_is_exact(tmp_path):
    """Killed mid-run and resumed, a transcoder ends with the weights of an uninterrupted run."""
    assert_resume_after_ctrl_c_is_exact(
        tmp_path,
        {"kind": "transcoder", "d_sae": 32, "k": 3, "skip_connection": True},
        {"total_training_tokens": 128 * 24, "log_frequency": 5, "dead_threshold_tokens": 512},
        lambda: SyntheticStream(d_model=16, n_atoms=32, k=3, batch_size=128, hook_points=[IN, OUT]),
        at=10,
        saved="W_skip",
    )
