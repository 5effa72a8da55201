"""The pieces of ../shared/PERFORMANCE.md's protocol that several benchmarks share.

Benchmarks run as scripts (`python benchmarks/bench_x.py`), so this folder is on sys.path and they
import these as `from protocol import roofline, sync`.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

# Where scripts/get_smollm2.sh puts SmolLM2-135M-Instruct (as the experiments expect); SAECLI_SMOLLM2_DIR overrides.
SMOLLM2_DIR = os.environ.get("SAECLI_SMOLLM2_DIR", str(Path(__file__).resolve().parent.parent / "models" / "smollm2"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer reads finished work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def roofline(
    n: int, d: int, s: int, device: torch.device, dtype: torch.dtype = torch.float32, samples: int = 3
) -> float:
    """GFLOP/s of the protocol's dense matmul `torch.matmul(a, b, out=c)`, a [n, d], b [d, s], c
    preallocated: the median of `samples` timings after one untimed call."""
    a = torch.randn(n, d, device=device, dtype=dtype)
    b = torch.randn(d, s, device=device, dtype=dtype)
    c = torch.empty(n, s, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)
    times = []
    for _ in range(samples):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * d * s / statistics.median(times) / 1e9
