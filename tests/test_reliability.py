"""Hostile and unlucky messages against a real Mosquitto and `edged serve`: each case once left a node up
but deaf, answered twice, or answered nobody. Numbers refer to the reliability issue's list of defects."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.journal import Journal
from tests.mqttlab import (
    SMOLLM2,
    Listener,
    Mosquitto,
    Node,
    contract_node,
    module_broker,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.model

LONG = "Write a long story about a lighthouse keeper and the sea, with many details."


@pytest.fixture(scope="module")
def node(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = contract_node(tmp_path_factory.mktemp("node"), broker, smollm2_dirs["int4"].parent)
    yield n
    assert n.stop() == 0, n.log.read_text()[-3000:]


@pytest.fixture
def answers(broker: Mosquitto) -> Iterator[Listener]:
    """Listens on every answer topic of node pi and on a reply prefix of its own."""
    lst = Listener(broker.port, "edged/pi/answer/#")
    lst.reply_topic = f"r/{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    lst.subscribe(lst.reply_topic)  # type: ignore[attr-defined]
    yield lst
    lst.close()


def still_answers(lst: Listener, topic: str = "edged/pi/ask") -> None:
    """The node takes and answers a normal question: it is not deaf."""
    rid = f"alive-{uuid.uuid4().hex[:6]}"
    lst.publish(topic, json.dumps({"id": rid, "prompt": "Say hi", "max_tokens": 2}))
    reply = next(r for r in iter(lambda: lst.json(60), None) if r.get("id") == rid and r.get("done"))
    assert reply["status"] == "ok"


def persistent_listener(port: int, topic: str) -> Listener:
    """A listener whose session (its subscription and the replies queued for it) outlives a broker restart."""
    lst = Listener(port)
    lst.close()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-keep-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
    client.on_message = lambda _c, _u, m: lst.messages.put(m)
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    lst.client = client
    lst.subscribe(topic)
    return lst


def final_for(lst: Listener, rid: str, timeout_s: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        reply = lst.json(max(0.1, deadline - time.monotonic()))
        if reply.get("id") == rid and reply.get("done"):
            return reply


@pytest.mark.parametrize(
    "topic",
    [
        "kiosk/7/#",  # 1: paho raised in the worker's publish, a crash loop after restart
        "kiosk/+/x",
        "kiosk/\x01",  # 2: the broker disconnected the node for a malformed packet
        "kiosk/\x7f",
        "kiosk/\x85",
        "kiosk/\ufdd0",
        "/".join(["l"] * 250),
        "$SYS/broker/x",  # 13: accepted and dropped silently
        "$share/g/x",
        "edged/pi/status",  # 6: the node wrote where the kiosk may not
        "edged/other/status",
        "homeassistant/sensor/pi/config",
    ],
)
def test_refused_reply_routes_get_an_error_on_the_default_answer_topic(
    node: Node, answers: Listener, topic: str
) -> None:
    rid = f"bad-route-{uuid.uuid4().hex[:6]}"
    body = json.dumps({"id": rid, "prompt": "Say hi", "max_tokens": 2}, ensure_ascii=False)
    if topic.isprintable() and not topic.startswith("kiosk/\ufdd0"):
        answers.publish("edged/pi/ask", body, response_topic=topic)
    else:  # paho refuses such a Response Topic itself; a v3.1.1 client sends it as reply_to
        body = json.dumps({"id": rid, "prompt": "Say hi", "max_tokens": 2, "reply_to": topic}, ensure_ascii=False)
        answers.publish("edged/pi/ask", body.encode())
    reply = answers.json()
    assert reply["id"] == rid and reply["error"]["code"] == "invalid_request"  # type: ignore[index]
    assert answers.messages.empty()
    still_answers(answers)


def test_messages_that_raised_in_the_callback_are_answered_and_acknowledged(node: Node, answers: Listener) -> None:
    """4: 21 such messages filled Mosquitto's in-flight window and the node was deaf to QoS 1 for good."""
    hostile = [
        b'{"id": "h-deep", "prompt": "x", "a": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b'{"id": "h-surrogate-key", "prompt": "x", "\\ud800": 1}',
        b'{"id": "h-surrogate-reply", "prompt": "x", "reply_to": "k/\\udfff"}',
        b'{"id": "h-temp", "prompt": "x", "temperature": ' + b"9" * 400 + b"}",
        b'{"id": "h-top-p", "prompt": "x", "top_p": ' + b"9" * 400 + b"}",
        b'{"id": "h-penalty", "prompt": "x", "repeat_penalty": ' + b"9" * 400 + b"}",
        b'{"id": "h-deadline", "prompt": "x", "deadline_ms": ' + b"9" * 400 + b"}",
        b'{"id": "h-seed", "prompt": "x", "seed": -1}',  # 12: NaN probabilities gave `internal`
        b'{"id": "h-tiny-temp", "prompt": "x", "temperature": 1e-300}',
    ]
    for i in range(25):
        answers.publish("edged/pi/ask", hostile[i % len(hostile)].replace(b'"h-', f'"{i}-h-'.encode(), 1))
    replies = answers.finals(25)
    assert Counter(r["error"]["code"] for r in replies) == {"invalid_request": 25}
    # a payload that does not decode (too deep, a 400-digit number) has no readable id: it gets a new one
    sent = [hostile[i % len(hostile)] for i in range(25)]
    messages = [str(r["error"]["message"]) for r in replies]
    assert sum("nested too deeply" in m for m in messages) == sum(b"[[[" in p for p in sent)
    assert sum("out of range" in m for m in messages) == sum(b"9" * 400 in p for p in sent)
    by_kind = {str(r["id"]).split("-", 1)[-1]: str(r["error"]["message"]) for r in replies}
    assert "surrogate" in by_kind["h-surrogate-key"] and "surrogate" in by_kind["h-surrogate-reply"]
    assert "seed" in by_kind["h-seed"] and "temperature" in by_kind["h-tiny-temp"]
    still_answers(answers)


def test_an_oversized_payload_is_refused_before_parsing(node: Node, answers: Listener) -> None:
    """13: a 20 MB payload was JSON-parsed before the size cap."""
    answers.publish("edged/pi/ask", b"[" * 20_000_000, correlation=b"huge-1")
    reply = final_for(answers, "huge-1")
    assert reply["error"]["code"] == "too_long"  # type: ignore[index]
    still_answers(answers)


def test_scoped_identities_have_their_own_ids_and_retries_get_the_stored_reply(node: Node, broker: Mosquitto) -> None:
    """8: ids were global: colliding kiosks got silence, and a kiosk re-sending an id never heard back."""
    k1, k2 = Listener(broker.port, "edged/pi/answer/k1/#"), Listener(broker.port, "edged/pi/answer/k2/#")
    try:
        for lst, name in ((k1, "k1"), (k2, "k2")):
            lst.publish(f"edged/pi/ask/{name}", json.dumps({"id": "same-1", "prompt": "Say hi", "max_tokens": 3}))
        first = {name: lst.finals(1)[0] for lst, name in ((k1, "k1"), (k2, "k2"))}
        assert all(r["status"] == "ok" for r in first.values())
        k1.publish("edged/pi/ask/k1", json.dumps({"id": "same-1", "prompt": "Say hi", "max_tokens": 3}))
        again = k1.finals(1)[0]
        assert again == first["k1"], "the retried id gets the stored reply, not a new answer"
        assert k1.drain(1.0) == [] and k2.drain(0.1) == []
    finally:
        k1.close()
        k2.close()


def test_a_kiosk_cannot_cancel_another_kiosks_request(node: Node, broker: Mosquitto) -> None:
    """6: kiosk1 cancelled kiosk2's request by id."""
    k2 = Listener(broker.port, "edged/pi/answer/k2/#")
    try:
        k2.publish("edged/pi/ask/k2", json.dumps({"id": "victim", "prompt": LONG, "max_tokens": 24, "stream": True}))
        assert k2.json()["id"] == "victim"  # running
        for topic in ("edged/pi/cancel/k1", "edged/pi/cancel"):
            k2.publish(topic, json.dumps({"id": "victim"}))
        final = next(r for r in iter(k2.json, None) if r.get("done"))
        assert final["finish_reason"] == "length", final
        k2.publish("edged/pi/cancel/k2", json.dumps({"id": "nothing-running"}))
    finally:
        k2.close()


def test_rate_limit_keys_on_the_topic_identity(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """7: a new payload `client` each time passed the per-client rate limit."""
    strict = Node(
        tmp_path,
        broker.url,
        "strict",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        rate_limit_per_min=6.0,
        rate_limit_burst=2,
    ).start(broker.port)
    lst = Listener(broker.port, "edged/strict/answer/k9/#")
    try:
        for i in range(3):
            body = {"id": f"r-{i}", "prompt": "hi", "max_tokens": 2, "client": f"fresh-name-{i}"}
            lst.publish("edged/strict/ask/k9", json.dumps(body))
        replies = {r["id"]: r for r in lst.finals(3)}
        assert replies["r-2"]["error"]["code"] == "rate_limited"
        assert replies["r-0"]["status"] == replies["r-1"]["status"] == "ok"
    finally:
        lst.close()
        strict.stop()


def test_alerts_displace_background_work_from_a_full_queue(node: Node, answers: Listener) -> None:
    """11: with a full queue, alerts got `busy` while background requests sat queued."""
    answers.publish("edged/pi/ask", json.dumps({"id": "x-run", "prompt": LONG, "max_tokens": 120, "stream": True}))
    assert answers.json()["id"] == "x-run"
    for rid in ("x-bg-1", "x-bg-2"):
        body = {"id": rid, "prompt": "Say hi", "max_tokens": 2, "priority": "background"}
        answers.publish("edged/pi/ask", json.dumps(body))
    answers.publish(
        "edged/pi/ask", json.dumps({"id": "x-alert", "prompt": "Say hi", "max_tokens": 2, "priority": "alert"})
    )
    finals = {r["id"]: r for r in answers.finals(4, timeout_s=90)}
    assert finals["x-bg-2"]["error"]["code"] == "busy", "the newest background request gives way"
    assert finals["x-alert"]["status"] == "ok" and finals["x-bg-1"]["status"] == "ok"


def test_retained_asks_are_ignored_also_after_a_restart(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """10: a retained message on an ask topic was answered again, with a new id, at every restart."""
    lst = Listener(broker.port, "edged/keeper/answer/#")
    lst.client.publish("edged/keeper/ask", "What is 2+2?", qos=1, retain=True).wait_for_publish(10)
    keeper = Node(tmp_path, broker.url, "keeper", smollm2_dirs["int4"].parent, model=SMOLLM2).start(broker.port)
    try:
        keeper.stop()
        keeper.start(broker.port)
        assert lst.drain(2.0) == []
        assert "retained" in keeper.log.read_text()
    finally:
        lst.client.publish("edged/keeper/ask", b"", qos=1, retain=True).wait_for_publish(10)
        lst.close()
        keeper.stop()


def test_replies_made_while_the_broker_is_down_are_delivered_once_and_the_journal_drains(
    smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """3: the deliveries thread died at the first reply published while the broker was down; every restart
    then re-sent every stored reply."""
    own = Mosquitto(tmp_path / "broker").start()
    n = Node(tmp_path / "node", own.url, "phoenix", smollm2_dirs["int4"].parent, model=SMOLLM2, queue_capacity=8)
    n.start(own.port)
    lst = persistent_listener(own.port, "r/phoenix")
    ids = [f"down-{i}" for i in range(4)]
    try:
        for rid in ids:
            body = {"id": rid, "prompt": LONG, "max_tokens": 12}
            lst.publish("edged/phoenix/ask", json.dumps(body), response_topic="r/phoenix")
        own.stop()  # the node finishes answers while the broker is away
        time.sleep(4)
        own.start()
        got = lst.finals(len(ids), timeout_s=90) + [r for r in lst.drain(3) if r.get("done")]
        assert Counter(r["id"] for r in got) == dict.fromkeys(ids, 1)
        n.stop()
        assert Journal(tmp_path / "node" / "journal.sqlite").counts().keys() <= {"done"}
        n.start(own.port)
        assert [r for r in lst.drain(3) if r.get("done")] == [], "a restart re-sent delivered replies"
    finally:
        lst.close()
        n.stop()
        own.stop()


def test_a_third_start_after_two_crashes_finds_the_journal_drained(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    crashy = Node(tmp_path, broker.url, "crashy2", smollm2_dirs["int4"].parent, model=SMOLLM2, queue_capacity=8)
    crashy.start(broker.port)
    lst = Listener(broker.port, "r/crashy2")
    ids = [f"c-{i}" for i in range(5)]
    try:
        for rid in ids:
            body = {"id": rid, "prompt": LONG, "max_tokens": 60}
            lst.publish("edged/crashy2/ask", json.dumps(body), response_topic="r/crashy2")
        got = []
        for _ in range(2):
            # After a final (and its acknowledgement), well inside the next answer (about 0.7 s): a kill at the
            # moment a final goes out would have it sent again by design, which this test is not about.
            got += lst.finals(1, timeout_s=120)
            time.sleep(0.15)
            crashy.kill()
            crashy.start(broker.port)
        got += lst.finals(len(ids) - 2, timeout_s=180) + [r for r in lst.drain(3) if r.get("done")]
        assert Counter(r["id"] for r in got) == dict.fromkeys(ids, 1)
        assert crashy.stop() == 0
        assert Journal(tmp_path / "journal.sqlite").counts().keys() <= {"done"}
    finally:
        lst.close()
        crashy.stop()


def test_sigterm_while_messages_wait_loses_none(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Messages the inbox had not handled when SIGTERM came stay with the broker for the next run."""
    n = Node(tmp_path, broker.url, "calm", smollm2_dirs["int4"].parent, model=SMOLLM2, queue_capacity=16)
    n.start(broker.port)
    lst = Listener(broker.port, "r/calm")
    ids = [f"t-{i}" for i in range(6)]
    try:
        for rid in ids:
            lst.publish(
                "edged/calm/ask", json.dumps({"id": rid, "prompt": "Say hi", "max_tokens": 6}), response_topic="r/calm"
            )
        n.signal(signal.SIGTERM)
        assert n.proc is not None and n.proc.wait(60) == 0
        n.start(broker.port)
        got = lst.finals(len(ids), timeout_s=90) + [r for r in lst.drain(2) if r.get("done")]
        assert Counter(r["id"] for r in got) == dict.fromkeys(ids, 1)
    finally:
        lst.close()
        n.stop()


def test_a_prompt_that_fills_the_context_keeps_the_daemon_under_500_mb(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """5: a 1.8 KB prompt of 1,833 tokens took the daemon from 367 MB to 2,014 MB, never given back."""
    big = Node(
        tmp_path,
        broker.url,
        "big",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        context_tokens=2048,
        max_payload_bytes=32768,
    ).start(broker.port)
    lst = Listener(broker.port, "r/big")
    try:
        digits = " ".join(str(i % 10) for i in range(900))  # a digit and a space each: ~1,800 tokens
        body = {"id": "fill", "prompt": f"Count these: {digits}", "max_tokens": 4}
        lst.publish("edged/big/ask", json.dumps(body), response_topic="r/big")
        reply = final_for(lst, "fill", timeout_s=120)
        assert reply["status"] == "ok", reply
        assert int(reply["usage"]["prompt_tokens"]) > 1700  # type: ignore[index]
        assert big.proc is not None
        status = Path(f"/proc/{big.proc.pid}/status").read_text()
        peak_mb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
        now_mb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024
        print(f"daemon RSS peak {peak_mb:.0f} MB, after {now_mb:.0f} MB")
        assert peak_mb < 500, f"peak RSS {peak_mb:.0f} MB"
    finally:
        lst.close()
        big.stop()
