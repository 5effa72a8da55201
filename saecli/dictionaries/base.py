"""The interface every dictionary kind implements. The trainer, eval, sweep and analysis know only this.

A dictionary reads activations at `in_hooks` and reconstructs activations at `out_hooks` (equal for an
SAE; MLP-in → MLP-out for a transcoder; several heads for a crosscoder; all layers for a CLT).

Inputs/targets are `dict[hook, Tensor]`. Token dictionaries get [N, d]; dictionaries with
`needs_context = True` (LORSA) get [B, T, d] plus a [B, T] mask.

Two layers of the same maths: a kind implements `encode(inputs)` and `decode_hooks(f)` on normalised
`{hook: tensor}` dicts (what the trainer uses); for single-hook kinds the base class adds the plain-tensor
API in raw units, `f = d.encode(x)`, `d.decode(f)` and `d(x)`, with `d.decode(d.encode(x)) == d(x)`.

Normalisation: a dictionary owns one scale per hook point (`scale.<hook>` buffers). `normalize()`
multiplies raw activations by it (dataset-wise: √d_model / E‖x‖; token-/batch-wise: computed on the
fly). `fold_activation_scale()` folds the dataset-wise scales into the weights so that the saved
dictionary maps raw activations to raw reconstructions (thresholds included).

Weights are saved as `sae_weights.safetensors` + `cfg.json` in a folder; `load_dictionary(folder)`
rebuilds the right kind through the registry.

Optional capabilities are declared here with their defaults, so callers use plain attribute access and a
kind overrides only what it has: `needs_model_init` / `init_from_model` (transcoder, LORSA), `analysis_extras`
(MOLT), `context_extras` (LORSA; `has_context_extras()` says whether a kind defines it), `dla_directions`
(crosscoder). tests/test_kind_contract.py checks every registered kind against this interface.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from saecli.config.dictionary import DictionaryConfig
    from saecli.config.init import InitConfig
    from saecli.lm.loading import LanguageModel


@dataclass
class StepContext:
    """Per-step hyper-parameters the trainer hands to `loss()`; schedules live in the trainer."""

    k: int | None = None  # current k (topk/batchtopk), after the k schedule
    l1_coefficient: float = 0.0  # current sparsity weight, after its warm-up
    lp_coefficient: float = 0.0
    auxk_coefficient: float = 0.0
    k_aux: int = 0
    multi_topk_coefficient: float = 0.0  # weight of the top-(MULTI_TOPK_FACTOR·k) reconstruction (topk/batchtopk)
    dead_mask: torch.Tensor | None = None  # [d_sae] bool: latents counted dead (for AuxK)
    sparsity_loss_type: str = "none"  # "power" | "tanh" | "tanh-quad" | "l0" (JumpReLU step STE) | "none"
    p: float = 1.0
    tanh_stretch_coefficient: float = 4.0
    frequency_scale: float = 0.01
    training: bool = True


@dataclass
class LossOutput:
    """What one forward pass produced: the loss to minimise and everything metrics need."""

    loss: torch.Tensor  # scalar
    terms: dict[str, torch.Tensor]  # e.g. {"mse": ..., "sparsity": ..., "aux": ...}, scalars (detached ok)
    feature_acts: torch.Tensor  # [N, d_sae] (or [B, T, d_sae]) latent activations (may be sparse-backed)
    reconstruction: dict[str, torch.Tensor]  # normalised reconstruction per out hook
    target: dict[str, torch.Tensor]  # normalised target per out hook
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific metrics (per head, per layer)


class Dictionary(nn.Module, abc.ABC):
    """Base class of all kinds. Subclasses set `kind` and implement the abstract methods."""

    kind: ClassVar[str] = ""
    needs_context: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "decode" in cls.__dict__:  # decode is the public raw-tensor API below, built on decode_hooks
            raise TypeError(
                f"{cls.__name__} defines decode(): a kind implements decode_hooks(feature_acts, "
                "inputs=None) (normalised reconstruction per hook); Dictionary.decode gives raw tensors"
            )
        if "encode" in cls.__dict__:  # every kind's encode also takes a plain tensor (see _tensor_encode)
            cls.encode = _tensor_encode(cls.__dict__["encode"])  # type: ignore[method-assign]

    cfg: DictionaryConfig

    def __init__(self, cfg: DictionaryConfig, d_model: int, in_hooks: list[str], out_hooks: list[str]):
        super().__init__()
        self.cfg = cfg.resolved()  # a table built in code, not loaded from a file, gets its defaults here
        self.d_model = d_model
        self.d_sae = cfg.resolved_d_sae(d_model)
        self.in_hooks = list(in_hooks)
        self.out_hooks = list(out_hooks)
        for hook in dict.fromkeys(self.in_hooks + self.out_hooks):
            self.register_buffer(_scale_name(hook), torch.ones(()), persistent=True)
        self.folded = False

    # ------------------------------------------------------------------ normalisation
    def scale(self, hook: str) -> torch.Tensor:
        return self.get_buffer(_scale_name(hook))

    def set_dataset_norm(self, hook: str, mean_norm: float) -> None:
        """Dataset-wise normalisation: scale so that E‖x‖ = √d_model."""
        self.scale(hook).fill_(float(self.d_model) ** 0.5 / max(float(mean_norm), 1e-12))

    def normalize(self, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw activations → the units the dictionary trains in (per `cfg.norm_activation`)."""
        mode = self.cfg.norm_activation
        if self.folded or mode == "none":
            return acts
        out = {}
        for hook, x in acts.items():
            if mode == "dataset-wise":
                out[hook] = x * self.scale(hook).to(x.dtype)
            elif mode == "token-wise":
                out[hook] = x * (self.d_model**0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            elif mode == "batch-wise":
                out[hook] = x * (self.d_model**0.5 / x.norm(dim=-1).mean().clamp_min(1e-12))
            else:
                raise ValueError(f"unknown norm_activation {mode!r}")
        return out

    def denormalize(self, hook: str, y: torch.Tensor, raw_input: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised reconstruction → raw units (token-/batch-wise need the raw input's norms)."""
        mode = self.cfg.norm_activation
        if self.folded or mode == "none":
            return y
        if mode == "dataset-wise":
            return y / self.scale(hook).to(y.dtype)
        assert raw_input is not None, "token-/batch-wise denormalisation needs the raw input"
        if mode == "token-wise":
            return y * (raw_input.norm(dim=-1, keepdim=True).clamp_min(1e-12) / self.d_model**0.5)
        return y * (raw_input.norm(dim=-1).mean().clamp_min(1e-12) / self.d_model**0.5)

    # ------------------------------------------------------------------ the kind's math
    @abc.abstractmethod
    def encode(self, inputs: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        """Normalised inputs → latent activations [N, d_sae] (or [B, T, d_sae])."""

    @abc.abstractmethod
    def decode_hooks(
        self, feature_acts: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Latent activations → normalised reconstruction per out hook (what training and splicing use).

        `inputs`: the normalised inputs the latents came from, for kinds whose output depends on the input
        itself, not only on f: a transcoder adds its skip x·W_skip when given them (without them: the
        latent part f W_dec + b_dec), a MOLT cannot decode without them. Other kinds ignore them."""

    def decode_needs_input(self) -> str:
        """Why `decode(f)` needs the raw input x as well ('' when f alone determines the reconstruction)."""
        mode = self.cfg.norm_activation
        if self.folded or mode not in ("token-wise", "batch-wise"):
            return ""
        what = "its own input's norm" if mode == "token-wise" else "the mean norm of its batch's inputs"
        return f'with norm_activation = "{mode}" each reconstruction is scaled back by {what}, which f does not carry'

    def decode(self, feature_acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Latents → the raw reconstruction tensor of the one output hook, so that `d.decode(d.encode(x))`
        equals `d(x)` (as in SAELens). Single-output kinds only (the others: `decode_hooks` or `reconstruct`).

        `x`, the raw input the latents came from, is needed where the output depends on more than f
        (`decode_needs_input()` says why): a transcoder's skip connection, a MOLT's transforms, token-/batch-wise
        input scaling. Without it those are a UsageError rather than a silently different answer."""
        from saecli.errors import UsageError

        if len(self.out_hooks) != 1:
            raise UsageError(
                f"a {self.kind} reconstructs {len(self.out_hooks)} hook points ({', '.join(self.out_hooks)}): "
                "decode(f) returns one raw tensor for single-output kinds only; use decode_hooks(f) for the "
                "normalised reconstruction per hook, or reconstruct({hook: activations}) for raw units"
            )
        out = self.out_hooks[0]
        inputs = None
        if x is not None:
            inputs = self.normalize({_single(self.in_hooks, "input"): x})
        elif why := self.decode_needs_input():
            raise UsageError(
                f"decode(f) cannot rebuild this {self.kind}'s output from the latents alone: {why}. "
                "Pass decode(f, x) with the raw input f was encoded from (or call d(x), which does both)"
            )
        return self.denormalize(out, self.decode_hooks(feature_acts, inputs)[out], x)

    @abc.abstractmethod
    def loss(
        self,
        inputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        ctx: StepContext,
        mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """Normalised inputs/targets → loss and terms. `mask` (context kinds) marks counted positions."""

    def forward(
        self,
        raw: dict[str, torch.Tensor] | torch.Tensor,
        ctx: StepContext | None = None,
        mask: torch.Tensor | None = None,
    ) -> LossOutput | torch.Tensor:
        """Raw activations (every hook the kind reads or writes) → LossOutput in normalised units.

        A plain tensor (single-hook kinds): raw input → raw reconstruction tensor, `sae(x)` as in SAELens."""
        if isinstance(raw, torch.Tensor):
            return self.reconstruct({_single(self.in_hooks, "input"): raw}, ctx)[_single(self.out_hooks, "output")]
        normed = self.normalize(raw)
        inputs = {h: normed[h] for h in self.in_hooks}
        targets = {h: normed[h] for h in self.out_hooks}
        return self.loss(inputs, targets, ctx or StepContext(training=False), mask=mask)

    def reconstruct(self, raw: dict[str, torch.Tensor], ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        """Raw inputs → raw reconstructions of the out hooks (what splicing into a model needs)."""
        normed = self.normalize({h: raw[h] for h in self.in_hooks})
        recon = self.decode_hooks(self.encode(normed, ctx), normed)
        return {h: self.denormalize(h, y, raw.get(h, raw[self.in_hooks[0]])) for h, y in recon.items()}

    # ------------------------------------------------------------------ training hooks
    def post_step(self) -> None:
        """Called after each optimizer step (e.g. project decoder rows back to unit norm)."""

    def param_groups(self, lr: float, jumprelu_lr_factor: float = 1.0) -> list[dict]:
        """Optimizer groups: everything at `lr`; JumpReLU log-thresholds (parameters named
        `...log_threshold`), if any, in a group "jumprelu" at lr × jumprelu_lr_factor (and not clipped)."""
        thresholds = [p for n, p in self.named_parameters() if n.endswith("log_threshold")]
        ids = {id(p) for p in thresholds}
        groups = [
            {
                "params": [p for p in self.parameters() if p.requires_grad and id(p) not in ids],
                "lr": lr,
                "name": "default",
            }
        ]
        if thresholds:
            groups.append({"params": thresholds, "lr": lr * jumprelu_lr_factor, "name": "jumprelu"})
        return groups

    @torch.no_grad()
    def init_from_data(self, batches: list[dict[str, torch.Tensor]], init_cfg: InitConfig) -> None:
        """Data-dependent initialisation (bias at the data's centre, ...) on a few normalised batches."""

    @property
    def needs_model_init(self) -> bool:
        """True when the trainer must call `init_from_model(lm, raw_batches)` after `init_from_data` (a
        transcoder copying its MLP, a LORSA its attention, when their config asks). Default: never."""
        return False

    @torch.no_grad()
    def init_from_model(self, lm: LanguageModel | None, raw_batches: list[dict[str, torch.Tensor]]) -> None:
        """Initialise from the language model's own weights; `raw_batches`: a few batches of RAW
        activations. Called only when `needs_model_init`; a kind without such an init has nothing to do."""

    # ------------------------------------------------------------------ analysis extras
    def analysis_extras(self) -> dict[str, torch.Tensor]:
        """Static per-feature arrays (first dimension d_sae) the analysis stores beside its own, e.g. a
        MOLT's rank per transform. Default: none."""
        return {}

    def context_extras(
        self, inputs: dict[str, torch.Tensor], features: torch.Tensor, positions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-context extras of each feature's top context (normalised in-hook activations [B, T, d], the
        feature index [B] and its peak position [B]) → {name: [B, ...]}; e.g. LORSA's attention row.
        Default: none (and the analysis does not re-run contexts: see `has_context_extras`)."""
        return {}

    @classmethod
    def has_context_extras(cls) -> bool:
        """Whether this kind defines `context_extras`, so the analysis re-runs each feature's top context."""
        return cls.context_extras is not Dictionary.context_extras

    def model_norm_shares(self) -> tuple[list[str], torch.Tensor] | None:
        """(model labels, [n_models, d_sae] each model's share of a latent's decoder norm) for a dictionary
        whose heads span several models (model diffing, `saecli eval`'s model_diff). Default: None."""
        return None

    def model_heads(self) -> dict[str, list[str]]:
        """{model label: its heads}, in the order of `model_norm_shares`'s labels. Default: none."""
        return {}

    def latent_order(self) -> dict[str, torch.Tensor]:
        """Tensor parallelism (a kind with `latent_axes`): {parameter: index order along its latent axis}
        for the parameters whose contiguous split over ranks is taken in another order than they are
        stored (a MOLT's transforms of uneven ranks), the first one giving the latents' order. The split
        order must not depend on the number of ranks, so that sharded checkpoints reshard. Default: none,
        split as stored."""
        return {}

    @classmethod
    def check_split(cls, cfg: DictionaryConfig, tp: int) -> None:
        """A ConfigError (naming the dictionary key) when `cfg` cannot be split over `tp` ranks beyond
        `tp` dividing d_sae. Default: nothing more to check."""

    def dla_directions(self) -> torch.Tensor | None:
        """[d_sae, d_model] raw-unit directions direct logit attribution reads, when a kind needs other than
        the default (each out hook's decoder in raw units, summed), e.g. a crosscoder's last head. Default:
        None, the default rule."""
        return None

    def decoder_norms(self) -> torch.Tensor:
        """[d_sae] norm of each latent's decoder direction(s), for metrics and DLA."""
        raise NotImplementedError

    def decoder_directions(self, hook: str | None = None) -> torch.Tensor:
        """[d_sae, d_model] decoder directions writing to `hook` (raw units after folding)."""
        raise NotImplementedError

    @torch.no_grad()
    @abc.abstractmethod
    def fold_activation_scale(self) -> None:
        """Fold the dataset-wise scales into the weights (then `folded = True`, normalize() = identity)."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DictionaryConfig, d_model: int, hook_points: list[str]) -> Dictionary:
        """A fresh dictionary of this kind for `cfg` on these hook points (which of them it reads and writes
        is the kind's choice). Every registered kind defines it (registry.build_dictionary calls it)."""
        raise NotImplementedError(f"{cls.__name__} is not built from a config")

    @classmethod
    def from_saved(cls, cfg: DictionaryConfig, meta: dict[str, Any]) -> Dictionary:
        """The dictionary a saved `cfg.json` (`meta`, as `config_dict()` wrote it) describes, weights not yet
        loaded. Every registered kind defines it (registry.load_dictionary calls it)."""
        raise NotImplementedError(f"{cls.__name__} is not rebuilt from a saved folder")

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        from saecli.lm.hooks import HOOK_NAMES

        return {
            "kind": self.kind,
            "d_model": self.d_model,
            "d_sae": self.d_sae,
            "in_hooks": self.in_hooks,
            "out_hooks": self.out_hooks,
            "folded": self.folded,
            "cfg": asdict(self.cfg),
            "hook_names": HOOK_NAMES,  # hook names mean TransformerLens' (older files are checked on load)
        }

    def save(self, folder: str | Path) -> Path:
        """Write `sae_weights.safetensors` and `cfg.json` atomically into `folder`."""
        from safetensors.torch import save_file

        from saecli.fsio import write_json, write_with

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        size = sum(v.numel() * v.element_size() for v in state.values())
        write_with(
            folder / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"kind": self.kind}), size_hint=size
        )
        write_json(folder / CONFIG_NAME, self.config_dict())
        return folder


def _single(hooks: list[str], what: str) -> str:
    if len(hooks) != 1:
        from saecli.errors import UsageError

        raise UsageError(
            f"this dictionary has {len(hooks)} {what} hook points ({', '.join(hooks)}): pass a dict "
            "{hook: tensor} instead of a single tensor"
        )
    return hooks[0]


def _tensor_encode(encode: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`encode(x)` with a plain tensor x: raw activations of the one input hook (normalised here, so that
    `d.encode(x)` gives the latents `d(x)` decodes); a dict keeps meaning normalised inputs per hook."""
    import functools

    @functools.wraps(encode)
    def wrapper(
        self: Dictionary, inputs: dict[str, torch.Tensor] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            hook = _single(self.in_hooks, "input")
            inputs = self.normalize({hook: inputs})
        return encode(self, inputs, *args, **kwargs)

    return wrapper


C = TypeVar("C")


def own_config(cfg: DictionaryConfig, cls: type[C]) -> C:
    """`cfg` as the kind's own config class: the registry builds each kind from the `[sae]` table of its own
    `kind`, so anything else is a programming error, said here rather than as a missing attribute later."""
    if not isinstance(cfg, cls):
        raise TypeError(f"expected a {cls.__name__}, got a {type(cfg).__name__}")
    return cfg


WEIGHTS_NAME = "sae_weights.safetensors"
CONFIG_NAME = "cfg.json"


def _scale_name(hook: str) -> str:
    return "scale__" + hook.replace(".", "__")
