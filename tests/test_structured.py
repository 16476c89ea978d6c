"""Structured answers (``format``): JSON and JSON schemas enforced while decoding, with the real SmolLM2 model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from edged.errors import InvalidRequest
from edged.llm import Engine, GenerationRequest, LogitsHook, Message
from edged.structured import compile_format
from tests.mqttlab import (
    Listener,
    Mosquitto,
    Node,
    contract_node,
    module_broker,  # noqa: F401 (a fixture)
    reply_listener,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.model

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "crop": {"enum": ["tomato", "maize", "beans", "potato"]},
        "water_litres": {"type": "number", "minimum": 0, "maximum": 20},
        "advice": {"type": "string"},
    },
    "required": ["crop", "water_litres", "advice"],
    "additionalProperties": False,
}
SCHEMA_PROMPTS = [
    "How much water does a tomato plant need on a hot day?",
    "My maize leaves are curling at noon. What should I do?",
    "When should I water beans?",
    "Is it too late to plant potatoes in June?",
    "How often should seedlings be watered?",
    "What helps tomatoes set fruit in a heat wave?",
    "My beans have yellow leaves.",
    "How deep should I water maize roots?",
    "Should I mulch potatoes?",
    "What is drip irrigation good for?",
]
JSON_PROMPTS = [
    "Describe a cat as a JSON object with its name, colour and age.",
    "Give a JSON object with the name and population of the capital of France.",
    "Return a JSON object listing three fruits under the key fruits.",
    "Report the weather as JSON with temperature_c and sky.",
    "A JSON object with keys title and author for a famous novel.",
    "Give a JSON object with the keys city and country for Tokyo.",
    "Describe a sensor reading as JSON: device, value, unit.",
    "Return JSON with keys answer and explanation for: what is 2+2?",
    "Make a JSON shopping list with items and quantities.",
    "Give a JSON object with keys planet and moons for Mars.",
]


@pytest.fixture(scope="module")
def engine(smollm2_dirs: dict[str, Path]) -> Engine:
    return Engine(smollm2_dirs["int4"], threads=2)


@pytest.mark.parametrize(
    ("answer_format", "reason"),
    [
        ({"type": "strin"}, "Invalid type: strin"),
        ({"type": "string", "pattern": "(("}, "regex parse error"),
        ({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, "/nope"),
        ("yaml", 'format must be "json" or a JSON schema object'),
        (["json"], 'format must be "json" or a JSON schema object'),
    ],
)
def test_a_format_that_cannot_compile_is_refused_with_the_reason(
    engine: Engine, answer_format: object, reason: str
) -> None:
    """A schema llguidance cannot compile must never turn into an unconstrained answer (llama.cpp #19051)."""
    with pytest.raises(InvalidRequest, match="format") as caught:
        compile_format(answer_format, engine.tokenizer, 64)
    assert reason in caught.value.message


def test_a_rambling_answer_still_closes_its_document_within_a_small_budget(engine: Engine) -> None:
    """Near the end of max_tokens the hook steers to the way out, so a cut-off document never comes back."""
    for max_tokens in (16, 24, 40):
        request = GenerationRequest(
            messages=(Message("user", "Write a very long JSON object describing every country in the world."),),
            max_tokens=max_tokens,
            logits_hook=compile_format("json", engine.tokenizer, max_tokens),
        )
        result = engine.complete(request)
        assert result.finish_reason == "stop", result.text
        assert isinstance(json.loads(result.text), dict)
        assert result.usage.completion_tokens <= max_tokens


def test_each_sequence_gets_its_own_matcher_and_the_mask_is_cheap(engine: Engine) -> None:
    """Hooks of one compiled schema must not share state (batched sequences); the mask costs microseconds."""
    hooks = compile_format(SCHEMA, engine.tokenizer, 120)
    first, second = hooks(), hooks()
    open_brace = engine.tokenizer.encode('{"')
    for token in open_brace:
        assert first.allowed()[token]
        first.accept(token)
    assert not np.array_equal(first.allowed(), second.allowed())  # the second is still at the start
    timed: list[float] = []

    class Timed:
        def __init__(self, inner: LogitsHook) -> None:
            self.inner = inner

        def allowed(self) -> Any:
            start = time.perf_counter()
            mask = self.inner.allowed()
            timed.append(time.perf_counter() - start)
            return mask

        def accept(self, token: int) -> None:
            self.inner.accept(token)

        @property
        def complete(self) -> bool:
            return self.inner.complete

    result = engine.complete(
        GenerationRequest(
            messages=(Message("user", SCHEMA_PROMPTS[0]),), max_tokens=120, logits_hook=lambda: Timed(hooks())
        )
    )
    jsonschema.validate(json.loads(result.text), SCHEMA)
    per_token_us = sorted(timed)[len(timed) // 2] * 1e6
    print(f"mask: median {per_token_us:.0f} us per token, first {timed[0] * 1e6:.0f} us, {len(timed)} tokens")
    assert per_token_us < 1000


# -- over MQTT ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = contract_node(tmp_path_factory.mktemp("node"), broker, smollm2_dirs["int4"].parent, queue_capacity=8)
    yield n
    assert n.stop() == 0, n.log.read_text()


def _ask(lst: Listener, body: dict[str, Any]) -> None:
    lst.publish("edged/pi/ask", json.dumps(body), response_topic=lst.reply_topic)  # type: ignore[attr-defined]


def test_json_and_schema_answers_are_valid_also_beside_unconstrained_requests(node: Node, listener: Listener) -> None:
    """20 varied prompts, 4 in flight at a time with one unconstrained request in each group: every
    constrained answer parses (and validates), ends by itself, and the unconstrained ones stay free text."""
    constrained = [(p, SCHEMA) for p in SCHEMA_PROMPTS] + [(p, "json") for p in JSON_PROMPTS]
    plain = ["What is the capital of France?", "Say hello to the farmers.", "Name a colour.", "What is rain?"]
    formats: dict[str, Any] = {}
    for group in range(len(constrained) // 3 + 1):
        ids = []
        for i, (prompt, answer_format) in enumerate(constrained[group * 3 : group * 3 + 3]):
            request_id = f"c{group}-{i}"
            formats[request_id] = answer_format
            _ask(listener, {"id": request_id, "prompt": prompt, "format": answer_format, "max_tokens": 160})
            ids.append(request_id)
        if group < len(plain):
            request_id = f"p{group}"
            _ask(listener, {"id": request_id, "prompt": plain[group], "max_tokens": 24})
            ids.append(request_id)
        replies = {r["id"]: r for r in listener.finals(len(ids), timeout_s=300)}
        assert set(replies) == set(ids)
        for request_id, reply in replies.items():
            assert reply["status"] == "ok", reply
            if request_id.startswith("p"):
                assert reply["text"] and not reply["text"].lstrip().startswith("{"), reply
                continue
            value = json.loads(reply["text"])
            assert reply["finish_reason"] == "stop", reply
            if formats[request_id] == "json":
                assert isinstance(value, dict)
            else:
                jsonschema.validate(value, SCHEMA)
    assert len(formats) == 20


@pytest.mark.parametrize(
    ("answer_format", "reason"),
    [({"type": "object", "required": 7}, "required"), (3, 'format must be "json" or a JSON schema object')],
)
def test_a_bad_format_is_invalid_request_with_the_reason(
    node: Node, listener: Listener, answer_format: object, reason: str
) -> None:
    _ask(listener, {"id": "bad-format", "prompt": "Hi", "format": answer_format})
    reply = listener.finals(1)[0]
    assert reply["status"] == "error" and reply["error"]["code"] == "invalid_request"
    assert reason in reply["error"]["message"]
