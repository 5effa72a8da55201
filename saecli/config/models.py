"""[models.<label>]: several models on the same text (model diffing), and the head names that say which.

    [models.base]                      # the first table is the reference: its tokenizer packs the text
    name = "HuggingFaceTB/SmolLM2-135M"
    [models.chat]
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"

Each table takes every [model] key; [models] replaces [model] (giving both is an error). Every model
runs on the same tokens; the stream names its activations "<label>/<hook point>" ("base/blocks.3.
hook_resid_post", "chat/blocks.3.hook_resid_post"), in table order then activations.hook_points order.
Those are the names dictionary keys (e.g. a crosscoder's dictionary.hook_points) refer to.
"""

from __future__ import annotations

import re
from typing import Any

from saecli.errors import ConfigError

HEAD_SEP = "/"
_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")


def head_name(label: str, hook: str) -> str:
    """The stream's name of `hook` in model `label`."""
    return f"{label}{HEAD_SEP}{hook}"


def split_head(name: str) -> tuple[str | None, str]:
    """(label, hook point) of a head name; (None, name) for a one-model hook name."""
    label, sep, hook = name.partition(HEAD_SEP)
    return (label, hook) if sep else (None, name)


def check_models(exp: Any, *, file: str | None = None) -> None:
    """The [models] rules, each error naming its key: not with [model], at least two, plain labels."""
    models = exp.models
    if models is None:
        return
    if exp.model is not None:
        raise ConfigError(
            "give either one [model] or several [models.<label>] tables (model diffing), not both",
            file=file,
            key="models",
        )
    if len(models) < 2:
        raise ConfigError(
            f"model diffing needs at least two [models.<label>] tables, found {len(models)} (one model: use [model])",
            file=file,
            key="models",
        )
    for label in models:
        if not _LABEL.match(label):
            raise ConfigError(
                f"a label names the model in head names ('{label}/blocks.0.hook_resid_post'): use "
                f"letters, digits, '_', '-' or '.', found {label!r}",
                file=file,
                key=f"models.{label}",
            )


def stream_hook_points(exp: Any) -> list[str]:
    """The names of the activations the experiment's stream carries (head names when [models] is given)."""
    hooks = list(exp.activations.hook_points)
    if exp.models is None:
        return hooks
    return [head_name(label, h) for label in exp.models for h in hooks]
