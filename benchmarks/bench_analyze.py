"""`saecli analyze` throughput vs a plain forward + encode of the same tokens (PERFORMANCE.md: ≥ 0.8×).

Variants on the same pre-tokenised context batches, repetitions interleaved, median and spread reported:
  reference  run_to_hooks(lm, tokens, [hook]) then dictionary.encode of every token (what any analysis
             must at least do)
  analyze    run_to_hooks, then FeatureAnalyzer.update (encode + masking + all per-feature bookkeeping:
             histogram, max, top/tier/non-activating context sets)
  book       FeatureBook.update alone on precomputed feature activations (the bookkeeping's own cost)

    python benchmarks/bench_analyze.py                          # SmolLM2 GGUF (else its random twin), CPU, 2 threads
    python benchmarks/bench_analyze.py --tiny                   # the tiny random llama, seconds
    python benchmarks/bench_analyze.py --random-init --device cuda --batch 32 --ctx 1024 --d-sae 16384
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_truncated_forward import GGUF, smollm2_random  # noqa: E402
from protocol import SMOLLM2_DIR, sync  # noqa: E402

from saecli.analysis.analyzer import FeatureAnalyzer  # noqa: E402
from saecli.config.analyze import AnalyzeConfig  # noqa: E402
from saecli.config.base import parse  # noqa: E402
from saecli.config.dictionary import DictionaryConfig  # noqa: E402
from saecli.config.model import ModelConfig  # noqa: E402
from saecli.data.batch import Batch  # noqa: E402
from saecli.dictionaries.registry import build_dictionary  # noqa: E402
from saecli.lm import load_model, run_to_hooks  # noqa: E402


def load(args):
    if args.tiny:
        from saecli.lm.tiny import make_tiny_model

        folder = make_tiny_model(Path(tempfile.gettempdir()) / "saecli-bench-tiny-llama", "llama")
        return load_model(ModelConfig(name=str(folder), device=args.device, dtype=args.dtype))
    gguf = Path(args.model_dir) / GGUF
    if not args.random_init and gguf.exists():
        return load_model(
            ModelConfig(
                name=args.model_dir, gguf_file=GGUF, device=args.device, dtype=args.dtype, bos_token="<|im_start|>"
            )
        )
    return smollm2_random(getattr(torch, args.dtype), args.device)


def context_batches(lm, n: int, batch: int, ctx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches of packed built-in text (tokens, mask), BOS first and masked, as `analyze` sees them."""
    from saecli.data.text import builtin_documents

    need = n * batch * (ctx - 1)
    ids: list[int] = []
    tok = lm.tokenizer
    for doc in builtin_documents():
        ids += tok(doc, add_special_tokens=False)["input_ids"] if tok is not None else [3 + (ord(c) % 400) for c in doc]
        if len(ids) >= need:
            break
    bos = lm.bos_token_id if lm.bos_token_id is not None else 0
    rows = torch.tensor(ids[:need]).view(n, batch, ctx - 1)
    tokens = torch.cat([torch.full((n, batch, 1), bos), rows], dim=2)
    return [(t, t != bos) for t in tokens]


def clone_times(feats: dict, blocks: list, device: torch.device) -> list[float]:
    """Time of the `.clone()` the book variant makes (update zeroes masked positions in place)."""
    out = []
    for b in blocks:
        sync(device)
        t0 = time.perf_counter()
        for f in feats[id(b)]:
            f.clone()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=SMOLLM2_DIR)
    p.add_argument("--random-init", action="store_true", help="SmolLM2's architecture with random weights")
    p.add_argument("--tiny", action="store_true", help="the tiny random llama (d_model 64)")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="contexts per forward")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batches", type=int, default=3, help="batches per timed block")
    p.add_argument("--d-sae", type=int, default=None, help="default 8 × d_model")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    lm = load(args)
    device = lm.device
    hook = f"blocks.{min(args.layer, lm.n_layers - 1)}.hook_resid_post"
    d_sae = args.d_sae or 8 * lm.d_model
    cfg = parse(
        DictionaryConfig,
        {
            "kind": "sae",
            "d_sae": d_sae,
            "activation": "topk",
            "k": args.k,
            "norm_activation": "none",
            "device": str(device),
        },
        key="sae",
    )
    torch.manual_seed(0)
    sae = build_dictionary(cfg, lm.d_model, [hook]).to(device).eval()
    acfg = AnalyzeConfig()
    # distinct text for every block (warm-up + reps), the same block for every variant within a rep
    all_batches = context_batches(lm, args.batches * (args.reps + 1), args.batch, args.ctx)
    blocks = [all_batches[i * args.batches : (i + 1) * args.batches] for i in range(args.reps + 1)]
    n_tokens = args.batches * args.batch * args.ctx

    @torch.no_grad()
    def reference(batches) -> None:
        for tokens, _ in batches:
            x = run_to_hooks(lm, tokens.to(device), [hook])[hook]
            sae.encode(sae.normalize({hook: x.reshape(-1, x.shape[-1])}))

    analyzer = FeatureAnalyzer(sae, acfg, args.ctx)

    def analyze(batches) -> None:
        for tokens, mask in batches:
            acts = run_to_hooks(lm, tokens.to(device), [hook])
            analyzer.update(Batch(acts, tokens, None, None, mask))

    # the bookkeeping alone, on its own FeatureBook fed the same blocks' precomputed features
    book_only = FeatureAnalyzer(sae, acfg, args.ctx)
    feats = {id(b): [book_only.encode(run_to_hooks(lm, t.to(device), [hook])) for t, _ in b] for b in blocks}

    def book(batches) -> None:
        for (tokens, mask), f in zip(batches, feats[id(batches)]):
            book_only.book.update(f.clone(), tokens.to(device), None, None, mask.to(device))

    variants = {"reference": reference, "analyze": analyze, "book": book}
    for fn in variants.values():  # warm-up (also starts filling the kept sets)
        fn(blocks[0])
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.reps):
        for name, fn in variants.items():
            sync(device)
            t0 = time.perf_counter()
            fn(blocks[rep + 1])
            sync(device)
            times[name].append(time.perf_counter() - t0)
    times["book"] = [t - c for t, c in zip(times["book"], clone_times(feats, blocks[1:], device))]

    print(
        f"model {lm.name} ({lm.family}, {lm.d_model}d) on {device}, {args.dtype}, threads {args.threads}; "
        f"hook {hook}; SAE d_sae {d_sae} topk k={args.k}"
    )
    print(
        f"{args.batches} batches × {args.batch} contexts × {args.ctx} tokens = {n_tokens:,} tokens per block; "
        f"kept contexts per feature: {sum(s.spec.n for s in analyzer.book.sets)} "
        f"({analyzer.book.memory_bytes() / 2**20:.0f} MiB)"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, ts in times.items():
        print(
            f"  {name:10s} {n_tokens / med[name]:>10,.0f} tokens/s   median {med[name] * 1e3:8.1f} ms   "
            f"spread {min(ts) * 1e3:.1f}–{max(ts) * 1e3:.1f} ms"
        )
    print(
        f"analyze / reference = {med['reference'] / med['analyze']:.3f}×  (target ≥ 0.8); "
        f"bookkeeping alone = {med['book'] / med['reference']:.1%} of the reference time"
    )


if __name__ == "__main__":
    main()
