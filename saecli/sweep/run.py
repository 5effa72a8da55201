"""`run_sweep(plan)`: train every member of a sweep, each group on one pass of its stream.

    from saecli.sweep.grid import load_sweep
    from saecli.sweep.run import run_sweep
    rows = run_sweep(load_sweep("experiments/tiny/sweep.toml"))      # one summary row per member

Per group (members that share the stream, see grouping.py), on one process:
1. members already finished (summary.json) or diverged (diverged.json) are skipped under --resume;
   unfinished ones continue from the latest checkpoint they all share (one stream position), the
   others start fresh in a second pass;
2. a fresh member is made exactly as `saecli train` makes it: seed, build, data-dependent init on
   the stream's first batches (read once for the whole group and replayed to each member);
3. every member trains as a plain Member (the one SAE implementation), all in one `training.fit`
   loop fed each batch once (a stacked [M, ...] SAE was removed: no GPU measurement showed it paying,
   and on the CPU it was the slower path; it can come back with evidence);
4. each member's folder gets what `train` writes: config.toml, metrics.jsonl, checkpoints,
   sae_weights.safetensors + cfg.json, summary.json (or diverged.json), wandb_run_id.txt.

Under `accelerate launch`/torchrun the groups (or parts of a big group) are spread over the ranks;
each rank reads its groups' streams whole and trains its members exactly as one process would. Rank 0
then writes sweep.json, sweep_summary.json and frontier.png in the sweep's folder.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from saecli.dtypes import DTYPES
from saecli.errors import RunError, UsageError
from saecli.sweep.grid import SweepMember, SweepPlan
from saecli.sweep.grouping import Group, Unit, group_members, needs_context, spread
from saecli.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from saecli.training.distributed import LocalSync, Sync, default_sync
from saecli.training.member import Member, read_diverged, set_rng_state
from saecli.training.run import (
    clear_run,
    clear_run_partial,
    config_changes,
    finish,
    record_in_store,
    resolve_device,
    run_state,
    seed_everything,
    with_absolute_store_path,
)
from saecli.training.trainer import NullReporter, Reporter, fit, initialize, plan_steps

SWEEP_FILE = "sweep.json"
_DONE_DIR = ".sweep-done"
_EVAL_FILES = ("eval.json", "eval_density.png", "eval_latents.safetensors")
StreamFactory = Callable[[Any], Any]


@dataclasses.dataclass
class _Todo:
    member: SweepMember
    checkpoint: tuple[int, Path] | None = None  # None: start fresh


def member_status(folder: Path) -> str:
    """'finished' | 'diverged' | 'unfinished' | 'empty' for a member's folder."""
    if read_diverged(folder) is not None:
        return "diverged"
    return run_state(folder)


def run_sweep(plan: SweepPlan, *, resume: bool = False, overwrite: bool = False, reporter: Reporter | None = None,
              sync: Sync | None = None, stream_factory: StreamFactory | None = None) -> list[dict]:
    """Train the sweep; returns the summary rows (on rank 0; [] on other ranks).

    `stream_factory(exp)` replaces `open_stream` (e.g. a synthetic stream in tests); it is called once
    per pass over a group and must give the same batches for the same experiment.
    """
    from saecli.sweep.summary import collect_rows, write_summary

    reporter = reporter or NullReporter()
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
        reporter.info(f"rank {sync.rank} of {sync.world_size}: {names}")
    try:
        for unit in mine:
            _train_unit(unit, plan, resume=resume, reporter=reporter, stream_factory=stream_factory)
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
        raise RunError("every member of the sweep diverged (NaN/inf loss): lower trainer.lr or enable "
                       "trainer.clip_grad_norm; see diverged.json in each member's folder")
    return rows


# ---------------------------------------------------------------------------------------- folders
def _check_folders(plan: SweepPlan, *, resume: bool, overwrite: bool, sync: Sync) -> None:
    """The same rules as `train`: an existing member run needs --resume or --overwrite."""
    if overwrite:
        if sync.is_main:
            for m in plan.members:
                clear_run(m.folder)
                for name in _EVAL_FILES:  # an old evaluation would describe the old weights
                    (m.folder / name).unlink(missing_ok=True)
        if sync.world_size > 1:
            sync.barrier()
        return
    if resume:
        return
    taken = [m for m in plan.members if member_status(m.folder) != "empty"]
    if taken:
        names = ", ".join(f"{m.name} ({member_status(m.folder)})" for m in taken[:5])
        more = f" and {len(taken) - 5} more" if len(taken) > 5 else ""
        raise UsageError(f"{plan.output_dir} already holds runs of this sweep: {names}{more}. Add --resume to "
                         "continue (finished members are skipped), --overwrite to start again, or set "
                         "run.output_dir to a new folder")


def _write_plan(plan: SweepPlan, groups: list[Group], by_rank: list[list[Unit]]) -> None:
    from saecli.fsio import write_json

    rank_of = {m.name: r for r, units in enumerate(by_rank) for u in units for m in u.members}
    group_of = {m.name: g.index for g in groups for m in g.members}
    write_json(plan.output_dir / SWEEP_FILE, {
        "source": plan.source_file,
        "world_size": len(by_rank),
        "varying": plan.varying,
        "members": [{"name": m.name, "index": m.index, "group": group_of[m.name], "rank": rank_of.get(m.name),
                     "folder": str(m.folder), "overrides": m.overrides}
                    for m in plan.members],
        "groups": [{"index": g.index, "members": [m.name for m in g.members]} for g in groups],
    })


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
def _train_unit(unit: Unit, plan: SweepPlan, *, resume: bool, reporter: Reporter,
                stream_factory: StreamFactory | None) -> None:
    """Train one process's share of a group: a resumed pass and/or a fresh pass over the stream."""
    todo: list[_Todo] = []
    for m in unit.members:
        status = member_status(m.folder)
        if status in ("finished", "diverged"):
            reporter.info(f"{m.name}: already {status}; skipped")
            continue
        todo.append(_Todo(m, latest_checkpoint(m.folder) if status == "unfinished" else None))
    if not todo:
        return
    resumed, fresh = _common_position(todo, reporter)
    lm = None
    if stream_factory is None:
        from saecli.data.open import uses_cache

        exp0 = todo[0].member.exp
        if not uses_cache(exp0) and exp0.model is not None:
            from saecli.lm import load_model

            lm = load_model(exp0.model)  # one model for both passes (and eval)
    for part in (resumed, fresh):
        if part:
            _train_pass(part, plan, reporter=reporter, stream_factory=stream_factory, lm=lm)


def _common_position(todo: list[_Todo], reporter: Reporter) -> tuple[list[_Todo], list[_Todo]]:
    """Members with checkpoints resume from the latest stream position (in batches) they all have;
    the others (no checkpoint at that position) start again from the beginning."""
    have = [t for t in todo if t.checkpoint is not None]
    if not have:
        return [], todo
    positions: dict[int, list[tuple[_Todo, tuple[int, Path]]]] = {}
    for t in have:
        acc = int(t.member.exp.trainer.gradient_accumulation_steps)
        for step, path in list_checkpoints(t.member.folder):
            positions.setdefault(step * acc, []).append((t, (step, path)))
    best = max(positions, key=lambda p: (len(positions[p]), p))
    resumed = []
    for t, ckpt in positions[best]:
        resumed.append(_Todo(t.member, ckpt))
    names = {t.member.name for t in resumed}
    fresh = [_Todo(t.member, None) for t in todo if t.member.name not in names]
    for t in fresh:
        if t.member.name in {x.member.name for x in have}:
            reporter.warn(f"{t.member.name}: no checkpoint at the group's common position (batch {best}); "
                          "it starts again from the beginning")
    return resumed, fresh


class _Replay:
    """The first batches of a stream, replayed to each member's `initialize` (read once per group)."""

    def __init__(self, stream: Any, n: int):
        start = stream.state_dict()
        it: Iterator = iter(stream)
        self.batches = []
        for _ in range(n):
            try:
                self.batches.append(next(it))
            except StopIteration:
                break
        stream.load_state_dict(start)
        self.mean_norms = getattr(stream, "mean_norms", None)
        self.hook_points = list(stream.hook_points)
        self.lm = stream.lm  # for kinds that initialise from the model (trainer.initialize reads it)

    def __iter__(self) -> Iterator:
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _open(exp: Any, stream_factory: StreamFactory | None, lm: Any) -> Any:
    if stream_factory is not None:
        return stream_factory(exp)
    from saecli.data.open import open_stream

    exp.require("activations")
    return open_stream(exp, purpose="train", rank=0, world_size=1, contexts=needs_context(exp), lm=lm)


def _build(exp: Any, stream: Any) -> Any:
    from saecli.dictionaries.registry import build_dictionary

    hooks = list(stream.hook_points)
    main_hook = getattr(exp.sae, "hook_point", None) or hooks[0]
    d_model = stream.d_model.get(main_hook, next(iter(stream.d_model.values())))
    return build_dictionary(exp.sae, d_model, hooks).to(device=resolve_device(exp), dtype=DTYPES[exp.sae.dtype])


def _wandb(exp: Any, folder: Path) -> Any:
    if not exp.wandb.enabled:
        return None
    from saecli.config.base import to_dict
    from saecli.training.logger import WandbLogger

    return WandbLogger(folder, name=exp.run.name, project=exp.wandb.project, entity=exp.wandb.entity,
                       mode=exp.wandb.mode, tags=exp.wandb.tags, dir=exp.wandb.dir, config=to_dict(exp))


def _train_pass(part: list[_Todo], plan: SweepPlan, *, reporter: Reporter, stream_factory: StreamFactory | None,
                lm: Any) -> None:
    """One pass over the group's stream for members that start at the same position."""
    from saecli.config.load import write_resolved

    exps = {}
    for t in part:
        exp = with_absolute_store_path(t.member.exp)
        exps[t.member.name] = exp
        t.member.folder.mkdir(parents=True, exist_ok=True)
        if t.checkpoint is not None and (t.member.folder / "config.toml").exists():
            changed = config_changes(t.member.folder / "config.toml", exp)
            if changed:
                reporter.warn(f"{t.member.name}: resuming with settings that differ from its config.toml: "
                              + ", ".join(changed))
        write_resolved(exp, t.member.folder)
    stream = _open(exps[part[0].member.name], stream_factory, lm)
    sync = LocalSync()
    dictionaries, meta = [], []
    shared: dict | None = None
    if part[0].checkpoint is None:
        replay = _Replay(stream, max(int(exps[t.member.name].init.init_batches) for t in part))
        if not replay.batches:
            raise RunError("the activation stream yielded no batch")
        for t in part:
            exp = exps[t.member.name]
            clear_run_partial(t.member.folder)
            seed_everything(exp.run.seed)  # as `train`: the same seed gives the same start
            d = _build(exp, stream)
            tokens = initialize(replay, [(d, exp.init)])
            steps = plan_steps(exp.trainer.total_training_tokens, tokens, exp.trainer.gradient_accumulation_steps, 1)
            dictionaries.append(d)
            meta.append({"total_steps": steps.total_steps, "batch_tokens": steps.batch_tokens, "state": None})
    else:
        for t in part:
            exp = exps[t.member.name]
            seed_everything(exp.run.seed)
            d = _build(exp, stream)
            weights, state = load_checkpoint(t.checkpoint[1], device=next(d.parameters()).device)
            d.load_state_dict(weights)
            ms = state["member"]
            if ms.get("world_size", 1) != 1:
                raise UsageError(f"{t.checkpoint[1]} was written by {ms['world_size']} data-parallel processes; "
                                 "sweep members train on one process each")
            dictionaries.append(d)
            meta.append({"total_steps": ms["total_steps"], "batch_tokens": ms["batch_tokens"], "state": ms})
            shared = shared or {k: v for k, v in state.items() if k != "member"}
    members = _make_members(part, exps, dictionaries, meta, plan, sync)
    try:
        if shared is not None:
            stream.load_state_dict(shared["stream"][0])
            set_rng_state(shared["rng"])
            at = ", ".join(f"{m.name} step {m.step}" for m in members)
            reporter.info(f"resuming {at}")
        fit(stream, members, reporter=reporter, sync=sync)
        for t, m in zip(part, members):
            exp = exps[t.member.name]
            if m.status == "diverged":
                if len(members) == 1:  # fit warns only when others go on
                    reporter.warn(m.message)
                continue  # the member wrote diverged.json
            summary = finish(m, fold=bool(getattr(exp.sae, "fold_activation_scale", False)))
            record_in_store(exp, m.folder, summary, reporter)
            if plan.sweep.eval:
                _evaluate(exp, m.folder, lm, reporter)
    finally:
        for m in members:
            m.close()
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _make_members(part: list[_Todo], exps: dict[str, Any], dictionaries: list[Any], meta: list[dict],
                  plan: SweepPlan, sync: Sync) -> list[Member]:
    """One plain Member per dictionary, in order (resumed ones get their saved state)."""
    members: list[Member] = []
    for t, d, info in zip(part, dictionaries, meta):
        exp = exps[t.member.name]
        m = Member(d, exp.trainer, total_steps=info["total_steps"], batch_tokens=info["batch_tokens"],
                   folder=t.member.folder, name=exp.run.name, sync=sync, wandb=_wandb(exp, t.member.folder))
        if info["state"] is not None:
            m.load_state_dict(info["state"])
            if m.log is not None:
                m.log.truncate(m.step)
        members.append(m)
    return members


def _evaluate(exp: Any, folder: Path, lm: Any, reporter: Reporter) -> None:
    """Held-out evaluation of a finished member (eval.json beside its weights); a failure only warns."""
    try:
        from saecli.evaluation.evaluate import evaluate

        evaluate(exp, folder, show=False, lm=lm)
    except Exception as exc:  # the trained member is safe in its folder whatever eval does
        reporter.warn(f"could not evaluate {folder}: {exc}")

