"""MongoDB backend (pymongo): lm_saes-like collections, arrays as bson Binary or GridFS (docs/store.md).

Multi-document transactions need a replica set, so an analysis is replaced by versions instead: the
new feature records are inserted tagged with a fresh version (an ObjectId, so later = newer), then
one update of the analysis document makes that version current, then older versions are deleted.
Readers look up the current version first, so they never see a mix of two versions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import gridfs
import numpy as np
from bson import Binary, ObjectId
from pymongo import MongoClient, UpdateOne
from pymongo.errors import BulkWriteError, ConfigurationError, DuplicateKeyError, PyMongoError

from saecli.errors import ConfigError, RunError
from saecli.store.arrays import MARK, no_arrays, plain, restore
from saecli.store.base import (
    DEFAULT_SERIES,
    REPLACED,
    Store,
    analysis_view,
    check_order,
    feature_index,
    guarded,
    merged,
)

GRIDFS_BYTES = 8 << 20  # arrays beyond this much per document go to GridFS (documents stop at 16 MB)
BATCH_DOCS = 256
_FILED_BY = ("_id", "sae_name", "sae_series", "analysis", "version")  # added to each feature record


def _analysis_tag(sae_name: str, series: str, analysis: str, version: ObjectId) -> dict[str, Any]:
    """The owner tag of one version of an analysis, on its meta and feature arrays (in GridFS or inline),
    by which a replace or drop finds them."""
    return {"sae_name": sae_name, "sae_series": series, "owner": "analysis", "analysis": analysis, "version": version}


def redact(uri: str) -> str:
    """The URI without its password, fit for messages."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def _describe(store: MongoStore, exc: BaseException) -> str:
    return (
        f"MongoDB at {redact(store.uri)} failed: {exc}. Check that the server is up and store.uri is "
        f"right; the run's results are still in its output folder."
    )


_guard = guarded((PyMongoError,), _describe)


class MongoStore(Store):
    """A store in a MongoDB database; `client` lets tests pass a mongomock client."""

    def __init__(self, uri: str, database: str = "saecli", timeout_s: float = 5.0, *, client: Any = None):
        self.uri = uri
        if client is None:
            ms = max(1, int(timeout_s * 1000))
            try:
                client = MongoClient(uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, appname="saecli")
            except ConfigurationError as exc:
                raise ConfigError(f"bad MongoDB URI {redact(uri)!r}: {exc}", key="store.uri") from None
            try:
                client.admin.command("ping")
            except PyMongoError as exc:
                client.close()
                reason = re.split(r", Timeout:| \(configured timeouts", str(exc))[0]
                raise RunError(
                    f"cannot reach MongoDB at {redact(uri)} within {timeout_s:g} s ({reason}). Start a "
                    f"server (e.g. `docker run -d -p 27017:27017 mongo:7`), fix store.uri, or set "
                    f'store.backend = "sqlite"; the run\'s results are still in its output folder.'
                ) from None
        self._client = client
        self._db = client[database]
        self._fs = gridfs.GridFS(self._db)
        try:
            self._ensure_indexes()
        except PyMongoError as exc:
            raise RunError(_describe(self, exc)) from exc

    def _ensure_indexes(self) -> None:
        db = self._db
        db.models.create_index("name", unique=True)
        db.datasets.create_index("name", unique=True)
        db.saes.create_index([("name", 1), ("series", 1)], unique=True)
        db.saes.create_index([("series", 1), ("name", 1)])
        db.analyses.create_index([("sae_name", 1), ("sae_series", 1), ("name", 1)], unique=True)
        db.features.create_index([("sae_name", 1), ("sae_series", 1), ("index", 1)], unique=True)
        head = [("sae_name", 1), ("sae_series", 1), ("analysis", 1), ("version", 1)]
        db.feature_analyses.create_index(head + [("index", 1)], unique=True)
        for key in ("act_times", "max_act"):  # both directions, ties by ascending index
            db.feature_analyses.create_index(head + [(key, 1), ("index", 1)])
            db.feature_analyses.create_index(head + [(key, -1), ("index", 1)])
        db.fs.files.create_index([("metadata.sae_name", 1), ("metadata.sae_series", 1), ("metadata.owner", 1)])

    # arrays

    def _encode(self, obj: Any, tag: dict) -> Any:
        """`obj` with arrays as {MARK, dtype, shape, data: Binary} or, past GRIDFS_BYTES, a GridFS id."""
        budget = [GRIDFS_BYTES]

        def keep(a: np.ndarray) -> dict:
            head = {MARK: 1, "dtype": a.dtype.str, "shape": list(a.shape)}
            if a.nbytes <= budget[0]:
                budget[0] -= a.nbytes
                return {**head, "data": Binary(a.tobytes(order="C"))}
            return {**head, "gridfs": self._fs.put(a.tobytes(order="C"), metadata=tag)}

        return plain(obj, keep)

    def _decode(self, doc: Any) -> Any:
        def load(m: dict) -> np.ndarray:
            data = m["data"] if "data" in m else self._fs.get(m["gridfs"]).read()
            return np.frombuffer(bytes(data), dtype=np.dtype(m["dtype"])).reshape(m["shape"]).copy()

        return restore(doc, load)

    def _drop_files(self, query: dict) -> None:
        for f in self._db.fs.files.find(query, {"_id": 1}):
            self._fs.delete(f["_id"])

    # models, datasets, dictionaries

    @_guard
    def put_model(self, name, cfg) -> None:
        self._db.models.replace_one(
            {"name": name}, {"name": name, "cfg": plain(cfg, no_arrays), "updated_at": time.time()}, upsert=True
        )

    @_guard
    def put_dataset(self, name, cfg) -> None:
        self._db.datasets.replace_one(
            {"name": name}, {"name": name, "cfg": plain(cfg, no_arrays), "updated_at": time.time()}, upsert=True
        )

    @_guard
    def get_model(self, name) -> dict | None:
        doc = self._db.models.find_one({"name": name})
        return None if doc is None else doc["cfg"]

    @_guard
    def get_dataset(self, name) -> dict | None:
        doc = self._db.datasets.find_one({"name": name})
        return None if doc is None else doc["cfg"]

    @_guard
    def put_sae(
        self, name, series=DEFAULT_SERIES, *, path, cfg, model_name=None, dataset_name=None, metrics=None
    ) -> None:
        now = time.time()
        fields = {
            "path": str(path),
            "cfg": plain(cfg, no_arrays),
            "model_name": model_name,
            "dataset_name": dataset_name,
            "updated_at": now,
        }
        on_insert: dict = {"created_at": now}
        if metrics is not None:
            fields["metrics"] = plain(metrics, no_arrays)
        else:
            on_insert["metrics"] = {}
        self._db.saes.update_one(
            {"name": name, "series": series}, {"$set": fields, "$setOnInsert": on_insert}, upsert=True
        )

    @_guard
    def get_sae(self, name, series=DEFAULT_SERIES) -> dict | None:
        return self._db.saes.find_one({"name": name, "series": series}, {"_id": 0})

    @_guard
    def list_saes(self, series=None) -> list[dict]:
        query = {} if series is None else {"series": series}
        return list(self._db.saes.find(query, {"_id": 0}).sort([("series", 1), ("name", 1)]))

    @_guard
    def update_sae_metrics(self, name, series, metrics) -> None:
        update = {f"metrics.{k}": v for k, v in plain(metrics, no_arrays).items()}
        res = self._db.saes.update_one(
            {"name": name, "series": series}, {"$set": {**update, "updated_at": time.time()}}
        )
        if res.matched_count == 0:
            self._need_sae(name, series)

    def _need_sae(self, name: str, series: str) -> None:
        if self._db.saes.find_one({"name": name, "series": series}, {"_id": 1}) is None:
            raise RunError(
                f"dictionary {name!r} (series {series!r}) is not in the MongoDB store "
                f"{redact(self.uri)}; record it first (put_sae), e.g. by training or registering it"
            )

    @_guard
    def remove_sae(self, name, series=DEFAULT_SERIES) -> None:
        db = self._db
        db.saes.delete_one({"name": name, "series": series})
        key = {"sae_name": name, "sae_series": series}
        db.analyses.delete_many(key)
        db.feature_analyses.delete_many(key)
        db.features.delete_many(key)
        self._drop_files({"metadata.sae_name": name, "metadata.sae_series": series})

    # analyses

    @_guard
    def replace_analysis(self, sae_name, series, analysis, features, meta) -> int:
        self._need_sae(sae_name, series)
        key = {"sae_name": sae_name, "sae_series": series, "name": analysis}
        version = ObjectId()
        self._db.analyses.update_one(key, {"$push": {"writing": version}}, upsert=True)
        try:
            n = self._write_features(sae_name, series, analysis, version, features)
            tag = _analysis_tag(sae_name, series, analysis, version)
            flip = {
                "$set": {
                    "version": version,
                    "meta": self._encode(meta, tag),
                    "n_features": n,
                    "created_at": time.time(),
                },
                "$pull": {"writing": {"$lte": version}},
            }
            if self._db.analyses.update_one({**key, "writing": version}, flip).matched_count == 0:
                raise RunError(f"{sae_name}/{series}/{analysis}: {REPLACED}")
        except BaseException:
            try:  # best effort: what is left behind is invisible and goes with the next replace
                self._drop_versions(sae_name, series, analysis, {"$eq": version})
                self._db.analyses.update_one(key, {"$pull": {"writing": version}})
            except PyMongoError:
                pass
            raise
        self._drop_versions(sae_name, series, analysis, {"$lt": version})
        return n

    def _write_features(self, sae_name, series, analysis, version, features: Iterable[dict]) -> int:
        filed = {"sae_name": sae_name, "sae_series": series, "analysis": analysis, "version": version}
        tag = _analysis_tag(sae_name, series, analysis, version)
        batch: list[dict] = []
        n = 0

        def flush() -> None:
            try:
                self._db.feature_analyses.insert_many(batch, ordered=True)
            except (BulkWriteError, DuplicateKeyError) as exc:
                raise ValueError("two features of the analysis have the same index") from exc
            batch.clear()

        for feature in features:
            index = feature_index(feature)
            batch.append({**self._encode(feature, {**tag, "index": index}), **filed, "index": index})
            n += 1
            if len(batch) >= BATCH_DOCS:
                flush()
        if batch:
            flush()
        return n

    def _drop_versions(self, sae_name: str, series: str, analysis: str, version: dict) -> None:
        """Delete the feature records and GridFS files of the versions matching `version`."""
        self._db.feature_analyses.delete_many(
            {"sae_name": sae_name, "sae_series": series, "analysis": analysis, "version": version}
        )
        self._drop_files(
            {
                "metadata.sae_name": sae_name,
                "metadata.sae_series": series,
                "metadata.owner": "analysis",
                "metadata.analysis": analysis,
                "metadata.version": version,
            }
        )

    def _current(self, sae_name: str, series: str, analysis: str) -> dict | None:
        doc = self._db.analyses.find_one({"sae_name": sae_name, "sae_series": series, "name": analysis}, {"writing": 0})
        return doc if doc is not None and doc.get("version") is not None else None

    @_guard
    def get_analysis(self, sae_name, series, analysis) -> dict | None:
        doc = self._current(sae_name, series, analysis)
        if doc is None:
            return None
        return analysis_view(
            analysis, sae_name, series, self._decode(doc["meta"]), doc["n_features"], doc["created_at"]
        )

    def _record(self, doc: dict | None) -> dict | None:
        if doc is None:
            return None
        return self._decode({k: v for k, v in doc.items() if k not in _FILED_BY})

    def _extras(self, doc: dict | None) -> tuple[Any, Any]:
        if doc is None:
            return None, None
        return (
            self._decode(doc["logits"]) if "logits" in doc else None,
            self._decode(doc["interpretation"]) if "interpretation" in doc else None,
        )

    @_guard
    def get_feature(self, sae_name, series, index, analysis="default") -> dict | None:
        index = int(index)
        record = None
        for _ in range(2):  # a replace may delete the version read a moment ago: look once more
            current = self._current(sae_name, series, analysis)
            if current is None:
                break
            record = self._db.feature_analyses.find_one(
                {
                    "sae_name": sae_name,
                    "sae_series": series,
                    "analysis": analysis,
                    "version": current["version"],
                    "index": index,
                }
            )
            if record is not None:
                break
        extras = self._db.features.find_one({"sae_name": sae_name, "sae_series": series, "index": index})
        return merged(self._record(record), index, *self._extras(extras))

    def iter_features(
        self, sae_name, series, analysis="default", *, order_by="index", descending=False, limit=None
    ) -> Iterator[dict]:
        check_order(order_by)
        return self._iter(sae_name, series, analysis, order_by, descending, limit)

    @_guard
    def _iter(self, sae_name, series, analysis, order_by, descending, limit) -> Iterator[dict]:
        current = self._current(sae_name, series, analysis)
        if current is None or limit == 0:
            return
        sort = [(order_by, -1 if descending else 1)] + ([("index", 1)] if order_by != "index" else [])
        cursor = (
            self._db.feature_analyses.find(
                {"sae_name": sae_name, "sae_series": series, "analysis": analysis, "version": current["version"]}
            )
            .sort(sort)
            .batch_size(64)
        )
        if limit is not None:
            cursor = cursor.limit(int(limit))
        chunk: list[dict] = []
        for doc in cursor:
            chunk.append(doc)
            if len(chunk) == 64:
                yield from self._merge_chunk(sae_name, series, chunk)
                chunk = []
        yield from self._merge_chunk(sae_name, series, chunk)

    def _merge_chunk(self, sae_name: str, series: str, docs: list[dict]) -> Iterator[dict]:
        if not docs:
            return
        extras = {
            d["index"]: d
            for d in self._db.features.find(
                {"sae_name": sae_name, "sae_series": series, "index": {"$in": [d["index"] for d in docs]}}
            )
        }
        for doc in docs:
            feature = merged(self._record(doc), doc["index"], *self._extras(extras.get(doc["index"])))
            if feature is not None:  # `doc` is a feature record: never None
                yield feature

    # DLA and interpretations (one document per feature, as in lm_saes' `features`)

    def _put_extra(self, sae_name: str, series: str, field: str, items: Iterable[tuple[int, dict]]) -> None:
        self._need_sae(sae_name, series)
        put = ObjectId()
        tag = {"sae_name": sae_name, "sae_series": series, "owner": field, "put": put}
        batch: list[tuple[int, Any]] = []

        def flush() -> None:
            self._db.features.bulk_write(
                [
                    UpdateOne(
                        {"sae_name": sae_name, "sae_series": series, "index": i}, {"$set": {field: doc}}, upsert=True
                    )
                    for i, doc in batch
                ]
            )
            # GridFS files of the values just overwritten
            self._drop_files(
                {
                    "metadata.sae_name": sae_name,
                    "metadata.sae_series": series,
                    "metadata.owner": field,
                    "metadata.index": {"$in": [i for i, _ in batch]},
                    "metadata.put": {"$ne": put},
                }
            )
            batch.clear()

        for i, value in items:
            batch.append((int(i), self._encode(value, {**tag, "index": int(i)})))
            if len(batch) >= BATCH_DOCS:
                flush()
        if batch:
            flush()

    @_guard
    def put_logits(self, sae_name, series, items) -> None:
        self._put_extra(sae_name, series, "logits", items)

    @_guard
    def put_interpretation(self, sae_name, series, index, interpretation) -> None:
        self._put_extra(sae_name, series, "interpretation", [(index, interpretation)])

    def close(self) -> None:
        self._client.close()
