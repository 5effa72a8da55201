"""The computed defaults of [trainer], and the one step that writes them into the config.

A key left out of the file (`None` in `TrainerConfig`) is filled here by a formula of what it depends
on, so a run's `config.toml` holds the numbers the run used and a change of formula cannot change
what an old run folder means: its config.toml already says (a folder written before these keys were
recorded resolves to the same numbers, since the formulas below are the ones it ran with).

What each default needs, and so when it is known:
- `sparsity_loss_type` ← `dictionary.activation`; `l1_coefficient` ← the penalty: when the file is loaded.
- `lr` ← d_sae and `trainer.total_training_tokens`: when the file is loaded if it gives `dictionary.d_sae` (or a MOLT's `rank_counts`); with
  `expansion_factor`, d_sae = expansion_factor × d_model and d_model is known once the stream opens.
- `k_aux` ← d_model: once the stream opens.
- `dead_threshold_tokens` ← the run's tokens (steps × tokens per step, the first batch tells its size):
  once the stream opens and the step plan is made.
`resolve_trainer` fills whatever its arguments allow and keeps every value already set, so calling it
again with more known is safe: `load_experiment` calls it with the file alone, the training member
with the built dictionary and its step plan, and the driver writes the member's config into config.toml.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from saecli.config.trainer import SparsityLoss, TrainerConfig

if TYPE_CHECKING:
    from saecli.config.experiment import Experiment

# The default learning rate: the best measured at d_sae 4608 and 300k tokens (SmolLM2 layer 12,
# bench_quality.py: 4e-3 beat 2e-3, EV 0.55 → 0.79), ∝ 1/√d_sae for larger dictionaries (Gao et al. 2024 fit
# lr ∝ n_latents^-0.5; sparsify scales so too) and ∝ 1/√tokens for longer runs (at 1.2M tokens 2e-3 beat
# 4e-3: EV 0.899 → 0.907, dead 1.3 → 0.2 %, CE recovered 0.988 → 0.997).
DEFAULT_LR = 4e-3
DEFAULT_LR_D_SAE = 4608
DEFAULT_LR_TOKENS = 300_000
# Gao et al. (2024) call a latent dead after 10M tokens without firing; short runs use a fraction instead.
DEFAULT_DEAD_TOKENS = 10_000_000
DEFAULT_DEAD_FRACTION = 0.1


def default_lr(d_sae: int, total_tokens: int = DEFAULT_LR_TOKENS) -> float:
    """`trainer.lr` when not given: 4e-3 × min(1, √(4608 / d_sae)) × min(1, √(300k / total_tokens))
    (never above the measured 4e-3)."""
    size = min(1.0, math.sqrt(DEFAULT_LR_D_SAE / max(int(d_sae), 1)))
    length = min(1.0, math.sqrt(DEFAULT_LR_TOKENS / max(int(total_tokens), 1)))
    return DEFAULT_LR * size * length


def default_sparsity_loss(activation: str) -> SparsityLoss:
    """power (L1) for relu, tanh for jumprelu, none for the top-k family."""
    return "power" if activation == "relu" else "tanh" if activation == "jumprelu" else "none"


def default_l1_coefficient(sparsity_loss_type: str) -> float:
    """The penalty weight when `trainer.l1_coefficient` is not given, per penalty (dataset-wise units).

    Measured on SmolLM2-135M layer 12, d_sae 4608, 300k tokens: power (L1 × ‖W_dec‖) at 5 gives L0 ≈ 36
    (EV 0.68); tanh at 0.5 gives L0 ≈ 85 (EV 0.85), tanh-quad at 0.5 L0 ≈ 34. A weight of 8e-5 left L0 ≈ 860
    (relu) and ≈ 1200 (jumprelu): no sparsity at all in these units. (Top-k kinds get 0.5 too, unused:
    their penalty is "none"; it is the value their metrics have always logged.)
    """
    return 5.0 if sparsity_loss_type == "power" else 0.5


def default_k_aux(d_model: int) -> int:
    """AuxK's latents per token when `trainer.k_aux` is not given: d_model / 2 (Gao et al. 2024), at least 1."""
    return max(1, int(d_model) // 2)


def default_dead_threshold_tokens(run_tokens: int) -> int:
    """AuxK's "dead after N tokens without firing": 10M tokens, or 10 % of a shorter run."""
    return max(1, min(DEFAULT_DEAD_TOKENS, int(run_tokens * DEFAULT_DEAD_FRACTION)))


def resolve_trainer(
    cfg: TrainerConfig,
    *,
    activation: str | None = None,
    d_sae: int | None = None,
    d_model: int | None = None,
    run_tokens: int | None = None,
) -> TrainerConfig:
    """`cfg` with each unset default filled from the arguments given (a value already set is kept).

    `activation`: the dictionary's (dictionary.activation); `d_sae`, `d_model`: the dictionary's sizes;
    `run_tokens`: optimizer steps × tokens per step (all ranks, accumulation included).
    """
    penalty = cfg.sparsity_loss_type
    if penalty is None and activation is not None:
        penalty = default_sparsity_loss(activation)
    l1, lr, k_aux, dead = cfg.l1_coefficient, cfg.lr, cfg.k_aux, cfg.dead_threshold_tokens
    if l1 is None and penalty is not None:
        l1 = default_l1_coefficient(penalty)
    if lr is None and d_sae is not None:
        lr = default_lr(d_sae, cfg.total_training_tokens)
    if k_aux is None and d_model is not None:
        k_aux = default_k_aux(d_model)
    if dead is None and run_tokens is not None:
        dead = default_dead_threshold_tokens(run_tokens)
    return dataclasses.replace(
        cfg, sparsity_loss_type=penalty, l1_coefficient=l1, lr=lr, k_aux=k_aux, dead_threshold_tokens=dead
    )


def unresolved(cfg: TrainerConfig) -> list[str]:
    """The [trainer] keys whose default `resolve_trainer` has not filled yet (empty once a member holds it)."""
    keys = ("sparsity_loss_type", "l1_coefficient", "lr", "k_aux", "dead_threshold_tokens")
    return [f"trainer.{key}" for key in keys if getattr(cfg, key) is None]


def resolve(exp: Experiment) -> Experiment:
    """The file's own defaults written in (`load_experiment` runs this after validation): the [trainer]
    keys that the dictionary's activation and size decide. d_model and the step plan come later, with
    the stream; `resolved_for_run` records those."""
    if exp.dictionary is None:
        return exp
    trainer = resolve_trainer(exp.trainer, activation=exp.dictionary.activation, d_sae=exp.dictionary.known_latents())
    return dataclasses.replace(exp, trainer=trainer, dictionary=exp.dictionary.resolved())


def resolved_for_run(exp: Experiment, trainer: TrainerConfig, d_model: int) -> Experiment:
    """`exp` as one member trains it, for its config.toml: `trainer` is the member's own config (every
    default filled once the stream gave d_model and the step plan: `Member.cfg`), and a d_sae given as
    expansion_factor × d_model is written as the number of latents it came to."""
    dictionary = exp.dictionary
    if dictionary is not None and dictionary.d_sae is None:
        dictionary = dataclasses.replace(dictionary, d_sae=dictionary.resolved_d_sae(d_model))
    return dataclasses.replace(exp, trainer=trainer, dictionary=dictionary)
