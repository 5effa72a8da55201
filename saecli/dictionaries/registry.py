"""Kind name → Dictionary class. A new kind adds one line to `_KIND_MODULES`."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from saecli.dictionaries.base import CONFIG_NAME, WEIGHTS_NAME, Dictionary
from saecli.errors import UsageError

# kind → module defining a Dictionary subclass with `kind = <name>` and a `from_config` classmethod
_KIND_MODULES = {
    "sae": "saecli.dictionaries.sae",
    "transcoder": "saecli.dictionaries.transcoder",
    "crosscoder": "saecli.dictionaries.crosscoder",
    "clt": "saecli.dictionaries.clt",
    "lorsa": "saecli.dictionaries.lorsa",
    "molt": "saecli.dictionaries.molt",
}


def dictionary_class(kind: str) -> type[Dictionary]:
    if kind not in _KIND_MODULES:
        raise UsageError(f"unknown dictionary kind {kind!r} (known: {', '.join(sorted(_KIND_MODULES))})")
    module = importlib.import_module(_KIND_MODULES[kind])
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Dictionary) and getattr(obj, "kind", None) == kind:
            return obj
    raise RuntimeError(f"module {_KIND_MODULES[kind]} defines no Dictionary of kind {kind!r}")


def build_dictionary(cfg: Any, d_model: int, hook_points: list[str]) -> Dictionary:
    """A fresh (untrained, un-initialised from data) dictionary for `cfg` on these hook points."""
    return dictionary_class(cfg.kind).from_config(cfg, d_model=d_model, hook_points=hook_points)


def load_dictionary(folder: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load any kind saved with `Dictionary.save` (folder with cfg.json + sae_weights.safetensors)."""
    from safetensors.torch import load_file

    from saecli.config.base import parse
    from saecli.config.dictionary import DictionaryConfig

    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists() or not (folder / WEIGHTS_NAME).exists():
        raise UsageError(f"{folder} holds no saved dictionary ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    from saecli.lm.hooks import check_saved_hook_names

    check_saved_hook_names([*meta.get("in_hooks", []), *meta.get("out_hooks", [])], meta.get("hook_names"),
                           str(folder / CONFIG_NAME))
    # saved configs hold None for unset optional fields; leaving them out restores the same defaults
    cfg = parse(DictionaryConfig, {k: v for k, v in meta["cfg"].items() if v is not None}, key="sae")
    cls = dictionary_class(meta["kind"])
    model = cls.from_saved(cfg, meta)
    state = load_file(str(folder / WEIGHTS_NAME))
    model.load_state_dict(state)
    model.folded = bool(meta.get("folded", False))
    return model.to(device)
