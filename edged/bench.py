"""``edged bench``: engine speed per build and the MQTT round-trip overhead, as tables and ratios.

Every figure is a median (p99 where tails matter) of runs made in this one invocation, so machines
of different speed and load compare by ratio, not by absolute number.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.broker import LocalBroker
from edged.llm import Engine, GenerationRequest, Message
from edged.mqtt import set_nodelay

# The prompt the FINDINGS baselines used: the chat template plus a ~40-token question.
BENCH_PROMPT = (
    "I grow tomatoes on a balcony in a hot city. The leaves curl and the fruit cracks after rain. "
    "What should I change in watering and shade during the summer?"
)


@dataclass(frozen=True)
class EngineRow:
    model: str
    threads: int
    ttft_ms: float
    decode_tok_s: float


def engine_rows(models_dir: Path, names: list[str], tokens: int, runs: int, threads: int | None) -> list[EngineRow]:
    rows = []
    for name in names:
        engine = Engine(models_dir / name, threads=threads)
        request = GenerationRequest(messages=(Message("user", BENCH_PROMPT),), max_tokens=tokens)
        engine.complete(GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=2))  # warm-up
        results = [engine.complete(request) for _ in range(runs)]
        rows.append(
            EngineRow(
                model=name,
                threads=engine.session.threads,
                ttft_ms=statistics.median(r.timings.ttft_ms for r in results),
                decode_tok_s=statistics.median(r.timings.tokens_per_s for r in results),
            )
        )
    return rows


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Requester:
    """A v5 client that sends a request and waits for the reply carrying its correlation data."""

    def __init__(self, port: int, reply_topic: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self._paho = paho
        self._reply_topic = reply_topic
        self._waiting: dict[bytes, tuple[threading.Event, list[bytes]]] = {}
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
        )
        self.client.on_message = self._message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        set_nodelay(self.client)
        self.client.loop_start()
        self.client.subscribe(reply_topic, 1)
        subscribed.wait(10)

    def round_trip(self, topic: str, payload: bytes, timeout_s: float = 60) -> tuple[float, bytes]:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        correlation = uuid.uuid4().hex[:12].encode()
        done, box = threading.Event(), list[bytes]()
        self._waiting[correlation] = (done, box)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self._reply_topic
        props.CorrelationData = correlation
        start = time.perf_counter()
        self.client.publish(topic, payload, qos=1, properties=props)
        if not done.wait(timeout_s):
            raise TimeoutError(f"no reply on {self._reply_topic} within {timeout_s} s")
        return (time.perf_counter() - start) * 1000, box[0]

    def _message(self, _c: Any, _u: object, msg: Any) -> None:
        waiter = self._waiting.get(getattr(msg.properties, "CorrelationData", b""))
        if waiter is not None and (b'"done":false' not in msg.payload):
            waiter[1].append(bytes(msg.payload))
            waiter[0].set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _echo(port: int) -> Any:
    """The peer: a bare responder that answers each request at once, so only the broker path remains."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-echo", protocol=paho.MQTTv5)

    def answer(c: Any, _u: object, msg: Any) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = msg.properties.CorrelationData
        c.publish(msg.properties.ResponseTopic, msg.payload, qos=1, properties=props)

    subscribed = threading.Event()
    client.on_message = answer
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect("127.0.0.1", port)
    set_nodelay(client)
    client.loop_start()
    client.subscribe("bench/echo", 1)
    subscribed.wait(10)
    return client


def mqtt_overhead(models_dir: Path, model: str, requests: int) -> dict[str, Any]:
    """Client round trip minus engine time over loopback at QoS 1, beside a bare broker echo."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        broker = LocalBroker(Path(tmp), port)
        broker.start()
        config = Path(tmp) / "edged.toml"
        config.write_text(
            f'node_id = "bench"\nstate_dir = "{tmp}/node"\nmodels_dir = "{models_dir}"\nmodel = "{model}"\n'
            f'rate_limit_per_min = 0.0\n[broker]\nurl = "{broker.url}"\n'
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edged", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        echo = _echo(port)
        requester = _Requester(port, "bench/replies")
        try:
            _wait_online(requester, daemon)
            echo_ms = [requester.round_trip("bench/echo", b"ping")[0] for _ in range(requests)]
            round_trip_ms, overhead_ms, engine_ms = [], [], []
            for i in range(requests):
                body = json.dumps({"id": f"b{i}", "prompt": "Hi", "max_tokens": 1}).encode()
                rtt, raw = requester.round_trip("edged/bench/ask", body)
                total = _engine_ms(raw)
                round_trip_ms.append(rtt)
                overhead_ms.append(rtt - total)
                engine_ms.append(total)
        finally:
            requester.close()
            echo.disconnect()
            echo.loop_stop()
            daemon.terminate()
            daemon.wait(30)
            broker.stop()
    return {
        "requests": requests,
        "broker_echo_ms": {"p50": _percentile(echo_ms, 0.5), "p99": _percentile(echo_ms, 0.99)},
        "edged_round_trip_ms": {"p50": _percentile(round_trip_ms, 0.5), "p99": _percentile(round_trip_ms, 0.99)},
        "edged_overhead_ms": {"p50": _percentile(overhead_ms, 0.5), "p99": _percentile(overhead_ms, 0.99)},
        "engine_ms": {"p50": _percentile(engine_ms, 0.5)},
    }


def _engine_ms(raw: bytes) -> float:
    """The engine's own time in a final reply; an error reply fails the bench rather than skewing it."""
    reply = json.loads(raw)
    if reply.get("status") != "ok":
        raise RuntimeError(f"edged answered the bench with an error, not a timing: {reply}")
    return float(reply["timings"]["total_ms"])


def _wait_online(requester: _Requester, daemon: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    """Polls with a tiny request until the daemon answers (it loads and warms up the model first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if daemon.poll() is not None:
            raise RuntimeError(f"edged serve exited with status {daemon.returncode} before it answered")
        try:
            requester.round_trip("edged/bench/ask", b'{"prompt": "Hi", "max_tokens": 1}', timeout_s=2)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def run(models_dir: Path, model: str, *, quick: bool, as_json: bool, threads: int | None) -> int:
    builds = [n for n in (model, f"{model}-fp32") if (models_dir / n / "model.onnx").is_file()]
    tokens, runs, requests = (32, 1, 30) if quick else (128, 3, 200)
    rows = engine_rows(models_dir, builds, tokens, runs, threads)
    mqtt = mqtt_overhead(models_dir, model, requests)
    if as_json:
        print(json.dumps({"engine": [r.__dict__ for r in rows], "mqtt": mqtt}, indent=2))
        return 0
    base = rows[-1]
    print(f"engine: {tokens} greedy tokens after a {len(BENCH_PROMPT.split())}-word question, median of {runs}")
    print(f"{'build':<30} {'threads':>7} {'TTFT ms':>9} {'tok/s':>8} {'vs ' + base.model:>12}")
    for r in rows:
        ratio = r.decode_tok_s / base.decode_tok_s if base.decode_tok_s else 0.0
        print(f"{r.model:<30} {r.threads:>7} {r.ttft_ms:>9.1f} {r.decode_tok_s:>8.1f} {ratio:>11.2f}x")
    echo, over = mqtt["broker_echo_ms"], mqtt["edged_overhead_ms"]
    print(f"\nMQTT over loopback, QoS 1, {mqtt['requests']} sequential requests (max_tokens 1)")
    print(f"{'path':<44} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'bare broker echo (peer)':<44} {echo['p50']:>8.2f} {echo['p99']:>8.2f}")
    rtt = mqtt["edged_round_trip_ms"]
    print(f"{'edged: round trip':<44} {rtt['p50']:>8.2f} {rtt['p99']:>8.2f}")
    print(f"{'edged: round trip minus engine time':<44} {over['p50']:>8.2f} {over['p99']:>8.2f}")
    ratio = over["p50"] / echo["p50"]
    print(f"overhead vs bare echo: {ratio:.1f}x at p50 (engine itself: {mqtt['engine_ms']['p50']:.0f} ms)")
    return 0
