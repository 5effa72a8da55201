"""Export to and import from the other libraries' folders, with the numeric self-check on both ways.

    from saecli.interop import export_dictionary, load_any
    export_dictionary("runs/tiny-sae", "saelens", "exports/tiny-saelens")   # checked before it is kept
    sae = load_any("exports/tiny-saelens")                                  # a saecli Dictionary, checked

Formats: `saelens`, `sparsify`, `dictionary_learning` (see their modules for the layouts). The format of a
folder is detected from its files; saecli's own run folders (cfg.json with a nested "cfg") are not
foreign and load through `saecli.dictionaries.registry.load_dictionary` as before.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from saecli.dtypes import DTYPES
from saecli.errors import SaecliError, UsageError
from saecli.interop import dictionary_learning, saelens, sparsify
from saecli.interop.canonical import Canonical, from_dictionary, to_dictionary
from saecli.interop.selfcheck import (
    Reference,
    SelfCheckError,
    compare,
    load_reference,
    metrics,
    reference_inputs,
    save_reference,
    tolerance,
)

if TYPE_CHECKING:
    from saecli.dictionaries.sae import SparseAutoEncoder


FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (saelens, sparsify, dictionary_learning)}


def detect_format(folder: str | Path) -> tuple[str, Path] | None:
    """(format name, folder holding its weights) for a foreign folder; None for saecli's own or unknown."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    cfg = folder / "cfg.json"
    if cfg.is_file():
        try:
            if "cfg" in json.loads(cfg.read_text()):
                return None  # saecli's own layout
        except (OSError, ValueError):
            return None  # a damaged cfg.json: the native loader names the problem
    for name in ("saelens", "dictionary_learning", "sparsify"):
        found = FORMATS[name].detect(folder)
        if found is not None:
            return name, found
    return None


def read_checked(folder: str | Path) -> tuple[Canonical, str, Path, Reference | None]:
    """Read a foreign folder and replay its reference batch (when it has one) through the weights read.
    Returns (canonical form, format name, folder holding the weights, reference batch or None)."""
    found = detect_format(folder)
    if found is None:
        raise UsageError(
            f"{folder} holds no dictionary saecli can read: expected saecli's run folder, a SAELens "
            "folder (cfg.json + sae_weights.safetensors), a sparsify hookpoint folder "
            "(cfg.json + sae.safetensors) or a dictionary_learning folder (ae.pt + config.json)"
        )
    name, where = found
    try:
        c = FORMATS[name].read(where)
    except SaecliError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file: one paragraph naming it, exit 2
        raise UsageError(
            f"{where} looks like a {name} folder but cannot be read ({type(exc).__name__}: {exc}); "
            "is a file truncated or from another version?"
        ) from None
    ref = load_reference(where)
    if ref is not None:
        compare(
            ref,
            *_run(c, ref.inputs),
            where=f"{where} ({name})",
            tol=tolerance(DTYPES.get(c.info.get("dtype"), torch.float32)),
            autoencoder=c.kind == "sae",
        )
    return c, name, where, ref


def load_any(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoEncoder:
    """A foreign folder as a saecli Dictionary (folded, raw units); checked against its reference batch, and
    the conversion itself checked against the format's own maths on that batch (or on probe inputs)."""
    c, name, where, ref = read_checked(folder)
    d = to_dictionary(c).eval()
    x = (
        ref.inputs
        if ref is not None
        else reference_inputs(c.W_enc, c.b_dec if c.kind == "sae" else None, float(c.d_in) ** 0.5)
    )
    f_c, y_c = _run(c, x)
    with torch.no_grad():
        f_d = d.encode(d.normalize({c.hook_in: x.to(d.W_enc.dtype)}))
        y_d = d.reconstruct({c.hook_in: x.to(d.W_enc.dtype)})[c.hook_out]
    expected = Reference(x, f_c, y_c, metrics(x, f_c, y_c, c.kind == "sae"))
    compare(
        expected,
        f_d,
        y_d,
        where=f"{where} ({name}) converted to saecli",
        tol=tolerance(d.W_enc.dtype),
        autoencoder=c.kind == "sae",
    )
    return d.to(device)


@torch.no_grad()
def _run(c: Canonical, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return c(x.float())


def export_dictionary(source: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the dictionary at `source` (a run folder, or any folder `load_dictionary` reads) to `out` in
    `fmt`, with its reference batch; the written files are read back and checked before `out` appears.
    Returns {"format", "folder" (where the weights are), "kind", "activation", "d_in", "d_sae", "metrics"}."""
    from saecli.dictionaries.registry import load_dictionary
    from saecli.dictionaries.sae import SparseAutoEncoder

    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file: give a folder to write the export into")
    if out.resolve() == Path(source).resolve() or out.resolve() in Path(source).resolve().parents:
        raise UsageError(f"{out} holds the dictionary being exported: write the export to another folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already exists and is not empty: choose a new folder or add --overwrite")
    d = load_dictionary(source).eval()
    c = from_dictionary(d)
    assert isinstance(d, SparseAutoEncoder)  # from_dictionary refused the other kinds
    info = run_info(Path(source), c)
    fmt_mod = FORMATS[fmt]
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        where = fmt_mod.write(c, tmp, info)
        # the reference: saecli's own reconstruction; the features as the written file defines them
        written = fmt_mod.read(where)
        scale = float(d.d_model) ** 0.5
        if d.cfg.norm_activation == "dataset-wise":
            scale = scale / float(d.scale(c.hook_in))
        x = reference_inputs(c.W_enc, c.b_dec if c.kind == "sae" else None, scale)
        with torch.no_grad():
            y = d.reconstruct({c.hook_in: x.to(d.W_enc.dtype)})[c.hook_out].float()
        f_w, _ = _run(written, x)
        ref = Reference(x, f_w, y, metrics(x, f_w, y, c.kind == "sae"))
        save_reference(where, ref)
        back = load_reference(where)
        assert back is not None, f"{where}: the reference just written is missing"
        got = compare(
            back,
            *_run(fmt_mod.read(where), x),
            where=f"{out} ({fmt})",
            tol=tolerance(DTYPES.get(str(info.get("dtype")), torch.float32)),
            autoencoder=c.kind == "sae",
        )
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "format": fmt,
        "folder": str(out / where.relative_to(tmp)),
        "kind": c.kind,
        "activation": "batchtopk" if c.batchtopk else c.activation,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "metrics": got,
    }


def run_info(source: Path, c: Canonical) -> dict[str, Any]:
    """Model, dataset and dtype for the exported metadata, from the run's config.toml when there is one."""
    from saecli import __version__

    info: dict[str, Any] = {
        "dtype": c.info.get("dtype", "float32"),
        "saecli_version": __version__,
        "model": c.info.get("model"),
        "dataset": c.info.get("dataset"),
    }
    toml = source / "config.toml"
    if toml.is_file():
        from saecli.config.load import read_toml

        try:
            cfg = read_toml(toml)
        except Exception:  # noqa: BLE001 - metadata only: a damaged config.toml leaves it empty
            cfg = {}
        info["model"] = (cfg.get("model") or {}).get("name") or info["model"]
        info["dataset"] = (cfg.get("dataset") or {}).get("path") or info["dataset"]
        acts = cfg.get("activations") or {}
        info["context_size"] = acts.get("context_size")
        info["prepend_bos"] = acts.get("prepend_bos")
    return info


__all__ = ["FORMATS", "SelfCheckError", "detect_format", "export_dictionary", "load_any", "read_checked"]
