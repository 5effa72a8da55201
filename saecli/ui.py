"""Everything the terminal shows: progress bars, tables, histograms, messages. Only this module knows rich."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)
for _c in (console, out):  # in a log or a pipe, a line stays whole (no wrapping at 80 columns)
    _c.soft_wrap = not _c.is_terminal
_state = {"verbose": False, "quiet": False}


def set_verbosity(*, verbose: bool = False, quiet: bool = False) -> None:
    _state["verbose"] = verbose
    _state["quiet"] = quiet


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str) -> None:
    if not _state["quiet"] and is_main_process():
        console.print(message)


def debug(message: str) -> None:
    if _state["verbose"] and is_main_process():
        console.print(f"[dim]{escape(message)}[/dim]")


def warn(message: str) -> None:
    if is_main_process():
        console.print(f"[yellow]warning:[/yellow] {escape(message)}")


def error(message: str) -> None:
    """One paragraph on stderr: a red panel in a terminal, a plain unwrapped line in logs and pipes."""
    if console.is_terminal:
        body = Text(message, overflow="fold")
        console.print(Panel(body, title="error", title_align="left", border_style="red", expand=False))
    else:
        console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def traceback() -> None:
    console.print_exception(show_locals=False)


class _RateColumn(ProgressColumn):
    """Items per second with a unit (tokens/s)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        if "rate" in task.fields:  # the caller's own figure (training: tokens_per_s of its metrics)
            speed = task.fields["rate"]
        else:
            speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"– {self.unit}/s", style="progress.data.speed")
        return Text(f"{_si(speed)} {self.unit}/s", style="progress.data.speed")


_SHORT = {"explained_variance": "ev", "learning_rate": "lr", "overall_loss": "loss"}


class _FieldsColumn(ProgressColumn):
    """Live metrics after the bar, on one line (cut with … rather than wrapped in narrow terminals)."""

    def render(self, task) -> Text:
        fields = task.fields.get("metrics") or {}
        text = "  ".join(f"{_SHORT.get(k, k)} {_fmt(v)}" for k, v in fields.items())
        return Text(text, style="cyan", no_wrap=True, overflow="ellipsis")


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


class ProgressHandle:
    """A started progress task: `advance(n, **metrics)` moves it and updates the metric fields;
    `update(rate=...)` sets the rate shown (for a caller with its own rate figure, see `progress`)."""

    def __init__(self, progress: Progress | None, task_id: Any):
        self._progress = progress
        self._task = task_id

    def advance(self, n: float = 1, **metrics: Any) -> None:
        if self._progress is None:
            return
        if metrics:
            self._progress.update(self._task, advance=n, metrics=metrics)
        else:
            self._progress.advance(self._task, n)

    def finish(self, done: float) -> None:
        """End at the work actually done (whole batches can pass the planned total): `done/done`, 100 %."""
        if self._progress is not None:
            self._progress.update(self._task, total=done, completed=done)

    def update(self, *, completed: float | None = None, rate: float | None = None, **metrics: Any) -> None:
        if self._progress is None:
            return
        kwargs: dict[str, Any] = {}
        if completed is not None:
            kwargs["completed"] = completed
        if rate is not None:
            kwargs["rate"] = rate
        if metrics:
            kwargs["metrics"] = metrics
        self._progress.update(self._task, **kwargs)


def _cell(col: object, task: Task) -> Text:
    """One column of a plain progress line (rich's columns render Text; a plain string column is itself)."""
    if not isinstance(col, ProgressColumn):
        return Text(str(col))
    out = col(task)
    return out if isinstance(out, Text) else Text(str(out))


class _LineProgress(Progress):
    """Progress for logs and pipes (stderr not a terminal): no live redraw, whose cropped last frame is
    all a log would keep, but a whole plain line at most every `every` seconds and at the end."""

    def __init__(self, *columns: Any, every: float, **kwargs: Any):
        super().__init__(*columns, auto_refresh=False, **kwargs)
        self._every = every
        self._printed: dict[Any, float] = {}
        self._shown: dict[Any, float] = {}  # `completed` at the last line printed

    def _line(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        row = Text(" ").join(_cell(col, task) for col in self.columns if not isinstance(col, BarColumn))
        self.console.print(row, soft_wrap=True, highlight=False)
        self._printed[task_id] = time.monotonic()
        self._shown[task_id] = task.completed

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        now = time.monotonic()
        if now - self._printed.setdefault(task_id, now) >= self._every:
            self._line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def start(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def stop(self) -> None:
        for task_id, task in list(self._tasks.items()):
            if self._shown.get(task_id) != task.completed:
                self._line(task_id)


def _line_interval() -> float:
    """Seconds between progress lines in a log (SAECLI_PROGRESS_EVERY, default 30)."""
    try:
        return max(0.0, float(os.environ.get("SAECLI_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


@contextmanager
def progress(
    description: str, total: float | None, unit: str = "tokens", completed: float = 0, own_rate: bool = False
) -> Iterator[ProgressHandle]:
    """A rich progress bar with a rate in `unit`/s and live metrics; silent when quiet or not rank 0.

    `own_rate`: the rate shown is the one the caller passes to `update(rate=...)` ("–" until then) instead
    of rich's estimate, so that the bar and the caller's records show one figure. When stderr is not a
    terminal (a log file, a pipe), whole plain lines are printed every SAECLI_PROGRESS_EVERY seconds.
    """
    if _state["quiet"] or not is_main_process():
        yield ProgressHandle(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        _FieldsColumn(),
    ]
    fields: dict[str, Any] = {"metrics": {}, **({"rate": None} if own_rate else {})}
    if console.is_terminal:
        bar: Progress = Progress(*columns, console=console, transient=False, refresh_per_second=4)
    else:
        bar = _LineProgress(*columns, console=console, every=_line_interval())
    with bar as prog:
        task = prog.add_task(description, total=total, completed=completed, **fields)  # type: ignore[arg-type]  # rich takes floats (its stub says int)
        yield ProgressHandle(prog, task)


def table(
    title: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Any], columns: Sequence[str] | None = None
) -> None:
    """Print a table to stdout: a list of row dicts, or one dict shown as key/value rows."""
    if not is_main_process():
        return
    t = Table(title=title, title_justify="left", show_lines=False)
    if isinstance(rows, Mapping):
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in rows.items():
            t.add_row(str(k), _fmt(v))
    else:
        cols = list(columns or (rows[0].keys() if rows else []))
        for c in cols:
            t.add_column(str(c), justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
        for r in rows:
            t.add_row(*[_fmt(r.get(c, "")) for c in cols])
    out.print(t)


def histogram(title: str, counts: Sequence[float], edges: Sequence[float], width: int = 40) -> None:
    """A horizontal bar histogram in the terminal (used for log-density plots)."""
    if _state["quiet"] or not is_main_process():
        return
    peak = max(counts) if len(counts) else 0
    t = Table(title=title, title_justify="left", show_header=True, box=None)
    t.add_column("bin", justify="right")
    t.add_column("count", justify="right")
    t.add_column("")
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        bar = "█" * (int(round(width * c / peak)) if peak else 0)
        t.add_row(f"[{lo:.1f}, {hi:.1f})", str(int(c)), f"[green]{bar}[/green]")
    out.print(t)


def result(message: str) -> None:
    """A final line of output (printed even with --quiet)."""
    if is_main_process():
        out.print(message)


_TOKEN_MARKS = {"\n": "↵", "\r": "␍", "\t": "⇥"}


def token_contexts(title: str, contexts: Sequence[tuple[str, Sequence[str], Sequence[float]]], scale: float) -> None:
    """Print contexts (label, tokens, activations): each firing token's background grows with act / scale."""
    if not is_main_process():
        return
    out.print(Text(title, style="bold"))
    for label, tokens, acts in contexts:
        line = Text("  ")
        line.append(f"{label}  ", style="dim")
        for tok, a in zip(tokens, acts):
            shown = "".join(_TOKEN_MARKS.get(c, c) for c in tok)
            if a > 0:
                level = min(1.0, a / scale) if scale > 0 else 1.0
                g, b = int(235 - 115 * level), int(200 - 200 * level)
                line.append(shown, style=f"black on rgb(255,{g},{b})")
            else:
                line.append(shown, style="dim" if shown != tok else "")
        out.print(line, soft_wrap=False, overflow="fold")


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal (False when piped or redirected: print plain, complete lines)."""
    return out.is_terminal


def plain_lines(lines: Iterable[str]) -> None:
    """Lines on stdout exactly as given (no markup, no wrapping, no cropping): for pipes and scripts."""
    if is_main_process():
        for line in lines:
            out.print(line, markup=False, highlight=False, soft_wrap=True)
