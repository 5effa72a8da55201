"""MOLT train step: the sparse (active rows only) path vs the dense path, at several gate densities.

Prints, per k, the fraction of the R factor rows the active transforms own, tokens/s of each path, their
ratio, and ×roof (tokens/s ÷ the roof token rate R_matmul / (6·d·R), the dense path's matmul FLOPs).
The crossover sets `saecli.dictionaries.molt.SPARSE_MAX_DENSITY`. See shared/PERFORMANCE.md.

    python benchmarks/bench_molt_paths.py               # d 576, rank_counts {4: 1024, 16: 256, 64: 64}
    python benchmarks/bench_molt_paths.py --batch 2048 --ks 8 32 128
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import saecli.dictionaries.molt as molt_module
from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.registry import build_dictionary

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def roofline(d: int, batch: int, width: int) -> float:
    """GFLOP/s of a preallocated matmul of the dense path's shape ([B, d] @ [d, R])."""
    a, b = torch.randn(batch, d), torch.randn(d, width)
    c = torch.empty(batch, width)
    torch.matmul(a, b, out=c)
    t = time.perf_counter()
    for _ in range(3):
        torch.matmul(a, b, out=c)
    return 3 * 2 * batch * d * width / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    counts = {"4": 1024, "16": 256, "64": 64}
    xs = [torch.randn(args.batch, args.d) for _ in range(3)]
    ys = [torch.randn(args.batch, args.d) for _ in range(3)]
    print(f"d {args.d}, batch {args.batch}, rank_counts {counts}")
    for k in args.ks:
        cfg = parse(
            DictionaryConfig, {"kind": "molt", "rank_counts": counts, "k": k, "norm_activation": "none"}, key="sae"
        )
        torch.manual_seed(0)
        m = build_dictionary(cfg, args.d, [IN, OUT])
        opt = torch.optim.Adam(m.parameters(), lr=1e-4, fused=True)
        ctx = StepContext(k=k, training=True)
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        roofs, density = [], 0.0
        for rep in range(args.reps + 1):  # the first rep warms up
            for path, limit in (("dense", -1.0), ("sparse", 2.0)):
                molt_module.SPARSE_MAX_DENSITY = limit
                t = time.perf_counter()
                for i in range(args.steps):
                    out = m({IN: xs[i % 3], OUT: ys[i % 3]}, ctx)
                    out.loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    assert out.extra["path"] == path
                    density = float(out.extra["active_rank"]) / m.total_rank
                if rep:
                    times[path].append(args.batch * args.steps / (time.perf_counter() - t))
            if rep:
                roofs.append(roofline(args.d, args.batch, m.total_rank))
        roof_tokens = statistics.median(roofs) * 1e9 / (6 * args.d * m.total_rank)
        dense, sparse = statistics.median(times["dense"]), statistics.median(times["sparse"])
        print(
            f"k {k:4d}  active rows {density:6.1%}  dense {dense:8.0f} tok/s ({dense / roof_tokens:.2f} ×roof)  "
            f"sparse {sparse:8.0f} tok/s ({sparse / roof_tokens:.2f} ×roof)  sparse/dense {sparse / dense:.2f}  "
            f"[roofline {statistics.median(roofs):.0f} GFLOP/s]"
        )


if __name__ == "__main__":
    main()
