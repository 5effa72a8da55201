"""The Triton kernels (triton_kernels.py) agree with the pure-torch reference products and with dense
autograd, forward and gradients, in float32 and bfloat16.

Without a GPU they run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is set here, before
the kernels are first imported (the first test checks that the interpreter really runs them). On a
CUDA machine (benchmarks/gpu_check.sh) the same tests run the compiled kernels on the GPU."""

import copy
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before saecli's Triton module is imported (it decorates at import)
triton = pytest.importorskip("triton", reason="triton is in the test extra: pip install triton")

from saecli.config.base import parse  # noqa: E402
from saecli.config.dictionary import DictionaryConfig  # noqa: E402
from saecli.dictionaries import kernels  # noqa: E402
from saecli.dictionaries import triton_kernels as tk  # noqa: E402
from saecli.dictionaries.base import StepContext  # noqa: E402
from saecli.dictionaries.sae import SparseAutoEncoder  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


def pattern_of(n, s, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(s, generator=g)[:k] for _ in range(n)]).to(DEVICE)
    with kernels.forced("triton"):
        pattern = kernels.SparsePattern.from_topk(idx, s)
    values = torch.randn(n * k, generator=g).to(DEVICE)
    return pattern, values


def dense_of(pattern, values):
    rows = torch.arange(pattern.n_rows, device=DEVICE).repeat_interleave(torch.diff(pattern.crow.long()))
    out = torch.zeros(pattern.n_rows, pattern.n_cols, dtype=values.dtype, device=DEVICE)
    return out.index_put_((rows, pattern.col.long()), values)


def test_the_kernels_run_in_the_interpreter_without_a_gpu():
    pattern, _ = pattern_of(4, 32, 3)
    assert pattern.backend.name == "triton"
    if not CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(tk._spmm_kernel, InterpretedFunction) and isinstance(tk._sddmm_kernel, InterpretedFunction)
    with kernels.forced("torch"):
        assert kernels.backend_for(DEVICE).name == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_equal_dense_products(dtype):
    n, s, k, d = 12, 40, 5, 40  # d not a power of two: the masked tail of the d blocks
    pattern, values = pattern_of(n, s, k)
    dense = dense_of(pattern, values)
    g = torch.Generator().manual_seed(1)
    B, A, X, bias = (torch.randn(*shape, generator=g).to(DEVICE) for shape in [(s, d), (n, d), (n, d), (d,)])
    Bq, Aq, Xq, bq = (t.to(dtype) for t in (B, A, X, bias))  # the kernels read bf16 as it is
    tol = dict(rtol=1e-5, atol=1e-5)
    out = pattern.matmul(values, Bq, bq)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, dense @ Bq.float() + bq.float(), **tol)
    grad_w, sums = pattern.matmul_t(values, Xq, col_sums=True)  # the latent-major (transposed) product
    torch.testing.assert_close(grad_w, dense.t() @ Xq.float(), **tol)
    torch.testing.assert_close(sums, dense.sum(0), **tol)
    rows = torch.arange(n, device=DEVICE).repeat_interleave(k)
    expected = (Aq.float()[rows] * Bq.float()[pattern.col.long()]).sum(1)
    torch.testing.assert_close(pattern.sampled(Aq, Bq), expected, **tol)


def test_the_torch_reference_gives_the_same_products():
    """The pure-torch backend (embedding_bag, sampled CSR product) is what the Triton kernels replace."""
    pattern, values = pattern_of(16, 64, 4, seed=2)
    B, A = torch.randn(64, 24, device=DEVICE), torch.randn(16, 24, device=DEVICE)
    with kernels.forced("torch"):
        ref = kernels.SparsePattern(pattern.crow, pattern.col, 16, 64)
    assert ref.backend.name == "torch"
    torch.testing.assert_close(pattern.matmul(values, B), ref.matmul(values, B))
    torch.testing.assert_close(pattern.matmul_t(values, A, col_sums=True), ref.matmul_t(values, A, col_sums=True))
    torch.testing.assert_close(pattern.sampled(A, B), ref.sampled(A, B))


def make_sae(dtype="float32", d=12, s=64):
    cfg = parse(DictionaryConfig, {"d_sae": s, "activation": "topk", "k": 4, "dtype": dtype}, key="sae")
    torch.manual_seed(0)
    sae = SparseAutoEncoder(cfg, d, "x")
    with torch.no_grad():  # the encoder = the decoder's rows (tiny pre-activations: no bf16 near-ties in the top-k)
        sae.W_enc.copy_(sae.W_dec)
        sae.b_enc.copy_(0.1 * torch.randn(s))
        sae.b_dec.copy_(0.1 * torch.randn(d))
    return sae.to(DEVICE)


def step(sae, x, ctx):
    out = sae.loss({"x": x}, {"x": x}, ctx)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.float() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_topk_step_on_triton_equals_dense_autograd(dtype):
    """The whole sparse TopK step (encoder gather, decode, AuxK, every gradient) against plain autograd."""
    x = torch.randn(16, 12, device=DEVICE)
    ctx = StepContext(k=4, auxk_coefficient=0.1, k_aux=6, dead_mask=torch.arange(64, device=DEVICE) % 3 == 0)
    sae = make_sae(dtype)
    ref = copy.deepcopy(sae)
    ref.cfg = copy.deepcopy(sae.cfg)
    ref.cfg.sparse_kernels = False
    loss_ref, g_ref = step(ref, x, ctx)
    with kernels.forced("triton"):
        loss, grads = step(sae, x, ctx)
    assert sae.last_path == "topk-sparse" and ref.last_path == "dense"
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, loss_ref.to(loss.dtype), **tol)
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], **tol, msg=name)
