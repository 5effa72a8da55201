"""The [dictionary] table of kind = "sae" (read by `saecli/dictionaries/sae.py`): the shared keys of
`DictionaryConfig` and the one hook point it reconstructs.

Torch-free, beside its module: the config registry imports it to read a file without loading the model code."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import opt
from saecli.config.dictionary import DictionaryConfig, register_config


@register_config("sae")
@dataclass
class SAEConfig(DictionaryConfig):
    hook_point: str | None = opt(None, help="hook point read and reconstructed (default: the first of activations.hook_points)")

    def main_hook(self) -> str | None:
        return self.hook_point
