"""The compiled CPU kernels (native.py) and the pure-torch products of kernels.py agree with dense torch.

Every test that needs the compiled kernels is skipped where they cannot be built; the torch fallback is
tested everywhere (with the kernels switched off by `native.disabled()`)."""

import copy
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries import kernels, native
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.sae import SparseAutoEncoder
from saecli.errors import UsageError

needs_native = pytest.mark.skipif(native.lib() is None, reason=f"compiled kernels: {native.status()}")


def random_pattern(n, s, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(s, generator=g)[:k] for _ in range(n)])
    return kernels.SparsePattern.from_topk(idx, s), torch.randn(n * k, generator=g)


def dense_of(pattern, values):
    return pattern.csr(values).to_dense()


# ------------------------------------------------------------------------------------------ top-k
@needs_native
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_gate", [False, True])
@pytest.mark.parametrize("shape", [(7, 40, 5), (33, 1024, 16), (9, 1000, 32)])  # scan path; group path; tail
def test_native_topk_keeps_the_k_largest_keys(shape, with_bias, with_gate):
    n, s, k = shape
    torch.manual_seed(0)
    h = torch.randn(n, s)
    bias = torch.randn(s) if with_bias else None
    gate = torch.rand(s) + 0.5 if with_gate else None
    pre = h + (bias if with_bias else 0)
    keys = pre * (gate if with_gate else 1)
    vals, idx = kernels.topk_pre(h, k, bias, gate)
    assert idx.dtype == torch.int32 and vals.shape == (n, k)
    expected = torch.topk(keys, k, dim=-1).values.sort(-1).values
    assert torch.equal(keys.gather(1, idx.long()).sort(-1).values, expected)
    assert torch.equal(vals, pre.gather(1, idx.long()))  # the ungated pre-activations, exactly
    assert all(len(set(row.tolist())) == k for row in idx)  # no column twice


@needs_native
def test_native_topk_handles_ties_infinities_and_nan_like_torch():
    h = torch.zeros(4, 1024)
    h[1, ::3] = 2.0  # ties
    h[2, 100] = float("inf")
    h[2, 200] = float("-inf")
    h[3, 7] = float("nan")  # torch.topk ranks NaN above everything
    vals, idx = kernels.topk_pre(h, 8)
    ref = torch.topk(h, 8, dim=-1).values
    for r in range(4):
        assert torch.equal(vals[r].sort().values.nan_to_num(9.0), ref[r].sort().values.nan_to_num(9.0))


# ---------------------------------------------------------------------------------------- products
@pytest.mark.parametrize("compiled", [True, False])
def test_pattern_products_equal_dense_products(compiled):
    if compiled and native.lib() is None:
        pytest.skip(native.status())
    n, s, k, d = 50, 300, 6, 20
    pattern, values = random_pattern(n, s, k)
    dense = dense_of(pattern, values)
    B, A, X, bias = torch.randn(s, d), torch.randn(n, d), torch.randn(n, d), torch.randn(d)
    with native.disabled() if not compiled else torch.no_grad():
        assert pattern.native() == compiled
        torch.testing.assert_close(pattern.matmul(values, B, bias), dense @ B + bias)
        grad_w, sums = pattern.matmul_t(values, X, col_sums=True)
        torch.testing.assert_close(grad_w, dense.t() @ X)
        torch.testing.assert_close(sums, dense.sum(0))
        rows = torch.arange(n).repeat_interleave(k)
        torch.testing.assert_close(pattern.sampled(A, B), (A[rows] * B[pattern.col.long()]).sum(1))


@needs_native
def test_native_transpose_is_a_stable_counting_sort():
    pattern, values = random_pattern(40, 64, 5, seed=3)
    order, crow_t, rows_t = native.transpose(pattern.crow, pattern.col, 64)
    transposed = kernels._csr(crow_t, rows_t, values[order.long()], (64, 40)).to_dense()
    assert torch.equal(transposed, dense_of(pattern, values).t())
    for c in range(64):  # rows ascending within each column
        seg = rows_t[crow_t[c] : crow_t[c + 1]]
        assert torch.equal(seg, seg.sort().values)


@needs_native
def test_native_relu_passes_equal_torch():
    torch.manual_seed(0)
    h, bias = torch.randn(30, 200), torch.randn(200)
    f = h.clone()
    nnz, counts, colsum = kernels.relu_bias_(f, bias)
    ref = torch.relu(h + bias)
    assert torch.equal(f, ref) and nnz == int((ref > 0).sum())
    assert torch.equal(counts.long(), (ref > 0).sum(1))
    torch.testing.assert_close(colsum, ref.sum(0))
    pattern, values = kernels.SparsePattern.from_dense(f, counts)
    assert torch.equal(dense_of(pattern, values), ref)
    df, term = torch.randn(30, 200), torch.randn(200)
    out = df.clone()
    sums = native.relu_backward_(out, f, term)
    expected = torch.where(ref > 0, df + term, torch.zeros(()))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(sums, expected.sum(0))


# ------------------------------------------------------------------------------- whole train steps
def make_sae(activation, d=16, s=512, bias=None):
    cfg = parse(DictionaryConfig, {"d_sae": s, "activation": activation, "k": 8}, key="sae")
    torch.manual_seed(0)
    sae = SparseAutoEncoder(cfg, d, "x")
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.W_dec.mul_(torch.rand(s, 1) + 0.5)
        sae.b_enc.copy_(0.1 * torch.randn(s) + (bias or 0.0))
        sae.b_dec.copy_(0.1 * torch.randn(d))
    return sae


def step_grads(sae, x, ctx):
    out = sae.loss({"x": x}, {"x": x}, ctx)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "activation, bias, path",
    [("topk", None, "topk-sparse"), ("relu", None, "relu-dense-fused"), ("relu", -2.5, "relu-sparse")],
)
def test_compiled_and_torch_steps_equal_dense_autograd(activation, bias, path):
    """d_sae = 512, k = 8: large enough that the compiled top-k takes its group-pruned path."""
    x = torch.randn(64, 16)
    dead = torch.arange(512) % 4 == 0
    ctx = (
        StepContext(k=8, auxk_coefficient=0.1, k_aux=16, dead_mask=dead)
        if activation == "topk"
        else StepContext(l1_coefficient=0.05, sparsity_loss_type="power")
    )
    sae = make_sae(activation, bias=bias)
    ref = copy.deepcopy(sae)
    ref.cfg = copy.deepcopy(sae.cfg)
    ref.cfg.sparse_kernels = False
    loss_ref, g_ref = step_grads(ref, x, ctx)
    assert ref.last_path == "dense"
    for compiled in [True, False] if native.lib() is not None else [False]:
        twin = copy.deepcopy(sae)
        with native.disabled() if not compiled else torch.enable_grad():
            loss, grads = step_grads(twin, x, ctx)
        assert twin.last_path == path
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        for name in g_ref:
            torch.testing.assert_close(grads[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=f"{name} {compiled=}")


def test_a_failed_build_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "status": "not built yet"})
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SAECLI_CACHE_DIR", str(tmp_path / "cache"))
    assert native.lib() is None and "no C compiler" in native.status()
    sae = make_sae("topk")
    loss, grads = step_grads(sae, torch.randn(32, 16), StepContext(k=8))
    assert (
        sae.last_path == "topk-sparse" and torch.isfinite(loss) and set(grads) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    )


def test_the_switch_turns_the_compiled_kernels_off(monkeypatch):
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "status": "not built yet"})
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.lib() is None and native.ENV_SWITCH in native.status()


# ------------------------------------------------------------------------------------ backend choice
def test_the_backend_is_chosen_in_one_place(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    default = "native" if native.lib() is not None else "torch"
    assert kernels.backend_for("cpu").name == default
    assert kernels.SparsePattern.from_topk(torch.zeros(2, 1, dtype=torch.long), 4).backend.name == default
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")  # Triton on CPU tensors only in its interpreter:
    assert kernels.backend_for("cpu").name == "torch"  # a backend that cannot run falls back to torch
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    assert kernels.backend_for("cpu").name == "torch"
    pattern, values = random_pattern(6, 40, 3)
    assert pattern.backend.name == "torch" and not pattern.native()
    assert not kernels._native_ok(torch.zeros(2, 2))  # the fused ReLU passes follow the same choice
    monkeypatch.setenv(kernels.BACKEND_ENV, "fast")
    with pytest.raises(UsageError, match=kernels.BACKEND_ENV):
        kernels.backend_for("cpu")
    monkeypatch.delenv(kernels.BACKEND_ENV)
    with kernels.forced("torch"):
        assert kernels.backend_for("cpu").name == "torch"
    assert kernels.backend_for("cpu").name == default


# ------------------------------------------------------------------------- the build and its cache
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "gcc") is None, reason="no C compiler")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A native module that has not tried to build yet, caching under tmp_path/kernels; records loads."""
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "status": "not built yet"})
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.setenv("SAECLI_CACHE_DIR", str(tmp_path))
    loaded = []
    real_load = native._load
    monkeypatch.setattr(native, "_load", lambda path: (loaded.append(Path(path)), real_load(path))[1])
    return tmp_path / "kernels", loaded


@needs_compiler
@pytest.mark.parametrize("flags", [native._FLAG_SETS[0], native._FLAG_SETS[-1]])  # OpenMP; no OpenMP
def test_the_c_source_compiles_without_warnings(tmp_path, flags):
    src = tmp_path / "k.c"
    src.write_text(native.source())
    cmd = native.compile_command(os.environ.get("CC") or "gcc", flags, src, tmp_path / "k.so")
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr


@needs_compiler
def test_the_kernels_build_once_into_a_private_cache(fresh_build):
    folder, loaded = fresh_build
    assert native.lib() is not None
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert loaded and loaded[0].parent == folder and str(folder) in native.status()
    (lib_file,) = folder.glob("sae_kernels_*.so")
    assert not stat.S_IMODE(lib_file.stat().st_mode) & 0o077


@needs_compiler
@pytest.mark.parametrize("make_unsafe", ["world-writable", "someone else's", "a link"])
def test_an_unsafe_cache_is_never_loaded_from(fresh_build, monkeypatch, tmp_path, make_unsafe):
    """Another user could plant a library in a folder they can write or own: build privately instead."""
    folder, loaded = fresh_build
    if make_unsafe == "a link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "elsewhere")
    else:
        folder.mkdir(mode=0o700)
        if make_unsafe == "world-writable":
            os.chmod(folder, 0o777)
        else:  # owned by another uid (as if planted before this user's first run)
            real_lstat = os.lstat

            def lstat(path, *a, **kw):
                st = real_lstat(path, *a, **kw)
                return os.stat_result((*st[:4], st.st_uid + 1, *st[5:])) if Path(path) == folder else st

            monkeypatch.setattr(os, "lstat", lstat)
    with pytest.raises(native.UnsafeCache):
        native.check_private(folder)
    assert native.lib() is not None
    assert "private temporary folder" in native.status() and "cache refused" in native.status()
    assert loaded and all(folder not in p.parents and tmp_path not in p.parents for p in loaded)
    assert not list(folder.glob("sae_kernels_*.so"))  # nothing built where others can reach it


@needs_compiler
def test_a_library_others_can_write_is_rebuilt_before_loading(fresh_build):
    folder, loaded = fresh_build
    assert native.lib() is not None
    (lib_file,) = folder.glob("sae_kernels_*.so")
    lib_file.unlink()  # (a new file: the loaded one stays mapped in this process)
    lib_file.write_bytes(b"planted")  # as if someone else wrote it through a group-writable mode
    os.chmod(lib_file, 0o666)
    native._state.update(lib=None, tried=False)
    assert native.lib() is not None and loaded[-1] == lib_file
    assert lib_file.read_bytes()[:4] == b"\x7fELF" and not stat.S_IMODE(lib_file.stat().st_mode) & 0o022


def test_old_kernel_builds_are_pruned(tmp_path):
    """Each source edit or upgrade compiles a new library: only the newest few stay in the cache."""
    for i in range(7):
        f = tmp_path / f"sae_kernels_{i:016x}.so"
        f.write_bytes(b"")
        os.utime(f, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "notes.txt").write_text("not a build")
    native.prune_builds(tmp_path, keep=4)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["notes.txt"] + [
        f"sae_kernels_{i:016x}.so" for i in (3, 4, 5, 6)
    ]


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_in_its_cpu_dry_run():
    """benchmarks/gpu_check.sh --dry-run: every step of the GPU check at toy sizes on the CPU (~2-4 min)."""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=root, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0 and "failed steps: none" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
    assert "vs sparsify" in res.stdout and "kernel tests on cpu" in res.stdout
