"""The results store interface shared by the SQLite and MongoDB backends (see docs/store.md).

A store records models, datasets, dictionaries ("saes", keyed by name and series), their feature
analyses, DLA logits and interpretations. An analysis is replaced as a whole and atomically: readers
see the previous version until the new one is complete, whatever happens to the writer.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from saecli.errors import RunError, UsageError

DEFAULT_SERIES = "default"
ORDER_KEYS = ("index", "act_times", "max_act")
# Field names the backends use to file a feature record; a record may not carry them itself.
REPLACED = "this analysis was replaced by a newer run while it was being written; the newer one is kept"
RESERVED_KEYS = frozenset({"_id", "sae_name", "sae_series", "analysis", "version", "logits", "interpretation"})


class Store(ABC):
    """One place where every command records what it made. Use as a context manager or call close()."""

    @abstractmethod
    def put_model(self, name: str, cfg: dict) -> None:
        """Insert or replace a language model's description."""

    @abstractmethod
    def put_dataset(self, name: str, cfg: dict) -> None:
        """Insert or replace a dataset's description."""

    @abstractmethod
    def get_model(self, name: str) -> dict | None:
        """The cfg recorded by put_model, or None."""

    @abstractmethod
    def get_dataset(self, name: str) -> dict | None:
        """The cfg recorded by put_dataset, or None."""

    @abstractmethod
    def put_sae(
        self,
        name: str,
        series: str = DEFAULT_SERIES,
        *,
        path: str,
        cfg: dict,
        model_name: str | None = None,
        dataset_name: str | None = None,
        metrics: dict | None = None,
    ) -> None:
        """Insert or replace a dictionary; `metrics=None` keeps the metrics already recorded."""

    @abstractmethod
    def get_sae(self, name: str, series: str = DEFAULT_SERIES) -> dict | None:
        """{name, series, path, cfg, model_name, dataset_name, metrics, created_at, updated_at}."""

    @abstractmethod
    def list_saes(self, series: str | None = None) -> list[dict]:
        """Every dictionary (of one series if given), sorted by series then name."""

    @abstractmethod
    def update_sae_metrics(self, name: str, series: str, metrics: dict) -> None:
        """Merge `metrics` into the dictionary's metrics (new keys win)."""

    @abstractmethod
    def replace_analysis(self, sae_name: str, series: str, analysis: str, features: Iterable[dict], meta: dict) -> int:
        """Atomically replace analysis `analysis` of a dictionary by `features`; returns how many.

        Each feature is a dict with an int "index" plus JSON values and numpy arrays. If the
        iterator raises, or the process dies, the previous analysis stays as it was. If two
        replaces of the same analysis overlap, the one started last wins and the other raises
        RunError.
        """

    @abstractmethod
    def get_analysis(self, sae_name: str, series: str, analysis: str) -> dict | None:
        """{name, sae_name, series, meta, n_features, created_at} (meta's keys are also lifted to the top)."""

    @abstractmethod
    def get_feature(self, sae_name: str, series: str, index: int, analysis: str = "default") -> dict | None:
        """The feature's analysis record with "logits" and "interpretation" merged in when present."""

    @abstractmethod
    def iter_features(
        self,
        sae_name: str,
        series: str,
        analysis: str = "default",
        *,
        order_by: str = "index",
        descending: bool = False,
        limit: int | None = None,
    ) -> Iterator[dict]:
        """Feature records (merged like get_feature) sorted by `order_by`, ties by index ascending."""

    @abstractmethod
    def put_logits(self, sae_name: str, series: str, items: Iterable[tuple[int, dict]]) -> None:
        """Insert or replace the DLA result of each (feature index, result)."""

    @abstractmethod
    def put_interpretation(self, sae_name: str, series: str, index: int, interpretation: dict) -> None:
        """Insert or replace one feature's interpretation."""

    @abstractmethod
    def remove_sae(self, name: str, series: str = DEFAULT_SERIES) -> None:
        """Delete a dictionary with its analyses, features, logits and interpretations."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullStore(Store):
    """backend = "none": accepts everything, records nothing, finds nothing."""

    def put_model(self, name, cfg):
        pass

    def put_dataset(self, name, cfg):
        pass

    def get_model(self, name):
        return None

    def get_dataset(self, name):
        return None

    def put_sae(self, name, series=DEFAULT_SERIES, *, path, cfg, model_name=None, dataset_name=None, metrics=None):
        pass

    def get_sae(self, name, series=DEFAULT_SERIES):
        return None

    def list_saes(self, series=None):
        return []

    def update_sae_metrics(self, name, series, metrics):
        pass

    def replace_analysis(self, sae_name, series, analysis, features, meta) -> int:
        # Consume the iterator so that a generator's work (and its errors) happen as with a real store.
        return sum(1 for _ in features)

    def get_analysis(self, sae_name, series, analysis):
        return None

    def get_feature(self, sae_name, series, index, analysis="default"):
        return None

    def iter_features(self, sae_name, series, analysis="default", *, order_by="index", descending=False, limit=None):
        check_order(order_by)
        return iter(())

    def put_logits(self, sae_name, series, items):
        for _ in items:
            pass

    def put_interpretation(self, sae_name, series, index, interpretation):
        pass

    def remove_sae(self, name, series=DEFAULT_SERIES):
        pass

    def close(self):
        pass


def check_order(order_by: str) -> None:
    if order_by not in ORDER_KEYS:
        raise UsageError(f"cannot sort features by {order_by!r}: choose one of {', '.join(ORDER_KEYS)}")


def feature_index(feature: dict) -> int:
    """The validated "index" of a feature record about to be written."""
    if not isinstance(feature, dict) or "index" not in feature:
        raise ValueError(f"each feature must be a dict with an 'index' (got {type(feature).__name__})")
    clash = RESERVED_KEYS.intersection(feature)
    if clash:
        raise ValueError(f"feature {feature['index']}: keys {sorted(clash)} are reserved by the store")
    index = int(feature["index"])
    if index < 0 or index != feature["index"]:
        raise ValueError(f"feature index must be a non-negative integer, got {feature['index']!r}")
    return index


def merged(record: dict | None, index: int, logits: dict | None, interpretation: dict | None) -> dict | None:
    """A feature as readers see it: its analysis record plus DLA logits and interpretation."""
    if record is None and logits is None and interpretation is None:
        return None
    out = dict(record) if record is not None else {"index": index}
    if logits is not None:
        out["logits"] = logits
    if interpretation is not None:
        out["interpretation"] = interpretation
    return out


def analysis_view(name: str, sae_name: str, series: str, meta: dict, n_features: int, created_at: float) -> dict:
    """What get_analysis returns: fixed keys win over meta keys of the same name."""
    return {
        **meta,
        "name": name,
        "sae_name": sae_name,
        "series": series,
        "meta": meta,
        "n_features": n_features,
        "created_at": created_at,
    }


def guarded(errors: tuple[type[BaseException], ...], describe: Callable[[Any, BaseException], str]):
    """Decorator turning a backend's driver errors into RunError(describe(store, exc)); works on generators."""

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(self, *a, **k):
                try:
                    yield from fn(self, *a, **k)
                except errors as exc:
                    raise RunError(describe(self, exc)) from exc

            return gen

        @functools.wraps(fn)
        def call(self, *a, **k):
            try:
                return fn(self, *a, **k)
            except errors as exc:
                raise RunError(describe(self, exc)) from exc

        return call

    return wrap
