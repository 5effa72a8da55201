"""`generate` tokens/s next to the bare truncated forward of the same model on the same batches.

Target (PERFORMANCE.md): generate ≥ 0.85× the bare forward. Both count the kept tokens of the same
pre-packed contexts; generate is timed end to end (tokenising, forward, selection, dtype cast, norm
sums, background writes, manifest) from an empty cache folder until its last chunk is on disk. A
third line runs generate with the model replaced by a no-op: the ceiling of everything around the
model (on a GPU, if it is not well above the bare forward, the text or the disk is the bottleneck).

    python benchmarks/bench_generate.py                       # SmolLM2, blocks.6.hook_resid_post, CPU
    python benchmarks/bench_generate.py --device cuda --batches 64 --model-batch 32
    python benchmarks/bench_generate.py --model-dir some/transformers/folder --gguf ''
    SAECLI_SMOLLM2_DIR=/path/to/smollm2 python benchmarks/bench_generate.py
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from protocol import SMOLLM2_DIR
from protocol import SMOLLM2_GGUF as GGUF


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=SMOLLM2_DIR)
    ap.add_argument("--gguf", default=GGUF, help="GGUF file in --model-dir ('' for a transformers folder)")
    ap.add_argument("--hook", default="blocks.6.hook_resid_post")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--model-batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=16, help="model batches per timed run")
    ap.add_argument("--chunk-tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from saecli.config.load import experiment_from_dict
    from saecli.data.cache import generate_shard
    from saecli.data.text import iter_documents
    from saecli.data.tokens import packer_for
    from saecli.lm import load_model, run_to_hooks

    folder = Path(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    exp = experiment_from_dict(
        {
            "model": {
                "name": str(folder),
                "device": args.device,
                "dtype": args.dtype,
                **({"gguf_file": args.gguf} if args.gguf else {}),
            },
            "activations": {
                "hook_points": [args.hook],
                "context_size": args.context,
                "model_batch_size": args.model_batch,
                "chunk_tokens": args.chunk_tokens,
                "cache_dir": str(work / "cache"),
            },
        }
    )
    lm = load_model(exp.model)
    packer = packer_for(lm, exp.activations, exp.model)
    batches = []
    for ctx in packer.contexts(iter_documents(exp.dataset), args.model_batch):
        batches.append(ctx)
        if len(batches) == args.batches:
            break
    kept = sum(int(c.mask.sum()) for c in batches)
    exp.activations.total_tokens = kept
    inputs = [c.tokens.to(lm.device) for c in batches]
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    for x in inputs[:2]:  # warm-up
        run_to_hooks(lm, x, [args.hook])

    # the same generate with the model replaced by a no-op: how fast everything around the model can go
    blank = torch.zeros(args.model_batch, args.context, lm.d_model, device=lm.device, dtype=lm.dtype)

    def no_model(lm_, ids, hooks):
        return {h: blank[: ids.shape[0]] for h in hooks}

    bare, gen, ceiling = [], [], []
    try:
        for _ in range(args.reps):  # interleaved: bare, then generate, then the no-op model, per rep
            sync()
            t = time.perf_counter()
            for x in inputs:
                run_to_hooks(lm, x, [args.hook])
            sync()
            bare.append(kept / (time.perf_counter() - t))

            shutil.rmtree(work / "cache", ignore_errors=True)
            t = time.perf_counter()
            m = generate_shard(exp, lm, run_to_hooks, 0, 1)
            gen.append(kept / (time.perf_counter() - t))
            assert m["total_tokens"] == kept and m["complete"]

            shutil.rmtree(work / "cache", ignore_errors=True)
            t = time.perf_counter()
            generate_shard(exp, lm, no_model, 0, 1)
            ceiling.append(kept / (time.perf_counter() - t))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def fmt(rates: list[float]) -> str:
        return f"{statistics.median(rates):10.0f} tokens/s (spread {min(rates):.0f}–{max(rates):.0f})"

    ratios = [g / b for g, b in zip(gen, bare)]
    print(
        f"model {folder.name}/{args.gguf} on {torch.cuda.get_device_name() if lm.device.type == 'cuda' else 'cpu'} ({args.dtype}, {torch.get_num_threads()} threads), hook {args.hook}, "
        f"{args.batches} batches of {args.model_batch}×{args.context} ({kept} kept tokens), {args.reps} reps"
    )
    print(f"bare truncated forward  {fmt(bare)}")
    print(f"generate                {fmt(gen)}")
    print(f"generate, no-op model   {fmt(ceiling)}  (text, packing, selection and writes alone)")
    print(
        f"generate / bare         {statistics.median(ratios):.3f}×  (per rep: {', '.join(f'{r:.3f}' for r in ratios)}; "
        f"target ≥ 0.85×)"
    )


if __name__ == "__main__":
    main()
