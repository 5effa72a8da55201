"""Schedules as pure functions of the optimizer step: learning rate, sparsity coefficient warm-up, k.

Convention (one for every schedule, so the numbers are easy to check by hand): a phase of `n` steps
that starts at step `a` has progress p(s) = clamp((s − a + 1) / n, 0, 1) at step s (0-based), i.e. it
reaches its end value on its last step. Warm-ups go 0 → 1 (the first step already gets 1/n, never 0),
decays go 1 → `lr_end_ratio`. A phase of 0 steps is skipped (no division by zero).

Step counts in the config are either steps (int) or a fraction of the run (float in [0, 1]);
`resolve_steps` turns both into steps once the run's length is known.

Learning-rate factors (multiplying `lr`), T = total steps, W = warm-up, C = cool-down, r = end ratio:
- constant:              1
- constantwithwarmup:    linear warm-up over W, 1, then linear cool-down to r over the last C steps
- linearwarmupdecay:     linear warm-up over W, then linear decay 1 → r over the remaining T − W
- cosineannealing:       r + (1 − r)(1 + cos πp)/2 over the whole run (no warm-up)
- cosineannealingwarmup: linear warm-up over W, then the cosine over the remaining T − W
- exponentialwarmup:     linear warm-up over W, then r^p (geometric decay 1 → r) over T − W
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import get_args

from saecli.config.trainer import LrScheduler

LR_SCHEDULERS: tuple[str, ...] = get_args(LrScheduler)


def resolve_steps(value: int | float, total_steps: int) -> int:
    """A step count given as steps (int) or as a fraction of the run (float in [0, 1]) → steps."""
    if isinstance(value, bool) or value < 0:
        raise ValueError(f"a step count must be an int >= 0 or a fraction in [0, 1], found {value!r}")
    if isinstance(value, float):
        if value > 1:
            raise ValueError(f"a fraction of the run must be in [0, 1], found {value}")
        return int(round(value * total_steps))
    return int(value)


def progress(step: int, start: int, length: int) -> float:
    """Progress of a phase of `length` steps starting at `start`, after step `step`: in [0, 1]."""
    if length <= 0:
        return 1.0 if step >= start else 0.0
    return min(1.0, max(0.0, (step - start + 1) / length))


def lr_factor(
    step: int, *, name: str, total_steps: int, warmup_steps: int = 0, cooldown_steps: int = 0, end_ratio: float = 1 / 32
) -> float:
    """The factor multiplying the base learning rate at optimizer step `step` (0-based)."""
    T, W, r = total_steps, warmup_steps, end_ratio
    if name == "constant":
        return 1.0
    if name == "cosineannealing":
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress(step, 0, T)))
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {name!r}; known: {', '.join(LR_SCHEDULERS)}")
    if step < W:
        return progress(step, 0, W)
    if name == "constantwithwarmup":
        C = min(cooldown_steps, T)
        return 1.0 - (1 - r) * progress(step, T - C, C) if C > 0 else 1.0
    p = progress(step, W, T - W)
    if name == "linearwarmupdecay":
        return 1.0 - (1 - r) * p
    if name == "cosineannealingwarmup":
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))
    return r**p  # exponentialwarmup


def warmup(step: int, warmup_steps: int) -> float:
    """Linear warm-up factor 0 → 1 over `warmup_steps` (1 from the start when 0)."""
    return progress(step, 0, warmup_steps)


def k_at(
    step: int,
    *,
    k: int,
    initial_k: int | None,
    cold_steps: int = 0,
    warmup_steps: int = 0,
    kind: str = "linear",
    exponential_factor: float = 3.0,
) -> int:
    """k at a step: `initial_k` held for `cold_steps`, then annealed to `k` over `warmup_steps`.

    linear: k0 + (k − k0)·p; exponential: k0 − (k0 − k)(1 − e^{−a p}) / (1 − e^{−a}) (fast first, then
    slow); rounded up and never below `k`.
    """
    if initial_k is None or initial_k <= k:
        return k
    if step < cold_steps:
        return initial_k
    p = progress(step, cold_steps, warmup_steps)
    if kind == "linear":
        value = initial_k + (k - initial_k) * p
    elif kind == "exponential":
        a = exponential_factor
        value = initial_k - (initial_k - k) * (1 - math.exp(-a * p)) / (1 - math.exp(-a))
    else:
        raise ValueError(f"unknown k schedule {kind!r}; expected 'linear' or 'exponential'")
    # a tiny tolerance so that float error cannot push an exact integer up by one
    return max(k, math.ceil(value - 1e-9))


@dataclass(frozen=True)
class Schedule:
    """Every schedule of one member, resolved to steps for a run of `total_steps` optimizer steps."""

    total_steps: int
    lr_scheduler: str
    lr_warmup_steps: int
    lr_cooldown_steps: int
    lr_end_ratio: float
    l1_coefficient: float
    l1_warmup_steps: int
    k: int
    initial_k: int | None
    k_cold_steps: int
    k_warmup_steps: int
    k_kind: str
    k_exponential_factor: float
    sampling_window: int  # steps per dead/dense statistics window
    dead_threshold_tokens: int  # AuxK: dead after this many tokens without firing

    @classmethod
    def from_config(cls, cfg, *, total_steps: int, k: int) -> Schedule:
        """A TrainerConfig whose defaults are resolved (`saecli.config.defaults.resolve_trainer`: the
        penalty weight and the dead threshold are numbers) for a run of `total_steps` steps."""
        steps = partial(resolve_steps, total_steps=total_steps)
        return cls(
            total_steps=total_steps,
            lr_scheduler=cfg.lr_scheduler,
            lr_warmup_steps=steps(cfg.lr_warm_up_steps),
            lr_cooldown_steps=steps(cfg.lr_cool_down_steps),
            lr_end_ratio=cfg.lr_end_ratio,
            l1_coefficient=float(cfg.l1_coefficient),
            l1_warmup_steps=steps(cfg.l1_coefficient_warmup_steps),
            k=k,
            initial_k=cfg.initial_k,
            k_cold_steps=steps(cfg.k_cold_booting_steps),
            k_warmup_steps=steps(cfg.k_warmup_steps),
            k_kind=cfg.k_schedule_type,
            k_exponential_factor=cfg.k_exponential_factor,
            sampling_window=max(1, steps(cfg.feature_sampling_window)),
            dead_threshold_tokens=int(cfg.dead_threshold_tokens),
        )

    def lr_lambda(self) -> Callable[[int], float]:
        """The function torch's LambdaLR calls with the step index."""
        return partial(
            lr_factor,
            name=self.lr_scheduler,
            total_steps=self.total_steps,
            warmup_steps=self.lr_warmup_steps,
            cooldown_steps=self.lr_cooldown_steps,
            end_ratio=self.lr_end_ratio,
        )

    def l1_at(self, step: int) -> float:
        return self.l1_coefficient * warmup(step, self.l1_warmup_steps)

    def k_at(self, step: int) -> int:
        return k_at(
            step,
            k=self.k,
            initial_k=self.initial_k,
            cold_steps=self.k_cold_steps,
            warmup_steps=self.k_warmup_steps,
            kind=self.k_kind,
            exponential_factor=self.k_exponential_factor,
        )
