"""The [dictionary] table of kind = "transcoder" (read by `saecli/dictionaries/transcoder.py`).

Torch-free, beside its module: the config registry imports it to read a file without loading the model code."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import bad, opt
from saecli.config.dictionary import DictionaryConfig, check_output_hook_listed, check_output_scaling, register_config


@register_config("transcoder")
@dataclass
class TranscoderConfig(DictionaryConfig):
    """Reads one hook point, reconstructs another (an MLP's input → its output)."""

    hook_point_in: str | None = opt(
        None, help="hook point read (default: the first of activations.hook_points), e.g. blocks.3.ln2.hook_normalized"
    )
    hook_point_out: str | None = opt(
        None,
        help="hook point reconstructed (default: the second of activations.hook_points), e.g. blocks.3.hook_mlp_out",
    )
    skip_connection: bool = opt(False, help="add a learned linear skip x·W_skip (zero-initialised): a skip transcoder")
    initialize_tc_with_mlp: bool = opt(
        False, help="set decoder rows from the model's MLP probed along each encoder direction (needs [model])"
    )
    mlp_layer: int | None = opt(None, help="layer whose MLP initialises the decoder (default: hook_point_in's layer)")
    sparsity_include_decoder_norm: bool = opt(
        False,
        help="rank/weight latents by decoder row norms; off for transcoders, whose decoder starts at zero "
        "(init.decoder_init_norm; SmolLM2 layer-12 MLP: dead 16 % gated vs 14 % ungated, same EV)",
    )

    def check_stream_hooks(self, listed: list[str]) -> None:
        super().check_stream_hooks(listed)
        check_output_hook_listed(self, self.hook_point_out, listed)

    def validate(self) -> None:
        super().validate()
        if self.apply_decoder_bias_to_pre_encoder:
            raise bad(
                "apply_decoder_bias_to_pre_encoder",
                "a transcoder's decoder bias lives in the output space; it cannot be subtracted from the input",
            )
        if self.hook_point_in is not None and self.hook_point_in == self.hook_point_out:
            raise bad("hook_point_out", 'equals hook_point_in: use kind = "sae" to reconstruct the input')
        check_output_scaling(self)
        if self.mlp_layer is not None and self.mlp_layer < 0:
            raise bad("mlp_layer", f"must be >= 0, found {self.mlp_layer}")
