"""The cross-layer transcoder (kind = "clt"; Ameisen et al. 2025, "Circuit Tracing").

L layers. Layer i has d_sae latents f_i read from that layer's input x_i (its residual stream or MLP
input, `hook_points_in[i]`), and layer i's latents write into every layer t ≥ i's MLP output
(`hook_points_out[t]`):

    h_i = x_i W_enc[i]ᵀ + b_enc[i]            f_i = act_i(h_i)     (TopK / BatchTopK: k per layer)
    ŷ_t = Σ_{i≤t} f_i W_dec[i→t] + b_dec[t]

Storage (compact, no zero blocks): W_enc [L, d_sae, d_model], b_enc [L, d_sae], and the L(L+1)/2
decoder blocks in ONE tensor W_dec [n_pairs, d_sae, d_model] ordered by target: the blocks writing to
layer t are rows `offset(t) … offset(t)+t` (sources 0..t), offset(t) = t(t+1)/2, so they form one
contiguous [(t+1)·d_sae, d_model] matrix. With the latents laid out layer-major ([N, L·d_sae]) the
sources of layer t are the first (t+1)·d_sae columns, and ŷ_t is ONE matmul: L matmuls in all (no
loop over pairs) and exactly the FLOPs of the sum. `pairs()` lists the (source, target) of each block.

The latents are numbered layer-major: latent i·d_sae + j is latent j of layer i; `feature_acts` is
[N, L·d_sae] and `self.d_sae` is L·d_sae (the trainer's dead/density statistics count every latent);
`d_sae_layer` is the per-layer count (`dictionary.d_sae` in the config).

A latent's decoder norm (gating, penalties) is the `decoder_norm_reduction` over its target layers of
‖W_dec[i→t]_j‖: "norm" (default: the norm of its concatenated decoders, as in Circuit Tracing) or "sum".

Folding (dataset-wise scales s_in[i], s_out[t]): the latents keep their training units —
W_enc[i] ← W_enc[i]·s_in[i], W_dec[i→t] ← W_dec[i→t]/s_out[t], b_dec[t] ← b_dec[t]/s_out[t], and the
norms used for gating/penalties are measured as ‖W_dec[i→t]‖·s_out[t] (buffer `target_norm_weight`),
so every threshold (JumpReLU, BatchTopK) is unchanged by folding.

Training paths (`last_path`): "topk-sparse" — TopK without a sparsity penalty decodes only each layer's
k active latents (`decode_sparse`: an embedding-bag per target layer over the blocks into it, AuxK too),
returning `feature_acts` as a sparse CSR [N, L·d_sae]; "dense" — every other case (and the reference the
sparse path is tested against).

`convert_topk_to_jumprelu(batches)` turns a TopK/BatchTopK CLT into a JumpReLU one with thresholds
estimated from data, per latent (default) or per layer — see its docstring and docs/kinds.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from saecli.config.dictionary import DictionaryConfig
from saecli.config.init import InitConfig
from saecli.dictionaries import kernels
from saecli.dictionaries import losses as L
from saecli.dictionaries.activations import SparseActivation, gated_pre, threshold
from saecli.dictionaries.base import Dictionary, LossOutput, StepContext, own_config
from saecli.dictionaries.clt_config import CLTConfig
from saecli.dictionaries.crosscoder import layered_output
from saecli.dictionaries.sharding import LatentShard, local
from saecli.dtypes import DTYPES
from saecli.errors import ConfigError


def pair_index(n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) of every decoder block, target-major: (0,0), (0,1), (1,1), (0,2), (1,2), (2,2), …"""
    pairs = [(i, t) for t in range(n_layers) for i in range(t + 1)]
    return torch.tensor([i for i, _ in pairs]), torch.tensor([t for _, t in pairs])


class CrossLayerTranscoder(Dictionary):
    kind = "clt"
    # tensor parallelism splits each layer's latents (axis 1 of [L, d_sae, ...] and [n_pairs, d_sae, d_model])
    latent_axes: ClassVar[dict[str, int]] = {"W_enc": 1, "b_enc": 1, "W_dec": 1, "activation.log_threshold": 1}
    latent_shard: LatentShard | None = None  # set by tensor_parallel.shard_dictionary

    cfg: CLTConfig
    pair_source: torch.Tensor  # buffers
    pair_target: torch.Tensor
    target_norm_weight: torch.Tensor
    batchtopk_threshold: torch.Tensor  # batchtopk only
    batchtopk_weight: torch.Tensor
    activation: SparseActivation | None  # jumprelu only (the other rules are per layer, below)

    def __init__(self, cfg: CLTConfig, d_model: int, in_hooks: list[str], out_hooks: list[str]):
        if len(in_hooks) != len(out_hooks) or not in_hooks:
            raise ValueError(f"a CLT needs one in and one out hook per layer, got {len(in_hooks)} and {len(out_hooks)}")
        super().__init__(cfg, d_model, in_hooks, out_hooks)
        n, s = len(in_hooks), self.d_sae
        self.n_layers, self.d_sae_layer, self.d_sae = n, s, n * s
        if cfg.layer_k is not None and len(cfg.layer_k) != n:
            raise ConfigError(
                f"layer_k needs one k per layer ({n}), found {len(cfg.layer_k)}", key="dictionary.layer_k"
            )
        dtype = DTYPES[cfg.dtype]
        source, target = pair_index(n)
        self.register_buffer("pair_source", source, persistent=False)
        self.register_buffer("pair_target", target, persistent=False)
        self.W_enc = nn.Parameter(torch.empty(n, s, d_model, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, s, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(source.numel(), s, d_model, dtype=dtype))
        if cfg.use_decoder_bias:
            self.b_dec = nn.Parameter(torch.zeros(n, d_model, dtype=dtype))
        else:
            self.register_parameter("b_dec", None)
        self.register_buffer("target_norm_weight", torch.ones(n))
        self.last_path = ""  # "topk-sparse" or "dense": which training path the last loss() took
        self._make_activation_state()
        self.reset_parameters()

    def _make_activation_state(self) -> None:
        """JumpReLU: `activation.log_threshold` [L, d_sae]; BatchTopK: a running threshold per layer."""
        name = self.cfg.activation
        self.activation = None
        if name == "jumprelu":
            self.activation = SparseActivation(
                "jumprelu",
                (self.n_layers, self.d_sae_layer),
                jumprelu_threshold_init=self.cfg.jumprelu_threshold_init,
                bandwidth=self.cfg.jumprelu_bandwidth,
            )
        if name == "batchtopk":
            self.register_buffer("batchtopk_threshold", torch.zeros(self.n_layers))
            self.register_buffer("batchtopk_weight", torch.zeros(self.n_layers))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DictionaryConfig, d_model: int, hook_points: list[str]) -> CrossLayerTranscoder:
        cfg = own_config(cfg, CLTConfig)
        if cfg.hook_points_in is not None and cfg.hook_points_out is not None:  # both or neither (validated)
            ins, outs = list(cfg.hook_points_in), list(cfg.hook_points_out)
            missing = [h for h in ins + outs if h not in hook_points]
            if missing:
                raise ConfigError(
                    f"{', '.join(missing)} not in activations.hook_points: the stream must carry "
                    "every hook the CLT reads or writes",
                    key="dictionary.hook_points_in",
                )
        else:
            if len(hook_points) < 2 or len(hook_points) % 2:
                raise ConfigError(
                    "a CLT reads one hook and writes one hook per layer: list the L inputs, then the L "
                    f"outputs in activations.hook_points (found {len(hook_points)}), or set "
                    "dictionary.hook_points_in / sae.hook_points_out",
                    key="dictionary.hook_points_in",
                )
            half = len(hook_points) // 2
            ins, outs = list(hook_points[:half]), list(hook_points[half:])
        return cls(cfg, d_model, ins, outs)

    @classmethod
    def from_saved(cls, cfg: DictionaryConfig, meta: dict[str, Any]) -> CrossLayerTranscoder:
        return cls(own_config(cfg, CLTConfig), int(meta["d_model"]), meta["in_hooks"], meta["out_hooks"])

    def config_dict(self) -> dict:
        out = super().config_dict()
        out["d_sae_layer"] = self.d_sae_layer  # "d_sae" stays the number of latents, L·d_sae_layer
        return out

    def _jumprelu(self) -> SparseActivation:
        """The JumpReLU threshold module (activation = "jumprelu"; the other rules are per layer here)."""
        if self.activation is None:
            raise ValueError(f"a CLT with activation {self.cfg.activation!r} has no JumpReLU threshold")
        return self.activation

    def pairs(self) -> list[tuple[int, int]]:
        """(source layer, target layer) of each decoder block, in storage order."""
        return list(zip(self.pair_source.tolist(), self.pair_target.tolist()))

    def _offset(self, t: int) -> int:
        return t * (t + 1) // 2

    def _target_blocks(self, w_dec: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """W_dec split into the blocks writing to each target layer ([t+1, d_sae, d_model] each). One split
        rather than L slices: its backward writes the gradient of W_dec once, where each slice's backward
        would build a zero-filled gradient the size of the whole decoder."""
        return (self.W_dec if w_dec is None else w_dec).split([t + 1 for t in range(self.n_layers)])

    def _diagonal(self) -> torch.Tensor:
        """Storage index of each block i→i."""
        return torch.tensor([self._offset(t) + t for t in range(self.n_layers)], device=self.W_dec.device)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, init_cfg: InitConfig | None = None) -> None:
        """Data-independent init: block i→t ~ U(±b/√(t+1)), b = decoder_uniform_bound or 1/√d_sae (a target
        sums t+1 source layers, so its initial output is the size of one SAE's); W_enc[i] = W_dec[i→i] × factor
        (the tied init of the papers) or U(±1/√d_model); biases zero; JumpReLU thresholds from the config."""
        from saecli.config.init import InitConfig

        icfg = init_cfg or InitConfig()
        s = self.d_sae_layer
        bound = icfg.decoder_uniform_bound if icfg.decoder_uniform_bound is not None else s**-0.5
        per_pair = bound / (self.pair_target.float() + 1).sqrt()
        w = (torch.rand(self.W_dec.shape) * 2 - 1) * per_pair.view(-1, 1, 1)
        self.W_dec.copy_(w.to(self.W_dec.dtype))
        if self.cfg.decoder_unit_norm:
            self._normalise_decoder(1.0)
        elif icfg.decoder_init_norm is not None:
            self._normalise_decoder(icfg.decoder_init_norm)
        if icfg.tie_encoder():
            self.W_enc.copy_(self.W_dec[self._diagonal()] * icfg.tie_factor())
        else:
            self.W_enc.copy_(((torch.rand(self.W_enc.shape) * 2 - 1) * self.d_model**-0.5).to(self.W_enc.dtype))
        self.b_enc.zero_()
        if self.b_dec is not None:
            self.b_dec.zero_()

    @torch.no_grad()
    def _normalise_decoder(self, norm: float) -> None:
        """Scale each latent's decoder (all its target blocks together) to `norm` (training units)."""
        w = local(self.W_dec)  # a tensor-parallel rank scales its own latents (their rows in every block)
        current = self.layer_decoder_norms(w).detach()  # [L, s]
        factor = (norm / current.clamp_min(1e-12))[self.pair_source]  # [P, s]
        w.mul_(factor.unsqueeze(-1).to(w.dtype))

    @torch.no_grad()
    def init_from_data(self, batches: list[dict[str, torch.Tensor]], init_cfg: InitConfig) -> None:
        """`reset_parameters`, then b_dec[t] at the zero / mean / geometric median of layer t's targets,
        the encoder bias at −mean(h) when asked, and the decoder-norm grid search when asked."""
        from saecli.config.init import InitConfig
        from saecli.dictionaries.init import geometric_median, grid_search

        icfg = init_cfg or InitConfig()
        self.reset_parameters(icfg)
        dev = self.W_dec.device
        stack = {
            h: torch.cat([b[h].reshape(-1, self.d_model) for b in batches]).to(dev)
            for h in dict.fromkeys(self.in_hooks + self.out_hooks)
        }
        if self.b_dec is not None and icfg.bias_init_method != "zero":
            for t, hook in enumerate(self.out_hooks):
                y = stack[hook].float()
                centre = y.mean(0) if icfg.bias_init_method == "mean" else geometric_median(y[:16384])
                self.b_dec[t].copy_(centre.to(self.b_dec.dtype))
        n_first = batches[0][self.in_hooks[0]].reshape(-1, self.d_model).shape[0]
        first = {h: v[:n_first] for h, v in stack.items()}
        x = self._stack_inputs(first)

        def set_bias() -> None:
            if icfg.init_encoder_bias_with_mean_hidden_pre:
                self.b_enc.zero_()
                self.b_enc.sub_(self.pre_acts(x).float().mean(0).to(self.b_enc.dtype))

        if icfg.grid_search_init_norm and not self.cfg.decoder_unit_norm:
            tied = icfg.tie_encoder()
            diag = self._diagonal()

            def loss_at(norm: float) -> float:
                self._normalise_decoder(norm)
                if tied:
                    self.W_enc.copy_(self.W_dec[diag] * icfg.tie_factor())
                set_bias()
                out = self.loss(
                    {h: first[h] for h in self.in_hooks},
                    {h: first[h] for h in self.out_hooks},
                    StepContext(training=False),
                )
                return float(out.terms["mse"])

            best, _ = grid_search(loss_at, torch.linspace(0.1, 5.0, 50).tolist())
            loss_at(best)
            self.init_norm = best
        else:
            set_bias()

    # ------------------------------------------------------------------ pieces of the math
    @property
    def gated(self) -> bool:
        return bool(self.cfg.sparsity_include_decoder_norm) and self.cfg.activation != "relu"

    def pair_norms(self, w_dec: torch.Tensor | None = None) -> torch.Tensor:
        """[n_pairs, d_sae] ‖W_dec[i→t]_j‖ in training units (float32, differentiable); `w_dec`: these
        decoder blocks instead (a tensor-parallel rank's [n_pairs, d_local, d_model])."""
        w = self.W_dec if w_dec is None else w_dec
        return w.float().norm(dim=-1) * self.target_norm_weight[self.pair_target].unsqueeze(-1)

    def layer_decoder_norms(self, w_dec: torch.Tensor | None = None) -> torch.Tensor:
        """[L, d_sae]: each latent's decoder norm over its target layers (`decoder_norm_reduction`)."""
        pn = self.pair_norms(w_dec)
        if self.cfg.decoder_norm_reduction == "sum":
            return pn.new_zeros(self.n_layers, pn.shape[1]).index_add(0, self.pair_source, pn)
        sq = pn.new_zeros(self.n_layers, pn.shape[1]).index_add(0, self.pair_source, pn.pow(2))
        return sq.clamp_min(1e-24).sqrt()

    def decoder_norms(self) -> torch.Tensor:
        """[L·d_sae] (layer-major), training units."""
        return self.layer_decoder_norms().reshape(-1)

    def _gate(self) -> torch.Tensor | None:
        return self.layer_decoder_norms().detach() if self.gated else None

    def _stack_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N, L, d_model] from the per-layer inputs (any leading dims are flattened into N)."""
        return torch.stack([inputs[h].reshape(-1, self.d_model) for h in self.in_hooks], dim=1)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """h [N, L, d_sae] = x_i W_enc[i]ᵀ + b_enc[i] for x [N, L, d_model] (one batched matmul)."""
        return torch.einsum("nld,lsd->nls", x.to(self.W_enc.dtype), self.W_enc) + self.b_enc

    def layer_ks(self, ctx: StepContext | None = None) -> list[int]:
        """k of each layer now: `layer_k` (or sae.k) scaled by the trainer's k schedule (ctx.k / sae.k)."""
        base = list(self.cfg.layer_k) if self.cfg.layer_k is not None else [int(self.cfg.k)] * self.n_layers
        if ctx is None or ctx.k is None or int(ctx.k) == int(self.cfg.k):
            return [min(k, self.d_sae_layer) for k in base]
        ratio = float(ctx.k) / float(self.cfg.k)
        return [min(max(1, round(k * ratio)), self.d_sae_layer) for k in base]

    def activate(self, h: torch.Tensor, ctx: StepContext | None = None, update: bool = True) -> torch.Tensor:
        """Per-layer activation of pre-activations [N, L, d_sae] (same shape out)."""
        name, gate = self.cfg.activation, self._gate()
        training = bool(ctx.training) if ctx is not None else False
        if name == "relu":
            return torch.relu(h)
        if name == "jumprelu":
            return self._jumprelu()(h, gate)
        if name == "topk":
            return layer_topk(h, self.layer_ks(ctx), gate)
        if not training:  # batchtopk at inference: the per-layer threshold
            return threshold(h, self.batchtopk_threshold.to(h.dtype).unsqueeze(-1), gate)
        f, smallest = layer_batch_topk(h, self.layer_ks(ctx), gate)
        if update:
            self._update_batchtopk_threshold(smallest)
        return f

    @torch.no_grad()
    def _update_batchtopk_threshold(self, smallest: torch.Tensor) -> None:
        """Per layer, the bias-corrected running average of the smallest kept activation (as activations.py)."""
        ok = ~torch.isnan(smallest)
        w = self.batchtopk_weight * self.cfg.batchtopk_threshold_decay + 1.0
        new = self.batchtopk_threshold + (smallest.float().nan_to_num() - self.batchtopk_threshold) / w
        self.batchtopk_threshold.copy_(torch.where(ok, new, self.batchtopk_threshold))
        self.batchtopk_weight.copy_(torch.where(ok, w, self.batchtopk_weight))

    # ------------------------------------------------------------------ interface
    def encode(self, inputs: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        """[N, L·d_sae] latent activations, layer-major."""
        f = self.activate(self.pre_acts(self._stack_inputs(inputs)), ctx)
        return f.reshape(f.shape[0], -1)

    def decode_layers(self, f: torch.Tensor, bias: bool = True, w_dec: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L, d_model] from f [N, L·d_sae]:
        ŷ_t = f[:, :(t+1)·d_sae] @ W_dec[offset(t) … offset(t)+t] + b_dec[t]. `w_dec`: these decoder blocks
        instead ([n_pairs, s, d_model], f [N, L·s]: a tensor-parallel rank's partial sums)."""
        w_all = self.W_dec if w_dec is None else w_dec
        f = f.to(w_all.dtype)
        s = w_all.shape[1]
        outs = []
        for t, w in enumerate(self._target_blocks(w_all)):
            w_t = w.reshape((t + 1) * s, self.d_model)
            y = f[:, : (t + 1) * s] @ w_t
            outs.append(y + self.b_dec[t] if bias and self.b_dec is not None else y)
        return torch.stack(outs, dim=1)

    def decode_hooks(
        self, feature_acts: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        if feature_acts.layout != torch.strided:
            feature_acts = feature_acts.to_dense()
        y = self.decode_layers(feature_acts)
        return {hook: y[:, t] for t, hook in enumerate(self.out_hooks)}

    def loss(
        self,
        inputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        ctx: StepContext,
        mask: torch.Tensor | None = None,
    ) -> LossOutput:
        if mask is not None:
            inputs = {h: v[mask] for h, v in inputs.items()}
            targets = {h: v[mask] for h, v in targets.items()}
        if self.latent_shard is not None:
            from saecli.dictionaries.clt_sharded import sharded_loss

            return sharded_loss(self, inputs, targets, ctx, self.latent_shard)
        y = torch.stack([targets[h].reshape(-1, self.d_model) for h in self.out_hooks], dim=1)  # [N, L, d]
        h = self.pre_acts(self._stack_inputs(inputs))
        n_tok = h.shape[0]
        act, kind = self.cfg.activation, ctx.sparsity_loss_type or "none"
        gate = self._gate()
        extra: dict[str, Any] = {}
        f3 = None
        if self._sparse_path(ctx):
            vals, idx = self._topk_entries(h, ctx, gate)  # [N, L·k] values (grad to h) and flat latent ids
            recon = self.decode_sparse(vals, idx, layer_sorted=True)
            feature_acts = _csr(vals.detach(), idx, self.d_sae)
            fires = (vals.detach() > 0).view(n_tok, self.n_layers, -1).sum((0, 2))
            self.last_path = "topk-sparse"
        else:
            f3 = self.activate(h, ctx)
            feature_acts = f3.reshape(n_tok, -1)
            recon = self.decode_layers(feature_acts)
            fires = (f3.detach() > 0).sum((0, 2))  # bool compare: no float copy of the [N, L, d_sae] latents
            self.last_path = "dense"
        mse = L.mse(recon.reshape(n_tok, -1), y.reshape(n_tok, -1))  # Σ over layers and d, mean over tokens
        terms = {"mse": mse}
        acc = L.TermSum(terms, extra, mse)
        extra["mse_per_element"] = L.mse_per_element(recon.detach(), y)
        norms = self.layer_decoder_norms() if self.cfg.sparsity_include_decoder_norm else None
        if kind == "l0":
            if act != "jumprelu":
                raise ValueError("sparsity_loss_type 'l0' needs activation = 'jumprelu'")
            theta = self._jumprelu().theta()
            acc.add(
                "sparsity", ctx.l1_coefficient, L.jumprelu_l0(h, theta, self._jumprelu().bandwidth, gate, latent_dims=2)
            )
        elif kind != "none":
            assert f3 is not None, "the sparse path runs without a sparsity penalty (_sparse_path)"
            acc.add("sparsity", ctx.l1_coefficient, L.step_sparsity_penalty(ctx, f3, norms, latent_dims=2))
        if act in ("topk", "batchtopk") and ctx.auxk_coefficient > 0 and ctx.dead_mask is not None:
            aux = self._auxk(h, ctx, (y - recon).detach().reshape(n_tok, -1), gate)
            acc.add("aux", ctx.auxk_coefficient, aux)
        if act == "jumprelu" and ctx.lp_coefficient > 0:
            lp = L.jumprelu_preact_loss(h, self._jumprelu().theta(), norms, gated=self.gated, latent_dims=2)
            acc.add("lp", ctx.lp_coefficient, lp)
        if act == "jumprelu":
            extra["mean_threshold"] = self._jumprelu().theta().detach().mean()
        extra["path"] = self.last_path
        per_layer = fires.float() / max(n_tok, 1)
        extra["l0"] = per_layer.sum()
        for i, hook in enumerate(self.in_hooks):
            extra[f"l0/{hook}"] = per_layer[i]
        assert acc.total is not None
        return layered_output(self.out_hooks, acc.total, terms, feature_acts, recon, y, extra)

    # ------------------------------------------------------------------ sparse TopK path
    def _sparse_path(self, ctx: StepContext) -> bool:
        """TopK training without a sparsity penalty: decode only the k active latents of each layer."""
        return (
            self.cfg.activation == "topk"
            and self.cfg.sparse_kernels
            and bool(ctx.training)
            and torch.is_grad_enabled()
            and (ctx.sparsity_loss_type or "none") == "none"
        )

    def _topk_entries(
        self, h: torch.Tensor, ctx: StepContext, gate: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer's top-k (gated) latents: values relu(h) [N, L·kmax] (0 past a layer's own k) and flat
        latent ids [N, L·kmax], grouped by layer in layer order (what `decode_sparse(layer_sorted=True)` needs)."""
        ks = self.layer_ks(ctx)
        kmax = max(ks)
        with torch.no_grad():
            x = gated_pre(h.detach(), gate)
            idx = torch.topk(x, kmax, dim=-1, sorted=min(ks) != kmax).indices  # [N, L, kmax]
        vals = torch.relu(torch.gather(h, -1, idx))
        if min(ks) != kmax:
            vals = vals * (torch.arange(kmax, device=h.device) < torch.tensor(ks, device=h.device).unsqueeze(1))
        offsets = torch.arange(self.n_layers, device=h.device).view(1, -1, 1) * self.d_sae_layer
        return vals.reshape(h.shape[0], -1), (idx + offsets).reshape(h.shape[0], -1)

    def decode_sparse(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        bias: bool = True,
        layer_sorted: bool = False,
        w_dec: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N, L, d_model] from a few active latents per token: `values`, `indices` [N, K] (flat latent ids).

        ŷ_t sums the rows W_dec[i→t]_j of the active latents of layers i ≤ t (one embedding-bag per layer:
        N·K·d_model work instead of N·(t+1)·d_sae·d_model). `layer_sorted`: the K entries are grouped by layer
        with K/L per layer (as `_topk_entries` gives), so layer t's sources are a prefix; otherwise entries of
        later layers are masked out.
        """
        w_all = self.W_dec if w_dec is None else w_dec  # `w_dec`: a tensor-parallel rank's blocks, local ids
        s = w_all.shape[1]
        values = values.to(w_all.dtype)
        per = indices.shape[1] // self.n_layers if layer_sorted else 0
        outs = []
        for t, w in enumerate(self._target_blocks(w_all)):
            w_t = w.reshape((t + 1) * s, self.d_model)
            if layer_sorted:
                idx_t, val_t = indices[:, : (t + 1) * per], values[:, : (t + 1) * per]
            else:
                keep = indices < (t + 1) * s
                idx_t, val_t = torch.where(keep, indices, 0), values * keep
            y = torch.nn.functional.embedding_bag(idx_t, w_t, per_sample_weights=val_t, mode="sum")
            outs.append(y + self.b_dec[t] if bias and self.b_dec is not None else y)
        return torch.stack(outs, dim=1)

    def _auxk(
        self, h: torch.Tensor, ctx: StepContext, residual: torch.Tensor, gate: torch.Tensor | None
    ) -> torch.Tensor:
        """AuxK over all layers: each token's top-k_aux dead latents (any layer) reconstruct the residual of
        every layer (the concatenation [N, L·d_model]), decoded through the cross-layer decoder."""
        n_tok = h.shape[0]

        def decode(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            return self.decode_sparse(values, indices, bias=False).reshape(n_tok, -1)

        k_aux = int(ctx.k_aux or self.d_model // 2)
        assert ctx.dead_mask is not None, "AuxK runs only when the trainer passes the dead latents"
        flat_gate = gate.reshape(-1) if gate is not None else None
        return L.auxk_loss(
            h.reshape(n_tok, -1), ctx.dead_mask.to(h.device).reshape(-1), k_aux, residual, decode, flat_gate
        )

    # ------------------------------------------------------------------ directions (DLA, analysis)
    def decoder_directions(self, hook: str | None = None) -> torch.Tensor:
        """[L·d_sae, d_model] as stored (normalised units until folded, raw after, like every kind): the blocks
        into out hook `hook` (zero rows for latents of later layers), or with hook=None each latent's sum over
        every layer it writes to. Direct logit attribution sums the per-hook directions in raw units."""
        w, s = self.W_dec, self.d_sae_layer
        if hook is None:
            out = w.new_zeros(self.n_layers, s, self.d_model).index_add(0, self.pair_source, w)
            return out.reshape(-1, self.d_model)
        t = self.out_hooks.index(hook)
        out = w.new_zeros(self.n_layers, s, self.d_model)
        out[: t + 1] = w[self._offset(t) : self._offset(t) + t + 1]
        return out.reshape(-1, self.d_model)

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def post_step(self) -> None:
        if self.cfg.decoder_unit_norm:
            self._normalise_decoder(1.0)

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        mode = self.cfg.norm_activation
        if self.folded or mode in ("token-wise", "batch-wise"):
            return
        if mode == "dataset-wise":
            s_in = torch.stack([self.scale(h).float() for h in self.in_hooks])
            s_out = torch.stack([self.scale(h).float() for h in self.out_hooks])
            self.W_enc.mul_(s_in.view(-1, 1, 1).to(self.W_enc.dtype))
            self.W_dec.div_(s_out[self.pair_target].view(-1, 1, 1).to(self.W_dec.dtype))
            if self.b_dec is not None:
                self.b_dec.div_(s_out.view(-1, 1).to(self.b_dec.dtype))
            self.target_norm_weight.mul_(s_out)
        self.folded = True

    # ------------------------------------------------------------------ TopK → JumpReLU
    @torch.no_grad()
    def convert_topk_to_jumprelu(self, batches: list[dict[str, torch.Tensor]], per: str = "latent") -> torch.Tensor:
        """Replace the TopK/BatchTopK activation by JumpReLU with thresholds estimated on `batches` (RAW
        activations of the in hooks, as the stream yields them); returns the thresholds θ [L, d_sae].

        The TopK CLT is run on the batches; n_j = how many tokens latent j fired on. Then, on the gated
        pre-activations x_j = h_j·‖W_dec,j‖ (the units JumpReLU compares):
        - per = "latent": θ_j halfway between the n_j-th and (n_j+1)-th largest x_j, so that on these
          batches JumpReLU fires latent j exactly as often as TopK did (a latent that never fired gets θ
          just above its largest x_j). Keeps each latent's frequency, hence the L0 of every layer.
        - per = "layer": one θ per layer, halfway between the F-th and (F+1)-th largest x of the layer,
          F = the layer's total fires (the inference rule of BatchTopK). Keeps each layer's L0 only.
        lm_saes estimates ONE threshold for all layers, which cannot keep the L0 of layers whose
        pre-activations have different scales. Per-latent thresholds need enough tokens for rare latents
        to fire a few times; with few tokens, use "layer".
        """
        if self.cfg.activation not in ("topk", "batchtopk"):
            raise ValueError(
                f"convert_topk_to_jumprelu needs a topk or batchtopk CLT, this one is {self.cfg.activation!r}"
            )
        if per not in ("latent", "layer"):
            raise ValueError(f"per must be 'latent' or 'layer', found {per!r}")
        dev = self.W_enc.device
        normed = [self.normalize({h: b[h].to(dev) for h in self.in_hooks}) for b in batches]
        h = torch.cat([self.pre_acts(self._stack_inputs(b)) for b in normed])  # [N, L, s]
        fired = self.activate(h, StepContext(training=True, k=None), update=False) > 0
        x = gated_pre(h, self._gate()).float()
        n_tok = x.shape[0]
        if per == "latent":
            counts = fired.sum(0)  # [L, s]
            kmax = min(int(counts.max()) + 1, n_tok)
            top = torch.topk(x, kmax, dim=0).values  # [kmax, L, s] descending
            above = top.gather(0, (counts - 1).clamp(0, kmax - 1).unsqueeze(0))[0]
            below = top.gather(0, counts.clamp(max=kmax - 1).unsqueeze(0))[0]
            theta = torch.where(counts >= n_tok, above / 2, (above + below) / 2)
            never = top[0].clamp_min(0) * 1.001 + 1e-6
            theta = torch.where(counts == 0, never, theta)
        else:
            flat = x.permute(1, 0, 2).reshape(self.n_layers, -1)  # [L, N·s]
            counts = fired.permute(1, 0, 2).reshape(self.n_layers, -1).sum(1)  # [L]
            kmax = min(int(counts.max()) + 1, flat.shape[1])
            top = torch.topk(flat, kmax, dim=1).values  # [L, kmax]
            above = top.gather(1, (counts - 1).clamp(0, kmax - 1).unsqueeze(1))[:, 0]
            below = top.gather(1, counts.clamp(max=kmax - 1).unsqueeze(1))[:, 0]
            theta = ((above + below) / 2).unsqueeze(1).expand(self.n_layers, self.d_sae_layer)
        theta = theta.clamp_min(1e-6)
        self.cfg = replace(self.cfg, activation="jumprelu")
        for name in ("batchtopk_threshold", "batchtopk_weight"):
            self._buffers.pop(name, None)
        self._make_activation_state()
        jump = self._jumprelu().to(dev)
        jump.log_threshold.copy_(theta.log())
        return theta


# ---------------------------------------------------------------------- per-layer TopK / BatchTopK
def layer_topk(h: torch.Tensor, ks: list[int], gate: torch.Tensor | None = None) -> torch.Tensor:
    """Per token and layer, keep the k_l largest (gated) pre-activations of layer l, ReLU'd; h [N, L, s].

    Equal ks: `torch.topk` along the latents. Different ks: top max(k) sorted, then each layer keeps its
    first k_l. Gradient reaches the kept entries only."""
    x = gated_pre(h, gate).detach()
    kmax = max(ks)
    if min(ks) == kmax:
        idx = torch.topk(x, kmax, dim=-1, sorted=False).indices
        vals = torch.relu(torch.gather(h, -1, idx))
    else:
        idx = torch.topk(x, kmax, dim=-1, sorted=True).indices  # [N, L, kmax]
        keep = torch.arange(kmax, device=h.device) < torch.tensor(ks, device=h.device).unsqueeze(1)  # [L, kmax]
        vals = torch.relu(torch.gather(h, -1, idx)) * keep
    return torch.zeros_like(h).scatter(-1, idx, vals)


def layer_batch_topk(
    h: torch.Tensor, ks: list[int], gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, keep the k_l·N largest positive (gated) activations of the batch; h [N, L, s].

    Returns (f, smallest kept gated activation per layer [L], NaN where none was kept)."""
    n, n_layers, s = h.shape
    x = torch.relu(gated_pre(h, gate).detach()).permute(1, 0, 2).reshape(n_layers, n * s)
    quota = torch.tensor([min(k * n, n * s) for k in ks], device=h.device)
    kmax = int(quota.max())
    vals, idx = torch.topk(x, kmax, dim=1, sorted=bool(int(quota.min()) != kmax))
    kept = (torch.arange(kmax, device=h.device) < quota.unsqueeze(1)) & (vals > 0)
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(1, idx, kept)
    mask = mask.view(n_layers, n, s).permute(1, 0, 2)
    smallest = torch.where(kept, vals, torch.full_like(vals, float("inf"))).amin(1)
    smallest = torch.where(torch.isinf(smallest), torch.full_like(smallest, float("nan")), smallest)
    return torch.where(mask, torch.relu(h), torch.zeros((), dtype=h.dtype, device=h.device)), smallest


def _csr(values: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[N, n_cols] sparse CSR from K entries per row (values, column ids [N, K]); zeros stay explicit."""
    return kernels.SparsePattern.from_topk(indices, n_cols).csr(values.reshape(-1))
