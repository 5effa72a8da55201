"""A run folder: what a run writes there, what state it is in, and what may change when it resumes.

    config.toml                 the resolved experiment (`saecli train RUN_FOLDER --resume` reads it)
    metrics.jsonl               one line per logged step
    checkpoints/step_*/         the last two checkpoints (training/checkpoint.py)
    sae_weights.safetensors     the trained dictionary (scale folded in when `sae.fold_activation_scale`)
    cfg.json                    how to rebuild it: `saecli.dictionaries.registry.load_dictionary(folder)`
    summary.json                final metrics; written last, so its presence means "finished"
    diverged.json               the member stopped on a NaN/inf loss (its last good checkpoint is kept)
    wandb_run_id.txt            when wandb is enabled (a resumed run logs to the same wandb run)
    eval.json, eval_*           a sweep member's evaluation (`sweep.eval`)

`train` and `sweep` apply the same rules to each member's folder: an existing run needs --resume
(continue from its latest checkpoint) or --overwrite (remove what a run wrote, nothing else).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from saecli.config.experiment import Experiment
from saecli.training.checkpoint import CHECKPOINTS_DIR
from saecli.training.logger import METRICS_FILE, WANDB_ID_FILE
from saecli.training.member import DIVERGED_FILE, read_diverged

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
EVAL_FILES = ("eval.json", "eval_density.png", "eval_latents.safetensors")
# what a run writes in its folder (the only files --overwrite removes); an old evaluation would
# describe the old weights, so it goes too
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    "sae_weights.safetensors",
    "cfg.json",
    SUMMARY_FILE,
    WANDB_ID_FILE,
    DIVERGED_FILE,
    *EVAL_FILES,
)
# keys whose change on resume cannot alter the trained weights
_HARMLESS = (
    "wandb.",
    "store.",
    "eval.",
    "run.name",
    "run.output_dir",
    "trainer.checkpoint_every_seconds",
    "trainer.log_frequency",
    "model.device",
    "dictionary.device",
)


def run_state(folder: str | Path) -> str:
    """'empty' (nothing of a run here), 'finished' (summary.json written) or 'unfinished'."""
    folder = Path(folder)
    if (folder / SUMMARY_FILE).exists():
        return "finished"
    if (folder / CHECKPOINTS_DIR).exists() or (folder / METRICS_FILE).exists():
        return "unfinished"
    return "empty"


def member_status(folder: str | Path) -> str:
    """`run_state`, or 'diverged' when the member stopped on a NaN/inf loss (a sweep skips it on resume)."""
    if read_diverged(folder) is not None:
        return "diverged"
    return run_state(folder)


def clear_run(folder: str | Path) -> None:
    """Remove a previous run's outputs (only the files a run writes; anything else stays)."""
    folder = Path(folder)
    shutil.rmtree(folder / CHECKPOINTS_DIR, ignore_errors=True)
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)


def clear_run_partial(folder: str | Path) -> None:
    """A fresh start in a folder whose earlier attempt left no usable checkpoint: drop its stale logs."""
    folder = Path(folder)
    shutil.rmtree(folder / CHECKPOINTS_DIR, ignore_errors=True)
    for name in (METRICS_FILE, DIVERGED_FILE):
        (folder / name).unlink(missing_ok=True)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_changes(old_toml: Path, exp: Experiment) -> list[str]:
    """Keys (that matter for the weights) whose value differs from the run's saved config.toml."""
    from saecli.config.load import absolute_paths, experiment_dict, experiment_from_dict, read_toml

    try:  # resolved as it loads: a folder written before a default was recorded compares by its value
        old = _flat(experiment_dict(experiment_from_dict(read_toml(old_toml))))
    except Exception:  # an unreadable old config: nothing to compare with
        return []
    new = _flat(experiment_dict(absolute_paths(exp)))
    # a key the file leaves to the stream (trainer.k_aux, ...) is resolved again as before: not a change
    keys = sorted(k for k in new if old.get(k) != new[k])
    return [k for k in keys if not k.startswith(_HARMLESS)]
