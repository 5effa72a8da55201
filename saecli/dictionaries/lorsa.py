"""Low-rank sparse attention (kind = "lorsa"; He et al. 2025, "Towards Understanding the Nature of
Attention with Low-Rank Sparse Decomposition").

Reads an attention layer's input x (`blocks.L.ln1.hook_normalized`, after the layer's input norm) over whole
contexts and reconstructs its output (`blocks.L.hook_attn_out`) as a sum of d_sae rank-1 OV heads that
share n_qk_heads QK heads: OV head h belongs to QK head g(h) = h // G, G = d_sae / n_qk_heads.

    q_g(t) = RoPE_t(x_t W_Q[g] + b_Q[g])      k_g(s) = RoPE_s(x_s W_K[g] + b_K[g])     [d_qk_head]
    A_g(t, s) = softmax_{s ≤ t}(scale · q_g(t)·k_g(s))                                 (causal)
    z_h(t) = Σ_{s ≤ t} A_g(h)(t, s) · (x_s·W_V[h] + b_V[h])                              (head activation)
    f(t) = act(z(t))  — TopK over the d_sae heads per token (or BatchTopK / JumpReLU / ReLU)
    ŷ(t) = Σ_h f_h(t) W_O[h] + b_O

Vectorised: values [B, T, d_sae] = x W_Vᵀ + b_V are viewed as [B, n_qk, T, G] and ONE scaled-dot-product
attention call (`is_causal`) applies each QK head's pattern to its group's values; no loop over heads.
`feature_acts` are f [B, T, d_sae]; `decode_hooks(f)` needs nothing else (the attention is inside z).

Rotary embeddings use the half-rotation convention of llama (HF `rotate_half`), positions 0..T-1 of each
context, inverse frequencies θ^(−2i/d_qk_head) with θ = `rope_theta` (default: the model's when Q/K are
initialised from it, else 10000). Attention covers every position of a context, BOS included (the model
attends to them); the batch mask only says which positions count in the loss and metrics. A key mask
(padding) can be given to `attention_z` directly.

Folding keeps the latents (z, f) as trained: W_Q, W_K, W_V ← ·s_in, W_O ← W_O/s_out, b_O ← b_O/s_out;
gated thresholds (compared with z·‖W_O‖) ← θ/s_out, ungated thresholds are unchanged.

`init_from_model(lm, raw_batches)` (`initialize_lorsa_with_mhsa`): W_Q/W_K from the model's q_proj/k_proj,
key heads repeated over their GQA query groups, query heads repeated over the LORSA QK heads
(n_qk_heads must be a multiple of the model's heads), divided by the input scale s_in so that q and k
equal the model's on normalised inputs; rope_theta and the softmax scale are copied when not set.
Supported: families with separate q_proj/k_proj and default rotary embeddings (llama, mistral, qwen2,
gemma, smollm); not: QK-norm layers, scaled RoPE variants, partial rotary.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from saecli.config.base import to_dict
from saecli.config.dictionary import DictionaryConfig
from saecli.config.init import InitConfig
from saecli.dictionaries import losses as L
from saecli.dictionaries.activations import SparseActivation
from saecli.dictionaries.base import Dictionary, LossOutput, StepContext, own_config
from saecli.dictionaries.helpers import (
    fold_threshold,
    io_hooks,
    latent_terms,
    masked_rows,
)
from saecli.dictionaries.lorsa_config import LorsaConfig
from saecli.dtypes import DTYPES
from saecli.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from saecli.lm.loading import LanguageModel

DEFAULT_ROPE_THETA = 10000.0


# ------------------------------------------------------------------------------------------- rotary
def rotary_tables(
    n_pos: int, dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [n_pos, dim] in float32 for positions 0..n_pos-1 (frequencies repeated over both halves)."""
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.arange(n_pos, dtype=torch.float32, device=device).unsqueeze(1) * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + dim/2) of x [..., T, dim] by position-dependent angles (llama convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ------------------------------------------------------------------------------------------- LORSA
class LowRankSparseAttention(Dictionary):
    kind = "lorsa"
    needs_context = True

    cfg: LorsaConfig

    def __init__(self, cfg: LorsaConfig, d_model: int, in_hook: str, out_hook: str):
        super().__init__(cfg, d_model, [in_hook], [out_hook])
        self.in_hook, self.out_hook = in_hook, out_hook
        if cfg.n_qk_heads is None:  # validated when the config was read; a hand-made config may lack it
            raise ConfigError("a LORSA needs n_qk_heads", key="dictionary.n_qk_heads")
        s, h = self.d_sae, cfg.n_qk_heads
        if s % h:
            raise ValueError(f"d_sae ({s}) must be a multiple of n_qk_heads ({h})")
        e = int(cfg.d_qk_head or d_model // h)
        if e <= 0 or (cfg.use_rotary and e % 2):
            raise ValueError(f"d_qk_head must be positive (and even with rotary embeddings), found {e}")
        self.n_qk_heads, self.d_qk_head, self.heads_per_qk = h, e, s // h
        dtype = DTYPES[cfg.dtype]
        self.W_Q = nn.Parameter(torch.empty(h, d_model, e, dtype=dtype))
        self.b_Q = nn.Parameter(torch.zeros(h, e, dtype=dtype))
        self.W_K = nn.Parameter(torch.empty(h, d_model, e, dtype=dtype))
        self.b_K = nn.Parameter(torch.zeros(h, e, dtype=dtype))
        self.W_V = nn.Parameter(torch.empty(s, d_model, dtype=dtype))
        self.b_V = nn.Parameter(torch.zeros(s, dtype=dtype))
        self.W_O = nn.Parameter(torch.empty(s, d_model, dtype=dtype))
        if cfg.use_decoder_bias:
            self.b_O = nn.Parameter(torch.zeros(d_model, dtype=dtype))
        else:
            self.register_parameter("b_O", None)
        self.activation = SparseActivation(
            cfg.activation,
            s,
            jumprelu_threshold_init=cfg.jumprelu_threshold_init,
            bandwidth=cfg.jumprelu_bandwidth,
            batchtopk_threshold_decay=cfg.batchtopk_threshold_decay,
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DictionaryConfig, d_model: int, hook_points: list[str]) -> LowRankSparseAttention:
        cfg = own_config(cfg, LorsaConfig)
        return cls(cfg, d_model, *io_hooks(cfg.hook_point_in, cfg.hook_point_out, hook_points, "LORSA"))

    @classmethod
    def from_saved(cls, cfg: DictionaryConfig, meta: dict[str, Any]) -> LowRankSparseAttention:
        return cls(own_config(cfg, LorsaConfig), int(meta["d_model"]), meta["in_hooks"][0], meta["out_hooks"][0])

    def config_dict(self) -> dict:
        out = super().config_dict()
        out["cfg"] = to_dict(self.cfg)  # TOML-able: None dropped, so parse() restores the defaults
        return out

    _CFG_IN_STATE = ("rope_theta", "attention_scale")

    def get_extra_state(self) -> torch.Tensor:
        """(rope_theta, attention_scale) in the state dict, so that a checkpoint restores the
        values `init_from_model` copied from the model into cfg (a resumed run rebuilds the dictionary from
        the experiment file, where they may be unset). 0 = unset (both must be > 0). A float64 tensor:
        `.to(dtype)` never rounds it."""
        values = [getattr(self.cfg, name) for name in self._CFG_IN_STATE]
        return torch.tensor([0.0 if v is None else float(v) for v in values], dtype=torch.float64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        updates: dict[str, Any] = {name: float(v) for name, v in zip(self._CFG_IN_STATE, state.tolist()) if v > 0}
        if updates:
            self.cfg = replace(self.cfg, **updates)

    @torch.no_grad()
    def reset_parameters(self, init_cfg: InitConfig | None = None) -> None:
        """Data-independent init (global RNG), following [init] where it applies:
        W_O ~ U(±decoder_uniform_bound, default 1/√d_sae) (rows at `decoder_init_norm`, or unit with
        decoder_unit_norm); W_V = W_O × factor when `init_encoder_with_decoder_transpose`, else
        U(±1/√d); W_Q, W_K ~ N(0, 1/d) (so q·k/√d_qk_head is O(1) for ‖x‖ ≈ √d); biases zero."""
        from saecli.config.init import InitConfig

        cfg = init_cfg or InitConfig()
        d, s = self.d_model, self.d_sae
        bound = cfg.decoder_uniform_bound if cfg.decoder_uniform_bound is not None else 1.0 / math.sqrt(s)
        w_o = (torch.rand(s, d) * 2 - 1) * bound
        if self.cfg.decoder_unit_norm:
            w_o = _unit_rows(w_o)
        elif cfg.decoder_init_norm is not None:
            w_o = _unit_rows(w_o) * cfg.decoder_init_norm
        self.W_O.copy_(w_o)
        if cfg.tie_encoder():
            self.W_V.copy_(w_o * cfg.tie_factor())
        else:
            self.W_V.copy_((torch.rand(s, d) * 2 - 1) / math.sqrt(d))
        self.W_Q.copy_(torch.randn(self.W_Q.shape) / math.sqrt(d))
        self.W_K.copy_(torch.randn(self.W_K.shape) / math.sqrt(d))
        for b in (self.b_Q, self.b_K, self.b_V, self.b_O):
            if b is not None:
                b.zero_()

    # ------------------------------------------------------------------ attention
    @property
    def rope_theta(self) -> float:
        return float(self.cfg.rope_theta) if self.cfg.rope_theta is not None else DEFAULT_ROPE_THETA

    @property
    def attention_scale(self) -> float:
        return float(self.cfg.attention_scale) if self.cfg.attention_scale is not None else self.d_qk_head**-0.5

    def queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised x [B, T, d] → rotated q, k [B, n_qk_heads, T, d_qk_head]."""
        x = x.to(self.W_Q.dtype)
        q = torch.einsum("btd,hde->bhte", x, self.W_Q) + self.b_Q.unsqueeze(1)
        k = torch.einsum("btd,hde->bhte", x, self.W_K) + self.b_K.unsqueeze(1)
        if self.cfg.use_rotary:
            cos, sin = rotary_tables(x.shape[1], self.d_qk_head, self.rope_theta, x.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """x W_Vᵀ + b_V: each OV head's value at every position, [B, T, d_sae]."""
        return F.linear(x.to(self.W_V.dtype), self.W_V, self.b_V)

    def attention_z(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Head activations before sparsification, z [B, T, d_sae], for normalised x [B, T, d].

        `key_mask` [B, T] (True = may be attended to, e.g. not padding): without it, plain causal attention.
        """
        b, t, _ = x.shape
        q, k = self.queries_keys(x)
        v = self.values(x).view(b, t, self.n_qk_heads, self.heads_per_qk).transpose(1, 2)  # [B, H, T, G]
        if key_mask is None:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attention_scale)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=_causal_key_mask(key_mask, t), scale=self.attention_scale
            )
        return z.transpose(1, 2).reshape(b, t, self.d_sae)

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """Attention patterns of every QK head, [B, n_qk_heads, T, T], for normalised x [B, T, d]."""
        q, k = self.queries_keys(x)
        t = x.shape[1]
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.attention_scale
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    @torch.no_grad()
    def attention_pattern(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """The [T, T] attention pattern OV head `head` uses (its QK head's), for RAW in-hook activations
        x [T, d] (or [B, T, d] → [B, T, T]). Row t: how much query t reads from each key s ≤ t."""
        xs = x.unsqueeze(0) if x.dim() == 2 else x
        xn = self.normalize({self.in_hook: xs.to(self.W_Q.device, self.W_Q.dtype)})[self.in_hook]
        pat = self.patterns(xn)[:, int(head) // self.heads_per_qk]
        return pat[0] if x.dim() == 2 else pat

    @torch.no_grad()
    def z_pattern(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """[T, T] contributions A(t, s)·v_h(s) of each source s to z_h(t) (rows sum to z_h(t)), RAW x [T, d]."""
        xn = self.normalize({self.in_hook: x.unsqueeze(0).to(self.W_Q.device, self.W_Q.dtype)})[self.in_hook]
        pat = self.patterns(xn)[0, int(head) // self.heads_per_qk]
        v = self.values(xn)[0, :, int(head)].float()
        return pat * v.unsqueeze(0)

    @torch.no_grad()
    def context_extras(
        self, inputs: dict[str, torch.Tensor], features: torch.Tensor, positions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """For the analyzer: per context b (normalised inputs [B, T, d]), head `features[b]`'s attention row
        at query `positions[b]` and the contributions of each source to its z there, both [B, T]."""
        x = inputs[self.in_hook]
        idx = torch.arange(x.shape[0], device=x.device)
        features, positions = features.to(x.device).long(), positions.to(x.device).long()
        pat = self.patterns(x)[idx, features // self.heads_per_qk, positions]  # [B, T]
        v = self.values(x)[idx, :, features].float()  # [B, T]
        return {"attention_pattern": pat, "z_pattern": pat * v}

    # ------------------------------------------------------------------ interface
    @property
    def gated(self) -> bool:
        return bool(self.cfg.sparsity_include_decoder_norm) and self.cfg.activation != "relu"

    def decoder_norms(self) -> torch.Tensor:
        """[d_sae] ‖W_O[h]‖ in float32 (differentiable)."""
        return self.W_O.float().norm(dim=1)

    def decoder_directions(self, hook: str | None = None) -> torch.Tensor:
        """[d_sae, d_model] W_O: what each OV head writes per unit of activation (normalised units until folded)."""
        return self.W_O

    def _gate(self) -> torch.Tensor | None:
        return self.decoder_norms().detach() if self.gated else None

    def _k(self, ctx: StepContext | None) -> int:
        return int(ctx.k) if ctx is not None and ctx.k is not None else int(self.cfg.k)

    def _activate(self, z: torch.Tensor, ctx: StepContext | None, update: bool = True) -> torch.Tensor:
        training = bool(ctx.training) if ctx is not None else False
        return self.activation(z, self._gate(), k=self._k(ctx), training=training, update=update)

    def encode(self, inputs: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        """Normalised contexts [B, T, d] (or one [T, d]) → f [B, T, d_sae] (or [T, d_sae])."""
        x = inputs[self.in_hook]
        if x.dim() == 2:
            return self._activate(self.attention_z(x.unsqueeze(0)), ctx)[0]
        return self._activate(self.attention_z(x), ctx)

    def decode_hooks(
        self, feature_acts: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        if feature_acts.layout != torch.strided:
            feature_acts = feature_acts.to_dense()
        y = feature_acts.to(self.W_O.dtype) @ self.W_O
        return {self.out_hook: y + self.b_O if self.b_O is not None else y}

    def loss(
        self,
        inputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        ctx: StepContext,
        mask: torch.Tensor | None = None,
    ) -> LossOutput:
        x, y = inputs[self.in_hook], targets[self.out_hook]
        if x.dim() == 2:  # one context
            x, y = x.unsqueeze(0), y.unsqueeze(0)
            mask = None if mask is None else mask.reshape(1, -1)
        z = self.attention_z(x)
        f = self._activate(z, ctx)
        recon = self.decode_hooks(f)[self.out_hook]
        mse = L.mse(recon, y, mask)
        norms = self.decoder_norms() if self.cfg.sparsity_include_decoder_norm else None
        extra_loss, terms, extra = latent_terms(
            masked_rows(z, mask),
            masked_rows(f, mask),
            ctx,
            self.activation,
            gate=self._gate(),
            norms=norms,
            gated=self.gated,
            residual=masked_rows(y - recon, mask),
            decode_rows=L.gather_decode(self.W_O),
            k_aux_default=self.d_model // 2,
        )
        loss = mse if extra_loss is None else mse + extra_loss
        extra["mse_per_element"] = L.mse_per_element(masked_rows(recon.detach(), mask), masked_rows(y, mask))
        return LossOutput(
            loss=loss,
            terms={"mse": mse.detach(), **{k: v.detach() for k, v in terms.items()}},
            feature_acts=f,
            reconstruction={self.out_hook: recon},
            target={self.out_hook: y},
            extra=extra,
        )

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def post_step(self) -> None:
        if self.cfg.decoder_unit_norm:
            self.W_O.copy_(_unit_rows(self.W_O.float()).to(self.W_O.dtype))

    @torch.no_grad()
    def init_from_data(self, batches: list[dict[str, torch.Tensor]], init_cfg: InitConfig | None) -> None:
        """`reset_parameters(init_cfg)`, then b_O at the zero / mean / geometric median of the (normalised)
        targets, b_V ← −mean z (`init_encoder_bias_with_mean_hidden_pre`), and with `grid_search_init_norm`
        the common W_O row norm (W_V tied) with the lowest loss on the first batch."""
        from saecli.config.init import InitConfig
        from saecli.dictionaries.init import geometric_median, grid_search

        cfg = init_cfg or InitConfig()
        self.reset_parameters(cfg)
        dev = self.W_O.device
        if self.b_O is not None and cfg.bias_init_method != "zero":
            y = torch.cat([b[self.out_hook].reshape(-1, self.d_model) for b in batches]).to(dev).float()
            centre = y.mean(0) if cfg.bias_init_method == "mean" else geometric_median(y[:16384])
            self.b_O.copy_(centre.to(self.b_O.dtype))
        x1 = batches[0][self.in_hook].to(dev)
        x1 = x1.unsqueeze(0) if x1.dim() == 2 else x1
        y1 = batches[0][self.out_hook].to(dev).reshape(x1.shape)
        tied = cfg.tie_encoder()

        def set_bias() -> None:
            if cfg.init_encoder_bias_with_mean_hidden_pre:
                self.b_V.zero_()
                self.b_V.sub_(self.attention_z(x1).float().reshape(-1, self.d_sae).mean(0).to(self.b_V.dtype))

        if cfg.grid_search_init_norm and not self.cfg.decoder_unit_norm:
            directions = _unit_rows(self.W_O.float())

            def set_norm(norm: float) -> None:
                self.W_O.copy_((directions * norm).to(self.W_O.dtype))
                if tied:
                    self.W_V.copy_(self.W_O * cfg.tie_factor())
                set_bias()

            def loss_at(norm: float) -> float:
                set_norm(norm)
                f = self._activate(self.attention_z(x1), StepContext(training=True, k=int(self.cfg.k)), update=False)
                return float(L.mse(self.decode_hooks(f)[self.out_hook], y1))

            best, _ = grid_search(loss_at, torch.linspace(0.1, 5.0, 50).tolist())
            set_norm(best)
        else:
            set_bias()

    @property
    def needs_model_init(self) -> bool:
        """True when the trainer must call `init_from_model(lm, raw_batches)` after `init_from_data`."""
        return self.cfg.initialize_lorsa_with_mhsa

    @torch.no_grad()
    def init_from_model(
        self, lm: LanguageModel | None, raw_batches: list[dict[str, torch.Tensor]] | None = None
    ) -> None:
        """Copy Q/K from the model's attention (see the module docstring). `raw_batches` (RAW activations)
        give the input scale when the dictionary has no dataset-wise one (norm_activation = "none": 1)."""
        if lm is None:
            raise UsageError("dictionary.initialize_lorsa_with_mhsa needs the language model: add a [model] section")
        from saecli.lm.hooks import get_attention, parse_hook

        point = parse_hook(self.in_hook)
        if point.site != "ln1.hook_normalized":
            raise UsageError(
                f"dictionary.initialize_lorsa_with_mhsa copies the attention's Q/K, which read "
                f"blocks.L.ln1.hook_normalized; hook_point_in is {self.in_hook!r}"
            )
        layer = self.cfg.attn_layer if self.cfg.attn_layer is not None else point.layer
        attn = get_attention(lm, layer)
        q_proj, k_proj = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
        if not isinstance(q_proj, nn.Linear) or not isinstance(k_proj, nn.Linear):
            raise UsageError(
                f"{lm.name}: initialize_lorsa_with_mhsa needs an attention with separate q_proj/k_proj "
                "(llama, mistral, qwen2, gemma, ...)"
            )
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            raise UsageError(f"{lm.name} normalises queries/keys (QK-norm), which LORSA does not model")
        config = lm.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_heads = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(attn, "head_dim", None) or q_proj.out_features // n_heads)
        if head_dim != self.d_qk_head:
            raise UsageError(
                f"dictionary.d_qk_head ({self.d_qk_head}) must equal the model's head dimension ({head_dim}) "
                "to copy its Q/K"
            )
        if self.n_qk_heads % n_heads:
            raise UsageError(
                f"dictionary.n_qk_heads ({self.n_qk_heads}) must be a multiple of the model's "
                f"{n_heads} attention heads to copy its Q/K"
            )
        theta = _model_rope_theta(config)
        if not self.cfg.use_rotary:
            raise UsageError("initialize_lorsa_with_mhsa copies a rotary attention: set dictionary.use_rotary = true")
        rep, groups = self.n_qk_heads // n_heads, n_heads // n_kv

        def per_head(proj: nn.Linear, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            w = proj.weight.detach().float().view(n, head_dim, self.d_model).transpose(1, 2)  # [n, d, e]
            b = proj.bias.detach().float().view(n, head_dim) if proj.bias is not None else None
            return w, b

        wq, bq = per_head(q_proj, n_heads)
        wk, bk = per_head(k_proj, n_kv)
        wk = wk.repeat_interleave(groups, 0)  # key head of each query head (GQA)
        bk = bk.repeat_interleave(groups, 0) if bk is not None else None
        s_in = self._input_scale(raw_batches)
        dev, dt = self.W_Q.device, self.W_Q.dtype
        self.W_Q.copy_((wq.repeat_interleave(rep, 0) / s_in).to(dev, dt))
        self.W_K.copy_((wk.repeat_interleave(rep, 0) / s_in).to(dev, dt))
        self.b_Q.copy_(bq.repeat_interleave(rep, 0).to(dev, dt) if bq is not None else torch.zeros_like(self.b_Q))
        self.b_K.copy_(bk.repeat_interleave(rep, 0).to(dev, dt) if bk is not None else torch.zeros_like(self.b_K))
        updates: dict[str, Any] = {}
        if self.cfg.rope_theta is None:
            updates["rope_theta"] = theta
        scaling = getattr(attn, "scaling", None)  # HF attention modules of most families (not all)
        if self.cfg.attention_scale is None and isinstance(scaling, (int, float)):
            updates["attention_scale"] = float(scaling)
        if updates:
            self.cfg = replace(self.cfg, **updates)

    def _input_scale(self, raw_batches: list[dict[str, torch.Tensor]] | None) -> float:
        mode = self.cfg.norm_activation
        if self.folded or mode == "none":
            return 1.0
        if mode == "dataset-wise":
            return float(self.scale(self.in_hook))
        if not raw_batches:
            raise UsageError(f"init from the model with norm_activation = {mode!r} needs a few raw batches")
        x = torch.cat([b[self.in_hook].reshape(-1, self.d_model).float() for b in raw_batches])
        return self.d_model**0.5 / float(x.norm(dim=-1).mean().clamp_min(1e-12))

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """See the module docstring: latents unchanged, raw x ↦ raw ŷ with no normalisation afterwards."""
        mode = self.cfg.norm_activation
        if self.folded or mode in ("token-wise", "batch-wise"):
            return
        if mode == "dataset-wise":
            s_in, s_out = float(self.scale(self.in_hook)), float(self.scale(self.out_hook))
            for w in (self.W_Q, self.W_K, self.W_V):
                w.mul_(s_in)
            self.W_O.div_(s_out)
            if self.b_O is not None:
                self.b_O.div_(s_out)
            if self.gated:
                fold_threshold(self.activation, 1.0 / s_out)
        self.folded = True


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _causal_key_mask(key_mask: torch.Tensor, t: int) -> torch.Tensor:
    """[B, 1, T, T] bool: s ≤ t and key s allowed; the diagonal always allowed (no all-masked row → no NaN)."""
    causal = torch.ones(t, t, dtype=torch.bool, device=key_mask.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=key_mask.device)
    return (causal & key_mask.to(torch.bool)[:, None, None, :]) | eye


def _model_rope_theta(config: PretrainedConfig) -> float:
    """The model's rotary base; UsageError for RoPE variants other than the default (scaled, partial)."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        kind = params.get("rope_type", "default")
        theta = params["rope_theta"]
    else:
        scaling = getattr(config, "rope_scaling", None) or {}
        kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
        theta = getattr(config, "rope_theta", None)
    if theta is None:
        raise UsageError("the model has no rotary embeddings (no rope_theta): initialize_lorsa_with_mhsa needs them")
    if kind != "default":
        raise UsageError(f"the model uses {kind!r} rotary scaling, which LORSA does not reproduce")
    partial = getattr(config, "partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise UsageError(f"the model rotates only {partial} of each head (partial rotary), which LORSA does not")
    return float(theta)
