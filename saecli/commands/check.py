"""`saecli check`: verify an activation cache; exit 0 only when it is sound."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from saecli.commands import SetOption

CacheArg = Annotated[
    Path,
    typer.Argument(help="cache folder, or an experiment TOML whose activations.cache_dir to check", show_default=False),
]
AgainstOption = Annotated[
    Optional[Path],
    typer.Option(
        "--against", help="another cache of the same text: its token ids must match this one's", show_default=False
    ),
]


def _cache_dir(target: Path, overrides: list[str] | None) -> Path:
    from saecli.commands import load
    from saecli.data.manifest import SHARD_GLOB
    from saecli.errors import ConfigError, UsageError

    if target.is_dir() and any(target.glob(SHARD_GLOB)):
        return target
    if not target.exists():
        raise UsageError(f"no such cache folder or experiment file: {target}")
    exp = load(target, overrides)
    if exp.activations is None or not exp.activations.cache_dir:
        raise ConfigError("check needs activations.cache_dir", file=exp.source_file, key="activations.cache_dir")
    return Path(exp.activations.cache_dir)


def check(cache: CacheArg, against: AgainstOption = None, overrides: SetOption = None) -> None:
    """Check an activation cache: manifest vs files, SHA-256, shapes/dtypes per hook point, NaN/inf,
    token ids (and, with --against, the same token ids as another cache of the same text), norm stats.

    Prints a table of the problems, each with its file; exits 0 when the cache is sound, 1 when a
    problem is found, 2 on a usage error.

    Examples:

        saecli check runs/tiny/cache

        saecli check experiments/tiny/generate.toml

        saecli check runs/l6-cache --against runs/l6-mlp-cache
    """
    from saecli import ui
    from saecli.errors import RunError, UsageError

    root = _cache_dir(cache, overrides)
    if not root.is_dir():
        raise UsageError(f"activation cache not found: {root}")
    if against is not None and not against.is_dir():
        raise UsageError(f"--against: no such cache folder: {against}")
    from saecli.data.verify import check_against, check_cache, count_chunks  # torch: after the cheap checks

    with ui.progress("check", total=count_chunks(root), unit="chunks") as handle:
        problems = check_cache(root, on_chunk=lambda: handle.advance(1))
    if against is not None:
        problems += check_against(root, against)
    if problems:
        ui.table(f"problems in {root}", [p.row() for p in problems], columns=["file", "check", "problem"])
        raise RunError(f"{len(problems)} problem(s) found in the activation cache {root}")
    from saecli.data.manifest import open_cache

    index = open_cache(root)
    norms = ", ".join(f"{h} {v:.4g}" for h, v in index.mean_norms.items())
    extra = f"; token ids match {against}" if against is not None else ""
    ui.result(
        f"{root}: sound — {index.total_tokens:,} tokens in {len(index.chunks)} chunks over "
        f"{len(index.manifests)} shard(s) (mean ‖x‖: {norms}){extra}"
    )


def register(app: typer.Typer) -> None:
    app.command("check")(check)
