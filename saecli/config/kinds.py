"""[sae] sections of the kinds beyond the plain SAE: transcoder, crosscoder, clt, lorsa, molt.

Each class adds its own keys to the shared `DictionaryConfig` and registers itself under its `kind`
name; `saecli/config/dictionary.py` imports this module lazily when it parses a `[sae]` table. The
dictionary modules (`saecli/dictionaries/<kind>.py`) read these fields; the trainer never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saecli.config.base import bad, opt
from saecli.config.dictionary import DictionaryConfig, register_config

DecoderNormReduction = Literal["sum", "norm"]


def _check_hooks(key: str, hooks: list[str] | None, *, at_least: int = 1) -> None:
    if hooks is None:
        return
    if len(hooks) < at_least:
        raise bad(key, f"must list at least {at_least} hook point(s), found {len(hooks)}")
    dup = sorted({h for h in hooks if hooks.count(h) > 1})
    if dup:
        raise bad(key, f"lists {', '.join(dup)} more than once")


def _check_output_scaling(cfg: DictionaryConfig) -> None:
    """Kinds whose outputs are other hooks than their inputs cannot scale outputs per token or per batch:
    mapping a reconstruction back needs the output's own norm, which a spliced dictionary does not have."""
    if cfg.norm_activation in ("token-wise", "batch-wise"):
        raise bad("norm_activation", f"{cfg.norm_activation} scaling of the output needs the output's own norm, "
                                     "which a spliced dictionary does not have: use dataset-wise or none")


@register_config("transcoder")
@dataclass
class TranscoderConfig(DictionaryConfig):
    """Reads one hook point, reconstructs another (an MLP's input → its output)."""

    hook_point_in: str | None = opt(
        None, help="hook point read (default: the first of activations.hook_points), e.g. blocks.3.ln2.hook_normalized")
    hook_point_out: str | None = opt(
        None, help="hook point reconstructed (default: the second of activations.hook_points), e.g. blocks.3.hook_mlp_out")
    skip_connection: bool = opt(False, help="add a learned linear skip x·W_skip (zero-initialised): a skip transcoder")
    initialize_tc_with_mlp: bool = opt(
        False, help="set decoder rows from the model's MLP probed along each encoder direction (needs [model])")
    mlp_layer: int | None = opt(None, help="layer whose MLP initialises the decoder (default: hook_point_in's layer)")
    sparsity_include_decoder_norm: bool = opt(
        False, help="rank/weight latents by decoder row norms; off for transcoders, whose decoder starts at zero "
        "(init.decoder_init_norm; SmolLM2 layer-12 MLP: dead 16 % gated vs 14 % ungated, same EV)")

    def validate(self) -> None:
        super().validate()
        if self.apply_decoder_bias_to_pre_encoder:
            raise bad("apply_decoder_bias_to_pre_encoder",
                      "a transcoder's decoder bias lives in the output space; it cannot be subtracted from the input")
        if self.hook_point_in is not None and self.hook_point_in == self.hook_point_out:
            raise bad("hook_point_out", "equals hook_point_in: use kind = \"sae\" to reconstruct the input")
        _check_output_scaling(self)
        if self.mlp_layer is not None and self.mlp_layer < 0:
            raise bad("mlp_layer", f"must be >= 0, found {self.mlp_layer}")


@register_config("crosscoder")
@dataclass
class CrosscoderConfig(DictionaryConfig):
    """Shared latents over several heads (layers of one model, or one layer of several models)."""

    hook_points: list[str] | None = opt(
        None, help="one head per hook point (default: every activations.hook_points entry)")
    decoder_norm_reduction: DecoderNormReduction = opt(
        "sum", help="a latent's decoder norm: sum of its per-head norms (Anthropic's crosscoders) or their L2 norm")

    def validate(self) -> None:
        super().validate()
        _check_hooks("hook_points", self.hook_points, at_least=1)


@register_config("clt")
@dataclass
class CLTConfig(DictionaryConfig):
    """Cross-layer transcoder: an encoder per layer, decoders from layer i into every layer L >= i.

    `d_sae` / `expansion_factor` count the latents of ONE layer (the CLT has n_layers·d_sae in all).
    """

    hook_points_in: list[str] | None = opt(
        None, help="the input of each layer, in layer order (default: the first half of activations.hook_points)")
    hook_points_out: list[str] | None = opt(
        None, help="the output of each layer, same order (default: the second half of activations.hook_points)")
    layer_k: list[int] | None = opt(
        None, help="k of each layer (topk/batchtopk; default sae.k everywhere); the k schedule scales them all")
    decoder_norm_reduction: DecoderNormReduction = opt(
        "norm", help="a latent's decoder norm over its target layers: L2 norm of the concatenation, or sum")

    def validate(self) -> None:
        super().validate()
        _check_hooks("hook_points_in", self.hook_points_in)
        _check_hooks("hook_points_out", self.hook_points_out)
        if (self.hook_points_in is None) != (self.hook_points_out is None):
            raise bad("hook_points_out" if self.hook_points_out is None else "hook_points_in",
                      "give both hook_points_in and hook_points_out, or neither")
        if self.hook_points_in is not None and len(self.hook_points_in) != len(self.hook_points_out):
            raise bad("hook_points_out", f"needs one hook per layer: {len(self.hook_points_in)} in, "
                                         f"{len(self.hook_points_out)} out")
        if self.apply_decoder_bias_to_pre_encoder:
            raise bad("apply_decoder_bias_to_pre_encoder",
                      "a CLT's decoder biases live in the output spaces; they cannot be subtracted from the inputs")
        _check_output_scaling(self)
        if self.layer_k is not None:
            if any(k <= 0 for k in self.layer_k):
                raise bad("layer_k", f"every k must be > 0, found {self.layer_k}")
            if self.d_sae is not None and max(self.layer_k) > self.d_sae:
                raise bad("layer_k", f"every k must be <= d_sae ({self.d_sae}), found {max(self.layer_k)}")
            if self.hook_points_in is not None and len(self.layer_k) != len(self.hook_points_in):
                raise bad("layer_k", f"needs one k per layer ({len(self.hook_points_in)}), found {len(self.layer_k)}")


def _check_io_hooks(cfg: DictionaryConfig) -> None:
    """Shared checks of the kinds that read one hook and write another (LORSA, MOLT)."""
    if cfg.hook_point_in is not None and cfg.hook_point_in == cfg.hook_point_out:
        raise bad("hook_point_out", "equals hook_point_in: these kinds reconstruct another hook point")
    if cfg.apply_decoder_bias_to_pre_encoder:
        raise bad("apply_decoder_bias_to_pre_encoder",
                  "the decoder bias lives in the output space; it cannot be subtracted from the input")
    if cfg.norm_activation in ("token-wise", "batch-wise"):
        raise bad("norm_activation", f"{cfg.norm_activation} scaling of the output needs the output's own norm, "
                                     "which a spliced dictionary does not have: use dataset-wise or none")


@register_config("lorsa")
@dataclass
class LorsaConfig(DictionaryConfig):
    """Low-rank sparse attention: d_sae rank-1 OV heads sharing n_qk_heads rotary QK heads (whole contexts)."""

    hook_point_in: str | None = opt(
        None, help="hook point read (default: the first of activations.hook_points), e.g. blocks.3.ln1.hook_normalized")
    hook_point_out: str | None = opt(
        None, help="hook point reconstructed (default: the second of activations.hook_points), e.g. blocks.3.hook_attn_out")
    n_qk_heads: int | None = opt(None, help="number of QK heads; d_sae (the OV heads) must be a multiple of it")
    d_qk_head: int | None = opt(None, help="dimension of each QK head (default: d_model / n_qk_heads)")
    use_rotary: bool = opt(True, help="rotary position embeddings on queries and keys (llama-style, half rotation)")
    rope_theta: float | None = opt(
        None, help="rotary base (default: the model's when initialize_lorsa_with_mhsa, else 10000)")
    attention_scale: float | None = opt(
        None, help="softmax scale of q·k (default: 1/√d_qk_head; the model's with initialize_lorsa_with_mhsa)")
    initialize_lorsa_with_mhsa: bool = opt(
        False, help="copy W_Q/W_K from the model's attention layer (needs [model]; GQA handled)")
    attn_layer: int | None = opt(None, help="layer whose attention initialises Q/K (default: hook_point_in's layer)")

    def validate(self) -> None:
        super().validate()
        _check_io_hooks(self)
        if self.n_qk_heads is None:
            raise bad("n_qk_heads", "give the number of QK heads (e.g. the model's number of attention heads)")
        if self.n_qk_heads <= 0:
            raise bad("n_qk_heads", f"must be > 0, found {self.n_qk_heads}")
        if self.d_sae is not None and self.d_sae % self.n_qk_heads:
            raise bad("n_qk_heads", f"must divide d_sae ({self.d_sae}): each QK head serves d_sae / n_qk_heads "
                                    f"OV heads, found {self.n_qk_heads}")
        if self.d_qk_head is not None and self.d_qk_head <= 0:
            raise bad("d_qk_head", f"must be > 0, found {self.d_qk_head}")
        if self.use_rotary and self.d_qk_head is not None and self.d_qk_head % 2:
            raise bad("d_qk_head", f"rotary embeddings rotate pairs of dimensions: must be even, found {self.d_qk_head}")
        if self.rope_theta is not None and self.rope_theta <= 0:
            raise bad("rope_theta", f"must be > 0, found {self.rope_theta}")
        if self.attention_scale is not None and self.attention_scale <= 0:
            raise bad("attention_scale", f"must be > 0, found {self.attention_scale}")
        if self.attn_layer is not None and self.attn_layer < 0:
            raise bad("attn_layer", f"must be >= 0, found {self.attn_layer}")


@register_config("molt")
@dataclass
class MOLTConfig(DictionaryConfig):
    """Mixture of linear transforms: `rank_counts = {rank: count}` low-rank transforms U_i V_i, sparsely gated.

    d_sae is the number of transforms, Σ counts (give d_sae only to double-check it).
    """

    hook_point_in: str | None = opt(
        None, help="hook point read (default: the first of activations.hook_points), e.g. blocks.3.ln2.hook_normalized")
    hook_point_out: str | None = opt(
        None, help="hook point reconstructed (default: the second of activations.hook_points), e.g. blocks.3.hook_mlp_out")
    rank_counts: dict[str, int] | None = opt(
        None, help='how many transforms of each rank, e.g. {"4" = 64, "16" = 16} (TOML keys are strings)')

    def ranks(self) -> list[tuple[int, int]]:
        """[(rank, count)] sorted by rank, keys parsed to int."""
        return sorted((int(r), int(c)) for r, c in (self.rank_counts or {}).items())

    def resolved_d_sae(self, d_model: int) -> int:
        return sum(c for _, c in self.ranks())

    def validate(self) -> None:
        if not self.rank_counts:
            raise bad("rank_counts", 'give the transforms as {rank = count}, e.g. rank_counts = {"4" = 64, "16" = 16}')
        for r, c in self.rank_counts.items():
            try:
                rank = int(r)
            except (TypeError, ValueError):
                raise bad(f"rank_counts.{r}", f"a rank must be a positive integer, found {r!r}") from None
            if rank <= 0:
                raise bad(f"rank_counts.{r}", f"a rank must be a positive integer, found {r!r}")
            if int(c) <= 0:
                raise bad(f"rank_counts.{r}", f"a count must be > 0, found {c}")
        total = sum(c for _, c in self.ranks())
        if len({int(r) for r in self.rank_counts}) != len(self.rank_counts):
            raise bad("rank_counts", "lists a rank twice (e.g. \"4\" and \"04\")")
        if self.expansion_factor is not None:
            raise bad("expansion_factor", "a MOLT's size is Σ rank_counts; leave expansion_factor out")
        if self.d_sae is not None and self.d_sae != total:
            raise bad("d_sae", f"is the number of transforms, Σ rank_counts = {total}; found {self.d_sae} (leave it out)")
        self.d_sae = total
        super().validate()
        _check_io_hooks(self)
