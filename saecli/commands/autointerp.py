"""`saecli autointerp`: explain features with an LLM and score the explanations (detection, fuzzing)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from saecli.commands import ExperimentArg, SetOption, load
from saecli.commands.analyze import SaeOption, sae_folder

if TYPE_CHECKING:
    from saecli.config.experiment import Experiment
    from saecli.store.base import Store


FeaturesOption = Annotated[
    Optional[str],
    typer.Option(
        "--features",
        help="features to explain: '3,17,42' or a range '100:200' (default: autointerp.features / feature_range / all)",
    ),
]


def parse_features(text: str) -> dict[str, Any]:
    """`--features` → autointerp keys: a comma list or a `start:stop` range."""
    from saecli.errors import UsageError

    text = text.strip()
    if re.fullmatch(r"\d+:\d+", text):
        start, stop = (int(x) for x in text.split(":"))
        return {"feature_range": [start, stop]}
    if re.fullmatch(r"\d+(,\d+)*", text.replace(" ", "")):
        return {"features": [int(x) for x in text.replace(" ", "").split(",")]}
    raise UsageError(f"--features expects a list '3,17,42' or a range '100:200', found {text!r}")


def autointerp(
    experiment: ExperimentArg,
    sae: SaeOption = None,
    features: FeaturesOption = None,
    force: Annotated[bool, typer.Option("--force", help="redo features finished by an earlier run")] = False,
    overrides: SetOption = None,
) -> None:
    """Ask an LLM to explain each feature from its analysed contexts (marked activating tokens, tiers, DLA
    tokens), then score each explanation as delphi does: detection (does the LLM tell activating contexts
    from others?) and fuzzing (does it tell truly marked tokens from randomly marked ones?).

    Needs `saecli analyze` first. The LLM is any OpenAI-compatible endpoint (autointerp.explainer.backend
    = "openai", the API key in the environment variable that autointerp.explainer.api_key_env names) or a
    transformers chat model in this process (backend = "local"). Each finished feature is written at once
    to <dictionary>/analysis/<analysis>/autointerp/<name>/features/<index>.json and to the store, so an
    interrupted run resumes where it stopped; --force redoes finished features.

    Examples:

        saecli autointerp experiments/tiny/autointerp.toml

        OPENAI_API_KEY=... saecli autointerp experiments/smollm2/autointerp.toml --features 0:100

        saecli autointerp runs/tiny/topk --set autointerp.explainer.model=my-model --set autointerp.max_workers=16
    """
    from saecli import ui
    from saecli.analysis.dla import DLAResult
    from saecli.analysis.records import AnalysisResult, analysis_dir
    from saecli.autointerp.backends import Usage, open_backend
    from saecli.autointerp.results import Results, interpretation, results_dir, summarize
    from saecli.autointerp.runner import Interpreter, run_features, select_features
    from saecli.commands.analyze import open_results_store
    from saecli.config.load import write_resolved
    from saecli.errors import ConfigError

    exp = load(experiment, overrides)
    cfg = exp.autointerp
    if features:  # replaces both selection keys of the file
        chosen_keys = parse_features(features)
        cfg.features = chosen_keys.get("features")
        cfg.feature_range = tuple(chosen_keys["feature_range"]) if "feature_range" in chosen_keys else None
        cfg.validate()
    for key, llm in (("explainer", cfg.explainer), ("scorer", cfg.scorer)):
        if llm is not None and not llm.model:
            raise ConfigError(
                "must name the chat model (the endpoint's model name, or a local model folder)",
                file=exp.source_file,
                key=f"autointerp.{key}.model",
            )
    folder = sae_folder(exp, sae)
    where = analysis_dir(folder, exp.analyze.name)
    result = AnalysisResult.load(where)
    dla = DLAResult.load(folder) if cfg.dla_tokens else None
    chosen = select_features(result, cfg)
    results = Results(results_dir(where, cfg.name))
    finished_before = results.done()
    todo = chosen if force else [i for i in chosen if i not in finished_before]
    ui.info(
        f"autointerp {cfg.name}: {len(chosen):,} features selected of {result.d_sae:,}, "
        f"{len(chosen) - len(todo):,} already finished, {len(todo):,} to do "
        f"(explainer {cfg.explainer.model} via {cfg.explainer.backend})"
    )
    store = open_results_store(exp, folder)
    usage = Usage()
    explainer = scorer = None
    try:
        name, series = _registered(store, exp, folder)
        write_resolved(exp, results.folder)
        explainer = open_backend(cfg.explainer, usage)
        scorer = open_backend(cfg.scorer, usage) if cfg.scorer is not None else explainer
        run = f"{exp.analyze.name}/{cfg.name}"
        interpreter = Interpreter(result, cfg, explainer, scorer, dla, run)
        started = time.time()
        with ui.progress("autointerp", total=len(todo), unit="features") as bar:

            def done(record: dict) -> None:
                if store is not None:
                    store.put_interpretation(name, series, int(record["index"]), interpretation(record))
                u = usage.snapshot()
                bar.advance(
                    1,
                    tokens=u["prompt_tokens"] + u["completion_tokens"],
                    cost=f"${u['cost']:.4f}",
                    retries=u["retries"],
                )

            run_features(interpreter, todo, results, max_workers=cfg.max_workers, on_done=done)
        elapsed = time.time() - started
    finally:
        for backend in {id(b): b for b in (explainer, scorer) if b is not None}.values():
            backend.close()
        if store is not None:
            store.close()
    summary = summarize({i: r for i, r in results.load().items() if i in set(chosen)}, cfg.scorers)
    summary.update(
        run=run,
        analysis=exp.analyze.name,
        this_run={**usage.snapshot(), "features": len(todo), "seconds": round(elapsed, 2)},
    )
    path = results.write_summary(summary)
    _report(summary, len(todo), elapsed, path)


def _registered(store: Store, exp: Experiment, folder: Path) -> tuple[str, str]:
    """(name, series) of the dictionary in the store, registering it when `analyze` did not."""
    name, series = exp.analyze.sae_name or exp.run.name, exp.analyze.series
    if store is not None and store.get_sae(name, series) is None:
        from saecli.commands.analyze import ensure_registered
        from saecli.dictionaries.registry import load_dictionary

        ensure_registered(store, exp, load_dictionary(folder, device="cpu"), folder)
    return name, series


def _report(summary: dict, n_run: int, elapsed: float, path: Path) -> None:
    from saecli import ui

    u = summary["this_run"]
    ui.table(
        "autointerp",
        {
            "features this run": n_run,
            "features/min": round(60 * n_run / elapsed, 1) if elapsed > 0 else "–",
            "requests": u["requests"],
            "retries": u["retries"],
            "tokens in / out": f"{u['prompt_tokens']:,} / {u['completion_tokens']:,}",
            "cost this run": f"${u['cost']:.4f}",
            "explained (all runs)": summary["explained"],
            "bad answers (all runs)": summary["bad_answers"],
        },
    )
    rows = [
        {
            "scorer": kind,
            "features": s["n"],
            "mean F1": round(s["mean_f1"], 3),
            "median F1": round(s["median_f1"], 3),
            "mean accuracy": round(s["mean_accuracy"], 3),
            "mean balanced acc.": round(s["mean_balanced_accuracy"], 3),
        }
        for kind, s in summary["scorers"].items()
    ]
    if rows:
        ui.table("scores", rows)
        for kind, s in summary["scorers"].items():
            ui.table(
                f"{kind}: mean F1 by density decile",
                [
                    {
                        "decile": d["decile"],
                        "density": f"{d['density_min']:.2e}–{d['density_max']:.2e}",
                        "features": d["n"],
                        "mean F1": round(d["mean_f1"], 3),
                    }
                    for d in s["mean_f1_by_density_decile"]
                ],
            )
    ui.result(f"autointerp summary: {path}")


def register(app: typer.Typer) -> None:
    app.command("autointerp")(autointerp)
