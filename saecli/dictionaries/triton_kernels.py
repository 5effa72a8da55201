"""Triton kernels for the sparse products of the TopK/ReLU train steps on CUDA (bf16 and fp32).

Why: after the dense encoder matmul, a TopK step only needs the k active latents per token, so the
decode, its input gradient and both weight gradients are sparse products (shared/PERFORMANCE.md).
torch's CSR products on CUDA take float32 only (a bf16 decoder had to be cast: a full copy of W per
step) and zero-fill their output around cuSPARSE. Two kernels do every product, reading bf16 or fp32
operands directly and accumulating in float32:

- `spmm`: out[r] = bias + Σ_p val[perm[p]]·B[col[p]] over row r's stored entries (CSR rows), and the
  row sums of the values if asked. On the token-major pattern this is the decode (B = W_dec) and the
  encoder's input gradient (B = W_enc); on the transposed (latent-major) pattern with `perm` it is
  the weight gradients dW_dec = CSRᵀ(f)·dŷ and dW_enc = CSRᵀ(g)·x (and db_enc as the row sums): one
  program per (latent, block of d) sums that latent's tokens in a fixed order, so no atomics, no
  [N·k, d] buffer (sparsify's index_add) and the result is deterministic.
- `sddmm`: out[p] = A[row(p)]·B[col(p)] at the stored entries (dL/dvalues of the decode).

The module imports triton at import time; kernels.py imports it only when the Triton backend is
chosen (CUDA, or SAECLI_KERNELS=triton with TRITON_INTERPRET=1, which is how tests run these kernels
on CPU tensors). The top-k selection itself stays torch.topk: fusing it into the encoder matmul is
left until a GPU measurement shows it pays.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _spmm_kernel(
    crow_ptr,
    col_ptr,
    val_ptr,
    perm_ptr,
    b_ptr,
    ldb,
    bias_ptr,
    out_ptr,
    ldo,
    rowsum_ptr,
    d,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ROWSUM: tl.constexpr,
    BLOCK_NNZ: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dblk = tl.program_id(1)
    offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    rs = tl.zeros([BLOCK_NNZ], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_NNZ):
        p = p0 + tl.arange(0, BLOCK_NNZ)
        pmask = p < end
        cols = tl.load(col_ptr + p, mask=pmask, other=0).to(tl.int64)
        if HAS_PERM:
            src = tl.load(perm_ptr + p, mask=pmask, other=0).to(tl.int64)
        else:
            src = p
        v = tl.load(val_ptr + src, mask=pmask, other=0.0).to(tl.float32)
        tile = tl.load(
            b_ptr + cols[:, None] * ldb + offs_d[None, :], mask=pmask[:, None] & dmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(tile * v[:, None], axis=0)
        rs += v
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * ldo + offs_d, acc, mask=dmask)
    if HAS_ROWSUM:
        if dblk == 0:
            tl.store(rowsum_ptr + row, tl.sum(rs, axis=0))


@triton.jit
def _sddmm_kernel(
    crow_ptr, col_ptr, a_ptr, lda, b_ptr, ldb, out_ptr, d, BLOCK_NNZ: tl.constexpr, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    for p0 in range(start, end, BLOCK_NNZ):
        p = p0 + tl.arange(0, BLOCK_NNZ)
        pmask = p < end
        cols = tl.load(col_ptr + p, mask=pmask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_NNZ], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < d
            a = tl.load(a_ptr + row * lda + offs_d, mask=dmask, other=0.0).to(tl.float32)
            tile = tl.load(
                b_ptr + cols[:, None] * ldb + offs_d[None, :], mask=pmask[:, None] & dmask[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.sum(tile * a[None, :], axis=1)
        tl.store(out_ptr + p, acc, mask=pmask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor with contiguous rows (the kernels take a leading dimension)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(d: int) -> int:
    return max(16, min(128, triton.next_power_of_2(d)))


BLOCK_NNZ = 16


def spmm(
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    B: torch.Tensor,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rowsum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bias + CSR(values[perm]) @ B  [n_rows, d] float32, the per-row sums of the values or None).
    B (and bias) may be bf16/fp16/fp32; values any float dtype; accumulation in float32."""
    B = _rows(B)
    n_rows, d = crow.numel() - 1, B.shape[1]
    out = torch.empty(n_rows, d, dtype=torch.float32, device=B.device)
    sums = torch.empty(n_rows, dtype=torch.float32, device=B.device) if rowsum else None
    if n_rows == 0 or d == 0:
        if sums is not None:
            sums.zero_()
        return (out if bias is None else out.copy_(bias.float().expand_as(out))), sums
    values = values.contiguous()
    bd = _block_d(d)
    dummy = out  # pointer placeholder for the absent optional operands (never read)
    _spmm_kernel[(n_rows, triton.cdiv(d, bd))](
        crow,
        col,
        values,
        dummy if perm is None else perm,
        B,
        B.stride(0),
        dummy if bias is None else bias.contiguous(),
        out,
        out.stride(0),
        dummy if sums is None else sums,
        d,
        HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None,
        HAS_ROWSUM=rowsum,
        BLOCK_NNZ=BLOCK_NNZ,
        BLOCK_D=bd,
    )
    return out, sums


def sddmm(crow: torch.Tensor, col: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """[nnz] float32: A[row]·B[col] at every stored (row, col) (A, B any float dtype)."""
    A, B = _rows(A), _rows(B)
    out = torch.empty(col.numel(), dtype=torch.float32, device=A.device)
    n_rows = crow.numel() - 1
    if n_rows == 0 or col.numel() == 0:
        return out.zero_()
    _sddmm_kernel[(n_rows,)](
        crow, col, A, A.stride(0), B, B.stride(0), out, A.shape[1], BLOCK_NNZ=BLOCK_NNZ, BLOCK_D=_block_d(A.shape[1])
    )
    return out
