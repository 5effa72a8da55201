"""Optional compiled CPU kernels for the sparse train steps (built with gcc on first use, cached).

Why: past ~1.5 ×roof the CPU TopK step is limited by what plain torch can do after the encoder matmul
(shared/PERFORMANCE.md): `torch.topk` over [N, d_sae] rows, and CSR products that zero-fill, copy and
re-permute around MKL. These loops do the same maths in one pass each:
- `topk`: exact per-row top-k of key = (h + b)·gate: one vectorised pass writes the keys and the max of
  each group of 8, a bisection on the group maxima gives a threshold that at least k keys reach, and a
  k-heap sees only the keys above it (≈ k of them); it returns the ungated pre-activations h + b at the
  kept latents (the encoder bias and the decoder-norm gate never touch the [N, d_sae] buffer, so the
  encoder is a plain beta = 0 matmul);
- `spmm`: out = bias + CSR(values) @ B (optionally values through a permutation, and row sums), used for
  the sparse decode and, on the transposed pattern, for both weight gradients;
- `sddmm`: the sampled product A[row]·B[col] at the active pairs (dL/dvalues of the decode);
- `transpose`: the transposed CSR by a counting sort (no argsort);
- `relu_bias` / `relu_backward` / `dense_to_csr`: the ReLU steps' passes over [N, d_sae] fused
  (bias + ReLU + counts + column sums in one pass; ReLU backward + penalty term + bias gradient in one).

The shared object links `libgomp.so.1`, which the dynamic loader resolves to the copy torch has already
loaded, so the loops run on torch's OpenMP threads (`torch.get_num_threads()`).

The source is csrc/sae_kernels.c (package data), compiled with -Wall -Wextra (warning-free). Everything
here is optional: `lib()` returns None when compiling or loading fails (no compiler: exactly the torch
path), or when SAECLI_NATIVE_KERNELS=0, and kernels.py then runs its pure-torch code. The build (≈ 1 s)
is cached under $SAECLI_CACHE_DIR or $XDG_CACHE_HOME/saecli (default ~/.cache/saecli) in `kernels/`,
keyed by the source, the flags and the CPU, and written atomically (parallel first builds are safe).
That folder is created 0700, and it and the library are loaded from only if they are this user's and
neither group- nor world-writable (`check_private`); otherwise (or on a read-only home) the library is
built for this process alone in a fresh private temporary folder, never at a predictable shared path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

ENV_SWITCH = "SAECLI_NATIVE_KERNELS"  # "0" / "false" / "off": never build or use the compiled kernels
BUILD_TIMEOUT_S = 120
SOURCE_NAME = "sae_kernels.c"  # in csrc/ beside this file, shipped as package data


def source() -> str:
    """The C source of the kernels (saecli/dictionaries/csrc/sae_kernels.c)."""
    return resources.files("saecli.dictionaries").joinpath("csrc").joinpath(SOURCE_NAME).read_text()


_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "sae_topk": (None, [_I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _INT]),
    "sae_spmm": (None, [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _INT]),
    "sae_sddmm": (None, [_I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _INT]),
    "sae_transpose": (None, [_I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR]),
    "sae_relu_bias": (_I64, [_I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _INT]),
    "sae_relu_backward": (None, [_I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _INT]),
    "sae_dense_to_csr": (None, [_I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _INT]),
}
# tried in order: the first that compiles wins (-march=native needs a compiler that knows this CPU; a
# compiler without OpenMP still gets single-threaded kernels, whose pragmas it then ignores)
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native", "-fopenmp-simd", "-Wno-unknown-pragmas"],
    ["-O3", "-Wno-unknown-pragmas"],
)
WARNINGS = ["-Wall", "-Wextra"]  # the source compiles without a warning under every flag set (tests/test_kernels.py)

_lock = threading.Lock()
_state: dict = {"lib": None, "tried": False, "status": "not built yet"}


class UnsafeCache(OSError):
    """The kernel cache folder (or a library in it) could be written by someone else: never load from it."""


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    root = os.environ.get("SAECLI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "saecli"
    )
    return Path(root) / "kernels"


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else -1


def check_private(path: Path, kind: str = "folder") -> None:
    """Raise UnsafeCache unless `path` is a real folder (or regular file) owned by this user that neither
    its group nor other users can write: a library loaded from anywhere else could have been planted."""
    st = os.lstat(path)
    want = stat.S_ISDIR if kind == "folder" else stat.S_ISREG
    if not want(st.st_mode):
        raise UnsafeCache(f"{path} is not a plain {kind} (a symbolic link or something else)")
    if _uid() >= 0 and st.st_uid != _uid():
        raise UnsafeCache(f"{path} belongs to uid {st.st_uid}, not to this user (uid {_uid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCache(f"{path} can be written by its group or by other users (mode {stat.S_IMODE(st.st_mode):o})")


def private_folder(path: Path) -> Path:
    """`path`, created 0700 if missing, after `check_private`."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_private(path)
    return path


def _cpu_key() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def compile_command(cc: str, flags: list[str], src: Path, out: Path) -> list[str]:
    return [cc, *flags, *WARNINGS, "-std=gnu11", "-shared", "-fPIC", "-o", str(out), str(src)]


def _build(cc: str, flags: list[str], target: Path) -> None:
    """Compile into a private temporary folder beside `target`, then rename (atomic: parallel first
    builds are safe, a concurrent builder's copy is identical)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # mode 0700, unpredictable name
        src = Path(tmp) / SOURCE_NAME
        src.write_text(source())
        out = Path(tmp) / target.name
        cmd = compile_command(cc, flags, src, out)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
        os.chmod(out, 0o700)
        os.replace(out, target)
    prune_builds(target.parent, keep=KEEP_BUILDS)


KEEP_BUILDS = 4  # builds of other sources/flags/CPUs kept beside the newest (other installs may use them)


def prune_builds(folder: Path, keep: int) -> None:
    """Remove all but the `keep` most recently built kernels in `folder` (each source edit or upgrade
    makes a new one). A process that has one loaded keeps its mapping: unlinking is safe on Linux."""
    builds = sorted(folder.glob("sae_kernels_*.so"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in builds[keep:]:
        try:
            old.unlink()
        except OSError:
            pass


def _load(path: Path) -> ctypes.CDLL:
    dll = ctypes.CDLL(str(path))
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = res, args
    return dll


class disabled:
    """Context manager: inside it, `lib()` is None and every caller runs its torch code (benchmarks
    compare both paths in one process; tests check the torch fallback)."""

    def __enter__(self) -> None:
        _state["off"] = _state.get("off", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _state["off"] -= 1


def lib() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call), or None where they cannot be had."""
    if _state.get("off"):
        return None
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        _state["lib"], _state["status"] = _try_lib()
        _state["tried"] = True
    return _state["lib"]


def _loaded() -> ctypes.CDLL:
    """The compiled kernels, for the wrappers below (callers check `available()` first)."""
    handle = lib()
    if handle is None:
        raise RuntimeError(f"the native kernels are not available ({_state['status']})")
    return handle


def _try_lib() -> tuple[ctypes.CDLL | None, str]:
    if not enabled_by_env():
        return None, f"disabled by {ENV_SWITCH}"
    cc = os.environ.get("CC") or "gcc"
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc})"
    text = source()
    errors: list[str] = []
    try:
        folder: Path | None = private_folder(cache_dir())
    except OSError as e:  # unsafe, or read-only home (some CI runners): build privately for this process
        errors.append(f"cache refused: {e}")
        folder = None
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\0".join([text, cc, *flags, _cpu_key()]).encode()).hexdigest()[:16]
        name = f"sae_kernels_{key}.so"
        for where in ([folder] if folder is not None else []) + [None]:
            try:
                if where is not None:
                    return _load_cached(cc, flags, where / name), f"compiled ({' '.join(flags)}; {where / name})"
                with tempfile.TemporaryDirectory(prefix="saecli-kernels-") as tmp:  # 0700, random name, ours
                    dll = _load_cached(cc, flags, Path(tmp) / name)  # the mapping outlives the removed file
                return dll, f"compiled ({' '.join(flags)}; in a private temporary folder: {'; '.join(errors)})"
            except RuntimeError as e:  # the compiler refused these flags: no folder helps, try the next set
                errors.append(str(e))
                break
            except (OSError, subprocess.SubprocessError, AttributeError) as e:  # full/read-only: go private
                errors.append(str(e))
    return None, "unavailable: " + " | ".join(errors)


def _load_cached(cc: str, flags: list[str], path: Path) -> ctypes.CDLL:
    """Load the library at `path` (in a private folder), building it first if missing or not safe."""
    try:
        check_private(path, "file")
    except FileNotFoundError:
        _build(cc, flags, path)
    except UnsafeCache:  # writable by others or not ours: replace it with our own build
        _build(cc, flags, path)
    check_private(path.parent)
    check_private(path, "file")
    return _load(path)


def status() -> str:
    """One line saying whether the compiled kernels run, and why not."""
    lib()
    return _state["status"]


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels apply: every tensor float32/int32 on the CPU (and the library loads)."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.int32):
            return False
    return lib() is not None


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose rows are contiguous (the kernels take a leading dimension)."""
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[-1] else t.contiguous()


# ------------------------------------------------------------------------------------ wrappers
def _traced(fn):
    """Name the call in torch.profiler traces (ctypes calls are otherwise invisible there)."""
    label = f"saecli.native.{fn.__name__}"

    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = fn.__name__, fn.__doc__, fn
    return wrapper


@_traced
def topk(
    h: torch.Tensor, k: int, bias: torch.Tensor | None = None, gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the k largest keys (h + bias)·gate: (h + bias at them [N, k] float32, their columns int32)."""
    h = _rows(h)
    n, s = h.shape
    vals = torch.empty(n, k, dtype=torch.float32)
    idx = torch.empty(n, k, dtype=torch.int32)
    bias = None if bias is None else bias.contiguous()
    gate = None if gate is None else gate.contiguous()
    _loaded().sae_topk(
        n, s, h.data_ptr(), h.stride(0), _p(bias), _p(gate), k, vals.data_ptr(), idx.data_ptr(), torch.get_num_threads()
    )
    return vals, idx


@_traced
def spmm(
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    B: torch.Tensor,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rowsum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bias + CSR(values[perm]) @ B  [n_rows, d], the per-row sums of the values or None)."""
    B = _rows(B)
    n_rows, d = crow.numel() - 1, B.shape[1]
    out = torch.empty(n_rows, d, dtype=torch.float32)
    sums = torch.empty(n_rows, dtype=torch.float32) if rowsum else None
    values = values.contiguous()
    bias = None if bias is None else bias.contiguous()
    _loaded().sae_spmm(
        n_rows,
        crow.data_ptr(),
        col.data_ptr(),
        values.data_ptr(),
        _p(perm),
        B.data_ptr(),
        B.stride(0),
        d,
        _p(bias),
        out.data_ptr(),
        d,
        _p(sums),
        torch.get_num_threads(),
    )
    return out, sums


@_traced
def sddmm(crow: torch.Tensor, col: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """[nnz]: A[row]·B[col] at every stored (row, col)."""
    A, B = _rows(A), _rows(B)
    out = torch.empty(col.numel(), dtype=torch.float32)
    _loaded().sae_sddmm(
        crow.numel() - 1,
        crow.data_ptr(),
        col.data_ptr(),
        A.data_ptr(),
        A.stride(0),
        B.data_ptr(),
        B.stride(0),
        A.shape[1],
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


@_traced
def transpose(crow: torch.Tensor, col: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, crow_t, rows_t) of the transposed CSR, all int32 (perm: original position of each entry)."""
    nnz = col.numel()
    crow_t = torch.empty(n_cols + 1, dtype=torch.int32)
    rows_t = torch.empty(nnz, dtype=torch.int32)
    perm = torch.empty(nnz, dtype=torch.int32)
    _loaded().sae_transpose(
        crow.numel() - 1, n_cols, crow.data_ptr(), col.data_ptr(), crow_t.data_ptr(), rows_t.data_ptr(), perm.data_ptr()
    )
    return perm, crow_t, rows_t


@_traced
def relu_bias_(
    h: torch.Tensor, bias: torch.Tensor | None, colsum: bool = True
) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """h ← relu(h + bias) in place: (non-zeros, per-row counts int32 [N], column sums [d_sae] or None)."""
    assert h.stride(-1) == 1
    n, s = h.shape
    counts = torch.empty(n, dtype=torch.int32)
    sums = torch.empty(s, dtype=torch.float32) if colsum else None
    bias = None if bias is None else bias.contiguous()
    nnz = _loaded().sae_relu_bias(
        n, s, h.data_ptr(), h.stride(0), _p(bias), counts.data_ptr(), _p(sums), torch.get_num_threads()
    )
    return int(nnz), counts, sums


@_traced
def relu_backward_(df: torch.Tensor, f: torch.Tensor, colterm: torch.Tensor | None) -> torch.Tensor:
    """df ← (df + colterm) where f > 0, else 0 (in place); returns its column sums [d_sae]."""
    assert df.stride(-1) == 1 and f.stride(-1) == 1 and df.shape == f.shape
    n, s = df.shape
    sums = torch.empty(s, dtype=torch.float32)
    colterm = None if colterm is None else colterm.contiguous()
    _loaded().sae_relu_backward(
        n,
        s,
        df.data_ptr(),
        df.stride(0),
        f.data_ptr(),
        f.stride(0),
        _p(colterm),
        sums.data_ptr(),
        torch.get_num_threads(),
    )
    return sums


@_traced
def dense_to_csr(h: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow int32 [N+1], col int32 [nnz], values [nnz]) of the non-zeros of h, given its row counts."""
    h = _rows(h)
    n, s = h.shape
    crow = torch.zeros(n + 1, dtype=torch.int32)
    torch.cumsum(counts, 0, dtype=torch.int32, out=crow[1:])
    nnz = int(crow[-1])
    col = torch.empty(nnz, dtype=torch.int32)
    val = torch.empty(nnz, dtype=torch.float32)
    _loaded().sae_dense_to_csr(
        n, s, h.data_ptr(), h.stride(0), crow.data_ptr(), col.data_ptr(), val.data_ptr(), torch.get_num_threads()
    )
    return crow, col, val
