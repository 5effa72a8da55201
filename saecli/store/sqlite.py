"""SQLite backend: one file, WAL journal, foreign keys, arrays as .npy BLOBs (schema in docs/store.md).

Atomic replace: the new features are written in short transactions under a fresh analyses row that
readers ignore (current IS NULL); one short transaction then moves `current` to the new row, and the
older rows of that analysis are deleted afterwards, a batch per transaction, so that other processes
never wait long for the lock. A writer that dies leaves only an invisible row, removed by the next
successful replace of the same analysis.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from saecli.errors import RunError
from saecli.store.arrays import no_arrays, pack, plain, unpack
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

SCHEMA_VERSION = 1
BATCH_ROWS = 256  # features per write transaction: short locks for other processes
BATCH_BYTES = 32 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY, cfg TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY, cfg TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS saes (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, series TEXT NOT NULL, path TEXT NOT NULL,
    cfg TEXT NOT NULL, model_name TEXT, dataset_name TEXT, metrics TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL, updated_at REAL NOT NULL, UNIQUE (name, series));
CREATE INDEX IF NOT EXISTS saes_series ON saes (series, name);
CREATE TABLE IF NOT EXISTS analyses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sae_id INTEGER NOT NULL REFERENCES saes (id) ON DELETE CASCADE,
    name TEXT NOT NULL, current INTEGER CHECK (current IS NULL OR current = 1),
    meta TEXT NOT NULL, meta_arrays BLOB, n_features INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS analyses_current ON analyses (sae_id, name) WHERE current = 1;
CREATE INDEX IF NOT EXISTS analyses_sae ON analyses (sae_id, name, id);
CREATE TABLE IF NOT EXISTS features (
    analysis_id INTEGER NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, act_times INTEGER, max_act REAL, doc TEXT NOT NULL, arrays BLOB,
    PRIMARY KEY (analysis_id, idx));
CREATE INDEX IF NOT EXISTS features_act_times ON features (analysis_id, act_times, idx);
CREATE INDEX IF NOT EXISTS features_max_act ON features (analysis_id, max_act, idx);
CREATE TABLE IF NOT EXISTS logits (
    sae_id INTEGER NOT NULL REFERENCES saes (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, doc TEXT NOT NULL, arrays BLOB, PRIMARY KEY (sae_id, idx));
CREATE TABLE IF NOT EXISTS interpretations (
    sae_id INTEGER NOT NULL REFERENCES saes (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, doc TEXT NOT NULL, arrays BLOB, PRIMARY KEY (sae_id, idx));
"""

_ORDER_SQL = {"index": "f.idx", "act_times": "f.act_times", "max_act": "f.max_act"}


def _json(obj: object) -> str:
    return json.dumps(plain(obj, no_arrays), separators=(",", ":"))


def _packed(obj: object) -> tuple[str, bytes | None]:
    doc, blob = pack(obj)
    return json.dumps(doc, separators=(",", ":")), blob


def _unpacked(doc: str | None, blob: bytes | None) -> Any:
    return None if doc is None else unpack(json.loads(doc), blob)


def _describe(store: SQLiteStore, exc: BaseException) -> str:
    return (
        f"the SQLite store {store.path} failed: {exc}. If another saecli process is writing to it, "
        f"retry or raise store.timeout_s; otherwise check that the file is a saecli store on a "
        f"writable disk with free space."
    )


_guard = guarded((sqlite3.Error,), _describe)


class SQLiteStore(Store):
    """A store in one SQLite file; several processes may use it at once (WAL + busy timeout)."""

    def __init__(self, path: str | Path, timeout_s: float = 5.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        if self.path.is_dir():
            raise RunError(f"store.path {self.path} is a folder; give a file name such as saecli.db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
        except sqlite3.Error as exc:
            raise RunError(_describe(self, exc)) from exc
        try:
            self._init_schema()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise RunError(_describe(self, exc)) from exc
            raise

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable against crashes of the process
        return db

    def _init_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RunError(f"{self.path} was written by a newer saecli (schema {version}); upgrade saecli")
        if self._switch_to_wal().lower() != "wal":
            raise RunError(f"cannot switch {self.path} to WAL mode (a network file system?)")
        with self._tx():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _switch_to_wal(self) -> str:
        """`PRAGMA journal_mode = WAL`, retried while another process holds the new file.

        Two processes opening a fresh store at once both ask for the switch; SQLite may answer the loser
        "database is locked" at once, without waiting for the busy timeout (deadlock avoidance).
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return str(self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @contextmanager
    def _tx(self):
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _sae_id(self, name: str, series: str) -> int:
        row = self._db.execute("SELECT id FROM saes WHERE name = ? AND series = ?", (name, series)).fetchone()
        if row is None:
            raise RunError(
                f"dictionary {name!r} (series {series!r}) is not in the store {self.path}; "
                f"record it first (put_sae), e.g. by training or registering it"
            )
        return row[0]

    # models, datasets, dictionaries

    @_guard
    def put_model(self, name: str, cfg: dict) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?)", (name, _json(cfg), time.time()))

    @_guard
    def put_dataset(self, name: str, cfg: dict) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?)", (name, _json(cfg), time.time()))

    @_guard
    def get_model(self, name: str) -> dict | None:
        row = self._db.execute("SELECT cfg FROM models WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    @_guard
    def get_dataset(self, name: str) -> dict | None:
        row = self._db.execute("SELECT cfg FROM datasets WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    @_guard
    def put_sae(
        self, name, series=DEFAULT_SERIES, *, path, cfg, model_name=None, dataset_name=None, metrics=None
    ) -> None:
        now, metrics_json = time.time(), None if metrics is None else _json(metrics)
        with self._tx() as db:
            db.execute(
                "INSERT INTO saes (name, series, path, cfg, model_name, dataset_name, metrics, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, coalesce(?, '{}'), ?, ?)"
                " ON CONFLICT (name, series) DO UPDATE SET path = excluded.path, cfg = excluded.cfg,"
                " model_name = excluded.model_name, dataset_name = excluded.dataset_name,"
                " metrics = coalesce(?, metrics), updated_at = excluded.updated_at",
                (name, series, str(path), _json(cfg), model_name, dataset_name, metrics_json, now, now, metrics_json),
            )

    _SAE_COLUMNS = "name, series, path, cfg, model_name, dataset_name, metrics, created_at, updated_at"

    @staticmethod
    def _sae_row(row: tuple) -> dict:
        keys = SQLiteStore._SAE_COLUMNS.split(", ")
        out = dict(zip(keys, row))
        out["cfg"], out["metrics"] = json.loads(out["cfg"]), json.loads(out["metrics"])
        return out

    @_guard
    def get_sae(self, name, series=DEFAULT_SERIES) -> dict | None:
        row = self._db.execute(
            f"SELECT {self._SAE_COLUMNS} FROM saes WHERE name = ? AND series = ?", (name, series)
        ).fetchone()
        return None if row is None else self._sae_row(row)

    @_guard
    def list_saes(self, series=None) -> list[dict]:
        where, args = ("WHERE series = ?", (series,)) if series is not None else ("", ())
        rows = self._db.execute(f"SELECT {self._SAE_COLUMNS} FROM saes {where} ORDER BY series, name", args)
        return [self._sae_row(r) for r in rows.fetchall()]

    @_guard
    def update_sae_metrics(self, name, series, metrics) -> None:
        with self._tx() as db:
            sae_id = self._sae_id(name, series)
            old = json.loads(db.execute("SELECT metrics FROM saes WHERE id = ?", (sae_id,)).fetchone()[0])
            db.execute(
                "UPDATE saes SET metrics = ?, updated_at = ? WHERE id = ?",
                (_json({**old, **metrics}), time.time(), sae_id),
            )

    @_guard
    def remove_sae(self, name, series=DEFAULT_SERIES) -> None:
        row = self._db.execute("SELECT id FROM saes WHERE name = ? AND series = ?", (name, series)).fetchone()
        if row is None:
            return
        with self._tx() as db:  # hide the analyses at once, then free them in short steps
            db.execute("UPDATE analyses SET current = NULL WHERE sae_id = ?", row)
        for (analysis_id,) in self._db.execute("SELECT id FROM analyses WHERE sae_id = ?", row).fetchall():
            self._drop(analysis_id)
        with self._tx() as db:  # logits and interpretations cascade
            db.execute("DELETE FROM saes WHERE id = ?", row)

    # analyses

    @_guard
    def replace_analysis(self, sae_name, series, analysis, features, meta) -> int:
        meta_doc, meta_blob = _packed(meta)
        with self._tx() as db:
            sae_id = self._sae_id(sae_name, series)
            new_id = db.execute(
                "INSERT INTO analyses (sae_id, name, current, meta, meta_arrays, created_at)"
                " VALUES (?, ?, NULL, ?, ?, ?)",
                (sae_id, analysis, meta_doc, meta_blob, time.time()),
            ).lastrowid
        try:
            n = self._write_features(new_id, features)
            with self._tx() as db:  # the flip: short, whatever the size of the analyses
                mine = db.execute("SELECT 1 FROM analyses WHERE id = ?", (new_id,)).fetchone()
                newer = db.execute(
                    "SELECT 1 FROM analyses WHERE sae_id = ? AND name = ? AND current = 1 AND id > ?",
                    (sae_id, analysis, new_id),
                ).fetchone()
                if mine is None or newer is not None:
                    raise RunError(REPLACED)
                db.execute(
                    "UPDATE analyses SET current = NULL WHERE sae_id = ? AND name = ? AND current = 1",
                    (sae_id, analysis),
                )
                db.execute("UPDATE analyses SET current = 1, n_features = ? WHERE id = ?", (n, new_id))
        except BaseException:
            try:  # best effort: what is left is invisible and goes with the next replace
                self._drop(new_id)
            except sqlite3.Error:
                pass
            raise
        # Older versions (the previous analysis, writers that died or lost) are now garbage.
        old = self._db.execute(
            "SELECT id FROM analyses WHERE sae_id = ? AND name = ? AND id < ?", (sae_id, analysis, new_id)
        ).fetchall()
        for (old_id,) in old:
            self._drop(old_id)
        return n

    def _write_features(self, analysis_id: int, features: Iterable[dict]) -> int:
        rows: list[tuple] = []
        n = size = 0

        def flush() -> None:
            try:
                with self._tx() as db:
                    db.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError as exc:
                if "FOREIGN KEY" in str(exc):
                    raise RunError(REPLACED) from exc
                raise ValueError("two features of the analysis have the same index") from exc
            rows.clear()

        for feature in features:
            index = feature_index(feature)
            doc, blob = _packed({**feature, "index": index})
            rows.append(
                (analysis_id, index, _number(feature.get("act_times")), _number(feature.get("max_act")), doc, blob)
            )
            n, size = n + 1, size + len(doc) + (len(blob) if blob else 0)
            if len(rows) >= BATCH_ROWS or size >= BATCH_BYTES:
                flush()
                size = 0
        if rows:
            flush()
        return n

    def _drop(self, analysis_id: int) -> None:
        """Delete a non-current analysis in short transactions (freeing big rows takes a while)."""
        while True:
            with self._tx() as db:
                gone = db.execute(
                    "DELETE FROM features WHERE rowid IN (SELECT rowid FROM features WHERE analysis_id = ? LIMIT ?)",
                    (analysis_id, BATCH_ROWS),
                ).rowcount
                if gone == 0:
                    db.execute("DELETE FROM analyses WHERE id = ? AND current IS NULL", (analysis_id,))
                    return

    @_guard
    def get_analysis(self, sae_name, series, analysis) -> dict | None:
        row = self._db.execute(
            "SELECT a.meta, a.meta_arrays, a.n_features, a.created_at FROM analyses a JOIN saes s"
            " ON a.sae_id = s.id WHERE s.name = ? AND s.series = ? AND a.name = ? AND a.current = 1",
            (sae_name, series, analysis),
        ).fetchone()
        if row is None:
            return None
        return analysis_view(analysis, sae_name, series, _unpacked(row[0], row[1]), row[2], row[3])

    _FEATURE_SELECT = (
        "SELECT f.doc, f.arrays, l.doc, l.arrays, i.doc, i.arrays FROM features f"
        " JOIN analyses a ON f.analysis_id = a.id JOIN saes s ON a.sae_id = s.id"
        " LEFT JOIN logits l ON l.sae_id = s.id AND l.idx = f.idx"
        " LEFT JOIN interpretations i ON i.sae_id = s.id AND i.idx = f.idx"
        " WHERE s.name = ? AND s.series = ? AND a.name = ? AND a.current = 1"
    )

    @staticmethod
    def _feature(row: tuple, index: int | None = None) -> dict | None:
        record = _unpacked(row[0], row[1])
        if record is not None:
            index = int(record["index"])
        assert index is not None, "a row without its feature record needs the index asked for"
        return merged(record, index, _unpacked(row[2], row[3]), _unpacked(row[4], row[5]))

    @_guard
    def get_feature(self, sae_name, series, index, analysis="default") -> dict | None:
        row = self._db.execute(
            self._FEATURE_SELECT + " AND f.idx = ?", (sae_name, series, analysis, int(index))
        ).fetchone()
        if row is None:  # no analysis record: DLA or interpretation alone still make a feature
            row = self._db.execute(
                "SELECT NULL, NULL, l.doc, l.arrays, i.doc, i.arrays FROM saes s"
                " LEFT JOIN logits l ON l.sae_id = s.id AND l.idx = ?"
                " LEFT JOIN interpretations i ON i.sae_id = s.id AND i.idx = ?"
                " WHERE s.name = ? AND s.series = ?",
                (int(index), int(index), sae_name, series),
            ).fetchone()
            if row is None:
                return None
        return self._feature(row, int(index))

    def iter_features(
        self, sae_name, series, analysis="default", *, order_by="index", descending=False, limit=None
    ) -> Iterator[dict]:
        check_order(order_by)
        direction = "DESC" if descending else "ASC"
        sql = f"{self._FEATURE_SELECT} ORDER BY {_ORDER_SQL[order_by]} {direction}, f.idx ASC LIMIT ?"
        return self._iter(sql, (sae_name, series, analysis, -1 if limit is None else int(limit)))

    @_guard
    def _iter(self, sql: str, args: tuple) -> Iterator[dict]:
        # A connection of its own: its one SELECT reads a single snapshot however long the caller
        # takes, and the caller may write through this store meanwhile.
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            cursor = db.execute(sql, args)
            while rows := cursor.fetchmany(64):
                for row in rows:
                    feature = self._feature(row)
                    if feature is not None:  # the SELECT joins on features: every row holds one
                        yield feature
        finally:
            db.close()

    # DLA and interpretations

    @_guard
    def put_logits(self, sae_name, series, items) -> None:
        packed = [(int(i), *_packed(result)) for i, result in items]
        with self._tx() as db:
            sae_id = self._sae_id(sae_name, series)
            db.executemany("INSERT OR REPLACE INTO logits VALUES (?, ?, ?, ?)", [(sae_id, *row) for row in packed])

    @_guard
    def put_interpretation(self, sae_name, series, index, interpretation) -> None:
        with self._tx() as db:
            sae_id = self._sae_id(sae_name, series)
            db.execute(
                "INSERT OR REPLACE INTO interpretations VALUES (?, ?, ?, ?)",
                (sae_id, int(index), *_packed(interpretation)),
            )

    def close(self) -> None:
        self._db.close()


def _number(value: object) -> float | int | None:
    """A sort key column value (numpy scalars included); anything else sorts as NULL."""
    value = plain(value, no_arrays) if isinstance(value, np.generic) else value
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
