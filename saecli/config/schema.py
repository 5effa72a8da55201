"""Every experiment key, read from the config dataclasses themselves: the JSON Schema (`saecli schema`),
the key reference (docs/config.md), `--set` completion and `saecli init` comments all come from here,
so none of them can drift from what `load_experiment` accepts.

    keys()          [Key(path="trainer.lr", type="a number", default=0.0004, help=..., kinds=None), ...]
    json_schema()   a JSON Schema (draft-07) of a whole experiment file; `[dictionary]` switches on `kind`
    markdown()      docs/config.md
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from saecli.config.base import _type_name, aliases
from saecli.config.dictionary import DICTIONARY_CONFIGS, DictionaryConfig, known_kinds
from saecli.config.experiment import Experiment

SCHEMA_ID = "https://saecli.dev/experiment.schema.json"
_UNSET = object()


@dataclass(frozen=True)
class Key:
    """One settable key: its dotted path, type in words, default (`None`: unset), help, and for [dictionary]
    keys the kinds that have it (None: every kind)."""

    path: str
    type: str
    default: Any
    help: str
    kinds: tuple[str, ...] | None = None
    choices: tuple[Any, ...] | None = None


def _is_key(f: dataclasses.Field) -> bool:
    """Fields declared with `opt(...)` are TOML keys; plain fields (Experiment.source_file) are not."""
    return f.init and "help" in f.metadata


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return _UNSET
    from saecli.config.base import to_dict

    return to_dict(value)


def _section_class(tp: Any) -> type | None:
    """The dataclass behind a section annotation (`ModelConfig | None` → ModelConfig)."""
    if get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return arms[0] if arms else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


LABEL = "<label>"  # a table of sections ([models.<label>]) is documented as the section `models.<label>`


def _table_class(tp: Any) -> type | None:
    """The dataclass of a table of sections (`dict[str, ModelConfig] | None` → ModelConfig)."""
    arms = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    for arm in arms:
        if get_origin(arm) is dict and dataclasses.is_dataclass(get_args(arm)[1]):
            return get_args(arm)[1]
    return None


def sections() -> list[tuple[str, type, str]]:
    """(name, dataclass, description) of every [section], in file order."""
    hints = typing.get_type_hints(Experiment)
    out = []
    for f in dataclasses.fields(Experiment):
        cls = _section_class(hints[f.name]) if _is_key(f) else None
        table = _table_class(hints[f.name]) if _is_key(f) and cls is None else None
        if table is not None:
            out.append((f"{f.name}.{LABEL}", table, f.metadata.get("help", "")))
            continue
        if cls is None:
            continue
        own = cls.__doc__ or ""
        if own.startswith(cls.__name__ + "("):  # the signature dataclasses writes when there is no docstring
            own = ""
        doc = (own or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        first = doc[0].split("]: ", 1)[-1].rstrip(".") if doc else ""  # "[model]: which model ..." → "which model ..."
        out.append((f.name, cls, f.metadata.get("help") or first))
    return out


def _choices(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (Union, types.UnionType):
        lits = [a for a in get_args(tp) if get_origin(a) is Literal]
        if len(lits) == 1 and all(a is type(None) or a is lits[0] for a in get_args(tp)):
            return get_args(lits[0])
    return None


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if _is_key(f)]


def keys() -> list[Key]:
    """Every key of an experiment file, section by section; [dictionary] lists the union over the kinds."""
    out: list[Key] = []
    for name, cls, _ in sections():
        if cls is DictionaryConfig:
            out += _dictionary_keys(name)
            continue
        for f, tp in _fields(cls):
            d = _default(f)
            out.append(
                Key(
                    f"{name}.{f.name}",
                    _type_name(tp),
                    None if d is _UNSET else d,
                    f.metadata.get("help", ""),
                    choices=_choices(tp),
                )
            )
    return out


def _dictionary_keys(section: str) -> list[Key]:
    kinds = known_kinds()
    seen: dict[str, tuple[dataclasses.Field, Any, list[str]]] = {}
    for kind in kinds:
        for f, tp in _fields(DICTIONARY_CONFIGS[kind]):
            seen.setdefault(f.name, (f, tp, []))[2].append(kind)
    out = []
    for name, (f, tp, having) in seen.items():
        d = _default(f)
        choices: tuple[Any, ...] | None
        help_text = f.metadata.get("help", "")
        if name == "kind":
            help_text, choices = "dictionary kind (picks the keys below)", tuple(kinds)
        else:
            choices = _choices(tp)
        out.append(
            Key(
                f"{section}.{name}",
                _type_name(tp),
                None if d is _UNSET else d,
                help_text,
                None if len(having) == len(kinds) else tuple(having),
                choices,
            )
        )
    return out


# ------------------------------------------------------------------------------------------ JSON Schema
def _type_schema(tp: Any) -> dict:
    origin = get_origin(tp)
    if tp is Any:
        return {}
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]  # TOML has no null: "unset" = leave it out
        if len(arms) == 1:
            return _type_schema(arms[0])
        return {"anyOf": [_type_schema(a) for a in arms]}
    if origin is Literal:
        values = list(get_args(tp))
        kinds = {type(v) for v in values}
        base = _type_schema(kinds.pop()) if len(kinds) == 1 else {}
        return {**base, "enum": values}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if origin is list:
        (arg,) = get_args(tp) or (Any,)
        return {"type": "array", "items": _type_schema(arg)}
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _type_schema(args[0])}
        return {"type": "array", "items": [_type_schema(a) for a in args], "minItems": len(args), "maxItems": len(args)}
    if origin is dict:
        _, vt = get_args(tp) or (str, Any)
        return {"type": "object", "additionalProperties": _type_schema(vt)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _object_schema(tp)
    raise TypeError(f"no JSON Schema for config type {tp!r}")  # pragma: no cover - a schema bug


def _object_schema(cls: type, *, skip: tuple[str, ...] = ()) -> dict:
    props: dict[str, Any] = {}
    required = []
    for f, tp in _fields(cls):
        if f.name in skip:
            continue
        prop = _type_schema(tp)
        if f.metadata.get("help"):
            prop["description"] = f.metadata["help"]
        d = _default(f)
        if d is _UNSET:
            required.append(f.name)
        elif d is not None:
            prop["default"] = d
        props[f.name] = prop
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def _dictionary_schema() -> dict:
    """[dictionary]: `kind` picks the dataclass, so each kind's keys apply only under its own `kind`."""
    kinds = known_kinds()
    branches = []
    for kind in kinds:
        then = _object_schema(DICTIONARY_CONFIGS[kind])
        then["properties"]["kind"] = {"const": kind}
        cond: dict[str, Any] = {"properties": {"kind": {"const": kind}}}
        if kind != "sae":  # no `kind` means sae
            cond["required"] = ["kind"]
        branches.append({"if": cond, "then": then})
    return {
        "type": "object",
        "description": "the dictionary to train; `kind` picks its keys",
        "properties": {"kind": {"type": "string", "enum": kinds, "default": "sae", "description": "dictionary kind"}},
        "allOf": branches,
    }


def json_schema() -> dict:
    """A JSON Schema (draft-07) of an experiment file: types, defaults, help texts and choices of every key."""
    props = {}
    one_of_two_names = []
    for name, cls, description in sections():
        if name.endswith("." + LABEL):  # a table of sections: any label, each a section of its own
            props[name.split(".")[0]] = {
                "type": "object",
                "additionalProperties": _object_schema(cls),
                "description": description,
            }
            continue
        props[name] = _dictionary_schema() if cls is DictionaryConfig else _object_schema(cls)
        props[name]["description"] = description
        for old in _older_names(name):  # still read: the same table, never both
            props[old] = {"$ref": f"#/properties/{name}"}
            one_of_two_names.append({"not": {"required": [name, old]}})
    out = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": SCHEMA_ID,
        "title": "saecli experiment",
        "description": "An experiment file for saecli (TOML).",
        "type": "object",
        "properties": props,
        "additionalProperties": False,
    }
    if one_of_two_names:
        out["allOf"] = one_of_two_names
    return out


def _older_names(section: str) -> list[str]:
    """The older names an experiment file may still give a section (`[sae]` for `[dictionary]`)."""
    return [old for old, name in aliases(Experiment).items() if name == section]


# ------------------------------------------------------------------------------------------ docs/config.md
def toml_value(value: Any) -> str:
    """A value as written on one TOML line (`0.0004`, `"topk"`, `[0.9, 0.999]`, `{"4" = 64}`)."""
    import json

    import tomli_w

    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[4:]


def markdown() -> str:
    """docs/config.md: every key with its type, default and help, section by section."""
    lines = [
        "# Experiment keys",
        "",
        "<!-- generated by scripts/make_docs.sh from saecli/config/ (saecli.config.schema); do not edit -->",
        "",
        "Every key an experiment file may set, with its default. `--set section.key=value` overrides any of",
        "them; `saecli schema` prints the same as a JSON Schema (point your editor's TOML plugin at it),",
        "and `saecli init KIND` writes a commented starter.",
        "",
    ]
    by_section: dict[str, list[Key]] = {}
    for key in keys():
        by_section.setdefault(key.path.rsplit(".", 1)[0], []).append(key)
    for name, _, description in sections():
        lines += [f"## [{name}]", "", (description[0].upper() + description[1:] + ".") if description else ""]
        lines += [
            f"(`[{old}]`, its older name, is read too; a file gives one of the two.)" for old in _older_names(name)
        ]
        lines += [""]
        lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
        for key in by_section.get(name, []):
            default = (
                "*(required)*"
                if key.default is None and key.help and _required(key)
                else ("*(unset)*" if key.default is None else f"`{toml_value(key.default)}`")
            )
            text = key.help
            if key.kinds:
                text = f"({', '.join(key.kinds)}) {text}"
            lines.append(f"| `{key.path.rsplit('.', 1)[1]}` | {_cell(key.type)} | {_cell(default)} | {_cell(text)} |")
        lines.append("")
    return "\n".join(lines)


def _required(key: Key) -> bool:
    section, name = key.path.rsplit(".", 1)
    for sec, cls, _ in sections():
        if sec == section and cls is not DictionaryConfig:
            return any(f.name == name and _default(f) is _UNSET for f, _ in _fields(cls))
    return False


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def generated_docs() -> dict[str, str]:
    """{repository path: text} of the files generated from the config classes (scripts/make_docs.sh)."""
    import json

    return {"docs/config.md": markdown(), "docs/experiment.schema.json": json.dumps(json_schema(), indent=2) + "\n"}


if __name__ == "__main__":  # python -m saecli.config.schema [--markdown]
    import json

    if "--markdown" in sys.argv:
        sys.stdout.write(markdown())
    else:
        sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
