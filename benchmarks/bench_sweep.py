"""Sweep benchmark: an 8-member group (same shape, lr and k differ) against 8 sequential `train` runs.

Reference measured in the same run: the 8 members trained one after the other with
`saecli.runs.train` (what 8 `saecli train` commands do; the model is loaded once for the whole
benchmark unless --reload-model). Compared with it:

    loop      one `run_sweep`: one stream, each batch read or computed once and fed to 8 Members, each
              taking its own step (what saev does; a stacked [8, ...] variant was removed with
              saecli/sweep/stacked.py until a GPU measurement shows stacking paying ≥ 1.3×)

on the activation cache (written first by `generate`, not timed) and on the live model. Printed: wall
time, tokens/s summed over members, and the ratio to sequential (target ≤ 0.35 live, see
shared/PERFORMANCE.md). Repetitions are interleaved (sequential, loop per rep); medians shown.

    python benchmarks/bench_sweep.py                                  # tiny random llama, CPU
    python benchmarks/bench_sweep.py --model smollm2                  # models/smollm2 GGUF, layer 12
    python benchmarks/bench_sweep.py --model smollm2 --batch 1024 --tokens 2048 --init-batches 1   # brief, CPU
    python benchmarks/bench_sweep.py --model smollm2-shape --device cuda   # random llama of SmolLM2's shape
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # d_sae, k values, batch, tokens per member, hook
    "tiny": dict(d_sae=512, ks=(16, 32), batch=1024, tokens=65_536, hook="blocks.2.hook_resid_post", context=128),
    "smollm2": dict(d_sae=4608, ks=(32, 64), batch=4096, tokens=32_768, hook="blocks.12.hook_resid_post", context=256),
    "smollm2-shape": dict(
        d_sae=4608, ks=(32, 64), batch=4096, tokens=1_048_576, hook="blocks.12.hook_resid_post", context=256
    ),
}
LRS = (2e-4, 4e-4, 8e-4, 1.6e-3)


def model_section(kind: str, root: Path, device: str) -> dict:
    if kind == "smollm2":
        folder = REPO / "models" / "smollm2"
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not (folder / gguf).exists():
            sys.exit(f"{folder / gguf} not found (use --model tiny or smollm2-shape)")
        return {"name": str(folder), "gguf_file": gguf, "bos_token": "<|im_start|>", "device": device}
    from saecli.lm.tiny import make_tiny_model

    if kind == "tiny":
        path = make_tiny_model(root / "tiny-model", "llama")
    else:  # SmolLM2-135M's width and depth with random weights (8 heads so that the KV heads divide them)
        path = make_tiny_model(root / "smollm2-shape", "llama", d_model=576, n_layers=30, n_heads=8)
    return {"name": str(path), "device": device}


def base_experiment(args: argparse.Namespace, model: dict, root: Path) -> dict:
    size = dict(SIZES[args.model])
    if args.batch:
        size["batch"] = args.batch
    return {
        "run": {"name": "bench", "output_dir": str(root / "out"), "seed": 0},
        "model": model,
        "dataset": {"path": "builtin:python-docs"},
        "activations": {
            "hook_points": [size["hook"]],
            "context_size": size["context"],
            "model_batch_size": max(1, min(16, size["batch"] // size["context"])),
            "batch_size": size["batch"],
            "total_tokens": args.tokens or size["tokens"],
            "shuffle_buffer_tokens": 4 * size["batch"],
            "chunk_tokens": 4 * size["batch"],
            "cache_dir": str(root / "cache"),
        },
        "sae": {"activation": "topk", "d_sae": size["d_sae"], "k": size["ks"][0]},
        "init": {"init_batches": args.init_batches},
        "trainer": {
            "total_training_tokens": args.tokens or size["tokens"],
            "lr": LRS[0],
            "log_frequency": 10,
            "n_checkpoints": 1,
            "checkpoint_every_seconds": 0,
        },
        "store": {"backend": "none"},
    }


def sweep_grid(args: argparse.Namespace) -> dict:
    return {"grid": {"trainer.lr": list(LRS), "sae.k": list(SIZES[args.model]["ks"])}}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_sequential(base: dict, sweep: dict, source: str, out: Path, device: str) -> tuple[float, float]:
    from saecli.config.base import parse
    from saecli.config.sweep import SweepConfig
    from saecli.runs import train
    from saecli.sweep.grid import plan_from_dict

    plan = plan_from_dict(with_source(base, source, out), parse(SweepConfig, sweep, key="sweep"))
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for m in plan.members:
        train(m.exp)
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def run_group(base: dict, sweep: dict, source: str, out: Path, device: str) -> tuple[float, float]:
    from saecli.config.base import parse
    from saecli.config.sweep import SweepConfig
    from saecli.runs import run_sweep
    from saecli.sweep.grid import plan_from_dict
    from saecli.training.distributed import LocalSync

    plan = plan_from_dict(with_source(base, source, out), parse(SweepConfig, sweep, key="sweep"))
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    run_sweep(plan, sync=LocalSync())
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def with_source(base: dict, source: str, out: Path) -> dict:
    exp = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    exp["activations"] = {**base["activations"], "source": source}
    exp["run"] = {**base["run"], "output_dir": str(out)}
    return exp


def generate_cache(base: dict, root: Path) -> None:
    import tomli_w

    from saecli.commands.generate import generate

    path = root / "generate.toml"
    path.write_text(tomli_w.dumps({k: v for k, v in base.items() if k in ("model", "dataset", "activations")}))
    generate(path, [])


def reuse_loaded_models() -> None:
    """Load each model once for the whole benchmark: the timings compare training loops on one stream,
    not model loading (which a sweep also saves, once per member; --reload-model keeps it in)."""
    import saecli.lm as lm_module

    original, cache = lm_module.load_model, {}

    def load_model(cfg):
        key = repr(cfg)
        if key not in cache:
            cache[key] = original(cfg)
        return cache[key]

    lm_module.load_model = load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=0, help="tokens per member (default: per model)")
    parser.add_argument("--batch", type=int, default=0, help="tokens per batch (default: per model)")
    parser.add_argument("--init-batches", type=int, default=4, help="init.init_batches")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--sources", default="cache,live")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument(
        "--reload-model",
        action="store_true",
        help="every run loads the model (as separate `saecli train` processes would); default: loaded once",
    )
    args = parser.parse_args()
    if not args.reload_model:
        reuse_loaded_models()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from saecli import ui

    ui.set_verbosity(quiet=True)
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        model = model_section(args.model, root, args.device)
        base = base_experiment(args, model, root)
        sweep = sweep_grid(args)
        sources = [s.strip() for s in args.sources.split(",") if s.strip()]
        if "cache" in sources:
            generate_cache(base, root)
        # warm-up (imports, kernels, allocator): one short run of each path, not timed
        warm = {**base, "trainer": {**base["trainer"], "total_training_tokens": base["activations"]["batch_size"]}}
        for source in sources:
            run_group(
                warm, {"grid": {"sae.k": list(SIZES[args.model]["ks"])}}, source, root / "warm" / source, args.device
            )
            run_sequential(
                warm,
                {"grid": {"sae.k": list(SIZES[args.model]["ks"])[:1]}},
                source,
                root / "warm-seq" / source,
                args.device,
            )
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for rep in range(args.reps):  # interleaved: every variant of every source in each rep
            for source in sources:
                for variant in ("sequential", "loop"):
                    out = root / f"{source}-{variant}-{rep}"
                    if variant == "sequential":
                        t = run_sequential(base, sweep, source, out, args.device)
                    else:
                        t = run_group(base, sweep, source, out, args.device)
                    times.setdefault((source, variant), []).append(t)
                    shutil.rmtree(out, ignore_errors=True)
        n_members = len(LRS) * len(SIZES[args.model]["ks"])
        tokens = base["trainer"]["total_training_tokens"]
        dev = (
            torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else f"cpu ({torch.get_num_threads()} threads)"
        )
        size = {**SIZES[args.model], **({"batch": args.batch} if args.batch else {})}
        print(
            f"\nsweep benchmark: {n_members} TopK SAEs (d_sae {size['d_sae']}, k {size['ks']}, lr {LRS}) on "
            f"{args.model} {size['hook']}, batch {size['batch']}, {tokens:,} tokens each, {dev}, "
            f"{args.reps} rep(s), model {'loaded per run' if args.reload_model else 'loaded once'}"
        )
        print(
            f"{'source':8} {'variant':11} {'wall s':>8} {'member-tok/s':>13} {'wall ×seq':>10} {'spread':>7} "
            f"{'cpu s':>8} {'cpu ×seq':>9}"
        )
        for source in sources:
            ref_wall = statistics.median(w for w, _ in times[(source, "sequential")])
            ref_cpu = statistics.median(c for _, c in times[(source, "sequential")])
            for variant in ("sequential", "loop"):
                walls = [w for w, _ in times[(source, variant)]]
                wall, cpu = statistics.median(walls), statistics.median(c for _, c in times[(source, variant)])
                spread = (max(walls) - min(walls)) / wall if len(walls) > 1 else 0.0
                print(
                    f"{source:8} {variant:11} {wall:8.2f} {n_members * tokens / wall:13,.0f} {wall / ref_wall:10.3f} "
                    f"{spread:7.1%} {cpu:8.2f} {cpu / ref_cpu:9.3f}"
                )
        if "live" in sources:
            ratio = statistics.median(w for w, _ in times[("live", "loop")]) / statistics.median(
                w for w, _ in times[("live", "sequential")]
            )
            print(f"live loop / sequential (wall) = {ratio:.3f} (target <= 0.35)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
