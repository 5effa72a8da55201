"""Matryoshka SAE (`sae.matryoshka_prefixes`): the loss, both train paths, the config checks, and a
full train → save → load → eval round trip on the tiny llama."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_topk_toml

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.config.load import experiment_from_dict
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.errors import ConfigError

D = 5


def make(prefixes, activation="topk", d_sae=8, k=3, sparse=True):
    table = {"d_sae": d_sae, "activation": activation, "k": k, "sparse_kernels": sparse}
    cfg = parse(DictionaryConfig, table | ({"matryoshka_prefixes": prefixes} if prefixes else {}), key="sae")
    torch.manual_seed(0)
    sae = build_dictionary(cfg, D, ["x"])
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae))
        sae.b_dec.copy_(0.1 * torch.randn(D))
    return sae


def hand_loss(sae, x, prefixes):
    """Mean over prefixes p of mean_tokens Σ_d (f[:, :p] W_dec[:p] + b_dec − x)², written out."""
    f = sae.encode({"x": x}, StepContext(k=sae.cfg.k, training=True)).detach()
    total = 0.0
    for p in prefixes:
        recon = f[:, :p] @ sae.W_dec[:p].detach() + sae.b_dec.detach()
        total += float(((recon - x) ** 2).sum(1).mean())
    return total / len(prefixes)


@pytest.mark.parametrize("sparse", [True, False])
def test_the_loss_is_the_mean_of_the_prefix_reconstruction_losses(sparse):
    sae = make([2, 5], sparse=sparse)
    assert sae.prefixes == (2, 5, 8)  # d_sae appended
    x = torch.randn(7, D)
    out = sae.loss({"x": x}, {"x": x}, StepContext(k=3))
    assert sae.last_path == ("topk-sparse" if sparse else "dense")
    assert out.terms["mse"].item() == pytest.approx(hand_loss(sae, x, (2, 5, 8)), rel=1e-5)
    # the reported reconstruction is the whole dictionary's
    f = sae.encode({"x": x}, StepContext(k=3, training=True))
    assert torch.allclose(out.reconstruction["x"], f @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_sparse_and_dense_paths_give_the_same_gradients():
    sae = make([3, 6])
    twin = copy.deepcopy(sae)
    twin.cfg = copy.deepcopy(sae.cfg)
    twin.cfg.sparse_kernels = False
    x = torch.randn(11, D)
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[1, 6]] = True
    grads = []
    for m in (sae, twin):
        out = m.loss({"x": x}, {"x": x}, StepContext(k=3, auxk_coefficient=0.5, k_aux=2, dead_mask=dead))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert (sae.last_path, twin.last_path) == ("topk-sparse", "dense")
    for name in grads[1]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_only_the_last_prefix_equals_a_plain_sae():
    """With the whole dictionary as the only prefix, the loss is the plain MSE."""
    plain, one = make(None), make([8])
    x = torch.randn(9, D)
    a = plain.loss({"x": x}, {"x": x}, StepContext(k=3)).terms["mse"]
    b = one.loss({"x": x}, {"x": x}, StepContext(k=3)).terms["mse"]
    assert torch.allclose(a, b)


def test_batchtopk_prefixes():
    sae = make([4], activation="batchtopk")
    x = torch.randn(6, D)
    ctx = StepContext(k=3)
    f = sae.activation(sae.pre_acts(x), sae._gate(), k=3, training=True, update=False).detach()
    want = (
        sum(float(((f[:, :p] @ sae.W_dec[:p].detach() + sae.b_dec.detach() - x) ** 2).sum(1).mean()) for p in (4, 8))
        / 2
    )
    assert sae.loss({"x": x}, {"x": x}, ctx).terms["mse"].item() == pytest.approx(want, rel=1e-5)


def test_the_first_prefix_alone_reconstructs_better_than_a_plain_sae_s_first_latents():
    """What the prefixes are for: the first 16 latents carry the most general features."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(48, 12, generator=g)
    freq = torch.linspace(0.5, 0.02, 48)  # a few frequent atoms, many rare ones

    def sample(n):
        on = torch.rand(n, 48, generator=g) < freq
        return (on * (torch.rand(n, 48, generator=g) + 0.5)) @ atoms

    def first16_ev(prefixes):
        table = {"d_sae": 64, "activation": "topk", "k": 8}
        cfg = parse(DictionaryConfig, table | ({"matryoshka_prefixes": prefixes} if prefixes else {}), key="sae")
        torch.manual_seed(0)
        sae = build_dictionary(cfg, 12, ["x"])
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for _ in range(150):
            x = sample(256)
            out = sae.loss({"x": x}, {"x": x}, StepContext(k=8))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        x = sample(2048)
        with torch.no_grad():
            f = sae.encode({"x": x}, StepContext(k=8))
            recon = f[:, :16] @ sae.W_dec[:16] + sae.b_dec
        return 1 - float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nested, plain = first16_ev([16]), first16_ev(None)
    finally:
        torch.set_num_threads(threads)
    assert nested > plain + 0.1, (nested, plain)


# ------------------------------------------------------------------------------------------ config
BASE = {"model": {"name": "some/model"}, "activations": {"hook_points": ["blocks.3.hook_resid_post"]}}


@pytest.mark.parametrize(
    "prefixes, activation, message",
    [
        ([64, 32], "topk", "increase strictly"),
        ([0, 32], "topk", "positive"),
        ([], "topk", "non-empty"),
        ([512], "topk", "exceeds d_sae"),
        ([64], "relu", "needs activation"),
    ],
)
def test_bad_prefixes_are_a_config_error_naming_the_key(prefixes, activation, message):
    data = {**BASE, "sae": {"d_sae": 256, "k": 16, "activation": activation, "matryoshka_prefixes": prefixes}}
    with pytest.raises(ConfigError) as info:
        experiment_from_dict(data, file="exp.toml")
    assert "matryoshka_prefixes" in str(info.value) and message in str(info.value)


def test_a_prefix_beyond_an_expansion_factor_s_d_sae_is_a_config_error():
    cfg = parse(DictionaryConfig, {"expansion_factor": 2, "matryoshka_prefixes": [11]}, key="sae")
    with pytest.raises(ConfigError, match="matryoshka_prefixes"):
        build_dictionary(cfg, D, ["x"])


# ------------------------------------------------------------------------------- train, save, eval
def test_train_save_load_eval(cli, tiny_llama, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    toml = tiny_topk_toml(
        tmp_path / "m.toml",
        tiny_llama,
        tmp_path / "run",
        name="matryoshka",
        activations="""
        model_batch_size = 8
        batch_size = 256
        total_tokens = 8_000
    """,
        trainer="""
        total_training_tokens = 10_240
        lr = 3e-3
        log_frequency = 10
    """,
    )
    res = cli("train", toml, "--set", "sae.matryoshka_prefixes=[16, 64]", env=env)
    assert res.exit_code == 0, res.output
    sae = load_dictionary(tmp_path / "run")
    assert sae.prefixes == (16, 64, 128) and sae.cfg.matryoshka_prefixes == [16, 64]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["explained_variance"] > 0.3
    res = cli("eval", tmp_path / "run", "--set", "eval.ce_contexts=2", "--set", "eval.total_eval_tokens=300", env=env)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())["metrics"]
    assert metrics["explained_variance"] > 0.3
