"""Request parsing and reply routing as pure functions."""

from __future__ import annotations

import pytest

from edged.protocol import Defaults, Envelope, parse, route_of
from edged.scheduler import RateLimiter

DEFAULTS = Defaults(
    answer_prefix="edged/pi/answer",
    system_prompt="",
    max_tokens=64,
    max_tokens_cap=128,
    deadline_ms=1000,
    max_payload_bytes=1024,
)


@pytest.mark.parametrize(
    ("env", "topic", "request_id"),
    [
        (Envelope(b'{"id": "a1", "prompt": "x", "reply_to": "k/1"}', 1, "", response_topic="v5/t"), "v5/t", "a1"),
        (Envelope(b'{"id": "a1", "prompt": "x", "reply_to": "k/1"}', 1, ""), "k/1", "a1"),
        (Envelope(b'{"id": "a1", "prompt": "x"}', 1, ""), "edged/pi/answer/a1", "a1"),
        (Envelope(b"plain question", 0, "", correlation=b"c-9"), "edged/pi/answer/c-9", "c-9"),
        (Envelope(b'{"id": "a1", "reply_to": "bad/#"}', 1, ""), "edged/pi/answer/a1", "a1"),
    ],
)
def test_reply_route_precedence(env: Envelope, topic: str, request_id: str) -> None:
    rid, route, _ = route_of(env, DEFAULTS)
    assert (route.topic, rid) == (topic, request_id)


def test_plain_text_is_one_user_turn_with_node_defaults() -> None:
    req = parse(Envelope("Wie spät ist es?".encode(), 1, "", received_at=100.0), DEFAULTS)
    assert [(m.role, m.content) for m in req.generation.messages] == [("user", "Wie spät ist es?")]
    assert req.generation.max_tokens == 64 and req.deadline_at == 101.0 and req.priority == "normal"


def test_max_tokens_is_capped_and_system_goes_first() -> None:
    req = parse(Envelope(b'{"prompt": "hi", "system": "Be brief.", "max_tokens": 999}', 1, ""), DEFAULTS)
    assert req.generation.max_tokens == 128
    assert [m.role for m in req.generation.messages] == ["system", "user"]


def test_rate_limiter_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(per_min=60, burst=2, clock=lambda: now[0])
    assert limiter.admit("k") is None and limiter.admit("k") is None
    assert limiter.admit("k") == 1.0  # one token a second
    assert limiter.admit("other") is None
    now[0] = 1.0
    assert limiter.admit("k") is None
