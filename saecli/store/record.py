"""The store never costs a run: probe it at start, work on files when it is down, record a run later.

    reason = probe(exp.store)              # None when reachable; else why not (said at once)
    done = record_run(store, exp, folder)  # a finished run folder's results → the store (`saecli record`)

A store found unreachable by `probe` is remembered for the process, so later `open_store` calls fail at
once instead of waiting for the server's timeout again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saecli.config.run import StoreConfig
from saecli.errors import SaecliError

if TYPE_CHECKING:
    from saecli.config.experiment import Experiment
    from saecli.store.base import Store


_UNREACHABLE: dict[tuple, str] = {}


def store_key(cfg: StoreConfig) -> tuple:
    return (
        cfg.backend,
        str(Path(cfg.path).expanduser().absolute()) if cfg.backend == "sqlite" else cfg.uri,
        cfg.database,
    )


def describe(cfg: StoreConfig) -> str:
    """Where the results go, for messages: the SQLite file's absolute path or the MongoDB server (no password)."""
    if cfg.backend == "sqlite":
        return f"the SQLite store {Path(cfg.path).expanduser().absolute()}"
    if cfg.backend == "mongodb":
        from saecli.store.mongo import redact

        return f"the MongoDB store {redact(cfg.uri or '')} (database {cfg.database})"
    return "no store"


def write_or_warn(
    exp: Experiment,
    write: Callable[[Store], None],
    *,
    what: str,
    results: Path,
    folder: Path,
    info: Callable[[str], object],
    warn: Callable[[str], object],
) -> None:
    """Open the experiment's results store, `write` to it and close it, then say `recorded <what> in <store>`.
    The store is a convenience: any failure only warns, pointing to the `results` on disk and to
    `saecli record <folder>`; no store configured (or the store package not importable) does nothing."""
    if exp.store.backend == "none":
        return
    try:
        from saecli.store import open_store
    except ImportError:
        return
    try:
        store = open_store(exp.store)
        try:
            write(store)
        finally:
            store.close()
        info(f"recorded {what} in {describe(exp.store)}")
    except Exception as exc:  # never lose finished results over the store
        warn(
            f"could not record {what} in the {exp.store.backend} store ({exc}); "
            f"the results are in {results} (record them later with `saecli record {folder}`)"
        )


def known_unreachable(cfg: StoreConfig) -> str | None:
    return _UNREACHABLE.get(store_key(cfg))


def probe(cfg: StoreConfig) -> str | None:
    """Open and close the store once: None when it works, else the reason (remembered for this process)."""
    if cfg.backend == "none":
        return None
    from saecli.store import open_store

    try:
        open_store(cfg).close()
    except SaecliError as exc:
        _UNREACHABLE[store_key(cfg)] = str(exc)
        return str(exc)
    return None


def unreachable_message(cfg: StoreConfig, reason: str, folder: Path | str) -> str:
    return (
        f"{describe(cfg)} is unreachable ({reason}). Working on files only: the results go to {folder}; "
        f"record them later with `saecli record {folder}`"
    )


def record_run(store: Store, exp: Experiment, folder: Path) -> dict[str, Any]:
    """Record what a run folder holds: the dictionary with its training summary and eval metrics, every
    analysis and the DLA. Returns what was recorded ({"dictionary": name, "analyses": [...], "dla": bool})."""
    from saecli.analysis.dla import DLAResult
    from saecli.analysis.records import AnalysisResult
    from saecli.config.base import to_dict
    from saecli.dictionaries.registry import load_dictionary

    name, series = exp.run.name, exp.analyze.series
    metrics: dict[str, Any] = {}
    summary, evaluation = folder / "summary.json", folder / "eval.json"
    if summary.exists():
        metrics.update(json.loads(summary.read_text()))
    if evaluation.exists():
        metrics["eval"] = json.loads(evaluation.read_text()).get("metrics", {})
    dictionary = load_dictionary(folder)
    model_name = exp.model.name if exp.model is not None else None
    if exp.model is not None:
        store.put_model(exp.model.name, to_dict(exp.model))
    store.put_dataset(exp.dataset.path, to_dict(exp.dataset))
    cfg = to_dict(exp)
    cfg.pop("source_file", None)
    store.put_sae(
        name,
        series,
        path=str(folder.resolve()),
        cfg=cfg,
        model_name=model_name,
        dataset_name=exp.dataset.path,
        metrics=metrics,
    )
    done: dict[str, Any] = {"dictionary": f"{name} ({series})", "d_sae": dictionary.d_sae, "analyses": []}
    for sub in sorted((folder / "analysis").glob("*/features.safetensors")):
        result = AnalysisResult.load(sub.parent)
        n = store.replace_analysis(name, series, result.name, result.records(), result.store_meta())
        done["analyses"].append(f"{result.name} ({n:,} features)")
    dla = DLAResult.load(folder)
    if dla is not None:
        store.put_logits(name, series, dla.items())
    done["dla"] = dla is not None
    return done
