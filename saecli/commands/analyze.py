"""`saecli analyze`: per-feature statistics and contexts of a trained dictionary; optional HTML dashboard."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from saecli.commands import ExperimentArg, SetOption, load, probe_store

SaeOption = Annotated[
    Optional[Path],
    typer.Option(
        "--sae",
        help="dictionary folder, saecli's or SAELens/sparsify/dictionary_learning "
        "(default: analyze.sae_path, else run.output_dir, else sae.pretrained)",
    ),
]


def sae_folder(exp: Any, sae: Path | None) -> Path:
    from saecli.interop.pretrained import or_pretrained

    return Path(sae or exp.analyze.sae_path or or_pretrained(exp, Path(exp.run.output_dir)))


def open_results_store(exp: Any, folder: Path):
    """The experiment's store, or None for backend "none" or when it is unreachable (said at once: the
    results stay in `folder`, and `saecli record` can add them later)."""
    if exp.store.backend == "none" or not probe_store(exp, folder):
        return None
    from saecli.store import open_store

    return open_store(exp.store)


def check_dictionary_folder(folder: Path) -> None:
    """Before any model loads: the folder holds a readable dictionary and can take the results."""
    from saecli.dictionaries.registry import check_saved
    from saecli.fsio import require_writable

    check_saved(folder)  # a broken or foreign folder fails here, without reading the weights
    require_writable(folder, "the dictionary folder (results are written beside it)")


def ensure_registered(store: Any, exp: Any, dictionary: Any, folder: Path) -> tuple[str, str]:
    """(name, series) of the dictionary in the store, registering it when training did not."""
    name, series = exp.analyze.sae_name or exp.run.name, exp.analyze.series
    if store is not None and store.get_sae(name, series) is None:
        from saecli.config.load import experiment_dict

        store.put_sae(
            name,
            series,
            path=str(folder.resolve()),
            cfg=experiment_dict(exp),  # one cfg shape per run
            model_name=exp.model.name if exp.model else None,
            dataset_name=exp.dataset.path,
        )
    return name, series


def analyze(
    experiment: ExperimentArg,
    sae: SaeOption = None,
    html: Annotated[bool, typer.Option("--html", help="also write the static HTML dashboard")] = False,
    show: Annotated[Optional[int], typer.Option("--show", help="print this feature's contexts in the terminal")] = None,
    reuse: Annotated[
        bool, typer.Option("--reuse", help="use the analysis already on disk (for --html/--show)")
    ] = False,
    overrides: SetOption = None,
) -> None:
    """Stream text through the model and the dictionary and record, for every feature: how often it fires,
    its max activation, an activation histogram, its top-activating contexts, contexts at lower tiers
    of its max and contexts where it does not fire.

    The result goes to <dictionary>/analysis/<analyze.name>/features.safetensors (one file, replaced
    atomically) and to the store; --html writes a dashboard beside it (index.html, open it from disk),
    computing DLA first when `saecli dla` has not. An interrupted analysis leaves the previous one.

    Examples:

        saecli analyze runs/tiny-sae --html

        saecli analyze exp.toml --set analyze.total_analyzing_tokens=200000 --show 12

        saecli analyze exp.toml --reuse --show 7
    """
    from saecli import ui
    from saecli.analysis.records import AnalysisResult, analysis_dir

    exp = load(experiment, overrides)
    cfg = exp.analyze
    folder = sae_folder(exp, sae)
    lm = dictionary = store = None
    try:
        if reuse:
            result = AnalysisResult.load(analysis_dir(folder, cfg.name))
            if html or exp.dashboard.enabled:  # only for explanations: the site is built without a store too
                store = _store_or_none(exp, folder)
        else:
            if not exp.models:
                exp.require("model")
            check_dictionary_folder(folder)
            store = open_results_store(exp, folder)
            lm, dictionary = _load(exp, folder)
            result = _run(exp, lm, dictionary, folder)
            if store is not None:
                name, series = ensure_registered(store, exp, dictionary, folder)
                n = store.replace_analysis(name, series, result.name, result.records(), result.store_meta())
                from saecli.store.record import describe

                ui.info(f"recorded {n:,} features of {name} in {describe(exp.store)}")
        if html or exp.dashboard.enabled:
            index = _dashboard(
                exp, folder, result, None if exp.models else lm, dictionary, store
            )  # no DLA across models
            ui.result(f"dashboard: {index}")
    finally:
        if store is not None:
            store.close()
    _summary(result)
    if show is not None:
        show_feature(result, show, interpretation=_interpretations(exp, folder, result.name, None).get(show))


def _load(exp: Any, folder: Path):
    from saecli.dictionaries.registry import load_dictionary
    from saecli.lm import load_model, validate_hooks

    if exp.models:  # model diffing: every model, keyed by label (the first one's tokenizer decodes)
        lms = {label: load_model(cfg) for label, cfg in exp.models.items()}
        dictionary = load_dictionary(folder, device=next(iter(lms.values())).device)
        dictionary.eval()
        return lms, dictionary
    lm = load_model(exp.model)
    dictionary = load_dictionary(folder, device=lm.device)
    dictionary.eval()
    validate_hooks(lm, list(dictionary.in_hooks))
    return lm, dictionary


def _run(exp: Any, lm: Any, dictionary: Any, folder: Path):
    from saecli import ui
    from saecli.analysis.analyzer import FeatureAnalyzer, context_batches, decoder_for, run_analysis
    from saecli.analysis.records import analysis_dir
    from saecli.config.activations import ActivationsConfig
    from saecli.lm import run_to_hooks

    cfg, acts = exp.analyze, exp.activations
    acts = acts or ActivationsConfig(hook_points=list(dictionary.in_hooks))
    context_size = cfg.context_size or acts.context_size
    batch_contexts = cfg.batch_contexts or acts.model_batch_size
    dataset = (
        exp.dataset
        if cfg.skip_documents is None
        else dataclasses.replace(exp.dataset, skip_documents=cfg.skip_documents)
    )
    analyzer = FeatureAnalyzer(dictionary, cfg, context_size)
    mib = analyzer.book.memory_bytes() / 2**20
    ui.info(
        f"analysing {dictionary.d_sae:,} features of {folder} on {cfg.total_analyzing_tokens:,} tokens "
        f"of {dataset.path} ({context_size}-token contexts, {mib:,.0f} MiB of kept contexts)"
    )
    if isinstance(lm, dict):  # several models: their zipped stream of whole contexts, heads '<label>/<hook>'
        from saecli.data.open import open_stream

        diff_exp = dataclasses.replace(
            exp,
            dataset=dataset,
            activations=dataclasses.replace(
                acts,
                context_size=context_size,
                batch_size=context_size * batch_contexts,
                shuffle_buffer_tokens=max(acts.shuffle_buffer_tokens, context_size * batch_contexts),
            ),
        )
        batches = iter(
            open_stream(diff_exp, purpose="eval", contexts=True, hook_points=list(dictionary.in_hooks), lm=lm)
        )
        models, lm = " vs ".join(f"{k}={v.name}" for k, v in exp.models.items()), next(iter(lm.values()))
    else:
        batches = context_batches(
            lm, dataset, acts, list(dictionary.in_hooks), context_size=context_size, batch_contexts=batch_contexts
        )
        models = exp.model.name
    with ui.progress("analyze", total=cfg.total_analyzing_tokens, unit="tokens") as bar:
        done = run_analysis(analyzer, batches, cfg.total_analyzing_tokens, progress=bar.advance)
        bar.finish(done)
    if done < cfg.total_analyzing_tokens:
        ui.warn(f"the text ran out after {done:,} of {cfg.total_analyzing_tokens:,} tokens")
    forward = (
        None
        if exp.models
        # context extras re-run one model; no kind needs them across models
        else (lambda tokens: run_to_hooks(lm, tokens.to(lm.device), list(dictionary.in_hooks)))
    )
    result = analyzer.result(
        decode=decoder_for(lm.tokenizer),
        forward=forward,
        batch_contexts=batch_contexts,
        meta={"model": models, "dataset": dataset.path, "sae_path": str(folder)},
    )
    path = result.save(analysis_dir(folder, cfg.name))
    ui.info(f"wrote {path}")
    return result


def _dashboard(exp: Any, folder: Path, result: Any, lm: Any, dictionary: Any, store: Any) -> Path:
    from saecli import ui
    from saecli.analysis.dla import DLAResult
    from saecli.analysis.records import analysis_dir
    from saecli.dashboard.site import build_site

    dla = DLAResult.load(folder)
    if dla is None and lm is not None:
        from saecli.commands.dla import compute_dla

        dla = compute_dla(exp, lm, dictionary, folder, store, exp.analyze.dla_top)
    found = _interpretations(exp, folder, result.name, store)
    explanations = {i: v["explanation"] for i, v in found.items() if v.get("explanation")}
    scores = {i: {k: s["f1"] for k, s in v.get("scores", {}).items()} for i, v in found.items()}
    dash = exp.dashboard
    out = Path(dash.output_dir) if dash.output_dir else analysis_dir(folder, result.name) / "html"
    alive = int((result.act_times > 0).sum())
    pages = min(alive, dash.max_features) if dash.max_features else alive
    title = f"{exp.analyze.sae_name or exp.run.name} · {result.name}"
    with ui.progress("dashboard", total=pages, unit="pages") as bar:
        return build_site(
            result,
            out,
            dla=dla,
            explanations=explanations,
            title=title,
            window=(dash.window_before, dash.window_after),
            max_features=dash.max_features,
            progress=bar.advance,
            scores={i: v for i, v in scores.items() if v},
        )


def _store_or_none(exp: Any, folder: Path):
    from saecli import ui
    from saecli.errors import SaecliError

    try:
        return open_results_store(exp, folder)
    except SaecliError as exc:
        ui.warn(f"the store is not available, so the dashboard shows no explanations ({exc})")
        return None


def _interpretations(exp: Any, folder: Path, analysis: str, store: Any) -> dict[int, dict]:
    """Feature interpretations ({explanation, scores: {scorer: {f1, ...}}}): those recorded in the store
    (`put_interpretation`), overridden by the run folder's `saecli autointerp` results."""
    from saecli import ui
    from saecli.analysis.records import analysis_dir
    from saecli.autointerp.results import load_interpretations
    from saecli.errors import SaecliError

    out: dict[int, dict] = {}
    if store is not None:
        name, series = exp.analyze.sae_name or exp.run.name, exp.analyze.series
        try:
            for rec in store.iter_features(name, series, exp.analyze.name):
                interp = rec.get("interpretation")
                if isinstance(interp, dict):
                    text = interp.get("explanation") or interp.get("text") or interp.get("final_explanation")
                    if text:
                        scores = interp.get("scores") if isinstance(interp.get("scores"), dict) else {}
                        out[int(rec["index"])] = {"explanation": str(text), "scores": scores}
        except SaecliError as exc:  # e.g. the dictionary was never recorded in this store
            ui.debug(f"no explanations from the store: {exc}")
    out.update(load_interpretations(analysis_dir(folder, analysis), exp.autointerp.name))
    return out


def _summary(result: Any) -> None:
    import numpy as np

    from saecli import ui

    density = result.density()
    alive = density[density > 0]
    ui.table(
        f"analysis {result.name}",
        {
            "tokens analysed": result.n_analyzed_tokens,
            "features": result.d_sae,
            "fired": int(len(alive)),
            "never fired": int(result.d_sae - len(alive)),
            "median density (fired)": float(np.median(alive)) if len(alive) else 0.0,
            "tokens/s": result.meta.get("tokens_per_second") or "–",
        },
    )


def show_feature(
    result: Any,
    index: int,
    per_sampling: int = 6,
    window: tuple[int, int] = (20, 6),
    interpretation: dict | None = None,
) -> None:
    """Print one feature's stats, its autointerp explanation and scores, and its contexts (each cut to a
    window around its peak token)."""
    import numpy as np

    from saecli import ui
    from saecli.dashboard.site import peak_window

    rec = result.feature(index)
    vocab = result.vocab
    rows = {"density": rec["density"], "fired on tokens": rec["act_times"], "max activation": rec["max_act"]}
    if interpretation:
        rows["explanation"] = interpretation.get("explanation") or "(the explainer gave no usable answer)"
        for kind, s in interpretation.get("scores", {}).items():
            rows[f"{kind} F1 / balanced acc."] = f"{s['f1']:.3f} / {s['balanced_accuracy']:.3f}"
    ui.table(f"feature {index}", rows)
    for s in rec["samplings"]:
        contexts: list[tuple[str, list[str], list[float]]] = []
        for j in range(min(per_sampling, len(s["tokens"]))):
            acts = s["acts"][j].astype(np.float32)
            lo, hi = peak_window(len(acts), int(acts.argmax()) if acts.max() > 0 else -1, *window)
            toks = [vocab.get(int(t), f"<{int(t)}>") for t in s["tokens"][j, lo:hi]]
            contexts.append((f"{float(s['max'][j]):7.3g}", toks, acts[lo:hi].tolist()))
        if contexts:
            ui.token_contexts(f"{s['name']} ({len(s['tokens'])} contexts)", contexts, rec["max_act"])


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)
