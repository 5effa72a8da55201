"""The one interface between where activations come from (a cache or a live model) and the loops.

A stream is an iterator of `Batch` with an exact, resumable position: `state_dict()` taken after the
n-th batch and given to `load_state_dict()` of a freshly built stream of the same config makes it yield
batch n+1, n+2, ... exactly as the original would have. Data-parallel ranks build the stream with
their `rank`/`world_size` and each gets a disjoint part.

Every stream class (data/reader.py `CacheStream`, data/live.py `LiveStream`, data/synthetic.py
`SyntheticStream`) has each member below, so callers use plain attribute access; tests/test_streams.py
checks them with `isinstance(stream, ActivationStream)`. The data members are read-only properties here
so that a class may hold them as attributes or compute them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from saecli.data.batch import Batch

if TYPE_CHECKING:
    from saecli.lm.loading import LanguageModel


class BatchSource(Protocol):
    """The part of a stream `training.initialize` reads: batches, a position to rewind to and the known
    norms. Every ActivationStream is one; so is the run driver's replay of a stream's first batches."""

    @property
    def mean_norms(self) -> dict[str, float] | None:
        """Mean ‖x‖ per hook point when known (a cache's manifest, a live stream's first window), for the
        dataset-wise normalisation; None: the trainer estimates it on its first batches."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class ActivationStream(BatchSource, Protocol):
    @property
    def hook_points(self) -> list[str]:
        """The hook points every batch carries, in order."""

    @property
    def d_model(self) -> dict[str, int]:
        """Width of each hook point's activations."""

    @property
    def contexts(self) -> bool:
        """True when batches are whole contexts ([B, T, d] with a mask) rather than shuffled tokens ([N, d])."""

    @property
    def lm(self) -> LanguageModel | None:
        """The model computing the activations (a live stream), for kinds that initialise from its weights;
        None for a cache or synthetic data."""

    @property
    def dropped_tokens(self) -> int:
        """Massive-activation tokens dropped so far (activations.max_norm_ratio; see data/outliers.py)."""

    def close(self) -> None:
        """Stop background work (prefetch threads); the stream must not be iterated afterwards."""
