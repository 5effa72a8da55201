"""The [dictionary] table of kind = "lorsa" (read by `saecli/dictionaries/lorsa.py`).

Torch-free, beside its module: the config registry imports it to read a file without loading the model code."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import bad, opt
from saecli.config.dictionary import DictionaryConfig, check_io_hooks, check_output_hook_listed, register_config


@register_config("lorsa")
@dataclass
class LorsaConfig(DictionaryConfig):
    """Low-rank sparse attention: d_sae rank-1 OV heads sharing n_qk_heads rotary QK heads (whole contexts)."""

    hook_point_in: str | None = opt(
        None, help="hook point read (default: the first of activations.hook_points), e.g. blocks.3.ln1.hook_normalized"
    )
    hook_point_out: str | None = opt(
        None,
        help="hook point reconstructed (default: the second of activations.hook_points), e.g. blocks.3.hook_attn_out",
    )
    n_qk_heads: int | None = opt(None, help="number of QK heads; d_sae (the OV heads) must be a multiple of it")
    d_qk_head: int | None = opt(None, help="dimension of each QK head (default: d_model / n_qk_heads)")
    use_rotary: bool = opt(True, help="rotary position embeddings on queries and keys (llama-style, half rotation)")
    rope_theta: float | None = opt(
        None, help="rotary base (default: the model's when initialize_lorsa_with_mhsa, else 10000)"
    )
    attention_scale: float | None = opt(
        None, help="softmax scale of q·k (default: 1/√d_qk_head; the model's with initialize_lorsa_with_mhsa)"
    )
    initialize_lorsa_with_mhsa: bool = opt(
        False, help="copy W_Q/W_K from the model's attention layer (needs [model]; GQA handled)"
    )
    attn_layer: int | None = opt(None, help="layer whose attention initialises Q/K (default: hook_point_in's layer)")

    def check_stream_hooks(self, listed: list[str]) -> None:
        super().check_stream_hooks(listed)
        check_output_hook_listed(self, self.hook_point_out, listed)

    def validate(self) -> None:
        super().validate()
        check_io_hooks(self)
        if self.n_qk_heads is None:
            raise bad("n_qk_heads", "give the number of QK heads (e.g. the model's number of attention heads)")
        if self.n_qk_heads <= 0:
            raise bad("n_qk_heads", f"must be > 0, found {self.n_qk_heads}")
        if self.d_sae is not None and self.d_sae % self.n_qk_heads:
            raise bad(
                "n_qk_heads",
                f"must divide d_sae ({self.d_sae}): each QK head serves d_sae / n_qk_heads "
                f"OV heads, found {self.n_qk_heads}",
            )
        if self.d_qk_head is not None and self.d_qk_head <= 0:
            raise bad("d_qk_head", f"must be > 0, found {self.d_qk_head}")
        if self.use_rotary and self.d_qk_head is not None and self.d_qk_head % 2:
            raise bad(
                "d_qk_head", f"rotary embeddings rotate pairs of dimensions: must be even, found {self.d_qk_head}"
            )
        if self.rope_theta is not None and self.rope_theta <= 0:
            raise bad("rope_theta", f"must be > 0, found {self.rope_theta}")
        if self.attention_scale is not None and self.attention_scale <= 0:
            raise bad("attention_scale", f"must be > 0, found {self.attention_scale}")
        if self.attn_layer is not None and self.attn_layer < 0:
            raise bad("attn_layer", f"must be >= 0, found {self.attn_layer}")
