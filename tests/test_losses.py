"""Loss terms on 2×3 examples computed by hand."""

import math

import pytest
import torch

from saecli.dictionaries import losses as L

F = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.5]])
N = torch.tensor([1.0, 2.0, 0.5])  # decoder norms; F·N = [[1, 0, 1], [0, 6, 0.25]]


def test_mse_sums_over_d_and_averages_over_tokens():
    recon = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert L.mse(recon, target).item() == 7.0  # (1 + 13) / 2
    assert L.mse_per_element(recon, target).item() == 3.5  # 14 / 4
    assert L.mse(recon, target, mask=torch.tensor([False, True])).item() == 13.0


def test_power_penalty_p1_is_the_decoder_weighted_l1():
    assert L.power_penalty(F, N, p=1.0).item() == pytest.approx((2 + 6.25) / 2)


def test_power_penalty_is_the_pth_power_of_the_weighted_activation():
    # Σ (f·n)^2 per token: 1 + 1 = 2 and 36 + 0.0625; not the 2-norm (which would give √2, √36.06)
    assert L.power_penalty(F, N, p=2.0).item() == pytest.approx((2 + 36.0625) / 2)


def test_power_penalty_is_invariant_to_moving_scale_between_f_and_decoder():
    c = torch.tensor([3.0, 0.5, 7.0])
    for p in (0.5, 1.0, 2.0):
        assert L.power_penalty(F * c, N / c, p).item() == pytest.approx(L.power_penalty(F, N, p).item())


def test_tanh_penalty():
    t = math.tanh
    expected = ((t(1) + t(1)) + (t(6) + t(0.25))) / 2
    assert L.tanh_penalty(F, N, c=1.0).item() == pytest.approx(expected, rel=1e-6)
    assert L.tanh_penalty(F, N, c=2.0).item() == pytest.approx(((t(2) + t(2)) + (t(12) + t(0.5))) / 2, rel=1e-6)


def test_tanh_quad_penalty():
    t = math.tanh
    p_hat = [t(1) / 2, t(6) / 2, (t(1) + t(0.25)) / 2]  # per-latent mean over the two tokens
    expected = sum(p * (1 + p / 0.5) for p in p_hat)
    assert L.tanh_quad_penalty(F, N, c=1.0, frequency_scale=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_penalties_without_decoder_norms():
    assert L.power_penalty(F, None).item() == pytest.approx((3 + 3.5) / 2)
    assert L.sparsity_penalty("tanh", F, None, c=1.0).item() == pytest.approx(
        (math.tanh(1) + math.tanh(2) + math.tanh(3) + math.tanh(0.5)) / 2, rel=1e-6
    )
    with pytest.raises(ValueError):
        L.sparsity_penalty("l3", F, None)


def test_penalty_over_two_latent_dims_like_a_clt():
    f = torch.stack([F, 2 * F], dim=1)  # [N=2, layers=2, d_sae=3]
    n = torch.stack([N, N])
    assert L.power_penalty(f, n, latent_dims=2).item() == pytest.approx(3 * (2 + 6.25) / 2)


H = torch.tensor([[-1.0, 0.5, 2.0], [0.2, 3.0, -0.4]])
THETA = torch.tensor([0.5, 1.0, 1.0])


def test_jumprelu_preact_loss():
    # ReLU(θ − h)·n = [[1.5, 1, 0], [0.3, 0, 0.7]] → 2.5 and 1.0
    assert L.jumprelu_preact_loss(H, THETA, N).item() == pytest.approx(1.75)
    # gated: ReLU(θ − h·n), h·n = [[-1, 1, 1], [0.2, 6, -0.2]] → 1.5 and 1.5
    assert L.jumprelu_preact_loss(H, THETA, N, gated=True).item() == pytest.approx(1.5)


def test_jumprelu_l0_counts_and_trains_only_thresholds():
    log_theta = THETA.log().requires_grad_()
    h = H.clone().requires_grad_()
    l0 = L.jumprelu_l0(h, log_theta.exp(), bandwidth=1.0)
    assert l0.item() == 1.0  # one latent above θ per token
    l0.backward()
    # window |h − θ| < ε/2 = 0.5: (0,1) [0.5 vs 1] sits on the edge: out; (1,0) [0.2 vs 0.5]: in.
    # ∂θ_0 = −(1/ε)·1 / 2 tokens = −0.5; through log θ: × θ_0 = 0.5
    assert torch.allclose(log_theta.grad, torch.tensor([-0.5 * 0.5, 0.0, 0.0]))
    assert h.grad is None or torch.count_nonzero(h.grad) == 0


# ----------------------------------------------------------------------------------------- AuxK
PRE = torch.tensor([[5.0, 9.0, 1.0, 3.0, 8.0], [-1.0, 7.0, 2.0, -3.0, 6.0]])
DEAD = torch.tensor([True, False, True, True, False])


def test_auxk_picks_the_top_dead_latents_only():
    idx = L.auxk_select(PRE, DEAD, k_aux=2)
    assert [sorted(r) for r in idx.tolist()] == [[0, 3], [0, 2]]


def test_auxk_loss_value_and_gradients_reach_only_the_chosen_dead_latents():
    pre = PRE.clone().requires_grad_()
    e = torch.tensor([[5.0, 0.0, 1.0, 3.0, 0.0], [0.0, 0.0, 2.0, 0.0, 1.0]])
    # ê = [[5,0,0,3,0], [0,0,2,0,0]] with W_dec = I: ‖e − ê‖² = 2; ‖e − mean(e)‖² = 18
    loss = L.auxk_loss(pre, DEAD, 2, e, L.gather_decode(torch.eye(5)))
    assert loss.item() == pytest.approx(2 / 18)
    loss.backward()
    nonzero = {tuple(i) for i in torch.nonzero(pre.grad).tolist()}
    assert nonzero <= {(0, 0), (0, 3), (1, 2)}  # (1, 0) is selected but ReLU'd to 0


def test_auxk_k_is_capped_by_the_number_of_dead_latents():
    idx = L.auxk_select(PRE, torch.tensor([False, False, False, True, False]), k_aux=4)
    assert idx.tolist() == [[3], [3]]


def test_auxk_is_zero_with_no_dead_latent():
    e = torch.randn(2, 5)
    assert L.auxk_loss(PRE, torch.zeros(5, dtype=torch.bool), 2, e, L.gather_decode(torch.eye(5))).item() == 0.0
    assert L.auxk_loss(PRE, None, 2, e, L.gather_decode(torch.eye(5))).item() == 0.0


# ------------------------------------------------------------------------------- sparse (active) forms
@pytest.mark.parametrize("kind", ["power", "tanh", "tanh-quad"])
def test_penalties_on_the_active_values_only_equal_the_dense_ones(kind):
    """The sparse train steps pass only F's non-zeros: (row 0: latents 0, 2; row 1: latents 1, 2)."""
    active = L.Active(torch.tensor([0, 2, 1, 2]), n_tokens=2, d_sae=3)
    values = torch.tensor([1.0, 2.0, 3.0, 0.5])
    for norms in (N, None):
        dense = L.sparsity_penalty(kind, F, norms, p=1.0, c=1.0, frequency_scale=0.5)
        sparse = L.sparsity_penalty(kind, values, norms, p=1.0, c=1.0, frequency_scale=0.5, active=active)
        assert sparse.item() == pytest.approx(dense.item(), rel=1e-6)
    assert L.power_penalty(values, N, active=active).item() == pytest.approx((2 + 6.25) / 2)  # as by hand above


def test_auxk_on_a_bias_free_buffer_with_a_gather_equals_the_dense_auxk():
    """sae.py's sparse AuxK: `pre` without its bias (added to the dead columns), a custom gather."""
    bias = torch.tensor([0.5, -1.0, 0.25, 1.0, 0.0])
    e = torch.tensor([[5.0, 0.0, 1.0, 3.0, 0.0], [0.0, 0.0, 2.0, 0.0, 1.0]])
    decode = L.gather_decode(torch.eye(5))
    dense = L.auxk_loss(PRE + bias, DEAD, 2, e, decode)
    seen = []
    sparse = L.auxk_loss(PRE, DEAD, 2, e, decode, bias=bias, gather=lambda v, i: seen.append(i) or v)
    assert sparse.item() == pytest.approx(dense.item()) and [sorted(r) for r in seen[0].tolist()] == [[0, 3], [0, 2]]
