"""`saecli init KIND`: a commented starter experiment that runs as written.

Every key written carries its help text from the config classes (saecli.config.schema), and the result
is parsed before it is returned, so a starter is always a valid experiment.

    text = starter_toml("transcoder", ModelShape("HuggingFaceTB/SmolLM2-135M", n_layers=30, d_model=576, n_heads=9))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saecli.config.schema import keys, toml_value
from saecli.dictionaries.kinds import KIND_MODULES
from saecli.errors import UsageError

KINDS = tuple(KIND_MODULES)
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M"


@dataclass(frozen=True)
class ModelShape:
    """What a starter needs to know of the model (None: unknown, a typical value is written instead)."""

    name: str
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None


def _hook_layer(hook: str) -> int:
    from saecli.lm.hooks import parse_hook

    return parse_hook(hook).layer


def _hooks(kind: str, model: ModelShape, hook: str | None) -> tuple[list[str], dict[str, Any]]:
    """(activations.hook_points, the [dictionary] keys naming hooks) for a kind; `hook` is what it reads."""
    layer = _hook_layer(hook) if hook else (model.n_layers // 2 if model.n_layers else 6)
    if kind == "sae":
        h = hook or f"blocks.{layer}.hook_resid_post"
        return [h], {"hook_point": h}
    if kind in ("transcoder", "molt"):  # SAELens transcoders: what the MLP reads → what it adds to the residual
        h_in, h_out = hook or f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
        return [h_in, h_out], {"hook_point_in": h_in, "hook_point_out": h_out}
    if kind == "lorsa":
        h_in, h_out = hook or f"blocks.{layer}.ln1.hook_normalized", f"blocks.{layer}.hook_attn_out"
        return [h_in, h_out], {"hook_point_in": h_in, "hook_point_out": h_out}
    site = hook.split(".", 2)[2] if hook else "hook_resid_post"
    if kind == "crosscoder":  # the layer read and its neighbours
        last = (model.n_layers or layer + 2) - 1
        layers = sorted({max(layer - 1, 0), layer, min(layer + 1, last)})
        points = [f"blocks.{i}.{site}" for i in layers]
        return points, {"hook_points": points}
    # clt: every layer up to the one given (all layers when the model's depth is known and no hook is given)
    top = layer + 1 if hook or not model.n_layers else model.n_layers
    ins = [f"blocks.{i}.{hook.split('.', 2)[2] if hook else 'ln2.hook_normalized'}" for i in range(top)]
    outs = [f"blocks.{i}.hook_mlp_out" for i in range(top)]
    return ins + outs, {"hook_points_in": ins, "hook_points_out": outs}


def _dictionary_table(kind: str, model: ModelShape, hook_keys: dict[str, Any]) -> dict[str, Any]:
    d = model.d_model
    table: dict[str, Any] = {"kind": kind, **hook_keys, "activation": "topk"}
    if kind == "molt":
        return {**table, "rank_counts": {"4": 64, "16": 16}, "k": 8}
    if kind == "lorsa":
        heads = model.n_heads or 8
        size = 8 * (d or 512)
        return {**table, "d_sae": size - size % heads, "n_qk_heads": heads, "k": 32}
    if kind == "clt":
        return {**table, "expansion_factor": 4.0, "k": 32}
    return {**table, "expansion_factor": 8.0, "k": 32}


def starter_toml(kind: str, model: ModelShape, hook: str | None = None, tokens: int = 10_000_000) -> str:
    """The text of a commented starter experiment for `kind` on `model` (validated before it is returned)."""
    if kind not in KINDS:
        import difflib

        close = difflib.get_close_matches(kind, KINDS, n=1)
        raise UsageError(
            f"unknown dictionary kind {kind!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (kinds: {', '.join(KINDS)})"
        )
    if tokens <= 0:
        raise UsageError(f"--tokens must be > 0, found {tokens}")
    if hook is not None:
        from saecli.lm.hooks import parse_hook

        parse_hook(hook)  # a bad name fails here, naming the valid forms
    points, hook_keys = _hooks(kind, model, hook)
    name = f"{kind}-L{_hook_layer(points[0])}"
    batch = min(4096, tokens)
    small = min(200_000, max(tokens // 10, batch))
    sections: dict[str, dict[str, Any]] = {
        "run": {"name": name, "output_dir": f"runs/{name}"},
        "model": {"name": model.name, "device": "auto"},
        "dataset": {"path": "builtin:python-docs"},
        "activations": {
            "hook_points": points,
            "context_size": 256,
            "batch_size": batch,
            "shuffle_buffer_tokens": max(batch, min(262_144, tokens)),
        },
        "dictionary": _dictionary_table(kind, model, hook_keys),
        "trainer": {"total_training_tokens": tokens},  # lr: the default formula, recorded in config.toml
        "eval": {"total_eval_tokens": small},
        "analyze": {"total_analyzing_tokens": small},
        "store": {"backend": "sqlite", "path": "saecli.db"},
    }
    text = _render(kind, model, sections)
    _check(text)
    return text


def _render(kind: str, model: ModelShape, sections: dict[str, dict[str, Any]]) -> str:
    import dataclasses

    from saecli.config.dictionary import DICTIONARY_CONFIGS, known_kinds

    known_kinds()  # registers every kind's config class
    helps = {k.path: k.help for k in keys()}
    helps.update(
        {f"dictionary.{f.name}": f.metadata.get("help", "") for f in dataclasses.fields(DICTIONARY_CONFIGS[kind])}
    )
    known = model.n_layers is not None
    lines = [
        f"# A {kind} on {model.name}, written by `saecli init {kind}`: it runs as written.",
        "#",
        "#     saecli train {this file}      then  saecli eval / saecli analyze {run folder}",
        "#",
        "# Every key is listed with its default in docs/config.md (`saecli schema` for editors); "
        "`--set section.key=value`",
        "# overrides any of them. `saecli hooks {this file}` lists the model's hook points."
        + ("" if known else " (The layer below is a guess: the model's depth was not readable offline.)"),
        "",
    ]
    for section, table in sections.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            help_text = helps.get(f"{section}.{key}", "")
            if section == "dataset" and key == "path":
                help_text = (
                    "offline text to start with; a hub dataset name (e.g. 'HuggingFaceFW/fineweb') for real runs"
                )
            if help_text:
                lines.append(f"# {help_text}")
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _check(text: str) -> None:
    from saecli.config.load import experiment_from_dict, tomllib

    experiment_from_dict(tomllib.loads(text))
