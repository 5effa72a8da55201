"""Memory and speed of one CLT train step against the formula in docs/kinds.md, and against a plain matmul.

    python benchmarks/bench_clt_memory.py                                  # small, CPU
    python benchmarks/bench_clt_memory.py --layers 30 --d-model 576 --d-sae 4096 --tokens 4096 --device cuda

Prints the parameter count, the predicted and measured memory (parameters; + gradients and Adam's two
moments; peak of a step), the step time, and ×roof = the step's decoder+encoder FLOP rate ÷ the FLOP rate
of one plain matmul of the same shape family measured in the same run. The FLOPs counted are those of the
DENSE step (3 × the forward's: forward, dL/dinput, dL/dweight), so the sparse TopK path can pass 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from protocol import sync

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.registry import build_dictionary


def predicted_bytes(n_layers: int, d: int, s: int, n_tok: int, bytes_per: int = 4) -> dict[str, float]:
    """The formula of docs/kinds.md (float32 unless bytes_per says otherwise)."""
    pairs = n_layers * (n_layers + 1) // 2
    params = n_layers * s * d + pairs * s * d + n_layers * s + n_layers * d
    acts = 2 * n_layers * n_tok * d + 6 * n_tok * n_layers * s  # in/out activations + ~6 [N, L, s] tensors
    return {
        "params": params,
        "param_bytes": params * bytes_per,
        "train_state_bytes": 4 * params * bytes_per,
        "activation_bytes": acts * bytes_per,
    }


def matmul_rate(device: torch.device, n: int, d: int, s: int, reps: int = 10) -> float:
    a, b = torch.randn(n, s, device=device), torch.randn(s, d, device=device)
    c = torch.empty(n, d, device=device)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b, out=c)
    sync(device)
    return 2 * n * s * d * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dense", action="store_true", help="the dense path (sparse_kernels = false)")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one step (torch.profiler)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(2)
    n_layers, d, s, n = args.layers, args.d_model, args.d_sae, args.tokens
    ins = [f"blocks.{i}.ln2.hook_normalized" for i in range(n_layers)]
    outs = [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    cfg = parse(
        DictionaryConfig,
        {"kind": "clt", "d_sae": s, "k": args.k, "norm_activation": "none", "sparse_kernels": not args.dense},
        key="sae",
    )
    pred = predicted_bytes(n_layers, d, s, n)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats()
    with torch.device(dev):
        clt = build_dictionary(cfg, d, ins + outs)
    clt.to(dev)
    batch = {h: torch.randn(n, d, device=dev) for h in ins + outs}
    opt = torch.optim.Adam(clt.parameters(), lr=1e-4, fused=dev.type == "cuda")  # as the trainer does
    ctx = StepContext(k=args.k, training=True)
    mem = lambda: torch.cuda.memory_allocated() if dev.type == "cuda" else float("nan")  # noqa: E731
    after_init = mem()
    times = []
    for step in range(args.steps + 1):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t = time.perf_counter()
        out = clt(batch, ctx)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if step:  # the first step allocates Adam's state
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else float("nan")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            clt(batch, ctx).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=12))
    flops = 3 * (n * s * d * n_layers * (n_layers + 1) + 2 * n * n_layers * s * d)
    step_t = statistics.median(times)
    roof = matmul_rate(dev, n, d, s)
    gib = 2.0**30
    print(f"CLT L={n_layers} d_model={d} d_sae/layer={s} tokens={n} k={args.k} on {dev}, path {clt.last_path}")
    print(
        f"parameters {pred['params'] / 1e6:.1f} M: predicted {pred['param_bytes'] / gib:.2f} GiB, "
        f"measured {after_init / gib:.2f} GiB"
    )
    print(
        f"train state (params+grads+Adam) predicted {pred['train_state_bytes'] / gib:.2f} GiB; "
        f"+ activations predicted {pred['activation_bytes'] / gib:.2f} GiB → "
        f"{(pred['train_state_bytes'] + pred['activation_bytes']) / gib:.2f} GiB; measured peak {peak / gib:.2f} GiB"
    )
    print(
        f"step {step_t * 1e3:.1f} ms (median of {len(times)}, spread {min(times) * 1e3:.1f}–{max(times) * 1e3:.1f}), "
        f"{n / step_t:.0f} tokens/s, dense-equivalent {flops / step_t / 1e12:.2f} TFLOP/s, matmul roof "
        f"{roof / 1e12:.2f} TFLOP/s, ×roof {flops / step_t / roof:.2f}"
    )


if __name__ == "__main__":
    main()
