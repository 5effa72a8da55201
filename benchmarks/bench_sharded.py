"""Tensor-parallel train step (latents split over 2 ranks) vs the unsharded step, and its communication.

Workload: a TopK SAE (d_model 576, d_sae 4608 by default, k 32), batch 1024 tokens, Adam, AuxK on
(half the latents marked dead, so the AuxK top-k and its reduction run every step). Variants:
  unsharded   today's Member in one process (its default sparse-kernel path), `--threads` threads
  dense-1     the same dictionary through the dense reference path (the maths the sharded step runs)
  tp2         ShardedMember on a ("dp", "tp") = (1, 2) gloo mesh, two processes × `--threads` threads
For tp2 the time inside collectives is measured by timing every call of the tensor-parallel
communication points (LatentShard.all_gather / reduce: the candidates' all-gather, the decoder and
penalty reductions, the firing-count gather); gloo collectives on CPU return when done, so their
wall time is their cost (including waiting for the slower rank). Reported: median step time (ms),
tokens/s, comm / step, and the CPU time one rank spends per step (the work each rank does: on a machine
busier than its cores, the wall times of 2 processes are inflated, their CPU times are not).

    flock /tmp/saecli-bench.lock nice -n 10 python benchmarks/bench_sharded.py
    python benchmarks/bench_sharded.py --d-sae 16384 --steps 20 --threads 1

Measured here (2 shared cores, load average 3.3, defaults): unsharded 185 ms/step (sparse kernels),
dense-1 427 ms, tp2 283 ms wall with 48.5 ms in collectives (17 % of the step) and 188 ms of CPU per
rank. --d-sae 16384 --steps 5 (load 4.7): unsharded 953 ms (475 ms CPU), dense-1 2718 ms, tp2 1602 ms
wall, 110 ms in collectives (6.9 %), 477 ms CPU per rank. The CPU per rank does not halve here: the
selection's gather, building the CSR patterns and gloo (whose waits for the slower rank of an
oversubscribed machine count as CPU time) offset the halved matmuls, so on this CPU tensor parallelism
buys memory (each rank half the latent bytes), not speed; a GPU run is still to be measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saecli.config.base import parse  # noqa: E402
from saecli.config.dictionary import DictionaryConfig  # noqa: E402
from saecli.config.trainer import TrainerConfig  # noqa: E402
from saecli.data.batch import Batch  # noqa: E402
from saecli.dictionaries.registry import build_dictionary  # noqa: E402
from saecli.training.member import Member  # noqa: E402

HOOK = "blocks.0.hook_resid_pre"


def build(args: argparse.Namespace, sparse: bool = True):
    torch.manual_seed(0)
    cfg = parse(
        DictionaryConfig,
        {"d_sae": args.d_sae, "k": args.k, "norm_activation": "none", "sparse_kernels": sparse},
        key="sae",
    )
    return build_dictionary(cfg, args.d_model, [HOOK])


def trainer(args: argparse.Namespace) -> TrainerConfig:
    return parse(
        TrainerConfig,
        {
            "total_training_tokens": args.tokens * 10_000,
            "lr": 1e-3,
            "lr_warm_up_steps": 0,
            "n_checkpoints": 0,
            "checkpoint_every_seconds": 0,
            "log_frequency": 10_000,
        },
    )


def batches(args: argparse.Namespace) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [
        Batch(
            acts={HOOK: torch.randn(args.tokens, args.d_model, generator=g)},
            tokens=torch.zeros(args.tokens, dtype=torch.long),
        )
        for _ in range(4)
    ]


def half_dead(member: Member) -> None:
    """Every other latent counted dead (AuxK runs on them each step)."""
    member.stats.since_fired[::2] = 10**9


def timed(member: Member, data: list[Batch], steps: int, comm: list[float] | None = None) -> tuple[float, float, float]:
    """(median step seconds, median communication seconds per step, median CPU seconds per step of this
    process — the work a rank does, which a busy shared machine does not inflate as it does wall time)."""
    for b in data[:2]:  # warm-up
        member.feed(b)
    times, comms, cpus = [], [], []
    for i in range(steps):
        half_dead(member)
        if comm is not None:
            comm.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        member.feed(data[i % len(data)])
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        comms.append(sum(comm) if comm is not None else 0.0)
    return statistics.median(times), statistics.median(comms), statistics.median(cpus)


def worker(rank: int, world: int, store: str, out: str, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from saecli.dictionaries.sharding import LatentShard
    from saecli.training.tensor_parallel import ShardedMember, make_mesh, shard_dictionary

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = make_mesh(world)
    comm: list[float] = []
    for name in ("all_gather", "reduce"):  # time every tensor-parallel collective
        original = getattr(LatentShard, name)

        def wrapped(self, t, _f=original):
            t0 = time.perf_counter()
            try:
                return _f(self, t)
            finally:
                comm.append(time.perf_counter() - t0)

        setattr(LatentShard, name, wrapped)
    d = shard_dictionary(build(args), mesh)
    m = ShardedMember(d, trainer(args), mesh=mesh, total_steps=10_000, batch_tokens=args.tokens)
    step, c, cpu = timed(m, batches(args), args.steps, comm)
    if rank == 0:
        Path(out).write_text(f"{step} {c} {cpu}")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, sparse in (("unsharded", True), ("dense-1", False)):
        m = Member(build(args, sparse), trainer(args), total_steps=10_000, batch_tokens=args.tokens)
        step, _, cpu = timed(m, batches(args), args.steps)
        rows.append((name, 1, step, 0.0, cpu))
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tp2.txt")
        mp.start_processes(worker, args=(2, os.path.join(tmp, "store"), out, args), nprocs=2, start_method="spawn")
        step, comm, cpu = map(float, Path(out).read_text().split())
    rows.append(("tp2", 2, step, comm, cpu))
    print(
        f"d_model {args.d_model} · d_sae {args.d_sae} · k {args.k} · {args.tokens} tokens/step · "
        f"{args.threads} thread(s)/process · median of {args.steps} steps"
    )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times suffer when it exceeds them)")
    print(
        f"{'variant':<10} {'procs':>5} {'step ms':>8} {'tok/s':>9} {'comm ms':>8} {'comm/step':>9} {'cpu ms/rank':>11}"
    )
    for name, procs, step, comm, cpu in rows:
        print(
            f"{name:<10} {procs:>5} {step * 1e3:>8.1f} {args.tokens / step:>9.0f} {comm * 1e3:>8.1f} "
            f"{comm / step:>9.1%} {cpu * 1e3:>11.1f}"
        )


if __name__ == "__main__":
    main()
