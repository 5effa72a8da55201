"""One library-neutral form of a single-hook sparse coder, between saecli and the file formats.

    h = x_n W_encᵀ + b_enc           (no decoder bias subtracted from the input: it is folded into b_enc)
    f = relu(h) | topk(h, k) | h·1[h > θ]
    ŷ_n = f W_dec + b_dec [+ x_n W_skip]
    x_n = x                           (norm = "none": raw units, every dataset-wise scale folded in)
    x_n = x·√d/‖x‖, ŷ = ŷ_n·‖x‖/√d   (norm = "token-wise", SAELens' constant_norm_rescale)

Shapes: W_enc [d_sae, d_in], W_dec [d_sae, d_out], W_skip [d_in, d_out] (each library transposes some of
these; the writers and readers do). Every format module converts to and from this form only, so the
maths of each library is written once, here, next to the maths of saecli (`from_dictionary`,
`to_dictionary`). A BatchTopK dictionary is, at inference, a JumpReLU with one threshold for every latent
(`batchtopk = True` remembers it for the formats that have a BatchTopK class).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from saecli.errors import UsageError

if TYPE_CHECKING:
    from saecli.dictionaries.base import Dictionary
    from saecli.dictionaries.sae import SparseAutoEncoder


SINGLE_HOOK_KINDS = ("sae", "transcoder")


@dataclass
class Canonical:
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: str  # "relu" | "topk" | "jumprelu"
    hook_in: str
    hook_out: str
    k: int | None = None
    threshold: torch.Tensor | None = None  # [d_sae], jumprelu
    W_skip: torch.Tensor | None = None
    norm: str = "none"  # "none" | "token-wise"
    batchtopk: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # model, dataset, dtype, ... (metadata only)

    def top_k(self) -> int:
        """k of a TopK (or BatchTopK) dictionary; a ValueError for the others, which have none."""
        if self.k is None:
            raise ValueError(f"a {self.activation} dictionary has no k")
        return int(self.k)

    def theta(self) -> torch.Tensor:
        """The per-latent thresholds of a JumpReLU (or BatchTopK) dictionary; a ValueError for the others."""
        if self.threshold is None:
            raise ValueError(f"a {self.activation} dictionary has no threshold")
        return self.threshold

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def kind(self) -> str:
        return "sae" if self.hook_in == self.hook_out and self.W_skip is None else "transcoder"

    # ------------------------------------------------------------------ the maths
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs [n, d_in] → latent activations [n, d_sae]."""
        x = self._norm_in(x).to(self.W_enc.dtype)
        h = x @ self.W_enc.T + self.b_enc
        if self.activation == "relu":
            return torch.relu(h)
        if self.activation == "topk":
            vals, idx = torch.topk(h, min(self.top_k(), h.shape[-1]), dim=-1, sorted=False)
            return torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))
        assert self.threshold is not None
        return h * (h > self.threshold.to(h.dtype))

    def decode(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Latents (and the raw inputs, for the skip and the token-wise scale) → raw reconstruction."""
        y = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            y = y + self._norm_in(x).to(self.W_skip.dtype) @ self.W_skip
        if self.norm == "token-wise":
            y = y * (x.norm(dim=-1, keepdim=True).clamp_min(1e-12) / self.d_in**0.5).to(y.dtype)
        return y

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return f, self.decode(f, x)

    def _norm_in(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "token-wise":
            return x * (self.d_in**0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return x

    def one_threshold(self) -> bool:
        """Every latent has the same threshold (what a BatchTopK holds); False without thresholds."""
        t = self.threshold
        return t is not None and bool(torch.allclose(t, t[0].expand_as(t)))

    # ------------------------------------------------------------------ decoder norms
    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.float().norm(dim=1)

    def unit_decoder(self, target: float = 1.0) -> Canonical:
        """The same function with decoder rows of norm `target`: ‖W_dec,i‖/target moves into latent i's
        encoder row, bias and threshold (features scale by it; reconstructions are unchanged). Exact for
        ReLU and JumpReLU; for TopK only when the rows already have one norm (else the ranking would change)."""
        n = self.decoder_norms().clamp_min(1e-12) / target
        if self.activation == "topk" and not torch.allclose(n, n[0].expand_as(n), rtol=1e-3):
            raise ValueError("a TopK dictionary ranks h itself: its decoder rows cannot be normalised exactly")
        nd = n.to(self.W_enc.dtype)
        return replace(
            self,
            W_enc=self.W_enc * nd[:, None],
            b_enc=self.b_enc * nd,
            W_dec=self.W_dec / n.to(self.W_dec.dtype)[:, None],
            threshold=None if self.threshold is None else self.threshold * n.to(self.threshold.dtype),
        )

    def encoder_bias_with_input_centering(self) -> torch.Tensor:
        """b such that (x − b_dec) W_encᵀ + b = x W_encᵀ + b_enc: for formats that always subtract b_dec."""
        return self.b_enc + self.W_enc @ self.b_dec.to(self.W_enc.dtype)


# ---------------------------------------------------------------------------------------- saecli ↔ canonical
def from_dictionary(dictionary: Dictionary) -> Canonical:
    """A saecli SAE or transcoder → the canonical form, mapping raw activations to raw reconstructions
    exactly as `dictionary.reconstruct` does (the dataset-wise scale folded in on a copy)."""
    from saecli.dictionaries.sae import SparseAutoEncoder

    if not isinstance(dictionary, SparseAutoEncoder):
        raise UsageError(
            f"a {dictionary.kind} reads or writes several hook points: the SAELens, sparsify and "
            "dictionary_learning formats hold single-hook kinds only (sae, transcoder); "
            f"keep the {dictionary.kind} in saecli's own run folder"
            + (" (circuit-tracer's CLT layout is not written yet)" if dictionary.kind == "clt" else "")
        )
    cfg = dictionary.cfg
    mode = cfg.norm_activation
    if mode == "batch-wise" and not dictionary.folded:
        raise UsageError(
            "batch-wise input scaling depends on each batch: no format can hold it (train with "
            'norm_activation = "dataset-wise", "token-wise" or "none" to export)'
        )
    d = copy.deepcopy(dictionary).float().cpu()
    if mode == "dataset-wise" and not d.folded:
        d.fold_activation_scale()
    with torch.no_grad():
        W_enc, b_enc, W_dec = d.W_enc.detach().clone(), d.b_enc.detach().clone(), d.W_dec.detach().clone()
        b_dec = d.b_dec.detach().clone() if d.b_dec is not None else torch.zeros(W_dec.shape[1])
        if cfg.apply_decoder_bias_to_pre_encoder and d.b_dec is not None:
            b_enc = b_enc - W_enc @ b_dec
        skip = skip_matrix(d)
        W_skip = skip.detach().clone() if skip is not None else None
        act = cfg.activation
        threshold = None
        if act == "jumprelu":
            threshold = d.activation.theta().detach().float().clone().expand(d.d_sae).clone()
        elif act == "batchtopk":
            threshold = d.activation.threshold.detach().float().expand(d.d_sae).clone()
        if d.gated and act != "relu":
            # the activation compares h·‖W_d‖: move the norms into the encoder so the rows have norm 1
            n = d.decoder_norms().detach().clamp_min(1e-12)
            W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
    norm = "token-wise" if mode == "token-wise" and not d.folded else "none"
    return Canonical(
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        activation={"batchtopk": "jumprelu"}.get(act, act),
        hook_in=d.in_hooks[0],
        hook_out=d.out_hooks[0],
        k=int(cfg.k) if act in ("topk", "batchtopk") else None,
        threshold=threshold,
        W_skip=W_skip,
        norm=norm,
        batchtopk=act == "batchtopk",
        info={"dtype": str(dictionary.W_enc.dtype).replace("torch.", "")},
    )


def to_dictionary(c: Canonical) -> SparseAutoEncoder:
    """The canonical form → a saecli dictionary (ungated, already folded) computing the same function."""
    from saecli.config.base import parse
    from saecli.config.dictionary import DictionaryConfig
    from saecli.dictionaries.registry import dictionary_class
    from saecli.dictionaries.sae import SparseAutoEncoder

    if c.d_in != c.d_out:
        raise UsageError(
            f"this dictionary reads width {c.d_in} and writes width {c.d_out}: saecli's "
            "transcoders read and write one width (d_model)"
        )
    kind = c.kind
    table: dict[str, Any] = {
        "kind": kind,
        "d_sae": c.d_sae,
        "activation": c.activation,
        "norm_activation": c.norm,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "sparsity_include_decoder_norm": False,
        "decoder_unit_norm": False,
        "dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}.get(
            c.W_enc.dtype, "float32"
        ),
    }
    if c.activation == "topk":
        table["k"] = min(c.top_k(), c.d_sae)
    elif c.k is not None:
        table["k"] = min(int(c.k), c.d_sae)
    if kind == "transcoder":
        table.update(hook_point_in=c.hook_in, hook_point_out=c.hook_out, skip_connection=c.W_skip is not None)
    if c.activation == "jumprelu":
        table["jumprelu_threshold_init"] = 0.1
    cfg = parse(DictionaryConfig, table, key="sae")
    cls = dictionary_class(kind)
    d = cls.from_saved(cfg, {"d_model": c.d_in, "in_hooks": [c.hook_in], "out_hooks": [c.hook_out]})
    assert isinstance(d, SparseAutoEncoder), kind  # the canonical form holds the single-hook kinds only
    load_weights(d, c)
    d.folded = c.norm == "none"  # raw units; token-wise scaling stays a per-input step
    return d


@torch.no_grad()
def load_weights(d: SparseAutoEncoder, c: Canonical, s_in: float = 1.0, s_out: float = 1.0) -> None:
    """Write `c`'s weights into saecli dictionary `d` whose inputs/outputs are scaled by s_in/s_out
    (the inverse of `fold_activation_scale`; 1 for a folded or unscaled dictionary). `d` must agree with
    `c` on activation, gating and decoder bias (see saecli.interop.pretrained for the checks)."""
    dt = d.W_enc.dtype
    d.W_enc.copy_(c.W_enc.to(dt))
    b_enc = c.b_enc.float() * s_in
    if d.cfg.apply_decoder_bias_to_pre_encoder and d.b_dec is not None:
        b_enc = b_enc + c.W_enc.float() @ (c.b_dec.float() * s_out)
    d.b_enc.copy_(b_enc.to(dt))
    d.W_dec.copy_((c.W_dec.float() * (s_out / s_in)).to(dt))
    if d.b_dec is not None:
        d.b_dec.copy_((c.b_dec.float() * s_out).to(dt))
    skip = skip_matrix(d)
    if skip is not None:
        skip.copy_((c.W_skip.float() * (s_out / s_in)).to(dt) if c.W_skip is not None else torch.zeros_like(skip))
    if c.threshold is not None and d.cfg.activation in ("jumprelu", "batchtopk"):
        # saecli's θ compares h (ungated) or h·‖W_d‖ (gated); the canonical θ compares the raw h
        theta = c.threshold.float() * (s_out if d.gated else s_in)
        if d.gated:
            theta = theta * d.decoder_norms().detach().float() / (s_out / s_in)
        if d.cfg.activation == "jumprelu":
            d.activation.log_threshold.copy_(theta.clamp_min(1e-30).log().to(d.activation.log_threshold.dtype))
        else:
            d.activation.threshold.fill_(float(theta.mean()))


def skip_matrix(d: SparseAutoEncoder) -> torch.Tensor | None:
    """A transcoder's skip matrix W_skip [d_in, d_out] (None without one, and for an SAE)."""
    from saecli.dictionaries.transcoder import Transcoder

    return d.W_skip if isinstance(d, Transcoder) else None
