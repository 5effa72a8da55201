"""The peers of bench_quality.py: each library's own trainer fed saecli's cached batches, as a `Coder`.

Every trainer sees the same batches in the same order (whatever iterable the caller passes), and hands
back plain callables (raw activations → dense latent codes → raw reconstruction), so that one scorer
treats every library alike. What each peer's `train(...)` step does is its own library's code:

- **sparsify** (EleutherAI, PyPI `eai-sparsify`): `SparseCoder` and the optimiser its `Trainer` builds,
  stepped as `Trainer.fit`'s "fvu" branch does (b_dec ← batch mean at step 0, unit-norm decoder,
  gradient ⊥ decoder rows, FVU against the batch's variance, dead counts after each step). README
  defaults: Signum with schedule-free averaging, lr 5e-3/√(latents/2¹⁴), AuxK off. The saved weights
  are the schedule-free average (its `Trainer.save` switches the optimiser to eval first; so do we).
  Skip transcoder (`transcode=True`, batches of (MLP input, MLP output)): its Trainer's transcoder
  branch — zero decoder at init, b_enc centring the inputs and b_dec at the outputs' mean at step 0, no
  decoder normalisation or gradient projection; a linear skip x W_skipᵀ (zero at init).
- **dictionary_learning** (PyPI `dictionary-learning`): `TopKTrainer.update(step, x)` as its `trainSAE`
  calls it (no activation normalisation, its default). README defaults: lr 2e-4/√(d_sae/2¹⁴), 1000
  warm-up steps, AuxK 1/32 with a 10M-token dead window.

A peer that is not installed raises `PeerMissing`, which the benchmark reports as a skipped row.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


class PeerMissing(RuntimeError):
    """The peer library is not installed (`pip install -e .[bench]` installs every peer)."""


@dataclass
class Coder:
    """A trained dictionary as the scorer sees it: raw [N, d] → codes [N, d_sae] → raw [N, d]."""

    name: str
    encode: Callable[[Tensor], Tensor]
    decode: Callable[..., Tensor]  # decode(codes), or decode(codes, x) with `needs_input` (a skip transcoder)
    tokens_per_s: float = float("nan")
    note: str = ""
    needs_input: bool = False

    def reconstruct(self, codes: Tensor, x: Tensor) -> Tensor:
        return self.decode(codes, x) if self.needs_input else self.decode(codes)


@dataclass
class Budget:
    """What every library trains with: dictionary shape and the batches' count and size."""

    d_model: int
    d_sae: int
    k: int
    steps: int
    batch_tokens: int

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_tokens


def cut_steps(readme_steps: int, budget: Budget, fraction: float = 0.01) -> int:
    """A peer's fixed step count (warm-up) cut to the run: `fraction` of it, never beyond the README's."""
    return max(1, min(readme_steps, round(fraction * budget.steps)))


def cut_tokens(readme_tokens: int, budget: Budget, fraction: float = 0.1) -> int:
    """A peer's fixed token window (dead latents) cut to `fraction` of the run's tokens."""
    return max(budget.batch_tokens, min(readme_tokens, round(fraction * budget.tokens)))


def _need(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise PeerMissing(f"{package} is not installed (pip install {package}, or the bench extra)")


# ---------------------------------------------------------------------------------------------- sparsify
def train_sparsify(
    batches: Iterable[Tensor] | Iterable[tuple[Tensor, Tensor]],
    budget: Budget,
    *,
    optimizer: str = "signum",
    lr_warmup_steps: int = 1000,
    auxk_alpha: float = 0.0,
    dead_tokens: int = 10_000_000,
    seed: int = 0,
    name: str = "sparsify",
    transcode: bool = False,
) -> Coder:
    """Train sparsify's SparseCoder with its Trainer's optimiser and step (see the module docstring).

    `transcode`: a skip transcoder on batches of (input, target) pairs."""
    _need("sparsify", "eai-sparsify")
    if not torch.cuda.is_available():  # its Triton decoder needs a GPU; the eager one is its own fallback
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    coder_cfg = SparseCoderConfig(num_latents=budget.d_sae, k=budget.k, transcode=transcode, skip_connection=transcode)
    sae = SparseCoder(budget.d_model, coder_cfg, "cpu", dtype=torch.float32)
    scale = math.sqrt(budget.d_sae / 2**14)
    schedulers = []
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / scale)]), momentum=0.95)
        opt.train()
    elif optimizer == "adam":
        opt = torch.optim.Adam([dict(params=sae.parameters(), lr=2e-4 / scale)])
        schedulers.append(get_linear_schedule_with_warmup(opt, lr_warmup_steps, budget.steps))
    else:
        raise ValueError(f"unknown sparsify optimizer {optimizer!r}")
    since_fired = torch.zeros(budget.d_sae, dtype=torch.long)

    def step(i: int, batch: Tensor | tuple[Tensor, Tensor]) -> None:
        x, y = batch if transcode else (batch, batch)
        if i == 0:
            if transcode:
                sae.encoder.bias.data = -x.mean(0).to(sae.dtype) @ sae.encoder.weight.data.T
            sae.b_dec.data = y.mean(0).to(sae.dtype)
        if not transcode:
            sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > dead_tokens if auxk_alpha > 0 else None
        total_variance = (y - y.mean(0)).pow(2).sum()
        out = sae(x=x, y=y, dead_mask=dead, total_variance=total_variance)
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        if not transcode:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for s in schedulers:
            s.step()
        with torch.no_grad():
            fired = torch.zeros(budget.d_sae, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since_fired.add_(y.shape[0])
            since_fired[fired] = 0

    seconds = _run(batches, budget, step)
    if optimizer == "signum":
        opt.eval()  # the schedule-free average, as sparsify's Trainer.save stores it
    sae.eval()

    @torch.no_grad()
    def encode(x: Tensor) -> Tensor:
        enc = sae.encode(x)
        return torch.zeros(x.shape[0], budget.d_sae, dtype=x.dtype).scatter_(-1, enc.top_indices, enc.top_acts)

    @torch.no_grad()
    def decode(codes: Tensor, x: Tensor | None = None) -> Tensor:
        out = codes @ sae.W_dec + sae.b_dec
        return out + x @ sae.W_skip.mT if transcode and x is not None else out

    return Coder(name, encode, decode, budget.tokens / seconds, needs_input=transcode)


# ----------------------------------------------------------------------------------- dictionary_learning
def _import_dictionary_learning() -> types.ModuleType:
    """`dictionary_learning.trainers.top_k` without the package's __init__, which imports nnsight (for its
    activation buffer, unused here; nnsight's pins would replace torch)."""
    _need("dictionary_learning", "dictionary-learning")
    if "dictionary_learning" not in sys.modules:
        spec = importlib.util.find_spec("dictionary_learning")
        assert spec is not None
        sys.modules["dictionary_learning"] = importlib.util.module_from_spec(spec)  # not executed
    return importlib.import_module("dictionary_learning.trainers.top_k")


def train_dictionary_learning(
    batches: Iterable[Tensor],
    budget: Budget,
    *,
    warmup_steps: int = 1000,
    dead_tokens: int = 10_000_000,
    threshold_start_step: int = 1000,
    seed: int = 0,
    name: str = "dictionary_learning",
) -> Coder:
    """Train dictionary_learning's TopK SAE with its TopKTrainer (see the module docstring).

    Its schedule asserts warm-up < steps, so a README warm-up longer than the run is clamped to steps − 1
    (the run then never leaves the warm-up) and the row says so.
    """
    top_k = _import_dictionary_learning()
    note = ""
    if warmup_steps >= budget.steps:
        warmup_steps, note = budget.steps - 1, f"warm-up 1000 > run: clamped to {budget.steps - 1} steps"
    trainer = top_k.TopKTrainer(
        steps=budget.steps,
        activation_dim=budget.d_model,
        dict_size=budget.d_sae,
        k=budget.k,
        layer=0,
        lm_name="bench",
        warmup_steps=warmup_steps,
        threshold_start_step=threshold_start_step,
        seed=seed,
        device="cpu",
    )
    trainer.dead_feature_threshold = dead_tokens
    seconds = _run(batches, budget, trainer.update)
    ae = trainer.ae.eval()

    @torch.no_grad()
    def encode(x: Tensor) -> Tensor:
        return ae.encode(x)

    @torch.no_grad()
    def decode(codes: Tensor) -> Tensor:
        return ae.decode(codes)

    return Coder(name, encode, decode, budget.tokens / seconds, note)


# ------------------------------------------------------------------------------------------------ helpers
def _run(batches: Iterable, budget: Budget, step: Callable[[int, Any], object]) -> float:
    """Feed `budget.steps` batches to `step(i, x)`; the wall seconds it took (reading batches included)."""
    import time

    start = time.perf_counter()
    n = 0
    for i, x in enumerate(batches):
        if i >= budget.steps:
            break
        step(i, x)
        n += 1
    if n < budget.steps:
        raise RuntimeError(f"the stream ran out after {n} of {budget.steps} batches")
    return time.perf_counter() - start
