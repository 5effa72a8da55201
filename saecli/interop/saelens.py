"""SAELens (v6) folders: `cfg.json` (flat fields + `metadata`) and `sae_weights.safetensors`.

Architectures written and read: standard (ReLU), topk, jumprelu (saecli's BatchTopK too, as SAELens
saves its own), transcoder, skip_transcoder and jumprelu_transcoder. SAELens stores W_enc [d_in, d_sae]
and W_skip [d_out, d_in] (the transposes of the canonical form), computes h = (x − b_dec·apply_b_dec_to_input)
W_enc + b_enc and, for topk with `rescale_acts_by_decoder_norm`, ranks and reports h·‖W_dec‖.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saecli.dtypes import DTYPES
from saecli.errors import UsageError
from saecli.interop.canonical import Canonical

NAME = "saelens"
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
VERSION = "6.0.0"  # the layout written (SAELens converts older cfg.json files itself)
_SAE_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}


def architecture(c: Canonical) -> str:
    """SAELens' architecture name for `c`, or a UsageError naming the formats that can hold it."""
    if c.kind == "sae":
        return _SAE_ARCH[c.activation]
    if c.norm != "none":
        raise UsageError("SAELens transcoders take raw inputs: a token-wise scaled transcoder cannot be exported")
    if c.W_skip is not None:
        if c.activation == "relu":
            return "skip_transcoder"
        raise UsageError(
            f"SAELens' skip transcoders use ReLU, this one {c.activation}: export it with "
            "--format sparsify (TopK, skip included)"
            if c.activation == "topk"
            else "SAELens' skip transcoders use ReLU and sparsify's TopK: no format holds a JumpReLU skip "
            "transcoder (keep it in saecli's own run folder)"
        )
    if c.activation == "topk":
        raise UsageError("SAELens has no TopK transcoder: export it with --format sparsify")
    return "jumprelu_transcoder" if c.activation == "jumprelu" else "transcoder"


def write(c: Canonical, out: Path, info: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from saecli.fsio import write_json, write_with

    arch = architecture(c)
    dtype = info.get("dtype", "float32")
    dt = DTYPES.get(dtype, torch.float32)
    state = {"W_enc": c.W_enc.T, "b_enc": c.b_enc, "W_dec": c.W_dec, "b_dec": c.b_dec}
    if c.threshold is not None:
        state["threshold"] = c.threshold
    if c.W_skip is not None:
        state["W_skip"] = c.W_skip.T
    state = {k: v.detach().to(dt).contiguous() for k, v in state.items()}
    metadata = {
        "model_name": info.get("model"),
        "hook_name": c.hook_in,
        "dataset_path": info.get("dataset"),
        "context_size": info.get("context_size"),
        "prepend_bos": info.get("prepend_bos"),
        "sae_lens_version": VERSION,
        "sae_lens_training_version": VERSION,
        "saecli_version": info.get("saecli_version"),
    }
    if c.kind == "transcoder":
        metadata["hook_name_out"] = c.hook_out
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "constant_norm_rescale" if c.norm == "token-wise" else "none",
        "reshape_activations": "none",
        "hook_name": c.hook_in,
        "metadata": metadata,
    }
    if arch == "topk":
        cfg.update(k=c.top_k(), rescale_acts_by_decoder_norm=False)
    if c.kind == "transcoder":
        cfg["d_out"] = c.d_out
    out.mkdir(parents=True, exist_ok=True)
    write_with(out / WEIGHTS, lambda p: save_file(state, str(p)))
    write_json(out / CFG, cfg)
    return out


def detect(folder: Path) -> Path | None:
    """`folder` itself when it holds a SAELens cfg.json (flat, with `architecture` or a pre-6 `d_sae`)."""
    if not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        return None
    try:
        cfg = json.loads((folder / CFG).read_text())
    except (OSError, ValueError):
        return None
    return folder if isinstance(cfg, dict) and "cfg" not in cfg and ("architecture" in cfg or "d_sae" in cfg) else None


def read(folder: Path) -> Canonical:
    from safetensors.torch import load_file

    cfg = json.loads((folder / CFG).read_text())
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    where = f"{folder / CFG}"
    acts = {
        "standard": "relu",
        "topk": "topk",
        "jumprelu": "jumprelu",
        "transcoder": "relu",
        "skip_transcoder": "relu",
        "jumprelu_transcoder": "jumprelu",
    }
    if arch not in acts:
        raise UsageError(f"{where}: SAELens architecture {arch!r} is not supported (supported: {', '.join(acts)})")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "constant_norm_rescale"):
        raise UsageError(
            f"{where}: normalize_activations = {norm!r} needs a scaling factor the folder does not "
            "hold: fold it into the weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    s = load_file(str(folder / WEIGHTS))
    W_enc = _need(s, "W_enc", folder).float()
    d_in, d_sae = int(cfg.get("d_in", W_enc.shape[0])), int(cfg.get("d_sae", W_enc.shape[1]))
    if tuple(W_enc.shape) != (d_in, d_sae):
        raise UsageError(
            f"{folder / WEIGHTS}: W_enc has shape {tuple(W_enc.shape)}, cfg.json says [d_in, d_sae] = "
            f"[{d_in}, {d_sae}] (a transposed matrix?)"
        )
    W_dec, b_dec, b_enc = (
        _need(s, "W_dec", folder).float(),
        _need(s, "b_dec", folder).float(),
        _need(s, "b_enc", folder).float(),
    )
    if W_dec.shape[0] != d_sae:
        raise UsageError(
            f"{folder / WEIGHTS}: W_dec has shape {tuple(W_dec.shape)}, expected [d_sae = {d_sae}, d_out] "
            "(a transposed matrix?)"
        )
    hook_in = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or "sae_input"
    transcoder = "transcoder" in arch
    hook_out = (meta.get("hook_name_out") or cfg.get("hook_name_out") or _out_hook(hook_in)) if transcoder else hook_in
    c = Canonical(
        W_enc=W_enc.T.contiguous(),
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        activation=acts[arch],
        hook_in=hook_in,
        hook_out=hook_out,
        k=int(cfg["k"]) if "k" in cfg else None,
        threshold=s["threshold"].float() if "threshold" in s else None,
        W_skip=s["W_skip"].float().T.contiguous() if "W_skip" in s else None,
        norm="token-wise" if norm == "constant_norm_rescale" else "none",
        info={
            "model": meta.get("model_name"),
            "dataset": meta.get("dataset_path"),
            "dtype": str(cfg.get("dtype", "float32")).replace("torch.", ""),
        },
    )
    if c.activation == "jumprelu" and c.threshold is None:
        raise UsageError(f"{folder / WEIGHTS}: a {arch} SAE needs a `threshold` tensor")
    if cfg.get("apply_b_dec_to_input", not transcoder) and not transcoder:
        c.b_enc = c.b_enc - c.W_enc @ c.b_dec
    if c.activation == "jumprelu":  # SAELens: relu(h)·1[h > θ]; the canonical h·1[h > θ] equals it for θ ≥ 0
        c.threshold = c.theta().clamp_min(0)
    if c.activation == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        n = c.decoder_norms().clamp_min(1e-12)
        c.W_enc, c.b_enc, c.W_dec = c.W_enc * n[:, None], c.b_enc * n, c.W_dec / n[:, None]
    return c


def _need(state: dict[str, torch.Tensor], key: str, folder: Path) -> torch.Tensor:
    if key not in state:
        raise UsageError(f"{folder / WEIGHTS} has no tensor {key!r} (found: {', '.join(sorted(state))})")
    return state[key]


def _out_hook(hook_in: str) -> str:
    """A transcoder's output hook when the file names none: the MLP's output for an MLP input."""
    for mlp_input in ("ln2.hook_normalized", "hook_mlp_in"):
        if hook_in.endswith(mlp_input):
            return hook_in[: -len(mlp_input)] + "hook_mlp_out"
    return hook_in + ".out"
