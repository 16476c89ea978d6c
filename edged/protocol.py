"""The MQTT contract's payloads: parsing requests, building replies and status. Pure functions."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from paho.mqtt.client import topic_matches_sub

from edged.errors import EdgedError, InvalidRequest, ModelUnavailable, TooLong
from edged.llm import GenerationRequest, GenerationResult, Message, SamplingParams
from edged.profiles import Catalog, Profile
from edged.sensors import PowerSnapshot

CONTRACT_VERSION = 1
CONTRACT_REVISION = "1.1"
PRIORITIES = ("alert", "normal", "background")
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 18  # every integer field fits in int64; longer digit strings are refused while parsing
MAX_DEADLINE_MS = 86_400_000  # a day
MAX_TOPIC_BYTES = 256
MAX_TOPIC_LEVELS = 16
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CLIENT = re.compile(r"[A-Za-z0-9_-]{1,64}")
# C0 and C1 controls and DEL, which brokers reject in topic names (MQTT 5 section 1.5.4), and Unicode noncharacters.
_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
_BAD_TOPIC_CHARS = re.compile(f"[\x00-\x1f\x7f-\x9f\ud800-\udfff{_NONCHARACTERS}]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_FIELDS = {
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
}


@dataclass(frozen=True)
class Envelope:
    """What arrived over MQTT, before parsing: the topic, the payload and the transport properties."""

    topic: str
    payload: bytes
    qos: int
    retained: bool = False
    redelivered: bool = False  # the broker's DUP flag: the same message again, not a client's retry
    response_topic: str | None = None  # MQTT v5 Response Topic
    correlation: bytes | None = None  # MQTT v5 Correlation Data
    content_type: str | None = None
    received_at: float = 0.0  # wall clock, time.time()


@dataclass(frozen=True)
class Identity:
    """Who asks. Scoped: the ``<client>`` level of a v1.1 topic, which the broker's ACL vouches for.

    v1 (unscoped): the payload's ``client`` field, else the reply topic; only as good as the sender is honest.
    """

    name: str
    scoped: bool

    @property
    def key(self) -> str:
        """Request ids, dedupe, cancels and rate limits are per key; scoped and v1 names never collide."""
        return ("@" if self.scoped else "~") + self.name


@dataclass(frozen=True)
class Route:
    """Where the replies of one request go."""

    topic: str
    qos: int
    correlation: bytes | None


@dataclass(frozen=True)
class Request:
    id: str
    identity: Identity
    route: Route
    generation: GenerationRequest
    stream: bool
    priority: str
    received_at: float  # wall clock
    deadline_at: float  # wall clock
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema: compiled against the model's tokenizer
    profile: str = ""  # the profile it runs with (empty: none)
    knowledge: str = ""  # the profile's knowledge base, whose passages go into the prompt
    sources: tuple[Source, ...] = ()  # the passages put into the prompt, named in the final reply

    @property
    def priority_rank(self) -> int:
        return PRIORITIES.index(self.priority)


@dataclass(frozen=True)
class Source:
    """A passage of a knowledge base that went into the prompt: its file and heading."""

    file: str
    heading: str


@dataclass(frozen=True)
class Refusal:
    """A request refused while parsing, with the route its error goes to (the default answer topic when the
    asked one is refused)."""

    id: str
    identity: Identity
    route: Route
    error: EdgedError


@dataclass(frozen=True)
class Defaults:
    """Per-node values a request falls back to, the limits it cannot exceed, and the topic rules."""

    prefix: str
    node: str
    system_prompt: str
    max_tokens: int
    max_tokens_cap: int
    deadline_ms: int
    max_payload_bytes: int
    reply_topics: tuple[str, ...] = ("{prefix}/{node}/answer/{client}/#", "kiosk/{client}/#")
    v1_reply_topics: tuple[str, ...] = ("#",)
    homeassistant_prefix: str = "homeassistant"
    profiles: Catalog = field(default_factory=Catalog)
    model: str = ""  # the model the node serves, which a profile's model must name

    def topic(self, leaf: str) -> str:
        return f"{self.prefix}/{self.node}/{leaf}"

    def answer_topic(self, identity: Identity, request_id: str) -> str:
        if identity.scoped:
            return f"{self.prefix}/{self.node}/answer/{identity.name}/{request_id}"
        return f"{self.prefix}/{self.node}/answer/{request_id}"


def new_id() -> str:
    return uuid.uuid4().hex[:16]


# -- topics ----------------------------------------------------------------------------------------


def publish_topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to (a sentence), or None when it is a valid publish topic."""
    if not topic:
        return "the reply topic is empty"
    if "+" in topic or "#" in topic:
        return "the reply topic must not contain the wildcards + or #"
    if topic.startswith("$"):
        return "the reply topic must not start with $ (broker topics such as $SYS/ and $share/)"
    if _BAD_TOPIC_CHARS.search(topic):
        return "the reply topic holds control characters, noncharacters or lone surrogates"
    if topic.count("/") + 1 > MAX_TOPIC_LEVELS:
        return f"the reply topic has more than {MAX_TOPIC_LEVELS} levels"
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        return f"the reply topic is longer than {MAX_TOPIC_BYTES} bytes"
    return None


def reply_topic_problem(topic: str, identity: Identity, defaults: Defaults) -> str | None:
    """Why the node may not reply on ``topic`` for ``identity`` (CONTRACT.md v1.1), or None when it may."""
    problem = publish_topic_problem(topic)
    if problem is not None:
        return problem
    own_answers = defaults.topic("answer") + "/"
    if (topic + "/").startswith(defaults.prefix + "/") and not topic.startswith(own_answers):
        return f"the reply topic may not be a {defaults.prefix}/ topic other than {own_answers}..."
    if (topic + "/").startswith(defaults.homeassistant_prefix + "/"):
        return f"the reply topic may not be under {defaults.homeassistant_prefix}/"
    patterns = defaults.reply_topics if identity.scoped else defaults.v1_reply_topics
    for pattern in patterns:
        if "{client}" in pattern and not _CLIENT.fullmatch(identity.name):
            continue  # a v1 identity that is not one topic level stands for no {client}
        allowed = pattern.format(prefix=defaults.prefix, node=defaults.node, client=identity.name)
        if topic_matches_sub(allowed, topic):
            return None
    usual = defaults.answer_topic(identity, "<id>")
    return f"the reply topic is not in this node's reply_topics for {identity.name!r}; use {usual}"


# -- requests --------------------------------------------------------------------------------------


def parse(env: Envelope, defaults: Defaults) -> Request | Refusal:
    """A validated request, or a Refusal with an error the sender can act on and the route to send it on."""
    topic_error: EdgedError | None = None
    try:
        client = scoped_ask_client(env.topic, defaults)
    except ValueError as exc:
        client, topic_error = "", InvalidRequest(str(exc))
    identity = Identity(client, bool(client))
    correlation_id = _correlation_id(env.correlation)
    if len(env.payload) > defaults.max_payload_bytes:  # refused unread: id and route from the properties only
        request_id = correlation_id or new_id()
        if not identity.scoped:
            identity = Identity(env.response_topic or defaults.answer_topic(identity, request_id), False)
        route, _ = _route(env, env.response_topic, identity, request_id, defaults)
        size, limit = len(env.payload), defaults.max_payload_bytes
        return Refusal(
            request_id, identity, route, TooLong(f"the payload is {size} bytes; this node accepts at most {limit}")
        )
    fields: dict[str, Any] = {}
    body_error: EdgedError | None = topic_error
    try:
        if _looks_like_json(env):
            value = _decode_json(env.payload)
            if not isinstance(value, dict):
                raise InvalidRequest('a JSON request must be an object like {"prompt": "..."}')
            fields = value  # its id and reply route still serve the error reply if the checks below fail
            _check_json(value, 1)
        else:
            fields = {"prompt": _utf8(env.payload)}
    except EdgedError as exc:
        body_error = body_error or exc
    raw_id, reply_to, named = fields.get("id"), fields.get("reply_to"), fields.get("client")
    request_id = (raw_id if isinstance(raw_id, str) and _ID.fullmatch(raw_id) else None) or correlation_id or new_id()
    asked_topic = env.response_topic or (reply_to if isinstance(reply_to, str) else None)
    if not identity.scoped:
        name = next((n for n in (named, asked_topic) if isinstance(n, str) and n and not _SURROGATES.search(n)), None)
        identity = Identity(name or defaults.answer_topic(identity, request_id), False)
    route, problem = _route(env, asked_topic, identity, request_id, defaults)
    try:
        if body_error is not None:
            raise body_error
        if problem is not None:
            raise InvalidRequest(problem)
        if "reply_to" in fields and not isinstance(reply_to, str):
            raise InvalidRequest("reply_to must be a topic string")
        return _request(fields, request_id, identity, route, env, defaults)
    except EdgedError as exc:
        return Refusal(request_id, identity, route, exc)


def scoped_ask_client(topic: str, defaults: Defaults) -> str:
    """The ``<client>`` of a v1.1 ask topic (the node's or the fleet's); "" for a v1 topic; ValueError when
    the client level is not 1-64 characters of A-Z a-z 0-9 _ -."""
    for base in (defaults.topic("ask"), f"{defaults.prefix}/fleet/ask"):
        if topic.startswith(base + "/"):
            client = topic[len(base) + 1 :]
            if not _CLIENT.fullmatch(client):
                raise ValueError(f"the client level of {base}/<client> must be 1-64 characters of A-Z a-z 0-9 _ -")
            return client
    return ""


def parse_cancel(env: Envelope, defaults: Defaults) -> tuple[Identity | None, str]:
    """Whose request and which id a cancel names.

    A scoped cancel (``.../cancel/<client>``) reaches only that client's requests; a v1 cancel reaches the v1
    requests of its ``client`` field, or any v1 request with the id (None). InvalidRequest for anything else.
    """
    base = defaults.topic("cancel") + "/"
    client = env.topic[len(base) :] if env.topic.startswith(base) else None
    if client is not None and not _CLIENT.fullmatch(client):
        raise InvalidRequest(f"{env.topic} is not a cancel topic: use {base}<client>")
    body = load_json(env.payload[: defaults.max_payload_bytes + 1])
    request_id = body.get("id") if isinstance(body, dict) else None
    if not isinstance(request_id, str) or not _ID.fullmatch(request_id):
        raise InvalidRequest('a cancel is {"id": "<request id>"}')
    if client is not None:
        return Identity(client, True), request_id
    named = body.get("client")
    return (Identity(named, False) if isinstance(named, str) and named else None), request_id


def _route(
    env: Envelope, asked: str | None, identity: Identity, request_id: str, defaults: Defaults
) -> tuple[Route, str | None]:
    """The reply route, and why the asked topic was refused (then the route is the default answer topic)."""
    problem = None if asked is None else reply_topic_problem(asked, identity, defaults)
    topic = asked if asked is not None and problem is None else defaults.answer_topic(identity, request_id)
    return Route(topic, env.qos, env.correlation), problem


def _correlation_id(correlation: bytes | None) -> str | None:
    if correlation is None:
        return None
    try:
        text = correlation.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if _ID.fullmatch(text) else None


def _looks_like_json(env: Envelope) -> bool:
    return env.content_type == "application/json" or env.payload.lstrip()[:1] == b"{"


def _utf8(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the payload is not valid UTF-8 (byte {exc.start})") from exc


class _NumberRefused(ValueError):
    pass


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _NumberRefused(f"an integer of {digits} digits is out of range (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NumberRefused(f"the number {text[:24]} is out of range")
    return value


def _no_constant(text: str) -> float:
    raise _NumberRefused(f"{text} is not a number JSON allows")


def load_json(payload: bytes) -> Any:
    """JSON within bounds: UTF-8, at most MAX_JSON_DEPTH levels, int64-sized integers, finite numbers, and no
    lone surrogate escapes in keys or strings. InvalidRequest, with the reason, otherwise."""
    value = _decode_json(payload)
    _check_json(value, 1)
    return value


def _decode_json(payload: bytes) -> Any:
    text = _utf8(payload)
    try:
        value = json.loads(text, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequest(f"the JSON is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except _NumberRefused as exc:
        raise InvalidRequest(str(exc)) from None
    except ValueError as exc:
        raise InvalidRequest(f"the payload is not valid JSON: {exc}") from None
    return value


def _check_json(value: Any, depth: int) -> None:
    if isinstance(value, str):
        if _SURROGATES.search(value):
            raise InvalidRequest("the JSON holds a lone surrogate escape (\\ud800-\\udfff); send valid Unicode")
        return
    if not isinstance(value, dict | list):
        return
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequest(f"the JSON is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    for item in [*value.keys(), *value.values()] if isinstance(value, dict) else value:
        _check_json(item, depth + 1)


def _request(
    fields: dict[str, Any], request_id: str, identity: Identity, route: Route, env: Envelope, defaults: Defaults
) -> Request:
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    if "id" in fields and fields["id"] != request_id:
        raise InvalidRequest("id must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    if "client" in fields and not isinstance(fields["client"], str):
        raise InvalidRequest("client must be a string")
    profile_name = fields.get("profile")
    if profile_name is not None and not isinstance(profile_name, str):
        raise InvalidRequest("profile must be a string")
    profile = defaults.profiles.pick(profile_name)
    if profile is not None:
        if profile.model and profile.model != defaults.model:
            serves = f"this node serves {defaults.model}"
            raise ModelUnavailable(f"profile {profile.name!r} runs on {profile.model}; {serves}")
        fields = {**_profile_fields(profile), **fields}  # the request's own fields win
    answer_format = fields.get("format")
    if answer_format is not None and answer_format != "json" and not isinstance(answer_format, dict):
        raise InvalidRequest('format must be "json" or a JSON schema object')

    messages = _messages(fields, defaults)
    if profile is not None and profile.style:
        messages = with_style(messages, profile.style)
    max_tokens = _int(fields, "max_tokens", defaults.max_tokens, minimum=1)
    deadline_ms = _int(fields, "deadline_ms", defaults.deadline_ms, minimum=1, maximum=MAX_DEADLINE_MS)
    sampling = SamplingParams(
        temperature=_float(fields, "temperature", 0.0),
        top_k=_int(fields, "top_k", 0, minimum=0),
        top_p=_float(fields, "top_p", 1.0),
        repeat_penalty=_float(fields, "repeat_penalty", 1.0),
        seed=_int(fields, "seed", None, minimum=0),
    )
    stop = fields.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a list of strings")
    if len(stop) > 8:
        raise InvalidRequest(f"at most 8 stop strings are allowed, got {len(stop)}")
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false")
    priority = fields.get("priority", "normal")
    if priority not in PRIORITIES:
        raise InvalidRequest(f"priority must be one of {', '.join(PRIORITIES)}")
    received = env.received_at or time.time()
    return Request(
        id=request_id,
        identity=identity,
        route=route,
        generation=GenerationRequest(
            messages=messages,
            max_tokens=min(max_tokens, defaults.max_tokens_cap),
            sampling=sampling,
            stop=tuple(stop),
        ),
        stream=stream,
        priority=priority,
        received_at=received,
        deadline_at=received + deadline_ms / 1000,
        format=answer_format,
        profile=profile.name if profile else "",
        knowledge=profile.knowledge if profile else "",
    )


def _profile_fields(profile: Profile) -> dict[str, Any]:
    """What the profile sets, as request fields: the fallback for the request's own."""
    out: dict[str, Any] = {
        key: getattr(profile, key)
        for key in ("max_tokens", "temperature", "top_k", "top_p", "repeat_penalty", "seed", "format")
        if getattr(profile, key) is not None
    }
    if profile.stop:
        out["stop"] = list(profile.stop)
    if profile.system:
        out["system"] = profile.system
    return out


def _messages(fields: dict[str, Any], defaults: Defaults) -> tuple[Message, ...]:
    has_prompt, has_messages = "prompt" in fields, "messages" in fields
    if has_prompt == has_messages:
        raise InvalidRequest("send exactly one of prompt (a string) or messages (a list)")
    system = fields.get("system", defaults.system_prompt)
    if not isinstance(system, str):
        raise InvalidRequest("system must be a string")
    if has_prompt:
        if not isinstance(fields["prompt"], str):
            raise InvalidRequest("prompt must be a string")
        turns = [Message("user", fields["prompt"])]
    else:
        raw = fields["messages"]
        if not isinstance(raw, list) or not raw:
            raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
        turns = []
        for i, m in enumerate(raw):
            if not (
                isinstance(m, dict)
                and set(m) == {"role", "content"}
                and isinstance(m["role"], str)
                and isinstance(m["content"], str)
            ):
                raise InvalidRequest(f"messages[{i}] must be an object with string role and content only")
            turns.append(Message(m["role"], m["content"]))
    if system and turns[0].role != "system":
        turns.insert(0, Message("system", system))
    return tuple(turns)


def with_style(messages: tuple[Message, ...], style: str) -> tuple[Message, ...]:
    """The conversation with the profile's style note after its last user turn."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        return messages
    styled = Message("user", f"{messages[last].content}\n\n{style}")
    return (*messages[:last], styled, *messages[last + 1 :])


def _int(fields: dict[str, Any], key: str, default: int | None, minimum: int, maximum: int = 2**63 - 1) -> Any:
    value = fields.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{key} must be an integer")
    if not minimum <= value <= maximum:
        raise InvalidRequest(f"{key} must be between {minimum} and {maximum}, got {value}")
    return value


def _float(fields: dict[str, Any], key: str, default: float) -> float:
    value = fields.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidRequest(f"{key} must be a number")
    return float(value)


def chunk(request_id: str, seq: int, delta: str) -> bytes:
    return _dump({"id": request_id, "seq": seq, "delta": delta, "done": False})


def final(
    request_id: str,
    result: GenerationResult,
    *,
    model: str,
    node: str,
    energy_j: float | None,
    sources: tuple[Source, ...] | None = None,
) -> bytes:
    """The final reply of an answer; ``sources`` (None: no knowledge base was used) names the passages."""
    t = result.timings
    extra = {} if sources is None else {"sources": [{"file": s.file, "heading": s.heading} for s in sources]}
    return _dump(
        {
            "id": request_id,
            "done": True,
            "status": "ok",
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": {
                "prompt_tokens": result.usage.prompt_tokens,
                "completion_tokens": result.usage.completion_tokens,
            },
            "timings": {
                "queue_ms": t.queue_ms,
                "ttft_ms": t.ttft_ms,
                "total_ms": t.total_ms,
                "tokens_per_s": t.tokens_per_s,
            },
            "energy_j": energy_j,
            "model": model,
            "node": node,
            **extra,
        }
    )


def unfinished(request_id: str, finish_reason: str, *, model: str, node: str, queue_ms: float) -> bytes:
    """A final reply for a request that ended before any compute (deadline passed, cancelled while queued)."""
    return _dump(
        {
            "id": request_id,
            "done": True,
            "status": "ok",
            "text": "",
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "timings": {"queue_ms": round(queue_ms, 1), "ttft_ms": 0.0, "total_ms": 0.0, "tokens_per_s": 0.0},
            "energy_j": 0.0,
            "model": model,
            "node": node,
        }
    )


def error(request_id: str, exc: EdgedError, *, node: str) -> bytes:
    return _dump(
        {
            "id": request_id,
            "done": True,
            "status": "error",
            "error": {"code": exc.code, "message": exc.message, "retry_after_s": exc.retry_after_s},
            "node": node,
        }
    )


def status(
    *, state: str, reason: str | None, model: str, queue: int, capacity: int, governor: str, since: float, version: str
) -> bytes:
    return _dump(
        {
            "v": CONTRACT_VERSION,
            "contract": CONTRACT_REVISION,
            "state": state,
            "reason": reason,
            "model": model,
            "queue": queue,
            "capacity": capacity,
            "governor": governor,
            "since": iso8601(since),
            "version": version,
        }
    )


def iso8601(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def telemetry(
    snap: PowerSnapshot,
    *,
    governor: str,
    queue: int,
    tokens_per_s: float,
    energy_j_total: float,
    power_w: float | None,
    power_source: str,
) -> bytes:
    """The retained telemetry message; a reading the board does not have is null."""
    battery = None
    if snap.battery is not None:
        battery = {"percent": snap.battery.percent, "status": snap.battery.status}
    return _dump(
        {
            "ts": iso8601(snap.ts),
            "cpu_temp_c": _round(snap.cpu_temp_c, 1),
            "cpu_freq_mhz": _round(snap.cpu_freq_mhz, 0),
            "throttled": {
                "now": snap.throttled_now.as_dict() if snap.throttled_now else None,
                "since_boot": snap.throttled_since_boot.as_dict() if snap.throttled_since_boot else None,
            },
            "power_w": _round(power_w, 3),
            "power_source": power_source,
            "voltage_v": _round(snap.voltage_v, 3),
            "current_a": _round(snap.current_a, 3),
            "battery": battery,
            "governor": governor,
            "queue": queue,
            "tokens_per_s": tokens_per_s,
            "energy_j_total": round(energy_j_total, 1),
            "mem_available_mb": snap.mem_available_mb,
            "load1": snap.load1,
        }
    )


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
