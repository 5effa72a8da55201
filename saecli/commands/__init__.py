"""One module per command; each defines `register(app)`. Shared argument types live here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

ExperimentArg = Annotated[
    Path, typer.Argument(help="experiment TOML file (or a run folder holding config.toml: the command then reads "
                              "and writes that folder only). Relative paths inside are taken from the current "
                              "directory; a run's config.toml holds them absolute", show_default=False)
]
SetOption = Annotated[
    Optional[List[str]],
    typer.Option("--set", "-s", help="override a key, typed as in TOML: --set trainer.lr=1e-3 (repeatable)"),
]


def probe_store(exp, folder) -> bool:
    """At the start of a command: is the results store reachable? When not, say so at once and go on with files."""
    from saecli import ui
    from saecli.store.record import probe, unreachable_message

    reason = probe(exp.store)
    if reason is not None:
        ui.warn(unreachable_message(exp.store, reason, folder))
    return reason is None


def load(path: Path, overrides: list[str] | None):
    from saecli.config.load import load_experiment

    return load_experiment(path, overrides or [])
