"""`train(exp)`: one experiment's dictionary from start (or its last checkpoint) to its run folder.

A sweep of one member (driver.py), trained data parallel when launched on several ranks: each rank
reads its own shard of the stream and gradients are all-reduced every step (`training.distributed`);
rank 0 alone writes. From Python:

    from saecli.config.load import load_experiment
    from saecli.runs import train
    result = train(load_experiment("experiments/tiny/train.toml"))
    result.folder, result.summary["explained_variance"]
"""

from __future__ import annotations

import json
from pathlib import Path

from saecli.config.experiment import Experiment
from saecli.data.stream import ActivationStream
from saecli.errors import RunError, UsageError
from saecli.runs.driver import Job, RunResult, prepare, train_pass
from saecli.runs.folders import SUMMARY_FILE, clear_run, run_state
from saecli.runs.members import dictionary_config, resolve_device, seed_everything
from saecli.training.checkpoint import latest_checkpoint
from saecli.training.distributed import Sync, default_sync
from saecli.training.tensor_parallel import check_run, run_sync
from saecli.training.trainer import NullReporter, Reporter


def train(
    exp: Experiment,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    stream: ActivationStream | None = None,
    run_dir: str | Path | None = None,
    sync: Sync | None = None,
) -> RunResult:
    """Train `exp`'s dictionary into `run_dir` (default `run.output_dir`); returns its folder and summary.

    `resume` continues from the folder's latest complete checkpoint (or starts when there is none);
    without it an existing run in the folder is an error unless `overwrite`. `stream` replaces the
    stream `open_stream(exp)` would build (e.g. `saecli.data.synthetic.SyntheticStream`). A member whose
    loss turns NaN/inf raises RunError (its last good checkpoint stays).
    """
    dictionary_config(exp)  # a ConfigError before anything is touched
    reporter = reporter or NullReporter()
    sync = sync or default_sync()
    tp = int(exp.trainer.tensor_parallel)
    dcfg = dictionary_config(exp)
    check_run(dcfg.kind, dcfg.d_sae, tp, dcfg)  # kind, processes, d_sae, the kind's split: before any work
    sync = run_sync(tp, sync, resolve_device(exp).type)
    folder = Path(run_dir if run_dir is not None else exp.run.output_dir)
    state = run_state(folder)
    if overwrite:
        if sync.is_main:
            clear_run(folder)
        state = "empty"
    elif state == "finished" and not resume:
        raise UsageError(
            f"{folder} already holds a finished run: set run.output_dir to a new folder, or add "
            "--overwrite to train it again (--resume would find nothing left to do)"
        )
    elif state == "unfinished" and not resume:
        raise UsageError(
            f"{folder} holds an unfinished run: add --resume to continue it from its last checkpoint, "
            "--overwrite to start again, or set run.output_dir to a new folder"
        )
    if resume and state == "finished":
        reporter.info(f"{folder} is already finished; nothing to resume")
        return RunResult(exp.run.name, folder, json.loads((folder / SUMMARY_FILE).read_text()))
    found = latest_checkpoint(folder) if resume else None
    if resume and found is None and state == "unfinished":
        reporter.warn(f"{folder} has no complete checkpoint yet: starting the run from the beginning")
    [job] = prepare([Job(exp, folder, found)], sync=sync, reporter=reporter)
    given = stream is not None
    if stream is None:
        from saecli.data.open import open_stream
        from saecli.dictionaries.registry import dictionary_class

        job.exp.require("activations")
        seed_everything(job.exp.run.seed)  # a model that draws random numbers while loading loads the same
        stream = open_stream(
            job.exp,
            purpose="train",
            rank=sync.rank,
            world_size=sync.world_size,
            contexts=bool(dictionary_class(dictionary_config(job.exp).kind).needs_context),
        )
    try:
        [result] = train_pass([job], stream, sync=sync, reporter=reporter, given=given)
    finally:
        if not given:
            stream.close()
    if result.status == "diverged":
        raise RunError(result.summary.get("message", f"{result.name} diverged"))
    return result
