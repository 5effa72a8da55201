"""The eval metrics on tensors small enough to check by hand, and streaming == one shot."""

from __future__ import annotations

import math

import pytest
import torch

from saecli.evaluation.density import log_density_histogram, save_density_png
from saecli.evaluation.metrics import EvalAccumulator, LatentStats, ReconstructionStats, Thresholds

H = "blocks.0.hook_resid_post"


def _recon(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    s = ReconstructionStats()
    s.update(x, x_hat)
    return s.result()


X = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])  # mean (2, 0); Σ‖x − x̄‖² = 1+1+4+4 = 10


def test_explained_variance_of_a_perfect_reconstruction_is_one_and_of_the_mean_is_zero():
    assert _recon(X, X)["explained_variance"] == pytest.approx(1.0)
    assert _recon(X, X)["fvu"] == pytest.approx(0.0)
    mean = X.mean(0, keepdim=True).expand_as(X)
    assert _recon(X, mean)["explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert _recon(X, mean)["fvu"] == pytest.approx(1.0)


def test_reconstruction_metrics_by_hand():
    x_hat = X.clone()
    x_hat[0] = torch.tensor([1.0, 1.0])  # error ‖(0, 1)‖² = 1 on one token
    r = _recon(X, x_hat)
    assert r["explained_variance"] == pytest.approx(1 - 1 / 10)
    assert r["mse"] == pytest.approx(1 / 8)  # Σ err² / (N·d)
    assert r["mse_per_token"] == pytest.approx(1 / 4)
    # cos((1,1),(1,0)) = 1/√2, the other three are 1
    assert r["cosine_similarity"] == pytest.approx((3 + 1 / math.sqrt(2)) / 4)
    # ‖x̂‖/‖x‖: √2 on the first token
    assert r["l2_ratio"] == pytest.approx((3 + math.sqrt(2)) / 4)
    # γ = Σ‖x̂‖² / Σ x̂·x = (2 + 9 + 8 + 8) / (1 + 9 + 8 + 8)
    assert r["relative_reconstruction_bias"] == pytest.approx(27 / 26)
    # legacy: per-token 1 − err/‖x − x̄_batch‖², centred norms 1, 1, 4, 4
    assert r["explained_variance_legacy"] == pytest.approx((0 + 1 + 1 + 1) / 4)


def test_shrunk_reconstruction_has_bias_below_one():
    assert _recon(X, 0.5 * X)["relative_reconstruction_bias"] == pytest.approx(0.5)


def test_explained_variance_uses_the_eval_set_mean_even_with_a_huge_offset():
    # residual streams carry a large constant direction: Σ‖x‖² − N‖x̄‖² would cancel, Chan's update must not
    torch.manual_seed(0)
    x = torch.randn(3000, 8, dtype=torch.float64) + 1e6
    x_hat = x + 0.1 * torch.randn_like(x)
    expected = 1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    s = ReconstructionStats()
    for part_x, part_y in zip(x.split(700), x_hat.split(700)):
        s.update(part_x, part_y)
    assert s.result()["explained_variance"] == pytest.approx(float(expected), rel=1e-9)


def test_latent_counts_by_hand():
    f = torch.tensor(
        [
            [0.0, 2.0, 0.0, 1.0],
            [0.0, 4.0, 0.0, 0.0],
            [0.0, 3.0, 0.5, 0.0],
            [0.0, 3.0, 0.0, 0.0],
        ]
    )
    s = LatentStats()
    s.update(f)
    per = s.per_latent()
    assert per["fires"].tolist() == [0, 4, 1, 1]
    assert per["frequency"].tolist() == [0.0, 1.0, 0.25, 0.25]
    assert per["mean_activation"].tolist() == [0.0, 3.0, 0.5, 1.0]
    assert per["max_activation"].tolist() == [0.0, 4.0, 0.5, 1.0]
    r = s.result(dead_threshold=1e-6, almost_dead_threshold=0.3, dense_threshold=0.5)
    assert r["l0"] == pytest.approx(6 / 4)
    assert r["l1"] == pytest.approx((2 + 4 + 3 + 3 + 1 + 0.5) / 4)
    assert r["n_dead"] == 1  # never fires
    assert r["n_almost_dead"] == 3  # freq < 0.3: the dead one and the two firing on 1/4 of tokens
    assert r["n_dense"] == 1  # freq 1.0 > 0.5
    assert r["n_never_fired"] == 1


def test_dead_threshold_is_a_frequency_not_a_count():
    f = torch.zeros(1000, 3)
    f[0, 0] = 1.0  # fires once in 1000 tokens: frequency 1e-3
    f[:, 2] = 1.0
    s = LatentStats()
    s.update(f)
    assert s.result(1e-2, 1e-1, 0.99)["n_dead"] == 2  # 1e-3 < 1e-2 counts as dead
    assert s.result(1e-4, 1e-1, 0.99)["n_dead"] == 1
    assert s.result(1e-4, 1e-1, 0.99)["n_dense"] == 1
    assert s.result(1e-4, 1e-1, 1.0)["n_dense"] == 0  # dense is strictly greater than the threshold


def test_streaming_over_batches_equals_one_shot():
    torch.manual_seed(1)
    hooks = ["a", "b"]
    x = {h: torch.randn(300, 6) * (i + 1) + i for i, h in enumerate(hooks)}
    y = {h: x[h] + 0.3 * torch.randn(300, 6) for h in hooks}
    f = torch.relu(torch.randn(300, 20) - 1.0)

    one = EvalAccumulator(hooks, Thresholds(1e-6, 0.05, 0.3))
    one.update(x, y, f)
    many = EvalAccumulator(hooks, Thresholds(1e-6, 0.05, 0.3))
    for idx in torch.arange(300).split(37):
        many.update({h: x[h][idx] for h in hooks}, {h: y[h][idx] for h in hooks}, f[idx])

    a, b = one.result(), many.result()
    for key in (
        "explained_variance",
        "mse",
        "mse_per_token",
        "cosine_similarity",
        "l2_ratio",
        "relative_reconstruction_bias",
        "l0",
        "l1",
        "n_dead",
        "n_almost_dead",
        "n_dense",
    ):
        assert b[key] == pytest.approx(a[key], rel=1e-10), key
    for h in hooks:
        assert b["per_hook"][h]["explained_variance"] == pytest.approx(
            a["per_hook"][h]["explained_variance"], rel=1e-10
        )
    for key, value in one.per_latent().items():
        assert torch.allclose(value, many.per_latent()[key])
    # the totals are over the concatenated hooks: EV pools errors and variances of both
    cat_x, cat_y = torch.cat([x["a"], x["b"]], 1).double(), torch.cat([y["a"], y["b"]], 1).double()
    expected = 1 - (cat_y - cat_x).pow(2).sum() / (cat_x - cat_x.mean(0)).pow(2).sum()
    assert a["explained_variance"] == pytest.approx(float(expected), rel=1e-10)


def test_single_out_hook_reports_no_per_hook_block_and_flattens_latent_dims():
    acc = EvalAccumulator([H])
    f = torch.zeros(2, 3, 4)  # [N, layers, d_sae]: 12 latents
    f[0, 1, 2] = 1.0
    acc.update({H: X[:2]}, {H: X[:2]}, f)
    r = acc.result()
    assert "per_hook" not in r
    assert r["d_sae"] == 12 and r["l0"] == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_latent_activations_give_the_dense_statistics(layout):
    torch.manual_seed(2)
    f = torch.relu(torch.randn(50, 7) - 0.8)
    f[:, 3] = 0.0  # a latent that never fires
    f[:, 5] = 1.0 + torch.rand(50)  # one stored on every token
    dense, sparse = LatentStats(), LatentStats()
    dense.update(f)
    sparse.update(f.to_sparse() if layout == "coo" else f.to_sparse_csr())
    for key, value in dense.per_latent().items():
        assert torch.allclose(sparse.per_latent()[key], value), key
    assert sparse.result(1e-6, 0.1, 0.5) == pytest.approx(dense.result(1e-6, 0.1, 0.5))


def test_log_density_histogram_counts_dead_apart(tmp_path):
    freq = torch.tensor([0.0, 0.0, 1.0, 0.5, 1e-3, 1e-3])
    hist = log_density_histogram(freq, n_tokens=1000, bins_per_decade=1)
    assert hist.n_dead == 2
    assert hist.edges == [-3.0, -2.0, -1.0, 0.0]
    # 1e-3 → bin [-3, -2); 0.5 (−0.30) → [-1, 0); 1.0 (log 0) → the last bin
    assert hist.counts == [2, 0, 2]
    path = save_density_png(hist, tmp_path / "density.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
