"""The transcoder (kind = "transcoder"): reads `hook_point_in`, reconstructs `hook_point_out`.

    h = x W_encᵀ + b_enc,  f = act(h),  ŷ = f W_dec + b_dec [+ x W_skip]

It is the SAE of `sae.py` with two hook points (that class already keeps the input scale s_in and the
output scale s_out apart, in every training path and in folding), plus:
- `skip_connection = true`: a learned linear skip W_skip [d_model_in, d_model_out], zero at init
  ("skip transcoders", Paulo et al. 2025). The skip is trained through every SAE path (sparse TopK,
  ReLU, dense) by handing them the target y − x W_skip: ‖fW + b + xS − y‖² = ‖fW + b − (y − xS)‖²,
  with the gradient reaching S through the target. `decode_hooks(f)` is the latent part f W_dec + b_dec,
  `decode_hooks(f, inputs)` adds the skip. The skip needs the input, so the raw-tensor `decode(f)` of a skip
  transcoder asks for it: `decode(f, x)` equals `tc(x)`; `decode(f)` alone is a UsageError saying so.
- `init_from_model(lm, raw_batches)` (`initialize_tc_with_mlp`): each decoder row is set to the
  direction in which the MLP's output moves when its input moves from the data mean along that latent's
  encoder direction: W_dec,i ∝ MLP(x̄ + r·û_i) − MLP(x̄), r = mean ‖x − x̄‖ (row norms are kept; unit
  where the decoder starts at zero, the default: init.decoder_init_norm).

Normalisation: dataset-wise (default) or none; the config refuses token-/batch-wise, whose scaling of the
output needs the output's own norm, which a spliced transcoder does not have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from saecli.config.dictionary import DictionaryConfig
from saecli.dictionaries.base import LossOutput, StepContext, own_config
from saecli.dictionaries.helpers import io_hooks
from saecli.dictionaries.sae import SparseAutoEncoder
from saecli.dictionaries.sharding import local
from saecli.dictionaries.transcoder_config import TranscoderConfig
from saecli.dtypes import DTYPES
from saecli.errors import UsageError

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel


class Transcoder(SparseAutoEncoder):
    kind = "transcoder"

    cfg: TranscoderConfig
    W_skip: nn.Parameter | None  # the skip connection, when cfg.skip_connection

    def __init__(self, cfg: TranscoderConfig, d_model: int, in_hook: str, out_hook: str):
        super().__init__(cfg, d_model, in_hook, out_hook)
        if cfg.skip_connection:
            dtype = DTYPES[cfg.dtype]
            self.W_skip = nn.Parameter(torch.zeros(d_model, d_model, dtype=dtype))
        else:
            self.register_parameter("W_skip", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DictionaryConfig, d_model: int, hook_points: list[str]) -> Transcoder:
        cfg = own_config(cfg, TranscoderConfig)
        hooks = io_hooks(cfg.hook_point_in, cfg.hook_point_out, hook_points, "transcoder", same='use kind = "sae"')
        return cls(cfg, d_model, *hooks)

    # ------------------------------------------------------------------ the skip
    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """x W_skip for normalised inputs, or None without a skip connection."""
        if self.W_skip is None:
            return None
        w = local(self.W_skip)  # replicated over tensor-parallel ranks
        return x.to(w.dtype) @ w

    def loss(
        self,
        inputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        ctx: StepContext,
        mask: torch.Tensor | None = None,
    ) -> LossOutput:
        s = self.skip(inputs[self.in_hook])
        if s is None:
            return super().loss(inputs, targets, ctx, mask)
        y = targets[self.out_hook]
        out = super().loss(inputs, {self.out_hook: y - s.to(y.dtype)}, ctx, mask)
        out.reconstruction = {self.out_hook: out.reconstruction[self.out_hook] + s.to(y.dtype)}
        out.target = {self.out_hook: y}
        return out

    def decode_hooks(
        self, feature_acts: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """f W_dec + b_dec, plus the skip x W_skip when the normalised `inputs` are given."""
        y = super().decode_hooks(feature_acts)[self.out_hook]
        s = None if inputs is None else self.skip(inputs[self.in_hook])
        return {self.out_hook: y if s is None else y + s.to(y.dtype)}

    def decode_needs_input(self) -> str:
        if self.W_skip is not None:
            return "its skip connection adds x·W_skip to f W_dec + b_dec (decode_hooks(f) gives the latent part)"
        return super().decode_needs_input()

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """The SAE's folding (s_in ≠ s_out kept apart, thresholds included) plus W_skip ← W_skip·s_in/s_out:
        the skip's raw output is (s_in·x_raw)W_skip / s_out."""
        mode = self.cfg.norm_activation
        if self.W_skip is not None and not self.folded and mode == "dataset-wise":
            self.W_skip.mul_(float(self.scale(self.in_hook)) / float(self.scale(self.out_hook)))
        super().fold_activation_scale()

    # ------------------------------------------------------------------ init from the model's MLP
    @property
    def needs_model_init(self) -> bool:
        """True when the trainer must call `init_from_model(lm, raw_batches)` after `init_from_data`."""
        return self.cfg.initialize_tc_with_mlp

    @torch.no_grad()
    def init_from_model(
        self, lm: LanguageModel | None, raw_batches: list[dict[str, torch.Tensor]], chunk: int = 1024
    ) -> None:
        """Set decoder rows from the MLP this transcoder replaces (see the module docstring).

        `raw_batches`: a few batches of RAW activations (as the stream yields them); only the input
        hook is read. Call after `init_from_data` (it keeps the row norms that init chose).
        """
        if lm is None:
            raise UsageError("sae.initialize_tc_with_mlp needs the language model: add a [model] section")
        from saecli.lm.hooks import HookPoint, get_mlp, parse_hook, site_module

        point = parse_hook(self.in_hook)
        if point.site != "ln2.hook_normalized":
            raise UsageError(
                f"sae.initialize_tc_with_mlp probes the MLP with the transcoder's input, so "
                f"hook_point_in must be what the MLP reads, blocks.L.ln2.hook_normalized; "
                f"found {self.in_hook!r}"
            )
        layer = self.cfg.mlp_layer if self.cfg.mlp_layer is not None else point.layer
        mlp = get_mlp(lm, layer)
        post, _ = site_module(lm, HookPoint(layer, "hook_mlp_out"))  # a post-MLP norm where the family has one
        param = next(mlp.parameters())

        def run(z: torch.Tensor) -> torch.Tensor:
            out = mlp(z.to(param.device, param.dtype).unsqueeze(0))
            if post is not mlp:
                out = post(out)
            out = out[0] if isinstance(out, tuple) else out
            return out.squeeze(0).float().to(self.W_dec.device)

        x = torch.cat([b[self.in_hook].reshape(-1, self.d_model) for b in raw_batches]).float()
        mean = x.mean(0)
        radius = (x - mean).norm(dim=-1).mean()
        units = self.W_enc.float() / self.W_enc.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        base = run(mean.unsqueeze(0))  # [1, d]
        probes = torch.cat([run(mean + radius * u.to(mean.device)) - base for u in units.split(chunk)])
        p_norm = probes.norm(dim=1, keepdim=True)
        ok = p_norm.squeeze(1) > 1e-8 * radius.clamp_min(1e-12)
        rows = self.W_dec.float()
        keep = rows.norm(dim=1, keepdim=True)
        keep = torch.where(keep > 0, keep, torch.ones_like(keep))  # a zero decoder at init: unit rows
        new = probes / p_norm.clamp_min(1e-12) * keep
        self.W_dec.copy_(torch.where(ok.unsqueeze(1), new, rows).to(self.W_dec.dtype))
