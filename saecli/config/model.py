"""[model]: which causal language model to load and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saecli.config.base import bad, opt

Dtype = Literal["float32", "float16", "bfloat16", "float64"]


@dataclass
class ModelConfig:
    name: str = opt(help="hub name or local directory of a transformers causal LM", stream=True)
    gguf_file: str | None = opt(None, help="GGUF file inside `name` (loaded and dequantised with `gguf`)", stream=True)
    dtype: Dtype = opt("float32", help="dtype the model runs in", stream=True)
    device: str = opt("auto", help="'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1' ...", stream=True)
    revision: str | None = opt(None, help="hub revision", stream=True)
    trust_remote_code: bool = opt(False, help="allow model code from the hub")
    prepend_bos: bool | None = opt(
        None, help="prepend the BOS token to every context (default: when the tokenizer does not add one)", stream=True
    )
    bos_token: str | None = opt(
        None, help="BOS token text to use when the tokenizer defines none (e.g. '<|im_start|>')", stream=True
    )

    def validate(self) -> None:
        if not self.name:
            raise bad("name", "must name a hub model or a local directory")
        if not (
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps"
        ):
            raise bad("device", f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', found {self.device!r}")
