"""The request journal: SQLite rows only. A QoS 1 request is acknowledged once it is recorded here.

A row is keyed by (identity, id) and lives through queued -> replied -> done. ``replied`` holds the final
reply until the broker has acknowledged it, so a crash in between re-sends that reply instead of losing it
or computing it twice; a done row keeps its reply for the dedupe window, to answer a retried id again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edged.protocol import Envelope

_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    identity TEXT NOT NULL,         -- Identity.key: request ids are unique per asker
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    response_topic TEXT,
    correlation BLOB,
    content_type TEXT,
    received_at REAL NOT NULL,
    state TEXT NOT NULL,            -- queued, replied, done; or refused (an error reply, not kept for retries)
    attempts INTEGER NOT NULL DEFAULT 0,
    reply_topic TEXT,
    reply BLOB,
    finished_at REAL,
    PRIMARY KEY (identity, id)
);
CREATE INDEX IF NOT EXISTS requests_state ON requests (state, received_at);
"""
# Version 1 keyed rows by id alone; its unfinished rows are carried over as v1 (unscoped) requests.
_MIGRATE_1 = """
ALTER TABLE requests RENAME TO requests_v1;
DROP INDEX IF EXISTS requests_state;
{schema}
INSERT INTO requests (identity, id, topic, payload, qos, response_topic, correlation, content_type,
                      received_at, state, reply_topic, reply, finished_at)
    SELECT '~' || COALESCE(NULLIF(client, ''), response_topic, ''), id, '', payload, qos, response_topic,
           correlation, content_type, received_at, state, reply_topic, reply, finished_at FROM requests_v1;
DROP TABLE requests_v1;
"""


@dataclass(frozen=True)
class Seen:
    """What the journal knows of an (identity, id): its state and, once replied, the final reply."""

    state: str
    reply: bytes | None
    received_at: float


@dataclass(frozen=True)
class Unfinished:
    """A journaled request without an acknowledged final reply, found at start-up."""

    key: str
    id: str
    envelope: Envelope
    attempts: int  # starts of the daemon that already tried it
    reply_topic: str | None  # set when a final reply was produced but maybe not delivered
    reply: bytes | None


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Recording a request fsyncs (it is acknowledged to the broker next: it must survive power loss);
        # later state changes only need to survive a crash of the process, which WAL gives without fsync.
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        old = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'").fetchone()
        if version < _SCHEMA_VERSION and old is not None:
            self._db.executescript("BEGIN;" + _MIGRATE_1.format(schema=_SCHEMA) + "COMMIT;")
        else:
            self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        self._expected: dict[tuple[str, str], threading.Event] = {}  # records under way

    def expect(self, key: str, request_id: str) -> None:
        """Announces the ``record`` of (key, id) that comes next: ``replied`` for that row waits for it."""
        with self._lock:
            self._expected[(key, request_id)] = threading.Event()

    def unexpect(self, key: str, request_id: str) -> None:
        with self._lock:
            event = self._expected.pop((key, request_id), None)
        if event is not None:
            event.set()

    def seen(self, key: str, request_id: str, window_s: float) -> Seen | None:
        """The row of (key, id) when it is unfinished or was received within the dedupe window."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, reply, received_at FROM requests WHERE identity = ? AND id = ?", (key, request_id)
            ).fetchone()
        if row is None or (row[0] in ("done", "refused") and row[2] < time.time() - window_s):
            return None
        return Seen(row[0], row[1], row[2])

    def record(self, key: str, request_id: str, env: Envelope) -> None:
        """Records a new request durably (an older finished row of the same key and id is replaced)."""
        row = (
            key,
            request_id,
            env.topic,
            env.payload,
            env.qos,
            env.response_topic,
            env.correlation,
            env.content_type,
            env.received_at,
        )
        with self._lock:
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO requests (identity, id, topic, payload, qos, response_topic, correlation,"
                    " content_type, received_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                    row,
                )
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")
                event = self._expected.pop((key, request_id), None)
        if event is not None:
            event.set()

    def refused(self, key: str, request_id: str, env: Envelope, reply: bytes) -> None:
        """Notes an error reply, so that the broker redelivering the same message is not taken as new.

        A client's own retry of a refused id is welcome (``busy`` passes): only redeliveries consult this.
        A row the (key, id) already has, an accepted request's above all, is left as it is.
        """
        row = (key, request_id, env.topic, env.qos, env.received_at, reply, time.time())
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO requests (identity, id, topic, payload, qos, received_at, state, reply,"
                " finished_at) VALUES (?, ?, ?, x'', ?, ?, 'refused', ?, ?)",
                row,
            )

    def replied(self, key: str, request_id: str, topic: str, reply: bytes) -> None:
        with self._lock:
            event = self._expected.get((key, request_id))
        if event is not None:
            event.wait(10)  # the request's own record (an fsync) is still under way
        with self._lock:
            self._db.execute(
                "UPDATE requests SET state = 'replied', reply_topic = ?, reply = ?, payload = x''"
                " WHERE identity = ? AND id = ? AND state = 'queued'",
                (topic, reply, key, request_id),
            )

    def done(self, key: str, request_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE requests SET state = 'done', finished_at = ? WHERE identity = ? AND id = ?",
                (time.time(), key, request_id),
            )

    def attempt(self, key: str, request_id: str) -> None:
        """Counts a start that takes up an unfinished row, so a request that crashes every run can be ended."""
        with self._lock:
            self._db.execute(
                "UPDATE requests SET attempts = attempts + 1 WHERE identity = ? AND id = ?", (key, request_id)
            )

    def unfinished(self) -> list[Unfinished]:
        with self._lock:
            rows = self._db.execute(
                "SELECT identity, id, topic, payload, qos, response_topic, correlation, content_type, received_at,"
                " attempts, reply_topic, reply FROM requests WHERE state IN ('queued', 'replied') ORDER BY received_at"
            ).fetchall()
        return [
            Unfinished(
                key=r[0],
                id=r[1],
                envelope=Envelope(
                    topic=r[2],
                    payload=r[3],
                    qos=r[4],
                    response_topic=r[5],
                    correlation=r[6],
                    content_type=r[7],
                    received_at=r[8],
                ),
                attempts=r[9],
                reply_topic=r[10],
                reply=r[11],
            )
            for r in rows
        ]

    def counts(self) -> dict[str, int]:
        """Rows per state, for tests and `edged doctor`."""
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall())

    def prune(self, keep: int, keep_s: float) -> int:
        """Drops finished entries older than ``keep_s`` or beyond the newest ``keep``."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM requests WHERE state IN ('done', 'refused') AND (finished_at < ? OR rowid NOT IN"
                " (SELECT rowid FROM requests WHERE state IN ('done', 'refused') ORDER BY finished_at DESC LIMIT ?))",
                (time.time() - keep_s, keep),
            )
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
