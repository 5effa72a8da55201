"""[analyze] and [dashboard]: feature analysis (`saecli analyze`), DLA (`saecli dla`) and the HTML site."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import bad, check_signs, opt


@dataclass
class AnalyzeConfig:
    """Feature analysis (`saecli analyze`) and direct logit attribution (`saecli dla`)."""

    name: str = opt("default", help="analysis name: re-running with the same name replaces it")
    total_analyzing_tokens: int = opt(1_000_000, help="tokens streamed through model and dictionary")
    context_size: int | None = opt(None, help="tokens per context (default: activations.context_size)")
    batch_contexts: int | None = opt(None, help="contexts per model forward (default: activations.model_batch_size)")
    top_samples: int = opt(16, help="top-activating contexts kept per feature")
    tiers: list[float] = opt(
        [0.9, 0.5, 0.1], help="lower tiers: contexts whose max activation is <= this fraction of the feature's max"
    )
    tier_samples: int = opt(8, help="contexts kept per feature in each tier")
    non_activating_samples: int = opt(8, help="random contexts where the feature never fires (for contrast)")
    histogram_bins: int = opt(60, help="log-spaced bins of the activation histogram")
    histogram_range: tuple[float, float] = opt(
        (1e-3, 1e3), help="activation range of the histogram; values outside land in the end bins"
    )
    seed: int = opt(0, help="seed of the non-activating reservoir")
    skip_documents: int | None = opt(None, help="documents to skip first (default: dataset.skip_documents)")
    sae_path: str | None = opt(None, help="dictionary folder (default: run.output_dir); --sae overrides")
    sae_name: str | None = opt(None, help="name of the dictionary in the store (default: run.name)")
    series: str = opt("default", help="store series the dictionary belongs to")
    dla_top: int = opt(10, help="top positive/negative tokens kept by `saecli dla`")

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise bad("name", f"must be a plain folder name, found {self.name!r}")
        check_signs(
            self,
            positive=(
                "total_analyzing_tokens",
                "top_samples",
                "histogram_bins",
                "dla_top",
                "context_size",
                "batch_contexts",
            ),
            non_negative=("tier_samples", "non_activating_samples"),
        )
        if any(not 0 < p < 1 for p in self.tiers):
            raise bad("tiers", f"each tier is a fraction in (0, 1), found {self.tiers}")
        lo, hi = self.histogram_range
        if not 0 < lo < hi:
            raise bad("histogram_range", f"expected 0 < low < high, found {list(self.histogram_range)}")


@dataclass
class DashboardConfig:
    """The static HTML dashboard `saecli analyze --html` writes."""

    enabled: bool = opt(False, help="write the HTML site after every `saecli analyze` (same as --html)")
    output_dir: str | None = opt(None, help="site folder (default: <dictionary>/analysis/<name>/html)")
    max_features: int | None = opt(None, help="feature pages to write (the most active first; default: all that fire)")
    window_before: int = opt(24, help="tokens shown before a context's peak (the rest folds away)")
    window_after: int = opt(8, help="tokens shown after a context's peak")

    def validate(self) -> None:
        check_signs(self, positive=("max_features",), non_negative=("window_before", "window_after"))
