"""Cache reader tokens/s next to a trainer's consumption rate, measured in the same run.

Target (PERFORMANCE.md): reading ≥ 5× what the trainer consumes, so reading is never the bottleneck.
The reader goes through a synthetic cache (d_model 576, float32) written to a temporary folder, with
the default-sized shuffle window; the trainer reference is a plain-PyTorch TopK SAE step (d_sae 4608,
k 32, batch 4096, autograd, Adam) as in PERFORMANCE.md's protocol. The cache was just written, so it is
read from the page cache: this measures the reader itself, not the disk.

    python benchmarks/bench_reader.py
    python benchmarks/bench_reader.py --chunks 16 --chunk-tokens 65536
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def trainer_step_rate(d: int, d_sae: int, k: int, batch: int, steps: int, warmup: int = 3) -> float:
    """Tokens/s of a plain TopK SAE training step (the consumer the reader must outpace)."""
    gen = torch.Generator().manual_seed(0)
    w_enc = (torch.randn(d, d_sae, generator=gen) / d**0.5).requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    w_dec = (torch.randn(d_sae, d, generator=gen) / d_sae**0.5).requires_grad_()
    b_dec = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-4)
    xs = [torch.randn(batch, d, generator=gen) for _ in range(2)]
    t = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        x = xs[i % 2]
        pre = x @ w_enc + b_enc
        top = pre.topk(k, dim=1)
        acts = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        loss = ((acts @ w_dec + b_dec - x) ** 2).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, default=32768)
    ap.add_argument("--buffer-tokens", type=int, default=262144)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from saecli.data.cache import write_cache
    from saecli.data.reader import CacheStream

    hook = "blocks.6.hook_resid_post"
    work = Path(tempfile.mkdtemp(prefix="bench-reader-"))
    n = args.chunk_tokens

    def chunks():
        gen = torch.Generator().manual_seed(0)
        for c in range(args.chunks):
            ids = torch.arange(c * n, (c + 1) * n)
            yield {
                f"acts.{hook}": torch.randn(n, args.d_model, generator=gen),
                "tokens": ids % 49152,
                "doc": ids // 1000,
                "pos": ids % 1000,
            }

    try:
        write_cache(work / "cache", chunks(), hook_points=[hook], chunk_tokens=n)
        total = args.chunks * n
        reader, shuffled_off, trainer = [], [], []
        for rep in range(args.reps):
            for shuffle, out in ((True, reader), (False, shuffled_off)):
                stream = CacheStream(
                    work / "cache",
                    batch_size=args.batch,
                    buffer_tokens=args.buffer_tokens,
                    shuffle=shuffle,
                    seed=rep,
                    epochs=1,
                )
                t = time.perf_counter()
                got = sum(b.acts[hook].shape[0] for b in stream)
                out.append(got / (time.perf_counter() - t))
                stream.close()
                assert got == total
            trainer.append(trainer_step_rate(args.d_model, 8 * args.d_model, 32, args.batch, args.steps))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def fmt(rates: list[float]) -> str:
        return f"{statistics.median(rates):12.0f} tokens/s (spread {min(rates):.0f}–{max(rates):.0f})"

    size = total * args.d_model * 4 / 2**20
    print(
        f"cache {args.chunks} chunks × {n} tokens × d {args.d_model} float32 ({size:.0f} MiB), "
        f"window {args.buffer_tokens} tokens, batch {args.batch}, {torch.get_num_threads()} threads, {args.reps} reps"
    )
    print(f"reader, shuffled          {fmt(reader)}")
    print(f"reader, in order          {fmt(shuffled_off)}")
    print(f"plain TopK SAE train step {fmt(trainer)}  (d_sae {8 * args.d_model}, k 32)")
    ratio = statistics.median(reader) / statistics.median(trainer)
    print(f"reader / trainer          {ratio:.1f}×  (target ≥ 5×)")


if __name__ == "__main__":
    main()
