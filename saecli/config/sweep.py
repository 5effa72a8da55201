"""[sweep]: many dictionaries from one experiment file, trained together where they share a stream.

    [sweep]
    grid = {"trainer.lr" = [1e-4, 3e-4], "dictionary.k" = [16, 32]}     # cartesian product: 4 members
    variants = [{"dictionary.activation" = "relu", "trainer.l1_coefficient" = 2.0}, {}]   # × each variant
    name = "lr{trainer.lr}-k{dictionary.k}"                                # optional folder/name template

Keys are key paths of the experiment (`section.key`); a nested TOML table (`[sweep.grid.trainer]`
with `lr = [...]`) means the same. With both `grid` and `variants`, every grid point is combined with
every variant (a key may not appear in both). The rest of the file is the base experiment; each member
is the base with its overrides, written to `run.output_dir/<member name>/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saecli.config.base import bad, opt


def flatten_keys(table: dict, prefix: str = "", *, leaf_lists: bool = False) -> dict[str, Any]:
    """{"trainer": {"lr": v}} and {"trainer.lr": v} → {"trainer.lr": v}.

    With `leaf_lists` a list ends the walk (grid values); otherwise any non-table value does.
    """
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not (leaf_lists and not value):
            out.update(flatten_keys(value, path + ".", leaf_lists=leaf_lists))
        else:
            out[path] = value
    return out


@dataclass
class SweepConfig:
    grid: dict[str, Any] = opt(
        {}, help='values per key path, e.g. {"trainer.lr" = [1e-4, 3e-4], "dictionary.k" = [16, 32]}'
    )
    variants: list[dict[str, Any]] = opt(
        [], help='explicit tables of overrides, e.g. [{"dictionary.k" = 16}, {"dictionary.k" = 64}]'
    )
    name: str | None = opt(
        None,
        help="member name template, e.g. 'lr{trainer.lr}-k{dictionary.k}' (default: the "
        "keys that vary, as lr=3e-4,k=32)",
    )
    eval: bool = opt(False, help="evaluate each member after training (eval.json; loss recovered in the summary)")

    def validate(self) -> None:
        self.grid = flatten_keys(self.grid, leaf_lists=True)
        for key, values in self.grid.items():
            if not isinstance(values, list):
                raise bad(f"grid.{key}", f"expected a list of values, found {values!r}")
            if not values:
                raise bad(f"grid.{key}", "needs at least one value")
            if key.startswith("sweep.") or key == "sweep":
                raise bad(f"grid.{key}", "a sweep cannot sweep its own [sweep] section")
        self.variants = [flatten_keys(v) for v in self.variants]
        for i, variant in enumerate(self.variants):
            for key in variant:
                if key.startswith("sweep."):
                    raise bad(f"variants[{i}].{key}", "a sweep cannot sweep its own [sweep] section")
                if key in self.grid:
                    raise bad(f"variants[{i}].{key}", "is also in sweep.grid: give each key in one place")
        if not self.grid and not self.variants:
            raise bad("grid", "give sweep.grid (values per key) and/or sweep.variants (tables of overrides)")
