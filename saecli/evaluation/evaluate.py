"""`evaluate(exp, sae_path) -> dict`: a saved dictionary on held-out data, for any kind.

    from saecli.config.load import load_experiment
    from saecli.evaluation import evaluate
    result = evaluate(load_experiment("runs/tiny"), "runs/tiny")
    print(result["metrics"]["explained_variance"], result["metrics"].get("loss_recovered"))

Writes next to the dictionary (all atomically):

    eval.json                  every scalar metric, per-hook blocks, the density histogram, where the
                               data came from (see heldout.py) and whether it overlaps training
    eval_density.png           the log10 latent-density histogram
    eval_latents.safetensors   per-latent fires, frequency, mean activation (when firing), max activation

A crosscoder over several models ([models.<label>]) adds "model_diff" to eval.json: EV per model and
the relative decoder norms (model_diff.py).

Reconstruction metrics are in raw activation units (see metrics.py); the CE/KL splice runs when a
[model] is configured and `eval.ce_loss` (see splice.py). When a results store is configured the
metrics are merged into the dictionary's record under "eval" (a failure there only warns).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saecli import ui
from saecli.data.open import need_activations, open_stream, uses_cache
from saecli.dictionaries.base import Dictionary
from saecli.errors import UsageError
from saecli.evaluation.density import log_density_histogram, save_density_png, show_density
from saecli.evaluation.heldout import HeldOut, plan_heldout
from saecli.evaluation.metrics import EvalAccumulator, Thresholds
from saecli.evaluation.model_diff import model_diff_report, show_model_diff
from saecli.evaluation.splice import splice_eval

if TYPE_CHECKING:
    from saecli.config.experiment import Experiment
    from saecli.lm.loading import LanguageModel
    from saecli.store.base import Store


EVAL_FILE = "eval.json"
DENSITY_FILE = "eval_density.png"
LATENTS_FILE = "eval_latents.safetensors"

# the rows of the terminal table, in order (present ones only)
_TABLE = (
    "n_tokens",
    "explained_variance",
    "fvu",
    "mse",
    "cosine_similarity",
    "relative_reconstruction_bias",
    "l0",
    "l1",
    "n_dead",
    "n_almost_dead",
    "n_dense",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_zero_ablation",
    "ce_loss_mean_ablation",
    "loss_recovered",
    "loss_recovered_mean_ablation",
    "kl_div_spliced",
    "kl_div_score",
)


def load_for_eval(sae_path: str | Path, device: torch.device | str = "cpu") -> Dictionary:
    """The saved dictionary at `sae_path`, in eval mode; a clear UsageError when there is none."""
    from saecli.dictionaries.registry import load_dictionary

    folder = Path(sae_path)
    if not folder.exists():
        raise UsageError(f"dictionary folder not found: {folder} (train one first, or pass --sae PATH)")
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder: give the folder holding cfg.json and sae_weights.safetensors")
    return load_dictionary(folder, device=device).eval()


def _device(lm: LanguageModel | None) -> torch.device:
    if lm is not None:
        return torch.device(lm.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(dictionary: Dictionary) -> torch.dtype:
    p = next(dictionary.parameters(), None)
    return p.dtype if p is not None else torch.float32


@torch.no_grad()
def reconstruction_metrics(
    dictionary: Dictionary, batches: Iterator[Any], total_tokens: int, thresholds: Thresholds
) -> EvalAccumulator:
    """Stream batches through the dictionary until `total_tokens` counted tokens; return the sums.

    Token batches are cut at exactly `total_tokens`; context batches (kinds that need whole contexts)
    end with the context that reaches it, so they may count a few more tokens.
    """
    acc = EvalAccumulator(dictionary.out_hooks, thresholds)
    dtype, device = _dtype(dictionary), next(dictionary.parameters()).device
    hooks = list(dict.fromkeys(dictionary.in_hooks + dictionary.out_hooks))
    with ui.progress("eval", total=total_tokens, unit="tokens") as bar:
        for batch in batches:
            remaining = total_tokens - acc.n_tokens
            if remaining <= 0:
                break
            raw = {h: batch.acts[h].to(device=device, dtype=dtype) for h in hooks}
            mask = None
            if batch.is_context:  # whole contexts [B, T, d]: the mask marks the counted positions
                mask = batch.mask if batch.mask is not None else torch.ones(batch.tokens.shape, dtype=torch.bool)
                mask = mask.to(device)
                rows = int((mask.sum(1).cumsum(0) < remaining).sum()) + 1  # whole contexts up to the budget
                if rows < mask.shape[0]:
                    raw, mask = {h: a[:rows] for h, a in raw.items()}, mask[:rows]
            elif raw[hooks[0]].shape[0] > remaining:  # token batches: stop exactly at the budget
                raw = {h: a[:remaining] for h, a in raw.items()}
            out = dictionary(raw, mask=mask)
            targets = {h: raw[h] for h in dictionary.out_hooks}
            recons = {h: dictionary.denormalize(h, out.reconstruction[h], raw[h]) for h in dictionary.out_hooks}
            f = out.feature_acts
            if mask is not None:  # whole contexts: keep the counted positions only
                targets = {h: x[mask] for h, x in targets.items()}
                recons = {h: y[mask] for h, y in recons.items()}
                f = f.to_dense()[mask] if f.layout != torch.strided else f[mask]
            before = acc.n_tokens
            acc.update(targets, recons, f)
            bar.advance(acc.n_tokens - before)
    if acc.n_tokens == 0:
        raise UsageError(
            "the held-out activation stream gave no tokens to evaluate on: did training read every "
            "document? Hold text out (dataset.max_documents for training), or set eval.skip_documents "
            "or eval.cache_dir"
        )
    return acc


def _ce_batches(exp: Experiment, lm: LanguageModel, skip: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`eval.ce_contexts` packed windows of held-out text, in model batches of (tokens, mask)."""
    from saecli.data.text import iter_documents
    from saecli.data.tokens import packer_for

    dataset = exp.dataset if skip is None else dataclasses.replace(exp.dataset, skip_documents=skip)
    acts = need_activations(exp)
    packer = packer_for(lm, acts, exp.model)
    left = exp.eval.ce_contexts
    for ctx in packer.contexts(iter_documents(dataset), acts.model_batch_size):
        if left <= 0:
            break
        tokens, mask = ctx.tokens[:left], ctx.mask[:left]
        left -= int(tokens.shape[0])
        yield tokens, mask


def _splice(exp: Experiment, lm: LanguageModel, dictionary: Dictionary, held: HeldOut) -> dict[str, float] | None:
    batches = list(_ce_batches(exp, lm, held.skip_documents))
    if not batches:
        ui.warn("no held-out text left for the CE/KL splice evaluation; skipped")
        return None
    total = sum(int(t.shape[0]) for t, _ in batches)
    with ui.progress("splice (CE/KL)", total=total, unit="contexts") as bar:
        result = splice_eval(
            lm,
            dictionary,
            batches,
            on_batch=lambda part: bar.advance(part.n_contexts),
            min_gap=exp.eval.loss_recovered_min_gap,
        )
    for key in ("loss_recovered_undefined", "loss_recovered_mean_ablation_undefined"):
        if key in result:
            ui.warn(f"{key.removesuffix('_undefined')} is undefined: {result[key]}")
    return result


def _store_update(exp: Experiment, sae_path: Path, metrics: dict) -> None:
    """Merge the eval metrics into the store's record of this dictionary (created when missing)."""
    from saecli.config.load import experiment_dict
    from saecli.store.record import write_or_warn

    def write(store: Store) -> None:
        name = exp.run.name
        if store.get_sae(name) is None:
            store.put_sae(
                name,
                path=str(sae_path.resolve()),
                cfg=experiment_dict(exp),
                model_name=exp.model.name if exp.model is not None else None,
                dataset_name=exp.dataset.path,
                metrics={"eval": metrics},
            )
        else:
            store.update_sae_metrics(name, "default", {"eval": metrics})

    write_or_warn(
        exp,
        write,
        what=f"the eval of {exp.run.name}",
        results=sae_path / EVAL_FILE,
        folder=sae_path,
        info=ui.info,
        warn=ui.warn,
    )


def _write_latents(path: Path, per_latent: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from saecli.fsio import write_with

    tensors = {k: v.contiguous() for k, v in per_latent.items()}
    write_with(path, lambda p: save_file(tensors, str(p), metadata={"format": "saecli-eval-latents"}))


def evaluate(
    exp: Experiment,
    sae_path: str | Path | None = None,
    *,
    run_folder: str | Path | None = None,
    show: bool = True,
    lm: LanguageModel | None = None,
) -> dict:
    """Evaluate the dictionary at `sae_path` (default: eval.sae_path, else run.output_dir) on held-out data.

    `run_folder` is where the training run's summary.json/checkpoints are (default: the dictionary's
    folder, which is where `train` writes them). Returns what eval.json holds.
    """
    need_activations(exp)
    folder = Path(sae_path or exp.eval.sae_path or exp.run.output_dir)
    started = time.time()
    dictionary = load_for_eval(folder)  # first: a wrong path fails before the model loads
    from saecli.fsio import require_writable

    require_writable(folder, "the dictionary folder (eval.json is written beside it)")
    if lm is None and exp.model is not None:
        from saecli.lm import load_model

        lm = load_model(exp.model)
    plan_lm, lms = lm, None
    if exp.models:
        # several models: a given `lm` is the first one; its tokenizer packed the training text, so it finds the
        # held-out documents; it splices nothing (lm = None: a reconstruction reads every model)
        first = next(iter(exp.models))
        if plan_lm is None and not uses_cache(exp):
            from saecli.lm import load_model

            plan_lm = load_model(exp.models[first])
        lms = {first: plan_lm} if plan_lm is not None else None
        lm = None
    dictionary = dictionary.to(_device(plan_lm))
    held = plan_heldout(exp, Path(run_folder) if run_folder else folder, plan_lm)
    for note in held.notes:
        ui.warn(note)
    if held.overlap:
        ui.warn(f"the eval data may overlap the training data: {held.overlap}")
    where = f"{held.source} activations"
    if held.source == "live" and held.skip_documents is not None:
        where += f" from document {held.skip_documents}"
    elif held.source == "cache":
        where += f" from {need_activations(held.exp).cache_dir}"
    ui.info(f"evaluating {folder} ({dictionary.kind}, {dictionary.d_sae} latents) on {where}")

    hooks = list(dict.fromkeys(dictionary.in_hooks + dictionary.out_hooks))
    stream = open_stream(
        held.exp,
        purpose="eval",
        contexts=dictionary.needs_context,
        hook_points=hooks,
        skip_documents=held.skip_documents if held.source == "live" else None,
        lm=lms or lm,
    )
    ev = exp.eval
    thresholds = Thresholds(ev.dead_threshold, ev.almost_dead_threshold, ev.dense_threshold)
    try:
        acc = reconstruction_metrics(dictionary, iter(stream), ev.total_eval_tokens, thresholds)
    finally:
        stream.close()
    recon = acc.result()
    outliers = stream.dropped_tokens
    if outliers:
        ui.info(
            f"{outliers:,} massive-activation tokens left out (activations.max_norm_ratio = "
            f"{need_activations(held.exp).max_norm_ratio:g}; 0 keeps them)"
        )
    if acc.n_tokens < ev.total_eval_tokens:
        ui.warn(
            f"the held-out data ran out after {acc.n_tokens:,} of eval.total_eval_tokens = {ev.total_eval_tokens:,} tokens"
        )

    splice = None
    if ev.ce_loss and lm is not None:
        splice = _splice(exp, lm, dictionary, held)
    elif ev.ce_loss and exp.models:
        ui.info(
            "several models: the CE/KL splice is skipped (a reconstruction of one model's hook reads every "
            "model's activations); see the per-model numbers (model_diff)"
        )
    elif ev.ce_loss:
        ui.info("no model configured: the CE/KL splice evaluation is skipped")

    per_latent = acc.per_latent()
    hist = log_density_histogram(per_latent["frequency"], acc.n_tokens, ev.bins_per_decade)
    metrics = {k: v for k, v in recon.items() if not isinstance(v, dict)}
    diff = model_diff_report(dictionary, recon.get("per_hook", {}))
    if splice:
        metrics.update(splice)
    result = {
        "sae_path": str(folder),
        "kind": dictionary.kind,
        "d_sae": dictionary.d_sae,
        "in_hooks": dictionary.in_hooks,
        "out_hooks": dictionary.out_hooks,
        "units": "raw",
        "metrics": _finite(metrics),
        "per_hook": {h: _finite(m) for h, m in recon.get("per_hook", {}).items()},
        "thresholds": recon["thresholds"],
        "data": {**held.to_dict(), "outlier_tokens_dropped": outliers},
        "density": hist.to_dict(),
        **({"model_diff": diff} if diff else {}),
        "files": {"density_png": DENSITY_FILE, "latents": LATENTS_FILE},
        "seconds": round(time.time() - started, 3),
    }

    from saecli.fsio import write_json

    save_density_png(hist, folder / DENSITY_FILE)
    _write_latents(folder / LATENTS_FILE, per_latent)
    write_json(folder / EVAL_FILE, result)
    _store_update(exp, folder, result["metrics"])
    if show:
        show_density(hist)
        ui.table(f"eval of {folder}", {k: metrics[k] for k in _TABLE if k in metrics})
        if result["per_hook"]:
            ui.table(
                "per out hook",
                [
                    {"hook": h, **{k: m[k] for k in ("explained_variance", "mse", "cosine_similarity")}}
                    for h, m in result["per_hook"].items()
                ],
            )
        if diff:
            show_model_diff(diff)
    return result


def _finite(d: dict) -> dict:
    """JSON has no NaN/inf: such values become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
