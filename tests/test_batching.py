"""Continuous batching in `edged serve`: kiosks asking at once are decoded together, each gets the answer it
would get alone, token for token, and cancelling or finishing one frees its slot without touching the others.

Every projection of the default build takes int8 activations, whose kernels compute each row alike however
many rows a step holds, so a batched answer is the answer alone to the bit (a float-activation projection
runs another kernel for one row than for several, and its rounding turned near-ties late in answers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edged.llm import Engine, GenerationRequest, Message
from edged.llm.session import DecoderSession
from tests.mqttlab import (
    SMOLLM2,
    Listener,
    Mosquitto,
    Node,
    contract_node,
    module_broker,  # noqa: F401 (a fixture)
    reply_listener,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.model

QUESTIONS = (
    "What is the capital of Japan?",
    "How should I water tomatoes in hot weather?",
    "Name three planets of the solar system.",
    "Write a haiku about rain.",
)
SYSTEM = "You are the field assistant of a farm cooperative. Answer in plain words, briefly. " * 4


@pytest.fixture(scope="module")
def node(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = contract_node(
        tmp_path_factory.mktemp("node"), broker, smollm2_dirs["int4"].parent, slots=4, queue_capacity=8, threads=2
    )
    yield n
    assert n.stop() == 0, n.log.read_text()


@pytest.fixture(scope="module")
def alone(smollm2_dirs: dict[str, Path]) -> Engine:
    """The same model in this process, answering one request at a time."""
    return Engine(smollm2_dirs["int4"].parent / SMOLLM2, threads=2, context_tokens=512)


def send(lst: Listener, body: dict[str, object]) -> None:
    lst.publish("edged/pi/ask", json.dumps(body), response_topic=lst.reply_topic)  # type: ignore[attr-defined]


def test_four_kiosks_at_once_are_decoded_together_and_get_their_own_answers(
    node: Node, listener: Listener, alone: Engine
) -> None:
    """All four start before the first one ends (none waits in the queue for another's whole answer), and
    each greedy answer is the one the model gives that question alone, streamed chunks included."""
    for i, q in enumerate(QUESTIONS):
        send(listener, {"id": f"b-{i}", "prompt": q, "max_tokens": 40, "stream": i % 2 == 0})
    replies: list[dict[str, object]] = []
    finals: dict[str, dict[str, object]] = {}
    while len(finals) < len(QUESTIONS):
        r = listener.json()
        replies.append(r)
        if r["done"]:
            finals[str(r["id"])] = r
    for i, q in enumerate(QUESTIONS):
        reply = finals[f"b-{i}"]
        expected = alone.complete(GenerationRequest(messages=(Message("user", q),), max_tokens=40))
        assert reply["status"] == "ok"
        assert reply["text"] == expected.text and reply["usage"]["completion_tokens"] == len(expected.token_ids)
        if i % 2 == 0:
            chunks = [r for r in replies if r["id"] == f"b-{i}" and not r["done"]]
            assert [c["seq"] for c in chunks] == list(range(len(chunks)))
            assert "".join(c["delta"] for c in chunks) == reply["text"]
    first_end = min(r["timings"]["queue_ms"] + r["timings"]["total_ms"] for r in finals.values())
    assert max(r["timings"]["queue_ms"] for r in finals.values()) < first_end, "a request waited for another"


def test_cancelling_one_answer_in_a_batch_leaves_the_others_whole(
    node: Node, listener: Listener, alone: Engine
) -> None:
    send(listener, {"id": "c-long", "prompt": "Write a long story about the sea.", "max_tokens": 300, "stream": True})
    send(listener, {"id": "c-short", "prompt": QUESTIONS[2], "max_tokens": 40})
    first = listener.json()
    assert first["id"] == "c-long" and not first["done"]
    listener.publish("edged/pi/cancel", json.dumps({"id": "c-long"}))
    finals: dict[str, dict[str, object]] = {}
    while len(finals) < 2:
        r = listener.json()
        if r["done"]:
            finals[str(r["id"])] = r
    assert finals["c-long"]["finish_reason"] == "cancelled"
    expected = alone.complete(GenerationRequest(messages=(Message("user", QUESTIONS[2]),), max_tokens=40))
    assert finals["c-short"]["text"] == expected.text


def test_a_shared_system_prompt_is_answered_as_without_the_prefix_cache(
    node: Node, listener: Listener, alone: Engine
) -> None:
    """Two questions under one long system prompt: the second reuses the first's keys and values in the
    node (prefix_cache_mb is on by default) and still answers token for token as the engine without it."""
    for i, q in enumerate(QUESTIONS[:2]):
        send(listener, {"id": f"p-{i}", "system": SYSTEM, "prompt": q, "max_tokens": 32})
        reply = listener.finals(1)[0]
        messages = (Message("system", SYSTEM), Message("user", q))
        assert reply["text"] == alone.complete(GenerationRequest(messages=messages, max_tokens=32)).text


def test_the_default_build_computes_a_row_in_a_batch_as_alone_to_the_bit(smollm2_dirs: dict[str, Path]) -> None:
    """The logits of each row of a 4-row step are bit for bit those of the same sequence's step alone."""
    session = DecoderSession(smollm2_dirs["int4"] / "model.onnx", threads=2)
    prompts = [list(range(100 + 7 * i, 130 + 9 * i)) for i in range(4)]
    batch = session.new_cache(256, slots=4)
    firsts = [int(np.argmax(session.prefill(p, batch, 64, slot=i))) for i, p in enumerate(prompts)]
    together = session.step_batch(firsts, batch)
    for i, prompt in enumerate(prompts):
        own = session.new_cache(256)
        session.prefill(prompt, own, 64)
        np.testing.assert_array_equal(together[i], session.step(firsts[i], own))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_batch_holds_in_memory_only_what_its_sequences_wrote(smollm2_dirs: dict[str, Path]) -> None:
    """Four slots of 2,048 tokens reserve 377 MB of keys and values; four 60-token prompts in them write
    11 MB, and that is about what becomes resident (with huge pages it was all 370 MB)."""
    session = DecoderSession(smollm2_dirs["int4"] / "model.onnx", threads=2)
    cache = session.new_cache(2048, slots=4)
    session.prefill(list(range(100, 160)), cache, 64, slot=0)  # the first run's own arena, once
    before = _rss_mb()
    for slot in range(1, 4):
        session.prefill(list(range(200, 260)), cache, 64, slot=slot)
    for _ in range(8):
        session.step_batch([5, 6, 7, 8], cache)
    grown = _rss_mb() - before
    print(f"resident growth for 3 more prompts of 60 tokens and 8 steps of 4: {grown:.0f} MB")
    assert grown < 60, f"{grown:.0f} MB resident for about 9 MB written"
