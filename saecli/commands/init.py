"""`saecli init KIND`: write a commented starter experiment that runs as written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from saecli.config.starter import DEFAULT_MODEL, KINDS, ModelShape


def model_shape(name: str) -> ModelShape:
    """Depth, width and heads of `name` from its config.json (a local folder, or the hub cache; no download)."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # not on this machine yet: the starter guesses a layer and says so
        return ModelShape(name)
    pick = lambda *names: next((int(getattr(cfg, n)) for n in names if getattr(cfg, n, None)), None)  # noqa: E731
    return ModelShape(
        name,
        pick("num_hidden_layers", "n_layer"),
        pick("hidden_size", "n_embd", "d_model"),
        pick("num_attention_heads", "n_head"),
    )


def init(
    kind: Annotated[str, typer.Argument(help=f"dictionary kind: {', '.join(KINDS)}", show_default=False)],
    model: Annotated[
        str, typer.Option("--model", "-m", help="hub name or local folder of the language model")
    ] = DEFAULT_MODEL,
    hook: Annotated[
        Optional[str],
        typer.Option(
            "--hook", help="hook point the dictionary reads (default: a middle layer's usual one for the kind)"
        ),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="training tokens")] = 10_000_000,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="file to write (default: KIND.toml)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing file")] = False,
) -> None:
    """Write a commented starter experiment for KIND; it trains as written (`saecli train KIND.toml`).

    Each key carries its help text. The default hook follows the kind: sae reads a middle layer's
    hook_resid_post; transcoder and molt read ln2.hook_normalized and write hook_mlp_out (as SAELens
    transcoders do); lorsa reads ln1.hook_normalized and writes hook_attn_out; crosscoder reads a layer
    and its neighbours; clt every layer.

    Examples:

        saecli init sae --model HuggingFaceTB/SmolLM2-135M --hook blocks.12.hook_resid_post

        saecli init transcoder --model experiments/tiny/model --tokens 200000 -o tc.toml
    """
    from saecli import ui
    from saecli.config.starter import starter_toml
    from saecli.errors import UsageError
    from saecli.fsio import write_text

    path = output or Path(f"{kind}.toml")
    if path.exists() and not force:
        raise UsageError(f"{path} exists: give another --output, or --force to replace it")
    shape = model_shape(model)
    write_text(path, starter_toml(kind, shape, hook, tokens))
    ui.result(f"wrote {path}: train it with `saecli train {path}`")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
