"""`saecli export RUN --format saelens|sparsify|dictionary_learning OUT`: hand a dictionary to another library."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Format(str, Enum):
    saelens = "saelens"
    sparsify = "sparsify"
    dictionary_learning = "dictionary_learning"


def export(
    run: Annotated[Path, typer.Argument(help="run folder (or any dictionary folder saecli loads)", show_default=False)],
    out: Annotated[Path, typer.Argument(help="folder to write (must be new or empty)", show_default=False)],
    format: Annotated[Format, typer.Option("--format", "-f", help="layout to write")] = Format.saelens,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace OUT if it holds files")] = False,
) -> None:
    """Write the dictionary in RUN in another library's layout, checked before OUT appears.

    The files map raw activations to raw reconstructions exactly as saecli does (a dataset-wise input scale
    is folded into the weights). A small reference batch (reference.safetensors) goes with them: saecli
    reads the written files back and compares the latents and reconstructions with what it recorded, and
    does so again whenever the folder is loaded (`--sae OUT`, or `pretrained = "OUT"` in an
    experiment's sae table).

    saelens: SAEs (relu→standard, topk, jumprelu, batchtopk→jumprelu), transcoders (relu, jumprelu),
    skip transcoders (relu). sparsify: TopK SAEs and transcoders, skip included. dictionary_learning:
    SAEs (AutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder).

    Examples:

        saecli export runs/tiny-sae exports/tiny-saelens

        saecli export runs/tc --format sparsify exports/tc-sparsify
    """
    from saecli import ui
    from saecli.interop import export_dictionary

    result = export_dictionary(run, format.value, out, overwrite=overwrite)
    ui.table(
        f"exported {run} as {result['format']}",
        {
            "folder": result["folder"],
            "kind": result["kind"],
            "activation": result["activation"],
            "d_in": result["d_in"],
            "d_sae": result["d_sae"],
            **{f"reference {k}": v for k, v in result["metrics"].items()},
        },
    )
    ui.result(f"{result['folder']}: self-check passed (load it with --sae {out})")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
