"""The official ``openai`` client against `edged serve`'s HTTP front door with an API key, the real model
and a real broker: chat completions streamed and not, the busy refusal, errors in OpenAI's shape, and the
bearer token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.mqttlab import (
    SMOLLM2,
    Mosquitto,
    http_node,
    module_broker,  # noqa: F401 (a fixture)
    wait_queue,
)

pytestmark = pytest.mark.model

KEY = "s3cret-token"
LONG = "Write a long story about a lighthouse keeper and the sea, with many details."
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="module")
def base_url(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    node, port = http_node(tmp_path_factory.mktemp("node"), broker, smollm2_dirs["int4"].parent, http_api_key=KEY)
    yield f"http://127.0.0.1:{port}"
    assert node.stop() == 0, node.log.read_text()


def client(base_url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_lists_the_served_model(base_url: str) -> None:
    ids = [m.id for m in client(base_url).models.list()]
    assert SMOLLM2 in ids and "smollm2:135m" in ids and "brief" in ids  # profiles are model names too
    assert client(base_url).models.retrieve("smollm2:135m").owned_by == "edged"


def test_a_completion_answers_with_usage(base_url: str) -> None:
    reply = client(base_url).chat.completions.create(model="smollm2:135m", messages=JAPAN)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert "Tokyo" in (choice.message.content or "") and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and reply.object == "chat.completion"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_streamed_completion_arrives_in_pieces_and_ends_with_usage(base_url: str) -> None:
    stream = client(base_url).chat.completions.create(
        model=SMOLLM2,
        messages=JAPAN,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 3 and "Tokyo" in "".join(deltas)
    assert chunks[0].choices[0].delta.role == "assistant"
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_max_tokens_stop_and_seed(base_url: str) -> None:
    c = client(base_url)
    short = c.chat.completions.create(model=SMOLLM2, messages=JAPAN, max_tokens=4)  # type: ignore[arg-type]
    assert short.choices[0].finish_reason == "length" and short.usage and short.usage.completion_tokens == 4
    brief = c.chat.completions.create(model="brief", messages=JAPAN, max_tokens=3)  # type: ignore[arg-type]
    assert brief.usage and brief.usage.completion_tokens == 3, "the request's own max_tokens beats the profile's"
    cut = c.chat.completions.create(model=SMOLLM2, messages=JAPAN, stop=["Tokyo"])  # type: ignore[arg-type]
    assert "Tokyo" not in (cut.choices[0].message.content or "") and cut.choices[0].finish_reason == "stop"
    sampled = [
        c.chat.completions.create(
            model=SMOLLM2,
            messages=[{"role": "user", "content": "Tell me about tomatoes."}],
            max_tokens=8,
            temperature=1.0,
            seed=11,
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] and sampled[0] == sampled[1]


def test_busy_is_a_429_with_retry_after(base_url: str, broker: Mosquitto) -> None:
    """A running answer and a queued one fill a queue of one: the next is refused at once, in OpenAI's shape."""

    async def run() -> openai.RateLimitError:
        c = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
        running = await c.chat.completions.create(
            model=SMOLLM2,
            messages=[{"role": "user", "content": LONG}],
            max_tokens=300,
            stream=True,
        )
        stream = running.__aiter__()
        await anext(stream)
        await anext(stream)  # a content delta: it is running
        queued = asyncio.create_task(
            c.chat.completions.create(model=SMOLLM2, messages=JAPAN, max_tokens=2)  # type: ignore[arg-type]
        )
        await asyncio.to_thread(wait_queue, broker.port, "pi", 1)  # the second is queued
        try:
            with pytest.raises(openai.RateLimitError) as refused:
                await c.chat.completions.create(model=SMOLLM2, messages=JAPAN)  # type: ignore[arg-type]
        finally:
            await running.close()
            await queued
        return refused.value

    refused = asyncio.run(run())
    assert refused.status_code == 429 and refused.response.headers["retry-after"] == "2"
    assert refused.code == "busy" and refused.type == "rate_limit_error" and "queue is full" in refused.message


def test_errors_come_in_openai_shape(base_url: str) -> None:
    c = client(base_url)
    with pytest.raises(openai.NotFoundError) as unknown:
        c.chat.completions.create(model="gpt-4o", messages=JAPAN)  # type: ignore[arg-type]
    assert unknown.value.code == "model_not_found" and "smollm2:135m" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model=SMOLLM2, messages=JAPAN, temperature=5)  # type: ignore[arg-type]
    assert bad.value.code == "invalid_request" and "temperature must be" in bad.value.message
    with pytest.raises(openai.BadRequestError) as image:
        c.chat.completions.create(
            model=SMOLLM2,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
        )
    assert "only text parts" in image.value.message


def test_without_the_bearer_token_every_api_answers_401(base_url: str) -> None:
    """With api_key set, nothing but the kiosk page is served to a client without the token."""
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(base_url, key="guess").models.list()
    assert wrong.value.code == "invalid_api_key"
    with httpx.Client(base_url=base_url) as raw:
        for method, path in (("GET", "/api/tags"), ("POST", "/api/chat"), ("GET", "/v1/models")):
            reply = raw.request(method, path, json={"model": SMOLLM2, "messages": JAPAN})
            assert reply.status_code == 401 and reply.headers["WWW-Authenticate"] == "Bearer", path
        assert "API key" in raw.get("/api/tags").json()["error"]
        assert raw.get("/api/tags", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        page = raw.get("/kiosk/")  # a browser kiosk sends no header; the page holds no secret
        assert page.status_code == 200 and '"node": "pi"' in page.text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
FRUIT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "colour": {"type": "string", "enum": ["red", "yellow", "green"]}},
    "required": ["name", "colour"],
    "additionalProperties": False,
}


def test_json_schema_and_json_object_response_formats(base_url: str) -> None:
    c = client(base_url)
    reply = c.chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "Name a fruit and its colour."}],
        response_format={"type": "json_schema", "json_schema": {"name": "fruit", "schema": FRUIT, "strict": True}},
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), FRUIT)
    assert reply.choices[0].finish_reason == "stop"
    anything = c.chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": 'Answer with a JSON object with keys "name" and "colour" for a banana.'}],
        response_format={"type": "json_object"},
    )
    assert set(json.loads(anything.choices[0].message.content or "")) == {"name", "colour"}


def test_tools_give_tool_calls_streamed_and_not(base_url: str) -> None:
    c = client(base_url)
    asked = [{"role": "user", "content": "What's the weather like in Berlin today?"}]
    reply = c.chat.completions.create(model=SMOLLM2, messages=asked, tools=[WEATHER], tool_choice="required")  # type: ignore[arg-type,list-item]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id  # type: ignore[union-attr]
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])  # type: ignore[union-attr,index]
    chunks = list(c.chat.completions.create(model=SMOLLM2, messages=asked, tools=[WEATHER], stream=True))  # type: ignore[arg-type,list-item]
    streamed = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(streamed) == 1 and streamed[0].function and streamed[0].function.name == "get_weather"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        "tool_calls"
    ]
    answered = c.chat.completions.create(
        model=SMOLLM2,
        messages=[
            *asked,
            {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": '{"sky": "sunny", "temp_c": 21}'},
        ],  # type: ignore[list-item]
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert answered.choices[0].message.content and answered.choices[0].finish_reason == "stop"
