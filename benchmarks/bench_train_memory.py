"""Peak memory of `saecli train` from a cache, for a cache N tokens long and one 10× longer.

PERFORMANCE.md: training from a cache must hold memory ∝ the shuffle buffer, never ∝ the cache, so the
two peaks (max RSS of the training process) should agree within 10 %. Both runs train on the same number
of tokens; only the cache they read from differs. The caches hold random activations (the reader does
not care where they came from).

    python benchmarks/bench_train_memory.py --tokens 100000 --train-tokens 1000000
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HOOK = "blocks.6.hook_resid_post"


def make_cache(folder: Path, n_tokens: int, d_model: int, chunk: int) -> None:
    from saecli.data.cache import write_cache

    gen = torch.Generator().manual_seed(0)

    def chunks():
        done = 0
        while done < n_tokens:
            n = min(chunk, n_tokens - done)
            yield {
                f"acts.{HOOK}": torch.randn(n, d_model, generator=gen),
                "tokens": torch.randint(3, 1000, (n,), generator=gen),
                "doc": torch.arange(done, done + n) // 256,
                "pos": torch.arange(done, done + n) % 256,
            }
            done += n

    write_cache(folder, chunks(), hook_points=[HOOK], chunk_tokens=chunk)


def train_peak_rss(cache: Path, out: Path, args) -> tuple[float, float]:
    """Run `saecli train` in a child process; return (max RSS in MiB, wall seconds)."""
    toml = out.with_suffix(".toml")
    toml.write_text(f"""
[run]
output_dir = "{out}"
[activations]
hook_points = ["{HOOK}"]
cache_dir = "{cache}"
source = "cache"
batch_size = {args.batch}
chunk_tokens = {args.chunk}
shuffle_buffer_tokens = {args.buffer}
[sae]
d_sae = {args.d_sae}
k = 32
[trainer]
total_training_tokens = {args.train_tokens}
log_frequency = 1000
n_checkpoints = 1
checkpoint_every_seconds = 0
[store]
backend = "none"
""")
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, "-m", "saecli", "-q", "train", str(toml)], check=True, env=env)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # this interpreter's only child
    return peak / 1024, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000, help="tokens in the small cache (the big one: 10×)")
    p.add_argument("--train-tokens", type=int, default=1_000_000)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--buffer", type=int, default=65536)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for name, n in (("small", args.tokens), ("big", 10 * args.tokens)):
            make_cache(tmp / f"cache-{name}", n, args.d_model, args.chunk)
        for name in ("small", "big"):
            results[name] = _isolated(tmp / f"cache-{name}", tmp / f"run-{name}", args)
        size = {
            n: sum(f.stat().st_size for f in (tmp / f"cache-{n}").rglob("*.safetensors")) / 2**20
            for n in ("small", "big")
        }
    for name in ("small", "big"):
        rss, wall = results[name]
        print(f"{name:5s} cache {size[name]:8.1f} MiB on disk: peak RSS {rss:7.1f} MiB, train {wall:6.1f} s")
    ratio = results["big"][0] / results["small"][0]
    print(f"peak RSS big / small = {ratio:.3f} (target: within 10 %, i.e. ≤ 1.10)")


def _isolated(cache: Path, out: Path, args) -> tuple[float, float]:
    """Measure one child in a fresh interpreter so RUSAGE_CHILDREN starts from zero."""
    code = (
        "import sys, json; sys.argv = ['x'] + sys.argv[1:];"
        "from benchmarks.bench_train_memory import train_peak_rss;"
        "import argparse; from pathlib import Path;"
        f"a = argparse.Namespace(**{vars(args)!r});"
        f"print(json.dumps(train_peak_rss(Path({str(cache)!r}), Path({str(out)!r}), a)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    import json

    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
