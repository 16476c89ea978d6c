"""A fuzz suite for the MQTT contract: property-based tests of the pure parser (thousands of hypothesis
examples, no broker), then over a thousand seeded generated messages through a real Mosquitto to a real
`edged serve` with the real SmolLM2 model, over MQTT v5 and v3.1.1."""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged import protocol
from edged.errors import InvalidRequest
from edged.protocol import Defaults, Envelope, Identity, Refusal, Request
from tests.mqttlab import (
    Listener,
    Mosquitto,
    Node,
    contract_node,
    module_broker,  # noqa: F401 (a fixture)
)

# The contract's error codes (CONTRACT.md, Replies); parsing alone can only produce the first two.
CODES = {"invalid_request", "too_long", "busy", "thermal", "power", "rate_limited", "model_unavailable", "internal"}
PARSE_CODES = {"invalid_request", "too_long"}
# The request fields of CONTRACT.md (v1 table plus the v1.1 `client`), written out again here on purpose.
CONTRACT_FIELDS = (
    "id",
    "prompt",
    "messages",
    "system",
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repeat_penalty",
    "seed",
    "stop",
    "stream",
    "reply_to",
    "priority",
    "deadline_ms",
    "profile",
    "format",
    "client",
)
MAX_PAYLOAD = 4096
DEFAULTS = Defaults(
    prefix="edged",
    node="pi",
    system_prompt="",
    max_tokens=4,
    max_tokens_cap=4,
    deadline_ms=120_000,
    max_payload_bytes=MAX_PAYLOAD,
)
ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
OWN_ANSWERS = "edged/pi/answer/"
# Every hypothesis test is derandomized: CI runs the same examples every time, and a failure reproduces.
FAST = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
}


# -- the contract's topic rules, written out again independently of edged.protocol -----------------


def contract_topic_problem(topic: str) -> str | None:
    """Why CONTRACT.md v1.1 says ``topic`` is not a valid reply topic, or None."""
    if not topic:
        return "empty"
    if "+" in topic or "#" in topic:
        return "wildcard"
    if topic.startswith("$"):
        return "$-topic"
    for ch in topic:
        cp = ord(ch)
        if cp < 0x20 or 0x7F <= cp <= 0x9F:
            return f"control character U+{cp:04X}"
        if 0xD800 <= cp <= 0xDFFF:
            return f"lone surrogate U+{cp:04X}"
        if 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE:
            return f"noncharacter U+{cp:04X}"
    if topic.count("/") + 1 > 16:
        return "more than 16 levels"
    if len(topic.encode()) > 256:
        return "more than 256 bytes"
    return None


def contract_route_problem(topic: str, identity: Identity) -> str | None:
    """Why the node may not reply on ``topic`` for ``identity`` under the default reply_topics, or None."""
    problem = contract_topic_problem(topic)
    if problem is not None:
        return problem
    if (topic == "edged" or topic.startswith("edged/")) and not topic.startswith(OWN_ANSWERS):
        return "an edged/ topic other than this node's answers"
    if topic == "homeassistant" or topic.startswith("homeassistant/"):
        return "under homeassistant/"
    if identity.scoped:
        mine = (f"{OWN_ANSWERS}{identity.name}", f"kiosk/{identity.name}")
        if not any(topic == m or topic.startswith(m + "/") for m in mine):
            return f"outside the reply_topics of {identity.name}"
    return None


def scoped_client(topic: str) -> str | None:
    """The identity a v1.1 ask topic vouches for, or None for a v1 topic or an invalid client level."""
    for base in ("edged/pi/ask/", "edged/fleet/ask/"):
        if topic.startswith(base) and CLIENT_RE.fullmatch(topic[len(base) :]):
            return topic[len(base) :]
    return None


# -- strategies ------------------------------------------------------------------------------------

SPECIAL_CHARS = [
    *"\x00\x01\x1f\x7f\x80\x85\x9f",
    *"\ufdd0\ufdef\ufffe\uffff\ud800\udbff\udc00\udfff",
    "\U0001fffe",
    "\U0010ffff",
    *"+#/$ é東",
    "\U0001f345",
]
TOPIC_CHARS = st.one_of(st.characters(), st.sampled_from(SPECIAL_CHARS), st.sampled_from("abc/"))
FIXED_TOPICS = [
    "$SYS/broker/load",
    "$share/g/t",
    "edged/pi/ask",
    "edged/pi/ask/k1",
    "edged/pi/cancel",
    "edged/pi/cancel/k1",
    "edged/pi/status",
    "edged/pi/telemetry",
    "edged/fleet/ask",
    "edged/fleet/ask/k1",
    "edged/other/answer/x",
    "edged/pi/answer",
    "edged/pi/answerx/1",
    "edged/pi/answer/x",
    "edged/pi/answer/k1/x",
    "edged",
    "edgedx/y",
    "homeassistant",
    "homeassistant/sensor/pi/config",
    "homeassistantx/a",
    "kiosk/k1/r",
    "kiosk/k1",
    "kiosk/k2/r",
    "/",
    "a//b",
    " ",
    "fuzz/ok",
]
REPLY_TOPICS = st.one_of(
    st.text(TOPIC_CHARS, max_size=30),
    st.sampled_from(FIXED_TOPICS),
    st.integers(1, 250).map(lambda n: "/".join(["l"] * n)),
    st.integers(240, 300).map(lambda n: "r/" + "x" * n),
    st.integers(126, 130).map(lambda n: "é" * n),  # 2 bytes each: around the 256-byte limit
    st.text("ab/+#$", max_size=12),
    st.from_regex(r"fuzz/[a-z0-9/]{0,20}", fullmatch=True),
)
VALID_CLIENT = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
INVALID_CLIENT = st.one_of(
    st.just(""),
    st.text("ab09_-", min_size=65, max_size=70),
    st.text(TOPIC_CHARS, min_size=1, max_size=12).filter(lambda s: not CLIENT_RE.fullmatch(s)),
)
NUMBER_TOKENS = st.sampled_from(
    [
        "9" * 400,
        "-" + "9" * 400,
        "1" + "0" * 399 + ".5",
        "1e308",
        "-1e308",
        "1e309",
        "1E400",
        "1e-300",
        "1e-400",
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "0",
        "-0",
        "1",
        "2",
        "-1",
        "0.5",
        "2.0000001",
        "4.0",
        "1.0e1",
        "123456789012345678",
        "1234567890123456789",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775809",
    ]
)
RAW_STRINGS = st.sampled_from(
    ['"\\ud800"', '"a\\udfffb"', '"\\udbff\\udfff"', '"\\ud800\\u0041"', '"\\u0000"', '"\\ufffe"', '"\\"', '"\\x"']
)
STRING_TOKENS = st.one_of(
    st.text(max_size=30).map(json.dumps),
    st.text(TOPIC_CHARS, max_size=30).map(lambda s: json.dumps(s, ensure_ascii=False)),
    RAW_STRINGS,
    st.integers(0, 6000).map(lambda n: json.dumps("x" * n)),
)
KEY_TOKENS = st.one_of(
    st.sampled_from(CONTRACT_FIELDS).map(json.dumps),
    st.sampled_from(['"colour"', '""', '"\\ud800"', '"role"', '"content"', '"PROMPT"', '"prompt "']),
)
JSON_VALUES = st.recursive(
    st.one_of(NUMBER_TOKENS, STRING_TOKENS, st.sampled_from(["true", "false", "null"])),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(KEY_TOKENS, kids), max_size=4).map(
            lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
        ),
    ),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "wizard", ""]), "content": st.text(max_size=20)}
    ),
    max_size=4,
)


def _good_value(name: str, client: str) -> st.SearchStrategy[Any]:
    """A value of the type the contract names for ``name``, at and beyond its limits."""
    return {
        "id": st.from_regex(r"[A-Za-z0-9._:-]{1,130}", fullmatch=True),
        "prompt": st.text(max_size=60),
        "messages": MESSAGES,
        "system": st.text(max_size=20),
        "max_tokens": st.one_of(st.integers(-2, 3), st.integers(1, 2**63)),
        "temperature": st.one_of(st.floats(0, 2.5), st.floats(allow_nan=True, allow_infinity=True)),
        "top_k": st.integers(-1, 2**64),
        "top_p": st.floats(-0.1, 1.1),
        "repeat_penalty": st.floats(0, 1e300),
        "seed": st.integers(-1, 2**64),
        "stop": st.lists(st.text(max_size=5), max_size=9),
        "stream": st.booleans(),
        "reply_to": st.one_of(REPLY_TOPICS, st.just(f"kiosk/{client}/r")),
        "priority": st.sampled_from(["alert", "normal", "background", "urgent", ""]),
        "deadline_ms": st.integers(-1, 10**10),
        "profile": st.one_of(st.none(), st.text(max_size=8)),
        "format": st.one_of(st.none(), st.just("json"), st.just({"type": "object"})),
        "client": st.one_of(st.text(max_size=12), VALID_CLIENT),
    }[name]


@st.composite
def json_requests(draw: st.DrawFn, client: str = "k1") -> str:
    """A JSON object from the contract's fields: each value the right type (at its limits) or any JSON."""
    parts = []
    if draw(st.booleans()):
        parts.append(f'"prompt":{json.dumps(draw(st.text(max_size=40)))}')
    for name in draw(st.lists(st.sampled_from(CONTRACT_FIELDS), max_size=8)):
        # a good value is dumped with NaN and Infinity as their tokens
        value = json.dumps(draw(_good_value(name, client))) if draw(st.booleans()) else draw(JSON_VALUES)
        parts.append(f"{json.dumps(name)}:{value}")
    if draw(st.integers(0, 9)) == 0:
        parts.append(f"{draw(KEY_TOKENS)}:{draw(JSON_VALUES)}")
    return "{" + ",".join(parts) + "}"


def _deep(depth: int, shape: str) -> bytes:
    if shape == "list":
        return ("[" * depth + "]" * depth).encode()
    if shape == "object":
        return ('{"a":' * depth + "1" + "}" * depth).encode()
    if shape == "prompt":
        return ('{"prompt":"hi","stop":' + "[" * depth + "]" * depth + "}").encode()
    return ('{"messages":' + "[" * depth).encode()  # unclosed


BAD_UTF8 = st.tuples(
    st.text(max_size=20),
    st.sampled_from(
        [b"\xff", b"\xfe", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
    ),
    st.booleans(),
).map(lambda t: (b'{"prompt":"' if t[2] else b"") + t[0].encode() + t[1] + (b'"}' if t[2] else b""))
OVERSIZE = st.tuples(
    st.integers(MAX_PAYLOAD + 1, MAX_PAYLOAD * 3), st.sampled_from([b"x", b"{", b"\xff", b" ", b'{"prompt":"'])
).map(lambda t: (t[1] * t[0])[: t[0]].ljust(t[0], b"x"))
AT_THE_LIMIT = st.integers(MAX_PAYLOAD - 2, MAX_PAYLOAD + 2).map(
    lambda n: b'{"prompt":"' + b"x" * (n - len(b'{"prompt":""}')) + b'"}'
)


def payloads(client: str = "k1") -> st.SearchStrategy[bytes]:
    as_utf8: Callable[[str], bytes] = lambda s: s.encode("utf-8", "surrogatepass")  # noqa: E731
    return st.one_of(
        json_requests(client).map(as_utf8),
        json_requests(client).map(lambda s: as_utf8("  \n" + s)),
        JSON_VALUES.map(as_utf8),
        st.binary(max_size=200),
        BAD_UTF8,
        st.text(TOPIC_CHARS, max_size=80).map(as_utf8),
        st.tuples(st.integers(1, 2000), st.sampled_from(["list", "object", "prompt", "unclosed"])).map(
            lambda t: _deep(*t)
        ),
        OVERSIZE,
        AT_THE_LIMIT,
    )


CORRELATIONS = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.from_regex(r"[A-Za-z0-9._:-]{1,130}", fullmatch=True).map(str.encode),
    st.sampled_from([0, 1, 128, 129, 65535]).map(lambda n: b"c" * n),
    st.integers(0, 65535).map(bytes),
)
CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8", "APPLICATION/JSON", ""]),
    st.text(max_size=20),
)


@st.composite
def ask_topics(draw: st.DrawFn, client: str) -> str:
    topic: str = draw(
        st.one_of(
            st.just("edged/pi/ask"),
            st.just(f"edged/pi/ask/{client}"),
            INVALID_CLIENT.map(lambda c: f"edged/pi/ask/{c}"),
            st.just(f"edged/fleet/ask/{client}"),
            INVALID_CLIENT.map(lambda c: f"edged/fleet/ask/{c}"),
            st.just("edged/fleet/ask"),
        )
    )
    return topic


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    client = draw(VALID_CLIENT)
    response_topic = draw(
        st.one_of(
            st.none(),
            REPLY_TOPICS,
            st.sampled_from([f"kiosk/{client}/r", f"kiosk/{client}", f"edged/pi/answer/{client}/x", "kiosk/other/r"]),
        )
    )
    return Envelope(
        topic=draw(ask_topics(client)),
        payload=draw(payloads(client)),
        qos=draw(st.integers(0, 2)),
        retained=draw(st.booleans()),
        response_topic=response_topic,
        correlation=draw(CORRELATIONS),
        content_type=draw(CONTENT_TYPES),
        received_at=draw(st.sampled_from([0.0, time.time(), 1e11])),
    )


# -- properties of the pure parser ------------------------------------------------------------------


def _check_parsed(env: Envelope, result: Request | Refusal) -> None:
    """What holds for every parse result, whatever arrived."""
    assert isinstance(result, Request | Refusal)
    assert ID_RE.fullmatch(result.id), result.id
    route, identity = result.route, result.identity
    assert route.qos == env.qos and route.correlation == env.correlation
    # the route is a valid publish topic, allowed for the identity, by edged's rules and the contract's
    assert protocol.publish_topic_problem(route.topic) is None, route.topic
    assert protocol.reply_topic_problem(route.topic, identity, DEFAULTS) is None, route.topic
    assert contract_route_problem(route.topic, identity) is None, route.topic
    client = scoped_client(env.topic)
    if client is not None:
        assert identity == Identity(client, True), "a scoped identity is the topic's client, never the payload's"
    else:
        assert not identity.scoped
    if env.response_topic:  # the MQTT adapter maps an empty Response Topic to None
        if contract_route_problem(env.response_topic, identity) is None:
            assert route.topic == env.response_topic, "an allowed Response Topic is where the replies go"
        else:
            assert route.topic == DEFAULTS.answer_topic(identity, result.id), "a refused route falls back"
            assert isinstance(result, Refusal), "a request with a refused reply route is never accepted"
    if isinstance(result, Refusal):
        assert result.error.code in CODES and result.error.code in PARSE_CODES
        assert isinstance(result.error.message, str) and result.error.message.strip()
    else:
        assert len(env.payload) <= MAX_PAYLOAD
        assert 1 <= result.generation.max_tokens <= DEFAULTS.max_tokens_cap
        assert result.priority in protocol.PRIORITIES
        assert result.deadline_at > result.received_at
    if len(env.payload) > MAX_PAYLOAD:
        assert isinstance(result, Refusal) and result.error.code == "too_long"


@settings(max_examples=2500, **FAST)  # type: ignore[arg-type]
@given(envelopes())
def test_parse_never_raises_and_routes_only_to_allowed_topics(env: Envelope) -> None:
    """Whatever arrives on an ask topic, the parser answers with a Request or a Refusal whose route is a
    topic the node may publish to for that identity: a crash or a forbidden route here is a node-wide bug."""
    _check_parsed(env, protocol.parse(env, DEFAULTS))


@settings(max_examples=400, **FAST)  # type: ignore[arg-type]
@given(st.data())
def test_scoped_identity_is_the_topic_client_not_the_payload_client(data: st.DataObject) -> None:
    """The broker's ACL vouches for the topic's <client>; a payload naming another client must not borrow
    that client's ids, dedupe, rate limit or kiosk/<client>/ replies."""
    client = data.draw(VALID_CLIENT)
    other = data.draw(st.one_of(VALID_CLIENT, st.text(max_size=10)))
    base = data.draw(st.sampled_from(["edged/pi/ask", "edged/fleet/ask"]))
    body = data.draw(json_requests(client))
    payload = ('{"client":' + json.dumps(other) + ("," + body[1:] if body != "{}" else "}")).encode(
        "utf-8", "surrogatepass"
    )
    rt = data.draw(st.sampled_from([None, f"kiosk/{client}/r", f"kiosk/{other}/r", f"edged/pi/answer/{other}/x"]))
    env = Envelope(
        topic=f"{base}/{client}", payload=payload, qos=1, response_topic=rt, correlation=data.draw(CORRELATIONS)
    )
    result = protocol.parse(env, DEFAULTS)
    _check_parsed(env, result)
    assert result.identity == Identity(client, True)


@settings(max_examples=400, **FAST)  # type: ignore[arg-type]
@given(envelopes(), OVERSIZE)
def test_payload_over_the_cap_is_always_too_long(env: Envelope, payload: bytes) -> None:
    """A payload over max_payload_bytes is refused unread with too_long, whatever it holds or claims."""
    env = Envelope(
        topic=env.topic,
        payload=payload,
        qos=env.qos,
        response_topic=env.response_topic,
        correlation=env.correlation,
        content_type=env.content_type,
    )
    result = protocol.parse(env, DEFAULTS)
    _check_parsed(env, result)
    assert isinstance(result, Refusal) and result.error.code == "too_long"
    assert str(MAX_PAYLOAD) in result.error.message


@st.composite
def cancels(draw: st.DrawFn) -> Envelope:
    client = draw(st.one_of(VALID_CLIENT, INVALID_CLIENT))
    topic = draw(st.sampled_from(["edged/pi/cancel", f"edged/pi/cancel/{client}"]))
    body = draw(
        st.one_of(
            payloads(client),
            st.tuples(st.one_of(JSON_VALUES, _good_value("id", client).map(json.dumps)), JSON_VALUES).map(
                lambda t: f'{{"id":{t[0]},"client":{t[1]}}}'.encode("utf-8", "surrogatepass")
            ),
            _good_value("id", client).map(lambda i: json.dumps({"id": i, "client": client}).encode()),
        )
    )
    return Envelope(topic=topic, payload=body, qos=1)


@settings(max_examples=700, **FAST)  # type: ignore[arg-type]
@given(cancels())
def test_parse_cancel_raises_only_invalid_request(env: Envelope) -> None:
    """A bad cancel is logged and counted, never a crash of the inbox thread; a scoped one only reaches
    its own client's requests."""
    try:
        identity, request_id = protocol.parse_cancel(env, DEFAULTS)
    except InvalidRequest as exc:
        assert exc.message.strip()
        return
    assert ID_RE.fullmatch(request_id)
    level = env.topic.removeprefix("edged/pi/cancel").removeprefix("/")
    if env.topic.startswith("edged/pi/cancel/"):
        assert CLIENT_RE.fullmatch(level) and identity == Identity(level, True)
    else:
        assert identity is None or (not identity.scoped and identity.name)


def _json_bounds(value: Any, depth: int = 1) -> None:
    if isinstance(value, str):
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in value), "a lone surrogate got through"
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        assert -(10**18) < value < 10**18
    elif isinstance(value, float):
        assert value == value and abs(value) != float("inf")
    else:
        assert depth <= protocol.MAX_JSON_DEPTH
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        for item in items:
            _json_bounds(item, depth + 1)


@settings(max_examples=700, **FAST)  # type: ignore[arg-type]
@given(payloads())
def test_load_json_refuses_with_invalid_request_or_returns_bounded_json(payload: bytes) -> None:
    """load_json is the one gate for JSON: anything it lets through is UTF-8, shallow, int64, finite and
    free of lone surrogates; anything else is an InvalidRequest with a reason, never another exception."""
    try:
        value = protocol.load_json(payload)
    except InvalidRequest as exc:
        assert exc.message.strip()
        return
    _json_bounds(value)


SUPPLEMENTARY_NONCHARACTERS = ["\U0001fffe", "\U0001ffff", "\U0005fffe", "\U0010fffe", "\U0010ffff"]


@pytest.mark.parametrize(
    "char", SUPPLEMENTARY_NONCHARACTERS, ids=[f"U+{ord(c):X}" for c in SUPPLEMENTARY_NONCHARACTERS]
)
def test_supplementary_noncharacters_are_not_valid_reply_topics(char: str) -> None:
    """CONTRACT.md v1.1: no Unicode noncharacters in a reply topic. Accepting one lets a v3.1.1 `reply_to`
    make the node publish a topic the broker answers with a disconnect."""
    topic = f"fuzz/{char}"
    assert contract_topic_problem(topic) is not None
    assert protocol.publish_topic_problem(topic) is not None


# -- live: a real broker and a real node ------------------------------------------------------------

RUN = uuid.uuid4().hex[:6]
SEED = 20261201
LIVE_CASES = 1200
WARMUP_CASES = 100
IN_FLIGHT = 8  # cases sent and not yet answered, at most
RSS_GROWTH_MB = 60


@dataclass
class Case:
    n: int
    kind: str
    v5: bool
    topic: str
    payload: bytes
    qos: int
    response_topic: str | None = None
    correlation: bytes | None = None
    content_type: str | None = None
    reply_to: str | None = None  # the payload's reply_to, when it names one
    request_id: str | None = None  # the payload's id, when it names one
    retained: bool = False
    expect_reply: bool = True
    maybe_valid: bool = False  # parses into a Request: it may run the model

    @property
    def identity(self) -> Identity:
        client = scoped_client(self.topic)
        return Identity(client, True) if client else Identity("v1", False)


@dataclass
class Reply:
    topic: str
    body: dict[str, Any]
    correlation: bytes | None


class Tap:
    """An MQTT v5 client subscribed to everything: every final reply the node sends, wherever it goes."""

    def __init__(self, port: int) -> None:
        self.replies: dict[int, list[Reply]] = {}  # case number -> its final replies
        self.anonymous: list[Reply] = []  # final replies naming no case of ours (a generated id)
        self.chunks = 0
        self.by_correlation: dict[bytes, int] = {}
        self.by_id: dict[str, int] = {}
        self.changed = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"tap-{RUN}", protocol=paho.MQTTv5)
        self.client.on_message = self._message
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe("#", 1)
        assert done.wait(10)

    def register(self, case: Case) -> None:
        if case.correlation is not None:
            self.by_correlation[case.correlation] = case.n
        if case.request_id is not None:
            self.by_id[case.request_id] = case.n

    def _message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        payload = msg.payload
        if not payload.startswith(b'{"id":') or b'"done":' not in payload:
            return
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if body.get("done") is False and "seq" in body and "delta" in body:
            self.chunks += 1
            return
        if not (body.get("node") == "pi" and body.get("done") is True):
            return  # not the node's reply: one of our requests
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        reply = Reply(msg.topic, body, correlation)
        n = self.by_correlation.get(correlation) if correlation is not None else self.by_id.get(str(body["id"]))
        with self.changed:
            if n is None:
                self.anonymous.append(reply)
            else:
                self.replies.setdefault(n, []).append(reply)
            self.changed.notify_all()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Sender:
    """One MQTT client of the given version; publishes and waits for the broker's acknowledgement."""

    def __init__(self, port: int, v5: bool, name: str) -> None:
        self.port, self.v5 = port, v5
        self.disconnects = 0
        self.client = self._connect(name)

    def _connect(self, name: str) -> paho.Client:
        version = paho.MQTTv5 if self.v5 else paho.MQTTv311
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{RUN}", protocol=version)
        client.on_disconnect = lambda *_: setattr(self, "disconnects", self.disconnects + 1)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        return client

    @staticmethod
    def properties(case: Case) -> Properties | None:
        if not case.v5:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if case.response_topic is not None:
            props.ResponseTopic = case.response_topic
        if case.correlation is not None:
            props.CorrelationData = case.correlation
        if case.content_type is not None:
            props.ContentType = case.content_type
        return props

    def send(self, case: Case) -> None:
        info = self.client.publish(
            case.topic, case.payload, qos=case.qos, retain=case.retained, properties=self.properties(case)
        )
        if case.qos:
            info.wait_for_publish(10)
            assert info.is_published(), f"the broker did not acknowledge case {case.n}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def send_refused_by_broker(port: int, case: Case) -> bool:
    """Publishes a case the broker should refuse (a Response Topic it cannot accept) on a client of its
    own, and says whether the broker disconnected it instead of acknowledging."""
    gone = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bad-{RUN}-{case.n}", protocol=paho.MQTTv5)
    client.on_disconnect = lambda *_: gone.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(case.topic, case.payload, qos=1, properties=Sender.properties(case))
        deadline = time.monotonic() + 5
        while not gone.is_set() and not info.is_published() and time.monotonic() < deadline:
            time.sleep(0.01)
        return gone.is_set() and not info.is_published()
    finally:
        client.loop_stop()


# -- the seeded live generator ----------------------------------------------------------------------

WRONG_TYPES = [
    "5",
    "-1",
    "0",
    "1.5",
    '"5"',
    "true",
    "null",
    "[]",
    "{}",
    '["a"]',
    '{"x":1}',
    "9" * 400,
    "1e308",
    "1e-300",
    "1e309",
    "NaN",
    "Infinity",
    "-Infinity",
    '"\\ud800"',
    '""',
    '"x"',
]
BAD_ROUTES = [
    "fuzz/+/x",
    "fuzz/#",
    "#",
    "$SYS/broker/x",
    "$share/g/x",
    "edged/pi/status",
    "edged/pi/ask",
    "edged/pi/cancel",
    "edged/fleet/ask",
    "edged/other/answer/1",
    "edged/pi/telemetry",
    "homeassistant/sensor/pi/config",
    "/".join(["l"] * 250),
    "/".join(["l"] * 17),
    "r/" + "x" * 300,
    "é" * 129,
]
BROKER_REFUSED_ROUTES = ["fuzz/a\x01b", "fuzz/\x7f", "fuzz/\x85", "fuzz/\ufdd0", "fuzz/\uffff", "fuzz/\U0001fffe"]
TEXT_BITS = ["hi", "é", "東京", "🍅", "\u200b", "\t", "a\x00b", "\ufffd", " ", "Say hi", "\ufdd0", "\U0010fffd"]


def _text(rng: random.Random, size: int = 12) -> str:
    return "".join(rng.choice(TEXT_BITS) for _ in range(rng.randint(0, size)))


def _valid_body(rng: random.Random, request_id: str | None) -> dict[str, Any]:
    """A request the parser accepts, at the edges of each field's range; max_tokens 1-2."""
    body: dict[str, Any] = {"max_tokens": rng.randint(1, 2)}
    if rng.random() < 0.7:
        body["prompt"] = rng.choice(["Say hi", "2+2?", "Name a colour.", _text(rng, 6) + "?", " ", "\x00"])
    else:
        roles = ["system", "user", "assistant", "user"]
        body["messages"] = [
            {"role": rng.choice(roles), "content": rng.choice(["hi", "", "ok", _text(rng, 4)])}
            for _ in range(rng.randint(1, 4))
        ]
    optional: dict[str, Callable[[], Any]] = {
        "system": lambda: rng.choice(["", "Be brief.", _text(rng, 5)]),
        "temperature": lambda: rng.choice([0, 0.05, 1.0, 2.0, 2]),
        "top_k": lambda: rng.choice([0, 1, 50, 2**40]),
        "top_p": lambda: rng.choice([1.0, 0.5, 1e-9]),
        "repeat_penalty": lambda: rng.choice([1.0, 1.3, 2.0]),
        "seed": lambda: rng.choice([0, 42, 2**32, 2**63 - 1]),
        "stop": lambda: rng.choice([[], [""], ["\n"], ["a"] * 8, ["é", "🍅"]]),
        "stream": lambda: rng.random() < 0.5,
        "priority": lambda: rng.choice(["alert", "normal", "background"]),
        "deadline_ms": lambda: rng.choice([1, 50, 60_000, 86_400_000]),
        "profile": lambda: None,
        "format": lambda: None,
        "client": lambda: rng.choice(["k1", "kiosk-7", "é"]),
    }
    for name in rng.sample(sorted(optional), rng.randint(0, 5)):
        body[name] = optional[name]()
    if request_id is not None:
        body["id"] = request_id
    return body


def _invalid_json(rng: random.Random, request_id: str | None) -> tuple[str, bytes]:
    head = f'"id":{json.dumps(request_id)},' if request_id is not None else ""
    kind = rng.choice(["wrong", "wrong", "number", "unknown", "surrogate", "deep", "syntax", "long", "dupe"])
    if kind == "wrong":
        names = rng.sample([f for f in CONTRACT_FIELDS[1:-1] if f != "reply_to"], rng.randint(1, 5))
        fields = ",".join(f'"{n}":{rng.choice(WRONG_TYPES)}' for n in names)
        return kind, ("{" + head + fields + "}").encode()
    if kind == "number":
        name = rng.choice(["max_tokens", "temperature", "top_k", "top_p", "seed", "deadline_ms", "repeat_penalty"])
        return kind, (
            "{" + head + f'"prompt":"hi","{name}":{rng.choice(WRONG_TYPES[:1] + WRONG_TYPES[11:18])}}}'
        ).encode()
    if kind == "unknown":
        return kind, ("{" + head + '"prompt":"hi","colour":"red"}').encode()
    if kind == "surrogate":
        return kind, (
            "{" + head + rng.choice(['"\\ud800":1', '"prompt":"\\udfff"', '"system":"a\\ud800"'])
        ).encode() + b"}"
    if kind == "deep":
        depth = rng.choice([33, 100, 999, 1000, 1001, 2000])
        return kind, ("{" + head + '"prompt":"hi","stop":' + "[" * depth + "]" * depth + "}").encode()
    if kind == "syntax":
        return kind, (
            "{" + head + rng.choice(['"prompt":"unclosed', '"prompt":', "'prompt':1", '"prompt":"a",}'])
        ).encode()
    if kind == "long":
        return kind, ("{" + head + f'"prompt":"{"x" * rng.randint(3000, 6000)}"}}').encode()
    return kind, ("{" + head + '"prompt":"hi","prompt":7}').encode()


def live_cases(seed: int, count: int) -> list[Case]:
    """``count`` reproducible cases: mostly invalid (answered at once with an error), about a tenth valid."""
    rng = random.Random(seed)
    cases = []
    for n in range(count):
        v5 = rng.random() < 0.7
        client = f"k{n % 7}"
        topic = rng.choices(
            [
                "edged/pi/ask",
                f"edged/pi/ask/{client}",
                "edged/pi/ask/" + rng.choice(["", "bad client", "é", "x" * 65, "a.b", "k:1"]),
                f"edged/fleet/ask/{client}",
                "edged/fleet/ask",
            ],
            weights=[50, 22, 8, 12, 8],
        )[0]
        scoped = scoped_client(topic) is not None
        request_id = f"fz{RUN}-{n}" if rng.random() < 0.85 else None
        kind = rng.choices(
            ["valid", "plain", "json", "bytes", "bad_utf8", "oversize", "scalar", "empty"],
            weights=[8, 3, 55, 8, 8, 8, 5, 2],
        )[0]
        payload: bytes
        if kind == "valid":
            payload = json.dumps(_valid_body(rng, request_id), ensure_ascii=rng.random() < 0.5).encode()
        elif kind == "plain":
            payload, request_id = rng.choice(["Say hi", "What is 2+2?", "é?"]).encode(), None
        elif kind == "json":
            kind, payload = _invalid_json(rng, request_id)
        elif kind == "bytes":
            payload, request_id = rng.randbytes(rng.randint(1, 300)), None
        elif kind == "bad_utf8":
            bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"])
            payload, request_id = b'{"prompt":"caf' + bad + b'"}', None
        elif kind == "oversize":
            size = rng.choice([MAX_PAYLOAD + 1, MAX_PAYLOAD * 2, 20_000, 65_000])
            payload, request_id = (b'{"prompt":"' + b"x" * size)[:size], None
        elif kind == "scalar":
            payload, request_id = rng.choice([b"[1,2]", b"null", b'"str"', b"123", b"{}", b"[]"]), None
        else:
            payload, request_id = b"", None
        case = Case(n, kind, v5, topic, payload, qos=rng.choice([0, 1, 1, 2]), request_id=request_id)
        own = f"kiosk/{client}/{RUN}/{n}" if scoped else f"fuzz/{RUN}/{n}"
        route = rng.choices(["own", "bad", "none", "broker"], weights=[60, 22, 16, 2])[0]
        chosen = {"own": own, "bad": rng.choice([*BAD_ROUTES, f"fuzz/{RUN}/{n}"]), "none": None}.get(route)
        if route == "broker":
            chosen = rng.choice(BROKER_REFUSED_ROUTES)
            case.v5, case.qos, case.expect_reply = True, 1, False
        if case.v5:
            case.response_topic = chosen
            corr = f"fz{RUN}.{n:05d}".encode()
            shape = rng.choices(["id", "bytes", "64k"], weights=[50, 46, 4])[0]
            if shape == "bytes":
                corr += b"|" + rng.randbytes(rng.randint(0, 64))
            elif shape == "64k":
                corr += b"|" + b"\xff" * (65_535 - len(corr) - 1)
            case.correlation = corr
            case.content_type = rng.choice([None, None, "application/json", "text/plain", "é/x"])
        # v3.1.1 names its route in the payload; a v5 payload's reply_to comes second to its Response Topic
        in_payload = chosen if not case.v5 else rng.choice([own, *BAD_ROUTES]) if rng.random() < 0.2 else None
        if in_payload is not None and payload.startswith(b"{") and kind not in ("oversize", "bad_utf8"):
            case.reply_to = in_payload
            rest = b"}" if payload == b"{}" else b"," + payload[1:]
            case.payload = b'{"reply_to":' + json.dumps(in_payload).encode() + rest
        env = Envelope(
            topic=case.topic,
            payload=case.payload,
            qos=case.qos,
            response_topic=case.response_topic,
            correlation=case.correlation,
            content_type=case.content_type,
        )
        case.maybe_valid = isinstance(protocol.parse(env, DEFAULTS), Request)
        cases.append(case)
    return cases


@dataclass
class Run:
    sent: list[Case] = field(default_factory=list)
    broker_refused: list[Case] = field(default_factory=list)


def pump(tap: Tap, senders: dict[bool, Sender], port: int, cases: list[Case], run: Run) -> None:
    """Sends the cases, at most IN_FLIGHT unanswered at a time, and a case that may run the model only when
    nothing else is in flight (so the queue never fills and the node stays in the fleet group)."""

    def outstanding() -> int:  # each case gets one reply: matched to it, or naming an id the node generated
        answered = sum(1 for c in run.sent if c.n in tap.replies)
        return len(run.sent) - len(run.broker_refused) - answered - len(tap.anonymous)

    def wait_below(limit: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        with tap.changed:
            while outstanding() >= limit and time.monotonic() < deadline:
                tap.changed.wait(0.05)

    for case in cases:
        wait_below(1 if case.maybe_valid else IN_FLIGHT)
        tap.register(case)
        run.sent.append(case)
        if not case.expect_reply:
            assert send_refused_by_broker(port, case), f"the broker took case {case.n}: {case.response_topic!r}"
            run.broker_refused.append(case)
            continue
        senders[case.v5].send(case)
        if case.maybe_valid:
            wait_below(1)
    wait_below(1, timeout_s=60)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


PRE_RETAINED = 12  # retained requests already on the broker when the node subscribes


@pytest.fixture(scope="module")
def tap(broker: Mosquitto) -> Iterator[Tap]:
    t = Tap(broker.port)
    yield t
    t.close()


@pytest.fixture(scope="module")
def pre_retained(broker: Mosquitto, tap: Tap) -> list[Case]:
    """Retained questions the node finds on the broker at its first subscription (a restart, in effect)."""
    cases = []
    sender = Sender(broker.port, True, "pre")
    try:
        for i in range(PRE_RETAINED):
            topic = ["edged/pi/ask", "edged/pi/ask/k1", "edged/fleet/ask/k2"][i % 3]
            case = Case(
                -1 - i,
                "retained",
                True,
                topic,
                json.dumps({"prompt": "hi", "max_tokens": 1, "colour": i % 2 or None}).encode(),
                qos=i % 3,
                response_topic=f"kiosk/k1/{RUN}/pre{i}" if i % 3 == 1 else f"fuzz/{RUN}/pre{i}",
                correlation=f"fz{RUN}.pre{i}".encode(),
                retained=True,
                expect_reply=False,
            )
            tap.register(case)
            sender.send(case)
            cases.append(case)
    finally:
        sender.close()
    return cases


@pytest.fixture(scope="module")
def node(
    broker: Mosquitto,
    tap: Tap,
    pre_retained: list[Case],
    smollm2_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Node]:
    n = contract_node(
        tmp_path_factory.mktemp("fuzz-node"),
        broker,
        smollm2_dirs["int4"].parent,
        max_tokens=4,
        max_tokens_cap=4,
        max_payload_bytes=MAX_PAYLOAD,
        rate_limit_per_min=60000.0,
        rate_limit_burst=5000,
        homeassistant=False,
    )
    yield n
    assert n.stop() == 0, n.log.read_text()[-3000:]


def _route_problems(case: Case, replies: list[Reply]) -> list[str]:
    problems = []
    identity = case.identity
    for r in replies:
        if contract_route_problem(r.topic, identity) is not None and not r.topic.startswith(OWN_ANSWERS):
            problems.append(f"case {case.n}: a reply on a refused topic {r.topic[:80]!r}")
        asked = case.response_topic or case.reply_to  # the parser's order
        allowed = asked is not None and contract_route_problem(asked, identity) is None
        if case.response_topic is not None and allowed and r.topic != asked:
            problems.append(f"case {case.n}: allowed Response Topic {asked!r}, reply on {r.topic[:80]!r}")
        if r.topic != asked and not r.topic.startswith(OWN_ANSWERS):
            problems.append(f"case {case.n}: reply on {r.topic[:80]!r}, neither asked nor an answer topic")
        mine = f"{OWN_ANSWERS}{identity.name}/"
        if identity.scoped and r.topic.startswith(OWN_ANSWERS) and not r.topic.startswith(mine):
            problems.append(f"case {case.n}: scoped answer on another client's topic {r.topic[:80]!r}")
        if case.v5 and r.correlation != case.correlation:
            problems.append(f"case {case.n}: correlation data not echoed")
    return problems


@pytest.mark.model
def test_live_fuzz_every_case_gets_one_final_reply(broker: Mosquitto, node: Node, tap: Tap) -> None:
    """1,200 seeded cases over MQTT v5 and v3.1.1: the node survives, stays online, answers each case that
    reaches it exactly once on an allowed route, ignores retained questions, and does not grow."""
    assert node.proc is not None
    started = time.monotonic()
    cases = live_cases(SEED, LIVE_CASES)
    senders = {True: Sender(broker.port, True, "v5"), False: Sender(broker.port, False, "v311")}
    run = Run()
    try:
        pump(tap, senders, broker.port, cases[:WARMUP_CASES], run)
        rss_warm = rss_mb(node.proc.pid)
        pump(tap, senders, broker.port, cases[WARMUP_CASES:], run)
        time.sleep(1.5)  # anything late or doubled shows up now
        rss_end = rss_mb(node.proc.pid)
        disconnects = {v5: s.disconnects for v5, s in senders.items()}
    finally:
        for s in senders.values():
            s.close()
    elapsed = time.monotonic() - started

    problems = []
    expected = [c for c in run.sent if c.expect_reply]
    unmatched = 0  # v3.1.1 cases whose id the node could not read: their reply names a generated id
    for case in expected:
        got = tap.replies.get(case.n, [])
        if not got and not case.v5:
            unmatched += 1
        elif len(got) != 1:
            problems.append(f"case {case.n} ({case.kind}, {case.topic!r}, qos {case.qos}): {len(got)} final replies")
        problems += _route_problems(case, got)
    for case in run.sent:
        if not case.expect_reply and tap.replies.get(case.n):
            problems.append(f"case {case.n}: refused by the broker, yet answered")
    if len(tap.anonymous) != unmatched:
        problems.append(f"{len(tap.anonymous)} replies name a generated id; {unmatched} v3.1.1 cases got no other")
    asked_v3 = {c.reply_to for c in expected if not c.v5 and c.reply_to is not None}
    for r in tap.anonymous:  # a generated id goes to the default answer topic or to the payload's reply_to
        if not r.topic.startswith(OWN_ANSWERS) and r.topic not in asked_v3:
            problems.append(f"a reply without a case id on {r.topic[:80]!r}")
        elif contract_route_problem(r.topic, Identity("v1", False)) is not None and not r.topic.startswith(OWN_ANSWERS):
            problems.append(f"a reply without a case id on a refused topic {r.topic[:80]!r}")
    oversize = [c for c in expected if c.kind == "oversize" and tap.replies.get(c.n)]
    wrong_size = [c.n for c in oversize if tap.replies[c.n][0].body.get("error", {}).get("code") != "too_long"]
    if wrong_size:
        problems.append(f"payloads over the cap not answered too_long: cases {wrong_size[:10]}")
    if disconnects != {True: 0, False: 0}:
        problems.append(f"the broker disconnected a sender: {disconnects}")

    finals = [r for rs in tap.replies.values() for r in rs] + tap.anonymous
    codes = Counter(
        r.body.get("error", {}).get("code", "ok") if r.body.get("status") == "error" else "ok" for r in finals
    )
    print(
        f"\nlive fuzz: {len(run.sent)} cases ({sum(c.v5 for c in run.sent)} v5, "
        f"{sum(not c.v5 for c in run.sent)} v3.1.1, {len(run.broker_refused)} refused by the broker, "
        f"{sum(c.maybe_valid for c in run.sent)} valid), {len(finals)} final replies "
        f"({len(tap.anonymous)} by generated id), {tap.chunks} stream chunks, by code {dict(codes)}, "
        f"RSS {rss_warm:.0f} -> {rss_end:.0f} MB, {elapsed:.1f} s"
    )
    assert node.proc.poll() is None, node.log.read_text()[-3000:]
    assert not problems, "\n".join(problems[:40])
    assert codes["internal"] == 0
    assert codes["ok"] >= 30, "too few valid cases ran the model: the generator drifted"
    assert rss_end - rss_warm <= RSS_GROWTH_MB, f"RSS grew {rss_end - rss_warm:.0f} MB over the run"

    status = Listener(broker.port, "edged/pi/status")
    try:
        assert status.json(10)["state"] == "online"
    finally:
        status.close()
    after = Listener(broker.port, f"fuzz/{RUN}/after")
    try:
        after.publish(
            "edged/pi/ask",
            json.dumps({"prompt": "What is the capital of France?", "max_tokens": 4}),
            response_topic=f"fuzz/{RUN}/after",
        )
        reply = after.finals(1, timeout_s=60)[0]
        assert reply["status"] == "ok" and reply["usage"]["completion_tokens"] > 0
    finally:
        after.close()


@pytest.mark.model
def test_live_retained_questions_found_at_subscription_are_ignored(
    node: Node, tap: Tap, pre_retained: list[Case]
) -> None:
    """Retained questions already on the broker when the node subscribes (as after a restart) get no reply:
    otherwise every restart would ask them again."""
    time.sleep(1.0)
    answered = [c.n for c in pre_retained if tap.replies.get(c.n)]
    print(f"\nretained at subscription: {len(pre_retained)} cases, {len(answered)} answered")
    assert answered == []


@pytest.mark.model
def test_live_retained_question_sent_while_online_gets_no_reply(broker: Mosquitto, node: Node, tap: Tap) -> None:
    """CONTRACT.md v1.1: retained requests on ask topics are ignored, not only those found at subscription;
    a kiosk that sets the retain flag by mistake would otherwise get an answer now and silence after a restart."""
    sender = Sender(broker.port, True, "retain")
    cases = []
    try:
        for i, topic in enumerate(["edged/pi/ask", "edged/pi/ask/k1", "edged/fleet/ask/k2"]):
            case = Case(
                -100 - i,
                "retained",
                True,
                topic,
                b'{"prompt":"hi","colour":"red"}',  # invalid: a reply would come at once
                qos=1,
                response_topic=f"kiosk/k1/{RUN}/ret{i}" if i == 1 else f"fuzz/{RUN}/ret{i}",
                correlation=f"fz{RUN}.ret{i}".encode(),
                retained=True,
                expect_reply=False,
            )
            tap.register(case)
            sender.send(case)
            cases.append(case)
        time.sleep(2.0)
        for case in cases:  # clear them: an empty retained publish deletes the broker's copy
            sender.client.publish(case.topic, b"", qos=1, retain=True).wait_for_publish(10)
    finally:
        sender.close()
    answered = {c.topic: tap.replies[c.n][0].body.get("error", {}).get("code") for c in cases if tap.replies.get(c.n)}
    print(f"\nretained while online: {len(cases)} cases, answered {answered}")
    assert answered == {}


@pytest.mark.model
def test_live_reply_to_with_a_supplementary_noncharacter_is_refused(broker: Mosquitto, node: Node) -> None:
    """A v3.1.1 client can name any reply_to; one with U+1FFFE must get invalid_request on the default answer
    topic, and must not cost the node its broker connection."""
    lst = Listener(broker.port, "edged/pi/answer/#", v5=False)
    status = Listener(broker.port, "edged/pi/status")
    try:
        assert status.json(10)["state"] == "online"
        body = {"id": f"fz{RUN}-nonchar", "prompt": "hi", "max_tokens": 1, "reply_to": f"fuzz/{RUN}/\U0001fffe"}
        lst.publish("edged/pi/ask", json.dumps(body, ensure_ascii=False), qos=0)
        reply = lst.finals(1, timeout_s=10)[0]
        assert reply["id"] == body["id"] and reply["error"]["code"] == "invalid_request"
    finally:
        lst.close()
        status.close()
