"""Tool calls for a model that was not trained for them: the tools are described in a system turn, and the
answer is constrained (``edged.structured``) to one JSON object, either a call of one of the tools with
arguments that validate against its parameter schema, or a plain answer. Pure functions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edged.errors import InvalidRequest
from edged.llm import Message

MAX_TOOLS = 32


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema of the arguments object


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tools(raw: object) -> tuple[Tool, ...]:
    """``[{"type": "function", "function": {"name", "description", "parameters"}}]``, as both APIs send it."""
    if not isinstance(raw, list):
        raise InvalidRequest('tools must be a list of {"type": "function", "function": {...}} objects')
    if len(raw) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools are allowed, got {len(raw)}")
    tools = []
    for i, entry in enumerate(raw):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("type", "function") != "function" or not isinstance(function, dict):
            raise InvalidRequest(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        name, description = function.get("name"), function.get("description") or ""
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(name, str) or not name or not isinstance(description, str):
            raise InvalidRequest(f"tools[{i}].function needs a name (and a description string)")
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object")
        tools.append(Tool(name, description, parameters))
    if len({t.name for t in tools}) != len(tools):
        raise InvalidRequest("tool names must be unique")
    return tuple(tools)


def instructions(tools: tuple[Tool, ...], allow_answer: bool) -> Message:
    """The system turn that tells the model which tools there are and what to write."""
    lines = ["You can call these tools:"]
    for tool in tools:
        params = ", ".join(_params(tool.parameters))
        lines.append(f"- {tool.name}({params}): {tool.description}".rstrip(": "))
    lines.append('To call a tool, reply with {"name": "<tool name>", "arguments": {...}}.')
    if allow_answer:
        lines.append('When no tool fits, reply with {"answer": "<your answer>"}.')
    return Message("system", "\n".join(lines))


def _params(schema: dict[str, Any]) -> list[str]:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return []
    out = []
    for key, spec in properties.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        out.append(f"{key}: {kind}" if isinstance(kind, str) else str(key))
    return out


def call_schema(tools: tuple[Tool, ...], allow_answer: bool) -> dict[str, Any]:
    """The JSON schema the answer is held to: one call of a listed tool, or (``allow_answer``) an answer."""
    options: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    if allow_answer:
        options.append(
            {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def read_reply(text: str) -> ToolCall | str:
    """What the constrained answer says: a call, or the answer's text. A reply cut short (its token budget
    or deadline ran out mid-document) is returned as the text it is."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get("arguments"), dict):
        return ToolCall(value["name"], value["arguments"])
    if isinstance(value, dict) and isinstance(value.get("answer"), str):
        return str(value["answer"])
    return text


def said(call: ToolCall) -> str:
    """An earlier call in the conversation, written as the model writes one."""
    return json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
