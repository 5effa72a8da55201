"""`saecli schema`: the JSON Schema of an experiment file, generated from the config classes."""

from __future__ import annotations

import typer


def schema() -> None:
    """Print the JSON Schema (draft-07) of an experiment file: every section and key with its type,
    default, help text and allowed values; [sae] keys follow its `kind`.

    Editors complete and check keys with it: save it and point the TOML plugin at it (Even Better TOML /
    taplo: a `#:schema ./experiment.schema.json` first line, or its `evenBetterToml.schema.associations`
    setting). docs/experiment.schema.json is the same file; docs/config.md lists the keys as a table.

    Examples:

        saecli schema > experiment.schema.json

        saecli schema | python -c "import json, sys; print(sorted(json.load(sys.stdin)['properties']))"
    """
    import json

    from saecli import ui
    from saecli.config.schema import json_schema

    ui.plain_lines([json.dumps(json_schema(), indent=2)])


def register(app: typer.Typer) -> None:
    app.command("schema")(schema)
