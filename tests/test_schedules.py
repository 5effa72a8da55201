"""Schedules are pure functions of the step: their values at chosen steps, computed by hand.

Convention: a phase of n steps starting at step a has progress (s − a + 1)/n at step s, so a warm-up's
first step gets 1/n and a decay reaches its end value on the phase's last step.
"""

from __future__ import annotations

import math

import pytest
import torch

from saecli.config.base import parse
from saecli.config.defaults import default_dead_threshold_tokens, resolve_trainer
from saecli.config.trainer import TrainerConfig
from saecli.training.checkpoint import checkpoint_steps
from saecli.training.schedules import (
    Schedule,
    k_at,
    lr_factor,
    resolve_steps,
    warmup,
)


def schedule(cfg: TrainerConfig, *, total_steps: int, tokens_per_step: int, k: int) -> Schedule:
    """The schedule a member of a top-k dictionary gets: the config's defaults resolved for the run first."""
    cfg = resolve_trainer(cfg, activation="topk", run_tokens=total_steps * tokens_per_step)
    return Schedule.from_config(cfg, total_steps=total_steps, k=k)


def lr(step: int, name: str, T: int, W: int = 0, C: int = 0, r: float = 1 / 32) -> float:
    return lr_factor(step, name=name, total_steps=T, warmup_steps=W, cooldown_steps=C, end_ratio=r)


def test_steps_or_fraction_of_the_run():
    assert resolve_steps(7, 200) == 7
    assert resolve_steps(0.1, 200) == 20
    assert resolve_steps(0.05, 30) == 2  # 1.5 rounds to 2
    assert resolve_steps(0, 200) == 0
    assert resolve_steps(0.0, 200) == 0
    assert resolve_steps(1.0, 200) == 200
    with pytest.raises(ValueError):
        resolve_steps(-1, 10)
    with pytest.raises(ValueError):
        resolve_steps(1.5, 10)


def test_constant_with_warmup_and_cooldown():
    # T=100, 10 warm-up steps, 20 cool-down steps to r = 0.25
    assert lr(0, "constantwithwarmup", 100, 10, 20, 0.25) == pytest.approx(0.1)
    assert lr(4, "constantwithwarmup", 100, 10, 20, 0.25) == pytest.approx(0.5)
    assert lr(9, "constantwithwarmup", 100, 10, 20, 0.25) == pytest.approx(1.0)
    assert lr(50, "constantwithwarmup", 100, 10, 20, 0.25) == pytest.approx(1.0)
    assert lr(79, "constantwithwarmup", 100, 10, 20, 0.25) == pytest.approx(1.0)
    assert lr(80, "constantwithwarmup", 100, 10, 20, 0.25) == pytest.approx(1 - 0.75 / 20)  # 0.9625
    assert lr(89, "constantwithwarmup", 100, 10, 20, 0.25) == pytest.approx(0.625)
    assert lr(99, "constantwithwarmup", 100, 10, 20, 0.25) == pytest.approx(0.25)


def test_zero_length_phases_do_not_divide_by_zero():
    assert lr(0, "constantwithwarmup", 100, 0, 0) == 1.0
    assert lr(99, "constantwithwarmup", 100, 0, 0) == 1.0
    assert lr(0, "linearwarmupdecay", 100, 0) == pytest.approx(1 - (1 - 1 / 32) / 100)
    assert lr(0, "cosineannealingwarmup", 1, 0, r=0.5) == pytest.approx(0.5)
    assert lr(0, "exponentialwarmup", 1, 1) == pytest.approx(1.0)  # the whole run is warm-up
    assert warmup(0, 0) == 1.0


def test_linear_warmup_then_decay():
    assert lr(0, "linearwarmupdecay", 100, 20, r=0.1) == pytest.approx(0.05)
    assert lr(19, "linearwarmupdecay", 100, 20, r=0.1) == pytest.approx(1.0)
    assert lr(20, "linearwarmupdecay", 100, 20, r=0.1) == pytest.approx(1 - 0.9 / 80)
    assert lr(59, "linearwarmupdecay", 100, 20, r=0.1) == pytest.approx(0.55)
    assert lr(99, "linearwarmupdecay", 100, 20, r=0.1) == pytest.approx(0.1)


def test_cosine_annealing():
    assert lr(49, "cosineannealing", 100, r=0.0) == pytest.approx(0.5)
    assert lr(99, "cosineannealing", 100, r=0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr(49, "cosineannealing", 100, r=0.2) == pytest.approx(0.6)
    assert lr(24, "cosineannealing", 100, r=0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)  # 0.853553
    # with warm-up: the cosine runs over the 100 steps after 10 warm-up steps
    assert lr(4, "cosineannealingwarmup", 110, 10, r=0.0) == pytest.approx(0.5)
    assert lr(59, "cosineannealingwarmup", 110, 10, r=0.0) == pytest.approx(0.5)
    assert lr(109, "cosineannealingwarmup", 110, 10, r=0.1) == pytest.approx(0.1)


def test_exponential_decay_after_warmup():
    assert lr(9, "exponentialwarmup", 110, 10) == pytest.approx(1.0)
    assert lr(59, "exponentialwarmup", 110, 10, r=1 / 32) == pytest.approx(0.1767767, rel=1e-6)  # (1/32)^0.5
    assert lr(109, "exponentialwarmup", 110, 10, r=1 / 32) == pytest.approx(1 / 32)


def test_constant_and_unknown():
    assert lr(0, "constant", 10) == lr(9, "constant", 10) == 1.0
    with pytest.raises(ValueError, match="unknown lr scheduler"):
        lr(0, "cosine", 10)


def test_lambdalr_applies_the_factor_to_the_optimizer():
    cfg = parse(
        TrainerConfig,
        {
            "lr": 0.01,
            "lr_scheduler": "constantwithwarmup",
            "lr_warm_up_steps": 4,
            "lr_cool_down_steps": 0.5,
            "lr_end_ratio": 0.5,
        },
    )
    s = schedule(cfg, total_steps=8, tokens_per_step=100, k=4)
    assert (s.lr_warmup_steps, s.lr_cooldown_steps) == (4, 4)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s.lr_lambda())
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up 1/4 .. 4/4, then the cool-down over the last 4 steps: 1 − 0.5·(1/4 .. 4/4)
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.00875, 0.0075, 0.00625, 0.005])


def test_l1_coefficient_warmup():
    cfg = parse(TrainerConfig, {"l1_coefficient": 1e-3, "l1_coefficient_warmup_steps": 10})
    s = schedule(cfg, total_steps=100, tokens_per_step=1, k=4)
    assert s.l1_at(0) == pytest.approx(1e-4)
    assert s.l1_at(4) == pytest.approx(5e-4)
    assert s.l1_at(9) == pytest.approx(1e-3)
    assert s.l1_at(50) == pytest.approx(1e-3)
    cfg0 = parse(TrainerConfig, {"l1_coefficient": 1e-3, "l1_coefficient_warmup_steps": 0})
    assert schedule(cfg0, total_steps=100, tokens_per_step=1, k=4).l1_at(0) == pytest.approx(1e-3)


def test_k_schedule_linear():
    kw = dict(k=8, initial_k=64, cold_steps=10, warmup_steps=20, kind="linear")
    assert [k_at(s, **kw) for s in (0, 9)] == [64, 64]  # cold boot
    assert k_at(10, **kw) == 62  # 64 − 56/20 = 61.2 → rounded up
    assert k_at(19, **kw) == 36  # halfway: 64 − 28
    assert k_at(29, **kw) == 8
    assert k_at(1000, **kw) == 8


def test_k_schedule_exponential():
    kw = dict(k=8, initial_k=64, cold_steps=10, warmup_steps=20, kind="exponential", exponential_factor=3.0)
    # halfway: 64 − 56·(1 − e^−1.5)/(1 − e^−3) = 64 − 56·0.817574 = 18.216 → 19
    assert k_at(19, **kw) == 19
    assert k_at(29, **kw) == 8
    # exponential falls faster than linear early on
    assert k_at(12, **kw) < k_at(12, **{**kw, "kind": "linear"})


def test_k_without_initial_k_is_constant():
    assert k_at(0, k=32, initial_k=None, warmup_steps=10) == 32
    assert k_at(0, k=32, initial_k=16, warmup_steps=10) == 32  # never below k


def test_defaults_scale_with_the_run():
    cfg = parse(TrainerConfig, {})
    short = schedule(cfg, total_steps=200, tokens_per_step=256, k=8)
    assert short.lr_warmup_steps == 2  # 0.01 × 200
    assert short.lr_cooldown_steps == 40  # 0.2 × 200
    assert short.sampling_window == 20  # 0.1 × 200
    assert short.dead_threshold_tokens == 5120  # 10 % of 51 200 tokens
    assert default_dead_threshold_tokens(10**10) == 10_000_000  # Gao et al.'s 10M for long runs
    tiny = schedule(cfg, total_steps=3, tokens_per_step=1, k=8)
    assert tiny.sampling_window == 1 and tiny.dead_threshold_tokens == 1


def test_checkpoint_steps_are_in_steps():
    assert checkpoint_steps(100, 4, "linear") == [25, 50, 75, 100]
    assert checkpoint_steps(10, 3, "linear") == [3, 6, 10]
    assert checkpoint_steps(1000, 3, "log") == [10, 100, 1000]
    assert checkpoint_steps(1000, 0, "linear") == []
    assert checkpoint_steps(5, 10, "linear") == [1, 2, 3, 4, 5]  # never more than one per step
