"""The request journal: a QoS 1 request is acknowledged to the broker only once it is recorded here.

A row lives through queued -> replied -> done. ``replied`` holds the final reply until the broker has
acknowledged it, so a crash in between re-sends that reply instead of losing it or computing it twice.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edged.protocol import Envelope


class Published(Protocol):
    """What a publish returns (paho's MQTTMessageInfo): whether the broker has acknowledged it."""

    def is_published(self) -> bool: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    client TEXT NOT NULL,
    response_topic TEXT,
    correlation BLOB,
    content_type TEXT,
    received_at REAL NOT NULL,
    state TEXT NOT NULL,            -- queued, replied, done
    reply_topic TEXT,
    reply BLOB,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS requests_state ON requests (state, received_at);
"""


@dataclass(frozen=True)
class Unfinished:
    """A journaled request without an acknowledged final reply, found at start-up."""

    id: str
    envelope: Envelope
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
        self._db.executescript(_SCHEMA)

    def record(self, request_id: str, env: Envelope, dedupe_window_s: float) -> bool:
        """Records a new request durably; False when the id was seen within the window (a duplicate delivery)."""
        row = (
            request_id,
            env.payload,
            env.qos,
            env.client,
            env.response_topic,
            env.correlation,
            env.content_type,
            env.received_at,
        )
        with self._lock:
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "DELETE FROM requests WHERE id = ? AND state = 'done' AND received_at < ?",
                    (request_id, time.time() - dedupe_window_s),
                )
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO requests (id, payload, qos, client, response_topic, correlation,"
                    " content_type, received_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                    row,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")
            return cur.rowcount == 1

    def known(self, request_id: str, dedupe_window_s: float) -> bool:
        """Whether ``request_id`` is unfinished, or finished within the window (a duplicate delivery)."""
        with self._lock:
            row = self._db.execute("SELECT state, received_at FROM requests WHERE id = ?", (request_id,)).fetchone()
        return row is not None and (row[0] != "done" or row[1] >= time.time() - dedupe_window_s)

    def replied(self, request_id: str, topic: str, reply: bytes) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE requests SET state = 'replied', reply_topic = ?, reply = ? WHERE id = ? AND state = 'queued'",
                (topic, reply, request_id),
            )

    def done(self, request_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE requests SET state = 'done', finished_at = ?, payload = x'' WHERE id = ?",
                (time.time(), request_id),
            )

    def unfinished(self) -> list[Unfinished]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, payload, qos, client, response_topic, correlation, content_type, received_at,"
                " reply_topic, reply FROM requests WHERE state != 'done' ORDER BY received_at"
            ).fetchall()
        return [
            Unfinished(
                id=r[0],
                envelope=Envelope(
                    payload=r[1],
                    qos=r[2],
                    client=r[3],
                    response_topic=r[4],
                    correlation=r[5],
                    content_type=r[6],
                    received_at=r[7],
                ),
                reply_topic=r[8],
                reply=r[9],
            )
            for r in rows
        ]

    def prune(self, keep: int, keep_s: float) -> int:
        """Drops finished entries older than ``keep_s`` or beyond the newest ``keep``."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM requests WHERE state = 'done' AND (finished_at < ? OR id NOT IN"
                " (SELECT id FROM requests WHERE state = 'done' ORDER BY finished_at DESC LIMIT ?))",
                (time.time() - keep_s, keep),
            )
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Deliveries:
    """Marks a journaled request done once the broker acknowledged its final reply."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._pending: list[tuple[Published, str]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edged-deliveries", daemon=True)
        self._thread.start()

    def track(self, info: Published, request_id: str) -> None:
        with self._cond:
            self._pending.append((info, request_id))
            self._cond.notify()

    def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                if not self._pending:
                    break
            time.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(2)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                if not self._pending:
                    self._cond.wait(1.0)
                delivered = [p for p in self._pending if p[0].is_published()]
                self._pending = [p for p in self._pending if not p[0].is_published()]
            for _, request_id in delivered:
                self._journal.done(request_id)
            if not delivered:
                time.sleep(0.01)
