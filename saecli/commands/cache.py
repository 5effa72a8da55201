"""`saecli cache import SOURCE CACHE_DIR --hook H`: activations computed elsewhere → a saecli cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

cache_app = typer.Typer(
    help="Activation caches: bring in activations computed elsewhere (`generate` writes caches from a model).\n\n"
    "Example:\n\n    saecli cache import acts.npy caches/mine --hook blocks.6.hook_resid_post",
    no_args_is_help=True,
)


@cache_app.command("import")
def import_(
    source: Annotated[
        Path,
        typer.Argument(
            help=".npy / .safetensors / .parquet file, a folder of them, or a saved `datasets` folder",
            show_default=False,
        ),
    ],
    cache_dir: Annotated[
        Path, typer.Argument(help="cache folder to write (activations.cache_dir)", show_default=False)
    ],
    hook: Annotated[List[str], typer.Option("--hook", help="hook point the activations were taken at (repeatable)")],
    key: Annotated[
        Optional[List[str]],
        typer.Option(
            "--key", help="HOOK=NAME: the tensor or column holding HOOK's activations (default: the hook name)"
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="dtype stored: float32, float16 or bfloat16")] = "float32",
    chunk_tokens: Annotated[int, typer.Option(help="tokens per cache chunk file")] = 65536,
    model: Annotated[
        Optional[str], typer.Option(help="the model the activations came from (recorded in the manifest)")
    ] = None,
) -> None:
    """Write activations you already have as a saecli cache that train, eval and analyze read.

    Arrays have shape (tokens, d) or (sequences, seq_len, d); several hook points need a .safetensors file (one
    tensor per hook) or a `datasets` folder (one column per hook). A run trained on the cache records
    `dataset.path = "imported:<SOURCE>"` in its config.toml. Python: saecli.interop.activations.import_activations.

    Examples:

        saecli cache import acts.npy caches/mine --hook blocks.6.hook_resid_post

        saecli cache import acts.safetensors caches/mine --hook blocks.6.ln2.hook_normalized --hook blocks.6.hook_mlp_out

        saecli train exp.toml --set activations.cache_dir=caches/mine
    """
    from saecli import ui
    from saecli.errors import UsageError
    from saecli.interop.activations import import_activations

    if dtype not in ("float32", "float16", "bfloat16"):
        raise UsageError(f"--dtype must be float32, float16 or bfloat16, found {dtype!r}")
    keys = {}
    for item in key or []:
        h, sep, name = item.partition("=")
        if not sep or not h or not name:
            raise UsageError(f"--key expects HOOK=NAME, found {item!r}")
        if h not in hook:
            raise UsageError(f"--key names hook {h!r}, which no --hook gives ({', '.join(hook)})")
        keys[h] = name
    manifest = import_activations(
        source, cache_dir, hook_points=list(hook), keys=keys, dtype=dtype, chunk_tokens=chunk_tokens, model=model
    )
    ui.table(
        f"cache {cache_dir}",
        {
            "tokens": manifest["total_tokens"],
            "chunks": len(manifest["chunks"]),
            **{f"d_model {h}": d for h, d in manifest["d_model"].items()},
            **{f"mean norm {h}": n for h, n in manifest["mean_norms"].items()},
        },
    )
    ui.result(f'{manifest["total_tokens"]:,} tokens in {cache_dir}: set activations.cache_dir = "{cache_dir}"')


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
