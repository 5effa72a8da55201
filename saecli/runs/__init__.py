"""Runs: the one driver behind `saecli train` and `saecli sweep`, and the run folders it fills.

`train` is a sweep of one member. Both commands hand members (an experiment + a folder + where to
start) to `driver.train_pass`, which builds them fresh or from their checkpoints, trains them on one
pass of one stream (`training.fit`), saves them, records them in the store and evaluates them.
What differs is only how the work is spread over processes:

    train.py     train(exp): one member, data parallel over the ranks (stream sharded by rank,
                 gradients all-reduced, rank 0 writes)
    sweep.py     run_sweep(plan): groups of members that share a stream (sweep/grouping.py) spread
                 over the ranks, each group trained on one process (LocalSync)
    driver.py    Job, RunResult, prepare (config.toml, resume warnings), train_pass
    members.py   seeding, building, init on the stream's first batches, restore from a checkpoint
    outputs.py   weights + summary.json, the store record, evaluation, the header line
    folders.py   what a run folder holds, its state, --resume/--overwrite, config changes on resume

`training/` underneath knows dataclasses, tensors and callbacks only; this package is where the
experiment file, the store and the run folders meet it.

    from saecli.runs import train, run_sweep
    result = train(exp)            # RunResult: .folder, .summary, .status
"""

from saecli.runs.driver import Job, RunResult, prepare, train_pass
from saecli.runs.sweep import run_sweep
from saecli.runs.train import train

__all__ = ["Job", "RunResult", "prepare", "run_sweep", "train", "train_pass"]
