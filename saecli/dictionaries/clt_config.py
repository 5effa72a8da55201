"""The [dictionary] table of kind = "clt" (read by `saecli/dictionaries/clt.py`).

Torch-free, beside its module: the config registry imports it to read a file without loading the model code."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import bad, opt
from saecli.config.dictionary import (
    DecoderNormReduction,
    DictionaryConfig,
    check_hooks,
    check_output_scaling,
    register_config,
)
from saecli.errors import ConfigError


@register_config("clt")
@dataclass
class CLTConfig(DictionaryConfig):
    """Cross-layer transcoder: an encoder per layer, decoders from layer i into every layer L >= i.

    `d_sae` / `expansion_factor` count the latents of ONE layer (the CLT has n_layers·d_sae in all).
    """

    hook_points_in: list[str] | None = opt(
        None, help="the input of each layer, in layer order (default: the first half of activations.hook_points)"
    )
    hook_points_out: list[str] | None = opt(
        None, help="the output of each layer, same order (default: the second half of activations.hook_points)"
    )
    layer_k: list[int] | None = opt(
        None, help="k of each layer (topk/batchtopk; default dictionary.k everywhere); the k schedule scales them all"
    )
    decoder_norm_reduction: DecoderNormReduction = opt(
        "norm", help="a latent's decoder norm over its target layers: L2 norm of the concatenation, or sum"
    )

    def known_latents(self) -> int | None:
        """n_layers × d_sae, when the file names the layers (else the stream's hook points decide)."""
        layers = self.hook_points_in
        return None if self.d_sae is None or layers is None else len(layers) * self.d_sae

    def check_stream_hooks(self, listed: list[str]) -> None:
        super().check_stream_hooks(listed)
        if self.hook_points_in is None and len(listed) % 2:
            raise ConfigError(
                "a CLT without hook_points_in/out in this table takes the first half of "
                "activations.hook_points as inputs and the second as outputs: it needs an even "
                f"number, found {len(listed)}",
                key="activations.hook_points",
            )

    def validate(self) -> None:
        super().validate()
        check_hooks("hook_points_in", self.hook_points_in)
        check_hooks("hook_points_out", self.hook_points_out)
        if (self.hook_points_in is None) != (self.hook_points_out is None):
            raise bad(
                "hook_points_out" if self.hook_points_out is None else "hook_points_in",
                "give both hook_points_in and hook_points_out, or neither",
            )
        if (
            self.hook_points_in is not None
            and self.hook_points_out is not None
            and len(self.hook_points_in) != len(self.hook_points_out)
        ):
            raise bad(
                "hook_points_out",
                f"needs one hook per layer: {len(self.hook_points_in)} in, {len(self.hook_points_out)} out",
            )
        if self.apply_decoder_bias_to_pre_encoder:
            raise bad(
                "apply_decoder_bias_to_pre_encoder",
                "a CLT's decoder biases live in the output spaces; they cannot be subtracted from the inputs",
            )
        check_output_scaling(self)
        if self.layer_k is not None:
            if any(k <= 0 for k in self.layer_k):
                raise bad("layer_k", f"every k must be > 0, found {self.layer_k}")
            if self.d_sae is not None and max(self.layer_k) > self.d_sae:
                raise bad("layer_k", f"every k must be <= d_sae ({self.d_sae}), found {max(self.layer_k)}")
            if self.hook_points_in is not None and len(self.layer_k) != len(self.hook_points_in):
                raise bad("layer_k", f"needs one k per layer ({len(self.hook_points_in)}), found {len(self.layer_k)}")
