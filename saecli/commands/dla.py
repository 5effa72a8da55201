"""`saecli dla`: the output tokens each feature's decoder direction promotes and suppresses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from saecli.commands import ExperimentArg, SetOption, load
from saecli.commands.analyze import (
    SaeOption,
    check_dictionary_folder,
    ensure_registered,
    open_results_store,
    sae_folder,
)

if TYPE_CHECKING:
    from saecli.config.experiment import Experiment
    from saecli.dictionaries.base import Dictionary
    from saecli.lm.loading import LanguageModel
    from saecli.store.base import Store


def compute_dla(exp: Experiment, lm: LanguageModel, dictionary: Dictionary, folder: Path, store: Store, top: int):
    """DLA of every feature → <dictionary>/dla.json and the store; returns the DLAResult."""
    from saecli import ui
    from saecli.analysis.dla import dla_result

    with ui.progress("dla", total=dictionary.d_sae, unit="features") as bar:
        res = dla_result(dictionary, lm, top, progress=bar.advance)
    path = res.save(folder)
    ui.info(f"wrote {path} (final norm: {res.meta['norm']}; biases ignored)")
    if store is not None:
        name, series = ensure_registered(store, exp, dictionary, folder)
        store.put_logits(name, series, res.items())
        from saecli.store.record import describe

        ui.info(f"recorded the DLA of {name} in {describe(exp.store)}")
    return res


def dla(
    experiment: ExperimentArg,
    sae: SaeOption = None,
    top: Annotated[Optional[int], typer.Option("--top", help="tokens kept per side (default: analyze.dla_top)")] = None,
    features: Annotated[
        Optional[list[int]], typer.Option("--feature", "-f", help="print this feature (repeatable)")
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Direct logit attribution: push each feature's decoder direction through the model's final norm
    and unembedding and keep the tokens whose logits it raises and lowers the most.

    "Through the final norm" means centring (LayerNorm only) and the norm's elementwise weight, with
    the per-token normalising scale taken as 1 and biases left out, so values are logit changes per
    unit of activation. A dictionary writing several layers (CLT) uses the sum of its decoders.
    Results go to <dictionary>/dla.json and the store; the dashboard shows them.

    Examples:

        saecli dla runs/tiny-sae

        saecli dla exp.toml --top 20 --feature 3 --feature 17
    """
    from saecli import ui
    from saecli.commands.analyze import _load

    exp = load(experiment, overrides)
    exp.require("model")
    folder = sae_folder(exp, sae)
    k = top or exp.analyze.dla_top
    if k <= 0:
        from saecli.errors import UsageError

        raise UsageError(f"--top must be > 0, found {k}")
    check_dictionary_folder(folder)
    store = open_results_store(exp, folder)
    try:
        lm, dictionary = _load(exp, folder)
        res = compute_dla(exp, lm, dictionary, folder, store, k)
    finally:
        if store is not None:
            store.close()
    shown = features if features else list(range(min(8, res.d_sae)))
    rows = []
    for i in shown:
        if not 0 <= i < res.d_sae:
            raise typer.BadParameter(f"feature {i} does not exist (0–{res.d_sae - 1})", param_hint="--feature")
        rec = res.feature(i)
        fmt = lambda items: "  ".join(f"{t['token']!r} {t['logit']:+.3g}" for t in items[:5])  # noqa: E731
        rows.append({"feature": i, "promotes": fmt(rec["top_positive"]), "suppresses": fmt(rec["top_negative"])})
    ui.table("direct logit attribution", rows)
    ui.result(f"dla: {folder / 'dla.json'}")


def register(app: typer.Typer) -> None:
    app.command("dla")(dla)
