"""The one interface between where activations come from (a cache or a live model) and the loops.

A stream is an iterator of `Batch` with an exact, resumable position: `state_dict()` taken after the
n-th batch and given to `load_state_dict()` of a freshly built stream of the same config makes it yield
batch n+1, n+2, ... exactly as the original would have. Data-parallel ranks build the stream with
their `rank`/`world_size` and each gets a disjoint part.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from saecli.data.batch import Batch


@runtime_checkable
class ActivationStream(Protocol):
    hook_points: list[str]
    d_model: dict[str, int]
    # mean ‖x‖ per hook point when known (from the cache manifest), for dataset-wise normalisation
    mean_norms: dict[str, float] | None
    # True when batches are whole contexts ([B, T, d]) rather than shuffled tokens ([N, d])
    contexts: bool

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
