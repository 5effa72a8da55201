"""`saecli runs`: browse the results store from the shell (SQLite file or MongoDB).

saecli runs                                  every run in ./saecli.db with its key metrics
saecli runs --kind transcoder --sort l0      filtered and sorted
saecli runs show tiny-topk                   one run: where it is, its settings and every metric
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from saecli.commands import SetOption

# the columns of the list, in order; --sort takes any of them
COLUMNS = ("name", "series", "kind", "model", "hook", "d_sae", "tokens", "l0", "ev", "dead", "loss_rec", "updated")

StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        help="a SQLite file, a mongodb:// URI, or an experiment file / run folder whose \\[store] table to read",
    ),
]


def describe(record: dict) -> dict[str, Any]:
    """One row of `saecli runs` from a store record (`Store.get_sae`): kind, model, hooks and key metrics.

    The record's cfg is the resolved experiment (what train, eval and analyze record); records written
    before that was so held the dictionary's own config ({kind, d_sae, in_hooks, out_hooks, cfg}) and
    are read too.
    """
    cfg: dict[str, Any] = record.get("cfg") or {}
    from saecli.config.load import dictionary_table

    sae: dict[str, Any] = dictionary_table(cfg) or cfg.get("cfg") or {}
    kind = sae.get("kind") or cfg.get("kind") or "sae"
    ins, outs = _hooks(cfg, sae)
    metrics = record.get("metrics") or {}
    ev: dict[str, Any] = metrics["eval"] if isinstance(metrics.get("eval"), dict) else {}
    hook = ins[0] if len(ins) == 1 else (f"{ins[0]} … ({len(ins)})" if ins else "")
    if outs and outs != ins:
        hook += f" → {outs[0] if len(outs) == 1 else f'{outs[0]} … ({len(outs)})'}"
    d_sae = cfg.get("d_sae") or sae.get("d_sae")
    if d_sae is None and sae.get("expansion_factor"):
        d_sae = f"{sae['expansion_factor']:g}×"
    updated = record.get("updated_at")
    return {
        "name": record.get("name"),
        "series": record.get("series"),
        "kind": kind,
        "model": _model_label(record.get("model_name")),
        "hook": hook,
        "hooks": ins + [h for h in outs if h not in ins],
        "d_sae": d_sae,
        "tokens": metrics.get("tokens"),
        "l0": metrics.get("l0"),
        "ev": ev.get("explained_variance", metrics.get("explained_variance")),
        "dead": metrics.get("dead"),
        "loss_rec": ev.get("loss_recovered"),
        "updated": datetime.datetime.fromtimestamp(updated).strftime("%Y-%m-%d %H:%M") if updated else "",
    }


def _model_label(name: str | None) -> str:
    """A hub name as it is; a local folder by its last part (the full path is in `runs show`)."""
    if not name:
        return ""
    return Path(name).name if Path(name).is_absolute() or name.startswith(".") else name


def _hooks(cfg: dict, sae: dict) -> tuple[list[str], list[str]]:
    """(hooks read, hooks written) of a recorded dictionary."""
    if "in_hooks" in cfg:
        return list(cfg["in_hooks"]), list(cfg.get("out_hooks") or cfg["in_hooks"])
    listed = list((cfg.get("activations") or {}).get("hook_points") or [])
    one = lambda key, i: [sae[key]] if sae.get(key) else listed[i : i + 1]  # noqa: E731
    if sae.get("hook_points_in") or sae.get("kind") == "clt":
        half = len(listed) // 2
        return list(sae.get("hook_points_in") or listed[:half]), list(sae.get("hook_points_out") or listed[half:])
    if sae.get("kind") == "crosscoder":
        heads = list(sae.get("hook_points") or listed)
        return heads, heads
    if sae.get("kind", "sae") == "sae":
        return one("hook_point", 0), one("hook_point", 0)
    return one("hook_point_in", 0), one("hook_point_out", 1)


def select(
    rows: list[dict],
    *,
    model: str | None = None,
    hook: str | None = None,
    kind: str | None = None,
    sort: str = "updated",
    reverse: bool = False,
) -> list[dict]:
    """Rows whose model / any hook contain the given text (case-insensitive) and whose kind is `kind`,
    sorted by `sort` (unknown values last)."""
    if sort not in COLUMNS:
        import difflib

        close = difflib.get_close_matches(sort, COLUMNS, n=1)
        from saecli.errors import UsageError

        raise UsageError(
            f"--sort {sort!r} is not a column"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (columns: {', '.join(COLUMNS)})"
        )
    has = lambda text, values: text.lower() in " ".join(map(str, values)).lower()  # noqa: E731
    picked = [
        r
        for r in rows
        if (model is None or has(model, [r["model"]]))
        and (hook is None or has(hook, r["hooks"]))
        and (kind is None or r["kind"] == kind)
    ]
    known = [r for r in picked if r[sort] is not None and r[sort] != ""]
    unknown = [r for r in picked if r not in known]
    try:
        known.sort(key=lambda r: r[sort], reverse=reverse)
    except TypeError:  # mixed types (d_sae given as a number or an expansion factor)
        known.sort(key=lambda r: str(r[sort]), reverse=reverse)
    return known + unknown


def open_source(source: str, overrides: list[str] | None = None):
    """The store `source` names: an experiment file or run folder (its [store]), a mongodb:// URI, or a
    SQLite file that must exist (a typo must not create an empty store)."""
    from saecli.config.run import StoreConfig
    from saecli.errors import UsageError
    from saecli.store import open_store

    path = Path(source)
    if source.startswith(("mongodb://", "mongodb+srv://")):
        return open_store(StoreConfig(backend="mongodb", uri=source))
    if path.suffix == ".toml" or path.is_dir():
        from saecli.config.load import load_experiment

        exp = load_experiment(path, overrides or [])
        if exp.store.backend == "none":
            raise UsageError(
                f'{source} records nothing (store.backend = "none"): give --store a SQLite file or a mongodb:// URI'
            )
        base = Path(exp.source_file).resolve().parent if exp.source_file else None
        return open_store(exp.store, base=base)
    if not path.exists():
        raise UsageError(
            f"no store at {source}: give --store a SQLite file (saecli.db where you trained), a "
            "mongodb:// URI, or an experiment file"
        )
    return open_store(StoreConfig(backend="sqlite", path=str(path)))


def list_runs(
    ctx: typer.Context,
    store: StoreOption = "saecli.db",
    model: Annotated[Optional[str], typer.Option("--model", help="only runs whose model name contains this")] = None,
    hook: Annotated[
        Optional[str], typer.Option("--hook", help="only runs reading or writing a hook containing this")
    ] = None,
    kind: Annotated[
        Optional[str], typer.Option("--kind", help="only dictionaries of this kind (sae, transcoder, ...)")
    ] = None,
    series: Annotated[Optional[str], typer.Option("--series", help="only this series")] = None,
    sort: Annotated[str, typer.Option("--sort", help=f"column to sort by: {', '.join(COLUMNS)}")] = "updated",
    reverse: Annotated[bool, typer.Option("--reverse", "-r", help="largest first")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON (for scripts)")] = False,
    overrides: SetOption = None,
) -> None:
    """List the runs in the results store with their key metrics: kind, model, hook, d_sae, tokens
    trained, L0, explained variance (eval's when evaluated), dead latents, CE loss recovered.

    Examples:

        saecli runs

        saecli runs --store experiments/smollm2/topk.toml --kind sae --sort l0

        saecli runs --store mongodb://localhost:27017 --hook mlp_out --sort ev --reverse

        saecli runs show tiny-topk
    """
    import json

    from saecli import ui

    if ctx.invoked_subcommand is not None:  # `saecli runs show NAME`
        return
    with open_source(store, overrides) as db:
        rows = [describe(r) for r in db.list_saes(series)]
    rows = select(rows, model=model, hook=hook, kind=kind, sort=sort, reverse=reverse)
    if as_json:
        ui.plain_lines([json.dumps([{k: r[k] for k in (*COLUMNS, "hooks")} for r in rows], indent=2)])
        return
    if not rows:
        ui.result("no runs match" if (model or hook or kind or series) else f"no runs recorded in {store}")
        return
    shown = [c for c in COLUMNS if c != "series" or len({r["series"] for r in rows}) > 1]
    ui.table(f"{len(rows)} run(s) in {store}", [{c: "" if r[c] is None else r[c] for c in shown} for r in rows], shown)


def show(
    name: Annotated[str, typer.Argument(help="the run's name (run.name)", show_default=False)],
    store: StoreOption = "saecli.db",
    series: Annotated[str, typer.Option("--series", help="the run's series")] = "default",
    overrides: SetOption = None,
) -> None:
    """Show one run of the store: where its folder is, its model, hooks and dictionary settings, and
    every metric recorded (training, and eval's when evaluated).

    Examples:

        saecli runs show tiny-topk

        saecli runs show tiny-topk --store runs.db
    """
    import difflib

    from saecli import ui
    from saecli.errors import UsageError

    with open_source(store, overrides) as db:
        record = db.get_sae(name, series)
        names = [r["name"] for r in db.list_saes(series)] if record is None else []
    if record is None:
        close = difflib.get_close_matches(name, names, n=3)
        raise UsageError(
            f"no run {name!r} (series {series!r}) in {store}"
            + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "")
        )
    row = describe(record)
    head = {
        "name": row["name"],
        "series": row["series"],
        "folder": record.get("path"),
        "kind": row["kind"],
        "model": row["model"],
        "dataset": record.get("dataset_name"),
        "hooks": ", ".join(row["hooks"]),
        "d_sae": row["d_sae"],
        "updated": row["updated"],
    }
    ui.table(f"run {name}", {k: v for k, v in head.items() if v not in (None, "")})
    cfg = record.get("cfg") or {}
    from saecli.config.load import dictionary_table

    sae = dictionary_table(cfg) or cfg.get("cfg") or {}
    if sae:
        ui.table("dictionary", {k: _short(v) for k, v in sae.items()})
    metrics = _flat(record.get("metrics") or {})
    if metrics:
        ui.table("metrics", metrics)


def _short(value: Any) -> Any:
    text = value if isinstance(value, (int, float, str)) else str(value)
    return text if not isinstance(text, str) or len(text) <= 80 else text[:77] + "..."


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def register(app: typer.Typer) -> None:
    group = typer.Typer(context_settings={"help_option_names": ["-h", "--help"]})
    group.callback(invoke_without_command=True)(list_runs)
    group.command("show")(show)
    app.add_typer(group, name="runs")
