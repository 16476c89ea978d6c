"""`edged serve` against a real Mosquitto: the MQTT contract end to end, with the real SmolLM2 model."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqttlab import (
    SMOLLM2,
    Listener,
    Mosquitto,
    Node,
    contract_node,
    free_port,
    module_broker,  # noqa: F401 (a fixture)
    reply_listener,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.model

LONG = "Write a long story about a lighthouse keeper and the sea, with many details."


@pytest.fixture(scope="module")
def node(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = contract_node(tmp_path_factory.mktemp("node"), broker, smollm2_dirs["int4"].parent)
    yield n
    assert n.stop() == 0, n.log.read_text()


def ask(lst: Listener, body: dict[str, object] | str | bytes, topic: str = "edged/pi/ask", **kw: object) -> None:
    payload = json.dumps(body) if isinstance(body, dict) else body
    lst.publish(topic, payload, response_topic=kw.pop("response_topic", lst.reply_topic), **kw)  # type: ignore[arg-type,attr-defined]


def test_the_daemon_loads_its_model_through_a_prepared_copy(node: Node, smollm2_dirs: dict[str, Path]) -> None:
    """`edged serve` keeps onnxruntime's optimized, prepacked copy of its model in <state_dir>/prepared (the
    test nodes share one such directory)."""
    from edged.llm.session import prepared_copy

    copy = prepared_copy(smollm2_dirs["int4"] / "model.onnx", node.dir / "prepared")
    assert (copy / "model.onnx").is_file() and (copy / "model.data").stat().st_size > 100e6


def test_mosquitto_rr_with_plain_text_gets_the_answer(node: Node, broker: Mosquitto) -> None:
    """The contract's own example: a kiosk integrator pastes this and gets JSON back."""
    out = subprocess.run(
        [
            "mosquitto_rr",
            "-V",
            "5",
            "-p",
            str(broker.port),
            "-t",
            "edged/pi/ask",
            "-e",
            "kiosk/7/reply",
            "-m",
            "What is the capital of Japan?",
            "-W",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    reply = json.loads(out)
    assert reply["status"] == "ok" and reply["done"] is True
    assert "Tokyo" in reply["text"]
    assert reply["finish_reason"] == "stop"
    assert reply["model"] == SMOLLM2 and reply["node"] == "pi"
    assert reply["usage"]["completion_tokens"] > 0 and reply["timings"]["total_ms"] > 0


def test_v5_correlation_data_is_echoed(node: Node, listener: Listener) -> None:
    correlation = b"\x00\xffk7-bytes"
    ask(listener, {"prompt": "Say hi", "max_tokens": 4}, correlation=correlation)
    msg = listener.next()
    assert msg.properties.CorrelationData == correlation
    assert json.loads(msg.payload)["status"] == "ok"


def test_correlation_data_becomes_the_id_when_the_request_has_none(node: Node, listener: Listener) -> None:
    ask(listener, "Say hi", correlation=b"kiosk-7.0042")
    assert listener.finals(1)[0]["id"] == "kiosk-7.0042"


def test_v311_client_gets_its_answer_on_reply_to(node: Node, broker: Mosquitto) -> None:
    lst = Listener(broker.port, "legacy/kiosk/answers", v5=False)
    try:
        lst.publish(
            "edged/pi/ask",
            json.dumps({"id": "v3-1", "prompt": "Say hi", "max_tokens": 4, "reply_to": "legacy/kiosk/answers"}),
        )
        reply = lst.json()
        assert reply["id"] == "v3-1" and reply["status"] == "ok"
    finally:
        lst.close()


def test_default_answer_topic(node: Node, broker: Mosquitto) -> None:
    lst = Listener(broker.port, "edged/pi/answer/plain-42")
    try:
        lst.publish("edged/pi/ask", json.dumps({"id": "plain-42", "prompt": "Say hi", "max_tokens": 4}))
        assert lst.json()["id"] == "plain-42"
    finally:
        lst.close()


def test_stream_chunks_arrive_in_order_and_make_the_final_text(node: Node, listener: Listener) -> None:
    ask(listener, {"id": "s-1", "prompt": "Name three colours.", "stream": True, "max_tokens": 40})
    chunks = []
    while True:
        reply = listener.json()
        if reply["done"]:
            break
        chunks.append(reply)
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert len(chunks) > 3
    assert "".join(c["delta"] for c in chunks) == reply["text"]


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        (b'{"prompt": "unclosed', "invalid_request", "not valid JSON"),
        (b'{"prompt": 5}', "invalid_request", "prompt must be a string"),
        (b'{"prompt": "hi", "colour": "red"}', "invalid_request", "unknown field: colour"),
        (b"caf\xe9 au lait?", "invalid_request", "not valid UTF-8"),
        (b'{"prompt": "hi", "temperature": 9}', "invalid_request", "temperature"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "invalid_request", "unknown chat role"),
        (b'{"prompt": "hi", "priority": "urgent"}', "invalid_request", "priority"),
        (b'{"prompt": ""}', "invalid_request", "empty"),
        (b'{"prompt": "' + b"x" * 5000 + b'"}', "too_long", "4096"),
        (json.dumps({"prompt": "tomato " * 550}).encode(), "too_long", "context budget"),
    ],
)
def test_bad_requests_get_a_specific_error(
    node: Node, listener: Listener, payload: bytes, code: str, words: str
) -> None:
    listener.publish("edged/pi/ask", payload, response_topic=listener.reply_topic)  # type: ignore[attr-defined]
    reply = listener.json()
    assert reply["status"] == "error" and reply["done"] is True
    assert reply["error"]["code"] == code
    assert words in reply["error"]["message"]


def test_full_queue_answers_busy_and_cancel_stops_queued_and_running(node: Node, listener: Listener) -> None:
    ask(listener, {"id": "q-0", "prompt": LONG, "max_tokens": 400, "stream": True})
    assert listener.json()["id"] == "q-0"  # its first chunk: q-0 runs
    for i in (1, 2):  # two wait: the queue (capacity 2) is full
        ask(listener, {"id": f"q-{i}", "prompt": LONG, "max_tokens": 400})
    ask(listener, {"id": "q-3", "prompt": "Say hi"})
    busy = next(r for r in iter(listener.json, None) if r["done"])
    assert busy["id"] == "q-3" and busy["error"]["code"] == "busy"
    assert busy["error"]["retry_after_s"] > 0
    for i in (2, 0, 1):
        listener.publish("edged/pi/cancel", json.dumps({"id": f"q-{i}"}))
    finals = {r["id"]: r for r in listener.finals(3, timeout_s=30)}
    reasons = {k: r["finish_reason"] for k, r in finals.items()}
    assert set(reasons.values()) == {"cancelled"}, reasons  # q-1 is cancelled just as it leaves the queue
    assert finals["q-2"]["usage"]["completion_tokens"] == 0, "cancelled while queued: no compute"
    assert finals["q-0"]["usage"]["completion_tokens"] < 400
    ask(listener, {"id": "q-3", "prompt": "Say hi", "max_tokens": 3})  # the refused id, retried: welcome now
    retried = listener.finals(1)[0]
    assert retried["id"] == "q-3" and retried["status"] == "ok"


def test_expired_requests_are_dropped_before_compute(node: Node, listener: Listener) -> None:
    ask(listener, {"id": "d-0", "prompt": LONG, "max_tokens": 60})
    ask(listener, {"id": "d-1", "prompt": "Say hi", "deadline_ms": 50})
    finals = {r["id"]: r for r in listener.finals(2)}
    assert finals["d-1"]["finish_reason"] == "deadline"
    assert finals["d-1"]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    assert finals["d-0"]["status"] == "ok"


def test_alerts_do_not_wait_for_the_answer_under_way(node: Node, listener: Listener) -> None:
    """The node's one slot is busy: an alert joins at once, in the slot kept for alerts, and ends first;
    the background request waits for a free slot; the running answer still runs to its full length."""
    ask(listener, {"id": "p-0", "prompt": LONG, "max_tokens": 40, "stream": True})
    assert listener.json()["id"] == "p-0"  # running
    ask(listener, {"id": "p-bg", "prompt": "Say hi", "max_tokens": 3, "priority": "background"})
    ask(listener, {"id": "p-alert", "prompt": "Say hi", "max_tokens": 3, "priority": "alert"})
    finals = listener.finals(3)
    assert [r["id"] for r in finals] == ["p-alert", "p-0", "p-bg"]
    assert finals[1]["finish_reason"] == "length" and finals[1]["usage"]["completion_tokens"] == 40


def test_duplicate_ids_are_answered_once(node: Node, listener: Listener) -> None:
    for _ in range(3):
        ask(listener, {"id": "dup-1", "prompt": "Say hi", "max_tokens": 3})
    ask(listener, {"id": "dup-2", "prompt": "Say hi", "max_tokens": 3})
    ids = [r["id"] for r in listener.finals(2)] + [r["id"] for r in listener.drain(1.5) if r.get("done")]
    assert Counter(ids) == {"dup-1": 1, "dup-2": 1}


def test_rate_limit_per_client(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path) -> None:
    strict = Node(
        tmp_path,
        broker.url,
        "strict",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        rate_limit_per_min=6.0,
        rate_limit_burst=2,
    ).start(broker.port)
    lst = Listener(broker.port, "r/strict")
    try:
        for i in range(3):
            lst.publish(
                "edged/strict/ask",
                json.dumps({"id": f"r-{i}", "prompt": "hi", "max_tokens": 2, "client": "kiosk-9"}),
                response_topic="r/strict",
            )
        lst.publish(
            "edged/strict/ask",
            json.dumps({"id": "r-other", "prompt": "hi", "max_tokens": 2, "client": "kiosk-10"}),
            response_topic="r/strict",
        )
        replies = {r["id"]: r for r in lst.finals(4)}
        limited = replies["r-2"]["error"]
        assert limited["code"] == "rate_limited" and 0 < limited["retry_after_s"] <= 10
        assert replies["r-0"]["status"] == replies["r-1"]["status"] == replies["r-other"]["status"] == "ok"
    finally:
        lst.close()
        strict.stop()


def test_missing_model_degrades_and_answers_model_unavailable(broker: Mosquitto, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    degraded = Node(tmp_path, broker.url, "nomodel", tmp_path / "models", model=SMOLLM2).start(broker.port)
    status = Listener(broker.port, "edged/nomodel/status").json()
    assert status["state"] == "degraded" and "edged model build" in status["reason"]
    lst = Listener(broker.port, "r/nomodel")
    try:
        lst.publish("edged/nomodel/ask", "hello", response_topic="r/nomodel")
        err = lst.json()["error"]
        assert err["code"] == "model_unavailable" and "edged model build" in err["message"]
    finally:
        lst.close()
        degraded.stop()


def test_sigkill_loses_nothing_accepted(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Queued and running requests of a killed daemon all get exactly one final reply after a restart."""
    crashy = Node(tmp_path, broker.url, "crashy", smollm2_dirs["int4"].parent, model=SMOLLM2, queue_capacity=8).start(
        broker.port
    )
    lst = Listener(broker.port, "r/crashy")
    ids = [f"k-{i}" for i in range(5)]
    for rid in ids:  # the first short; the second runs about a second, so the kill lands inside it, not at an end
        body = {"id": rid, "prompt": LONG, "max_tokens": 30 if rid == "k-0" else 90}
        lst.publish("edged/crashy/ask", json.dumps(body), response_topic="r/crashy")
    first = lst.finals(1)  # one answered; one generating and three queued when the kill comes
    time.sleep(0.3)
    crashy.kill()
    crashy.start(broker.port)
    rest = lst.finals(len(ids) - 1, timeout_s=120)
    late = [r for r in lst.drain(2) if r.get("done")]
    counts = Counter(r["id"] for r in first + rest + late)
    assert counts == dict.fromkeys(ids, 1), counts
    assert all(r["status"] == "ok" for r in first + rest)
    lst.close()
    crashy.stop()


def test_daemon_reconnects_after_a_broker_restart(smollm2_dirs: dict[str, Path], tmp_path: Path) -> None:
    own = Mosquitto(tmp_path / "broker").start()
    n = Node(tmp_path / "node", own.url, "phoenix", smollm2_dirs["int4"].parent, model=SMOLLM2).start(own.port)
    try:
        own.stop()
        time.sleep(1)
        own.start()
        deadline = time.monotonic() + 45
        while True:  # the daemon's backoff decides when it is back; ask until it answers
            lst = Listener(own.port, "r/phoenix")
            lst.publish(
                "edged/phoenix/ask", json.dumps({"prompt": "Say hi", "max_tokens": 3}), response_topic="r/phoenix"
            )
            try:
                assert lst.json(timeout_s=3)["status"] == "ok"
                break
            except Exception:
                assert time.monotonic() < deadline, (n.log.read_text())[-2000:]
            finally:
                lst.close()
    finally:
        n.stop()
        own.stop()


def test_two_daemons_share_fleet_requests(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The broker spreads fleet/ask over both nodes; a node that stops leaves the group and gets no more."""
    nodes = [
        Node(tmp_path / name, broker.url, name, smollm2_dirs["int4"].parent, model=SMOLLM2, topic_prefix="shop").start(
            broker.port, prefix="shop"
        )
        for name in ("fleet-a", "fleet-b")
    ]
    lst = Listener(broker.port, "r/fleet")

    def send(first: int, count: int) -> list[dict[str, object]]:
        for i in range(first, first + count):
            body = {"id": f"f-{i}", "prompt": "Say hi", "max_tokens": 3}
            lst.publish("shop/fleet/ask", json.dumps(body), response_topic="r/fleet")
        return lst.finals(count)

    try:
        replies = send(0, 6)
        assert len({r["id"] for r in replies}) == 6
        assert Counter(r["node"] for r in replies) == {"fleet-a": 3, "fleet-b": 3}
        assert nodes[1].stop() == 0
        assert Counter(r["node"] for r in send(6, 4)) == {"fleet-a": 4}
    finally:
        lst.close()
        for n in nodes:
            n.stop()


def test_sigterm_publishes_offline_status(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path) -> None:
    n = Node(tmp_path, broker.url, "bye", smollm2_dirs["int4"].parent, model=SMOLLM2).start(broker.port)
    n.signal(signal.SIGTERM)
    assert n.proc is not None and n.proc.wait(30) == 0
    status = Listener(broker.port, "edged/bye/status").json()
    assert status["state"] == "offline"


def test_serve_without_a_broker_runs_a_private_mosquitto(smollm2_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The quick start: no broker configured, `edged serve` supervises its own; `edged ask` talks to it."""
    port = free_port()
    solo = Node(tmp_path, "", "solo", smollm2_dirs["int4"].parent, model=SMOLLM2, broker_local_port=port)
    solo.start(port)
    url = f"mqtt://127.0.0.1:{port}"

    def edged_ask(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "edged", "ask", "--broker", url, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    try:
        ok = edged_ask("--node", "solo", "--stream", "What is the capital of Japan?")
        assert ok.returncode == 0, ok.stderr
        assert "Tokyo" in ok.stdout and "solo" in ok.stderr
        as_json = json.loads(edged_ask("--node", "solo", "--json", "--max-tokens", "3", "Hi").stdout)
        assert as_json["status"] == "ok" and as_json["usage"]["completion_tokens"] <= 3
        refused = edged_ask("--node", "solo", "--max-tokens", "0", "Hi")
        assert refused.returncode == 2 and "invalid_request" in refused.stderr and "max_tokens" in refused.stderr
        silent = edged_ask("--node", "nobody", "--timeout", "1", "Hi")
        assert silent.returncode == 3 and "no answer from nobody" in silent.stderr
    finally:
        assert solo.stop() == 0
    assert not (tmp_path / "broker" / "mosquitto.conf").read_text().count("0.0.0.0")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the private broker must stop with the daemon"


def test_v311_node_with_a_password_serves_its_topic_and_the_fleet(
    smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """protocol = "v3.1.1" and username/password: the node logs in, answers, and still shares fleet work."""
    own = Mosquitto(tmp_path / "broker", users={"node": "n0de-pw", "kiosk": "k10sk-pw"}).start()
    (tmp_path / "pw").write_text("n0de-pw\n")
    legacy = Node(
        tmp_path / "node",
        f"mqtt://node@127.0.0.1:{own.port}",
        "legacy",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        broker_protocol="v3.1.1",
        broker_password_file=str(tmp_path / "pw"),
    )
    legacy.start(own.port, auth=("kiosk", "k10sk-pw"))
    lst = Listener(own.port, "kiosk/answers", v5=False, auth=("kiosk", "k10sk-pw"))
    try:
        for topic, rid in (("edged/legacy/ask", "l-1"), ("edged/fleet/ask", "l-2")):
            body = {"id": rid, "prompt": "Say hi", "max_tokens": 3, "reply_to": "kiosk/answers"}
            lst.publish(topic, json.dumps(body))
            reply = lst.json()
            assert reply["id"] == rid and reply["status"] == "ok" and reply["node"] == "legacy"
    finally:
        lst.close()
        legacy.stop()
        own.stop()
