"""EleutherAI sparsify folders: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors` (one per hook).

sparsify holds TopK SAEs and transcoders (with an optional skip): `encoder.weight` [d_sae, d_in],
`encoder.bias`, `W_dec` [d_sae, d_in], `b_dec`, `W_skip` [d_in, d_in] applied as x W_skipᵀ; an SAE
subtracts b_dec from its input, a transcoder (`transcode = true`) does not; latents are topk(relu(h)).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from saecli.dtypes import DTYPES
from saecli.errors import UsageError
from saecli.interop.canonical import Canonical

NAME = "sparsify"
CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def check(c: Canonical) -> None:
    if c.activation != "topk" or c.batchtopk:
        act = "batchtopk" if c.batchtopk else c.activation
        raise UsageError(
            f"sparsify holds TopK dictionaries only, this one is {act}: export it with --format "
            "saelens" + (" or --format dictionary_learning" if c.kind == "sae" else "")
        )
    if c.norm != "none":
        raise UsageError("sparsify takes raw inputs: a token-wise scaled dictionary exports with --format saelens")
    if c.d_in != c.d_out:
        raise UsageError("sparsify's transcoders read and write one width")


def write(c: Canonical, out: Path, info: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from saecli.fsio import write_json, write_with

    check(c)
    transcode = c.kind == "transcoder"
    dt = DTYPES.get(info.get("dtype", "float32"), torch.float32)
    state = {
        "encoder.weight": c.W_enc,
        "encoder.bias": c.b_enc if transcode else c.encoder_bias_with_input_centering(),
        "W_dec": c.W_dec,
        "b_dec": c.b_dec,
    }
    if c.W_skip is not None:
        state["W_skip"] = c.W_skip.T
    state = {k: v.detach().to(dt).contiguous() for k, v in state.items()}
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, c.d_sae // c.d_in),
        "normalize_decoder": True,
        "num_latents": c.d_sae,
        "k": c.top_k(),
        "multi_topk": False,
        "skip_connection": c.W_skip is not None,
        "transcode": transcode,
        "d_in": c.d_in,
    }
    folder = out / c.hook_in
    folder.mkdir(parents=True, exist_ok=True)
    write_with(folder / WEIGHTS, lambda p: save_file(state, str(p)))
    write_json(folder / CFG, cfg)
    # sparsify keeps no hook names: the transcoder's output hook goes in a side file saecli reads back
    if transcode:
        write_json(folder / "saecli_hooks.json", {"hook_in": c.hook_in, "hook_out": c.hook_out})
    return folder


def detect(folder: Path) -> Path | None:
    """The hookpoint folder: `folder` itself, or its only subfolder holding sae.safetensors + cfg.json."""
    if (folder / WEIGHTS).is_file() and (folder / CFG).is_file():
        return folder
    subs = sorted(p.parent for p in folder.glob(f"*/{WEIGHTS}") if (p.parent / CFG).is_file())
    if len(subs) > 1:
        raise UsageError(
            f"{folder} holds sparsify dictionaries for several hook points "
            f"({', '.join(p.name for p in subs)}): give the one to load, e.g. {subs[0]}"
        )
    return subs[0] if subs else None


def read(folder: Path) -> Canonical:
    from safetensors.torch import load_file

    cfg = json.loads((folder / CFG).read_text())
    if cfg.get("activation", "topk") != "topk":
        raise UsageError(f"{folder / CFG}: sparsify activation {cfg.get('activation')!r} is not supported (topk only)")
    s = load_file(str(folder / WEIGHTS))
    for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if key not in s:
            raise UsageError(f"{folder / WEIGHTS} has no tensor {key!r} (found: {', '.join(sorted(s))})")
    W_enc = s["encoder.weight"].float()
    d_in = int(cfg.get("d_in", W_enc.shape[1]))
    if W_enc.shape[1] != d_in or s["W_dec"].shape != W_enc.shape:
        raise UsageError(
            f"{folder / WEIGHTS}: encoder.weight {tuple(W_enc.shape)} and W_dec {tuple(s['W_dec'].shape)} "
            f"must both be [num_latents, d_in = {d_in}] (a transposed matrix?)"
        )
    hooks_file = folder / "saecli_hooks.json"
    hooks = json.loads(hooks_file.read_text()) if hooks_file.exists() else {}
    transcode = bool(cfg.get("transcode", False))
    hook_in = hooks.get("hook_in") or _hook_name(folder.name, transcode or "W_skip" in s)
    hook_out = hooks.get("hook_out", hook_in + ".out" if transcode or "W_skip" in s else hook_in)
    c = Canonical(
        W_enc=W_enc,
        b_enc=s["encoder.bias"].float(),
        W_dec=s["W_dec"].float(),
        b_dec=s["b_dec"].float(),
        activation="topk",
        hook_in=hook_in,
        hook_out=hook_out,
        k=int(cfg.get("k", 32)),
        W_skip=s["W_skip"].float().T.contiguous() if "W_skip" in s else None,
        info={"dtype": str(W_enc.dtype).replace("torch.", "")},
    )
    if not transcode:
        c.b_enc = c.b_enc - c.W_enc @ c.b_dec
    return c


def _hook_name(hookpoint: str, transcoder: bool) -> str:
    """sparsify names hookpoints by module: an SAE on `layers.L` (any prefix) reads the block's output,
    saecli's `blocks.L.hook_resid_post`; other names (and transcoders' modules) are kept as they are."""
    m = re.search(r"(?:^|\.)layers\.(\d+)$", hookpoint)
    return f"blocks.{m.group(1)}.hook_resid_post" if m and not transcoder else hookpoint
