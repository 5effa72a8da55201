"""What a member leaves behind once trained: its weights and summary.json, a store record, an evaluation;
and the line `train`/`sweep` say about each member before the first step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from saecli.config.experiment import Experiment
from saecli.data.stream import ActivationStream
from saecli.runs.folders import SUMMARY_FILE
from saecli.training.member import Member
from saecli.training.trainer import Reporter

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel
    from saecli.store.base import Store


def finish(member: Member, *, fold: bool) -> dict[str, Any]:
    """Save the trained dictionary (scale folded when asked) and summary.json (last: the finished mark).
    Returns the summary (on every rank; only the writing rank writes)."""
    from saecli.fsio import write_json
    from saecli.training.tensor_parallel import to_save

    summary = member.summary()
    if member.folder is None:
        return summary
    d = to_save(member.dictionary)  # a sharded dictionary is gathered (on every rank), kept on rank 0
    if d is None or not member.sync.is_main:
        return summary
    if fold and d.cfg.norm_activation == "dataset-wise" and not d.folded:
        d.fold_activation_scale()
    d.save(member.folder)
    write_json(member.folder / SUMMARY_FILE, summary)
    return summary


def record_in_store(exp: Experiment, folder: Path, summary: dict[str, Any], reporter: Reporter) -> None:
    """Register the trained dictionary in the results store; a failure only warns (results stay in the folder)."""
    from saecli.config.base import to_dict
    from saecli.config.load import experiment_dict
    from saecli.store.record import write_or_warn

    def write(store: Store) -> None:
        if exp.model is not None:
            store.put_model(exp.model.name, to_dict(exp.model))
        store.put_dataset(exp.dataset.path, to_dict(exp.dataset))
        store.put_sae(
            exp.run.name,
            path=str(folder.resolve()),
            cfg=experiment_dict(exp),
            model_name=exp.model.name if exp.model is not None else None,
            dataset_name=exp.dataset.path,
            metrics=summary,
        )

    write_or_warn(exp, write, what=exp.run.name, results=folder, folder=folder, info=reporter.info, warn=reporter.warn)


def evaluate_member(exp: Experiment, folder: Path, lm: LanguageModel | None, reporter: Reporter) -> None:
    """Held-out evaluation of a finished member (eval.json beside its weights); a failure only warns."""
    try:
        from saecli.evaluation.evaluate import evaluate

        evaluate(exp, folder, show=False, lm=lm)
    except Exception as exc:  # the trained member is safe in its folder whatever eval does
        reporter.warn(f"could not evaluate {folder}: {exc}")


def run_header(exp: Experiment, stream: ActivationStream, member: Member, *, given: bool = False) -> list[str]:
    """What is said before a member's first step: one line (data source, hook, d_sae, steps, tokens per
    step, world size), and a second when the cache is smaller than the run, which then loops over it."""
    from saecli.data.models import ModelsStream
    from saecli.data.reader import CacheStream

    d = member.dictionary
    world = member.sync.world_size  # data-parallel ranks (each tensor-parallel group reads one batch)
    procs = world * getattr(member.sync, "tp", 1)
    per_step = member.batch_tokens * member.accumulation * world
    train_tokens = member.total_steps * per_step
    cached = stream.index.total_tokens if isinstance(stream, CacheStream) else None
    describe = stream.describe if isinstance(stream, ModelsStream) else ""
    if cached is not None and not given and exp.activations is not None:
        source = f"cache {exp.activations.cache_dir} ({cached:,} tokens)"
    elif exp.model is not None and not given:
        source = f"live {exp.model.name} on {exp.dataset.path}"
    elif describe and not given:  # a stream that says what it reads (several models: data/models.py)
        source = describe
    else:
        source = f"{type(stream).__name__} (given)"
    ins, outs = list(d.in_hooks), list(d.out_hooks)
    hook = ", ".join(ins) + ("" if outs == ins else " → " + ", ".join(outs))
    lines = [
        f"{exp.run.name}: {source} · {hook} · d_sae {d.d_sae:,} · {member.total_steps:,} steps × "
        f"{per_step:,} tokens · {procs} process{'es' if procs > 1 else ''}"
    ]
    tp = getattr(member.sync, "tp", 1)
    if procs > 1:  # multi-process: world size (machines × processes), mesh, per-rank batch
        from saecli.training.topology import topology_line

        mesh = {"dp": world, "tp": tp} if tp > 1 else None
        lines.append(topology_line(procs, member.batch_tokens, member.accumulation, mesh=mesh))
    if cached is not None and 0 < cached < train_tokens:
        lines.append(
            f"the cache holds {cached:,} tokens, fewer than the {train_tokens:,} to train on: training "
            f"loops over it {train_tokens / cached:.1f} times, in a new order each pass (generate a "
            "larger cache, activations.total_tokens, for fresh data)"
        )
    return lines
