"""Read an experiment file: TOML → dict → `--set` overrides → validated `Experiment`; write it back."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, overload

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from saecli.config.base import aliases, parse, to_dict
from saecli.config.defaults import resolve
from saecli.config.experiment import Experiment
from saecli.errors import ConfigError, UsageError

RESOLVED_NAME = "config.toml"


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        candidate = path / RESOLVED_NAME
        if not candidate.exists():
            raise UsageError(f"{path} is a folder without a {RESOLVED_NAME}: give an experiment file or a run folder")
        path = candidate
    if not path.exists():
        raise UsageError(f"experiment file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read experiment file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not a text (UTF-8) file: byte {exc.start} cannot be decoded; is this the experiment file?", file=str(path)
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", file=str(path)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (['section', 'key'], value typed as in TOML; bare words become strings)."""
    if "=" not in text:
        raise UsageError(f"--set expects section.key=value, found {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UsageError(f"--set expects section.key=value, found {text!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def as_spelled(data: dict, parts: list[str]) -> list[str]:
    """A key path with its section named as `data` names it: `sae.k` and `dictionary.k` both set the
    table a file has, whichever of its two names the file uses (the canonical one when it has neither)."""
    if not parts:
        return parts
    names = aliases(Experiment)
    section = names.get(parts[0], parts[0])
    spellings = [section, *(old for old, new in names.items() if new == section)]
    present = [name for name in spellings if name in data]
    return [present[0] if present else section, *parts[1:]]


def dictionary_table(data: dict) -> dict | None:
    """The [dictionary] table of experiment data (a file, a config.toml, a store record's cfg) under
    whichever of its names the data uses (`[sae]` in files and records written before the rename)."""
    for name in ("dictionary", *(old for old, new in aliases(Experiment).items() if new == "dictionary")):
        if isinstance(data.get(name), dict):
            return data[name]
    return None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides or []:
        parts, value = parse_override(text)
        parts = as_spelled(data, parts)
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UsageError(f"--set {text}: `{part}` is not a table")
            node = nxt
        node[parts[-1]] = value
    return data


def experiment_from_dict(data: dict, *, file: str | None = None) -> Experiment:
    """Parse, check the rules between sections, and write in the defaults the file decides
    (`saecli.config.defaults.resolve`): every command reads an experiment through here."""
    try:
        exp = parse(Experiment, data)
    except ConfigError as exc:
        if file and exc.file is None:
            raise ConfigError(_message(exc), file=file, key=exc.key) from None
        raise
    check_cross_keys(exp, file=file, table=as_spelled(data, ["dictionary"])[0])
    exp = resolve(exp)
    exp.source_file = file
    return exp


def check_cross_keys(exp: Experiment, *, file: str | None = None, table: str = "dictionary") -> None:
    """Rules between sections, checked when the file is loaded (not after minutes of work): each names both
    keys (the dictionary's under `table`, the name the file gives it)."""
    from saecli.config.models import check_models, stream_hook_points

    check_models(exp, file=file)
    d = exp.dictionary
    if d is not None and exp.activations is not None:
        try:
            d.check_stream_hooks(stream_hook_points(exp))
        except ConfigError as exc:  # the kind names its keys relative to the table: name them as the file does
            key = exc.key or ""
            message = _message(exc)
            message = message.replace("this table", f"[{table}]").replace("set this key", f"set {table}.{key}")
            raise ConfigError(
                message, file=file, key=key if key.startswith("activations.") else f"{table}.{key}"
            ) from None


def _message(exc: ConfigError) -> str:
    text = str(exc)
    if exc.key and text.startswith(f"key `{exc.key}`: "):
        return text[len(f"key `{exc.key}`: ") :]
    return text


PATHS_RULE = (
    "Relative paths in an experiment file or a run's config.toml (model.name when it is a local folder, "
    "activations.cache_dir, store.path, run.output_dir, ...) are taken from the current directory; "
    "a run's config.toml is written with absolute paths, and a run folder given on the command line is "
    "the run (its outputs go there whatever run.output_dir says), so it works from any directory and "
    "after being copied."
)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """The one entry point commands use: a file (or a run folder with config.toml) plus --set overrides.

    Relative paths become absolute against the current directory (see `PATHS_RULE`); given a run folder,
    the folder itself is the run: run.output_dir points at it and no other dictionary folder is read.
    """
    data = read_toml(path)
    data = apply_overrides(data, overrides or [])
    run_folder = Path(path).is_dir()
    file = str(Path(path) / RESOLVED_NAME) if run_folder else str(path)
    exp = absolute_paths(experiment_from_dict(data, file=file))
    if run_folder:
        exp = as_run_folder(exp, Path(path))
    return exp


def as_run_folder(exp: Experiment, folder: Path) -> Experiment:
    """The experiment of a run folder: every output in the folder, whatever its config.toml names."""
    folder = Path(os.path.abspath(folder))
    exp.run = dataclasses.replace(exp.run, output_dir=str(folder))
    exp.eval = dataclasses.replace(exp.eval, sae_path=None)
    exp.analyze = dataclasses.replace(exp.analyze, sae_path=None)
    exp.dashboard = dataclasses.replace(exp.dashboard, output_dir=None)
    return exp


@overload
def _absolute(value: str, *, only_existing: bool = False) -> str: ...
@overload
def _absolute(value: None, *, only_existing: bool = False) -> None: ...
def _absolute(value: str | None, *, only_existing: bool = False) -> str | None:
    """`value` as an absolute path (against the current directory); hub names and `builtin:` stay as they are."""
    if value is None or ":" in value and not Path(value).exists():
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    if only_existing and not path.exists():
        return value
    return os.path.abspath(path)  # symlinks kept: a `current` model link stays a link


def absolute_paths(exp: Experiment) -> Experiment:
    """A copy of `exp` whose path keys are absolute (model.name and dataset.path only when they exist locally)."""
    exp = copy.copy(exp)
    exp.run = dataclasses.replace(exp.run, output_dir=_absolute(exp.run.output_dir))
    if exp.model is not None:
        exp.model = dataclasses.replace(exp.model, name=_absolute(exp.model.name, only_existing=True))
    if exp.models is not None:
        exp.models = {
            label: dataclasses.replace(m, name=_absolute(m.name, only_existing=True)) for label, m in exp.models.items()
        }
    exp.dataset = dataclasses.replace(exp.dataset, path=_absolute(exp.dataset.path, only_existing=True))
    if exp.activations is not None:
        exp.activations = dataclasses.replace(exp.activations, cache_dir=_absolute(exp.activations.cache_dir))
    if exp.store.backend == "sqlite":
        exp.store = dataclasses.replace(exp.store, path=_absolute(exp.store.path))
    exp.eval = dataclasses.replace(
        exp.eval, sae_path=_absolute(exp.eval.sae_path), cache_dir=_absolute(exp.eval.cache_dir)
    )
    exp.analyze = dataclasses.replace(exp.analyze, sae_path=_absolute(exp.analyze.sae_path))
    exp.dashboard = dataclasses.replace(exp.dashboard, output_dir=_absolute(exp.dashboard.output_dir))
    exp.wandb = dataclasses.replace(exp.wandb, dir=_absolute(exp.wandb.dir))
    return exp


def experiment_dict(exp: Any) -> dict:
    """The resolved experiment as plain TOML-able data: what config.toml holds, and the one `cfg` shape
    every command records in the store for a run (train, eval and analyze alike)."""
    data = to_dict(exp)
    data.pop("source_file", None)
    return data


def experiment_to_toml(exp: Any) -> str:
    return tomli_w.dumps(experiment_dict(exp))


def write_resolved(exp: Any, folder: str | Path, name: str = RESOLVED_NAME) -> Path:
    """Write the resolved config beside a run's outputs so the run can be repeated from its folder alone."""
    from saecli.fsio import write_text

    path = Path(folder) / name
    write_text(path, experiment_to_toml(absolute_paths(exp)))
    return path
