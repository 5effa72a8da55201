"""Activation functions on tiny hand-checkable tensors: forward values, selections, pseudo-gradients."""

import math

import pytest
import torch

from saecli.dictionaries import activations as A

H = torch.tensor([[1.0, 3.0, -2.0, 2.0], [0.5, -1.0, 4.0, 0.1]])


def test_relu():
    assert torch.equal(A.SparseActivation("relu", 4)(H), torch.tensor([[1.0, 3.0, 0.0, 2.0], [0.5, 0.0, 4.0, 0.1]]))


def test_topk_keeps_the_k_largest_per_token():
    f = A.topk(H, k=2)
    assert torch.equal(f, torch.tensor([[0.0, 3.0, 0.0, 2.0], [0.5, 0.0, 4.0, 0.0]]))


def test_topk_never_keeps_a_negative_value():
    f = A.topk(torch.tensor([[-1.0, -2.0, 5.0]]), k=2)
    assert torch.equal(f, torch.tensor([[0.0, 0.0, 5.0]]))


def test_topk_with_decoder_norm_gating_ranks_h_times_norm_but_keeps_h():
    n = torch.tensor([1.0, 0.1, 1.0, 1.0])  # latent 1's short decoder row drops it from the top 2
    f = A.topk(H, k=2, decoder_norm=n)
    assert torch.equal(f, torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.5, 0.0, 4.0, 0.0]]))


def test_topk_gradient_flows_only_to_kept_latents():
    h = H.clone().requires_grad_()
    A.topk(h, k=2).sum().backward()
    assert torch.equal(h.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]))


def test_batchtopk_keeps_exactly_k_times_n_over_the_batch():
    f, smallest = A.batch_topk(H, k=2)  # 2 tokens × 2 = 4 values: 4, 3, 2, 1
    assert torch.equal(f, torch.tensor([[1.0, 3.0, 0.0, 2.0], [0.0, 0.0, 4.0, 0.0]]))
    assert int((f > 0).sum()) == 4
    assert smallest.item() == 1.0


def test_batchtopk_threshold_is_the_running_average_of_the_smallest_kept():
    act = A.SparseActivation("batchtopk", 4, batchtopk_threshold_decay=0.5)
    act(H, k=2, training=True)
    assert act.threshold.item() == pytest.approx(1.0)  # first batch: exactly its smallest kept value
    act(torch.tensor([[2.5, 3.0, 9.0, -1.0], [4.0, 5.0, 0.0, 0.0]]), k=2, training=True)  # smallest kept: 3.0
    # bias-corrected EMA with decay 0.5: (0.5·1 + 1·3) / 1.5
    assert act.threshold.item() == pytest.approx(3.5 / 1.5)


def test_batchtopk_at_inference_is_a_threshold():
    act = A.SparseActivation("batchtopk", 4)
    act(H, k=2, training=True)  # θ = 1
    f = act(H, k=2, training=False)
    assert torch.equal(f, torch.tensor([[0.0, 3.0, 0.0, 2.0], [0.0, 0.0, 4.0, 0.0]]))  # strict x > θ


def test_batchtopk_gated_threshold_compares_h_times_norm():
    act = A.SparseActivation("batchtopk", 2)
    act.threshold.fill_(1.0)
    f = act(torch.tensor([[0.8, 0.8]]), decoder_norm=torch.tensor([2.0, 1.0]), training=False)
    assert torch.equal(f, torch.tensor([[0.8, 0.0]]))


# ----------------------------------------------------------------------------------- JumpReLU
X = torch.tensor([[0.9, 1.2, 2.0], [1.3, 0.95, -1.0]])
THETA = torch.tensor([1.0, 1.0, 2.1])
EPS = 0.5  # rectangle kernel nonzero where |x − θ| < 0.25: (0,0) (0,1) (0,2) (1,1)


def test_jumprelu_forward():
    act = A.SparseActivation("jumprelu", 3, bandwidth=EPS)
    with torch.no_grad():
        act.log_threshold.copy_(THETA.log())
    assert torch.allclose(act(X), torch.tensor([[0.0, 1.2, 0.0], [1.3, 0.0, 0.0]]))


def test_jumprelu_pseudo_gradients_match_the_paper():
    act = A.SparseActivation("jumprelu", 3, bandwidth=EPS)
    with torch.no_grad():
        act.log_threshold.copy_(THETA.log())
    x = X.clone().requires_grad_()
    act(x).sum().backward()
    # ∂/∂θ = −(θ/ε)·Σ_tokens K: counts in the window per latent (1, 2, 1)
    d_theta = torch.tensor([-(1.0 / EPS) * 1, -(1.0 / EPS) * 2, -(2.1 / EPS) * 1])
    assert torch.allclose(act.log_threshold.grad, d_theta * THETA)  # chain rule through θ = exp(log θ)
    assert torch.equal(x.grad, (X > THETA).float())  # x's gradient is the mask


def test_step_pseudo_gradient_and_no_gradient_to_x():
    log_theta = THETA.log().requires_grad_()
    x = X.clone().requires_grad_()
    l0 = A.step(x, log_theta.exp(), EPS).sum()
    assert l0.item() == 2.0
    l0.backward()
    d_theta = torch.tensor([-(1 / EPS) * 1, -(1 / EPS) * 2, -(1 / EPS) * 1])
    assert torch.allclose(log_theta.grad, d_theta * THETA)
    assert x.grad is None or torch.count_nonzero(x.grad) == 0


def test_jumprelu_gated_thresholds_h_times_norm():
    n = torch.tensor([2.0, 1.0, 1.0])
    f = A.jumprelu_gated(torch.tensor([[0.6, 0.6, 0.6]]), torch.tensor([1.0, 1.0, 1.0]), 0.1, n)
    assert torch.allclose(f, torch.tensor([[0.6, 0.0, 0.0]]))  # only 0.6·2 > 1


def test_threshold_rescaling_moves_log_threshold():
    act = A.SparseActivation("jumprelu", 2, jumprelu_threshold_init=0.5)
    act.rescale_threshold(0.1)
    assert torch.allclose(act.theta(), torch.full((2,), 0.05))
    assert act.log_threshold.dtype == torch.float32


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown activation"):
        A.SparseActivation("gelu", 3)


def test_rectangle_kernel_integrates_to_one():
    u = torch.linspace(-2, 2, 40001)
    assert math.isclose(float(A._rectangle(u).sum() * (u[1] - u[0])), 1.0, rel_tol=1e-3)
