"""The Ollama API subset Home Assistant and the ``ollama`` client use: request bodies in, response bodies out.
Pure functions; ``edged.web`` serves them."""

from __future__ import annotations

from datetime import UTC, datetime
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
from edged.profiles import Profile
from edged.tools import Tool, ToolCall, parse_tools

_CHAT_FIELDS = frozenset(
    {"model", "messages", "stream", "format", "options", "keep_alive", "tools", "think", "logprobs", "top_logprobs"}
)
_GENERATE_FIELDS = frozenset(
    {
        *(_CHAT_FIELDS - {"messages", "tools"}),
        *("prompt", "system", "suffix", "template", "context", "raw", "images"),
    }
)
_MESSAGE_FIELDS = frozenset({"role", "content", "images", "tool_calls", "tool_name", "thinking"})
# Ollama's options that edged accepts without applying them: hardware and runner settings (num_ctx
# included: the node's context is its own `context_tokens`), and samplers edged does not have.
_OPTIONS_IGNORED = frozenset(
    {
        *("numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all"),
        *("vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep", "tfs_z"),
        *("typical_p", "repeat_last_n", "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau"),
        *("mirostat_eta", "penalize_newline", "min_p"),
    }
)
_OPTIONS_APPLIED = frozenset({"temperature", "top_k", "top_p", "repeat_penalty", "seed", "num_predict", "stop"})
_UNBOUNDED = 2**31  # num_predict -1 or -2: as long as the node allows (its max_tokens_cap)

# HTTP status per error code; Ollama itself answers a full queue with 503.
_STATUS = {
    "invalid_request": 400,
    "too_long": 400,
    "busy": 503,
    "rate_limited": 429,
    "thermal": 503,
    "power": 503,
    "model_unavailable": 503,
    "internal": 500,
}


def parse_chat(body: dict[str, Any], served: ServedModel | None) -> Ask | None:
    """POST /api/chat. None for an empty ``messages`` (Ollama's way to load a model: nothing to generate)."""
    known_fields(body, _CHAT_FIELDS, "an /api/chat request")
    profile = resolve(body.get("model"), served)
    _unsupported(body)
    raw = body.get("messages") or []
    if not isinstance(raw, list):
        raise InvalidRequest("messages must be a list of {role, content} objects")
    if not raw:
        return None
    messages = tuple(_message(m, i) for i, m in enumerate(raw))
    tools = parse_tools(body["tools"]) if body.get("tools") else ()
    if isinstance(raw[-1], dict) and raw[-1].get("role") == "tool":
        tools = ()  # the model has a tool's result: it answers in words
    return _ask(body, messages, profile, tools)


def parse_generate(body: dict[str, Any], served: ServedModel | None) -> Ask | None:
    """POST /api/generate. None for an empty ``prompt`` (load only)."""
    known_fields(body, _GENERATE_FIELDS, "an /api/generate request")
    profile = resolve(body.get("model"), served)
    _unsupported(body)
    for key in ("suffix", "template", "context", "images"):
        if body.get(key):
            raise InvalidRequest(f"{key} is not supported by this node")
    if body.get("raw"):
        raise InvalidRequest("raw prompts are not supported: edged always applies the model's chat template")
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str) or not isinstance(system, str | None):
        raise InvalidRequest("prompt and system must be strings")
    if not prompt:
        return None
    messages = (Message("system", system), Message("user", prompt)) if system else (Message("user", prompt),)
    return _ask(body, messages, profile)


def _unsupported(body: dict[str, Any]) -> None:
    if body.get("think"):
        raise InvalidRequest("think is not supported: this model does not think before answering")
    if body.get("logprobs"):
        raise InvalidRequest("logprobs are not supported by this node")
    keep_alive = body.get("keep_alive")  # accepted: the model stays loaded whatever it says
    if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, int | float | str)):
        raise InvalidRequest('keep_alive must be a duration such as "5m" or a number of seconds')


def _message(raw: object, i: int) -> Message:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"messages[{i}] must be an object with role and content")
    known_fields(raw, _MESSAGE_FIELDS, f"messages[{i}]")
    role, content = raw.get("role"), raw.get("content") or ""
    if not isinstance(role, str) or not isinstance(content, str):
        raise InvalidRequest(f"messages[{i}] must have a string role and content")
    if raw.get("images"):
        raise InvalidRequest(f"messages[{i}] has images; this model reads text only")
    if role == "tool":  # a tool's result, for a model that has no tool role: the user tells it
        name = raw.get("tool_name")
        return Message("user", f"The tool {name} returned: {content}" if isinstance(name, str) else content)
    if role not in ("system", "user", "assistant"):
        raise InvalidRequest(f"messages[{i}]: unknown role {role!r}; use system, user, assistant or tool")
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be a list")
    said = [toolbox.said(_call(c, f"messages[{i}].tool_calls[{j}]")) for j, c in enumerate(calls)]
    return Message(role, "\n".join([content, *said]).strip() if said else content)


def _call(raw: object, where: str) -> ToolCall:
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f'{where} must be {{"function": {{"name": ..., "arguments": {{...}}}}}}')
    arguments = function.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}.function.arguments must be an object")
    return ToolCall(function["name"], arguments)


def _ask(
    body: dict[str, Any], messages: tuple[Message, ...], profile: Profile | None, tools: tuple[Tool, ...] = ()
) -> Ask:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("options must be an object")
    known_fields(options, _OPTIONS_APPLIED | _OPTIONS_IGNORED, "options")
    fallback = profile_options(profile)  # the profile's settings where the request says nothing
    profile_format = fallback.pop("format", None)
    if "max_tokens" in fallback:
        fallback["num_predict"] = fallback.pop("max_tokens")
    options = {**fallback, **options}
    sampling = SamplingParams(
        temperature=number(options.get("temperature", 0.0), "options.temperature"),
        top_k=integer(options.get("top_k", 0), "options.top_k", 0),
        top_p=number(options.get("top_p", 1.0), "options.top_p"),
        repeat_penalty=number(options.get("repeat_penalty", 1.0), "options.repeat_penalty"),
        seed=integer(options["seed"], "options.seed", 0) if options.get("seed") is not None else None,
    )
    max_tokens = None
    if options.get("num_predict") is not None:
        n = options["num_predict"]
        if n in (-1, -2):
            max_tokens = _UNBOUNDED
        else:
            max_tokens = integer(n, "options.num_predict (or -1 for as long as the node allows)", 1)
    stop = stop_strings(options.get("stop", []), "options.stop")
    stream = body.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false")
    format = body.get("format") or (None if tools else profile_format)
    if format is not None and format != "json" and not isinstance(format, dict):
        raise InvalidRequest('format must be "json" or a JSON schema object')
    check_constraints(format, tools)
    return Ask(messages, max_tokens, sampling, stop, stream, format=format, tools=tools, profile=profile)


# -- responses ---------------------------------------------------------------------------------------


def created_at(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def chat_chunk(model: str, delta: str, ts: float) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": created_at(ts),
        "message": {"role": "assistant", "content": delta},
        "done": False,
    }


def chat_final(model: str, answer: Answer, ts: float, *, streamed: bool) -> dict[str, Any]:
    """The last object: the whole text when not streamed (a stream already carried it), the tool calls,
    and the figures."""
    message: dict[str, Any] = {"role": "assistant", "content": "" if streamed else answer.text}
    if answer.tool_calls:
        message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in answer.tool_calls]
    return {"model": model, "created_at": created_at(ts), "message": message, **_done(answer)}


def generate_chunk(model: str, delta: str, ts: float) -> dict[str, Any]:
    return {"model": model, "created_at": created_at(ts), "response": delta, "done": False}


def generate_final(model: str, answer: Answer, ts: float, *, streamed: bool) -> dict[str, Any]:
    return {"model": model, "created_at": created_at(ts), "response": "" if streamed else answer.text, **_done(answer)}


def loaded(model: str, ts: float, *, chat: bool) -> dict[str, Any]:
    """The reply to an empty chat or prompt: the model is loaded (it always is)."""
    body: dict[str, Any] = {"model": model, "created_at": created_at(ts), "done": True, "done_reason": "load"}
    body["message" if chat else "response"] = {"role": "assistant", "content": ""} if chat else ""
    return body


def _done(answer: Answer) -> dict[str, Any]:
    """Ollama's figures, in nanoseconds: prompt evaluation is the time to the first token."""
    ns = 1_000_000
    return {
        "done": True,
        "done_reason": answer.finish_reason,
        "total_duration": int((answer.queue_ms + answer.total_ms) * ns),
        "load_duration": 0,
        "prompt_eval_count": answer.prompt_tokens,
        "prompt_eval_duration": int(answer.ttft_ms * ns),
        "eval_count": answer.completion_tokens,
        "eval_duration": int(max(0.0, answer.total_ms - answer.ttft_ms) * ns),
    }


def _details(served: ServedModel) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "onnx",
        "family": served.family,
        "families": [served.family],
        "parameter_size": served.parameter_size,
        "quantization_level": served.quant,
    }


def tags(served: ServedModel | None) -> dict[str, Any]:
    """GET /api/tags: the served model under each of its names."""
    if served is None:
        return {"models": []}
    entry = {
        "modified_at": created_at(served.modified_at),
        "size": served.size_bytes,
        "digest": served.digest,
        "details": _details(served),
    }
    names = [*served.names, *sorted(served.profiles.profiles)]
    return {"models": [{"name": name, "model": name, **entry} for name in names]}


def ps(served: ServedModel | None) -> dict[str, Any]:
    """GET /api/ps: the loaded model; it stays loaded (keep_alive is accepted and has nothing to do)."""
    if served is None:
        return {"models": []}
    entry = {
        "name": served.ollama_name,
        "model": served.ollama_name,
        "size": served.size_bytes,
        "digest": served.digest,
        "details": _details(served),
        "expires_at": "9999-12-31T23:59:59Z",
        "size_vram": 0,
        "context_length": served.context_tokens,
    }
    return {"models": [entry]}


def show(body: dict[str, Any], served: ServedModel | None) -> dict[str, Any]:
    """POST /api/show."""
    known_fields(body, frozenset({"model", "name", "verbose"}), "an /api/show request")
    model = resolve_model(body.get("model") or body.get("name"), served)
    return {
        "modelfile": "",
        "parameters": "",
        "template": model.chat_template,
        "details": _details(model),
        "model_info": {"general.architecture": model.family, f"{model.family}.context_length": model.context_tokens},
        "capabilities": ["completion", "tools"],
        "modified_at": created_at(model.modified_at),
    }


def status_of(exc: EdgedError) -> int:
    return 404 if isinstance(exc, UnknownModel) else _STATUS.get(exc.code, 500)


def error(message: str, code: str, retry_after_s: float | None) -> dict[str, Any]:
    """Ollama's error body (the client raises ``ResponseError`` with it and the status), with edged's code."""
    return {"error": message, "code": code, "retry_after_s": retry_after_s}
