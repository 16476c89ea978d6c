"""``edged bench``: engine speed per build and the MQTT round-trip overhead, as tables and ratios.

Every figure is a median (p99 where tails matter) of runs made in this one invocation, so machines
of different speed and load compare by ratio, not by absolute number.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edged import peers
from edged.broker import LocalBroker
from edged.errors import ModelUnavailable
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

    def all_at_once(self, topic: str, payloads: list[bytes], timeout_s: float = 300) -> list[bytes]:
        """Publishes every payload at once; returns their final replies."""
        results: list[list[bytes]] = [[] for _ in payloads]
        threads = [
            threading.Thread(target=lambda i=i: results[i].append(self.round_trip(topic, payloads[i], timeout_s)[1]))
            for i in range(len(payloads))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
        if not all(results):
            raise TimeoutError(f"{sum(not r for r in results)} of {len(payloads)} concurrent requests got no reply")
        for r in results:
            _engine_ms(r[0])  # an error reply fails the bench
        return [r[0] for r in results]

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


DAEMON_SLOTS = 4  # the daemon's batch in the bench: the default on a 4-core board
BUSY_TOKENS = 64  # each of DAEMON_SLOTS concurrent answers, for the daemon's peak RSS


def mqtt_overhead(models_dir: Path, model: str, requests: int) -> dict[str, Any]:
    """The daemon as deployed: seconds from start to READY=1 (sd_notify on a socket of ours), client round
    trip minus engine time over loopback at QoS 1 beside a bare broker echo, and its peak RSS once
    DAEMON_SLOTS answers have run at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        broker = LocalBroker(Path(tmp), port)
        broker.start()
        config = Path(tmp) / "edged.toml"
        config.write_text(
            f'node_id = "bench"\nstate_dir = "{tmp}/node"\nmodels_dir = "{models_dir}"\nmodel = "{model}"\n'
            f"rate_limit_per_min = 0.0\nslots = {DAEMON_SLOTS}\nqueue_capacity = {2 * DAEMON_SLOTS}\n"
            f'[broker]\nurl = "{broker.url}"\n'
        )
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(f"{tmp}/notify")

        def serve() -> tuple[subprocess.Popen[bytes], float]:
            started = time.monotonic()
            daemon = subprocess.Popen(
                [sys.executable, "-m", "edged", "serve", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "NOTIFY_SOCKET": f"{tmp}/notify"},
            )
            try:
                return daemon, _wait_ready(notify, daemon, started)
            except BaseException:
                daemon.kill()
                daemon.wait(30)
                raise

        # The first start writes the model's prepared copy into the state directory; every later one reads it.
        daemon, first_ready_s = serve()
        daemon.terminate()
        daemon.wait(30)
        echo = _echo(port)
        requester = _Requester(port, "bench/replies")
        daemon, ready_s = serve()
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
            body = json.dumps({"prompt": WRITE_LONG, "max_tokens": BUSY_TOKENS}).encode()
            busy = requester.all_at_once("edged/bench/ask", [body] * DAEMON_SLOTS)
            peak_rss_mb = peers.peak_rss_mb(daemon.pid)
        finally:
            requester.close()
            echo.disconnect()
            echo.loop_stop()
            daemon.terminate()
            daemon.wait(30)
            broker.stop()
            notify.close()
    return {
        "requests": requests,
        "ready_first_s": round(first_ready_s, 2),
        "ready_s": round(ready_s, 2),
        "broker_echo_ms": {"p50": _percentile(echo_ms, 0.5), "p99": _percentile(echo_ms, 0.99)},
        "edged_round_trip_ms": {"p50": _percentile(round_trip_ms, 0.5), "p99": _percentile(round_trip_ms, 0.99)},
        "edged_overhead_ms": {"p50": _percentile(overhead_ms, 0.5), "p99": _percentile(overhead_ms, 0.99)},
        "engine_ms": {"p50": _percentile(engine_ms, 0.5)},
        "slots": DAEMON_SLOTS,
        "busy_tokens": sum(json.loads(raw)["usage"]["completion_tokens"] for raw in busy),
        "daemon_peak_rss_mb": round(peak_rss_mb, 1),
    }


def _wait_ready(
    notify: socket.socket, daemon: subprocess.Popen[bytes], started: float, timeout_s: float = 120
) -> float:
    """Seconds from ``started`` until the daemon sends READY=1."""
    notify.settimeout(1.0)
    while time.monotonic() - started < timeout_s:
        try:
            message = notify.recv(4096)
        except TimeoutError:
            if daemon.poll() is not None:
                raise RuntimeError(f"edged serve exited with status {daemon.returncode} before READY=1") from None
            continue
        if b"READY=1" in message.split(b"\n"):
            return time.monotonic() - started
    raise RuntimeError(f"edged serve sent no READY=1 within {timeout_s:.0f} s")


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


# --- edged against its peers, fresh processes alternated round by round ---------------------------------------

# The same greedy workload for every peer, as token ids rendered with edged's tokenizer and chat template.
SHORT_QUESTION = "My tomato leaves curl and fruit cracks after rain. What should I change?"
WRITE_LONG = (
    "Write a long, detailed guide to growing tomatoes on a balcony: soil, pots, watering, feeding, pruning, "
    "pests and harvest. Explain every step fully, with many sections."
)
# Filler for the long prompt and the shared system prompt, cycled word by word up to the token target.
PASSAGE = (
    "A balcony garden lives in a harsher climate than a bed in the ground. Pots heat up in the afternoon sun, "
    "dry out within hours on windy days and hold little water or food. Tomatoes react to every swing: leaves "
    "roll inward when the roots cannot keep up with the heat, and fruit splits when a dry spell ends in a "
    "downpour and the skin cannot stretch as fast as the flesh swells. Clay pots breathe but lose water "
    "quickly; plastic keeps the soil moist longer but gets hot in the sun. A layer of straw or wood chips on "
    "the surface slows evaporation. Drip irrigation on a timer waters early in the morning, before the heat. "
    "Shade cloth that blocks about a third of the light protects plants during the hottest weeks. Feeding "
    "with a tomato fertiliser rich in potassium every two weeks supports flowering and fruit. Side shoots are "
    "removed on cordon varieties so that the plant puts its energy into a few trusses. "
)
SYSTEM_ASK_WARM = "Which pot size suits a cherry tomato?"
SYSTEM_ASK = "How often should I water in July?"


BUSY_CORES = 0.25  # other work above this during a run makes its ratios suspect on a 2-core machine


@dataclass(frozen=True)
class PeerSizes:
    rounds: int
    ttft_repeats: int
    short_prompt: int
    long_prompt: int
    system_prompt: int
    decode_tokens: tuple[int, ...]
    concurrency: tuple[int, ...]
    concurrent_tokens: int
    timeout_s: float
    busy_retries: int  # a run during which other processes took over BUSY_CORES is repeated up to this often


QUICK_SIZES = PeerSizes(1, 1, 45, 400, 300, (32, 64), (1, 2, 4), 8, 300, 0)
FULL_SIZES = PeerSizes(5, 3, 45, 400, 300, (128, 512), (1, 2, 4), 64, 900, 2)


def _prompt(tokenizer: Any, messages: list[tuple[str, str]]) -> dict[str, Any]:
    text = tokenizer.render([Message(r, c) for r, c in messages])
    return {"messages": messages, "text": text, "ids": tokenizer.encode(text)}


def _grow(words: int) -> str:
    passage = PASSAGE.split()
    return " ".join(passage[i % len(passage)] for i in range(words))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def bench_prompts(model_dir: Path, sizes: PeerSizes) -> dict[str, dict[str, Any]]:
    """The workload's prompts, each grown word by word until it reaches its token count."""
    from edged.llm.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer(model_dir)
    prompts = {
        "short": _prompt(tokenizer, [("user", SHORT_QUESTION)]),
        "write": _prompt(tokenizer, [("user", WRITE_LONG)]),
    }
    words = 1
    while (
        len((long := _prompt(tokenizer, [("user", _grow(words) + "\n\n" + SHORT_QUESTION)]))["ids"]) < sizes.long_prompt
    ):
        words += max(1, (sizes.long_prompt - len(long["ids"])) // 2)
    prompts["long"] = long
    words = 1
    while True:
        system = "You are a gardening assistant. Background: " + _grow(words)
        warm = _prompt(tokenizer, [("system", system), ("user", SYSTEM_ASK_WARM)])
        ask = _prompt(tokenizer, [("system", system), ("user", SYSTEM_ASK)])
        shared = _common_prefix(warm["ids"], ask["ids"])
        if shared >= sizes.system_prompt:
            break
        words += max(1, (sizes.system_prompt - shared) // 2)
    prompts["system_warm"], prompts["system_ask"] = warm, ask
    return prompts


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    lower_is_better: bool
    values: dict[str, float | None]  # peer -> median over its rounds (None: not measured)
    notes: dict[str, str]  # peer -> why this figure is not the feature the row names

    def ratios(self) -> dict[str, float]:
        """edged's value over each peer's, where both were measured."""
        mine = self.values.get(peers.EDGED)
        return {
            p: mine / v
            for p, v in self.values.items()
            if p != peers.EDGED
            and mine is not None
            and v is not None
            and v > 0
            and self.key not in ("agreement", "first_16_match")
        }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _agreement(answer: list[int], reference: list[int]) -> tuple[float, bool]:
    """Fraction of positions equal until the first divergence, and whether the first 16 tokens match."""
    n = min(len(answer), len(reference))
    same = _common_prefix(answer[:n], reference[:n])
    return (same / n if n else 0.0), same >= min(16, n) and n > 0


def peer_rows(
    reports: dict[str, list[dict[str, Any]]],
    reference: list[int] | None,
    sizes: PeerSizes,
    prompt_tokens: dict[str, int],
) -> list[Row]:
    """The comparison table: one row per figure, medians over each peer's rounds."""

    def each(figure: Any) -> dict[str, float | None]:
        return {p: _median([float(figure(r)) for r in reps]) if reps else None for p, reps in reports.items()}

    rows = [
        Row("load_s", "load s (model file to ready)", True, each(lambda r: r["load_s"]), {}),
        Row(
            "ttft_short_ms",
            f"TTFT ms, {prompt_tokens['short']}-token prompt",
            True,
            each(lambda r: r["ttft_short_ms"]),
            {},
        ),
        Row(
            "ttft_long_ms",
            f"TTFT ms, {prompt_tokens['long']}-token prompt",
            True,
            each(lambda r: r["ttft_long_ms"]),
            {},
        ),
    ]
    uncached = {
        p: f"{p}: uncached, the whole {prompt_tokens['system_ask']}-token prompt is prefilled ("
        + ("no prefix cache in the engine yet)" if p == peers.EDGED else "generate() keeps no cache between calls)")
        for p, reps in reports.items()
        if reps and not reps[0]["prefix_cache"]
    }
    rows.append(
        Row(
            "ttft_system_cached_ms",
            f"TTFT ms, cached {prompt_tokens['system_shared']}-token system prompt",
            True,
            each(lambda r: r["ttft_system_ms"]),
            uncached,
        )
    )
    for i, n in enumerate(sizes.decode_tokens):
        short = {
            p: f"{p}: ended at end of turn after {min(r['decode'][i]['tokens'] for r in reps)} of {n} tokens "
            "(no ignore_eos); the rate is over the tokens it made"
            for p, reps in reports.items()
            if reps and min(r["decode"][i]["tokens"] for r in reps) < n
        }
        rows.append(
            Row(
                f"decode_{n}_tok_s",
                f"decode tok/s, {n} tokens",
                False,
                each(lambda r, i=i: r["decode"][i]["tok_s"]),
                short,
            )
        )
    for i, c in enumerate(sizes.concurrency):
        serial = {
            p: f"{p}: served one at a time ("
            + ("no batching in the engine yet)" if p == peers.EDGED else "one sequence per Llama)")
            for p, reps in reports.items()
            if reps and not reps[0]["batches"] and c > 1
        }
        label = f"aggregate tok/s, {c} request{'s' if c > 1 else ''} x {sizes.concurrent_tokens} tokens"
        rows.append(
            Row(f"aggregate_{c}_tok_s", label, False, each(lambda r, i=i: r["concurrency"][i]["tok_s"]), serial)
        )
    n = sizes.decode_tokens[0]
    schema = {
        p: _median([float(r["decode_schema"]["tok_s"]) for r in reps if "decode_schema" in r])
        for p, reps in reports.items()
    }
    others = {
        p: "not measured: the row is edged's own structured answers against its free decode"
        for p in schema
        if p != peers.EDGED
    }
    rows.append(Row("decode_schema_tok_s", f"decode tok/s, {n} tokens under a JSON schema", False, schema, others))
    rows.append(Row("peak_rss_mb", "peak RSS MB", True, each(lambda r: r["peak_rss_mb"]), {}))
    agree: dict[str, float | None] = {}
    first16: dict[str, float | None] = {}
    for p, reps in reports.items():
        if reps and reference is not None:
            fraction, match = _agreement(reps[0]["decode"][0]["token_ids"], reference)
            agree[p], first16[p] = fraction, float(match)
        else:
            agree[p] = first16[p] = None
    n = sizes.decode_tokens[0]
    rows.append(Row("agreement", f"agreement with edged fp32, {n} tokens", False, agree, {}))
    rows.append(Row("first_16_match", "first 16 tokens as edged fp32 (1 = yes)", False, first16, {}))
    return rows


def _optimum_build(models_dir: Path, recipe: str) -> Path:
    from edged.store import find_recipe

    try:
        r = find_recipe(models_dir, recipe)
    except ModelUnavailable:
        return models_dir / recipe
    return models_dir / r.dir_name(r.default_quant, "optimum")


def compare_peers(models_dir: Path, model: str, sizes: PeerSizes, threads: int, log: Any = None) -> dict[str, Any]:
    """Runs every available peer in fresh processes, alternated round by round; medians, ratios and each run's load.

    edged loads its model as the daemon does after its first start, from a prepared copy written once here.
    """
    with tempfile.TemporaryDirectory(prefix="edged-bench-prepared-") as prepared:
        return _compare_peers(models_dir, model, sizes, threads, log, Path(prepared))


def _compare_peers(
    models_dir: Path, model: str, sizes: PeerSizes, threads: int, log: Any, prepared_dir: Path
) -> dict[str, Any]:
    model_dir = models_dir / model
    # A build of another graph (say `-gqa`) names its recipe: the GGUF, the fp32 reference and the optimum
    # export that optimum's own generate needs all come from the recipe's builds.
    manifest = model_dir / "manifest.json"
    recipe = str(json.loads(manifest.read_text()).get("recipe", model)) if manifest.is_file() else model
    fp32_dir = models_dir / f"{recipe}-fp32"
    prompts = bench_prompts(model_dir, sizes)
    spec = {
        "threads": threads,
        "context_tokens": 2048,
        "prompts": prompts,
        "ttft_repeats": sizes.ttft_repeats,
        "decode_tokens": list(sizes.decode_tokens),
        "concurrency": list(sizes.concurrency),
        "concurrent_tokens": sizes.concurrent_tokens,
    }
    status: dict[str, str] = {}
    specs: dict[str, dict[str, Any]] = {}
    for peer in peers.PEERS:
        why = peers.missing(peer)
        if why is not None:
            status[peer] = why
            continue
        if peer == peers.LLAMA_CPP:
            try:
                from edged.build import fetch_gguf
                from edged.store import default_cache_dir, find_recipe

                specs[peer] = {
                    **spec,
                    "peer": peer,
                    "gguf": str(fetch_gguf(find_recipe(models_dir, recipe), default_cache_dir())),
                }
            except Exception as exc:  # no recipe with a GGUF source, or the fetch failed
                status[peer] = f"skipped: no source GGUF for {model} ({exc})"
                continue
        elif peer == peers.OPTIMUM:
            # optimum's generate needs optimum's export of the same weights: the recipe's optimum build.
            peer_dir = _optimum_build(models_dir, recipe)
            if not (peer_dir / "model.onnx").is_file():
                status[peer] = (
                    f"skipped: no optimum export of {recipe}; build it with "
                    f"`edged model build {recipe} --graph optimum` (or `make peers`)"
                )
                continue
            specs[peer] = {**spec, "peer": peer, "model_dir": str(peer_dir)}
        else:
            from edged.llm.session import DecoderSession

            DecoderSession(model_dir / "model.onnx", threads, prepared_dir)  # this first load writes the copy
            specs[peer] = {**spec, "peer": peer, "model_dir": str(model_dir), "prepared_dir": str(prepared_dir)}
        status[peer] = "ok"

    runs: list[tuple[int, peers.ChildRun, bool]] = []  # (round, run, counted: False when busy and repeated)
    reference: list[int] | None = None
    if (fp32_dir / "model.onnx").is_file():
        ref_spec = {**spec, "peer": peers.EDGED, "model_dir": str(fp32_dir), "answer_only": True}
        ref_spec["decode_tokens"] = [sizes.decode_tokens[0]]
        ref = peers.spawn(ref_spec, sizes.timeout_s)
        runs.append((0, ref, True))
        if ref.report is not None:
            reference = ref.report["decode"][0]["token_ids"]
    order = list(specs)
    reports: dict[str, list[dict[str, Any]]] = {p: [] for p in peers.PEERS if status.get(p) == "ok"}
    errors: dict[str, list[str]] = {p: [] for p in reports}
    for r in range(sizes.rounds):
        for peer in order[r % len(order) :] + order[: r % len(order)]:  # who goes first rotates
            for attempt in range(sizes.busy_retries + 1):
                child = peers.spawn(specs[peer], sizes.timeout_s)
                # A ratio from a busy box is not fair: repeat the run while another process holds the cores.
                counted = child.other_cores <= BUSY_CORES or attempt == sizes.busy_retries
                runs.append((r + 1, child, counted))
                if log is not None:
                    log(_run_line(r + 1, child) + ("" if counted else "  busy: repeated"))
                if counted:
                    break
            if child.report is not None:
                reports[peer].append(child.report)
            else:
                errors[peer].append(child.error or "failed")
    for peer, reps in reports.items():
        if not reps:
            status[peer] = f"failed: {errors[peer][0]}"
    prompt_tokens = {k: len(p["ids"]) for k, p in prompts.items()}
    prompt_tokens["system_shared"] = _common_prefix(prompts["system_warm"]["ids"], prompts["system_ask"]["ids"])
    table = {p: reports.get(p, []) for p in peers.PEERS}
    rows = peer_rows(table, reference, sizes, prompt_tokens)
    series = {
        "position": {p: _position_rates(reps) for p, reps in table.items() if reps},
        "concurrency": {
            p: [[c, _median([r["concurrency"][i]["tok_s"] for r in reps])] for i, c in enumerate(sizes.concurrency)]
            for p, reps in table.items()
            if reps
        },
    }
    return {
        "threads": threads,
        "rounds": sizes.rounds,
        "decode_tokens": list(sizes.decode_tokens),
        "prompt_tokens": prompt_tokens,
        "reference": f"{model}-fp32" if reference is not None else None,
        "peers": status,
        "tokenizer_matches": {p: reps[0].get("tokenizer_matches", True) for p, reps in table.items() if reps},
        "generated_tokens": {
            p: [min(r["decode"][i]["tokens"] for r in reps) for i in range(len(sizes.decode_tokens))]
            for p, reps in table.items()
            if reps
        },
        "rows": [{**row.__dict__, "ratios": row.ratios()} for row in rows],
        "runs": [
            {
                "round": r,
                "peer": c.peer if r else f"{c.peer} fp32 (reference)",
                "ok": c.report is not None,
                "counted": counted,
                "error": c.error,
                "wall_s": round(c.wall_s, 2),
                "loadavg_before": c.loadavg_before,
                "loadavg_after": c.loadavg_after,
                "other_cpu_s": round(c.other_cpu_s, 2),
                "other_cores": round(c.other_cores, 3),
            }
            for r, c, counted in runs
        ],
        "series": series,
    }


# Points on the rate-against-position curve: the longest answer in this many windows.
POSITION_POINTS = 16


def _position_rates(reports: list[dict[str, Any]]) -> list[list[float]]:
    """Decode tok/s over windows of the longest answer, median over rounds: [[answer position, tok/s], ...]."""
    by_position: dict[int, list[float]] = {}
    for report in reports:
        stamps = report["decode"][-1]["stamps_s"]
        window = max(4, len(stamps) // POSITION_POINTS)
        for end in range(window, len(stamps), window):
            dt = stamps[end] - stamps[end - window]
            if dt > 0:
                by_position.setdefault(end, []).append(window / dt)
    return [[pos, statistics.median(v)] for pos, v in sorted(by_position.items())]


def _run_line(round_no: int, child: peers.ChildRun) -> str:
    state = "ok" if child.report is not None else f"FAILED: {child.error}"
    return (
        f"round {round_no} {child.peer:<10} {child.wall_s:6.1f} s  load avg {child.loadavg_before:.2f} -> "
        f"{child.loadavg_after:.2f}  other processes {child.other_cores:.2f} cores  {state}"
    )


def print_peers(report: dict[str, Any]) -> None:
    names = list(peers.PEERS)
    others = [p for p in names if p != peers.EDGED]
    pt = report["prompt_tokens"]
    print(
        f"\nedged against its peers: {report['threads']} threads each, greedy, the same token ids "
        f"(short {pt['short']}, long {pt['long']}, write-long {pt['write']}); median of {report['rounds']} "
        "round(s), a fresh process per peer per round, peers alternated"
    )
    head = f"{'figure':<48}" + "".join(f"{p:>11}" for p in names) + "".join(f"{'edged/' + p:>17}" for p in others)
    print(head)
    notes: list[str] = []
    for row in report["rows"]:
        cells = []
        for p in names:
            value = row["values"].get(p)
            if value is None:
                cells.append(f"{'-' if report['peers'][p] == 'ok' else report['peers'][p].split(':')[0]:>11}")
                continue
            mark = "*" if p in row["notes"] else ""
            digits = 2 if row["key"] in ("load_s", "agreement", "first_16_match") else 1
            cells.append(f"{value:>10.{digits}f}{mark or ' '}")
        ratios = [f"{row['ratios'][p]:>16.2f}x" if p in row["ratios"] else f"{'':>17}" for p in others]
        print(f"{row['label']:<48}" + "".join(cells) + "".join(ratios))
        notes.extend(f"  * {row['label']}: {text}" for text in dict.fromkeys(row["notes"].values()))  # once each
    if notes:
        print("not the feature the row names (measured as it is today, not faked):")
        print("\n".join(notes))
    rows = {row["key"]: row["values"].get(peers.EDGED) for row in report["rows"]}
    free = rows.get(f"decode_{report['decode_tokens'][0]}_tok_s")
    if rows.get("decode_schema_tok_s") and free:
        print(f"edged under a JSON schema: {rows['decode_schema_tok_s'] / free:.2f}x its free decode rate")
    for p in names:
        if report["peers"][p] != "ok":
            print(f"{p}: {report['peers'][p]}")
    mismatched = [p for p, same in report["tokenizer_matches"].items() if not same]
    if mismatched:
        print(f"warning: {', '.join(mismatched)} tokenize the rendered prompt differently (they were fed edged's ids)")
    print("\nruns (load from other processes during each: CPU time not spent by the run or the bench, in cores)")
    for run in report["runs"]:
        state = "ok" if run["ok"] else f"FAILED: {run['error']}"
        state += "" if run["counted"] else "  busy: repeated, not counted"
        print(
            f"  round {run['round']} {run['peer']:<26} {run['wall_s']:6.1f} s  load avg {run['loadavg_before']:.2f}"
            f" -> {run['loadavg_after']:.2f}  other {run['other_cores']:.2f} cores  {state}"
        )
    cores = [run["other_cores"] for run in report["runs"] if run["counted"]]
    if cores:
        busy = sum(c > BUSY_CORES for c in cores)
        print(
            f"other processes during the counted runs: median {statistics.median(cores):.2f}, max {max(cores):.2f} "
            f"cores" + (f"; {busy} counted run(s) above {BUSY_CORES} cores: their ratios are not fair" if busy else "")
        )


def plot_peers(report: dict[str, Any], path: Path) -> None:
    """tok/s against answer position and against concurrency, one line per peer."""
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_position, by_load) = plt.subplots(1, 2, figsize=(11, 4.2))
    for peer, points in report["series"]["position"].items():
        if points:
            by_position.plot([p for p, _ in points], [v for _, v in points], marker=".", label=peer)
    by_position.set(
        xlabel="answer position (tokens)", ylabel="decode tok/s", title="decode rate along the longest answer"
    )
    for peer, points in report["series"]["concurrency"].items():
        by_load.plot([c for c, _ in points], [v for _, v in points], marker="o", label=peer)
    by_load.set(
        xlabel="concurrent requests",
        ylabel="aggregate tok/s",
        title="aggregate rate",
        xticks=[c for c, _ in next(iter(report["series"]["concurrency"].values()), [])],
    )
    for axes in (by_position, by_load):
        axes.grid(alpha=0.3)
        axes.legend()
        axes.set_ylim(bottom=0)
    fig.suptitle(f"{report['threads']} threads, median of {report['rounds']} round(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    models_dir: Path,
    model: str,
    *,
    quick: bool,
    as_json: bool,
    threads: int | None,
    rounds: int | None = None,
    plot: Path | None = None,
) -> int:
    builds = [n for n in (model, f"{model}-fp32") if (models_dir / n / "model.onnx").is_file()]
    tokens, runs, requests = (32, 1, 30) if quick else (128, 3, 200)
    rows = engine_rows(models_dir, builds, tokens, runs, threads)
    mqtt = mqtt_overhead(models_dir, model, requests)
    sizes = QUICK_SIZES if quick else FULL_SIZES
    if rounds is not None:
        sizes = replace(sizes, rounds=rounds)
    log = None if as_json else (lambda line: print(line, file=sys.stderr, flush=True))
    compared = compare_peers(models_dir, model, sizes, threads or 2, log)
    if plot is not None:
        plot_peers(compared, plot)
    if as_json:
        print(json.dumps({"engine": [r.__dict__ for r in rows], "mqtt": mqtt, "peers": compared}, indent=2))
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
    print(
        f"\nthe daemon: READY=1 {mqtt['ready_s']:.2f} s after start (model load and warm-up included; "
        f"{mqtt['ready_first_s']:.2f} s at the first start, which writes the prepared copy)"
    )
    llama_rss = next((r["values"].get(peers.LLAMA_CPP) for r in compared["rows"] if r["key"] == "peak_rss_mb"), None)
    versus = f", {mqtt['daemon_peak_rss_mb'] / llama_rss:.2f}x llama.cpp's process" if llama_rss else ""
    print(
        f"the daemon's peak RSS with {mqtt['slots']} slots, after {mqtt['slots']} answers at once: "
        f"{mqtt['daemon_peak_rss_mb']:.0f} MB{versus}"
    )
    print_peers(compared)
    if plot is not None:
        print(f"\nplot: {plot}")
    return 0
