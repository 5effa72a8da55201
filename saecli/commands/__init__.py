"""One module per command; each defines `register(app)`. Shared argument types live here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

ExperimentArg = Annotated[
    Path,
    typer.Argument(
        help="experiment TOML file (or a run folder holding config.toml: the command then reads "
        "and writes that folder only). Relative paths inside are taken from the current "
        "directory; a run's config.toml holds them absolute",
        show_default=False,
    ),
]


def complete_set(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion of `--set`: key paths (`trainer.l` → trainer.lr, ...), then a key's choices after `=`."""
    from saecli.config.load import as_spelled
    from saecli.config.schema import keys, toml_value

    head, dot, rest = incomplete.partition(".")
    section = as_spelled({}, [head])[0] if dot else head
    if section != head:  # `sae.` (the older name of `dictionary.`): completed under the name typed
        return [(head + path[len(section) :], text) for path, text in complete_set(section + dot + rest)]
    if "=" in incomplete:
        path, _ = incomplete.split("=", 1)
        for key in keys():
            if key.path == path and key.choices:
                values = [f"{path}={c if isinstance(c, str) else toml_value(c)}" for c in key.choices]
                return [(v, key.help) for v in values if v.startswith(incomplete)]
        return []
    return [(key.path, key.help) for key in keys() if key.path.startswith(incomplete)]


SetOption = Annotated[
    Optional[List[str]],
    typer.Option(
        "--set",
        "-s",
        help="override a key, typed as in TOML: --set trainer.lr=1e-3 (repeatable)",
        autocompletion=complete_set,
    ),
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


SHELLS = ("bash", "zsh", "fish")


def completion_scripts() -> dict[str, str]:
    """{completions/saecli.<shell>: script}: the scripts call back into `saecli`, which completes commands,
    options and `--set` key paths (see `complete_set`). scripts/make_completions.sh writes them."""
    from typer._completion_shared import get_completion_script

    return {
        f"completions/saecli.{shell}": get_completion_script(
            prog_name="saecli", complete_var="_SAECLI_COMPLETE", shell=shell
        )
        for shell in SHELLS
    }
