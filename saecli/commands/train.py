"""`saecli train`: train the experiment's dictionary, with checkpoints and exact resume."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from saecli.commands import ExperimentArg, SetOption, load, probe_store

# the metrics shown next to the progress bar (the rest go to metrics.jsonl and wandb)
_SHOWN = ("loss", "l0", "explained_variance", "dead", "lr", "k")
_SUMMARY = (
    "step",
    "tokens",
    "loss",
    "explained_variance",
    "mse",
    "l0",
    "dead",
    "almost_dead",
    "dense",
    "elapsed_s",
    "tokens_per_s",
    "status",
)


class UiReporter:
    """Draws the loop's progress with saecli.ui: a live bar with the latest metrics, and messages."""

    shown: tuple[str, ...] = _SHOWN

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._handle: Any = None

    def title(self) -> str:
        return "train"

    def start(self, total_tokens: int, done_tokens: int) -> None:
        from saecli import ui

        self._handle = self._stack.enter_context(
            ui.progress(self.title(), total=total_tokens, unit="tokens", completed=done_tokens, own_rate=True)
        )

    def advance(self, n_tokens: int) -> None:
        if self._handle is not None:
            self._handle.advance(n_tokens)

    def metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        """The part of a logged record shown next to the bar."""
        return {k: record[k] for k in self.shown if k in record}

    def log(self, member: str, record: dict[str, Any]) -> None:
        if self._handle is not None:  # the bar's rate is the record's tokens_per_s (one figure everywhere)
            self._handle.update(rate=record.get("tokens_per_s"), **self.metrics(record))

    def warn(self, message: str) -> None:
        from saecli import ui

        ui.warn(message)

    def info(self, message: str) -> None:
        from saecli import ui

        ui.info(message)

    def close(self) -> None:
        self._stack.close()


def train(
    experiment: ExperimentArg,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run folder's latest checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard a previous run in the output folder")] = False,
) -> None:
    """Train the experiment's dictionary (its \\[sae] table) on its activations: the cache, or the model live.

    Writes to run.output_dir: sae_weights.safetensors + cfg.json (load them with
    saecli.dictionaries.registry.load_dictionary), config.toml, metrics.jsonl, summary.json and the last
    two checkpoints. A run killed at any point (even SIGKILL) continues with --resume and ends with the
    same weights as an uninterrupted run; Ctrl-C saves a checkpoint before exiting.

    Examples:

        saecli train experiments/tiny/train.toml

        saecli train exp.toml --set trainer.lr=1e-3 --set sae.k=64 --set run.output_dir=runs/k64

        saecli train runs/k64 --resume
    """
    from saecli import ui
    from saecli.errors import UsageError
    from saecli.runs import train as run_train

    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")
    exp = load(experiment, overrides)
    if exp.sweep is not None:
        raise UsageError(
            f"{experiment} has a [sweep] section: train its members with `saecli sweep {experiment}` "
            "(or remove the section to train the base experiment alone)"
        )
    run_dir = None
    if Path(experiment).is_dir():  # a run folder: its config.toml, and the folder itself as the output
        run_dir = Path(experiment)
    exp.require("dictionary", "activations")  # the file's own gaps first, then the store
    probe_store(exp, run_dir or exp.run.output_dir)
    reporter = UiReporter()
    try:
        result = run_train(exp, resume=resume, overwrite=overwrite, reporter=reporter, run_dir=run_dir)
    finally:
        reporter.close()
    ui.table(f"{exp.run.name}: final metrics", {k: result.summary[k] for k in _SUMMARY if k in result.summary})
    ui.result(f"trained dictionary saved in {result.folder}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
