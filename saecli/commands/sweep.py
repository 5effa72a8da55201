"""`saecli sweep`: train many dictionaries from one file, each group of members on one stream."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import typer

from saecli.commands import ExperimentArg, SetOption
from saecli.commands.train import UiReporter


class SweepReporter(UiReporter):
    """One progress bar per pass over a stream; the latest metrics of the member that logged last."""

    shown = ("loss", "l0", "explained_variance")

    def __init__(self) -> None:
        super().__init__()
        self._passes = 0

    def title(self) -> str:
        return f"sweep pass {self._passes}"

    def start(self, total_tokens: int, done_tokens: int) -> None:
        self._stack.close()  # the previous pass's bar
        self._stack = contextlib.ExitStack()
        self._passes += 1
        super().start(total_tokens, done_tokens)

    def log(self, member: str, record: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.update(
                rate=record.get("tokens_per_s"), member=member.rsplit("/", 1)[-1], **self.metrics(record)
            )


def show_plan(plan: Any, groups: list) -> None:
    """The members and the groups of a sweep, as tables (what --dry-run prints)."""
    from saecli import ui
    from saecli.sweep.grid import format_value, key_value, short_names
    from saecli.sweep.grouping import differing_stream_keys

    group_of = {m.name: g.index for g in groups for m in g.members}
    rows = []
    for m in plan.members:
        row = {"member": m.name, "group": group_of[m.name]}
        shown = plan.varying or list(m.overrides)
        short = short_names(shown)
        row.update({short[k]: format_value(key_value(m.exp, k)) for k in shown})
        rows.append(row)
    ui.table(f"{len(plan.members)} members, each in {plan.output_dir}/<member>", rows)
    differ = differing_stream_keys(groups)
    grows = []
    for g in groups:
        exp = g.members[0].exp
        grow = {"group": g.index, "members": len(g.members), "tokens": exp.trainer.total_training_tokens}
        for key in differ:
            if not key.startswith("("):
                grow[key] = format_value(key_value(exp, key))
        grows.append(grow)
    ui.table(f"{len(groups)} group(s): each reads its stream once for all its members", grows)


def sweep(
    experiment: ExperimentArg,
    overrides: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the members and groups, train nothing")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="continue: finished members are skipped, the others resume from their checkpoints"
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard the members' previous runs")] = False,
) -> None:
    """Train every member of a sweep file: a base experiment plus a \\[sweep] table of a grid and/or variants.

    Members whose activation stream is the same (same model, data, hook points, batch size, tokens)
    form a group that reads or computes each batch once for all of them, each member taking its own
    step on it. Each member gets its own folder under run.output_dir
    (config.toml, metrics.jsonl, checkpoints, sae_weights.safetensors + cfg.json); the sweep's folder
    gets sweep.json, sweep_summary.json and frontier.png (L0 against explained variance). Under
    `accelerate launch` the groups (or parts of a big group) are spread over the processes.

    Examples:

        saecli sweep experiments/tiny/sweep.toml --dry-run

        saecli sweep experiments/tiny/sweep.toml

        saecli sweep experiments/tiny/sweep.toml --resume

        accelerate launch --multi_gpu --num_processes 2 -m saecli sweep experiments/smollm2/sweep.toml
    """
    from saecli import ui
    from saecli.errors import UsageError
    from saecli.sweep.grid import load_sweep
    from saecli.sweep.grouping import group_members

    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")
    plan = load_sweep(experiment, overrides)
    groups = group_members(plan.members)
    if dry_run:
        show_plan(plan, groups)
        return
    from saecli.commands import probe_store

    probe_store(plan.members[0].exp, plan.output_dir)
    from saecli.runs import run_sweep
    from saecli.sweep.summary import FRONTIER_PNG, SUMMARY_JSON, table_rows

    reporter = SweepReporter()
    try:
        rows = run_sweep(plan, resume=resume, overwrite=overwrite, reporter=reporter)
    finally:
        reporter.close()
    if not rows:
        return  # a non-main rank: rank 0 reports
    ui.table(f"sweep: {len(rows)} members", table_rows(rows))
    diverged = [r["member"] for r in rows if r["status"] == "diverged"]
    if diverged:
        ui.warn(
            f"{len(diverged)} member(s) diverged (NaN/inf loss) and stopped: {', '.join(diverged)} "
            "(see diverged.json in their folders)"
        )
    extra = f" and {FRONTIER_PNG}" if (plan.output_dir / FRONTIER_PNG).exists() else ""
    ui.result(f"sweep results in {plan.output_dir} ({SUMMARY_JSON}{extra})")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
