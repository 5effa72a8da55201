"""TOML tables → typed dataclasses, with errors that name the key path.

Every config section is a plain dataclass. `parse(cls, table, key=...)` walks the dataclass's type
hints and converts/validates each value; an unknown key gets a "did you mean" suggestion; a class may
define `validate(self)` for cross-field checks (raise `ConfigError` with `key=` relative to the section,
or use `bad(...)`). Fields declared with `opt(..., stream=True)` change the activation stream (which
text, which model, which hook points...): the sweep groups members by these.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from saecli.errors import ConfigError

_MISSING = dataclasses.MISSING


def opt(
    default: Any = _MISSING,
    *,
    help: str = "",
    stream: bool = False,
    factory: Any = _MISSING,
    aliases: tuple[str, ...] = (),
):
    """A dataclass field with help text, the `stream` flag (True: changes the data stream) and `aliases`:
    older names a file may still use for this key (giving two names of one key is an error)."""
    meta = {"help": help, "stream": stream, "aliases": aliases}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def bad(key: str, message: str) -> ConfigError:
    """Build a ConfigError for a key relative to the section being validated."""
    return ConfigError(message, key=key)


def check_signs(section: Any, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Raise `bad(key, ...)` for the first of `positive` that is <= 0 or of `non_negative` that is < 0
    (unset optional keys, None, pass)."""
    for key in positive:
        value = getattr(section, key)
        if value is not None and value <= 0:
            raise bad(key, f"must be > 0, found {value}")
    for key in non_negative:
        value = getattr(section, key)
        if value is not None and value < 0:
            raise bad(key, f"must be >= 0, found {value}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "nothing"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        kv = get_args(tp)
        return f"a table of {_type_name(kv[1])}" if kv else "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _found(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(value), type(value).__name__
    )
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert one TOML value to the annotated type, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return convert(value, arms[0], key)
        errors = []
        # exact-type arms first so that 3 stays an int in `int | float`
        for arm in sorted(arms, key=lambda a: 0 if _exact(value, a) else 1):
            try:
                return convert(value, arm, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"expected {_type_name(tp)}, found {_found(value)}", key=key)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and type(value) is type(choices[list(choices).index(value)]):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
        raise ConfigError(f"expected one of {_type_name(tp)}, found {_found(value)}{hint}", key=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            (arg,) = get_args(tp) or (Any,)
            return [convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(args) != len(value):
                raise ConfigError(f"expected a list of {len(args)} values, found {_found(value)}", key=key)
            return tuple(convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict:
        if isinstance(value, dict):
            kt, vt = get_args(tp) or (str, Any)
            out = {}
            for k, v in value.items():
                ck = convert(k, kt, key) if kt is not str else k
                out[ck] = convert(v, vt, f"{key}.{k}")
            return out
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse(tp, value, key=key)
    else:  # pragma: no cover - a programming error in a schema
        raise TypeError(f"unsupported config type {tp!r} at {key}")
    raise ConfigError(f"expected {_type_name(tp)}, found {_found(value)}", key=key)


def _exact(value: Any, tp: Any) -> bool:
    if tp in (int, float, str, bool):
        return type(value) is tp
    return False


def parse(cls: type, table: Any, *, key: str = "") -> Any:
    """Parse a TOML table into dataclass `cls` (dispatching on `cls.dispatch(table)` if defined)."""
    if not isinstance(table, dict):
        raise ConfigError(f"expected a table, found {_found(table)}", key=key or None)
    dispatch = getattr(cls, "dispatch", None)
    if dispatch is not None:
        cls = dispatch(table, key)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    old_names = aliases(cls)
    kwargs = {}
    for written, value in table.items():
        sub = f"{key}.{written}" if key else written  # errors name the key as the file spells it
        name = old_names.get(written, written)
        if name not in fields:
            close = difflib.get_close_matches(written, [*fields, *old_names], n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean `{close[0]}`?"
            else:
                hint = f" (known keys here: {', '.join(sorted(fields))})"
            raise ConfigError(f"unknown key `{sub}`{hint}", key=None)
        if written != name and name in table:
            both = f"{key}.{name}` and `{sub}" if key else f"[{name}]` and `[{written}]"
            raise ConfigError(f"`{both}` are the same table ({written} is its older name): give one of them", key=None)
        kwargs[name] = convert(value, hints[name], sub)
    for name, f in fields.items():
        if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:
            sub = f"{key}.{name}" if key else name
            raise ConfigError(f"missing required key ({_type_name(hints[name])})", key=sub)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            if exc.key is not None and key and not exc.key.startswith(key + "."):
                raise ConfigError(_strip_prefix(exc), key=f"{key}.{exc.key}") from None
            raise
    return obj


def aliases(cls: type) -> dict[str, str]:
    """{older name: field name} of the fields of dataclass `cls` declared with `opt(aliases=...)`."""
    return {alias: f.name for f in dataclasses.fields(cls) for alias in f.metadata.get("aliases", ())}


def _strip_prefix(exc: ConfigError) -> str:
    text = str(exc)
    marker = f"key `{exc.key}`: "
    return text.split(marker, 1)[1] if marker in text else text


def to_dict(obj: Any) -> Any:
    """Dataclass → plain TOML-able dict (None values dropped: TOML has no null)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = to_dict(getattr(obj, f.name))
            if v is not None:
                out[f.name] = v
        return out
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def stream_keys(cls: type, prefix: str = "") -> set[str]:
    """Key paths of all fields flagged `stream=True` (recursing into nested dataclasses)."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if f.metadata.get("stream"):
            out.add(path)
        tp = hints[f.name]
        if get_origin(tp) in (Union, types.UnionType):
            arms = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
            tp = arms[0] if arms else tp
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out |= stream_keys(tp, path + ".")
    return out
