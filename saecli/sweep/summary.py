"""The sweep's results: one row per member, a JSON file and the sparsity–fidelity frontier as a PNG.

Rows come from each member's folder: summary.json (the training run's final metrics: L0 and explained
variance over the last logging window, dead latents over the last statistics window), cfg.json
(d_sae, for the dead fraction), diverged.json, and eval.json when the member was evaluated (loss
recovered by splicing the dictionary into the model). Files written in the sweep's folder:

    sweep_summary.json   the rows
    frontier.png         L0 (log scale) against explained variance, the Pareto front joined
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from saecli.sweep.grid import SweepPlan

SUMMARY_JSON = "sweep_summary.json"
FRONTIER_PNG = "frontier.png"
COLUMNS = ("member", "group", "status", "step", "l0", "explained_variance", "dead_pct", "loss_recovered")
# short headers for the terminal table (fits 80 columns)
LABELS = {"explained_variance": "expl. var", "dead_pct": "dead %", "loss_recovered": "loss rec.", "l0": "L0"}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def member_row(name: str, folder: Path, group: int) -> dict[str, Any]:
    """What a member's folder says about it (status 'pending' when it holds nothing yet)."""
    summary = _read(folder / "summary.json")
    diverged = _read(folder / "diverged.json")
    cfg = _read(folder / "cfg.json")
    evaluation = _read(folder / "eval.json").get("metrics", {})
    if diverged:
        status = "diverged"
    elif summary:
        status = str(summary.get("status", "finished"))
    elif (folder / "checkpoints").exists():
        status = "unfinished"
    else:
        status = "pending"
    row: dict[str, Any] = {"member": name, "group": group, "status": status}
    row["step"] = summary.get("step", diverged.get("step"))
    row["l0"] = summary.get("l0")
    row["explained_variance"] = summary.get("explained_variance")
    d_sae = cfg.get("d_sae")
    dead = summary.get("dead")
    row["dead_pct"] = 100.0 * dead / d_sae if isinstance(dead, (int, float)) and d_sae else None
    row["loss_recovered"] = evaluation.get("loss_recovered")
    if evaluation:
        row["eval_explained_variance"] = evaluation.get("explained_variance")
        row["eval_l0"] = evaluation.get("l0")
    row["folder"] = str(folder)
    return row


def collect_rows(plan: SweepPlan, groups: list[Any]) -> list[dict[str, Any]]:
    group_of = {m.name: g.index for g in groups for m in g.members}
    rows = []
    for m in plan.members:
        row = member_row(m.name, m.folder, group_of.get(m.name, 0))
        row["overrides"] = dict(m.overrides)  # as typed in TOML: 3e-4 stays a number, 32 an integer
        rows.append(row)
    return rows


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for `ui.table`: the summary columns, blanks for what is unknown."""
    out = []
    for r in rows:
        out.append({LABELS.get(c, c): ("" if r.get(c) is None else r[c]) for c in COLUMNS})
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower L0 and higher explained variance),
    ordered by L0."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def write_summary(rows: list[dict[str, Any]], folder: str | Path) -> None:
    """sweep_summary.json and frontier.png (when at least one member has L0 and explained variance)."""
    from saecli.fsio import write_json

    folder = Path(folder)
    write_json(folder / SUMMARY_JSON, rows)
    usable = [r for r in rows if _finite(r.get("l0")) and _finite(r.get("explained_variance"))]
    if usable:
        write_frontier(usable, folder / FRONTIER_PNG)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_frontier(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Scatter of L0 against explained variance, one labelled point per member, the front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saecli.fsio import write_with

    xs = [float(r["l0"]) for r in rows]
    ys = [float(r["explained_variance"]) for r in rows]
    groups = sorted({r.get("group", 0) for r in rows})
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    try:
        for g in groups:
            idx = [i for i, r in enumerate(rows) if r.get("group", 0) == g]
            ax.scatter(
                [xs[i] for i in idx], [ys[i] for i in idx], s=28, label=f"group {g}" if len(groups) > 1 else None
            )
        front = pareto_front(list(zip(xs, ys)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="0.4", lw=1, zorder=0, label="frontier")
        for i, r in enumerate(rows):
            ax.annotate(str(r["member"]), (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if min(xs) > 0 and max(xs) / min(xs) > 4:
            ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel("explained variance")
        ax.set_title("sparsity–fidelity frontier")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        write_with(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
