"""The contract's pure parts: request parsing, reply routes and their confinement, identities, bounds,
admission, displacement, fleet membership and the lifecycle, each from a table of cases."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from edged.admission import NodeState, displaced, in_fleet, refusal
from edged.governor import Thresholds, limits
from edged.lifecycle import Lifecycle
from edged.protocol import Defaults, Envelope, Identity, Refusal, Request, parse, parse_cancel, publish_topic_problem
from edged.scheduler import RateLimiter

DEFAULTS = Defaults(
    prefix="edged",
    node="pi",
    system_prompt="",
    max_tokens=64,
    max_tokens_cap=128,
    deadline_ms=1000,
    max_payload_bytes=1024,
)
V1 = "edged/pi/ask"


def ok(env: Envelope) -> Request:
    parsed = parse(env, DEFAULTS)
    assert isinstance(parsed, Request), parsed
    return parsed


def refused(env: Envelope) -> Refusal:
    parsed = parse(env, DEFAULTS)
    assert isinstance(parsed, Refusal), parsed
    return parsed


@pytest.mark.parametrize(
    ("env", "topic", "request_id"),
    [
        (Envelope(V1, b'{"id": "a1", "prompt": "x", "reply_to": "k/1"}', 1, response_topic="v5/t"), "v5/t", "a1"),
        (Envelope(V1, b'{"id": "a1", "prompt": "x", "reply_to": "k/1"}', 1), "k/1", "a1"),
        (Envelope(V1, b'{"id": "a1", "prompt": "x"}', 1), "edged/pi/answer/a1", "a1"),
        (Envelope(V1, b"plain question", 0, correlation=b"c-9"), "edged/pi/answer/c-9", "c-9"),
        (Envelope("edged/pi/ask/kiosk1", b'{"id": "a1", "prompt": "x"}', 1), "edged/pi/answer/kiosk1/a1", "a1"),
        (Envelope("edged/fleet/ask/kiosk1", b"hi", 1, correlation=b"f-1"), "edged/pi/answer/kiosk1/f-1", "f-1"),
        (Envelope("edged/pi/ask/k1", b"hi", 1, response_topic="kiosk/k1/r", correlation=b"z"), "kiosk/k1/r", None),
    ],
)
def test_reply_route_precedence(env: Envelope, topic: str, request_id: str | None) -> None:
    req = ok(env)
    assert req.route.topic == topic
    assert request_id is None or req.id == request_id


@pytest.mark.parametrize(
    ("topic", "words"),
    [
        ("kiosk/7/#", "wildcards"),
        ("kiosk/+/x", "wildcards"),
        ("$SYS/broker/x", "start with $"),
        ("$share/g/kiosk/x", "start with $"),
        ("kiosk/\x01", "control characters"),
        ("kiosk/\x7f", "control characters"),
        ("kiosk/\x85", "control characters"),
        ("kiosk/\ufffe", "noncharacters"),
        ("kiosk/\ufdd0", "noncharacters"),
        ("/".join(["a"] * 250), "levels"),
        ("k/" + "x" * 300, "bytes"),
        ("", "empty"),
    ],
)
def test_invalid_publish_topics_are_named(topic: str, words: str) -> None:
    problem = publish_topic_problem(topic)
    assert problem is not None and words in problem


@pytest.mark.parametrize(
    ("ask_topic", "reply_topic", "allowed"),
    [
        # v1 requests: any valid topic but the never-allowed ones
        (V1, "any/topic", True),
        (V1, "edged/pi/answer/x", True),
        (V1, "edged/pi/status", False),
        (V1, "edged/pi/telemetry", False),
        (V1, "edged/pi/ask", False),
        (V1, "edged/other/answer/x", False),
        (V1, "edged/fleet/ask", False),
        (V1, "homeassistant/sensor/pi/config", False),
        (V1, "homeassistant", False),
        (V1, "$SYS/x", False),
        (V1, "edgedish/x", True),  # a prefix of a level is not the level
        # scoped requests: their own answers and kiosk/<client>/... only
        ("edged/pi/ask/k1", "edged/pi/answer/k1/r-1", True),
        ("edged/pi/ask/k1", "kiosk/k1/answers", True),
        ("edged/pi/ask/k1", "kiosk/k2/answers", False),
        ("edged/pi/ask/k1", "edged/pi/answer/k2/r-1", False),
        ("edged/pi/ask/k1", "any/topic", False),
        ("edged/pi/ask/k1", "edged/pi/status", False),
    ],
)
def test_reply_routes_are_confined(ask_topic: str, reply_topic: str, allowed: bool) -> None:
    env = Envelope(ask_topic, b'{"id": "r-1", "prompt": "x"}', 1, response_topic=reply_topic)
    parsed = parse(env, DEFAULTS)
    if allowed:
        assert isinstance(parsed, Request) and parsed.route.topic == reply_topic
    else:  # refused on the asker's default answer topic, never on the asked one
        assert isinstance(parsed, Refusal) and parsed.error.code == "invalid_request"
        assert parsed.route.topic == DEFAULTS.answer_topic(parsed.identity, "r-1")
        assert "reply topic" in parsed.error.message


def test_reply_to_in_the_payload_is_confined_too() -> None:
    r = refused(
        Envelope("edged/pi/ask/k1", json.dumps({"id": "q", "prompt": "x", "reply_to": "kiosk/k2/x"}).encode(), 1)
    )
    assert r.route.topic == "edged/pi/answer/k1/q"


@pytest.mark.parametrize(
    ("env", "identity"),
    [
        (Envelope("edged/pi/ask/kiosk1", b'{"prompt": "x", "client": "someone-else"}', 1), Identity("kiosk1", True)),
        (Envelope("edged/fleet/ask/k-2", b"hi", 1), Identity("k-2", True)),
        (Envelope(V1, b'{"prompt": "x", "client": "k9"}', 1, response_topic="r/1"), Identity("k9", False)),
        (Envelope(V1, b'{"prompt": "x"}', 1, response_topic="r/1"), Identity("r/1", False)),
    ],
)
def test_identity_comes_from_the_topic_when_scoped(env: Envelope, identity: Identity) -> None:
    assert ok(env).identity == identity


def test_scoped_and_v1_identities_never_share_a_key() -> None:
    assert Identity("k1", True).key != Identity("k1", False).key


def test_a_bad_client_level_is_refused() -> None:
    r = refused(Envelope("edged/pi/ask/bad.name", b"hi", 1))
    assert r.error.code == "invalid_request" and "client level" in r.error.message


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b'{"a": ' * 40 + b"1" + b"}" * 40, "nested too deeply"),
        (b'{"prompt": "x", "a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested too deeply"),
        (b'{"prompt": "x", "temperature": ' + b"9" * 400 + b"}", "digits is out of range"),
        (b'{"prompt": "x", "deadline_ms": ' + b"9" * 400 + b"}", "digits is out of range"),
        (b'{"prompt": "x", "top_p": 1e999}', "out of range"),
        (b'{"prompt": "x", "temperature": NaN}', "NaN is not a number"),
        (b'{"prompt": "x", "\\ud800": 1}', "lone surrogate"),
        (b'{"prompt": "x", "reply_to": "k/\\udfff"}', "lone surrogate"),
        (b'{"prompt": "x", "deadline_ms": 999999999999}', "deadline_ms must be between"),
        (b'{"prompt": "x", "seed": -1}', "seed must be between 0"),
        (b'{"prompt": "unclosed', "not valid JSON"),
        (b' {"prompt": "x"} [', "not valid JSON"),
        (b"caf\xe9", "not valid UTF-8"),
        (b'{"prompt": "x", "reply_to": 5}', "reply_to must be a topic string"),
    ],
)
def test_bounded_parsing_refuses_with_a_reason(payload: bytes, words: str) -> None:
    r = refused(Envelope(V1, payload, 1, response_topic="r/1"))
    assert r.error.code == "invalid_request" and words in r.error.message, r.error.message
    assert r.route.topic in ("r/1", f"edged/pi/answer/{r.id}")


def test_json_content_type_makes_any_payload_json() -> None:
    r = refused(Envelope(V1, b'["prompt"]', 1, content_type="application/json"))
    assert "must be an object" in r.error.message
    deep = parse(
        Envelope(V1, b"[" * 5000, 1, content_type="application/json"), replace(DEFAULTS, max_payload_bytes=8000)
    )
    assert isinstance(deep, Refusal) and "nested too deeply" in deep.error.message  # RecursionError, caught


def test_oversized_payload_is_refused_unread_with_the_v5_route() -> None:
    r = refused(Envelope(V1, b'{"prompt": "' + b"x" * 5000 + b'"}', 1, response_topic="r/1", correlation=b"big-1"))
    assert r.error.code == "too_long" and r.id == "big-1" and r.route.topic == "r/1"


def test_plain_text_is_one_user_turn_with_node_defaults() -> None:
    req = ok(Envelope(V1, "Wie spät ist es?".encode(), 1, received_at=100.0))
    assert [(m.role, m.content) for m in req.generation.messages] == [("user", "Wie spät ist es?")]
    assert req.generation.max_tokens == 64 and req.deadline_at == 101.0 and req.priority == "normal"


def test_max_tokens_is_capped_and_system_goes_first() -> None:
    req = ok(Envelope(V1, b'{"prompt": "hi", "system": "Be brief.", "max_tokens": 999}', 1))
    assert req.generation.max_tokens == 128
    assert [m.role for m in req.generation.messages] == ["system", "user"]


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("edged/pi/cancel/k1", b'{"id": "r-1"}', (Identity("k1", True), "r-1")),
        ("edged/pi/cancel/k1", b'{"id": "r-1", "client": "k2"}', (Identity("k1", True), "r-1")),
        ("edged/pi/cancel", b'{"id": "r-1", "client": "k2"}', (Identity("k2", False), "r-1")),
        ("edged/pi/cancel", b'{"id": "r-1"}', (None, "r-1")),
    ],
)
def test_cancels_are_scoped_to_their_topic(topic: str, payload: bytes, expected: tuple[Identity | None, str]) -> None:
    assert parse_cancel(Envelope(topic, payload, 1), DEFAULTS) == expected


def test_rate_limiter_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(per_min=60, burst=2, clock=lambda: now[0])
    assert limiter.admit("k") is None and limiter.admit("k") is None
    assert limiter.admit("k") == 1.0  # one token a second
    assert limiter.admit("other") is None
    now[0] = 1.0
    assert limiter.admit("k") is None


def test_rate_limiter_table_is_bounded_and_keeps_limited_clients() -> None:
    now = [0.0]
    limiter = RateLimiter(per_min=60, burst=1, clock=lambda: now[0], max_clients=100)
    assert limiter.admit("flooder") is None
    for i in range(1000):  # a new name every time: the table must not grow with them
        limiter.admit(f"name-{i}")
    assert len(limiter) <= 100
    now[0] = 0.5
    limiter.admit("flooder")
    for i in range(50):
        limiter.admit(f"late-{i}")
    assert limiter.admit("flooder") is not None, "a client that is being limited is not forgotten first"


NORMAL = limits("normal", Thresholds())


def node(**kw: object) -> NodeState:
    values: dict[str, object] = {
        "model_ready": True,
        "reason": None,
        "governor": "normal",
        "limits": NORMAL,
        "governor_retry_s": 30.0,
        "queue_room": True,
    }
    return NodeState(**{**values, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rate_retry", "state", "code"),
    [
        (None, node(), None),
        (3.0, node(), "rate_limited"),
        (None, node(model_ready=False, reason="no model"), "model_unavailable"),
        (None, node(governor="critical", limits=limits("critical", Thresholds())), "thermal"),
        (None, node(governor="low_power", limits=limits("low_power", Thresholds(low_power_action="refuse"))), "power"),
        (None, node(queue_room=False), "busy"),
        (3.0, node(queue_room=False), "rate_limited"),
    ],
)
def test_admission(rate_retry: float | None, state: NodeState, code: str | None) -> None:
    error = refusal("k1", rate_retry, state)
    assert (error.code if error else None) == code
    assert error is None or error.retry_after_s is not None


@pytest.mark.parametrize(
    ("rank", "queued", "victim"),
    [
        (0, [(1, 1, "n1"), (2, 2, "b1"), (2, 3, "b2"), (1, 4, "n2")], "b2"),  # newest background
        (0, [(1, 1, "n1"), (1, 4, "n2"), (0, 5, "a1")], "n2"),  # else newest normal
        (0, [(0, 1, "a1"), (0, 2, "a2")], None),  # alerts are never displaced
        (1, [(2, 1, "b1")], None),  # only an alert displaces
        (2, [(2, 1, "b1")], None),
    ],
)
def test_alerts_displace_lower_priority_work(rank: int, queued: list[tuple[int, int, str]], victim: str | None) -> None:
    assert displaced(rank, queued) == victim


@pytest.mark.parametrize(
    ("ready", "state", "depth", "member"),
    [(True, "normal", 0, True), (True, "normal", 16, False), (False, "normal", 0, False), (True, "hot", 0, False)],
)
def test_fleet_membership(ready: bool, state: str, depth: int, member: bool) -> None:
    assert in_fleet(ready, limits(state, Thresholds()), depth, 16) is member


@pytest.mark.parametrize(
    ("life", "state", "reason"),
    [
        (Lifecycle(), "offline", "starting"),
        (Lifecycle().loaded(), "online", None),
        (Lifecycle().failed("run `edged model build x` first"), "degraded", "run `edged model build x` first"),
        (Lifecycle().loaded().sensed("warm", 72.0), "online", None),
        (Lifecycle().loaded().sensed("hot", 81.5), "degraded", "governor hot at 81.5 C"),
        (Lifecycle().loaded().sensed("low_power", 40.0), "degraded", "governor low_power"),
        (Lifecycle().loaded().stopping(), "offline", "stopping"),
        (Lifecycle().stopping().loaded(), "offline", "stopping"),
        (Lifecycle().failed("x").loaded(), "online", None),  # a reload that brings a model back
    ],
)
def test_lifecycle(life: Lifecycle, state: str, reason: str | None) -> None:
    assert (life.state, life.reason) == (state, reason)
    assert life.model_ready is (state == "online" or (state == "degraded" and life.model_error is None))
