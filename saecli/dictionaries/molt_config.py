"""The [dictionary] table of kind = "molt" (read by `saecli/dictionaries/molt.py`).

Torch-free, beside its module: the config registry imports it to read a file without loading the model code."""

from __future__ import annotations

from dataclasses import dataclass

from saecli.config.base import bad, opt
from saecli.config.dictionary import DictionaryConfig, check_io_hooks, check_output_hook_listed, register_config


@register_config("molt")
@dataclass
class MOLTConfig(DictionaryConfig):
    """Mixture of linear transforms: `rank_counts = {rank: count}` low-rank transforms U_i V_i, sparsely gated.

    d_sae is the number of transforms, Σ counts (give d_sae only to double-check it).
    """

    hook_point_in: str | None = opt(
        None, help="hook point read (default: the first of activations.hook_points), e.g. blocks.3.ln2.hook_normalized"
    )
    hook_point_out: str | None = opt(
        None,
        help="hook point reconstructed (default: the second of activations.hook_points), e.g. blocks.3.hook_mlp_out",
    )
    rank_counts: dict[str, int] | None = opt(
        None, help='how many transforms of each rank, e.g. {"4" = 64, "16" = 16} (TOML keys are strings)'
    )

    def ranks(self) -> list[tuple[int, int]]:
        """[(rank, count)] sorted by rank, keys parsed to int."""
        return sorted((int(r), int(c)) for r, c in (self.rank_counts or {}).items())

    def resolved_d_sae(self, d_model: int) -> int:
        return sum(c for _, c in self.ranks())

    def check_stream_hooks(self, listed: list[str]) -> None:
        super().check_stream_hooks(listed)
        check_output_hook_listed(self, self.hook_point_out, listed)

    def validate(self) -> None:
        if not self.rank_counts:
            raise bad("rank_counts", 'give the transforms as {rank = count}, e.g. rank_counts = {"4" = 64, "16" = 16}')
        for r, c in self.rank_counts.items():
            try:
                rank = int(r)
            except (TypeError, ValueError):
                raise bad(f"rank_counts.{r}", f"a rank must be a positive integer, found {r!r}") from None
            if rank <= 0:
                raise bad(f"rank_counts.{r}", f"a rank must be a positive integer, found {r!r}")
            if int(c) <= 0:
                raise bad(f"rank_counts.{r}", f"a count must be > 0, found {c}")
        total = sum(c for _, c in self.ranks())
        if len({int(r) for r in self.rank_counts}) != len(self.rank_counts):
            raise bad("rank_counts", 'lists a rank twice (e.g. "4" and "04")')
        if self.expansion_factor is not None:
            raise bad("expansion_factor", "a MOLT's size is Σ rank_counts; leave expansion_factor out")
        if self.d_sae is not None and self.d_sae != total:
            raise bad(
                "d_sae", f"is the number of transforms, Σ rank_counts = {total}; found {self.d_sae} (leave it out)"
            )
        self.d_sae = total
        super().validate()
        check_io_hooks(self)
