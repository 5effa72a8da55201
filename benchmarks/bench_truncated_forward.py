"""Truncated forward vs full forward on SmolLM2-135M (PERFORMANCE.md: speed-up ≈ n_layers / (hook layer + 1)).

Three variants on the same batch, repetitions interleaved, median reported:
  full       the CausalLM forward (all layers + final norm + unembedding → logits)
  decoder    all layers + final norm, no unembedding (the fair base for the ideal ratio)
  truncated  run_to_hooks(lm, ids, ["blocks.{L}.hook_resid_post"]) — stops after block L

    python benchmarks/bench_truncated_forward.py                       # SmolLM2 GGUF, CPU, 2 threads
    python benchmarks/bench_truncated_forward.py --random-init --device cuda --dtype bfloat16 --batch 32 --ctx 1024
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from protocol import SMOLLM2_DIR
from protocol import SMOLLM2_GGUF as GGUF

from saecli.config.model import ModelConfig
from saecli.lm import load_model, run_to_hooks, wrap_model


def smollm2_random(dtype: torch.dtype, device: str):
    """SmolLM2-135M's architecture with random weights: same cost, no file needed (for machines without it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return wrap_model(model, name="SmolLM2-135M (random init)", bos_token_id=1)


def python_docs_batch(lm, batch: int, ctx: int) -> torch.Tensor:
    """batch × ctx tokens of the built-in Python docs, each row starting with BOS."""
    import pydoc_data.topics as topics

    text = "\n\n".join(v for _, v in sorted(topics.topics.items()))
    ids = lm.tokenizer(text[: 40 * batch * ctx], add_special_tokens=False)["input_ids"]
    need = batch * (ctx - 1)
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} tokens of text; lower --batch or --ctx")
    rows = torch.tensor(ids[:need]).view(batch, ctx - 1)
    return torch.cat([torch.full((batch, 1), lm.bos_token_id or 0), rows], dim=1)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=SMOLLM2_DIR)
    p.add_argument("--random-init", action="store_true", help="SmolLM2's architecture with random weights (no file)")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--inner", type=int, default=1, help="forwards per timed block")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.random_init:
        lm = smollm2_random(getattr(torch, args.dtype), args.device)
        ids = torch.randint(3, lm.vocab_size, (args.batch, args.ctx), generator=torch.Generator().manual_seed(0))
    else:
        if not (Path(args.model_dir) / GGUF).is_file():
            raise SystemExit(f"{Path(args.model_dir) / GGUF} not found; pass --model-dir or --random-init")
        lm = load_model(ModelConfig(name=args.model_dir, gguf_file=GGUF, dtype=args.dtype, device=args.device))
        ids = python_docs_batch(lm, args.batch, args.ctx)
    ids = ids.to(lm.device)
    hook = f"blocks.{args.layer}.hook_resid_post"
    print(
        f"{lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, {lm.device} {lm.dtype}, {torch.get_num_threads()} "
        f"threads; batch {args.batch}×{args.ctx}; hook {hook}; loaded in {time.perf_counter() - t0:.1f}s"
    )

    decoder = lm.model.base_model

    @torch.no_grad()
    def full():
        for _ in range(args.inner):
            lm.model(input_ids=ids, use_cache=False)

    @torch.no_grad()
    def base():
        for _ in range(args.inner):
            decoder(input_ids=ids, use_cache=False)

    def truncated():
        for _ in range(args.inner):
            run_to_hooks(lm, ids, [hook])

    variants = {"full": full, "decoder": base, "truncated": truncated}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.reps):  # interleaved
        for name, fn in variants.items():
            times[name].append(timed(fn, lm.device) / args.inner)

    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.ctx
    for k, v in times.items():
        print(
            f"  {k:9s} median {med[k] * 1e3:9.1f} ms  ({tokens / med[k]:,.0f} tokens/s; reps "
            + ", ".join(f"{x * 1e3:.1f}" for x in v)
            + " ms)"
        )
    ideal = lm.n_layers / (args.layer + 1)
    print(f"speed-up truncated vs full:    {med['full'] / med['truncated']:.2f}×")
    print(
        f"speed-up truncated vs decoder: {med['decoder'] / med['truncated']:.2f}×   "
        f"(ideal n_layers/(L+1) = {lm.n_layers}/{args.layer + 1} = {ideal:.2f}×; "
        f"ratio to ideal {med['decoder'] / med['truncated'] / ideal:.2f})"
    )


if __name__ == "__main__":
    main()
