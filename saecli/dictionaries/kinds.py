"""The dictionary kinds: kind name → the module of its `Dictionary` class. A new kind adds one line here.

Each kind's config dataclass lives beside its module, in `<module>_config.py` (registered with
`saecli.config.dictionary.register_config`). Those files import no torch, so reading an experiment file
(which imports every kind's config to read its [dictionary] table) stays fast.
"""

from __future__ import annotations

KIND_MODULES: dict[str, str] = {
    "sae": "saecli.dictionaries.sae",
    "transcoder": "saecli.dictionaries.transcoder",
    "crosscoder": "saecli.dictionaries.crosscoder",
    "clt": "saecli.dictionaries.clt",
    "lorsa": "saecli.dictionaries.lorsa",
    "molt": "saecli.dictionaries.molt",
}


def config_module(kind: str) -> str:
    """The module that registers `kind`'s config class."""
    return f"{KIND_MODULES[kind]}_config"
