"""Tool calls as constrained JSON, the pure parts: what clients send, the schema the answer is held to, and
reading the reply back. The HTTP tests run them against the real model."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from edged.errors import InvalidRequest
from edged.tools import Tool, ToolCall, call_schema, instructions, parse_tools, read_reply, said

LIGHT = {
    "type": "function",
    "function": {
        "name": "set_light",
        "description": "Turn a light on or off",
        "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]},
    },
}


def test_the_call_schema_takes_a_call_of_a_listed_tool_or_an_answer() -> None:
    tools = parse_tools([LIGHT, {"type": "function", "function": {"name": "ping"}}])
    schema = call_schema(tools, allow_answer=True)
    jsonschema.validate({"name": "set_light", "arguments": {"on": True}}, schema)
    jsonschema.validate({"name": "ping", "arguments": {}}, schema)
    jsonschema.validate({"answer": "Paris"}, schema)
    for wrong in ({"name": "set_light", "arguments": {}}, {"name": "reboot", "arguments": {}}, {"text": "hi"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"answer": "Paris"}, call_schema(tools, allow_answer=False))


def test_the_reply_is_read_back_as_a_call_or_text() -> None:
    assert read_reply('{"name": "set_light", "arguments": {"on": true}}') == ToolCall("set_light", {"on": True})
    assert read_reply('{"answer": "Paris"}') == "Paris"
    assert read_reply('{"name": "set_li') == '{"name": "set_li'  # cut short by the token budget: as it is
    call = ToolCall("set_light", {"on": False})
    assert read_reply(said(call)) == call and json.loads(said(call))["arguments"] == {"on": False}


def test_the_model_is_told_each_tool_and_what_to_write() -> None:
    told = instructions((Tool("set_light", "Turn a light on or off", LIGHT["function"]["parameters"]),), True)  # type: ignore[index,arg-type]
    assert told.role == "system"
    assert "- set_light(on: boolean): Turn a light on or off" in told.content and '{"answer"' in told.content
    assert '{"answer"' not in instructions(parse_tools([LIGHT]), False).content


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"type": "function"}, "must be a list"),
        ([{"type": "retrieval"}], "tools[0] must be"),
        ([{"type": "function", "function": {"description": "x"}}], "needs a name"),
        ([{"type": "function", "function": {"name": "a", "parameters": "object"}}], "JSON schema object"),
        ([LIGHT, LIGHT], "unique"),
        ([LIGHT] * 40, "at most 32"),
    ],
)
def test_bad_tools_are_refused_with_the_reason(raw: object, words: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        parse_tools(raw)
