"""OpenAI's chat API subset (``/v1/models``, ``/v1/chat/completions``): request bodies in, response bodies and
server-sent events out, errors in OpenAI's shape. Pure functions; ``edged.web`` serves them."""

from __future__ import annotations

import json
from typing import Any

from edged import tools as toolbox
from edged.chat import (
    Answer,
    Ask,
    ServedModel,
    UnknownModel,
    check_constraints,
    integer,
    known_fields,
    number,
    profile_options,
    resolve,
    resolve_model,
    stop_strings,
)
from edged.errors import EdgedError, InvalidRequest
from edged.llm import Message, SamplingParams
from edged.tools import Tool, ToolCall, parse_tools

_FIELDS = frozenset(
    {
        *("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed"),
        *("stream", "stream_options", "response_format", "tools", "tool_choice", "parallel_tool_calls", "n"),
        *("user", "metadata", "store", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs"),
        *("logit_bias", "service_tier"),
    }
)
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# HTTP status per error code: OpenAI answers an overloaded server with 429 too, and its client retries
# 429 and 5xx after Retry-After.
_STATUS = {
    "invalid_request": 400,
    "too_long": 400,
    "busy": 429,
    "rate_limited": 429,
    "thermal": 503,
    "power": 503,
    "model_unavailable": 503,
    "internal": 500,
}
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
_TYPES |= {413: "invalid_request_error", 429: "rate_limit_error"}
# finish_reason is an enum in OpenAI's API; edged's others (deadline, cancelled, thermal, power) cut the
# answer short, which is what "length" says. The reason itself goes along as edged_finish_reason.
_FINISH = {"stop": "stop", "length": "length"}


def parse(body: dict[str, Any], served: ServedModel | None) -> Ask:
    """POST /v1/chat/completions."""
    known_fields(body, _FIELDS, "a chat completion request")
    profile = resolve(body.get("model"), served)
    fallback = profile_options(profile)  # the profile's settings where the request says nothing
    body = {**{k: v for k, v in fallback.items() if k not in ("top_k", "repeat_penalty", "format")}, **body}
    if body.get("n", 1) != 1:
        raise InvalidRequest("n must be 1: this node makes one answer per request")
    if body.get("logprobs") or body.get("logit_bias"):
        raise InvalidRequest("logprobs and logit_bias are not supported by this node")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key):
            raise InvalidRequest(f"{key} is not supported; use a seed and temperature, or edged's repeat_penalty")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
    messages = tuple(_message(m, i) for i, m in enumerate(raw))
    tools, allow_answer = _tools(body)
    if isinstance(raw[-1], dict) and raw[-1].get("role") == "tool":
        tools = ()  # the model has a tool's result: it answers in words
    format = _format(body.get("response_format"))
    if format is None and not tools:
        format = fallback.get("format")
    check_constraints(format, tools)
    sampling = SamplingParams(
        temperature=number(body["temperature"], "temperature") if body.get("temperature") is not None else 0.0,
        top_p=number(body["top_p"], "top_p") if body.get("top_p") is not None else 1.0,
        seed=integer(body["seed"], "seed", 0) if body.get("seed") is not None else None,
        top_k=fallback.get("top_k", 0),
        repeat_penalty=fallback.get("repeat_penalty", 1.0),
    )
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false")
    return Ask(
        messages,
        max_tokens=integer(limit, "max_tokens", 1) if limit is not None else None,
        sampling=sampling,
        stop=stop_strings(body["stop"], "stop") if body.get("stop") is not None else (),
        stream=stream,
        format=format,
        tools=tools,
        allow_answer=allow_answer,
        profile=profile,
    )


def _tools(body: dict[str, Any]) -> tuple[tuple[Tool, ...], bool]:
    """The tools the model may call, and whether it may answer in words instead (``tool_choice``)."""
    tools = parse_tools(body["tools"]) if body.get("tools") else ()
    choice = body.get("tool_choice", "auto")
    if choice == "none" or not tools:
        return (), True
    if choice == "auto":
        return tools, True
    if choice == "required":
        return tools, False
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    chosen = tuple(t for t in tools if t.name == name)
    if not chosen:
        raise InvalidRequest(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": <one of the tools>}}'
        )
    return chosen, False


def _format(response_format: object) -> str | dict[str, Any] | None:
    """``response_format``: text (None), json_object ("json"), or json_schema (its schema)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if kind == "json_schema" and isinstance(schema, dict):
        return schema
    raise InvalidRequest(
        'response_format must be {"type": "text"}, {"type": "json_object"} or '
        '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}'
    )


def include_usage(body: dict[str, Any]) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _message(raw: object, i: int) -> Message:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"messages[{i}] must be an object with role and content")
    known_fields(raw, _MESSAGE_FIELDS, f"messages[{i}]")
    role, content = raw.get("role"), _text(raw.get("content"), i)
    if role == "tool":  # a tool's result, for a model that has no tool role: the user tells it
        return Message("user", f"The tool returned: {content}")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidRequest(f"messages[{i}]: unknown role {role!r}; use system, developer, user, assistant or tool")
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be a list")
    said = [toolbox.said(_call(c, f"messages[{i}].tool_calls[{j}]")) for j, c in enumerate(calls)]
    return Message(_ROLES[role], "\n".join([content, *said]).strip() if said else content)


def _call(raw: object, where: str) -> ToolCall:
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f'{where} must be {{"type": "function", "function": {{"name": ..., "arguments": "..."}}}}')
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError):
        raise InvalidRequest(f"{where}.function.arguments must be a JSON object in a string") from None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}.function.arguments must be a JSON object in a string")
    return ToolCall(function["name"], arguments)


def _text(content: object, i: int) -> str:
    """A string, or a list of text parts; images and audio are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages[{i}].content: only text parts are supported by this model")
            parts.append(part["text"])
        return "\n".join(parts)
    raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts")


# -- responses ---------------------------------------------------------------------------------------


def models(served: ServedModel | None) -> dict[str, Any]:
    """GET /v1/models."""
    names = [] if served is None else [*served.names, *sorted(served.profiles.profiles)]
    data = [_model(name, served) for name in names if served is not None]
    return {"object": "list", "data": data}


def model(name: str, served: ServedModel | None) -> dict[str, Any]:
    """GET /v1/models/{model}."""
    return _model(name, resolve_model(name, served))


def _model(name: str, served: ServedModel) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(served.modified_at), "owned_by": "edged"}


def completion(completion_id: str, name: str, created: int, answer: Answer) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text}
    if answer.tool_calls:
        message = {"role": "assistant", "content": None, "tool_calls": _calls(completion_id, answer)}
    choice = {"index": 0, "message": message, "logprobs": None, **_finish(answer)}
    return {**_head(completion_id, name, created, "chat.completion"), "choices": [choice], "usage": usage(answer)}


def first_chunk(completion_id: str, name: str, created: int) -> dict[str, Any]:
    """The stream's first event: the role, as OpenAI sends it."""
    return _chunk(completion_id, name, created, {"role": "assistant", "content": ""}, None)


def chunk(completion_id: str, name: str, created: int, delta: str) -> dict[str, Any]:
    return _chunk(completion_id, name, created, {"content": delta}, None)


def whole_chunk(completion_id: str, name: str, created: int, answer: Answer) -> dict[str, Any]:
    """A reply read whole (a tool call, or the answer beside one) in one delta."""
    if answer.tool_calls:
        calls = [{"index": i, **call} for i, call in enumerate(_calls(completion_id, answer))]
        return _chunk(completion_id, name, created, {"tool_calls": calls}, None)
    return chunk(completion_id, name, created, answer.text)


def _calls(completion_id: str, answer: Answer) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{completion_id.removeprefix('chatcmpl-')}_{i}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for i, c in enumerate(answer.tool_calls)
    ]


def last_chunk(completion_id: str, name: str, created: int, answer: Answer) -> dict[str, Any]:
    return _chunk(completion_id, name, created, {}, answer)


def usage_chunk(completion_id: str, name: str, created: int, answer: Answer) -> dict[str, Any]:
    return {**_head(completion_id, name, created, "chat.completion.chunk"), "choices": [], "usage": usage(answer)}


def usage(answer: Answer) -> dict[str, int]:
    total = answer.prompt_tokens + answer.completion_tokens
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens, "total_tokens": total}


def _chunk(completion_id: str, name: str, created: int, delta: dict[str, Any], answer: Answer | None) -> dict[str, Any]:
    finish = _finish(answer) if answer is not None else {"finish_reason": None}
    choice = {"index": 0, "delta": delta, "logprobs": None, **finish}
    return {**_head(completion_id, name, created, "chat.completion.chunk"), "choices": [choice]}


def _head(completion_id: str, name: str, created: int, kind: str) -> dict[str, Any]:
    return {"id": completion_id, "object": kind, "created": created, "model": name, "system_fingerprint": None}


def _finish(answer: Answer) -> dict[str, Any]:
    if answer.tool_calls:
        return {"finish_reason": "tool_calls"}
    reason = _FINISH.get(answer.finish_reason, "length")
    extra = {} if reason == answer.finish_reason else {"edged_finish_reason": answer.finish_reason}
    return {"finish_reason": reason, **extra}


def status_of(exc: EdgedError) -> int:
    return 404 if isinstance(exc, UnknownModel) else _STATUS.get(exc.code, 500)


def error(message: str, code: str, retry_after_s: float | None, status: int) -> dict[str, Any]:
    """OpenAI's error body; ``code`` is the contract's (``busy``, ``invalid_request``, ...)."""
    kind = _TYPES.get(status, "server_error")
    code = "model_not_found" if status == 404 else "invalid_api_key" if status == 401 else code
    return {"error": {"message": message, "type": kind, "param": None, "code": code, "retry_after_s": retry_after_s}}
