"""The [dictionary] table of kind = "sae" (read by `saecli/dictionaries/sae.py`): the shared keys of
`DictionaryConfig` and the one hook point it reconstructs.

Torch-free, beside its module: the config registry imports it to read a file without loading the model code."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import bad, opt
from saecli.config.dictionary import DictionaryConfig, register_config


@register_config("sae")
@dataclass
class SAEConfig(DictionaryConfig):
    hook_point: str | None = opt(
        None, help="hook point read and reconstructed (default: the first of activations.hook_points)"
    )
    matryoshka_prefixes: list[int] | None = opt(
        None,
        help="Matryoshka SAE (Bussmann et al. 2025): nested dictionary sizes, e.g. [256, 1024]; the loss is the "
        "mean of the reconstruction losses of latents [0, p) for each p and d_sae (topk/batchtopk)",
    )

    def default_include_decoder_norm(self) -> bool:
        """Top-k SAEs rank latents by their pre-activation h, as Gao et al. (2024), sparsify and
        dictionary_learning do: ranking by h·‖W_dec‖ starves latents whose decoder rows shrink (SmolLM2
        layer 12, 1M tokens: dead on held-out tokens 0.9 → 0.2 %, EV within 0.003). relu/jumprelu weight their
        penalty by ‖W_dec‖ (Conerly et al. 2024), which keeps the L1 from being met by growing the decoder."""
        return self.activation not in ("topk", "batchtopk")

    def validate(self) -> None:
        super().validate()
        prefixes = self.matryoshka_prefixes
        if prefixes is None:
            return
        if not prefixes or any(not isinstance(p, int) or p <= 0 for p in prefixes):
            raise bad("matryoshka_prefixes", f"a non-empty list of positive latent counts, found {prefixes}")
        if any(b <= a for a, b in zip(prefixes, prefixes[1:], strict=False)):
            raise bad("matryoshka_prefixes", f"prefix sizes must increase strictly, found {prefixes}")
        if self.d_sae is not None and prefixes[-1] > self.d_sae:
            raise bad("matryoshka_prefixes", f"prefix {prefixes[-1]} exceeds d_sae ({self.d_sae})")
        if self.activation not in ("topk", "batchtopk"):
            raise bad("matryoshka_prefixes", f"needs activation = 'topk' or 'batchtopk', found {self.activation!r}")

    def main_hook(self) -> str | None:
        return self.hook_point
