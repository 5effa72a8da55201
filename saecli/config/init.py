"""[init]: how a fresh dictionary's weights are set before training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saecli.config.base import bad, opt


@dataclass
class InitConfig:
    decoder_uniform_bound: float | None = opt(
        None, help="W_dec ~ U(±bound) before row normalisation (default 1/√d_sae)"
    )
    decoder_init_norm: float | None = opt(
        None,
        help="rescale each decoder row to this norm at init, 0 = a zero decoder (default: 0 for an ungated "
        "transcoder: dead latents 13.9 % → 2.1 % on SmolLM2's layer-12 MLP; else the uniform draw's norms; 1 with "
        "decoder_unit_norm)",
    )
    init_encoder_with_decoder_transpose: bool | None = opt(
        None,
        help="start the encoder as the decoder's transpose; default: yes, except for a transcoder, whose encoder "
        "reads another space (SmolLM2 layer-12 MLP, 300k tokens: 50 % of its latents dead tied, 16 % untied)",
    )
    init_encoder_with_decoder_transpose_factor: float | None = opt(
        None,
        help="tied encoder = decoder × this; default: SAE/transcoder encoder rows at norm 1/√3 (an nn.Linear "
        "row's, sparsify's encoder; SmolLM2 layer 12, 300k tokens: dead 3.3 % → 1.3 %, EV 0.791 → 0.803), "
        "other kinds (crosscoder, CLT, Lorsa) × 1",
    )
    bias_init_method: Literal["zero", "geometric_median", "mean"] = opt(
        "geometric_median", help="b_dec at init: zero, the mean, or the geometric median of a sample"
    )
    init_encoder_bias_with_mean_hidden_pre: bool = opt(
        True,
        help="b_enc = −mean pre-activation on a batch, so the encoder starts on centred inputs (off: "
        "with uncentred activations a third to a half of TopK latents never fire)",
    )
    grid_search_init_norm: bool = opt(False, help="pick the decoder norm with the lowest initial loss on a batch")
    init_batches: int = opt(4, help="batches drawn for data-dependent init and the dataset-wise norm")

    def tie_encoder(self, same_space: bool = True) -> bool:
        """Whether the encoder starts as the decoder's transpose: the key when set, else `same_space`
        (the dictionary's encoder reads the space its decoder writes)."""
        tied = self.init_encoder_with_decoder_transpose
        return same_space if tied is None else tied

    def tie_factor(self) -> float:
        """The tied encoder's factor for kinds without a default row norm (CLT, Lorsa): the key, else 1."""
        f = self.init_encoder_with_decoder_transpose_factor
        return 1.0 if f is None else f

    def validate(self) -> None:
        if self.init_batches <= 0:
            raise bad("init_batches", "must be > 0")
        if self.decoder_uniform_bound is not None and self.decoder_uniform_bound <= 0:
            raise bad("decoder_uniform_bound", "must be > 0")
        if self.decoder_init_norm is not None and self.decoder_init_norm < 0:
            raise bad("decoder_init_norm", "must be >= 0 (0 = a zero decoder)")
