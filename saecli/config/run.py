"""[run], [wandb], [store]: where outputs go and who else hears about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saecli.config.base import bad, opt


@dataclass
class RunConfig:
    """Where this run's outputs go."""

    name: str = opt("run", help="a readable name for this run (used in the store and wandb)")
    output_dir: str = opt("runs/run", help="run folder: weights, checkpoints, metrics, resolved config")
    seed: int = opt(0, help="seed for initialisation and training randomness")

    def validate(self) -> None:
        if not self.output_dir:
            raise bad("output_dir", "must not be empty")


@dataclass
class WandbConfig:
    """Logging to Weights & Biases (offline works with no network)."""

    enabled: bool = opt(False, help="log to Weights & Biases")
    project: str = opt("saecli")
    entity: str | None = opt(None)
    mode: Literal["online", "offline"] = opt("offline", help="'offline' needs no network (sync later)")
    tags: list[str] = opt([])
    dir: str | None = opt(None, help="wandb's folder (default: the run folder)")


@dataclass
class StoreConfig:
    """The results store every command records in (SQLite file or MongoDB)."""

    backend: Literal["sqlite", "mongodb", "none"] = opt("sqlite", help="results store")
    path: str = opt("saecli.db", help="SQLite file (relative to the folder saecli runs in)")
    uri: str | None = opt(None, help="MongoDB URI, e.g. mongodb://localhost:27017")
    database: str = opt("saecli", help="MongoDB database name")
    timeout_s: float = opt(5.0, help="give up reaching the server after this many seconds")

    def validate(self) -> None:
        if self.backend == "mongodb" and not self.uri:
            raise bad("uri", "backend 'mongodb' needs store.uri (e.g. mongodb://localhost:27017)")
