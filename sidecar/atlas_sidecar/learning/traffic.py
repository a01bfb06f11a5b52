"""The trainer's store of mirrored traffic: SQLite in WAL mode, standard library only.

Durability: ``add`` commits before it returns, and the ingest server acks a record only
after ``add`` returned, so an acked record is in the database file or its WAL. The
connection runs ``synchronous=FULL``: each commit fsyncs the WAL. ``NORMAL`` would
already survive a SIGKILL of the trainer (a commit's WAL frames are in the OS page
cache once ``write`` returned), but not a node crash or power loss, which can roll
back the last commits; an ack is a promise the mirror acts on (it forgets the record),
so the fsync is paid, once per batch, not per record.

De-duplication: ``request_id`` is unique (delivery is at-least-once). A record dropped
by retention and delivered again is stored again: the store remembers ids only as long
as it keeps their records.

Retention, oldest first (by ``seq``): records over ``max_bytes`` of payload in all, and
records stored more than ``max_age_s`` ago. The database file keeps its high-water size
(freed pages are reused, not returned); the WAL is truncated to ``WAL_LIMIT_BYTES``
after each checkpoint.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from atlas_sidecar.learning.records import TrafficRecord
from atlas_sidecar.learning.wire import decode, encode

WAL_LIMIT_BYTES = 64 << 20
MAX_READ = 10000  # records one ``read`` returns at most: bounded memory per call

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traffic (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    stored_at REAL NOT NULL,
    bytes INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS traffic_stored_at ON traffic (stored_at);
"""


class TrafficStore:
    """Mirrored records by ``seq`` (AUTOINCREMENT: never reused, so a reader's cursor
    stays valid across retention). Thread-safe: one connection behind a lock."""

    def __init__(self, path: str | Path, max_bytes: int, max_age_s: float) -> None:
        if max_bytes <= 0 or max_age_s <= 0:
            raise ValueError("max_bytes and max_age_s must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM traffic").fetchone()
        self._bytes = int(row[0])

    @property
    def stored_bytes(self) -> int:
        """Payload bytes of the records kept (what ``max_bytes`` bounds)."""
        return self._bytes

    def add(self, records: Iterable[TrafficRecord]) -> int:
        """Store the records in one transaction; return how many were new (the rest
        were already stored: same ``request_id``). Committed when it returns."""
        now = time.time()
        rows = [(r.request_id, now, *_payload(r)) for r in records]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                added = 0
                for request_id, stored_at, size, body in rows:
                    cursor = self._db.execute(
                        "INSERT OR IGNORE INTO traffic (request_id, stored_at, bytes, body)"
                        " VALUES (?, ?, ?, ?)",
                        (request_id, stored_at, size, body),
                    )
                    if cursor.rowcount == 1:
                        added += 1
                        self._bytes += size
                self._retain(now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._bytes = self._sum_bytes()
                raise
        return added

    def read(self, after: int = 0, limit: int = 1000) -> list[tuple[int, TrafficRecord]]:
        """Up to ``limit`` (at most MAX_READ) records with seq > ``after``, oldest first."""
        limit = max(0, min(limit, MAX_READ))
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body FROM traffic WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(int(seq), decode(body)) for seq, body in rows]

    def read_newest(self, before: int | None = None, limit: int = 1000,
                    since: float = 0.0) -> list[tuple[int, TrafficRecord]]:
        """Up to ``limit`` (at most MAX_READ) records with seq < ``before`` (any if None)
        stored at or after ``since`` (unix seconds, this store's clock, not a replica's),
        newest first. A reader of recent traffic pages backwards, passing the last seq it
        got as ``before``: memory stays one page, however much is kept."""
        limit = max(0, min(limit, MAX_READ))
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body FROM traffic WHERE seq < ? AND stored_at >= ?"
                " ORDER BY seq DESC LIMIT ?",
                (before if before is not None else 2**63 - 1, since, limit),
            ).fetchall()
        return [(int(seq), decode(body)) for seq, body in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM traffic").fetchone()[0])

    def has(self, request_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM traffic WHERE request_id = ?", (request_id,)
            ).fetchone()
        return row is not None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _retain(self, now: float) -> None:
        """Delete, oldest first, what is past ``max_age_s`` or over ``max_bytes``
        (inside the caller's transaction, holding the lock)."""
        cutoff = now - self.max_age_s
        expired = self._db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM traffic WHERE stored_at < ?", (cutoff,)
        ).fetchone()[0]
        if expired:
            self._db.execute("DELETE FROM traffic WHERE stored_at < ?", (cutoff,))
            self._bytes -= int(expired)
        while self._bytes > self.max_bytes:
            seq, size = self._db.execute(
                "SELECT seq, bytes FROM traffic ORDER BY seq LIMIT 1"
            ).fetchone()
            self._db.execute("DELETE FROM traffic WHERE seq = ?", (seq,))
            self._bytes -= int(size)

    def _sum_bytes(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM traffic").fetchone()[0])


def _payload(record: TrafficRecord) -> tuple[int, bytes]:
    body = encode(record)
    return len(body) + len(record.request_id.encode()), body
