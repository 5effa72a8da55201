"""Where logged metrics go besides the terminal: `metrics.jsonl` in the run folder, and wandb.

metrics.jsonl holds one JSON object per log line, each with "step" (completed optimizer steps).
Lines are appended and flushed as they come; on resume the file is cut back to the checkpoint's step
so a step never appears twice. wandb runs offline without any network (`mode = "offline"`), and a
resumed run reuses its wandb run id (kept in `wandb_run_id.txt`).
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any, Literal, TextIO

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSON-lines log of one member's metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh: TextIO | None = None

    def truncate(self, max_step: int) -> None:
        """Drop lines logged after `max_step` (what a resumed run will log again)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if record.get("step", 0) <= max_step:
                keep.append(line)
        from saecli.fsio import write_text

        write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class WandbLogger:
    """One wandb run per member, resumed under the same id. Several may be live in one process."""

    def __init__(
        self,
        folder: str | Path,
        *,
        name: str,
        project: str,
        entity: str | None = None,
        mode: Literal["online", "offline", "disabled"] = "offline",
        tags: list[str] | None = None,
        dir: str | None = None,
        config: dict | None = None,
    ):
        import wandb

        folder = Path(folder)
        id_file = folder / WANDB_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # wandb ids: short, lowercase alphanumeric
            from saecli.fsio import write_text

            write_text(id_file, run_id + "\n")
        wandb_dir = Path(dir) if dir else folder
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            id=run_id,
            resume="allow",
            mode=mode,
            tags=list(tags or []),
            dir=str(wandb_dir),
            config=config or {},
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        data = {
            k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and _clean(v) is not None
        }
        self.run.log(data, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()
