"""Fast train-step paths: sparse TopK / sparse ReLU, and a fused dense ReLU-L1 step.

Why: a dense SAE step is 5 matmuls of 2·N·d·s FLOP; when only k ≪ d_sae latents fire per token,
everything after the encoder matmul can touch only the active latents (see shared/PERFORMANCE.md):
- `SparsePattern`: which (token, latent) pairs are active, as CSR arrays (and, lazily, the transposed
  CSR [d_sae, N] whose products give the weight gradients), with its three products: `matmul`
  (CSR(v) @ B), `matmul_t` (CSRᵀ(v) @ B, the weight gradients) and `sampled` (A[row]·B[col]).
- `gather_pre(x, W_enc, b_enc, values, pattern)`: the active pre-activations (already computed by
  the dense encoder matmul, passed in) as a differentiable [nnz] tensor whose backward is sparse:
  dW_enc = CSRᵀ(g)·x, db_enc = Σ per latent, dx = CSR(g)·W_enc (only when x needs a gradient).
- `sparse_decode(values, pattern, W_dec)`: CSR(values) @ W_dec; backward: dvalues = the sampled
  product (dŷ·W_decᵀ at the active pairs only), dW_dec = CSRᵀ(values)·dŷ.
- `topk_pre`: exact per-row top-k of (h + b_enc)·gate straight from the bias-free encoder matmul
  (compiled kernel); `two_level_topk`, its torch counterpart on the biased (gated) matmul: max over
  groups of 8 columns → best k groups → top-k of their 8k members, equal to torch.topk's values
  (indices may differ only between tied values).
- `DenseReluL1`: the dense-regime ReLU + decoder-norm-weighted L1 step with preallocated buffers
  (no autograd temporaries of size [N, d_sae]); `relu_bias_`: the ReLU pass before it (bias, ReLU,
  non-zero count and column sums).

Where the products run is decided in one place, `backend_for(device)` (each SparsePattern asks once):
- "native": on the CPU, the compiled loops of native.py when they could be built (`native_status()`
  says; SAECLI_NATIVE_KERNELS=0 turns them off), float32 with int32 patterns; it also supplies the
  one-pass top-k (`Backend.fused_topk`) and the fused ReLU passes;
- "triton": on CUDA, the Triton kernels of triton_kernels.py (bf16/fp16/fp32 operands read as they
  are, float32 accumulation), when triton imports;
- "torch": the pure-torch reference everywhere else: embedding_bag for the CSR products (on the CPU
  2-3× faster than torch's CSR @ dense; it runs on CUDA too) and torch's sampled CSR product, in
  float32 (bf16 parameters cast, their gradients cast back).
SAECLI_KERNELS = auto | torch | native | triton overrides the choice (a backend that cannot run on
the device falls back to torch); `forced(name)` does the same inside a `with` block (tests, benchmarks).
Sparse products never run under autocast: they choose their own dtypes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

from saecli.dictionaries import native
from saecli.errors import UsageError


def native_status() -> str:
    """Whether the compiled CPU kernels run (see native.py), for logs and benchmarks."""
    return native.status()


def _native_ok(*tensors: torch.Tensor) -> bool:
    """The compiled CPU loops run on these tensors: the native backend is the one chosen for their
    device (not switched off by SAECLI_KERNELS / `forced`) and they are float32/int32 CPU tensors."""
    return backend_for(tensors[0].device) is NATIVE and NATIVE.usable(*tensors)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta" on every construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _autocast_off(fn):
    """Run a custom Function's forward/backward with autocast disabled on the tensors' device."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        t = next(a for a in args if isinstance(a, torch.Tensor))
        with _no_autocast(t):
            return fn(ctx, *args)

    return wrapper


def _no_autocast(t: torch.Tensor):
    """The sparse products choose their own dtypes: autocast (bf16 CSR kernels don't exist) stays off."""
    return torch.autocast(t.device.type, enabled=False)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Sparse products run in float32 (float64 kept): CPU CSR kernels have no bf16/fp16, and the
    sparse part is memory-bound anyway. Under AMP only the dense encoder matmul runs in half precision."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------ top-k
def two_level_topk(x: torch.Tensor, k: int, group: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k along the last dim of a 2-D tensor: (values, indices) [N, k], unsorted.

    Columns are split into `group` strided blocks (group j = columns j, j+S, j+2S, … with S = d/group,
    so the group max is an elementwise max of contiguous blocks). The k largest values lie in the k
    groups with the largest maxima: any element outside them is beaten by those k maxima. Falls back
    to torch.topk when the shape does not split evenly or k·group would not shrink the search.
    """
    n, d = x.shape
    if d % group or k * group * 2 > d or x.is_cuda:
        return torch.topk(x, k, dim=-1, sorted=False)
    stride = d // group
    gmax = torch.amax(x.view(n, group, stride), dim=1)  # [N, S]
    gidx = torch.topk(gmax, k, dim=-1, sorted=False).indices  # [N, k]
    offsets = torch.arange(group, device=x.device, dtype=gidx.dtype) * stride
    cand = (gidx.unsqueeze(2) + offsets).view(n, k * group)
    vals, pos = torch.topk(torch.gather(x, 1, cand), k, dim=-1, sorted=False)
    return vals, torch.gather(cand, 1, pos)


def topk_pre(
    h: torch.Tensor, k: int, bias: torch.Tensor | None = None, gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-row top-k of the keys (h + bias)·gate, for h = x W_encᵀ without its bias (a plain
    matmul): (h + bias at the kept latents [N, k] float32, their indices int32 [N, k]), unsorted.

    One pass per row in the compiled kernel (see native.py); the keys are never written to h.
    Needs the native backend (`backend_for(h.device).fused_topk`) and a float32 CPU matrix."""
    f32 = torch.float32
    return native.topk(
        h, k, None if bias is None else bias.detach().to(f32), None if gate is None else gate.detach().to(f32)
    )


# --------------------------------------------------------------------------------------- backends
BACKEND_ENV = "SAECLI_KERNELS"
BACKEND_NAMES = ("auto", "torch", "native", "triton")
_forced: list[str] = []


class TorchBackend:
    """The pure-torch reference products (any device; float32/float64 operands)."""

    name = "torch"
    fused_topk = False  # `topk_pre` (bias and gate applied inside the one-pass selection)
    half_operands = False  # reads bf16/fp16 weights as they are (no float32 copy)
    sparse_under_autocast = False  # the sparse TopK path is used under autocast (else the dense bf16 step)

    def usable(self, *tensors: torch.Tensor) -> bool:
        return True

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in a dtype this backend's products read."""
        if self.half_operands and t.dtype in (torch.bfloat16, torch.float16, torch.float32):
            return t
        return t.to(_compute_dtype(t))

    def spmm(
        self,
        crow: torch.Tensor,
        col: torch.Tensor,
        values: torch.Tensor,
        B: torch.Tensor,
        perm: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        rowsum: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(bias + CSR(values[perm]) @ B, row sums of the values if asked)."""
        v = values if perm is None else values[perm.long()]
        out = _bag_sum(col, crow, v, B)
        if bias is not None:
            out.add_(bias)
        sums = None
        if rowsum:
            rows = torch.repeat_interleave(
                torch.arange(crow.numel() - 1, device=col.device), torch.diff(crow.long()), output_size=col.numel()
            )
            sums = torch.zeros(crow.numel() - 1, dtype=v.dtype, device=v.device).index_add_(0, rows, v)
        return out, sums

    def sddmm(self, crow: torch.Tensor, col: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        like = torch.zeros(col.numel(), dtype=A.dtype, device=A.device)
        size = (crow.numel() - 1, B.shape[0])
        return torch.sparse.sampled_addmm(_csr(crow, col, like, size), A, B.t(), beta=0.0).values()

    def transpose(
        self, crow: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, crow_t, rows_t): the CSR of the transpose; order[q] = original position of entry q."""
        order = torch.argsort(col, stable=True)  # int32 ids: the int64 stable sort is far slower on CPU
        counts = torch.bincount(col, minlength=n_cols)
        crow_t = torch.zeros(n_cols + 1, dtype=crow.dtype, device=col.device)
        torch.cumsum(counts, 0, out=crow_t[1:])
        row_of = torch.repeat_interleave(
            torch.arange(n_rows, device=col.device, dtype=crow.dtype), torch.diff(crow.long()), output_size=col.numel()
        )
        return order, crow_t, row_of[order]


class NativeBackend(TorchBackend):
    """The compiled CPU loops (native.py): float32 values/operands, int32 patterns."""

    name = "native"
    fused_topk = True

    def usable(self, *tensors: torch.Tensor) -> bool:
        return native.usable(*tensors)

    def spmm(self, crow, col, values, B, perm=None, bias=None, rowsum=False):
        return native.spmm(crow, col, values, B, perm=perm, bias=bias, rowsum=rowsum)

    def sddmm(self, crow, col, A, B):
        return native.sddmm(crow, col, A, B)

    def transpose(self, crow, col, n_rows, n_cols):
        return native.transpose(crow, col, n_cols)


class TritonBackend(TorchBackend):
    """The Triton kernels (triton_kernels.py): bf16/fp16/fp32 operands, float32 accumulation."""

    name = "triton"
    half_operands = True
    sparse_under_autocast = True

    def __init__(self, module: ModuleType):
        self.mod = module

    def usable(self, *tensors: torch.Tensor) -> bool:
        return all(t.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64) for t in tensors)

    def spmm(self, crow, col, values, B, perm=None, bias=None, rowsum=False):
        return self.mod.spmm(crow, col, values, B, perm=perm, bias=bias, rowsum=rowsum)

    def sddmm(self, crow, col, A, B):
        return self.mod.sddmm(crow, col, A, B)


TORCH, NATIVE = TorchBackend(), NativeBackend()
_triton_backend: list[TritonBackend | None] = []


def triton_backend() -> TritonBackend | None:
    """The Triton backend if triton imports (imported on first call only: TRITON_INTERPRET must be set
    before that to run the kernels on CPU tensors)."""
    if not _triton_backend:
        try:
            from saecli.dictionaries import triton_kernels
        except ImportError:
            _triton_backend.append(None)
        else:
            _triton_backend.append(TritonBackend(triton_kernels))
    return _triton_backend[0]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def requested_backend() -> str:
    """The backend asked for: `forced(...)`, else $SAECLI_KERNELS, else "auto"."""
    if _forced:
        return _forced[-1]
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKEND_NAMES:
        raise UsageError(f"{BACKEND_ENV}={choice!r} is not a kernel backend: use one of {', '.join(BACKEND_NAMES)}")
    return choice


def backend_for(device: torch.device | str) -> TorchBackend:
    """The one place that decides where sparse products run on `device` (see the module docstring)."""
    dev = torch.device(device).type
    choice = requested_backend()
    if choice == "torch":
        return TORCH
    if choice in ("auto", "triton") and (dev == "cuda" or (dev == "cpu" and choice == "triton" and _interpreting())):
        tb = triton_backend()
        if tb is not None:
            return tb
    if dev == "cpu" and choice in ("auto", "native") and native.lib() is not None:
        return NATIVE
    return TORCH


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Inside the block, `backend_for` chooses as if SAECLI_KERNELS = name."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown kernel backend {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


# ---------------------------------------------------------------------------------------- pattern
class SparsePattern:
    """Active (row, col) pairs of an [n_rows, n_cols] matrix in CSR order (row-major).

    `crow` [n_rows+1] and `col` [nnz] index the CSR; the transpose (CSR of [n_cols, n_rows], used for
    the weight gradients) is built on first use: its `order` permutes values into it.
    """

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int):
        self.crow, self.col, self.n_rows, self.n_cols = crow, col, n_rows, n_cols
        self._t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.backend = backend_for(col.device)
        if not self.backend.usable(crow, col):
            self.backend = TORCH

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @classmethod
    def from_topk(cls, indices: torch.Tensor, n_cols: int) -> SparsePattern:
        """Rows with exactly k entries each (indices [N, k])."""
        n, k = indices.shape
        itype = torch.int32 if n * max(k, 1) < 2**31 - 1 and n_cols < 2**31 - 1 else torch.int64
        crow = torch.arange(0, n * k + 1, k, device=indices.device, dtype=itype)
        return cls(crow, indices.reshape(-1).to(itype), n, n_cols)

    @classmethod
    def from_dense(
        cls, dense: torch.Tensor, row_counts: torch.Tensor | None = None
    ) -> tuple[SparsePattern, torch.Tensor]:
        """Pattern of the non-zeros of a 2-D tensor, and their values [nnz]. With `row_counts` (non-zeros
        per row, int32, as `relu_bias_` returns them) the compiled kernel extracts them in one pass."""
        n, d = dense.shape
        if row_counts is not None and _native_ok(dense, row_counts) and d < 2**31 - 1:
            crow, col, values = native.dense_to_csr(dense, row_counts)
            if crow[-1] < 2**31 - 1:
                return cls(crow, col, n, d), values
        rows, cols = torch.nonzero(dense, as_tuple=True)
        values = dense[rows, cols]
        counts = torch.bincount(rows, minlength=n)
        itype = torch.int32 if rows.numel() < 2**31 - 1 else torch.int64
        crow = torch.zeros(n + 1, dtype=itype, device=dense.device)
        torch.cumsum(counts, 0, out=crow[1:])
        return cls(crow, cols.to(itype), n, d), values

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow, self.col, values, (self.n_rows, self.n_cols))

    def native(self) -> bool:
        """The compiled CPU kernels run this pattern's products (now: `native.disabled()` may switch them off)."""
        return self._for(self.crow, self.col) is NATIVE

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """A dense operand (weights, inputs, gradients) in a dtype this pattern's products read."""
        return self.backend.operand(t)

    def _for(self, *tensors: torch.Tensor) -> TorchBackend:
        return self.backend if self.backend.usable(*tensors) else TORCH

    def _transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._t is None:
            self._t = self._for(self.crow, self.col).transpose(self.crow, self.col, self.n_rows, self.n_cols)
        return self._t

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """CSR of the transpose [n_cols, n_rows] with these (row-major ordered) values."""
        order, crow_t, rows_t = self._transpose()
        return _csr(crow_t, rows_t, values[order.long()], (self.n_cols, self.n_rows))

    def col_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Σ of values per column → [n_cols]."""
        out = torch.zeros(self.n_cols, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.col, values)

    # products (values: [nnz] in row-major order)
    def matmul(self, values: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """CSR(values) @ B (+ bias) → [n_rows, d]."""
        extra = () if bias is None else (bias,)
        return self._for(values, B, *extra).spmm(self.crow, self.col, values, B, bias=bias)[0]

    def matmul_t(
        self, values: torch.Tensor, B: torch.Tensor, col_sums: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CSRᵀ(values) @ B → [n_cols, d] (the weight gradients), Σ values per column if asked)."""
        order, crow_t, rows_t = self._transpose()
        return self._for(values, B, order).spmm(crow_t, rows_t, values, B, perm=order, rowsum=col_sums)

    def sampled(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """[nnz]: A[row]·B[col] at every active pair (A [n_rows, d], B [n_cols, d])."""
        return self._for(A, B).sddmm(self.crow, self.col, A, B)


def _bag_sum(indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Σ per bag of weights·table[indices], bags delimited by `offsets` (CSR row pointers): a CSR product
    as embedding_bag, which on the CPU runs 2-3× faster than torch's CSR @ dense (no zero-fill + copy
    around the product, measured at 4096×4608, k = 32)."""
    return torch.nn.functional.embedding_bag(
        indices, table, offsets.to(indices.dtype), mode="sum", per_sample_weights=weights, include_last_offset=True
    )


# ----------------------------------------------------------------------------- autograd functions
class _GatherPre(torch.autograd.Function):
    """values = (x @ W_encᵀ + b_enc) at the pattern, given precomputed; sparse backward."""

    @staticmethod
    @_autocast_off
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor | None,
        values: torch.Tensor,
        pattern: SparsePattern,
    ) -> torch.Tensor:
        ctx.pattern = pattern
        ctx.has_bias = b_enc is not None
        ctx.save_for_backward(x, w_enc)
        return values.detach().clone()

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, g: torch.Tensor):
        x, w_enc = ctx.saved_tensors
        pat: SparsePattern = ctx.pattern
        g = g.to(_compute_dtype(w_enc)).contiguous()
        dx = dw = db = None
        want_db = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[0]:
            dx = pat.matmul(g, pat.operand(w_enc)).to(x.dtype)
        if ctx.needs_input_grad[1] or want_db:
            dw, db = pat.matmul_t(g, pat.operand(x), col_sums=want_db)  # dW_enc, and db_enc in the same pass
            dw = dw.to(w_enc.dtype) if ctx.needs_input_grad[1] else None
            db = db.to(w_enc.dtype) if db is not None else None  # None unless want_db
        return dx, dw, db, None, None


class _SparseDecode(torch.autograd.Function):
    """ŷ = CSR(values) @ W_dec (+ b_dec), with the sampled/sparse backward."""

    @staticmethod
    @_autocast_off
    def forward(
        ctx: Any, values: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor | None, pattern: SparsePattern
    ) -> torch.Tensor:
        v = values.to(_compute_dtype(w_dec)).contiguous()
        ctx.pattern = pattern
        ctx.has_bias = b_dec is not None
        ctx.save_for_backward(v, w_dec)
        return pattern.matmul(v, pattern.operand(w_dec), None if b_dec is None else pattern.operand(b_dec))

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, g: torch.Tensor):
        v, w_dec = ctx.saved_tensors
        pat: SparsePattern = ctx.pattern
        g = g.to(v.dtype).contiguous()
        dv = dw = db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0).to(w_dec.dtype)
        if ctx.needs_input_grad[0]:
            # dL/dvalues = (dŷ · W_decᵀ) at the active pairs only (a sampled dense-dense product)
            dv = pat.sampled(g, pat.operand(w_dec))
        if ctx.needs_input_grad[1]:
            dw = pat.matmul_t(v, g)[0].to(w_dec.dtype)
        return dv, dw, db, None


def gather_pre(
    x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor | None, values: torch.Tensor, pattern: SparsePattern
) -> torch.Tensor:
    """Differentiable active pre-activations [nnz] (values computed by the caller's dense matmul)."""
    return _GatherPre.apply(x, w_enc, b_enc, values, pattern)


def sparse_decode(
    values: torch.Tensor, pattern: SparsePattern, w_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_active values·W_dec rows per token (+ b_dec) → [N, d] float32."""
    return _SparseDecode.apply(values, w_dec, b_dec, pattern)


# --------------------------------------------------------------------------- dense ReLU-L1 (fused)
class _DenseReluL1(torch.autograd.Function):
    """f = relu(pre) (pre precomputed in a reusable buffer), ŷ = f W_dec + b_dec,
    penalty = mean_tokens Σ_i f_i·‖W_d,i‖ — with buffer-reusing backward (5 matmuls, few passes)."""

    @staticmethod
    @_autocast_off
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        w_dec: torch.Tensor,
        b_dec: torch.Tensor | None,
        f: torch.Tensor,
        work: dict,
        colsum: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_tok = f.shape[0]
        norms = w_dec.norm(dim=1)
        y = torch.addmm(b_dec, f, w_dec) if b_dec is not None else f @ w_dec
        colsum = f.sum(0) if colsum is None else colsum
        penalty = (colsum * norms).sum() / n_tok
        ctx.save_for_backward(x, w_enc, w_dec, f, norms, colsum)
        ctx.work = work
        ctx.has_bdec = b_dec is not None
        return y, penalty

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, g_y: torch.Tensor, g_pen: torch.Tensor):
        x, w_enc, w_dec, f, norms, colsum = ctx.saved_tensors
        n_tok = f.shape[0]
        work = ctx.work
        g_y = g_y.contiguous()
        df = work.get("df")
        if df is None or df.shape != f.shape or df.dtype != f.dtype:
            df = work["df"] = torch.empty_like(f)
        gp = g_pen.to(f.dtype) / n_tok
        if _native_ok(df, f, g_y, w_dec):
            # a beta = 0 matmul, then ReLU backward + penalty term + bias gradient in one pass
            torch.mm(g_y, w_dec.t(), out=df)
            db_enc = native.relu_backward_(df, f, norms * gp)
        else:
            torch.addmm((norms * gp).unsqueeze(0), g_y, w_dec.t(), out=df)  # dL/df incl. the penalty
            # ReLU backward in place (one vectorised pass; a bool-mask masked_fill_ was ~8× slower on CPU)
            torch.ops.aten.threshold_backward.grad_input(df, f, 0, grad_input=df)
            db_enc = df.sum(0)
        dw_dec = f.t() @ g_y
        dw_dec.addcmul_((colsum * gp / norms.clamp_min(1e-12)).unsqueeze(1), w_dec)  # ∂‖W_d,i‖
        dw_enc = df.t() @ x
        db_dec = g_y.sum(0) if ctx.has_bdec and ctx.needs_input_grad[4] else None
        dx = df @ w_enc if ctx.needs_input_grad[0] else None
        return dx, dw_enc, db_enc, dw_dec, db_dec, None, None, None


def dense_relu_l1(
    x: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    w_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    f: torch.Tensor,
    work: dict,
    colsum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŷ, decoder-weighted L1 penalty) for f = relu(x W_encᵀ + b_enc), computed by the caller into `f`
    (a reused buffer; `work` holds the backward's reused buffers; `colsum` = f.sum(0) if already known)."""
    return _DenseReluL1.apply(x, w_enc, b_enc, w_dec, b_dec, f, work, colsum)


# ------------------------------------------------------------------------------- ReLU pre-activations
def relu_bias_(h: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """h ← relu(h + bias) in place, for h = x W_encᵀ computed without its bias: (non-zeros, per-row
    counts int32 or None, column sums or None). One pass in the compiled kernel; else torch."""
    if _native_ok(h) and h.dim() == 2 and h.stride(-1) == 1:
        return native.relu_bias_(h, None if bias is None else bias.detach().to(h.dtype))
    if bias is not None:
        h.add_(bias.detach().to(h.dtype))
    torch.nn.functional.threshold_(h, 0.0, 0.0)  # type: ignore[attr-defined]  # ReLU writing +0 for −0 too (not in the stubs)
    return count_nonzero(h), None, None


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def count_nonzero(h: torch.Tensor) -> int:
    """Non-zeros of a ReLU output (no −0, as `threshold_` leaves it), counted on its bit patterns: float
    count_nonzero is ~20× slower on the CPU (85 ms against 4.6 ms for 4096×4608, one thread)."""
    if h.is_contiguous() and h.element_size() in _SAME_SIZE_INT:
        h = h.view(_SAME_SIZE_INT[h.element_size()])
    return int(torch.count_nonzero(h))
