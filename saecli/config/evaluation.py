"""[eval]: held-out evaluation of a trained dictionary."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import bad, opt


@dataclass
class EvalConfig:
    total_eval_tokens: int = opt(200_000, help="tokens of held-out activations to evaluate on")
    ce_loss: bool = opt(True, help="splice the dictionary into the model: CE loss recovered and KL (needs [model])")
    ce_contexts: int = opt(32, help="contexts used for the CE/KL splice evaluation")
    dead_threshold: float = opt(1e-6, help="a latent firing less often than this is dead")
    almost_dead_threshold: float = opt(1e-5)
    dense_threshold: float = opt(0.1, help="a latent firing more often than this is dense")
    skip_documents: int | None = opt(
        None, help="documents to skip for held-out text (default: those the training run consumed)"
    )
    sae_path: str | None = opt(None, help="dictionary folder to evaluate (default: run.output_dir)")
    cache_dir: str | None = opt(
        None,
        help="activation cache of held-out text (from `generate` on other documents); default: the live "
        "model on the documents after those training used",
    )
    bins_per_decade: int = opt(4, help="bins per power of ten in the log-density histogram")
    loss_recovered_min_gap: float = opt(
        0.05,
        help="nats: when zero- (or mean-) ablating the hooks moves the CE loss less than this, loss_recovered "
        "(or loss_recovered_mean_ablation) is reported undefined instead of a ratio of noise",
    )

    def validate(self) -> None:
        if self.total_eval_tokens <= 0:
            raise bad("total_eval_tokens", "must be > 0")
        if self.ce_contexts <= 0:
            raise bad("ce_contexts", "must be > 0")
        if self.skip_documents is not None and self.skip_documents < 0:
            raise bad("skip_documents", f"must be >= 0, found {self.skip_documents}")
        if self.loss_recovered_min_gap < 0:
            raise bad("loss_recovered_min_gap", f"must be >= 0, found {self.loss_recovered_min_gap}")
        if self.bins_per_decade <= 0:
            raise bad("bins_per_decade", "must be > 0")
        if not 0 <= self.dead_threshold <= self.almost_dead_threshold:
            raise bad("almost_dead_threshold", "must be >= dead_threshold >= 0")
