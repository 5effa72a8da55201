"""[sae]: the dictionary to train. `kind` picks the config class (and the module) from a registry.

Every kind shares the fields of `DictionaryConfig`; a kind adds its own by subclassing and
registering with `@register_config("kind")`. The trainer never looks past this base class.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from saecli.config.base import bad, opt
from saecli.errors import ConfigError

_Table = TypeVar("_Table", bound="DictionaryConfig")

Activation = Literal["relu", "topk", "batchtopk", "jumprelu"]
NormActivation = Literal["token-wise", "batch-wise", "dataset-wise", "none"]
DecoderNormReduction = Literal["sum", "norm"]

DICTIONARY_CONFIGS: dict[str, type[DictionaryConfig]] = {}


def register_config(kind: str):
    def deco(cls):
        DICTIONARY_CONFIGS[kind] = cls
        cls.kind_name = kind
        return cls

    return deco


@dataclass
class DictionaryConfig:
    kind: str = opt("sae", help="dictionary kind: " + "sae, transcoder, crosscoder, clt, lorsa, molt")
    d_sae: int | None = opt(None, help="number of latents (or give expansion_factor)")
    expansion_factor: float | None = opt(None, help="d_sae = expansion_factor × d_model")
    activation: Activation = opt("topk", help="relu (L1), topk, batchtopk or jumprelu")
    k: int = opt(32, help="active latents per token (topk/batchtopk)")
    norm_activation: NormActivation = opt("dataset-wise", help="input scaling so that E‖x‖ = √d_model")
    use_decoder_bias: bool = opt(True)
    apply_decoder_bias_to_pre_encoder: bool = opt(False, help="subtract b_dec from the input before encoding")
    decoder_unit_norm: bool = opt(
        False, help="keep decoder rows at unit norm after every step (default: free norms, weighted penalty)"
    )
    sparsity_include_decoder_norm: bool | None = opt(
        None,
        help="rank latents by h·‖W_dec‖ and weight penalties by ‖W_dec‖ (default: the kind's; an sae ranks by h "
        "under topk/batchtopk, dead 0.9 → 0.2 % at 1M SmolLM2 tokens, and weights its relu/jumprelu penalty)",
    )
    jumprelu_threshold_init: float = opt(0.1, help="initial JumpReLU threshold (normalised units)")
    jumprelu_bandwidth: float = opt(2.0, help="straight-through bandwidth ε of JumpReLU")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = opt("float32", help="parameter dtype")
    device: str = opt("auto", help="'auto' = the model's device (or cuda if present)")
    fold_activation_scale: bool = opt(True, help="fold the dataset-wise scale into the saved weights")
    batchtopk_threshold_decay: float = opt(
        0.999,
        help="BatchTopK inference threshold: decay of the running average of each batch's smallest kept activation",
    )
    sparse_kernels: bool = opt(True, help="use the sparse TopK/ReLU train-step kernels when they apply")
    pretrained: str | None = opt(
        None,
        help="start from this dictionary folder (saecli run, SAELens, sparsify or dictionary_learning; "
        "format detected from its files) and continue training it",
    )

    kind_name = "sae"

    @classmethod
    def dispatch(cls, table: dict, key: str) -> type:
        kind = table.get("kind", "sae")
        _load_kinds()
        if kind not in DICTIONARY_CONFIGS:
            close = difflib.get_close_matches(str(kind), list(DICTIONARY_CONFIGS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown dictionary kind {kind!r}{hint} (known: {', '.join(sorted(DICTIONARY_CONFIGS))})",
                key=f"{key}.kind" if key else "kind",
            )
        return DICTIONARY_CONFIGS[kind]

    def validate(self) -> None:
        if self.d_sae is None and self.expansion_factor is None:
            raise bad("d_sae", "give d_sae or expansion_factor")
        if self.d_sae is not None and self.d_sae <= 0:
            raise bad("d_sae", f"must be > 0, found {self.d_sae}")
        if self.expansion_factor is not None and self.expansion_factor <= 0:
            raise bad("expansion_factor", f"must be > 0, found {self.expansion_factor}")
        if self.k <= 0:
            raise bad("k", f"must be > 0, found {self.k}")
        if self.d_sae is not None and self.activation in ("topk", "batchtopk") and self.k > self.d_sae:
            raise bad("k", f"must be <= d_sae ({self.d_sae}), found {self.k}")
        if self.jumprelu_bandwidth <= 0:
            raise bad("jumprelu_bandwidth", "must be > 0")
        if self.jumprelu_threshold_init <= 0:
            raise bad("jumprelu_threshold_init", "must be > 0 (the threshold is stored as its log)")
        if not 0 <= self.batchtopk_threshold_decay < 1:
            raise bad("batchtopk_threshold_decay", "must be in [0, 1)")

    def resolved_d_sae(self, d_model: int) -> int:
        if self.d_sae is not None:
            return int(self.d_sae)
        assert self.expansion_factor is not None  # validate() requires one of the two
        return int(round(self.expansion_factor * d_model))

    def named_hooks(self) -> dict[str, list[str]]:
        """The hook points this table names, by key: every set field called `hook_point*` (a kind's own)."""
        out: dict[str, list[str]] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name) if f.name.startswith("hook_point") else None
            if value is not None:
                out[f.name] = [value] if isinstance(value, str) else list(value)
        return out

    def main_hook(self) -> str | None:
        """The hook point whose width sizes the dictionary; None: the stream's first."""
        return None

    def check_stream_hooks(self, listed: list[str]) -> None:
        """Rules between this table and activations.hook_points (`listed`), checked at load; a kind adds its own.
        Raises `bad(key, ...)` with the key relative to the table."""
        for key, hooks in self.named_hooks().items():
            for hook in hooks:
                if hook not in listed:
                    raise bad(
                        key,
                        f"`{hook}` is not among activations.hook_points ({', '.join(listed)}): add it "
                        "there, or set this key to one of them",
                    )

    def default_include_decoder_norm(self) -> bool:
        """`sparsity_include_decoder_norm` when the file leaves it out (a kind may decide otherwise)."""
        return True

    def resolved(self: _Table) -> _Table:
        """This table with the defaults that depend on its other keys written in (a value set is kept)."""
        if self.sparsity_include_decoder_norm is not None:
            return self
        return dataclasses.replace(self, sparsity_include_decoder_norm=self.default_include_decoder_norm())

    def known_latents(self) -> int | None:
        """The dictionary's number of latents when the file alone decides it (else None: it waits for
        d_model). The default lr scales with it (`saecli.config.defaults.default_lr`)."""
        return self.d_sae


def _load_kinds() -> None:
    """Import every kind's config module (`saecli/dictionaries/<kind>_config.py`, torch-free), which
    registers its class: the kind list is the dictionary registry's (`saecli.dictionaries.kinds`)."""
    import importlib

    from saecli.dictionaries.kinds import KIND_MODULES, config_module

    for kind in KIND_MODULES:
        importlib.import_module(config_module(kind))


def check_hooks(key: str, hooks: list[str] | None, *, at_least: int = 1) -> None:
    """A list of hook points of a kind's table: at least `at_least`, none twice."""
    if hooks is None:
        return
    if len(hooks) < at_least:
        raise bad(key, f"must list at least {at_least} hook point(s), found {len(hooks)}")
    dup = sorted({h for h in hooks if hooks.count(h) > 1})
    if dup:
        raise bad(key, f"lists {', '.join(dup)} more than once")


def check_output_scaling(cfg: DictionaryConfig) -> None:
    """Kinds whose outputs are other hooks than their inputs cannot scale outputs per token or per batch:
    mapping a reconstruction back needs the output's own norm, which a spliced dictionary does not have."""
    if cfg.norm_activation in ("token-wise", "batch-wise"):
        raise bad(
            "norm_activation",
            f"{cfg.norm_activation} scaling of the output needs the output's own norm, "
            "which a spliced dictionary does not have: use dataset-wise or none",
        )


def check_output_hook_listed(cfg: DictionaryConfig, hook_point_out: str | None, listed: list[str]) -> None:
    """A kind that reads one hook and reconstructs another needs a second hook when `hook_point_out` is unset."""
    if hook_point_out is None and len(listed) < 2:
        raise ConfigError(
            f"a {cfg.kind} reads one hook point and reconstructs another: set hook_point_out in "
            "this table or list a second hook in activations.hook_points",
            key="activations.hook_points",
        )


def check_io_hooks(cfg: Any) -> None:
    """Shared checks of the kinds that read one hook and write another (LORSA, MOLT)."""
    if cfg.hook_point_in is not None and cfg.hook_point_in == cfg.hook_point_out:
        raise bad("hook_point_out", "equals hook_point_in: these kinds reconstruct another hook point")
    if cfg.apply_decoder_bias_to_pre_encoder:
        raise bad(
            "apply_decoder_bias_to_pre_encoder",
            "the decoder bias lives in the output space; it cannot be subtracted from the input",
        )
    check_output_scaling(cfg)


def known_kinds() -> list[str]:
    _load_kinds()
    return sorted(DICTIONARY_CONFIGS)


def as_plain(cfg: Any) -> dict:
    from saecli.config.base import to_dict

    return to_dict(cfg)
