"""The [dictionary] table of kind = "crosscoder" (read by `saecli/dictionaries/crosscoder.py`).

Torch-free, beside its module: the config registry imports it to read a file without loading the model code."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import opt
from saecli.config.dictionary import DecoderNormReduction, DictionaryConfig, check_hooks, register_config


@register_config("crosscoder")
@dataclass
class CrosscoderConfig(DictionaryConfig):
    """Shared latents over several heads (layers of one model, or one layer of several models)."""

    hook_points: list[str] | None = opt(
        None, help="one head per hook point (default: every activations.hook_points entry)"
    )
    decoder_norm_reduction: DecoderNormReduction = opt(
        "sum", help="a latent's decoder norm: sum of its per-head norms (Anthropic's crosscoders) or their L2 norm"
    )

    def validate(self) -> None:
        super().validate()
        check_hooks("hook_points", self.hook_points, at_least=1)
