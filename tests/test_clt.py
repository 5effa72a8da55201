"""Cross-layer transcoder (kind = "clt"): per-layer encoders, decoders from layer i into every layer t >= i."""

from __future__ import annotations

import math

import pytest
import torch
from kinds_contract import assert_resume_after_ctrl_c_is_exact

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.data.synthetic import SyntheticStream
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.clt import CrossLayerTranscoder, layer_batch_topk, layer_topk, pair_index
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.errors import ConfigError


def hooks(n: int) -> tuple[list[str], list[str]]:
    return [f"blocks.{i}.ln2.hook_normalized" for i in range(n)], [f"blocks.{i}.hook_mlp_out" for i in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster


def make(n_layers: int = 2, d_model: int = 2, d_sae: int = 1, **kw) -> CrossLayerTranscoder:
    ins, outs = hooks(n_layers)
    table = {"kind": "clt", "d_sae": d_sae, "k": 1, "norm_activation": "none", **kw}
    return build_dictionary(parse(DictionaryConfig, table, key="sae"), d_model, ins + outs)


def test_pairs_are_stored_target_major():
    source, target = pair_index(3)
    assert list(zip(source.tolist(), target.tolist())) == [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)]
    assert make(n_layers=3).W_dec.shape == (6, 1, 2)  # L(L+1)/2 blocks, no zero blocks stored


def hand_set(clt: CrossLayerTranscoder) -> None:
    with torch.no_grad():
        clt.W_enc.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # layer 0 reads x0[0], layer 1 reads x1[1]
        clt.b_enc.copy_(torch.tensor([[0.0], [-1.0]]))
        # blocks (0→0), (0→1), (1→1)
        clt.W_dec.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 2.0]]]))
        clt.b_dec.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


def test_forward_math_on_hand_set_weights():
    # x0 = [3, 5], x1 = [4, 2]: f0 = 3, f1 = 2 − 1 = 1
    # ŷ0 = f0·W[0→0] = [3, 0];  ŷ1 = f0·W[0→1] + f1·W[1→1] + b1 = [0, 3] + [2, 2] + [1, 0] = [3, 5]
    ins, outs = hooks(2)
    clt = make(activation="relu")
    hand_set(clt)
    x = {ins[0]: torch.tensor([[3.0, 5.0]]), ins[1]: torch.tensor([[4.0, 2.0]])}
    assert torch.allclose(clt.encode(x), torch.tensor([[3.0, 1.0]]))
    y = clt.reconstruct(x)
    assert torch.allclose(y[outs[0]], torch.tensor([[3.0, 0.0]]))
    assert torch.allclose(y[outs[1]], torch.tensor([[3.0, 5.0]]))
    target = {outs[0]: torch.tensor([[3.0, 1.0]]), outs[1]: torch.tensor([[3.0, 3.0]])}
    out = clt({**x, **target}, StepContext(sparsity_loss_type="power", l1_coefficient=0.1))
    assert out.terms["mse"].item() == pytest.approx(1.0 + 4.0)  # Σ over layers of Σ_d (ŷ − y)²
    # a latent's decoder norm is the norm of all its blocks: latent 0 → √(1 + 1), latent 1 → √8
    assert torch.allclose(clt.decoder_norms(), torch.tensor([math.sqrt(2.0), math.sqrt(8.0)]))
    assert out.extra["raw/sparsity"].item() == pytest.approx(3 * math.sqrt(2.0) + 1 * math.sqrt(8.0))
    assert out.extra[f"l0/{ins[1]}"].item() == 1.0
    # directions: into layer 1 (latent 0 via 0→1, latent 1 via 1→1), into layer 0, and summed (for DLA)
    assert torch.equal(clt.decoder_directions(outs[1]), torch.tensor([[0.0, 1.0], [2.0, 2.0]]))
    assert torch.equal(clt.decoder_directions(outs[0]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(clt.decoder_directions(), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    summed = make(activation="relu", decoder_norm_reduction="sum")
    hand_set(summed)
    assert torch.allclose(summed.decoder_norms(), torch.tensor([2.0, math.sqrt(8.0)]))


def _naive(clt: CrossLayerTranscoder, x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """The formula with Python loops over layers and pairs (the reference for the batched code)."""
    n_layers = clt.n_layers
    f = []
    for i in range(n_layers):
        h = x[:, i] @ clt.W_enc[i].T + clt.b_enc[i]
        gated = h * clt.layer_decoder_norms()[i].detach()
        idx = gated.topk(ks[i], dim=-1).indices
        f.append(torch.zeros_like(h).scatter(-1, idx, h.gather(-1, idx).relu()))
    ys = []
    for t in range(n_layers):
        y = clt.b_dec[t].expand(x.shape[0], -1)
        for p, (i, tt) in enumerate(clt.pairs()):
            if tt == t:
                y = y + f[i] @ clt.W_dec[p]
        ys.append(y)
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("sparse", [True, False])
def test_batched_decode_and_gradients_match_the_loop_over_pairs(sparse):
    torch.manual_seed(0)
    clt = make(n_layers=4, d_model=6, d_sae=8, activation="topk", layer_k=[1, 2, 3, 2], k=2, sparse_kernels=sparse)
    with torch.no_grad():
        clt.b_dec.normal_()
    ins, outs = hooks(4)
    x = torch.randn(16, 4, 6)
    y = torch.randn(16, 4, 6)
    out = clt.loss(
        {h: x[:, i] for i, h in enumerate(ins)},
        {h: y[:, i] for i, h in enumerate(outs)},
        StepContext(k=2, training=True),
    )
    assert clt.last_path == ("topk-sparse" if sparse else "dense")
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in clt.named_parameters()}
    clt.zero_grad()
    ref = _naive(clt, x, [1, 2, 3, 2])
    ((ref - y).pow(2).sum(-1).sum(-1).mean()).backward()
    for t, h in enumerate(outs):
        assert torch.allclose(out.reconstruction[h], ref[:, t], atol=1e-5)
    for name, p in clt.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5), name


def test_sparse_topk_path_with_auxk_matches_dense():
    """The sparse path (k active rows per layer, AuxK decoded sparsely too) = the dense path, loss and grads."""
    torch.manual_seed(5)
    kw = dict(n_layers=3, d_model=6, d_sae=16, activation="topk", k=3)
    fast, dense = make(**kw), make(sparse_kernels=False, **kw)
    with torch.no_grad():
        fast.b_dec.normal_()
    dense.load_state_dict(fast.state_dict())
    ins, outs = hooks(3)
    batch = {h: torch.randn(32, 6) for h in ins + outs}
    ctx = StepContext(k=3, training=True, auxk_coefficient=0.5, k_aux=4, dead_mask=torch.rand(48) < 0.5)
    results = []
    for clt in (fast, dense):
        out = clt(batch, ctx)
        out.loss.backward()
        results.append(out)
    assert fast.last_path == "topk-sparse" and dense.last_path == "dense"
    assert results[0].feature_acts.layout == torch.sparse_csr
    assert torch.allclose(results[0].feature_acts.to_dense(), results[1].feature_acts)
    for key in ("mse", "aux"):
        assert results[0].terms[key].item() == pytest.approx(results[1].terms[key].item(), rel=1e-5)
    for (name, a), (_, b) in zip(fast.named_parameters(), dense.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_layer_topk_and_batch_topk_keep_a_quota_per_layer():
    h = torch.tensor([[[3.0, 1.0, 2.0, 0.0], [5.0, 4.0, -1.0, 2.0]]])  # one token, two layers
    assert torch.equal(layer_topk(h, [1, 2]), torch.tensor([[[3.0, 0, 0, 0], [5.0, 4.0, 0, 0]]]))
    # two tokens; BatchTopK with k = 1 keeps the 2 largest of each layer over the batch
    h = torch.tensor([[[1.0, 9.0], [0.5, 0.1]], [[8.0, 2.0], [0.3, 0.2]]])
    f, smallest = layer_batch_topk(h, [1, 1])
    assert torch.equal(f, torch.tensor([[[0.0, 9.0], [0.5, 0.0]], [[8.0, 0.0], [0.3, 0.0]]]))
    assert torch.allclose(smallest, torch.tensor([8.0, 0.3]))
    clt = make(n_layers=2, d_sae=8, layer_k=[2, 4], k=4)
    assert clt.layer_ks(StepContext(k=8)) == [4, 8]  # the k schedule scales every layer's k


def _teacher_data(n_layers: int = 3, d: int = 16, s: int = 24, k: int = 2, seed: int = 0):
    """A known CLT (decoders of norm 1.5 per latent) and a sampler: per-layer k-sparse latents f_i, inputs
    x_i = f_i·D_in[i] + noise, targets = the teacher's decode of f."""
    gen = torch.Generator().manual_seed(seed)
    teacher = make(n_layers=n_layers, d_model=d, d_sae=s, k=k)
    with torch.no_grad():
        teacher.W_dec.copy_(torch.randn(teacher.W_dec.shape, generator=gen))
        teacher._normalise_decoder(1.5)
        teacher.b_dec.copy_(torch.randn(n_layers, d, generator=gen) * 0.2)
    d_in = torch.nn.functional.normalize(torch.randn(n_layers, s, d, generator=gen), dim=-1)
    ins, outs = hooks(n_layers)

    def sample(n: int) -> dict[str, torch.Tensor]:
        idx = torch.rand(n, n_layers, s, generator=gen).argsort(-1)[..., :k]
        f = torch.zeros(n, n_layers, s).scatter(-1, idx, torch.rand(n, n_layers, k, generator=gen) + 0.5)
        x = torch.einsum("nls,lsd->nld", f, d_in) + 0.01 * torch.randn(n, n_layers, d, generator=gen)
        with torch.no_grad():
            y = teacher.decode_layers(f.reshape(n, -1))
        return {**{h: x[:, i] for i, h in enumerate(ins)}, **{h: y[:, t] for t, h in enumerate(outs)}}

    return teacher, sample


def _latent_decoders(clt: CrossLayerTranscoder, i: int) -> torch.Tensor:
    """[d_sae, (L−i)·d_model] unit rows: latent j of layer i's decoders into layers i..L−1, concatenated."""
    blocks = [clt.W_dec[t * (t + 1) // 2 + i] for t in range(i, clt.n_layers)]
    return torch.nn.functional.normalize(torch.cat(blocks, dim=-1).detach(), dim=-1)


def test_training_on_teacher_data_recovers_cross_layer_decoders():
    torch.manual_seed(0)
    teacher, sample = _teacher_data()
    student = make(n_layers=3, d_model=16, d_sae=48, activation="topk", k=2)
    student.init_from_data([sample(2048)], None)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    fires, first = torch.zeros(student.d_sae), None
    for step in range(150):
        out = student(
            sample(256),
            StepContext(
                k=2, training=True, auxk_coefficient=1 / 32, k_aux=16, dead_mask=fires < 1 if step > 50 else None
            ),
        )
        fires = fires * 0.9 + (out.feature_acts.to_dense() > 0).float().sum(0)  # sparse CSR in TopK training
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = float(out.terms["mse"]) if first is None else first
    with torch.no_grad():
        final = student(sample(4096), StepContext(k=2, training=False))
    assert float(final.terms["mse"]) < 0.1 * first
    for i, hook in enumerate(student.out_hooks):
        assert final.extra[f"explained_variance/{hook}"] > 0.85
        cos = (_latent_decoders(teacher, i) @ _latent_decoders(student, i).T).max(1).values
        assert (cos > 0.9).float().mean() > 0.8, (i, cos)


def _random_clt(activation: str, **kw) -> CrossLayerTranscoder:
    clt = make(n_layers=3, d_model=8, d_sae=16, k=3, activation=activation, norm_activation="dataset-wise", **kw)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_()
    ins, outs = hooks(3)
    for i in range(3):
        clt.scale(ins[i]).fill_(0.5 + i)
        clt.scale(outs[i]).fill_(3.0 / (i + 1))
    return clt


def _raw(n: int = 64) -> dict[str, torch.Tensor]:
    ins, outs = hooks(3)
    return {h: torch.randn(n, 8) * (1 + i) for i, h in enumerate(ins + outs)}


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_fold_scale_keeps_raw_reconstruction(activation, tmp_path):
    torch.manual_seed(1)
    clt = _random_clt(activation, layer_k=[1, 3, 2])
    raw = _raw()
    normed = clt.normalize(raw)
    gated = (clt.pre_acts(clt._stack_inputs(normed)) * clt.layer_decoder_norms()).detach()  # [N, L, s]
    theta = (gated.clamp_min(0).median(0).values + 0.1) * 1.0123  # per latent, none sits on θ
    if activation == "jumprelu":
        clt.activation.log_threshold.data.copy_(theta.log())
    if activation == "batchtopk":
        clt.batchtopk_threshold.copy_(theta.mean(1))
    before, f_before = clt.reconstruct(raw), clt.encode(normed)
    clt.fold_activation_scale()
    after = clt.reconstruct(raw)
    assert torch.allclose(clt.encode(raw), f_before, atol=1e-4, rtol=1e-4)  # latents keep their units
    for h in clt.out_hooks:
        assert torch.allclose(before[h], after[h], atol=1e-4, rtol=1e-4), h
    clt.save(tmp_path / "clt")
    loaded = load_dictionary(tmp_path / "clt")
    assert loaded.folded
    for h in clt.out_hooks:
        assert torch.allclose(loaded.reconstruct(raw)[h], after[h], atol=1e-6)


def test_save_load_round_trip_and_raw_directions(tmp_path):
    torch.manual_seed(2)
    clt = _random_clt("batchtopk", decoder_norm_reduction="sum")
    clt.batchtopk_threshold.copy_(torch.tensor([0.5, 1.0, 1.5]))
    clt.save(tmp_path / "clt")
    loaded = load_dictionary(tmp_path / "clt")
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.d_sae == 48 and loaded.d_sae_layer == 16
    assert (loaded.in_hooks, loaded.out_hooks) == (clt.in_hooks, clt.out_hooks)
    for (name, a), (_, b) in zip(clt.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    raw = _raw(16)
    for h, y in clt.reconstruct(raw).items():
        assert torch.equal(y, loaded.reconstruct(raw)[h])
    # directions are stored blocks (normalised units); after folding, raw: block ÷ s_out of its target layer
    into_1 = loaded.decoder_directions(loaded.out_hooks[1])  # blocks 0→1 (index 1) and 1→1 (index 2), zeros
    assert torch.equal(into_1, torch.cat([clt.W_dec[1], clt.W_dec[2], torch.zeros(16, 8)]).detach())
    loaded.fold_activation_scale()
    s_out_1 = float(loaded.scale(loaded.out_hooks[1]))
    assert torch.allclose(loaded.decoder_directions(loaded.out_hooks[1]), into_1 / s_out_1, atol=1e-6)
    from saecli.analysis.dla import feature_directions

    assert torch.allclose(feature_directions(loaded), loaded.decoder_directions(), atol=1e-6)  # Σ over targets


@pytest.mark.parametrize("per", ["latent", "layer"])
def test_convert_topk_to_jumprelu_keeps_l0(per, tmp_path):
    torch.manual_seed(3)
    clt = _random_clt("topk", layer_k=[2, 4, 3])
    calib, held_out = [_raw(1024), _raw(1024)], _raw(2048)

    def l0_per_layer(model: CrossLayerTranscoder, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        f = model.encode(model.normalize(raw)).detach().reshape(-1, 3, 16)
        return (f > 0).float().sum(-1).mean(0)

    topk_l0 = l0_per_layer(clt, held_out)
    assert torch.allclose(topk_l0, torch.tensor([2.0, 4.0, 3.0]), atol=0.05)  # (a kept h < 0 is ReLU'd to 0)
    theta = clt.convert_topk_to_jumprelu(calib, per=per)
    assert clt.cfg.activation == "jumprelu" and theta.shape == (3, 16)
    on_calib = sum(l0_per_layer(clt, b) for b in calib) / 2
    assert torch.allclose(on_calib, topk_l0, rtol=0.02)  # the fires TopK made on these batches, by construction
    ratio = l0_per_layer(clt, held_out) / topk_l0
    assert ((ratio > 0.85) & (ratio < 1.18)).all(), ratio
    clt.save(tmp_path / "clt")
    loaded = load_dictionary(tmp_path / "clt")
    assert loaded.cfg.activation == "jumprelu"
    assert torch.allclose(loaded.activation.theta(), theta)


def test_hooks_default_to_halves_of_the_hook_points():
    ins, outs = hooks(2)
    cfg = parse(DictionaryConfig, {"kind": "clt", "d_sae": 4, "k": 1}, key="sae")
    clt = build_dictionary(cfg, 4, ins + outs)
    assert (clt.in_hooks, clt.out_hooks) == (ins, outs)
    with pytest.raises(ConfigError, match="one hook per layer"):
        build_dictionary(cfg, 4, ins + outs[:1])
    cfg = parse(DictionaryConfig, {"kind": "clt", "d_sae": 4, "k": 1, "layer_k": [1, 1, 1]}, key="sae")
    with pytest.raises(ConfigError, match="layer_k"):
        build_dictionary(cfg, 4, ins + outs)
    with pytest.raises(ConfigError, match="hook_points_out"):
        parse(DictionaryConfig, {"kind": "clt", "d_sae": 4, "k": 1, "hook_points_in": ins}, key="sae")


def test_resume_after_ctrl_c_is_exact(tmp_path):
    """Killed mid-run and resumed, a CLT ends with the weights of an uninterrupted run."""
    assert_resume_after_ctrl_c_is_exact(
        tmp_path,
        {"kind": "clt", "d_sae": 16, "k": 3, "activation": "batchtopk"},
        {"total_training_tokens": 128 * 24, "log_frequency": 5, "dead_threshold_tokens": 512},
        lambda: SyntheticStream(d_model=16, n_atoms=32, k=3, batch_size=128, hook_points=hooks(2)[0] + hooks(2)[1]),
        at=10,
        saved="batchtopk_threshold",
    )
