"""dictionary_learning folders: `ae.pt` (a torch state dict) + `config.json` (`trainer.dict_class`, ...).

Classes written and read (SAEs only; the library has no transcoder):
    AutoEncoder          ReLU   encoder.weight [d_sae, d], encoder.bias, decoder.weight [d, d_sae], bias;
                                f = relu(encoder(x − bias)); its loader renormalises decoder columns, so
                                the export has unit decoder rows already (exact: the norms move into the encoder)
    AutoEncoderTopK      TopK   encoder.*, decoder.weight [d, d_sae], b_dec, k, threshold (−1: unused)
    BatchTopKSAE         BatchTopK at inference: relu(h)·1[relu(h) > threshold] with one scalar threshold
    JumpReluAutoEncoder  JumpReLU W_enc [d, d_sae], b_enc, W_dec [d_sae, d], b_dec, threshold [d_sae]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saecli.errors import UsageError
from saecli.interop.canonical import Canonical

NAME = "dictionary_learning"
CFG, WEIGHTS = "config.json", "ae.pt"


def dict_class(c: Canonical) -> str:
    if c.kind != "sae":
        raise UsageError(
            "dictionary_learning has no transcoder: export it with --format saelens (ReLU, JumpReLU, "
            "ReLU with skip) or --format sparsify (TopK)"
        )
    if c.norm != "none":
        raise UsageError("dictionary_learning takes raw inputs: a token-wise scaled SAE exports with --format saelens")
    if c.batchtopk:
        return "BatchTopKSAE"
    return {"relu": "AutoEncoder", "topk": "AutoEncoderTopK", "jumprelu": "JumpReluAutoEncoder"}[c.activation]


def write(c: Canonical, out: Path, info: dict[str, Any]) -> Path:
    from saecli.fsio import write_json, write_with

    cls = dict_class(c)
    if cls == "AutoEncoder":
        c = c.unit_decoder()
    centred = c.encoder_bias_with_input_centering()
    if cls == "AutoEncoder":
        state = {"bias": c.b_dec, "encoder.weight": c.W_enc, "encoder.bias": centred, "decoder.weight": c.W_dec.T}
    elif cls == "JumpReluAutoEncoder":
        state = {"W_enc": c.W_enc.T, "b_enc": c.b_enc, "W_dec": c.W_dec, "b_dec": c.b_dec, "threshold": c.theta()}
    else:
        theta = float(c.theta()[0]) if cls == "BatchTopKSAE" else -1.0
        state = {
            "k": torch.tensor(c.top_k(), dtype=torch.int),
            "threshold": torch.tensor(theta),
            "decoder.weight": c.W_dec.T,
            "encoder.weight": c.W_enc,
            "encoder.bias": centred,
            "b_dec": c.b_dec,
        }
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v for k, v in state.items()}
    trainer = {
        "dict_class": cls,
        "trainer_class": "saecli export",
        "activation_dim": c.d_in,
        "dict_size": c.d_sae,
        "lm_name": info.get("model"),
        "submodule_name": c.hook_in,
        "layer": info.get("layer"),
    }
    if c.k is not None:
        trainer["k"] = c.top_k()
    out.mkdir(parents=True, exist_ok=True)
    write_with(out / WEIGHTS, lambda p: torch.save(state, p))
    write_json(
        out / CFG, {"trainer": trainer, "buffer": {"dataset": info.get("dataset")}, "saecli": {"hook_point": c.hook_in}}
    )
    return out


def detect(folder: Path) -> Path | None:
    return folder if (folder / WEIGHTS).is_file() and (folder / CFG).is_file() else None


def read(folder: Path) -> Canonical:
    cfg = json.loads((folder / CFG).read_text())
    trainer = cfg.get("trainer") or {}
    cls = trainer.get("dict_class")
    known = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")
    if cls not in known:
        raise UsageError(f"{folder / CFG}: dict_class {cls!r} is not supported (supported: {', '.join(known)})")
    try:
        s = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or non-tensor pickle: one answer
        raise UsageError(f"{folder / WEIGHTS} is not a readable state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(s, dict) and "ae" in s and isinstance(s["ae"], dict):  # a training checkpoint
        s = s["ae"]
    hook = (cfg.get("saecli") or {}).get("hook_point") or trainer.get("submodule_name") or "sae_input"
    info = {"model": trainer.get("lm_name"), "dataset": (cfg.get("buffer") or {}).get("dataset")}
    need = {
        "AutoEncoder": ("bias", "encoder.weight", "encoder.bias", "decoder.weight"),
        "JumpReluAutoEncoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    }.get(cls, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"))
    missing = [k for k in need if k not in s]
    if missing:
        raise UsageError(f"{folder / WEIGHTS} ({cls}) lacks {', '.join(missing)} (found: {', '.join(sorted(s))})")
    s = {k: v.float() if v.is_floating_point() else v for k, v in s.items()}
    if cls == "JumpReluAutoEncoder":
        W_enc, b_dec = s["W_enc"].T.contiguous(), s["b_dec"]
        c = Canonical(
            W_enc=W_enc,
            b_enc=s["b_enc"],
            W_dec=s["W_dec"],
            b_dec=b_dec,
            activation="jumprelu",
            hook_in=hook,
            hook_out=hook,
            threshold=s["threshold"].clamp_min(0),
            info=info,
        )
        _shapes(folder, c)
        return c
    b_dec = s["bias"] if cls == "AutoEncoder" else s["b_dec"]
    W_enc, W_dec = s["encoder.weight"], s["decoder.weight"].T.contiguous()
    c = Canonical(
        W_enc=W_enc,
        b_enc=s["encoder.bias"] - W_enc @ b_dec,
        W_dec=W_dec,
        b_dec=b_dec,
        activation={"AutoEncoder": "relu", "AutoEncoderTopK": "topk"}.get(cls, "jumprelu"),
        hook_in=hook,
        hook_out=hook,
        info=info,
    )
    if cls == "AutoEncoder":  # its loader renormalises the decoder: report the features it would
        c = c.unit_decoder()
    else:
        c.k = int(s["k"]) if "k" in s else int(trainer.get("k", 0))
    if cls == "BatchTopKSAE":
        c.threshold = s["threshold"].float().clamp_min(0).expand(c.d_sae).clone()
        c.batchtopk = True
    _shapes(folder, c)
    return c


def _shapes(folder: Path, c: Canonical) -> None:
    if c.W_dec.shape != c.W_enc.shape:
        raise UsageError(
            f"{folder / WEIGHTS}: encoder {tuple(c.W_enc.shape)} and decoder {tuple(c.W_dec.shape)} "
            "do not fit one another (a transposed matrix?)"
        )
