"""`train(exp) -> Path`: one experiment from start (or its last checkpoint) to a saved dictionary.

The run folder (`run.output_dir`) ends up holding:

    config.toml                 the resolved experiment (`saecli train RUN_FOLDER --resume` reads it)
    metrics.jsonl               one line per logged step
    checkpoints/step_*/         the last two checkpoints (see checkpoint.py)
    sae_weights.safetensors     the trained dictionary (scale folded in when `sae.fold_activation_scale`)
    cfg.json                    how to rebuild it: `saecli.dictionaries.registry.load_dictionary(folder)`
    summary.json                final metrics; written last, so its presence means "finished"
    wandb_run_id.txt            when wandb is enabled (a resumed run logs to the same wandb run)

From Python:

    from saecli.config.load import load_experiment
    from saecli.training import train
    folder = train(load_experiment("experiments/tiny/train.toml"))
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saecli.dtypes import DTYPES
from saecli.errors import ConfigError, RunError, UsageError
from saecli.training.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from saecli.training.distributed import Sync, default_sync
from saecli.training.logger import METRICS_FILE, WANDB_ID_FILE
from saecli.training.member import DIVERGED_FILE, Member, set_rng_state
from saecli.training.trainer import NullReporter, Reporter, fit, initialize, plan_steps

SUMMARY_FILE = "summary.json"
# what a run writes in its folder (the only files --overwrite removes)
RUN_FILES = ("config.toml", METRICS_FILE, "sae_weights.safetensors", "cfg.json", SUMMARY_FILE, WANDB_ID_FILE,
             DIVERGED_FILE)
# keys whose change on resume cannot alter the trained weights
_HARMLESS = ("wandb.", "store.", "eval.", "run.name", "run.output_dir", "trainer.checkpoint_every_seconds",
             "trainer.log_frequency", "model.device", "sae.device")


def run_state(folder: str | Path) -> str:
    """'empty' (nothing of a run here), 'finished' (summary.json written) or 'unfinished'."""
    folder = Path(folder)
    if (folder / SUMMARY_FILE).exists():
        return "finished"
    if (folder / CHECKPOINTS_DIR).exists() or (folder / METRICS_FILE).exists():
        return "unfinished"
    return "empty"


def clear_run(folder: str | Path) -> None:
    """Remove a previous run's outputs (only the files a run writes; anything else stays)."""
    folder = Path(folder)
    shutil.rmtree(folder / CHECKPOINTS_DIR, ignore_errors=True)
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(exp: Any) -> torch.device:
    """`sae.device`; 'auto' = the model's device when one is set, else cuda when present, else cpu."""
    name = exp.sae.device
    if name == "auto" and exp.model is not None and exp.model.device != "auto":
        name = exp.model.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per data-parallel process
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)


def with_absolute_store_path(exp: Any) -> Any:
    """Relative paths (store.path, cache, model...) made absolute against the current directory, the one rule
    for every file (`saecli.config.load.PATHS_RULE`), before config.toml is written."""
    from saecli.config.load import absolute_paths

    return absolute_paths(exp)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_changes(old_toml: Path, exp: Any) -> list[str]:
    """Keys (that matter for the weights) whose value differs from the run's saved config.toml."""
    from saecli.config.base import to_dict
    from saecli.config.load import read_toml

    try:
        old = _flat(read_toml(old_toml))
    except Exception:  # an unreadable old config: nothing to compare with
        return []
    from saecli.config.load import absolute_paths

    new = to_dict(absolute_paths(exp))
    new.pop("source_file", None)
    new = _flat(new)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return [k for k in keys if not k.startswith(_HARMLESS)]


def train(exp: Any, *, resume: bool = False, overwrite: bool = False, reporter: Reporter | None = None,
          stream: Any = None, run_dir: str | Path | None = None, sync: Sync | None = None) -> Path:
    """Train `exp`'s dictionary and return its run folder.

    `resume` continues from the folder's latest complete checkpoint (or starts when there is none);
    without it an existing run in the folder is an error unless `overwrite`. `stream` replaces the
    stream `open_stream(exp)` would build (e.g. `saecli.data.synthetic.SyntheticStream`).
    """
    from saecli.config.load import write_resolved
    from saecli.dictionaries.registry import build_dictionary, dictionary_class

    exp.require("sae")
    given_stream = stream is not None
    reporter = reporter or NullReporter()
    sync = sync or default_sync()
    folder = Path(run_dir if run_dir is not None else exp.run.output_dir)
    state = run_state(folder)
    if overwrite:
        if sync.is_main:
            clear_run(folder)
        state = "empty"
    elif state == "finished" and not resume:
        raise UsageError(f"{folder} already holds a finished run: set run.output_dir to a new folder, or add "
                         "--overwrite to train it again (--resume would find nothing left to do)")
    elif state == "unfinished" and not resume:
        raise UsageError(f"{folder} holds an unfinished run: add --resume to continue it from its last checkpoint, "
                         "--overwrite to start again, or set run.output_dir to a new folder")
    if resume and state == "finished":
        reporter.info(f"{folder} is already finished; nothing to resume")
        return folder
    found = latest_checkpoint(folder) if resume else None
    if resume and found is None and state == "unfinished":
        reporter.warn(f"{folder} has no complete checkpoint yet: starting the run from the beginning")

    exp = with_absolute_store_path(exp)
    from saecli.interop.activations import cache_data_source

    exp = cache_data_source(exp)  # an imported cache is the data source config.toml records
    if sync.is_main:
        from saecli.fsio import require_writable

        require_writable(folder, "the run folder")
        if found is not None and (folder / "config.toml").exists():
            changed = config_changes(folder / "config.toml", exp)
            if changed:
                reporter.warn("resuming with settings that differ from the run's config.toml: "
                              + ", ".join(changed) + " (the checkpoint's step count and schedules are kept)")
        folder.mkdir(parents=True, exist_ok=True)
        write_resolved(exp, folder)
    sync.barrier()

    seed_everything(exp.run.seed)
    cls = dictionary_class(exp.sae.kind)
    if stream is None:
        from saecli.data.open import open_stream

        exp.require("activations")
        stream = open_stream(exp, purpose="train", rank=sync.rank, world_size=sync.world_size,
                             contexts=bool(cls.needs_context))
    hooks = list(stream.hook_points)
    main_hook = getattr(exp.sae, "hook_point", None) or hooks[0]
    d_model = stream.d_model.get(main_hook, next(iter(stream.d_model.values())))
    device = resolve_device(exp)
    dictionary = build_dictionary(exp.sae, d_model, hooks).to(device=device, dtype=DTYPES[exp.sae.dtype])

    wandb = None
    if exp.wandb.enabled and sync.is_main:
        from saecli.config.base import to_dict
        from saecli.training.logger import WandbLogger

        wandb = WandbLogger(folder, name=exp.run.name, project=exp.wandb.project, entity=exp.wandb.entity,
                            mode=exp.wandb.mode, tags=exp.wandb.tags, dir=exp.wandb.dir, config=to_dict(exp))
    common = dict(folder=folder, name=exp.run.name, sync=sync, wandb=wandb)
    if found is not None:
        try:
            member, shared = Member.from_checkpoint(dictionary, exp.trainer, found[1], **common)
        except ValueError as exc:  # a checkpoint of another shape of run (world size, step count)
            raise UsageError(f"cannot resume from {found[1]}: {exc}") from None
        stream.load_state_dict(shared["stream"][sync.rank])
        set_rng_state(shared["rng"])
        reporter.info(f"resuming {exp.run.name} from step {member.step} of {member.total_steps} ({found[1]})")
    else:
        if sync.is_main:
            clear_run_partial(folder)
        lm = None
        if getattr(dictionary, "needs_model_init", False) and getattr(stream, "lm", None) is None:
            from saecli.lm import load_model

            exp.require("model")  # a cached stream has no model: load it for the init alone
            lm = load_model(exp.model)
        batch_tokens = initialize(stream, [(dictionary, exp.init)], sync=sync, lm=lm)
        try:
            plan = plan_steps(exp.trainer.total_training_tokens, batch_tokens,
                              exp.trainer.gradient_accumulation_steps, sync.world_size)
        except ValueError as exc:
            raise ConfigError(str(exc), file=exp.source_file, key="trainer.total_training_tokens") from None
        member = Member(dictionary, exp.trainer, total_steps=plan.total_steps, batch_tokens=plan.batch_tokens,
                        **common)
    for line in run_header(exp, stream, member, given=given_stream):
        reporter.info(line)
    try:
        fit(stream, [member], reporter=reporter, sync=sync)
        if member.status == "diverged":
            raise RunError(member.message)
        summary = finish(member, fold=bool(getattr(exp.sae, "fold_activation_scale", False)))
    finally:
        member.close()
    dropped = int(getattr(stream, "dropped_tokens", 0))
    if dropped and sync.is_main:
        reporter.info(f"{dropped:,} massive-activation tokens left out of training (activations.max_norm_ratio)")
    if sync.is_main:
        record_in_store(exp, folder, summary, reporter)
    return folder


def run_header(exp: Any, stream: Any, member: Member, *, given: bool = False) -> list[str]:
    """What `train` says before its first step: one line (data source, hook, d_sae, steps, tokens per
    step, world size), and a second when the cache is smaller than the run, which then loops over it."""
    from saecli.data.reader import CacheStream

    d = member.dictionary
    world = member.sync.world_size
    per_step = member.batch_tokens * member.accumulation * world
    train_tokens = member.total_steps * per_step
    cached = stream.index.total_tokens if isinstance(stream, CacheStream) else None
    if given:
        source = f"{type(stream).__name__} (given)"
    elif cached is not None:
        source = f"cache {exp.activations.cache_dir} ({cached:,} tokens)"
    elif getattr(stream, "describe", ""):  # a stream that says what it reads (several models: data/models.py)
        source = stream.describe
    else:
        source = f"live {exp.model.name} on {exp.dataset.path}"
    ins, outs = list(d.in_hooks), list(d.out_hooks)
    hook = ", ".join(ins) + ("" if outs == ins else " → " + ", ".join(outs))
    lines = [f"{exp.run.name}: {source} · {hook} · d_sae {d.d_sae:,} · {member.total_steps:,} steps × "
             f"{per_step:,} tokens · {world} process{'es' if world > 1 else ''}"]
    if world > 1:  # multi-process: world size, mesh, per-rank batch
        from saecli.training.topology import topology_line

        lines.append(topology_line(world, member.batch_tokens, member.accumulation))
    if cached is not None and 0 < cached < train_tokens:
        lines.append(f"the cache holds {cached:,} tokens, fewer than the {train_tokens:,} to train on: training "
                     f"loops over it {train_tokens / cached:.1f} times, in a new order each pass (generate a "
                     "larger cache, activations.total_tokens, for fresh data)")
    return lines


def clear_run_partial(folder: Path) -> None:
    """A fresh start in a folder whose earlier attempt left no checkpoint: drop its stale logs."""
    shutil.rmtree(folder / CHECKPOINTS_DIR, ignore_errors=True)
    for name in (METRICS_FILE, DIVERGED_FILE):
        (folder / name).unlink(missing_ok=True)


def finish(member: Member, *, fold: bool) -> dict[str, Any]:
    """Save the trained dictionary (scale folded when asked) and summary.json (last: the finished mark)."""
    from saecli.fsio import write_json

    summary = member.summary()
    if member.folder is None or not member.sync.is_main:
        return summary
    d = member.dictionary
    if fold and getattr(d.cfg, "norm_activation", "none") == "dataset-wise" and not d.folded:
        d.fold_activation_scale()
    d.save(member.folder)
    write_json(member.folder / SUMMARY_FILE, summary)
    return summary


def record_in_store(exp: Any, folder: Path, summary: dict, reporter: Reporter) -> None:
    """Register the trained dictionary in the results store; a failure only warns (results stay in the folder)."""
    if exp.store.backend == "none":
        return
    try:
        from saecli.store import open_store
    except ImportError:
        return
    from saecli.config.base import to_dict
    from saecli.config.load import experiment_dict

    try:
        store = open_store(exp.store)
        try:
            model_name = exp.model.name if exp.model is not None else None
            if exp.model is not None:
                store.put_model(exp.model.name, to_dict(exp.model))
            store.put_dataset(exp.dataset.path, to_dict(exp.dataset))
            store.put_sae(exp.run.name, path=str(folder.resolve()), cfg=experiment_dict(exp), model_name=model_name,
                          dataset_name=exp.dataset.path, metrics=summary)
        finally:
            store.close()
        from saecli.store.record import describe

        reporter.info(f"recorded {exp.run.name} in {describe(exp.store)}")
    except Exception as exc:  # the store is a convenience: never lose a finished run over it
        reporter.warn(f"could not record {exp.run.name} in the {exp.store.backend} store ({exc}); "
                      f"the results are in {folder} (record them later with `saecli record {folder}`)")
