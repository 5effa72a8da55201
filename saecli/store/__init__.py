"""The results store: `open_store(cfg)` gives a Store (SQLite file, MongoDB, or nothing).

See saecli/store/base.py for the interface and docs/store.md for the schemas.
"""

from __future__ import annotations

from pathlib import Path

from saecli.config.run import StoreConfig
from saecli.errors import ConfigError
from saecli.store.base import DEFAULT_SERIES, ORDER_KEYS, NullStore, Store


def open_store(cfg: StoreConfig, base: str | Path | None = None) -> Store:
    """The store `cfg` describes; a relative SQLite path is taken relative to `base` when given."""
    if cfg.backend == "none":
        return NullStore()
    from saecli.store.record import known_unreachable

    reason = known_unreachable(cfg)
    if reason is not None:  # found down at the start of this command: do not wait for the timeout again
        from saecli.errors import RunError

        raise RunError(reason)
    if cfg.backend == "sqlite":
        from saecli.store.sqlite import SQLiteStore

        path = Path(cfg.path).expanduser()
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        return SQLiteStore(path, timeout_s=cfg.timeout_s)
    if cfg.backend == "mongodb":
        if not cfg.uri:
            raise ConfigError("backend 'mongodb' needs store.uri (e.g. mongodb://localhost:27017)", key="store.uri")
        from saecli.store.mongo import MongoStore

        return MongoStore(cfg.uri, cfg.database, timeout_s=cfg.timeout_s)
    raise ConfigError(f"unknown store backend {cfg.backend!r}: use sqlite, mongodb or none", key="store.backend")


__all__ = ["DEFAULT_SERIES", "ORDER_KEYS", "NullStore", "Store", "open_store"]
