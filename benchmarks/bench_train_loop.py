"""What the training loop costs on top of the dictionary's own step (shared/PERFORMANCE.md protocol).

Workload: TopK SAE, batch 4096 tokens, d_model 576, d_sae 4608, k 32, float32, fused Adam, a few
pre-generated batches cycled, `torch.set_num_threads(2)`. Variants, repetitions interleaved:
  bare    the dictionary alone: loss, backward, Adam step, zero_grad (what bench_train_step.py times)
  member  `Member.feed`: the same plus schedules, LambdaLR, dead-latent counters, metric sums, NaN flag
  fit     `fit` over an in-memory stream: the same plus batch hand-off, reporter and checkpoint checks
Printed: tokens/s, ×roof (R = median GFLOP/s of the protocol's matmul sampled before every block) and
the ratio of each variant to `bare` measured in the same run (target: ≥ 0.95, i.e. < 5 % overhead).
Logging (one sync every `log_frequency` steps) is left out of the timed blocks.

    python benchmarks/bench_train_loop.py               # CPU (≈ 2 min)
    python benchmarks/bench_train_loop.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from protocol import roofline, sync

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.config.trainer import TrainerConfig
from saecli.data.batch import Batch
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.registry import build_dictionary
from saecli.training import Member, fit
from saecli.training.member import make_optimizer

HOOK = "x"


class Cycle:
    """An in-memory stream cycling a few batches (no data loading in the timing)."""

    def __init__(self, batches: list[Batch]):
        self.batches, self.i = batches, 0
        self.hook_points, self.d_model, self.mean_norms, self.contexts = [HOOK], {HOOK: 0}, None, False

    def __iter__(self):
        while True:
            yield self.batches[self.i % len(self.batches)]
            self.i += 1

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, d, s, k = 4096, 576, 4608, 32
    cfg = parse(DictionaryConfig, {"d_sae": s, "k": k, "activation": "topk", "norm_activation": "none"})
    tcfg = parse(
        TrainerConfig,
        {
            "total_training_tokens": n * 10**6,
            "lr": 1e-4,
            "log_frequency": 10**6,
            "n_checkpoints": 0,
            "checkpoint_every_seconds": 0,
            "lr_warm_up_steps": 0,
        },
    )
    batches = [
        Batch({HOOK: torch.randn(n, d, device=device)}, torch.zeros(n, dtype=torch.long, device=device))
        for _ in range(4)
    ]

    torch.manual_seed(0)
    bare_sae = build_dictionary(cfg, d, [HOOK]).to(device)
    opt = make_optimizer(bare_sae, tcfg)
    ctx = StepContext(
        k=k,
        auxk_coefficient=tcfg.auxk_coefficient,
        k_aux=d // 2,
        dead_mask=torch.zeros(s, dtype=torch.bool, device=device),
    )
    state = {"i": 0}

    def bare_step() -> None:
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        out = bare_sae({HOOK: b.acts[HOOK]}, ctx)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    member = Member(build_dictionary(cfg, d, [HOOK]).to(device), tcfg, total_steps=10**6, batch_tokens=n)

    def member_step() -> None:
        member.feed(batches[member.step % len(batches)])

    torch.manual_seed(0)
    fit_member = Member(build_dictionary(cfg, d, [HOOK]).to(device), tcfg, total_steps=10**6, batch_tokens=n)
    stream = Cycle(batches)

    def fit_block(steps: int) -> None:
        fit_member.total_steps = fit_member.step + steps  # stop after `steps` more steps
        fit_member.status = "running"
        fit(stream, [fit_member], handle_signals=False)

    def timed(fn_block) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn_block()
        sync(device)
        return time.perf_counter() - t0

    variants = {
        "bare": lambda m: [bare_step() for _ in range(m)],
        "member": lambda m: [member_step() for _ in range(m)],
        "fit": fit_block,
    }
    for fn in variants.values():
        fn(args.warmup)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    roofs = []
    for _ in range(args.reps):
        for name, fn in variants.items():
            roofs.append(roofline(n, d, s, device))
            dt = timed(lambda: fn(args.steps))  # noqa: B023 (timed() calls it at once)
            rates[name].append(args.steps * n / dt)
    R = statistics.median(roofs)
    roof_rate = R * 1e9 / (6 * d * s)
    print(f"device {device}, threads {args.threads}, roofline R = {R:.1f} GFLOP/s → roof rate {roof_rate:,.0f} tok/s")
    print(f"path taken by the dictionary: {getattr(member.dictionary, 'last_path', '?')}")
    base = statistics.median(rates["bare"])
    for name, r in rates.items():
        med = statistics.median(r)
        print(
            f"{name:7s} {med:10,.0f} tok/s  ×roof {med / roof_rate:.2f}  vs bare {med / base:.3f}  "
            f"(spread {min(r) / base:.3f}–{max(r) / base:.3f})"
        )


if __name__ == "__main__":
    main()
