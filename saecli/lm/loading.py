"""Load a causal LM (hub name, local folder, or GGUF file) into a `LanguageModel` with its tokenizer facts.

Every failure a user can cause (missing folder, missing GGUF file, `gguf` not installed, unknown hub
name, offline hub) becomes one readable `UsageError` paragraph; the original exception is chained for
`--verbose`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saecli.dtypes import DTYPES
from saecli.errors import UsageError
from saecli.lm.hooks import Layout, detect_layout, module_at

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from saecli.config.model import ModelConfig


@dataclass
class LanguageModel:
    """A frozen (eval, no grad) causal LM, its tokenizer, and the facts the rest of saecli needs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    family: str
    n_layers: int
    d_model: int
    device: torch.device
    dtype: torch.dtype
    bos_token_id: int | None
    prepend_bos: bool
    special_token_ids: list[int]
    vocab_size: int
    tokenizer_adds_bos: bool = False  # the tokenizer puts BOS in front by itself (llama-3 style)
    layout: Layout | None = field(default=None, repr=False)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"model.device = {device!r} but no CUDA device is available here; use 'auto' or 'cpu'")
    return torch.device(device)


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id `org/model` (or whose parent folder exists here) is meant as a folder."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(".gguf"):
        return True
    parent = Path(name).expanduser().parent
    return str(parent) != "." and parent.is_dir()


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


def _source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(folder or hub name, gguf file name) after checking what can be checked locally."""
    name, gguf = cfg.name, cfg.gguf_file
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf" and gguf is None:  # name points at the .gguf itself
        path, gguf = path.parent, path.name
    if path.exists():
        if not path.is_dir():
            raise UsageError(
                f"model.name = {name!r} is a file, not a model folder (for a GGUF file set model.gguf_file)"
            )
        if gguf is not None and not (path / gguf).is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise UsageError(
                f"model.gguf_file = {gguf!r} is not in {path.resolve()}"
                + (f"; GGUF files there: {', '.join(found)}" if found else "; that folder holds no .gguf file")
            )
        if gguf is None and not (path / "config.json").is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise UsageError(
                f"{path.resolve()} holds no config.json, so it is not a transformers model folder"
                + (f"; to load a GGUF file there set model.gguf_file (found: {', '.join(found)})" if found else "")
            )
        return str(path), gguf
    if _looks_like_path(name):
        raise UsageError(
            f"model folder {name!r} does not exist (looked for {path.resolve()}; relative paths are "
            f"relative to the folder saecli runs in, {Path.cwd()})"
        )
    return name, gguf


@contextmanager
def _no_weight_progress_bar() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bar (noise for a sub-second step); restore it after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    import functools

    patched: Any = None  # transformers' module (its tqdm attribute is not in its types)
    try:  # the GGUF de-quantiser draws its own tqdm bar, outside transformers' switch
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        original_tqdm = gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
        patched = gguf_utils
    except (ImportError, AttributeError):
        patched = None
    try:
        yield
    finally:
        if patched is not None:
            patched.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_pretrained(cfg: ModelConfig, source: str, gguf: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is not None and importlib.util.find_spec("gguf") is None:
        raise UsageError("loading a GGUF file needs the `gguf` package: pip install gguf")
    common: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if gguf is not None:
        common["gguf_file"] = gguf
    what = f"{source}/{gguf}" if gguf else source
    try:
        with _no_weight_progress_bar():
            tokenizer = AutoTokenizer.from_pretrained(source, **common)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
    except UsageError:
        raise
    except Exception as exc:  # the library's many error types → one paragraph
        local = Path(source).expanduser().exists()
        hint = ""
        if not local:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
            hint = (
                f" {source!r} is not a local folder (looked in {Path.cwd()}), so it was looked up on the "
                "Hugging Face hub"
                + (" (offline mode is on: HF_HUB_OFFLINE=1)" if offline else "")
                + "; check the spelling or download the model first."
            )
        elif gguf is not None:
            hint = " The GGUF file may be corrupt, or its architecture unsupported by transformers."
        raise UsageError(f"could not load the model {what!r}.{hint} ({_short(exc)})") from exc
    return model, tokenizer


def _bos(cfg: ModelConfig, tokenizer, model) -> tuple[int | None, bool]:
    """(BOS id, whether the tokenizer adds it by itself)."""
    if cfg.bos_token is not None:
        vocab = tokenizer.get_vocab()
        if cfg.bos_token not in vocab:
            raise UsageError(f"model.bos_token = {cfg.bos_token!r} is not a token of {cfg.name}'s tokenizer")
        bos = vocab[cfg.bos_token]
    else:
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = getattr(model.config, "bos_token_id", None)
            bos = bos if isinstance(bos, int) else None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = bos is not None and len(with_special) > len(without) and with_special[0] == bos
    return bos, adds


def wrap_model(
    model,
    tokenizer=None,
    *,
    name: str | None = None,
    prepend_bos: bool | None = None,
    bos_token_id: int | None = None,
    tokenizer_adds_bos: bool = False,
) -> LanguageModel:
    """Freeze an already-built HF causal LM and describe it (used by `load_model`, handy from Python/tests)."""
    model.eval()
    model.requires_grad_(False)
    config = model.config
    family = getattr(config, "model_type", "unknown")
    layout = detect_layout(model)
    n_layers = len(module_at(model, layout.layers))
    if bos_token_id is None and tokenizer is not None:
        bos_token_id = tokenizer.bos_token_id
    special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    if bos_token_id is not None:
        special.add(bos_token_id)
    if prepend_bos is None:
        prepend_bos = bos_token_id is not None and not tokenizer_adds_bos
    param = next(model.parameters())
    return LanguageModel(
        model=model,
        tokenizer=tokenizer,
        name=name or getattr(config, "_name_or_path", "") or family,
        family=family,
        n_layers=n_layers,
        d_model=int(config.hidden_size),
        device=param.device,
        dtype=param.dtype,
        bos_token_id=bos_token_id,
        prepend_bos=bool(prepend_bos),
        special_token_ids=sorted(int(i) for i in special),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        tokenizer_adds_bos=tokenizer_adds_bos,
        layout=layout,
    )


def load_model(cfg: ModelConfig) -> LanguageModel:
    """Load `cfg` (hub name, local folder, or folder + gguf_file) frozen on its device, in its dtype."""
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    source, gguf = _source(cfg)
    model, tokenizer = _load_pretrained(cfg, source, gguf, dtype)
    bos, adds = _bos(cfg, tokenizer, model)
    if cfg.prepend_bos and bos is None:
        raise UsageError(f"model.prepend_bos = true but {cfg.name}'s tokenizer has no BOS token; set model.bos_token")
    if model.dtype != dtype:  # GGUF dequantisation may ignore the requested dtype
        model = model.to(dtype)
    model = model.to(device)
    name = f"{cfg.name}/{gguf}" if gguf and not cfg.name.endswith(".gguf") else cfg.name
    lm = wrap_model(model, tokenizer, name=name, prepend_bos=cfg.prepend_bos, bos_token_id=bos, tokenizer_adds_bos=adds)
    if lm.layout is not None and not lm.layout.verified:
        from saecli import ui

        ui.warn(
            f"{lm.family} is not a family saecli has checked; hook points were guessed from module names "
            "(blocks.L.hook_attn_out / hook_mlp_out may miss a post-norm)"
        )
    return lm
