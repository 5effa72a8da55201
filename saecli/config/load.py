"""Read an experiment file: TOML → dict → `--set` overrides → validated `Experiment`; write it back."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from saecli.config.base import parse, to_dict
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


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UsageError(f"--set {text}: `{part}` is not a table")
            node = nxt
        node[parts[-1]] = value
    return data


def experiment_from_dict(data: dict, *, file: str | None = None) -> Experiment:
    try:
        exp = parse(Experiment, data)
    except ConfigError as exc:
        if file and exc.file is None:
            raise ConfigError(_message(exc), file=file, key=exc.key) from None
        raise
    exp.source_file = file
    return exp


def _message(exc: ConfigError) -> str:
    text = str(exc)
    if exc.key and text.startswith(f"key `{exc.key}`: "):
        return text[len(f"key `{exc.key}`: "):]
    return text


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """The one entry point commands use: a file (or a run folder with config.toml) plus --set overrides."""
    data = read_toml(path)
    data = apply_overrides(data, overrides or [])
    file = str(Path(path) / RESOLVED_NAME) if Path(path).is_dir() else str(path)
    return experiment_from_dict(data, file=file)


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
    write_text(path, experiment_to_toml(exp))
    return path
