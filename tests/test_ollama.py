"""The official ``ollama`` client (its AsyncClient is what Home Assistant uses) against `edged serve`'s HTTP
front door, with the real model and a real broker: the calls Home Assistant makes, and the refusals."""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest

from tests.mqttlab import (
    SMOLLM2,
    Mosquitto,
    http_node,
    module_broker,  # noqa: F401 (a fixture)
    wait_queue,
)

pytestmark = pytest.mark.model

LONG = "Write a long story about a lighthouse keeper and the sea, with many details."


@pytest.fixture(scope="module")
def http_port(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """A node with the front door on a free loopback port and a queue of one (so "full" is reachable)."""
    node, port = http_node(tmp_path_factory.mktemp("node"), broker, smollm2_dirs["int4"].parent)
    yield port
    assert node.stop() == 0, node.log.read_text()


def client(port: int) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=f"http://127.0.0.1:{port}", timeout=120)


def test_list_and_ps_name_the_model_as_ollama_and_edged_do(http_port: int) -> None:
    """Home Assistant polls list() and ps() and picks the model by name; `smollm2:135m` is Ollama's name."""

    async def run() -> tuple[ollama.ListResponse, ollama.ProcessResponse]:
        c = client(http_port)
        return await c.list(), await c.ps()

    listed, loaded = asyncio.run(run())
    names = [m.model for m in listed.models]
    assert SMOLLM2 in names and "smollm2:135m" in names
    model = listed.models[0]
    assert model.size and model.size > 50_000_000 and model.digest and len(model.digest) == 64
    assert model.details is not None and model.details.family == "llama" and model.details.parameter_size == "135M"
    assert [m.model for m in loaded.models] == ["smollm2:135m"]
    assert loaded.models[0].context_length == 512


def test_streamed_chat_as_home_assistant_sends_it(http_port: int) -> None:
    """Home Assistant's call: streamed, keep_alive -1, options.num_ctx 8192; the deltas make the answer."""

    async def run() -> list[ollama.ChatResponse]:
        stream = await client(http_port).chat(
            model="smollm2:135m",
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of Japan?"},
            ],
            stream=True,
            keep_alive=-1,
            options={"num_ctx": 8192},
        )
        return [part async for part in stream]

    parts = asyncio.run(run())
    assert len(parts) > 3, "streamed in pieces, not in one"
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    text = "".join(p.message.content or "" for p in parts)
    assert "Tokyo" in text
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count and last.prompt_eval_count
    assert last.total_duration and last.eval_duration and last.total_duration >= last.eval_duration


def test_generate_applies_options(http_port: int) -> None:
    """num_predict caps the answer exactly; a seeded sampled answer is the same twice."""

    async def run() -> list[ollama.GenerateResponse]:
        c = client(http_port)
        options = {"num_predict": 6, "temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 7, "repeat_penalty": 1.1}
        return [await c.generate(model=SMOLLM2, prompt="Tell me about tomatoes.", options=options) for _ in range(2)]

    first, second = asyncio.run(run())
    assert first.done and first.done_reason == "length" and first.eval_count == 6
    assert first.response and first.response == second.response


def test_stop_strings_end_the_answer_before_them(http_port: int) -> None:
    async def run() -> ollama.ChatResponse:
        return await client(http_port).chat(
            model=SMOLLM2,
            messages=[{"role": "user", "content": "What is the capital of Japan?"}],
            options={"stop": ["Tokyo"]},
        )

    reply = asyncio.run(run())
    assert reply.done_reason == "stop" and "Tokyo" not in (reply.message.content or "")


def test_a_full_queue_is_refused_at_once_and_a_dropped_stream_is_cancelled(http_port: int, broker: Mosquitto) -> None:
    """One answer running and one queued fill a queue of one: the next gets 503 with Retry-After. A client
    that goes away mid-stream frees the node for the queued one."""

    async def run() -> tuple[ollama.ResponseError, httpx.Response, ollama.ChatResponse, float]:
        c = client(http_port)
        long = [{"role": "user", "content": LONG}]
        running = await c.chat(model=SMOLLM2, messages=long, stream=True, options={"num_predict": 400})
        await anext(running)  # the first answer is running
        queued = asyncio.create_task(
            c.chat(model=SMOLLM2, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 3})
        )
        await asyncio.to_thread(wait_queue, broker.port, "pi", 1)  # the second is queued
        with pytest.raises(ollama.ResponseError) as refused:
            await c.chat(model=SMOLLM2, messages=[{"role": "user", "content": "Hi"}])
        async with httpx.AsyncClient() as raw:
            again = await raw.post(
                f"http://127.0.0.1:{http_port}/api/chat",
                json={"model": SMOLLM2, "messages": [{"role": "user", "content": "Hi"}], "stream": False},
            )
        started = asyncio.get_running_loop().time()
        await running.aclose()  # the client goes away: its 400-token answer stops
        answered = await asyncio.wait_for(queued, 60)
        return refused.value, again, answered, asyncio.get_running_loop().time() - started

    refused, again, answered, waited_s = asyncio.run(run())
    assert refused.status_code == 503 and "queue is full" in refused.error
    assert again.status_code == 503 and again.headers["Retry-After"] == "2"
    assert again.json()["code"] == "busy"
    assert answered.done and answered.eval_count == 3
    assert waited_s < 5, "the dropped stream's answer went on running"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "llama3:8b", "messages": [{"role": "user", "content": "Hi"}]}, 404, "not found"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "model is required"),
        ({"model": SMOLLM2, "messages": [{"role": "robot", "content": "Hi"}]}, 400, "unknown role"),
        (
            {"model": SMOLLM2, "messages": [{"role": "user", "content": "Hi"}], "options": {"temprature": 1}},
            400,
            "temprature",
        ),
        (
            {"model": SMOLLM2, "messages": [{"role": "user", "content": "Hi"}], "options": {"temperature": 9}},
            400,
            "temperature",
        ),
        ({"model": SMOLLM2, "messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
        ({"model": SMOLLM2, "messages": [{"role": "user", "content": "Hi " * 600}]}, 400, "context budget"),
    ],
)
def test_bad_requests_get_a_specific_error_and_the_node_keeps_serving(
    http_port: int, body: dict[str, object], status: int, words: str
) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as c:
        reply = c.post("/api/chat", json={**body, "stream": False})
        assert reply.status_code == status, reply.text
        assert words in reply.json()["error"]
        assert c.get("/api/version").status_code == 200


def test_malformed_json_is_refused_with_the_reason(http_port: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}") as c:
        reply = c.post(
            "/api/chat",
            content=b'{"model": "smollm2:135m", "messages": [',
            headers={"Content-Type": "application/json"},
        )
        assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]
        deep = c.post("/api/generate", content=b"[" * 100 + b"]" * 100)
        assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
        listed = c.post("/api/chat", json=[{"model": SMOLLM2}])
        assert listed.status_code == 400 and "must be a JSON object" in listed.json()["error"]
        huge = c.post("/api/chat", content=b" " * (2 << 20))
        assert huge.status_code == 413 and huge.json()["code"] == "too_long"
        assert c.get("/api/tags").status_code == 200


LIGHT = {
    "type": "function",
    "function": {
        "name": "set_light",
        "description": "Turn a light on or off",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "on": {"type": "boolean"}},
            "required": ["name", "on"],
        },
    },
}
TRIP = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "sights": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["city", "days", "sights"],
    "additionalProperties": False,
}


def test_format_holds_the_answer_to_a_schema(http_port: int) -> None:
    """Home Assistant's structured tasks pass format=<schema>; "json" asks for any one JSON value."""

    async def run() -> tuple[ollama.ChatResponse, ollama.GenerateResponse]:
        c = client(http_port)
        plan = await c.chat(
            model="smollm2:135m",
            messages=[{"role": "user", "content": "Plan a short trip to Rome."}],
            format=TRIP,
            options={"num_predict": 120},
        )
        anything = await c.generate(model=SMOLLM2, prompt='Reply in JSON: {"fruit": <a fruit>}.', format="json")
        return plan, anything

    plan, anything = asyncio.run(run())
    assert plan.done_reason == "stop"
    jsonschema.validate(json.loads(plan.message.content or ""), TRIP)
    assert anything.done_reason == "stop" and isinstance(json.loads(anything.response or ""), dict)


def test_a_tool_is_called_with_valid_arguments_then_its_result_is_answered(http_port: int) -> None:
    """Home Assistant's Assist: streamed chat with tools; the reply carries message.tool_calls, and after the
    tool's result the model answers in words."""

    async def run() -> tuple[list[ollama.ChatResponse], ollama.ChatResponse]:
        c = client(http_port)
        asked = [{"role": "user", "content": "Turn on the kitchen light."}]
        stream = await c.chat(model="smollm2:135m", messages=asked, tools=[LIGHT], stream=True, keep_alive=-1)
        parts = [part async for part in stream]
        calls = [call for p in parts for call in (p.message.tool_calls or [])]
        followed = await c.chat(
            model="smollm2:135m",
            messages=[
                *asked,
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "tool_name": "set_light", "content": '{"success": true}'},
            ],
            tools=[LIGHT],
        )
        return parts, followed

    parts, followed = asyncio.run(run())
    calls = [call for p in parts for call in (p.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "set_light"
    jsonschema.validate(dict(calls[0].function.arguments), LIGHT["function"]["parameters"])  # type: ignore[index]
    assert parts[-1].done and not "".join(p.message.content or "" for p in parts), "no JSON leaks into the text"
    assert followed.message.content and not followed.message.tool_calls


def test_a_schema_that_cannot_be_compiled_is_refused(http_port: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as c:
        reply = c.post(
            "/api/chat",
            json={"model": SMOLLM2, "messages": [{"role": "user", "content": "Hi"}], "format": {"type": "colour"}},
        )
        assert reply.status_code == 400 and "schema" in reply.json()["error"], reply.text
        both = c.post(
            "/api/chat",
            json={
                "model": SMOLLM2,
                "messages": [{"role": "user", "content": "Hi"}],
                "format": "json",
                "tools": [LIGHT],
            },
        )
        assert both.status_code == 400 and "not both" in both.json()["error"]


def test_a_profile_is_a_model_name(http_port: int) -> None:
    """The node's profiles (profiles/*.toml here) are listed as models; naming one applies it: its token
    budget and style for `brief`, its JSON format for `sensor-json`."""
    profiles = Path(__file__).parent.parent / "profiles"
    shape = tomllib.loads((profiles / "sensor-json.toml").read_text())["format"]

    async def run() -> tuple[ollama.ListResponse, ollama.ChatResponse, ollama.GenerateResponse]:
        c = client(http_port)
        brief = await c.chat(model="brief", messages=[{"role": "user", "content": "Why is the sky blue?"}])
        report = await c.generate(model="sensor-json", prompt="Soil moisture 12 %, air 31 C, no rain for 9 days.")
        return await c.list(), brief, report

    listed, brief, report = asyncio.run(run())
    assert {"brief", "sensor-json"} <= {m.model for m in listed.models}
    assert brief.eval_count and brief.eval_count <= 48 and brief.message.content
    jsonschema.validate(json.loads(report.response or ""), shape)
