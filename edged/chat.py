"""What the HTTP chat APIs (Ollama's and OpenAI's) share: the ask in edged's terms, the answer, the served
model's names, and the queue's ``Request`` built from an ask. Pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from edged import tools as toolbox
from edged.errors import InvalidRequest
from edged.llm import GenerationRequest, GenerationResult, Message, SamplingParams
from edged.profiles import Catalog, Profile
from edged.protocol import Defaults, Identity, Request, Route, with_style
from edged.tools import Tool, ToolCall

# Ollama's library names for the models edged builds, so clients that know those names find them.
_OLLAMA_NAMES = {"smollm2-135m-instruct": ("smollm2:135m", "smollm2:135m-instruct")}


class UnknownModel(InvalidRequest):
    """A model name this node does not serve (HTTP 404)."""


@dataclass(frozen=True)
class ServedModel:
    """The model this node serves, as the APIs describe it."""

    name: str  # edged's name: the model directory
    size_bytes: int
    digest: str  # sha256 of its manifest
    modified_at: float  # the manifest's mtime
    quant: str
    family: str
    parameter_size: str  # "135M"
    context_tokens: int
    chat_template: str
    profiles: Catalog = field(default_factory=Catalog)  # each profile is a model name too

    @property
    def names(self) -> tuple[str, ...]:
        """Every name it answers to: its own, and Ollama's library names for the recipe it was built from."""
        aliases = next((a for recipe, a in _OLLAMA_NAMES.items() if self.name.startswith(recipe)), ())
        return (self.name, *aliases)

    @property
    def ollama_name(self) -> str:
        """The name Ollama's library gives it, else edged's."""
        return self.names[1] if len(self.names) > 1 else self.name


def resolve_model(name: object, served: ServedModel | None) -> ServedModel:
    """The served model when ``name`` is one of its names or a profile's (``:latest`` and case aside);
    UnknownModel otherwise."""
    resolve(name, served)
    assert served is not None
    return served


def resolve(name: object, served: ServedModel | None) -> Profile | None:
    """The profile a model name picks: a profile's own name picks it, the model's names the node's default
    profile (None when it has none), as a request without ``profile`` gets on MQTT."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model is required: name the model to use, as /api/tags or /v1/models list it")
    wanted = name.lower().removesuffix(":latest")
    if served is None:
        raise UnknownModel(f"model {name!r} not found: this node has no model loaded")
    if wanted in (n.lower() for n in served.names):
        return served.profiles.pick(None)
    by_name = {n.lower(): p for n, p in served.profiles.profiles.items()}
    if wanted in by_name:
        return by_name[wanted]
    known = ", ".join([*served.names, *sorted(served.profiles.profiles)])
    raise UnknownModel(f"model {name!r} not found; this node serves {known}")


def profile_options(profile: Profile | None) -> dict[str, Any]:
    """What a profile sets, by edged's names: the fallback for what the request does not say."""
    if profile is None:
        return {}
    keys = ("max_tokens", "temperature", "top_k", "top_p", "repeat_penalty", "seed", "format")
    out = {key: getattr(profile, key) for key in keys if getattr(profile, key) is not None}
    return {**out, "stop": list(profile.stop)} if profile.stop else out


def parameter_size(model_name: str) -> str:
    """ "135M" from "smollm2-135m-instruct"; "" when the name does not say."""
    found = re.search(r"(?<![a-z0-9])(\d+(?:\.\d+)?)([mb])(?![a-z])", model_name.lower())
    return f"{found.group(1)}{found.group(2).upper()}" if found else ""


@dataclass(frozen=True)
class Ask:
    """One API call's request in edged's terms, before admission."""

    messages: tuple[Message, ...]
    max_tokens: int | None = None  # None: the node's default
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stream: bool = False
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema the answer follows (edged.structured)
    tools: tuple[Tool, ...] = ()  # offered: the answer is a call of one of them, or (allow_answer) text
    allow_answer: bool = True
    profile: Profile | None = None  # its system turn, style note and knowledge base (the rest is merged in)

    @property
    def constraint(self) -> str | dict[str, Any] | None:
        """What the answer is held to: a tool call (or answer) object, the format, or None."""
        return toolbox.call_schema(self.tools, self.allow_answer) if self.tools else self.format

    @property
    def streams_text(self) -> bool:
        """Whether text deltas go to the client as they come; a tool call is read whole, at the end."""
        return self.stream and not self.tools

    def told(self, messages: tuple[Message, ...]) -> tuple[Message, ...]:
        """The conversation the model sees: the tools described in the system turn when there are any."""
        if not self.tools:
            return messages
        told = toolbox.instructions(self.tools, self.allow_answer)
        first, *rest = messages
        if first.role == "system":
            return (Message("system", f"{first.content}\n\n{told.content}"), *rest)
        return (told, *messages)

    def settle(self, answer: Answer) -> Answer:
        """The answer as the client gets it: a tool call read out of the constrained reply."""
        if not self.tools:
            return answer
        reply = toolbox.read_reply(answer.text)
        if isinstance(reply, ToolCall):
            return replace(answer, text="", tool_calls=(reply,))
        return replace(answer, text=reply)


def check_constraints(format: str | dict[str, Any] | None, tools: tuple[Tool, ...]) -> None:
    if format is not None and tools:
        raise InvalidRequest("send a format or tools, not both: a tool call is already constrained JSON")


@dataclass(frozen=True)
class Answer:
    """A finished request as the APIs report it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    ttft_ms: float
    total_ms: float
    model: str
    tool_calls: tuple[ToolCall, ...] = ()

    @staticmethod
    def of(result: GenerationResult, model: str) -> Answer:
        t = result.timings
        return Answer(
            result.text,
            result.finish_reason,
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            t.queue_ms,
            t.ttft_ms,
            t.total_ms,
            model,
        )

    @staticmethod
    def unfinished(finish_reason: str, model: str, queue_ms: float) -> Answer:
        """A request that ended before any compute (its deadline passed, or it was cancelled, while queued)."""
        return Answer("", finish_reason, 0, 0, round(queue_ms, 1), 0.0, 0.0, model)


def to_request(ask: Ask, request_id: str, identity: Identity, defaults: Defaults, now: float) -> Request:
    """The queue's request for ``ask``: the node's system prompt, token budget and deadline applied, and the
    constraint the answer is held to as its format (admission compiles it, as for MQTT)."""
    messages, profile = ask.messages, ask.profile
    system = profile.system if profile is not None and profile.system else defaults.system_prompt
    if system and (not messages or messages[0].role != "system"):
        messages = (Message("system", system), *messages)
    if profile is not None and profile.style:
        messages = with_style(messages, profile.style)
    messages = ask.told(messages)
    max_tokens = defaults.max_tokens if ask.max_tokens is None else ask.max_tokens
    return Request(
        id=request_id,
        identity=identity,
        route=Route("", 0, None),  # answered on the HTTP response, not over MQTT
        generation=GenerationRequest(
            messages=messages,
            max_tokens=min(max_tokens, defaults.max_tokens_cap),
            sampling=ask.sampling,
            stop=ask.stop,
        ),
        stream=ask.streams_text,
        priority="normal",
        received_at=now,
        deadline_at=now + defaults.deadline_ms / 1000,
        format=ask.constraint,
        profile=profile.name if profile is not None else "",
        knowledge=profile.knowledge if profile is not None else "",
    )


# -- checks both APIs use on their JSON bodies ------------------------------------------------------


def known_fields(body: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field{'s' if len(unknown) > 1 else ''} in {where}: {', '.join(unknown)}")


def integer(value: object, key: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"{key} must be an integer of at least {minimum}, got {value!r}")
    return value


def number(value: object, key: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidRequest(f"{key} must be a number, got {value!r}")
    return float(value)


def stop_strings(value: object, key: str) -> tuple[str, ...]:
    """A string or a list of strings (both APIs allow either)."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest(f"{key} must be a string or a list of strings")
    return tuple(stops)
