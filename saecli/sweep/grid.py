"""Sweep files → members: the base experiment, the [sweep] grid/variants, one validated Experiment each.

    plan = load_sweep("experiments/tiny/sweep.toml")
    for m in plan.members:
        print(m.name, m.folder, m.overrides)        # lr=3e-4,k=32  runs/tiny/sweep/lr=3e-4,k=32  {...}

Each member is the base file's TOML with its overrides set at their key paths, then parsed by the
normal config path, so every check `saecli train` makes applies (an error names the member and the
key). A member's `run.output_dir` is `<base run.output_dir>/<member name>` and its `run.name` is
`<base run.name>/<member name>`; its resolved config.toml carries no [sweep] section.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saecli.config.base import parse
from saecli.config.sweep import SweepConfig
from saecli.errors import ConfigError

# characters kept in a member name (it is a folder name); anything else becomes "_"
_UNSAFE = re.compile(r"[^A-Za-z0-9=,.+\-_]")
_FIELD = re.compile(r"\{([^{}]+)\}")


@dataclass
class SweepMember:
    index: int
    name: str
    overrides: dict[str, Any]  # key path → value (grid point merged with its variant)
    exp: Any  # the validated Experiment
    folder: Path

    def value(self, key: str) -> Any:
        return key_value(self.exp, key)


@dataclass
class SweepPlan:
    base: dict  # the base experiment's TOML (after --set), without [sweep]
    sweep: SweepConfig
    members: list[SweepMember]
    output_dir: Path  # the sweep's folder (the base run.output_dir)
    source_file: str | None = None
    varying: list[str] = field(default_factory=list)  # key paths whose value differs between members


def format_value(value: Any) -> str:
    """A short readable form for names: 3e-4, 0.001, 32, true, relu, 8+16 (lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if 1e-3 <= abs(value) < 1e4:
            return f"{value:.6g}"
        mantissa, exponent = f"{value:.6e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}:{format_value(v)}" for k, v in value.items())
    return str(value)


def key_value(obj: Any, key: str) -> Any:
    """The value at a key path of a parsed experiment (None where a section is absent)."""
    from saecli.config.base import aliases

    for part in key.split("."):
        if obj is None:
            return None
        if isinstance(obj, dict):
            obj = obj.get(part)
        else:  # a field, or its older name (`sae.k` reads `dictionary.k`)
            obj = getattr(obj, aliases(type(obj)).get(part, part), None) if dataclasses.is_dataclass(obj) else None
    return obj


def _set_path(data: dict, key: str, value: Any, where: str) -> None:
    from saecli.config.load import as_spelled

    node = data
    parts = as_spelled(data, key.split("."))  # `sae.k` or `dictionary.k`: the table the file has
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set `{key}`: `{part}` is not a table", key=where)
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def expand(sweep: SweepConfig) -> list[dict[str, Any]]:
    """The members' overrides: the grid's cartesian product, each combined with each variant."""
    keys = list(sweep.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))]
    variants = sweep.variants or [{}]
    return [{**point, **variant} for point in points for variant in variants]


def short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each key path, or the whole path where two keys share their last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _sanitize(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "member"


def member_names(
    overrides: list[dict[str, Any]], base: dict, template: str | None, resolved: list[Any]
) -> tuple[list[str], list[str]]:
    """(names, varying keys). Default names list the keys whose values differ, as `lr=3e-4,k=32`."""
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    values = [[key_value(exp, k) for exp in resolved] for k in keys]
    varying = [k for k, vs in zip(keys, values) if len({repr(v) for v in vs}) > 1]
    if template is not None:
        names = []
        for i, exp in enumerate(resolved):

            def field_value(match: re.Match, i: int = i, exp: Any = exp) -> str:
                key = match.group(1).strip()
                if key == "index":
                    return str(i)
                if key in overrides[i]:
                    return format_value(overrides[i][key])
                value = key_value(exp, key)
                if value is None and key_value(base, key) is None:
                    raise ConfigError(
                        f"the name template names `{key}`, which is not a key path of the experiment (or is unset)",
                        key="sweep.name",
                    )
                return format_value(value)

            names.append(_sanitize(_FIELD.sub(field_value, template)))
        return names, varying
    shown = varying or keys
    short = short_names(shown)
    names = []
    for i, o in enumerate(overrides):
        parts = [f"{short[k]}={format_value(o.get(k, key_value(resolved[i], k)))}" for k in shown]
        names.append(_sanitize(",".join(parts)) if parts else f"member{i}")
    return names, varying


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepPlan:
    """Read a sweep file (base experiment + [sweep]) and build every member, validated."""
    from saecli.config.load import apply_overrides, experiment_from_dict, read_toml

    data = apply_overrides(read_toml(path), overrides or [])
    file = str(path)
    if "sweep" not in data:
        experiment_from_dict(data, file=file)  # the base's own errors first
        raise ConfigError(
            "this file has no [sweep] section: add one with sweep.grid and/or sweep.variants "
            "(or use `saecli train` for a single run)",
            file=file,
        )
    try:
        sweep = parse(SweepConfig, data.pop("sweep"), key="sweep")
    except ConfigError as exc:
        raise ConfigError(_bare(exc), file=file, key=exc.key) from None
    try:  # the base whole, before the grid hides a bad value under a key it overrides (e.g. --set sae.k=-9)
        experiment_from_dict(data, file=file)
    except ConfigError as exc:
        raise ConfigError(
            f"the base experiment (the file without [sweep], after --set): {_bare(exc)}", file=file, key=exc.key
        ) from None
    return plan_from_dict(data, sweep, file=file)


def plan_from_dict(base: dict, sweep: SweepConfig, *, file: str | None = None) -> SweepPlan:
    """Members of a sweep from the base experiment's TOML dict (no [sweep]) and a parsed SweepConfig."""
    base = copy.deepcopy(base)
    base.pop("sweep", None)
    run = base.setdefault("run", {})
    out = Path(str(run.get("output_dir", "runs/run")))
    base_name = str(run.get("name", "run"))
    all_overrides = expand(sweep)
    resolved, tables = [], []
    for i, over in enumerate(all_overrides):
        table = copy.deepcopy(base)
        for key, value in over.items():
            _set_path(table, key, value, where=f"sweep member {i}")
        tables.append(table)
        resolved.append(_parse_member(table, f"#{i} ({_describe(over)})", file))
    names, varying = member_names(all_overrides, base, sweep.name, resolved)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(
                f"members {seen[name]} ({_describe(all_overrides[seen[name]])}) and {i} "
                f"({_describe(all_overrides[i])}) both get the name {name!r}: set sweep.name to a "
                "template naming the keys that tell them apart, e.g. 'lr{trainer.lr}-k{dictionary.k}'",
                file=file,
                key="sweep.name",
            )
        seen[name] = i
    members = []
    for i, (name, table, over) in enumerate(zip(names, tables, all_overrides)):
        folder = out / name
        table["run"] = {**table.get("run", {}), "output_dir": str(folder), "name": f"{base_name}/{name}"}
        exp = _parse_member(table, f"`{name}`", file)
        members.append(SweepMember(index=i, name=name, overrides=over, exp=exp, folder=folder))
    return SweepPlan(base=base, sweep=sweep, members=members, output_dir=out, source_file=file, varying=varying)


def _parse_member(table: dict, label: str, file: str | None) -> Any:
    from saecli.config.load import experiment_from_dict

    try:
        exp = experiment_from_dict(table)
    except ConfigError as exc:
        raise ConfigError(f"sweep member {label}: {_bare(exc)}", file=file, key=exc.key) from None
    exp.source_file = file  # relative paths (store.path) resolve against the sweep file, as for `train`
    return exp


def _bare(exc: ConfigError) -> str:
    """The message of a ConfigError without its `file: key ...:` prefix."""
    text = str(exc)
    prefix = [str(exc.file)] if exc.file else []
    if exc.key:
        prefix.append(f"key `{exc.key}`")
    head = ": ".join(prefix) + ": " if prefix else ""
    return text[len(head) :] if head and text.startswith(head) else text


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "the base experiment"
