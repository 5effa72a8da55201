"""Kind name → Dictionary class. A new kind adds one line to `saecli.dictionaries.kinds.KIND_MODULES`."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from saecli.dictionaries.base import CONFIG_NAME, WEIGHTS_NAME, Dictionary
from saecli.dictionaries.kinds import KIND_MODULES
from saecli.errors import UsageError

if TYPE_CHECKING:
    from saecli.config.dictionary import DictionaryConfig

T = TypeVar("T")


def kinds() -> list[str]:
    """Every registered kind name (tests/test_kind_contract.py checks each against the Dictionary interface)."""
    return sorted(KIND_MODULES)


def dictionary_class(kind: str) -> type[Dictionary]:
    if kind not in KIND_MODULES:
        raise UsageError(f"unknown dictionary kind {kind!r} (known: {', '.join(sorted(KIND_MODULES))})")
    module = importlib.import_module(KIND_MODULES[kind])
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Dictionary) and obj.kind == kind:
            return obj
    raise RuntimeError(f"module {KIND_MODULES[kind]} defines no Dictionary of kind {kind!r}")


def build_dictionary(cfg: DictionaryConfig, d_model: int, hook_points: list[str]) -> Dictionary:
    """A fresh (untrained, un-initialised from data) dictionary for `cfg` on these hook points."""
    return dictionary_class(cfg.kind).from_config(cfg, d_model=d_model, hook_points=hook_points)


def load_dictionary(folder: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load any kind saved with `Dictionary.save` (folder with cfg.json + sae_weights.safetensors), or a
    SAELens / sparsify / dictionary_learning folder (format detected from its files; see saecli.interop).

    A missing, truncated or corrupt file, or a folder no library saecli knows wrote, is a UsageError naming the file.
    """
    from safetensors.torch import load_file

    from saecli.interop import detect_format, load_any

    if detect_format(folder) is not None:  # a SAELens / sparsify / dictionary_learning folder
        return load_any(folder, device=device)
    folder = Path(folder)
    meta, cfg, cls = _check_native(folder)
    model = _build(folder, cls, cfg, meta)
    weights = folder / WEIGHTS_NAME
    state = _safetensors(weights, lambda: load_file(str(weights)))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(
            f"{weights} does not match {CONFIG_NAME} (another dictionary's weights?): "
            f"{str(exc).splitlines()[0]} {_mismatch(exc)}"
        ) from None
    model.folded = bool(meta.get("folded", False))
    return model.to(device)


def check_saved(folder: str | Path) -> None:
    """Fail at once (UsageError naming the file) when a dictionary folder is broken: commands call it before
    loading a model. A foreign folder is read and self-checked; saecli's own is checked without its weights."""
    from saecli.interop import detect_format, read_checked

    if detect_format(folder) is not None:
        read_checked(folder)
    else:
        _check_native(Path(folder))


def _check_native(folder: Path) -> tuple[dict[str, Any], DictionaryConfig, type[Dictionary]]:
    """(cfg.json, its parsed config, the kind's class) of a saecli dictionary folder, its weights' header
    checked without reading the weights."""
    from safetensors import safe_open

    from saecli.config.base import parse
    from saecli.config.dictionary import DictionaryConfig
    from saecli.errors import ConfigError

    folder = Path(folder)
    expected = f"saecli expects {CONFIG_NAME} (with `kind` and `cfg`) and {WEIGHTS_NAME}"
    if not (folder / CONFIG_NAME).exists() or not (folder / WEIGHTS_NAME).exists():
        raise UsageError(f"{folder} holds no saved dictionary: {_foreign(folder) or 'it lacks them'} ({expected})")
    meta = _read_json(folder / CONFIG_NAME)
    if not isinstance(meta, dict) or "cfg" not in meta or "kind" not in meta:
        raise UsageError(
            f"{folder / CONFIG_NAME} is not a saecli dictionary config: "
            f"{_foreign(folder) or 'it has no `kind` and `cfg` keys'} ({expected})"
        )
    from saecli.lm.hooks import check_saved_hook_names

    check_saved_hook_names(
        [*meta.get("in_hooks", []), *meta.get("out_hooks", [])], meta.get("hook_names"), str(folder / CONFIG_NAME)
    )
    try:
        # saved configs hold None for unset optional fields; leaving them out restores the same defaults
        cfg = parse(DictionaryConfig, {k: v for k, v in meta["cfg"].items() if v is not None}, key="sae")
        cls = dictionary_class(meta["kind"])
    except (ConfigError, UsageError, AttributeError) as exc:
        raise UsageError(f"{folder / CONFIG_NAME} describes no dictionary saecli can build: {exc}") from None
    weights = folder / WEIGHTS_NAME

    def header() -> None:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()

    _safetensors(weights, header)
    return meta, cfg, cls


def _build(folder: Path, cls: type[Dictionary], cfg: DictionaryConfig, meta: dict[str, Any]) -> Dictionary:
    try:
        return cls.from_saved(cfg, meta)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UsageError(
            f"{folder / CONFIG_NAME} lacks what a {meta['kind']} needs ({type(exc).__name__}: {exc}); "
            "was it edited by hand?"
        ) from None


def _safetensors(path: Path, read: Callable[[], T]) -> T:
    """`read()`, with a damaged safetensors file at `path` turned into a UsageError naming it."""
    from safetensors import SafetensorError

    try:
        return read()
    except (SafetensorError, OSError, ValueError) as exc:
        size = path.stat().st_size
        raise UsageError(
            f"{path} is damaged ({size:,} bytes; {exc}): it cannot be read as safetensors, "
            "e.g. a copy cut short. Train the dictionary again or copy the file again"
        ) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        size = path.stat().st_size
        what = "empty" if size == 0 else f"not valid JSON ({exc})"
        raise UsageError(f"{path} is {what}: the dictionary's config is damaged, e.g. a copy cut short") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


# files that tell another library's dictionary folder apart (the interop package may read some of them)
_FOREIGN = (
    ("sae.safetensors", "an EleutherAI sparsify folder"),
    ("ae.pt", "a dictionary_learning folder"),
)


def _foreign(folder: Path) -> str:
    """What the folder looks like when another library wrote it ('' when it looks like nothing known)."""
    if not folder.is_dir():
        return "it is not a folder" if folder.exists() else "the folder does not exist"
    for name, what in _FOREIGN:
        if (folder / name).exists():
            return f"it looks like {what} (it holds {name})"
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and {"d_in", "d_sae"} <= set(meta) and "cfg" not in meta:
        return f"it looks like a SAELens folder ({CONFIG_NAME} holds d_in/d_sae/hook_name, no `cfg`)"
    names = sorted(p.name for p in folder.iterdir())[:8]
    return f"it holds {', '.join(names) if names else 'no files'}"


def _mismatch(exc: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
    return ("(" + "; ".join(lines[:2]) + ")") if lines else ""
