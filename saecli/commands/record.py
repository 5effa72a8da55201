"""`saecli record`: put a finished run folder's results into the results store (e.g. after it was down)."""

from __future__ import annotations

from pathlib import Path

import typer

from saecli.commands import ExperimentArg, SetOption, load


def record(experiment: ExperimentArg, overrides: SetOption = None) -> None:
    """Record a finished run in the results store: the dictionary with its training summary and eval
    metrics (summary.json, eval.json), every analysis under analysis/ and the DLA (dla.json).

    Every command works on files when the store is unreachable and says so at its start; this records
    the run once the store is back. The store is the one the run's config.toml names (or --set store.*).
    Recording again replaces what the store holds for this run.

    Examples:

        saecli record runs/tiny/topk

        saecli record runs/tiny/topk --set store.backend=sqlite --set store.path=results.db
    """
    from saecli import ui
    from saecli.dictionaries.base import CONFIG_NAME
    from saecli.errors import UsageError
    from saecli.store import open_store
    from saecli.store.record import describe, record_run

    folder = Path(experiment)
    exp = load(folder, overrides)
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file: give a run folder (the one holding config.toml and {CONFIG_NAME})")
    if exp.store.backend == "none":
        raise UsageError(
            f'store.backend is "none" in {folder / "config.toml"}: name a store with --set '
            "store.backend=sqlite (and store.path) or store.backend=mongodb (and store.uri)"
        )
    if not (folder / "summary.json").exists() and not (folder / "eval.json").exists():
        raise UsageError(
            f"{folder} holds no finished run (no summary.json or eval.json): finish it first "
            f"(`saecli train {folder} --resume`)"
        )
    with open_store(exp.store) as store:
        done = record_run(store, exp, folder)
    ui.table(
        f"recorded in {describe(exp.store)}",
        {
            "dictionary": done["dictionary"],
            "latents": done["d_sae"],
            "analyses": ", ".join(done["analyses"]) or "–",
            "dla": "yes" if done["dla"] else "–",
        },
    )
    ui.result(f"{folder} recorded in {describe(exp.store)}")


def register(app: typer.Typer) -> None:
    app.command("record")(record)
