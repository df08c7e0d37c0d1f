"""SQLite cache of single judgments (WAL mode), shared by every judge backend.

One row per judgment: a pairwise judgment of one *ordered* pair, or one direct score. The key
is a hash of everything that changes the answer (the judge's fingerprint: backend, model,
template hash, decoding settings; plus the texts in their order), so swapping the order is a
different judgment and re-running any job reuses every judgment it already made. Writes are
committed per batch; a job killed with SIGKILL loses at most the batch in flight.

The cache is the one file that jobs running side by side share, so it takes several writers:
SQLite serialises their commits (waiting up to `timeout` for one another), and processes that
create a new cache at the same instant retry the switch to WAL, which SQLite does not wait for.
A full disk is one line naming the cache.

SQLite's locks need a local file system: a cache on NFS (or any network file system) may be
corrupted by two machines writing it. Give each machine its own cache there (one per shard of a
sharded labeling) and join them afterwards with `merge_from` (`openrlaif merge cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from openrlaif.data.io import disk_full_error
from openrlaif.errors import ConfigError

DEFAULT_CACHE_ENV = "OPENRLAIF_CACHE"


def default_cache_path() -> Path:
    env = os.environ.get(DEFAULT_CACHE_ENV)
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "openrlaif" / "judgments.sqlite3"


def judgment_key(fingerprint: Mapping[str, Any], kind: str, texts: Sequence[str]) -> str:
    payload = json.dumps(
        {"judge": fingerprint, "kind": kind, "texts": list(texts)}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


_SQLITE_BUSY = 5  # sqlite3.SQLITE_BUSY, which Python has only from 3.11


def _locked(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", None) == _SQLITE_BUSY or "database is locked" in str(error)


class JudgmentCache:
    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with disk_full_error(self.path):
            self._db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False)
            self._use_wal(time.monotonic() + timeout)
            self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: safe against a killed process
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judgments ("
                " key TEXT PRIMARY KEY, kind TEXT NOT NULL, judge TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._db.commit()
        self.hits = 0
        self.misses = 0

    def _use_wal(self, deadline: float) -> None:
        """Switch to WAL (once per file; a no-op after). SQLite answers "locked" at once, without
        its busy wait, when another process switches the same new file: retry until `deadline`."""
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if not _locked(e) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # stay under SQLite's variable limit
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in self._db.execute(
                f"SELECT key, value FROM judgments WHERE key IN ({marks})", chunk
            ):
                found[key] = json.loads(value)
        return found

    def put_many(self, rows: Mapping[str, dict[str, Any]], kind: str, judge: str) -> None:
        now = time.time()
        with disk_full_error(self.path):
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO judgments (key, kind, judge, value, created) VALUES (?, ?, ?, ?, ?)",
                    [(key, kind, judge, json.dumps(value), now) for key, value in rows.items()],
                )
                self._db.commit()
            except sqlite3.Error:
                self._db.rollback()  # a failed batch leaves nothing half-written behind
                raise

    def merge_from(self, other: str | Path) -> int:
        """Copy into this cache the judgments of cache `other` that it does not hold; returns how
        many. A key both hold keeps this cache's value (the same judgment: equal up to the last
        bits of a batch)."""
        other = Path(other)
        if not other.is_file():
            raise ConfigError(f"{other}: no such judgment cache")
        if other.resolve() == self.path.resolve():
            raise ConfigError(f"{other}: a cache cannot be merged into itself")
        try:
            check = sqlite3.connect(f"{other.resolve().as_uri()}?mode=ro", uri=True)
            try:
                check.execute("SELECT key, kind, judge, value, created FROM judgments LIMIT 1").fetchall()
            finally:
                check.close()
        except sqlite3.Error as e:
            raise ConfigError(f"{other}: not a judgment cache ({e})") from None
        before = len(self)
        with disk_full_error(self.path):
            self._db.execute("ATTACH DATABASE ? AS other", (str(other),))
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO judgments (key, kind, judge, value, created)"
                    " SELECT key, kind, judge, value, created FROM other.judgments"
                )
                self._db.commit()
            except sqlite3.Error:
                self._db.rollback()
                raise
            finally:
                self._db.execute("DETACH DATABASE other")
        return len(self) - before

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        self._db.close()
