"""SAE train-step throughput as ×roof (shared/PERFORMANCE.md common protocol).

Workload: batch 4096 tokens, d_model 576, d_sae 4608, k 32, Adam (fused), a few pre-generated batches
cycled; gradients set to None between steps as the trainer does. Variants, repetitions interleaved
(outer loop over reps, inner over variants), each block timed after a roofline sample:
  topk            saecli's SparseAutoEncoder, activation = topk      (path: topk-sparse)
  topk-plain      a plain-PyTorch autograd TopK SAE step (reference)
  relu-fresh      saecli ReLU-L1 at init (about half the latents fire: the dense regime)
  relu-trained    saecli ReLU-L1 with the encoder bias set so ≈64 latents fire per token
  relu-plain      a plain-PyTorch autograd ReLU-L1 SAE step (reference for both ReLU rows;
                  the dense step's cost does not depend on how many latents fire)
  <saecli variant>-torch   the same step on the pure-torch reference backend (no compiled CPU
                  kernels, no Triton; topk-torch is in the default set)
  sparsify        EleutherAI sparsify's SparseCoder step (eai-sparsify: its fused encoder, its Triton
                  decoder on CUDA) on the same batches, same initial weights, fused Adam, unit-norm
                  decoder as its trainer keeps it (note: its forward always autocasts to bf16 on CUDA)
The path column says which backend ran the sparse products (kernels.backend_for): "+native" = the
compiled CPU kernels, "+triton" = the Triton kernels on CUDA, "+torch" = the pure-torch reference.
On CUDA both rooflines are sampled before every block (float32 and bfloat16 matmul) and both ×roof
columns are printed; the target at the real size is ≥ 1.5 × the bf16 roof.
faults/step = minor page faults of the process per timed step (fresh large buffers cost page faults).

×roof = tokens/s ÷ (R / (6·d_model·d_sae)), R = median GFLOP/s of torch.matmul(4096×576 @ 576×4608,
out=c) sampled right before every timed block.

    python benchmarks/bench_train_step.py                  # CPU, 2 threads, float32 (≈ 3 min)
    python benchmarks/bench_train_step.py --reps 3 --steps 10 --variants topk,topk-torch,topk-plain
    python benchmarks/bench_train_step.py --profile topk   # + where one variant's step time goes
    python benchmarks/bench_train_step.py --device cuda --check            # + gradient check on the GPU
    python benchmarks/bench_train_step.py --device cuda --amp              # autocast bf16 (roofline in bf16)
    python benchmarks/bench_train_step.py --device cuda --variants topk,topk-torch,sparsify \
        --batch 8192 --d-model 2048 --d-sae 65536 --k 64      # the real size (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import Callable

import torch
from protocol import roofline, sync

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries import kernels, native
from saecli.dictionaries.base import StepContext
from saecli.dictionaries.sae import SparseAutoEncoder

HOOK = "x"


# ------------------------------------------------------------------------------ plain references
class PlainSAE(torch.nn.Module):
    """What a straightforward PyTorch SAE step looks like: dense everything, autograd backward."""

    def __init__(self, sae: SparseAutoEncoder, activation: str, k: int, l1: float):
        super().__init__()
        self.W_enc = torch.nn.Parameter(sae.W_enc.detach().t().clone())  # [d, s]
        self.b_enc = torch.nn.Parameter(sae.b_enc.detach().clone())
        self.W_dec = torch.nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = torch.nn.Parameter(sae.b_dec.detach().clone())
        self.activation, self.k, self.l1 = activation, k, l1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.W_enc + self.b_enc
        if self.activation == "topk":
            v, i = torch.topk(h, self.k, dim=-1)
            f = torch.zeros_like(h).scatter(-1, i, torch.relu(v))
        else:
            f = torch.relu(h)
        recon = f @ self.W_dec + self.b_dec
        loss = (recon - x).pow(2).sum(-1).mean()
        if self.activation == "relu":
            loss = loss + self.l1 * (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        return loss


def make_adam(params, lr: float, device: torch.device):
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # fused unsupported here
        return torch.optim.Adam(params, lr=lr, foreach=True)


AMP: torch.dtype | None = None  # --amp: autocast dtype of both steps


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=AMP, enabled=AMP is not None)


def step_fn_saecli(
    sae: SparseAutoEncoder,
    ctx: StepContext,
    batches: list[torch.Tensor],
    lr: float,
    device: torch.device,
    pure_torch: bool = False,
) -> Callable[[int], None]:
    opt = make_adam(sae.param_groups(lr), lr, device)

    def step(i: int) -> None:
        x = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)  # as the trainer does
        with kernels.forced("torch") if pure_torch else contextlib.nullcontext():
            with autocast(device):
                out = sae.loss({HOOK: x}, {HOOK: x}, ctx)
            out.loss.backward()
            step.backend = kernels.backend_for(x.device).name
        opt.step()
        sae.post_step()
        step.l0 = out.extra.get("l0")

    return step


def step_fn_plain(
    model: PlainSAE, batches: list[torch.Tensor], lr: float, device: torch.device
) -> Callable[[int], None]:
    opt = make_adam(model.parameters(), lr, device)

    def step(i: int) -> None:
        x = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = model(x)
        loss.backward()
        opt.step()

    return step


def step_fn_sparsify(
    sae: SparseAutoEncoder, k: int, batches: list[torch.Tensor], lr: float, device: torch.device
) -> Callable[[int], None]:
    """sparsify's SparseCoder with this SAE's initial weights; one step = its forward (FVU loss, its
    own autocast), backward, the gradient projection and decoder renormalisation its trainer does."""
    import os

    if device.type != "cuda":  # its Triton decoder needs a GPU: the eager embedding_bag one elsewhere
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    dtype = sae.W_enc.dtype
    coder = SparseCoder(sae.d_model, SparseCoderConfig(k=k, num_latents=sae.d_sae), device=device, dtype=dtype)
    with torch.no_grad():
        coder.encoder.weight.copy_(sae.W_enc)
        coder.encoder.bias.copy_(sae.b_enc)
        coder.W_dec.copy_(sae.W_dec)
        coder.b_dec.copy_(sae.b_dec)
    opt = make_adam(coder.parameters(), lr, device)

    def step(i: int) -> None:
        x = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            out = coder(x)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        coder.set_decoder_norm_to_unit_norm()

    return step


@torch.no_grad()
def set_bias_for_active(sae: SparseAutoEncoder, x: torch.Tensor, active: int) -> None:
    """b_enc so that each latent's pre-activation exceeds 0 on ≈ active/d_sae of tokens."""
    sae.b_enc.zero_()
    h = sae.pre_acts(x).float()
    q = torch.quantile(h[:2048], 1 - active / sae.d_sae, dim=0)
    sae.b_enc.copy_(-q.to(sae.b_enc.dtype))


def check_paths(device: torch.device, dtype_name: str) -> None:
    """The fast paths' loss and gradients against plain autograd (sparse_kernels = false), on `device`:
    with the compiled kernels where they load, then in pure torch."""
    check_paths_once(device, dtype_name, kernels.backend_for(device).name)
    if kernels.backend_for(device).name != "torch":
        with kernels.forced("torch"):
            check_paths_once(device, dtype_name, "torch")


def check_paths_once(device: torch.device, dtype_name: str, label: str) -> None:
    import copy

    torch.manual_seed(0)
    n, d, s = 512, 128, 1024
    x = torch.randn(n, d, device=device)
    cases = [
        ("topk", {"sparsity_include_decoder_norm": True}, StepContext(k=16)),
        (
            "topk",
            {"sparsity_include_decoder_norm": False, "apply_decoder_bias_to_pre_encoder": True},
            StepContext(k=16, auxk_coefficient=0.03, k_aux=64, dead_mask=torch.arange(s, device=device) % 3 == 0),
        ),
        ("relu", {}, StepContext(l1_coefficient=1e-2, sparsity_loss_type="power")),
        ("relu", {"bias": -2.5}, StepContext(l1_coefficient=1e-2, sparsity_loss_type="power")),
    ]
    for activation, over, ctx in cases:
        bias = over.pop("bias", None)
        cfg = parse(
            DictionaryConfig, {"d_sae": s, "activation": activation, "k": 16, "dtype": dtype_name, **over}, key="sae"
        )
        sae = SparseAutoEncoder(cfg, d, HOOK).to(device)
        with torch.no_grad():
            sae.W_enc.add_(0.05 * torch.randn_like(sae.W_enc))
            sae.b_dec.normal_(std=0.1)
            if bias is not None:
                sae.b_enc.fill_(bias)
        ref = copy.deepcopy(sae)
        ref.cfg = copy.deepcopy(cfg)
        ref.cfg.sparse_kernels = False
        results = []
        for model in (sae, ref):
            xin = x.to(model.W_enc.dtype)
            out = model.loss({HOOK: xin}, {HOOK: xin}, ctx)
            out.loss.backward()
            results.append((out.loss.detach().float(), {k: p.grad.float() for k, p in model.named_parameters()}))
        (l_fast, g_fast), (l_ref, g_ref) = results
        worst = max(float((g_fast[k] - g_ref[k]).norm() / g_ref[k].norm().clamp_min(1e-12)) for k in g_ref)
        print(
            f"check {activation:5s} {str(over):70s} path {sae.last_path + '+' + label:24s} loss rel err "
            f"{float((l_fast - l_ref).abs() / l_ref.abs()):.1e}  worst grad rel err {worst:.1e}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--variants", default="topk,topk-torch,topk-plain,relu-fresh,relu-trained,relu-plain")
    p.add_argument("--amp", action="store_true", help="autocast the steps to --amp-dtype (parameters stay float32)")
    p.add_argument("--check", action="store_true", help="first compare the fast paths' gradients with autograd")
    p.add_argument("--profile", metavar="VARIANT", help="after the timing, profile 5 steps of this variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        print(f"compiled kernels: {native.status()}")
    print(f"sparse products on {device.type}: {kernels.backend_for(device).name} backend")
    dtype = getattr(torch, args.dtype)
    if args.check:
        check_paths(device, args.dtype)
    global AMP
    if args.amp:
        AMP = torch.bfloat16
        dtype = torch.float32  # parameters and data stay float32 under autocast
    n, d, s, k = args.batch, args.d_model, args.d_sae, args.k
    lr, l1 = 1e-5, 1e-3
    torch.manual_seed(0)
    batches = [torch.randn(n, d, device=device, dtype=dtype) for _ in range(4)]

    def sae_for(activation: str) -> SparseAutoEncoder:
        cfg = parse(
            DictionaryConfig, {"d_sae": s, "activation": activation, "k": k, "dtype": str(dtype)[6:]}, key="sae"
        )
        torch.manual_seed(0)
        return SparseAutoEncoder(cfg, d, HOOK).to(device)

    steps: dict[str, Callable[[int], None]] = {}
    saes: dict[str, SparseAutoEncoder] = {}
    wanted = args.variants.split(",")
    relu_ctx = StepContext(l1_coefficient=l1, sparsity_loss_type="power")

    def trained_relu() -> SparseAutoEncoder:
        sae = sae_for("relu")
        set_bias_for_active(sae, batches[0], 64)
        return sae

    makers = {
        "topk": (lambda: sae_for("topk"), StepContext(k=k)),
        "relu-fresh": (lambda: sae_for("relu"), relu_ctx),
        "relu-trained": (trained_relu, relu_ctx),
    }
    for name in wanted:
        base = name.removesuffix("-torch")
        if base in makers:
            make, ctx = makers[base]
            saes[name] = make()
            steps[name] = step_fn_saecli(saes[name], ctx, batches, lr, device, pure_torch=name.endswith("-torch"))
    if "topk-plain" in wanted:
        steps["topk-plain"] = step_fn_plain(PlainSAE(sae_for("topk"), "topk", k, 0.0), batches, lr, device)
    if "sparsify" in wanted:
        steps["sparsify"] = step_fn_sparsify(sae_for("topk"), k, batches, lr, device)
    if "relu-plain" in wanted:
        steps["relu-plain"] = step_fn_plain(PlainSAE(trained_relu(), "relu", 0, l1), batches, lr, device)
    unknown = [w for w in wanted if w not in steps]
    if unknown:
        p.error(f"unknown variants {unknown}")

    t_start = time.perf_counter()
    for fn in steps.values():  # warm-up (allocations, MKL/cuBLAS plans)
        for i in range(args.warmup):
            fn(i)
        sync(device)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[float]] = {name: [] for name in steps}
    roofs: list[float] = []
    roof_by_block: dict[str, list[float]] = {name: [] for name in steps}
    both = device.type == "cuda"  # float32 and bfloat16 rooflines, each sampled before every block
    roofs16: list[float] = []
    for _ in range(args.reps):
        for name, fn in steps.items():
            r = roofline(n, d, s, device, AMP or dtype)
            roofs.append(r)
            roof_by_block[name].append(r)
            if both:
                roofs16.append(roofline(n, d, s, device, torch.bfloat16))
            sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for i in range(args.steps):
                fn(i)
            sync(device)
            rates[name].append(args.steps * n / (time.perf_counter() - t0))
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.steps)

    R = statistics.median(roofs)
    T = R * 1e9 / (6 * d * s)
    prec = f"{args.dtype}" + (" + autocast bf16" if AMP else "")
    print(
        f"device {device} ({torch.get_num_threads()} threads), {prec}, batch {n}, d_model {d}, d_sae {s}, "
        f"k {k}; {args.reps} reps × {args.steps} steps; total {time.perf_counter() - t_start:.0f} s"
    )
    print(
        f"roofline R = {R:.1f} GFLOP/s in {AMP or dtype} (samples {min(roofs):.0f}–{max(roofs):.0f}); "
        f"roof token rate T = {T:.0f} tokens/s"
    )
    T16 = None
    if roofs16:
        R16 = statistics.median(roofs16)
        T16 = R16 * 1e9 / (6 * d * s)
        print(
            f"bf16 roofline = {R16:.1f} GFLOP/s (samples {min(roofs16):.0f}–{max(roofs16):.0f}); "
            f"bf16 roof token rate = {T16:.0f} tokens/s (the ×bf16roof column)"
        )
    print(
        f"{'variant':18s} {'path':24s} {'L0':>7s} {'tokens/s':>10s} {'spread':>17s} {'×roof':>6s} "
        f"{'×roof/blk (min–max)':>20s} {'vs plain':>8s} {'vs sparsify':>11s} {'faults/step':>11s}"
        + (f" {'×bf16roof':>9s}" if T16 else "")
    )
    for name, rs in rates.items():
        med = statistics.median(rs)
        blocks = [r / (rb * 1e9 / (6 * d * s)) for r, rb in zip(rs, roof_by_block[name])]
        if name in saes:
            path = f"{saes[name].last_path}+{steps[name].backend}"
        else:
            path = "sparsify" if name == "sparsify" else "plain autograd"
        l0 = getattr(steps[name], "l0", None)
        l0_txt = f"{float(l0):7.1f}" if l0 is not None else "      -"
        ref = "topk-plain" if name.startswith("topk") else "relu-plain"
        vs = f"{med / statistics.median(rates[ref]):8.2f}" if ref in rates and ref != name else "       -"
        blk = f"{statistics.median(blocks):.2f} ({min(blocks):.2f}–{max(blocks):.2f})"
        vs_sp = (
            f"{med / statistics.median(rates['sparsify']):11.2f}"
            if "sparsify" in rates and name != "sparsify" and name.startswith("topk")
            else "          -"
        )
        print(
            f"{name:18s} {path:24s} {l0_txt} {med:10.0f} {min(rs):8.0f}–{max(rs):8.0f} {med / T:6.2f} "
            f"{blk:>20s} {vs} {vs_sp} {statistics.median(faults[name]):11.0f}" + (f" {med / T16:9.2f}" if T16 else "")
        )
    if args.profile:
        if args.profile not in steps:
            p.error(f"--profile {args.profile}: not among the variants run")
        profile_steps(args.profile, steps[args.profile], device)


def profile_steps(name: str, fn: Callable[[int], None], device: torch.device) -> None:
    """torch.profiler table of a few steps (the compiled kernels appear as saecli.native.*)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for i in range(5):
            fn(i)
        sync(device)
    print(f"profile of {name} (5 steps):")
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
            row_limit=20,
            max_name_column_width=32,
            max_shapes_column_width=60,
        )
    )


if __name__ == "__main__":
    main()
