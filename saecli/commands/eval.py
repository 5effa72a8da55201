"""`saecli eval`: evaluate a trained dictionary on held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from saecli.commands import ExperimentArg, SetOption, load, probe_store


def _default_sae(experiment: Path, exp) -> Path:
    """--sae, else eval.sae_path, else the run folder given on the command line, else run.output_dir (or,
    while that holds no dictionary, sae.pretrained)."""
    from saecli.dictionaries.base import CONFIG_NAME

    if exp.eval.sae_path:
        return Path(exp.eval.sae_path)
    if experiment.is_dir() and (experiment / CONFIG_NAME).exists():
        return experiment
    from saecli.interop.pretrained import or_pretrained

    return or_pretrained(exp, Path(exp.run.output_dir))


def eval_command(
    experiment: ExperimentArg,
    sae: Annotated[
        Optional[Path],
        typer.Option(
            "--sae", help="dictionary folder: saecli, SAELens, sparsify or dictionary_learning", show_default=False
        ),
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Evaluate a trained dictionary on held-out activations (documents training never read).

    Reports, in raw activation units: explained variance and FVU, MSE, cosine similarity, relative
    reconstruction bias, L0, L1, dead / almost-dead / dense latents and each latent's firing frequency;
    when a model is configured: the model's CE loss clean, with the dictionary spliced in and with its hooks
    zero-ablated, the loss recovered and KL(clean ‖ spliced). Writes eval.json, eval_density.png and
    eval_latents.safetensors next to the dictionary, prints a table and the log-density histogram, and
    records the metrics in the results store when one is configured. Works for every dictionary kind.

    Examples:

        saecli eval runs/tiny/topk

        saecli eval experiments/tiny/train.toml --set eval.total_eval_tokens=20000 --set eval.ce_contexts=8

        saecli eval exp.toml --sae runs/k64 --set eval.skip_documents=5000
    """
    from saecli import ui
    from saecli.evaluation import evaluate

    exp = load(experiment, overrides)
    folder = sae or _default_sae(experiment, exp)
    exp.require("activations")  # the file's own gaps first, then the store
    probe_store(exp, folder)
    result = evaluate(exp, folder)
    m = result["metrics"]
    parts = [
        f"explained variance {_fmt(m.get('explained_variance'))}",
        f"L0 {_fmt(m.get('l0'))}",
        f"dead {m.get('n_dead')}/{result['d_sae']}",
    ]
    if m.get("loss_recovered") is not None or "ce_loss_spliced" in m:
        parts.append(f"loss recovered {_fmt(m.get('loss_recovered'))}")
        parts.append(f"KL {_fmt(m.get('kl_div_spliced'))}")
    ui.result(", ".join(parts) + f" → {folder / 'eval.json'}")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
