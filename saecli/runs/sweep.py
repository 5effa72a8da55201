"""`run_sweep(plan)`: every member of a sweep, each group of members on one pass of its stream.

    from saecli.sweep.grid import load_sweep
    from saecli.runs import run_sweep
    rows = run_sweep(load_sweep("experiments/tiny/sweep.toml"))      # one summary row per member

Per group (members that share the stream, sweep/grouping.py), on one process:
1. members already finished (summary.json) or diverged (diverged.json) are skipped under --resume;
   unfinished ones continue from the latest checkpoint they all share (one stream position), the
   others start fresh in a second pass;
2. each pass is the driver's `train_pass` (driver.py), the same as `saecli train`'s: a member is made,
   initialised, trained and saved exactly as `train` does it; the stream's first batches are read once
   and replayed to each member's init, and each batch is read once and fed to every member;
3. each member's folder gets what `train` writes (runs/folders.py), plus eval.json with `sweep.eval`.

Under `accelerate launch`/torchrun the groups (or parts of a big group) are spread over the ranks;
each rank reads its groups' streams whole and trains its members exactly as one process would. Rank 0
then writes sweep.json, sweep_summary.json and frontier.png in the sweep's folder.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from saecli.config.experiment import Experiment
from saecli.data.stream import ActivationStream
from saecli.errors import ConfigError, RunError, UsageError
from saecli.runs.driver import Job, prepare, train_pass
from saecli.runs.folders import clear_run, member_status
from saecli.runs.members import seed_everything
from saecli.sweep.grid import SweepPlan
from saecli.sweep.grouping import Group, Unit, group_members, needs_context, spread
from saecli.training.checkpoint import latest_checkpoint, list_checkpoints
from saecli.training.distributed import LocalSync, Sync, default_sync
from saecli.training.trainer import NullReporter, Reporter

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel

SWEEP_FILE = "sweep.json"
_DONE_DIR = ".sweep-done"
StreamFactory = Callable[[Experiment], ActivationStream]


def run_sweep(
    plan: SweepPlan,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    sync: Sync | None = None,
    stream_factory: StreamFactory | None = None,
) -> list[dict]:
    """Train the sweep; returns the summary rows (on rank 0; [] on other ranks).

    `stream_factory(exp)` replaces `open_stream` (e.g. a synthetic stream in tests); it is called once
    per pass over a group and must give the same batches for the same experiment.
    """
    from saecli.sweep.summary import collect_rows, write_summary

    reporter = reporter or NullReporter()
    sharded = [m.name for m in plan.members if int(m.exp.trainer.tensor_parallel) > 1]
    if sharded:  # a sweep spreads whole members over the ranks; a sharded member needs all of its tp ranks
        raise ConfigError(
            f"trainer.tensor_parallel > 1 is for `saecli train`; a sweep trains each member on one "
            f"process (members {', '.join(sharded[:3])}{'...' if len(sharded) > 3 else ''})",
            key="trainer.tensor_parallel",
        )
    sync = sync or default_sync()
    groups = group_members(plan.members)
    _check_folders(plan, resume=resume, overwrite=overwrite, sync=sync)
    plan_by_rank = spread(groups, sync.world_size)
    session = sync.broadcast_object(secrets.token_hex(6)) if sync.world_size > 1 else "local"
    if sync.is_main:
        _write_plan(plan, groups, plan_by_rank)
    mine = plan_by_rank[sync.rank]
    if sync.world_size > 1:
        names = ", ".join(m.name for u in mine for m in u.members) or "nothing"
        if sync.is_main:  # world size, mesh, and per-rank batch (each rank streams whole groups)
            from saecli.training.topology import topology_line

            acts = plan.members[0].exp.activations if plan.members else None
            reporter.info("sweep: " + topology_line(sync.world_size, acts.batch_size if acts else 0))
        reporter.info(f"rank {sync.rank} of {sync.world_size}: {names}")
    try:
        for unit in mine:
            _train_unit(unit, plan, reporter=reporter, stream_factory=stream_factory)
    finally:
        if sync.world_size > 1:
            _mark_done(plan.output_dir, session, sync.rank)
    if not sync.is_main:
        return []
    if sync.world_size > 1:
        _wait_done(plan.output_dir, session, sync.world_size)
    rows = collect_rows(plan, groups)
    write_summary(rows, plan.output_dir)
    diverged = [r for r in rows if r["status"] == "diverged"]
    if rows and len(diverged) == len(rows):
        raise RunError(
            "every member of the sweep diverged (NaN/inf loss): lower trainer.lr or enable "
            "trainer.clip_grad_norm; see diverged.json in each member's folder"
        )
    return rows


# ---------------------------------------------------------------------------------------- folders
def _check_folders(plan: SweepPlan, *, resume: bool, overwrite: bool, sync: Sync) -> None:
    """The same rules as `train`: an existing member run needs --resume or --overwrite."""
    if overwrite:
        if sync.is_main:
            for m in plan.members:
                clear_run(m.folder)
        if sync.world_size > 1:
            sync.barrier()
        return
    if resume:
        return
    taken = [m for m in plan.members if member_status(m.folder) != "empty"]
    if taken:
        names = ", ".join(f"{m.name} ({member_status(m.folder)})" for m in taken[:5])
        more = f" and {len(taken) - 5} more" if len(taken) > 5 else ""
        raise UsageError(
            f"{plan.output_dir} already holds runs of this sweep: {names}{more}. Add --resume to "
            "continue (finished members are skipped), --overwrite to start again, or set "
            "run.output_dir to a new folder"
        )


def _write_plan(plan: SweepPlan, groups: list[Group], by_rank: list[list[Unit]]) -> None:
    from saecli.fsio import write_json

    rank_of = {m.name: r for r, units in enumerate(by_rank) for u in units for m in u.members}
    group_of = {m.name: g.index for g in groups for m in g.members}
    write_json(
        plan.output_dir / SWEEP_FILE,
        {
            "source": plan.source_file,
            "world_size": len(by_rank),
            "varying": plan.varying,
            "members": [
                {
                    "name": m.name,
                    "index": m.index,
                    "group": group_of[m.name],
                    "rank": rank_of.get(m.name),
                    "folder": str(m.folder),
                    "overrides": m.overrides,
                }
                for m in plan.members
            ],
            "groups": [{"index": g.index, "members": [m.name for m in g.members]} for g in groups],
        },
    )


def _mark_done(folder: Path, session: str, rank: int) -> None:
    from saecli.fsio import write_text

    write_text(folder / _DONE_DIR / f"{session}-rank{rank}", "done\n")


def _wait_done(folder: Path, session: str, world_size: int, poll_s: float = 0.5) -> None:
    """Rank 0 waits (no collective, so no timeout) until every rank has finished its members."""
    marks = [folder / _DONE_DIR / f"{session}-rank{r}" for r in range(world_size)]
    while not all(p.exists() for p in marks):
        time.sleep(poll_s)
    for p in marks:
        p.unlink(missing_ok=True)
    try:
        (folder / _DONE_DIR).rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------- one unit
def _train_unit(unit: Unit, plan: SweepPlan, *, reporter: Reporter, stream_factory: StreamFactory | None) -> None:
    """Train one process's share of a group: a resumed pass and/or a fresh pass over the stream."""
    todo: list[Job] = []
    for m in unit.members:
        status = member_status(m.folder)
        if status in ("finished", "diverged"):
            reporter.info(f"{m.name}: already {status}; skipped")
            continue
        todo.append(Job(m.exp, m.folder, latest_checkpoint(m.folder) if status == "unfinished" else None))
    if not todo:
        return
    resumed, fresh = _common_position(todo, reporter)
    lm: LanguageModel | None = None
    if stream_factory is None:
        from saecli.data.open import uses_cache

        exp0 = todo[0].exp
        if not uses_cache(exp0) and exp0.model is not None:
            from saecli.lm import load_model

            seed_everything(exp0.run.seed)  # as `train`: a model that draws random numbers loading loads the same
            lm = load_model(exp0.model)  # one model for both passes (and eval)
    sync = LocalSync()  # a group trains on one process; the ranks share out the groups
    for part in (resumed, fresh):
        if not part:
            continue
        jobs = prepare(part, sync=sync, reporter=reporter)
        stream = _open(jobs[0].exp, stream_factory, lm)
        try:
            results = train_pass(
                jobs,
                stream,
                sync=sync,
                reporter=reporter,
                lm=lm,
                evaluate=plan.sweep.eval,
                given=stream_factory is not None,
            )
        finally:
            stream.close()
        if len(results) == 1 and results[0].status == "diverged":  # fit warns only when others go on
            reporter.warn(results[0].summary.get("message", f"{results[0].name} diverged"))


def _common_position(todo: list[Job], reporter: Reporter) -> tuple[list[Job], list[Job]]:
    """Members with checkpoints resume from the latest stream position (in batches) they all have;
    the others (no checkpoint at that position) start again from the beginning."""
    have = [t for t in todo if t.checkpoint is not None]
    if not have:
        return [], todo
    positions: dict[int, list[tuple[Job, tuple[int, Path]]]] = {}
    for t in have:
        acc = int(t.exp.trainer.gradient_accumulation_steps)
        for step, path in list_checkpoints(t.folder):
            positions.setdefault(step * acc, []).append((t, (step, path)))
    best = max(positions, key=lambda p: (len(positions[p]), p))
    resumed = [Job(t.exp, t.folder, ckpt) for t, ckpt in positions[best]]
    names = {t.folder for t in resumed}
    fresh = [Job(t.exp, t.folder, None) for t in todo if t.folder not in names]
    for t in fresh:
        if t.folder in {x.folder for x in have}:
            reporter.warn(
                f"{t.exp.run.name}: no checkpoint at the group's common position (batch {best}); "
                "it starts again from the beginning"
            )
    return resumed, fresh


def _open(exp: Experiment, stream_factory: StreamFactory | None, lm: LanguageModel | None) -> ActivationStream:
    if stream_factory is not None:
        return stream_factory(exp)
    from saecli.data.open import open_stream

    exp.require("activations")
    return open_stream(exp, purpose="train", rank=0, world_size=1, contexts=needs_context(exp), lm=lm)
