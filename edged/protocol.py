"""The MQTT contract's payloads: parsing requests, building replies and status. Pure functions."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edged.errors import EdgedError, InvalidRequest, TooLong
from edged.llm import GenerationRequest, GenerationResult, Message, SamplingParams
from edged.sensors import PowerSnapshot

CONTRACT_VERSION = 1
PRIORITIES = ("alert", "normal", "background")
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
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
    """What arrived over MQTT, before parsing: the payload and the transport properties."""

    payload: bytes
    qos: int
    client: str  # the MQTT client id when known (v5 user property), else ""
    response_topic: str | None = None  # MQTT v5 Response Topic
    correlation: bytes | None = None  # MQTT v5 Correlation Data
    content_type: str | None = None
    received_at: float = 0.0  # wall clock, time.time()


@dataclass(frozen=True)
class Route:
    """Where the replies of one request go."""

    topic: str
    qos: int
    correlation: bytes | None


@dataclass(frozen=True)
class Request:
    id: str
    route: Route
    generation: GenerationRequest
    stream: bool
    priority: str
    client: str
    received_at: float  # wall clock
    deadline_at: float  # wall clock

    @property
    def priority_rank(self) -> int:
        return PRIORITIES.index(self.priority)


@dataclass(frozen=True)
class Defaults:
    """Per-node values a request falls back to, and the limits it cannot exceed."""

    answer_prefix: str  # <prefix>/<node>/answer
    system_prompt: str
    max_tokens: int
    max_tokens_cap: int
    deadline_ms: int
    max_payload_bytes: int


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def route_of(env: Envelope, defaults: Defaults) -> tuple[str, Route, dict[str, Any] | None]:
    """The request id and reply route, found even for payloads that fail to parse, so errors reach the sender."""
    body: dict[str, Any] | None = None
    if _looks_like_json(env):
        try:
            parsed = json.loads(env.payload)
            body = parsed if isinstance(parsed, dict) else None
        except (ValueError, UnicodeDecodeError):
            body = None
    request_id = None
    if body is not None and isinstance(body.get("id"), str) and _ID.fullmatch(body["id"]):
        request_id = body["id"]
    elif env.correlation is not None:
        try:
            text = env.correlation.decode("ascii")
            request_id = text if _ID.fullmatch(text) else None
        except UnicodeDecodeError:
            request_id = None
    request_id = request_id or new_id()
    if env.response_topic:
        topic = env.response_topic
    elif body is not None and isinstance(body.get("reply_to"), str) and _valid_topic(body["reply_to"]):
        topic = body["reply_to"]
    else:
        topic = f"{defaults.answer_prefix}/{request_id}"
    return request_id, Route(topic, env.qos, env.correlation), body


def parse(env: Envelope, defaults: Defaults) -> Request:
    """A validated request, or InvalidRequest / TooLong with a message the sender can act on."""
    request_id, route, body = route_of(env, defaults)
    if len(env.payload) > defaults.max_payload_bytes:
        raise TooLong(
            f"the payload is {len(env.payload)} bytes; this node accepts at most {defaults.max_payload_bytes}"
        )
    try:
        text = env.payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the payload is not valid UTF-8 (byte {exc.start})") from exc
    if _looks_like_json(env):
        if body is None:
            try:
                json.loads(text)
            except ValueError as exc:
                raise InvalidRequest(f"the payload is not valid JSON: {exc}") from exc
            raise InvalidRequest('a JSON request must be an object like {"prompt": "..."}')
        fields = body
    else:
        fields = {"prompt": text}

    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    if "id" in fields and fields["id"] != request_id:
        raise InvalidRequest("id must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    if "reply_to" in fields and route.topic != fields["reply_to"] and not env.response_topic:
        raise InvalidRequest("reply_to must be a topic name without wildcards")
    if fields.get("profile") is not None:
        raise InvalidRequest(f"profile {fields['profile']!r} is not configured on this node")
    if fields.get("format") is not None:
        raise InvalidRequest("format (JSON-constrained answers) is not available on this node yet")

    messages = _messages(fields, defaults)
    max_tokens = _int(fields, "max_tokens", defaults.max_tokens, minimum=1)
    deadline_ms = _int(fields, "deadline_ms", defaults.deadline_ms, minimum=1)
    sampling = SamplingParams(
        temperature=_float(fields, "temperature", 0.0),
        top_k=_int(fields, "top_k", 0, minimum=0),
        top_p=_float(fields, "top_p", 1.0),
        repeat_penalty=_float(fields, "repeat_penalty", 1.0),
        seed=_int(fields, "seed", None, minimum=None),
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
    client = fields.get("client", env.client)
    if not isinstance(client, str):
        raise InvalidRequest("client must be a string")
    received = env.received_at or time.time()
    return Request(
        id=request_id,
        route=route,
        generation=GenerationRequest(
            messages=messages,
            max_tokens=min(max_tokens, defaults.max_tokens_cap),
            sampling=sampling,
            stop=tuple(stop),
        ),
        stream=stream,
        priority=priority,
        client=client,
        received_at=received,
        deadline_at=received + deadline_ms / 1000,
    )


def _looks_like_json(env: Envelope) -> bool:
    return env.content_type == "application/json" or env.payload.lstrip()[:1] == b"{"


def _valid_topic(topic: str) -> bool:
    return bool(topic) and not any(c in topic for c in "+#\0") and len(topic.encode()) < 65536


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


def _int(fields: dict[str, Any], key: str, default: int | None, minimum: int | None) -> Any:
    value = fields.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{key} must be an integer")
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"{key} must be at least {minimum}, got {value}")
    return value


def _float(fields: dict[str, Any], key: str, default: float) -> float:
    value = fields.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidRequest(f"{key} must be a number")
    return float(value)


def chunk(request_id: str, seq: int, delta: str) -> bytes:
    return _dump({"id": request_id, "seq": seq, "delta": delta, "done": False})


def final(request_id: str, result: GenerationResult, *, model: str, node: str, energy_j: float | None) -> bytes:
    t = result.timings
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
