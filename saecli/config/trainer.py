"""[trainer]: optimisation, schedules, sparsity terms, logging and checkpoints.

A key whose default is a formula (lr, l1_coefficient, sparsity_loss_type, k_aux, dead_threshold_tokens)
is None here until `saecli.config.defaults` fills it; a run's config.toml holds the number it used.

Step counts (`*_steps`) accept an integer number of steps or a float in (0, 1) meaning that
fraction of the run, so the same file is sensible for a 1k-step and a 100k-step run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saecli.config.base import bad, opt

Steps = int | float
SparsityLoss = Literal["power", "tanh", "tanh-quad", "l0", "none"]

LrScheduler = Literal[
    "constant",
    "constantwithwarmup",
    "linearwarmupdecay",
    "cosineannealing",
    "cosineannealingwarmup",
    "exponentialwarmup",
]


@dataclass
class TrainerConfig:
    total_training_tokens: int = opt(10_000_000, help="tokens to train on", stream=True)
    lr: float | None = opt(
        None,
        help="default 4e-3 × min(1, √(4608 / d_sae)) × min(1, √(300k / total_training_tokens)): at d_sae 4608 "
        "on SmolLM2 layer 12, 300k tokens, 4e-3 beat 2e-3 (SAE EV 0.55 → 0.79, CE recovered 0.963 → 0.981; skip "
        "transcoder EV 0.66 → 0.70); at 1.2M tokens 2e-3 beat 4e-3 (EV 0.899 → 0.907, dead 1.3 → 0.2 %); larger "
        "dictionaries ∝ 1/√d_sae, as Gao et al. 2024",
    )
    betas: tuple[float, float] = opt((0.9, 0.999))
    eps: float = opt(1e-8)
    optimizer_foreach: bool = opt(True, help="foreach Adam (fused on CUDA when available)")
    lr_scheduler: LrScheduler = opt("constantwithwarmup")
    lr_warm_up_steps: Steps = opt(0.01)
    lr_cool_down_steps: Steps = opt(0.2)
    lr_end_ratio: float = opt(1 / 32)
    clip_grad_norm: float = opt(0.0, help="0 = off")
    gradient_accumulation_steps: int = opt(1)
    tensor_parallel: int = opt(
        1,
        help="split the latents over this many ranks (DTensor on a (dp, tp) mesh; dp = processes / this); "
        "kinds sae, transcoder, crosscoder, clt, molt (whole transforms: it must divide every rank_counts count); "
        "checkpoints become torch.distributed.checkpoint folders",
    )
    # sparsity
    l1_coefficient: float | None = opt(
        None,
        help="sparsity penalty weight (relu / jumprelu); default by penalty: 5 for power (L1 weighted by "
        "decoder norms, as Anthropic's April 2024 update with E‖x‖ = √d_model), 0.5 for tanh, tanh-quad and l0",
    )
    l1_coefficient_warmup_steps: Steps = opt(0.05)
    sparsity_loss_type: SparsityLoss | None = opt(
        None, help="default: power (L1) for relu, tanh for jumprelu, none for topk"
    )
    p: float = opt(1.0, help="p of the power penalty")
    tanh_stretch_coefficient: float = opt(4.0)
    frequency_scale: float = opt(0.01)
    lp_coefficient: float = opt(0.0, help="JumpReLU pre-activation loss weight")
    auxk_coefficient: float = opt(1 / 32, help="AuxK loss weight (topk/batchtopk); 0 = off")
    k_aux: int | None = opt(None, help="latents in AuxK (default d_model / 2, written into the run's config.toml)")
    multi_topk_coefficient: float = opt(
        0.0,
        help="Multi-TopK (Gao et al. 2024, sparsify's 1/8): also reconstruct from the top 4k latents with this "
        "weight, so 4× as many latents get a gradient each step (topk/batchtopk; 0 = off)",
    )
    dead_threshold_tokens: int | None = opt(
        None,
        help="a latent is dead after this many tokens without firing (default: 10 % of the run's tokens, "
        "at most 10M, written into the run's config.toml)",
    )
    # k schedule
    initial_k: int | None = opt(None, help="k at the start, annealed to dictionary.k")
    k_warmup_steps: Steps = opt(0.1)
    k_cold_booting_steps: Steps = opt(0)
    k_schedule_type: Literal["linear", "exponential"] = opt("linear")
    k_exponential_factor: float = opt(3.0)
    jumprelu_lr_factor: float = opt(1.0)
    amp_dtype: Literal["float32", "float16", "bfloat16"] | None = opt(None, help="autocast dtype (None = off)")
    # statistics, logging, checkpoints
    feature_sampling_window: Steps = opt(0.1, help="window of the dead/dense statistics (steps or fraction)")
    dead_feature_threshold: float = opt(1e-6)
    dense_feature_threshold: float = opt(0.1)
    log_frequency: int = opt(100)
    n_checkpoints: int = opt(5)
    check_point_save_mode: Literal["linear", "log"] = opt("linear")
    checkpoint_every_seconds: float = opt(600.0, help="also checkpoint at least this often (0 = off)")

    def validate(self) -> None:
        if self.total_training_tokens <= 0:
            raise bad("total_training_tokens", "must be > 0")
        if self.checkpoint_every_seconds < 0:
            raise bad("checkpoint_every_seconds", f"must be >= 0 (0 = off), found {self.checkpoint_every_seconds}")
        if self.lr is not None and self.lr <= 0:
            raise bad("lr", f"must be > 0, found {self.lr}")
        for b in self.betas:
            if not 0 <= b < 1:
                raise bad("betas", f"each must be in [0, 1), found {self.betas}")
        for name in (
            "lr_warm_up_steps",
            "lr_cool_down_steps",
            "l1_coefficient_warmup_steps",
            "k_warmup_steps",
            "k_cold_booting_steps",
            "feature_sampling_window",
        ):
            v = getattr(self, name)
            if v < 0 or (isinstance(v, float) and v > 1):
                raise bad(name, f"a step count (int >= 0) or a fraction of the run in [0, 1], found {v}")
        if self.multi_topk_coefficient < 0:
            raise bad("multi_topk_coefficient", f"must be >= 0 (0 = off), found {self.multi_topk_coefficient}")
        if self.gradient_accumulation_steps < 1:
            raise bad("gradient_accumulation_steps", "must be >= 1")
        if self.tensor_parallel < 1:
            raise bad("tensor_parallel", "must be >= 1")
        if self.log_frequency < 1:
            raise bad("log_frequency", "must be >= 1")
        if self.n_checkpoints < 0:
            raise bad("n_checkpoints", "must be >= 0")
        if not 0 < self.lr_end_ratio <= 1:
            raise bad("lr_end_ratio", "must be in (0, 1]")
