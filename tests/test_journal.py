"""The journal's rows: keyed per identity, refusals kept apart from accepted requests, and a journal of
the previous schema (ids global) carried over with its unfinished requests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edged.journal import Journal
from edged.protocol import Envelope

ENV = Envelope("edged/pi/ask/k1", b'{"prompt": "hi"}', 1, received_at=1e9)


def test_ids_are_per_identity(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.record("@k1", "same", ENV)
    journal.record("@k2", "same", ENV)
    journal.replied("@k1", "same", "edged/pi/answer/k1/same", b"reply-1")
    seen = journal.seen("@k1", "same", 1e12)
    assert seen is not None and seen.reply == b"reply-1"
    assert sorted((u.key, u.reply or b"") for u in journal.unfinished()) == [("@k1", b"reply-1"), ("@k2", b"")]


def test_a_refusal_never_replaces_an_accepted_request(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.record("@k1", "r", ENV)
    journal.refused("@k1", "r", ENV, b"error")  # the same id again, refused: the running request stays
    seen = journal.seen("@k1", "r", 1e12)
    assert seen is not None and seen.state == "queued"
    journal.refused("@k1", "other", ENV, b"error")
    assert journal.seen("@k1", "other", 1e12).state == "refused"  # type: ignore[union-attr]
    assert [u.id for u in journal.unfinished()] == ["r"], "refusals are not replayed"
    journal.record("@k1", "other", ENV)  # a client's retry of a refused id is a new request
    assert journal.seen("@k1", "other", 1e12).state == "queued"  # type: ignore[union-attr]


def test_a_version_1_journal_is_carried_over(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE requests (id TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL,
        client TEXT NOT NULL, response_topic TEXT, correlation BLOB, content_type TEXT, received_at REAL NOT NULL,
        state TEXT NOT NULL, reply_topic TEXT, reply BLOB, finished_at REAL);
        CREATE INDEX requests_state ON requests (state, received_at);"""
    )
    db.execute(
        "INSERT INTO requests VALUES"
        " ('old-1', x'6869', 1, 'kiosk-9', 'r/9', NULL, NULL, 1e9, 'queued', NULL, NULL, NULL)"
    )
    db.execute("INSERT INTO requests VALUES ('old-2', x'', 1, '', 'r/7', NULL, NULL, 1e9, 'done', NULL, x'00', 1e9)")
    db.commit()
    db.close()
    journal = Journal(path)
    rows = journal.unfinished()
    assert [(r.key, r.id, r.envelope.payload, r.envelope.response_topic) for r in rows] == [
        ("~kiosk-9", "old-1", b"hi", "r/9")
    ]
    assert journal.counts() == {"queued": 1, "done": 1}
    journal.close()
    assert Journal(path).unfinished()[0].id == "old-1", "opening it again changes nothing"
