"""The crosscoder (kind = "crosscoder"): shared latents over several heads (Lindsey et al. 2024).

A head is one hook point: several layers of one model, or the same layer of several models (base vs
fine-tuned, for model diffing). With x_h the normalised activation of head h:

    h = Σ_h x_h W_enc[h]ᵀ + b_enc        (pre-activations summed over heads)
    f = act(h)                           (one set of latents, TopK/BatchTopK/JumpReLU/ReLU)
    ŷ_h = f W_dec[h] + b_dec[h]          (a decoder per head)

Storage: W_enc, W_dec as [d_sae, n_heads, d_model] (`W_enc`/`W_dec` properties give these views), i.e.
a latent's encoder/decoder over all heads is one contiguous row of length n_heads·d_model. The sum over
heads is then exactly one matmul of the concatenated heads [N, n_heads·d_model] with a [d_sae,
n_heads·d_model] matrix, so the crosscoder runs on the SAE's machinery (`_HeadsSAE`, all of sae.py's
training paths: sparse TopK kernels, sparse/fused ReLU, dense JumpReLU/BatchTopK, AuxK, init) with one
difference: a latent's decoder norm is the `decoder_norm_reduction` of its per-head norms,
    "sum":  Σ_h ‖W_dec[h]_i‖          (the crosscoder paper's L1-of-norms penalty; default)
    "norm": (Σ_h ‖W_dec[h]_i‖²)^½     (the norm of the concatenated decoder)
used for the gating of the activation and for the sparsity penalty.

Model diffing: `decoder_norm_ratios()` [n_heads, d_sae] is each head's share of a latent's decoder norm
(Σ over heads = 1); a latent exclusive to head h has share ≈ 1 there (for two heads, share[1] is the
"relative decoder norm" ‖d_1‖/(‖d_0‖+‖d_1‖) of the paper).

Heads of several models (model diffing, [models.<label>]) are named "<label>/<hook point>"
(saecli/config/models.py). `model_norm_shares()` sums a latent's head norms per model: [n_models, d_sae],
columns sum to 1. For two models A, B the relative decoder norm r = ‖d_B‖/(‖d_A‖+‖d_B‖) (Lindsey et al.
2024, "model diffing") labels each latent (`diff_label`): r <= EXCLUSIVE_RATIO "A-only", r >= 1 -
EXCLUSIVE_RATIO "B-only", else "shared" (0.1 / 0.9: the ends of the paper's histogram, where a latent's
decoder in one model is under a ninth of its decoder in the other).

Folding (dataset-wise scales s_h, one per head): the latents keep their training units —
W_enc[h] ← W_enc[h]·s_h, W_dec[h] ← W_dec[h]/s_h, b_dec[h] ← b_dec[h]/s_h, and the per-head norms
used for gating/penalties are measured as ‖W_dec[h]‖·s_h (buffer `head_norm_weight`), so every
activation — JumpReLU and BatchTopK thresholds included — is unchanged by folding.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch

from saecli.config.dictionary import DictionaryConfig
from saecli.config.init import InitConfig
from saecli.config.models import split_head
from saecli.dictionaries import losses as L
from saecli.dictionaries.base import Dictionary, LossOutput, StepContext, _scale_name, own_config
from saecli.dictionaries.crosscoder_config import CrosscoderConfig
from saecli.dictionaries.sae import SparseAutoEncoder
from saecli.errors import ConfigError

_CONCAT = "heads"  # the internal hook name of the concatenated heads
EXCLUSIVE_RATIO = 0.1  # model diffing: r <= this → first model only, r >= 1 - this → second model only


def diff_label(ratio: float, first: str, second: str) -> str:
    """'<first>-only', 'shared' or '<second>-only' for a relative decoder norm ‖d_2‖/(‖d_1‖+‖d_2‖)."""
    if ratio <= EXCLUSIVE_RATIO:
        return f"{first}-only"
    if ratio >= 1 - EXCLUSIVE_RATIO:
        return f"{second}-only"
    return "shared"


def heads_by_model(heads: list[str]) -> dict[str, list[int]]:
    """{model label: indices of its heads}, in head order; empty unless the heads span two models or more."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(heads):
        label, _ = split_head(name)
        if label is None:
            return {}
        out.setdefault(label, []).append(i)
    return out if len(out) >= 2 else {}


class _HeadsSAE(SparseAutoEncoder):
    """The SAE over concatenated heads; only its decoder norms differ (reduced per head)."""

    head_norm_weight: torch.Tensor

    def __init__(self, cfg: CrosscoderConfig, n_heads: int, d_head: int, reduction: str):
        super().__init__(cfg, n_heads * d_head, _CONCAT)
        del self._buffers[_scale_name(_CONCAT)]  # never normalises: the crosscoder does, per head
        self.n_heads, self.d_head, self.reduction = n_heads, d_head, reduction
        self.register_buffer("head_norm_weight", torch.ones(n_heads))

    def head_norms(self, w_dec: torch.Tensor | None = None) -> torch.Tensor:
        """[d_sae, n_heads] ‖W_dec[h]_i‖ in training units (float32, differentiable); of `w_dec`'s rows if given."""
        w = (self.W_dec if w_dec is None else w_dec).float()
        return w.view(w.shape[0], self.n_heads, self.d_head).norm(dim=-1) * self.head_norm_weight

    def norms_of(self, w_dec: torch.Tensor) -> torch.Tensor:
        norms = self.head_norms(w_dec)
        return norms.sum(-1) if self.reduction == "sum" else norms.norm(dim=-1)

    def _choose_path(self, x: torch.Tensor, ctx: StepContext, mask: torch.Tensor | None) -> str:
        path = super()._choose_path(x, ctx, mask)
        # the fused dense ReLU-L1 kernel weighs by the concatenated row norm: right for "norm" only
        return "dense" if path == "relu" and self.reduction == "sum" and self.n_heads > 1 else path


class Crosscoder(Dictionary):
    kind = "crosscoder"
    # tensor parallelism splits the core SAE's latents (training/tensor_parallel.py)
    latent_axes: ClassVar[dict[str, int]] = {f"core.{k}": v for k, v in SparseAutoEncoder.latent_axes.items()}

    cfg: CrosscoderConfig

    def __init__(self, cfg: CrosscoderConfig, d_model: int, heads: list[str]):
        super().__init__(cfg, d_model, heads, heads)
        self.heads = list(heads)
        core_cfg = replace(cfg, d_sae=self.d_sae, expansion_factor=None)  # d_sae counts per head's d_model
        self.core = _HeadsSAE(core_cfg, len(heads), d_model, cfg.decoder_norm_reduction)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DictionaryConfig, d_model: int, hook_points: list[str]) -> Crosscoder:
        cfg = own_config(cfg, CrosscoderConfig)
        heads = list(cfg.hook_points or hook_points)
        missing = [h for h in heads if h not in hook_points]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} not in activations.hook_points ({', '.join(hook_points)}): "
                "the stream must carry every head",
                key="dictionary.hook_points",
            )
        return cls(cfg, d_model, heads)

    @classmethod
    def from_saved(cls, cfg: DictionaryConfig, meta: dict[str, Any]) -> Crosscoder:
        return cls(own_config(cfg, CrosscoderConfig), int(meta["d_model"]), meta["in_hooks"])

    # ------------------------------------------------------------------ views
    @property
    def n_heads(self) -> int:
        return len(self.heads)

    @property
    def W_enc(self) -> torch.Tensor:
        """[d_sae, n_heads, d_model]."""
        return self.core.W_enc.view(self.d_sae, self.n_heads, self.d_model)

    @property
    def W_dec(self) -> torch.Tensor:
        """[d_sae, n_heads, d_model]."""
        return self.core.W_dec.view(self.d_sae, self.n_heads, self.d_model)

    @property
    def b_enc(self) -> torch.Tensor:
        return self.core.b_enc

    @property
    def b_dec(self) -> torch.Tensor | None:
        """[n_heads, d_model] or None."""
        return None if self.core.b_dec is None else self.core.b_dec.view(self.n_heads, self.d_model)

    @property
    def activation(self):
        return self.core.activation

    def _cat(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([acts[h] for h in self.heads], dim=-1)

    def _split(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.heads, y.split(self.d_model, dim=-1)))

    # ------------------------------------------------------------------ interface
    def encode(self, inputs: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        return self.core.encode({_CONCAT: self._cat(inputs)}, ctx)

    def decode_hooks(
        self, feature_acts: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return self._split(self.core.decode_hooks(feature_acts)[_CONCAT])

    def loss(
        self,
        inputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        ctx: StepContext,
        mask: torch.Tensor | None = None,
    ) -> LossOutput:
        x, y = self._cat(inputs), self._cat(targets)
        out = self.core.loss({_CONCAT: x}, {_CONCAT: y}, ctx, mask)
        recon, target = self._split(out.reconstruction[_CONCAT]), self._split(out.target[_CONCAT])
        extra = dict(out.extra)
        extra.update(per_hook_metrics(recon, target, mask))
        return LossOutput(
            loss=out.loss,
            terms=out.terms,
            feature_acts=out.feature_acts,
            reconstruction=recon,
            target=target,
            extra=extra,
        )

    # ------------------------------------------------------------------ decoder norms
    def head_decoder_norms(self) -> torch.Tensor:
        """[n_heads, d_sae] per-head decoder norms (training units)."""
        return self.core.head_norms().t()

    def decoder_norms(self) -> torch.Tensor:
        return self.core.decoder_norms()

    @torch.no_grad()
    def decoder_norm_ratios(self) -> torch.Tensor:
        """[n_heads, d_sae]: head h's share ‖W_dec[h]_i‖ / Σ_g ‖W_dec[g]_i‖ (columns sum to 1).

        Model diffing: share ≈ 1 — latent exclusive to head h; ≈ 1/n_heads — shared.
        """
        norms = self.head_decoder_norms()
        return norms / norms.sum(0, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def model_norm_shares(self) -> tuple[list[str], torch.Tensor] | None:
        """(model labels, [n_models, d_sae] each model's share of a latent's decoder norm, Σ over its heads);
        None when the heads are of one model."""
        groups = heads_by_model(self.heads)
        if not groups:
            return None
        norms = self.head_decoder_norms()
        per_model = torch.stack([norms[idx].sum(0) for idx in groups.values()])
        return list(groups), per_model / per_model.sum(0, keepdim=True).clamp_min(1e-12)

    def model_heads(self) -> dict[str, list[str]]:
        return {label: [self.heads[i] for i in idx] for label, idx in heads_by_model(self.heads).items()}

    def relative_decoder_norm(self) -> tuple[list[str], torch.Tensor] | None:
        """([A, B], [d_sae] ‖d_B‖/(‖d_A‖+‖d_B‖)) for a crosscoder over exactly two models, else None."""
        shares = self.model_norm_shares()
        if shares is None or len(shares[0]) != 2:
            return None
        return shares[0], shares[1][1]

    def analysis_extras(self) -> dict[str, torch.Tensor]:
        """Per-feature arrays for `analyze` and the dashboard: the relative decoder norm of a two-model diff."""
        rel = self.relative_decoder_norm()
        return {} if rel is None else {"relative_decoder_norm": rel[1]}

    def decoder_directions(self, hook: str | None = None) -> torch.Tensor:
        """[d_sae, d_model]: the decoder of head `hook` (default: the last head), as stored (normalised units
        until folded, raw after), like every kind."""
        h = self.heads.index(hook) if hook is not None else self.n_heads - 1
        return self.W_dec[:, h, :]

    def dla_directions(self) -> torch.Tensor:
        """What direct logit attribution reads: the LAST head's decoder in raw units (the deepest layer, or
        the last model of a diff), not the sum over heads — heads of different models share no residual."""
        w = self.W_dec[:, -1, :]
        mode = self.cfg.norm_activation
        return w if self.folded or mode != "dataset-wise" else w / self.scale(self.heads[-1]).to(w.dtype)

    # ------------------------------------------------------------------ training hooks
    def post_step(self) -> None:
        self.core.post_step()

    def param_groups(self, lr: float, jumprelu_lr_factor: float = 1.0) -> list[dict]:
        return self.core.param_groups(lr, jumprelu_lr_factor)

    @torch.no_grad()
    def init_from_data(self, batches: list[dict[str, torch.Tensor]], init_cfg: InitConfig) -> None:
        """The SAE initialisation on the concatenated heads (b_dec at the median of the concatenation)."""
        self.core.init_from_data([{_CONCAT: self._cat(b)} for b in batches], init_cfg)

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        mode = self.cfg.norm_activation
        if self.folded or mode in ("token-wise", "batch-wise"):
            return
        if mode == "dataset-wise":
            s = torch.stack([self.scale(h).float() for h in self.heads])  # [n_heads]
            per_head = s.view(1, -1, 1)
            self.W_enc.mul_(per_head.to(self.W_enc.dtype))
            self.W_dec.div_(per_head.to(self.W_dec.dtype))
            if self.b_dec is not None:
                self.b_dec.div_(s.view(-1, 1).to(self.b_dec.dtype))
            self.core.head_norm_weight.mul_(s)
        self.folded = True


def per_hook_metrics(
    recon: dict[str, torch.Tensor], target: dict[str, torch.Tensor], mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Batch explained variance and mse (Σ_d, mean over tokens) per out hook, for LossOutput.extra."""
    out: dict[str, torch.Tensor] = {}
    for hook, y in target.items():
        y_hat = recon[hook].detach()
        if mask is not None:
            y, y_hat = y[mask], y_hat[mask]
        y2, y_hat2 = y.detach().float().reshape(-1, y.shape[-1]), y_hat.float().reshape(-1, y.shape[-1])
        sse = (y_hat2 - y2).pow(2).sum()
        sst = (y2 - y2.mean(0)).pow(2).sum()
        out[f"explained_variance/{hook}"] = 1.0 - sse / sst if sst > 0 else torch.full((), float("nan"))
        out[f"mse/{hook}"] = L.mse(y_hat2, y2)
    return out


def layered_output(
    out_hooks: list[str],
    loss: torch.Tensor,
    terms: dict[str, torch.Tensor],
    feature_acts: torch.Tensor,
    recon: torch.Tensor,
    target: torch.Tensor,
    extra: dict[str, Any],
) -> LossOutput:
    """LossOutput of a kind that reconstructs several hooks at once, recon and target [N, T, d] with
    slot t for out_hooks[t] (the CLT, dense or tensor-parallel); adds the per-hook metrics to `extra`."""
    recon_d = {hook: recon[:, t] for t, hook in enumerate(out_hooks)}
    target_d = {hook: target[:, t] for t, hook in enumerate(out_hooks)}
    extra.update(per_hook_metrics(recon_d, target_d))
    return LossOutput(
        loss=loss,
        terms={k: v.detach() for k, v in terms.items()},
        feature_acts=feature_acts,
        reconstruction=recon_d,
        target=target_d,
        extra=extra,
    )
