"""``edged soak``: real daemons through a real Mosquitto (persistence on), kiosks that follow the contract's
rules, faults on a schedule (broker restarts and kills, daemon kills mid-generation, a thermal spike, a fleet
node lost), and a report of what became of every request.

The invariant, everywhere: every request a kiosk sent gets a final reply (ok, or an error with a contract
code), and no id gets more final replies than copies of it reached the broker (the kiosk's own re-sends plus
the unacknowledged publishes its MQTT client sent again after a reconnect).
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.broker import LocalBroker, free_port
from edged.errors import CODES
from edged.mqtt import set_nodelay

PREFIX = "edged"
PROMPTS = (
    "What is the capital of France?",
    "Name a fruit that is red.",
    "How many legs does a spider have?",
    "Say hello to the visitor.",
    "What colour is the sky on a clear day?",
    "Give one tip for watering tomatoes.",
    "Is water wet? Answer in one word.",
    "Count from one to five.",
)
NORMAL_TEMP_C = 45.0
CRITICAL_TEMP_C = 90.0  # above the governor's default critical_c (85 C, the Pi firmware's hard limit)
Log = Callable[[str], None]


# -- sizes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    kiosks: int
    requests: int  # per kiosk
    nodes: int = 1
    fleet: bool = False  # kiosks ask edged/fleet/ask/<client>; the nodes share it
    faults: tuple[tuple[float, str], ...] = ()  # (share of all requests sent, fault)


@dataclass(frozen=True)
class Size:
    scenarios: tuple[Scenario, ...]
    reply_timeout_s: float  # a kiosk re-sends an id that got no final reply within this
    drain_s: float  # a scenario with nothing sent or answered for this long ends; what is unanswered is lost
    hold_hot_s: float  # how long the temperature stays critical


def sizes(quick: bool) -> Size:
    if quick:
        return Size(
            (
                Scenario("load", "4 kiosks x 10, bursts, priorities, streams, deadlines, cancels", 4, 10),
                Scenario(
                    "broker",
                    "broker SIGTERM + restart, then SIGKILL + restart",
                    4,
                    10,
                    faults=((0.3, "broker-term"), (0.65, "broker-kill")),
                ),
                Scenario("daemon", "daemon SIGKILLed mid-generation, restarted", 4, 10, faults=((0.4, "daemon-kill"),)),
                Scenario("thermal", "sysfs temperature to critical and back", 4, 10, faults=((0.3, "thermal"),)),
                Scenario(
                    "fleet",
                    "2 daemons share the fleet topic, one SIGKILLed",
                    4,
                    10,
                    nodes=2,
                    fleet=True,
                    faults=((0.4, "fleet-kill"),),
                ),
            ),
            reply_timeout_s=8.0,
            drain_s=90.0,
            hold_hot_s=3.0,
        )
    return Size(
        (
            Scenario("load", "20 kiosks x 300, bursts, priorities, streams, deadlines, cancels", 20, 300),
            Scenario(
                "broker",
                "broker SIGTERM + restart x3, SIGKILL + restart x1",
                8,
                40,
                faults=((0.2, "broker-term"), (0.4, "broker-term"), (0.6, "broker-term"), (0.8, "broker-kill")),
            ),
            Scenario(
                "daemon",
                "daemon SIGKILLed mid-generation x2, restarted",
                8,
                40,
                faults=((0.3, "daemon-kill"), (0.65, "daemon-kill")),
            ),
            Scenario("thermal", "sysfs temperature to critical and back", 8, 40, faults=((0.4, "thermal"),)),
            Scenario(
                "fleet",
                "3 daemons share the fleet topic, one SIGKILLed",
                12,
                40,
                nodes=3,
                fleet=True,
                faults=((0.4, "fleet-kill"),),
            ),
        ),
        reply_timeout_s=20.0,
        drain_s=240.0,
        hold_hot_s=6.0,
    )


# -- the kiosks' plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    id: str
    body: dict[str, Any]
    cancel_after_s: float | None


def plan(rng: random.Random, scenario: str, kiosk: str, count: int, fleet: bool) -> list[list[Ask]]:
    """Bursts of 1-5 requests: mixed priorities, some streamed, some with short deadlines, some cancelled."""
    bursts: list[list[Ask]] = []
    n = 0
    while n < count:
        burst = []
        for _ in range(min(count - n, rng.randint(1, 5))):
            request_id = f"{scenario}-{kiosk}-{n:04d}"
            body: dict[str, Any] = {
                "id": request_id,
                "prompt": rng.choice(PROMPTS),
                "max_tokens": rng.randint(4, 16),
                "priority": rng.choices(("normal", "alert", "background"), (7, 1, 2))[0],
            }
            if rng.random() < 0.3:
                body["stream"] = True
            if rng.random() < 0.15:
                body["deadline_ms"] = rng.randint(50, 1500)
            # A fleet request is cancelled on the node that took it, which the kiosk learns only from the reply.
            cancel = rng.uniform(0.05, 0.6) if not fleet and rng.random() < 0.1 else None
            burst.append(Ask(request_id, body, cancel))
            n += 1
        bursts.append(burst)
    return bursts


# -- what the kiosks saw -------------------------------------------------------------------------------


@dataclass
class Track:
    kiosk: str
    first_sent: float
    last_sent: float
    sends: int = 1  # the kiosk's own publishes of this id: the first and its re-sends
    redelivered: int = 0  # publishes unacknowledged at a disconnect, which paho sends again on reconnect
    finals: list[dict[str, Any]] = field(default_factory=list)
    final_at: float | None = None
    chunks: int = 0
    cancelled: bool = False


class Ledger:
    """Every request id's history, written by the kiosks' network and driver threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tracks: dict[str, Track] = {}
        self.sent = 0
        self.first_chunk = threading.Event()  # a generation is under way (for kills mid-generation)
        self.stray = 0  # replies with an id no kiosk sent

    def send(self, kiosk: str, request_id: str) -> None:
        now = time.monotonic()
        with self.lock:
            track = self.tracks.get(request_id)
            if track is None:
                self.tracks[request_id] = Track(kiosk, now, now)
                self.sent += 1
            else:
                track.sends += 1
                track.last_sent = now

    def reply(self, payload: dict[str, Any]) -> None:
        with self.lock:
            track = self.tracks.get(str(payload.get("id")))
            if track is None:
                self.stray += 1
                return
            if payload.get("done"):
                track.finals.append(payload)
                if track.final_at is None:
                    track.final_at = time.monotonic()
            else:
                track.chunks += 1
                if payload.get("seq") == 0:
                    self.first_chunk.set()

    def settled(self, ids: list[str]) -> bool:
        with self.lock:
            return all(self.tracks[i].finals for i in ids if i in self.tracks)

    def counts(self) -> tuple[int, int, int]:
        """Sent ids, ids with a final reply, re-sends."""
        with self.lock:
            tracks = list(self.tracks.values())
        return len(tracks), sum(1 for t in tracks if t.finals), sum(t.sends - 1 for t in tracks)


def _properties(packet: int, **values: Any) -> Properties:
    props = Properties(packet)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


class Kiosk:
    """A kiosk by the documented rules: MQTT v5, a persistent session with a stable client id, a QoS 1
    subscription to its own answer topics, QoS 1 requests with an id; no final reply within the timeout:
    the same id again."""

    def __init__(
        self, name: str, port: int, node: str | None, ledger: Ledger, bursts: list[list[Ask]], timeout_s: float
    ) -> None:
        self.name = name
        self.node = node
        self.ledger = ledger
        self.bursts = bursts
        self.timeout_s = timeout_s
        self.ask_topic = f"{PREFIX}/{node or 'fleet'}/ask/{name}"
        self.answers = f"{PREFIX}/{node}/answer/{name}/#" if node else f"kiosk/{name}/#"
        self.reconnects = -1
        self._asks: dict[str, Ask] = {}
        self._unacked: dict[int, str | None] = {}  # message id -> request id (None: a cancel) until its PUBACK
        self._early: set[int] = set()  # PUBACKs that came before publish() returned the message id
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._online = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"soak-{name}", daemon=True)
        self.stop = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{name}", protocol=paho.MQTTv5)
        c.reconnect_delay_set(min_delay=1, max_delay=2)
        c.on_connect = self._connected
        c.on_disconnect = self._disconnected
        c.on_subscribe = lambda *_: self._subscribed.set()
        c.on_publish = self._acked
        c.on_message = self._message
        self.client = c
        c.connect(
            "127.0.0.1",
            port,
            keepalive=10,
            clean_start=False,
            properties=_properties(PacketTypes.CONNECT, SessionExpiryInterval=3600),
        )
        c.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"kiosk {name}: the broker did not acknowledge the subscription to {self.answers}")

    def _connected(
        self, client: paho.Client, _u: object, flags: paho.ConnectFlags, reason: ReasonCode, _p: object
    ) -> None:
        if reason.is_failure:
            return
        set_nodelay(client)
        self.reconnects += 1
        self._online.set()
        if not flags.session_present:  # a new session, or the broker lost ours (killed before its autosave)
            client.subscribe(self.answers, 1)

    def _disconnected(self, _c: paho.Client, _u: object, _f: object, _r: object, _p: object) -> None:
        self._online.clear()
        with self._lock:
            pending = [i for i in self._unacked.values() if i is not None]
        with self.ledger.lock:
            for request_id in pending:
                self.ledger.tracks[request_id].redelivered += 1

    def _acked(self, _c: paho.Client, _u: object, mid: int, _r: object, _p: object) -> None:
        # paho calls this holding its own message lock, which publish() needs too: never publish under _lock.
        with self._lock:
            if mid not in self._unacked:
                self._early.add(mid)
            else:
                del self._unacked[mid]

    def _message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            payload["_mqtt"] = {"topic": msg.topic, "dup": bool(msg.dup), "at_s": round(time.monotonic(), 3)}
            self.ledger.reply(payload)
        else:
            with self.ledger.lock:
                self.ledger.stray += 1

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(5)
        self.client.disconnect(properties=_properties(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
        self.client.loop_stop()

    def _publish(self, topic: str, body: dict[str, Any], request_id: str | None = None) -> None:
        props = None
        if request_id is not None:
            reply = self.answers[:-1] + (request_id if self.node else f"answer/{request_id}")
            props = _properties(
                PacketTypes.PUBLISH,
                ResponseTopic=reply,
                CorrelationData=request_id.encode(),
                ContentType="application/json",
            )
        info = self.client.publish(topic, json.dumps(body), qos=1, properties=props)
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._unacked[info.mid] = request_id

    def _send(self, ask: Ask) -> None:
        self.ledger.send(self.name, ask.id)
        self._publish(self.ask_topic, ask.body, ask.id)

    def _run(self) -> None:
        rng = random.Random(self.name)
        ids: list[str] = []
        for burst in self.bursts:
            for ask in burst:
                self._asks[ask.id] = ask
                self._send(ask)
                ids.append(ask.id)
            # The next visitors come when this burst is answered, or after a while anyway.
            next_burst = time.monotonic() + rng.uniform(0.5, 3.0)
            while not self.ledger.settled(ids[-len(burst) :]) and time.monotonic() < next_burst:
                if self.stop.is_set():
                    return
                self._service(ids)
            ids = [i for i in ids if not self.ledger.settled([i])]
        while not self.stop.is_set() and not self.ledger.settled(ids):  # re-sending until answered
            self._service(ids)

    def _service(self, ids: list[str]) -> None:
        now = time.monotonic()
        with self.ledger.lock:
            due = [(i, t) for i in ids if not (t := self.ledger.tracks[i]).finals]
        for request_id, track in due:
            ask = self._asks[request_id]
            if ask.cancel_after_s is not None and not track.cancelled and now - track.first_sent >= ask.cancel_after_s:
                track.cancelled = True
                self._publish(f"{PREFIX}/{self.node}/cancel/{self.name}", {"id": request_id})
            if now - track.last_sent >= self.timeout_s:
                self._send(ask)  # the same id again: the node answers it once, or sends its stored reply
        time.sleep(0.05)


# -- real parts: Mosquitto and edged serve --------------------------------------------------------------


def write_sysfs(root: Path, temp_c: float) -> Path:
    """A Raspberry Pi 4 shaped /sys and /proc; returns the CPU thermal zone's temp file (millidegrees C)."""
    files = {
        "proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\0",
        "proc/loadavg": "0.52 0.41 0.30 1/123 4567",
        "proc/meminfo": "MemTotal:        3884432 kB\nMemFree:          912340 kB\nMemAvailable:    2654208 kB",
        "sys/class/thermal/thermal_zone0/type": "cpu-thermal",
        "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq": "1500000",
        "sys/devices/platform/soc/soc:firmware/get_throttled": "0x0",
        "sys/class/hwmon/hwmon0/name": "rpi_volt",
        "sys/class/hwmon/hwmon0/in0_lcrit_alarm": "0",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    temp = root / "sys/class/thermal/thermal_zone0/temp"
    set_temp(temp, temp_c)
    return temp


def set_temp(path: Path, temp_c: float) -> None:
    """Replaced in one step, so the daemon never reads half a number."""
    tmp = path.with_suffix(".new")
    tmp.write_text(f"{round(temp_c * 1000)}\n")
    os.replace(tmp, path)


def rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


class Daemon:
    """``edged serve`` as a subprocess with its own config, state dir and Pi-shaped sysfs tree."""

    def __init__(self, workdir: Path, node_id: str, broker: LocalBroker, models_dir: Path, model: str) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.broker = broker
        self.temp = write_sysfs(workdir / "sysfs", NORMAL_TEMP_C)
        settings: dict[str, Any] = {
            "node_id": node_id,
            "state_dir": str(workdir / "state"),
            "models_dir": str(models_dir),
            "model": model,
            "sysfs_root": str(workdir / "sysfs"),
            "sensor_interval_s": 0.5,
            "threads": 1,  # two shared cores: one onnxruntime thread per daemon
            "queue_capacity": 6,  # small, so bursts meet `busy` and alerts displace queued work
            "max_tokens": 8,
            "max_tokens_cap": 32,
            "deadline_ms": 60_000,
            "rate_limit_per_min": 120.0,
            "rate_limit_burst": 8,
            "stop_grace_s": 2.0,
            "homeassistant": False,
        }
        lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        lines += ["[broker]", f"url = {json.dumps(broker.url)}"]
        self.config = workdir / "edged.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = workdir / "edged.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.rss_start_mb: float | None = None
        self.rss_end_mb: float | None = None
        self.rss_max_mb: float | None = None
        self.killed = False  # deliberately, for good (the fleet scenario)
        self.crashes: list[int] = []  # exit codes of runs that ended unasked
        self.exit_code: int | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts the daemon and waits for its retained status to say online (a status of this run)."""
        started = int(time.time()) - 1  # the status' "since" has whole seconds
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "NOTIFY_", "WATCHDOG_"))}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edged", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )
        self.runs += 1
        statuses: queue.Queue[dict[str, Any]] = queue.Queue()
        watcher = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        watcher.on_connect = lambda c, *_: c.subscribe(f"{PREFIX}/{self.node_id}/status", 1)
        watcher.on_message = lambda _c, _u, m: statuses.put(json.loads(m.payload))
        watcher.connect("127.0.0.1", self.broker.port)
        watcher.loop_start()
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"edged serve exited with {self.proc.returncode}; see {self.log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.node_id} did not come online in {timeout_s:g} s; see {self.log}")
                try:
                    status = statuses.get(timeout=0.5)
                except queue.Empty:
                    continue
                since = datetime.fromisoformat(str(status.get("since", "1970-01-01T00:00:00Z"))).timestamp()
                if status.get("state") in ("online", "degraded") and since >= started:
                    break
        finally:
            watcher.disconnect()
            watcher.loop_stop()
        self.sample_rss(first=self.rss_start_mb is None)

    def sample_rss(self, first: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        rss = rss_mb(self.proc.pid)
        if rss is None:
            return
        if first:
            self.rss_start_mb = rss
        self.rss_end_mb = rss
        self.rss_max_mb = max(self.rss_max_mb or 0.0, rss)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Notes a run that ended without being asked to (a crash)."""
        if self.proc is not None and self.proc.poll() is not None:
            self.crashes.append(self.proc.returncode)
            self.proc = None

    def kill(self) -> None:
        assert self.proc is not None
        self.sample_rss()
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.sample_rss()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()

    def tracebacks(self) -> int:
        try:
            return self.log.read_text(errors="replace").count("Traceback")
        except OSError:
            return 0


# -- one scenario ---------------------------------------------------------------------------------------


def _summary(final: dict[str, Any]) -> str:
    """One final reply in a line, for the report of a duplicate."""
    error = final.get("error")
    what = error.get("code") if isinstance(error, dict) else final.get("finish_reason")
    mqtt = final.get("_mqtt", {})
    return (
        f"{final.get('status')} {what} from {final.get('node')} (at {mqtt.get('at_s')} s, DUP flag {mqtt.get('dup')})"
    )


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)  # nearest rank
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 1)


class Run:
    """One scenario: its broker, daemons, kiosks and faults; ``result`` is its report."""

    def __init__(self, scenario: Scenario, size: Size, workdir: Path, models_dir: Path, model: str, log: Log) -> None:
        self.s = scenario
        self.size = size
        self.dir = workdir
        self.models_dir = models_dir
        self.model = model
        self.log = log
        self.ledger = Ledger()
        self.faults: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def _say(self, message: str) -> None:
        self.log(f"[soak {time.monotonic() - self.t0:6.1f}s] {self.s.name}: {message}")

    def execute(self) -> dict[str, Any]:
        s = self.s
        load_start = os.getloadavg()
        broker = LocalBroker(self.dir, free_port(), autosave_s=1)
        broker.start()
        names = [f"soak-{chr(ord('a') + i)}" for i in range(s.nodes)]
        daemons = [Daemon(self.dir / name, name, broker, self.models_dir, self.model) for name in names]
        kiosks: list[Kiosk] = []
        try:
            for d in daemons:
                d.start()
            self._say(f"{len(daemons)} daemon(s) online on {broker.url}")
            total = s.kiosks * s.requests
            for i in range(s.kiosks):
                name = f"k{i + 1:02d}"
                bursts = plan(random.Random(f"{s.name}-{name}"), s.name, name, s.requests, s.fleet)
                node = None if s.fleet else daemons[0].node_id
                kiosks.append(Kiosk(name, broker.port, node, self.ledger, bursts, self.size.reply_timeout_s))
            for k in kiosks:
                k.start()
            faults = list(s.faults)
            next_progress = time.monotonic() + 10
            seen, moved = (0, 0), time.monotonic()
            while True:
                sent, answered, retries = self.ledger.counts()
                now = time.monotonic()
                if (sent, answered) != seen:
                    seen, moved = (sent, answered), now
                for d in daemons:
                    d.check()
                    d.sample_rss()
                if faults and sent >= faults[0][0] * total:
                    self._fault(faults.pop(0)[1], broker, daemons)
                    moved = time.monotonic()
                    continue
                if sent >= total and not faults and answered >= sent:
                    break
                if now - moved > self.size.drain_s:  # kiosks kept re-sending all this while
                    self._say(f"nothing answered for {self.size.drain_s:g} s; {sent - answered} request(s) unanswered")
                    break
                if now >= next_progress:
                    self._say(f"{sent}/{total} sent, {answered} answered, {retries} re-sends")
                    next_progress = time.monotonic() + 10
                time.sleep(0.1)
            time.sleep(2.0)  # late duplicates still count
        finally:
            for k in kiosks:
                k.close()
            for d in daemons:
                d.check()
                d.stop()
            broker.stop()
        result = self._result(daemons, kiosks)
        result["load_start"] = [round(v, 2) for v in load_start]
        result["load_end"] = [round(v, 2) for v in os.getloadavg()]
        self._say(
            f"{'OK' if result['ok'] else 'FAILED'}: {result['answered']}/{result['sent']} answered, "
            f"{result['lost']} lost, {result['duplicates_beyond_sends']} duplicates beyond sends"
        )
        return result

    def _fault(self, fault: str, broker: LocalBroker, daemons: list[Daemon]) -> None:
        started = time.monotonic()
        if fault in ("broker-term", "broker-kill"):
            sig = signal.SIGTERM if fault == "broker-term" else signal.SIGKILL
            broker.stop(sig)
            broker.start()
            what = f"broker {sig.name}, restarted"
        elif fault == "daemon-kill":
            self.ledger.first_chunk.clear()
            mid = self.ledger.first_chunk.wait(60)  # a streamed answer has begun: the daemon is generating
            daemons[0].kill()
            what = "daemon SIGKILL " + ("mid-generation" if mid else "(no generation seen in 60 s)")
            daemons[0].start()
            what += ", restarted and online"
        elif fault == "thermal":
            d = daemons[0]
            set_temp(d.temp, CRITICAL_TEMP_C)
            time.sleep(self.size.hold_hot_s)
            set_temp(d.temp, NORMAL_TEMP_C)
            what = f"{d.node_id} at {CRITICAL_TEMP_C:g} C for {self.size.hold_hot_s:g} s, back to {NORMAL_TEMP_C:g} C"
        elif fault == "fleet-kill":
            d = daemons[-1]
            d.killed = True
            d.kill()
            what = f"{d.node_id} SIGKILL, not restarted"
        else:
            raise ValueError(f"unknown fault {fault!r}")
        took = time.monotonic() - started
        self.faults.append(
            {"at_s": round(started - self.t0, 1), "fault": fault, "what": what, "took_s": round(took, 1)}
        )
        self._say(f"{what} ({took:.1f} s)")

    def _result(self, daemons: list[Daemon], kiosks: list[Kiosk]) -> dict[str, Any]:
        with self.ledger.lock:
            tracks = dict(self.ledger.tracks)
            stray = self.ledger.stray
        refused: Counter[str] = Counter()
        finish: Counter[str] = Counter()
        latencies, lost_ids, dup_ids = [], [], []
        accepted = duplicates = beyond = conflicts = bad_errors = redelivered = 0
        for request_id, t in tracks.items():
            redelivered += t.redelivered
            if not t.finals:
                lost_ids.append(request_id)
                continue
            assert t.final_at is not None
            latencies.append((t.final_at - t.first_sent) * 1000)
            first = t.finals[0]
            if first.get("status") == "ok":
                accepted += 1
                finish[str(first.get("finish_reason"))] += 1
            else:
                error = first.get("error")
                code = error.get("code") if isinstance(error, dict) else None
                if code not in CODES or not (isinstance(error, dict) and error.get("message")):
                    bad_errors += 1
                refused[str(code)] += 1
            duplicates += len(t.finals) - 1
            over = len(t.finals) - (t.sends + t.redelivered)
            if over > 0:
                beyond += over
                dup_ids.append(request_id)
            kinds = {(f.get("status"), f.get("text"), json.dumps(f.get("error"), sort_keys=True)) for f in t.finals}
            conflicts += len(kinds) > 1
        survived = all(not d.crashes and (d.killed or d.exit_code == 0) for d in daemons)
        result: dict[str, Any] = {
            "scenario": self.s.name,
            "what": self.s.what,
            "sent": len(tracks),
            "sends": sum(t.sends for t in tracks.values()),
            "retries": sum(t.sends - 1 for t in tracks.values()),
            "redelivered": redelivered,
            "accepted": accepted,
            "refused": sum(refused.values()),
            "errors": dict(sorted(refused.items())),
            "finish_reasons": dict(sorted(finish.items())),
            "answered": len(tracks) - len(lost_ids),
            "duplicates": duplicates,
            "duplicates_beyond_sends": beyond,
            "conflicting_finals": conflicts,
            "bad_errors": bad_errors,
            "lost": len(lost_ids),
            "lost_ids": sorted(lost_ids)[:20],
            "duplicate_ids": sorted(dup_ids)[:20],
            "duplicate_finals": {i: [_summary(f) for f in tracks[i].finals] for i in sorted(dup_ids)[:5]},
            "stray_replies": stray,
            "chunks": sum(t.chunks for t in tracks.values()),
            "latency_ms": {f"p{p}": _percentile(latencies, p) for p in (50, 95, 99)},
            "kiosk_reconnects": sum(max(0, k.reconnects) for k in kiosks),
            "daemons": [
                {
                    "node": d.node_id,
                    "runs": d.runs,
                    "rss_start_mb": d.rss_start_mb,
                    "rss_end_mb": d.rss_end_mb,
                    "rss_max_mb": d.rss_max_mb,
                    "killed_for_good": d.killed,
                    "crashes": d.crashes,
                    "exit_code": d.exit_code,
                    "tracebacks": d.tracebacks(),
                    "log": str(d.log),
                }
                for d in daemons
            ],
            "daemons_survived": survived,
            "faults": self.faults,
            "duration_s": round(time.monotonic() - self.t0, 1),
        }
        result["ok"] = not lost_ids and beyond == 0 and bad_errors == 0 and survived and len(tracks) > 0
        return result


# -- the whole soak ------------------------------------------------------------------------------------


def soak(
    models_dir: Path,
    model: str,
    *,
    quick: bool,
    only: list[str] | None = None,
    workdir: Path | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Runs every scenario (or those named in ``only``) and returns the report; see ``format_report``."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if not (models_dir / model / "model.onnx").is_file():
        raise FileNotFoundError(f"no model at {models_dir / model}: run `edged model build {model}` first")
    size = sizes(quick)
    chosen = [s for s in size.scenarios if not only or s.name in only]
    if not chosen:
        raise ValueError(f"no scenario named {only}; there are {', '.join(s.name for s in size.scenarios)}")
    root = workdir or Path(tempfile.mkdtemp(prefix="edged-soak-"))
    t0 = time.monotonic()
    load_start = os.getloadavg()
    results = []
    for scenario in chosen:
        results.append(Run(scenario, size, root / scenario.name, models_dir, model, say).execute())
    report = {
        "size": "quick" if quick else "full",
        "model": model,
        "scenarios": results,
        "overall": _overall(results),
        "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()],
        "cores": os.cpu_count(),
        "duration_s": round(time.monotonic() - t0, 1),
        "workdir": str(root),
    }
    report["ok"] = all(r["ok"] for r in results)
    if report["ok"] and workdir is None:
        shutil.rmtree(root, ignore_errors=True)
        report["workdir"] = None
    return report


def _overall(results: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"scenario": "overall"}
    for key in (
        "sent",
        "sends",
        "retries",
        "redelivered",
        "accepted",
        "refused",
        "answered",
        "duplicates",
        "duplicates_beyond_sends",
        "conflicting_finals",
        "bad_errors",
        "lost",
        "chunks",
    ):
        total[key] = sum(r[key] for r in results)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    total["errors"] = dict(sorted(errors.items()))
    # p99 of the union is not a mean of p99s: report the worst scenario's, which is what a reader checks
    total["latency_ms"] = {
        p: max((r["latency_ms"][p] for r in results if r["latency_ms"][p] is not None), default=None)
        for p in ("p50", "p95", "p99")
    }
    total["daemons_survived"] = all(r["daemons_survived"] for r in results)
    return total


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_report(report: dict[str, Any]) -> str:
    cols = (
        "scenario",
        "sent",
        "accepted",
        "refused",
        "answered",
        "retries",
        "dup",
        "dup>sends",
        "lost",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "ok",
    )
    rows = []
    for r in [*report["scenarios"], report["overall"]]:
        lat = r["latency_ms"]
        ok = r.get("ok", report["ok"])
        rows.append(
            (
                r["scenario"],
                r["sent"],
                r["accepted"],
                r["refused"],
                r["answered"],
                r["retries"],
                r["duplicates"],
                r["duplicates_beyond_sends"],
                r["lost"],
                _ms(lat["p50"]),
                _ms(lat["p95"]),
                _ms(lat["p99"]),
                "yes" if ok else "NO",
            )
        )
    widths = [max(len(str(c)), *(len(str(row[i])) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cols, widths, strict=True)))
    out = [f"edged soak ({report['size']}, {report['model']}, {report['duration_s']:.0f} s)", "", line]
    out.append("-" * len(line))
    for row in rows:
        if row[0] == "overall":
            out.append("-" * len(line))
        out.append(
            "  ".join(
                f"{v!s:<{w}}" if i == 0 else f"{v!s:>{w}}" for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    out.append("")
    for r in report["scenarios"]:
        out.append(f"{r['scenario']}: {r['what']} ({r['duration_s']:.0f} s)")
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
        finish = ", ".join(f"{k} {v}" for k, v in r["finish_reasons"].items()) or "none"
        out.append(f"  errors by code: {errors}; finish reasons: {finish}")
        out.append(
            f"  sends {r['sends']} (+{r['redelivered']} redelivered by MQTT), chunks {r['chunks']}, "
            f"conflicting finals {r['conflicting_finals']}, bad errors {r['bad_errors']}, "
            f"stray replies {r['stray_replies']}, kiosk reconnects {r['kiosk_reconnects']}"
        )
        for f in r["faults"]:
            out.append(f"  fault at {f['at_s']:.0f} s: {f['what']} ({f['took_s']:.1f} s)")
        for d in r["daemons"]:
            rss = f"{d['rss_start_mb']} -> {d['rss_end_mb']} MB (max {d['rss_max_mb']})"
            fate = "killed for good" if d["killed_for_good"] else f"exit {d['exit_code']}"
            crashes = f", CRASHED {d['crashes']}" if d["crashes"] else ""
            out.append(
                f"  {d['node']}: RSS {rss}, {d['runs']} run(s), {fate}{crashes}, tracebacks in log {d['tracebacks']}"
            )
        out.append(f"  load {r['load_start'][0]:.2f} -> {r['load_end'][0]:.2f}")
        if r["lost_ids"]:
            out.append(f"  LOST: {', '.join(r['lost_ids'])}")
        if r["duplicate_ids"]:
            out.append(f"  DUPLICATES beyond sends: {', '.join(r['duplicate_ids'])}")
            for request_id, finals in r["duplicate_finals"].items():
                out.append(f"    {request_id}: {'; '.join(finals)}")
    load = report["load_start"], report["load_end"]
    out.append("")
    out.append(
        f"load on {report['cores']} cores (1/5/15 min): {' '.join(f'{v:.2f}' for v in load[0])} -> "
        f"{' '.join(f'{v:.2f}' for v in load[1])}"
    )
    verdict = "invariant holds" if report["ok"] else f"INVARIANT BROKEN (files kept in {report['workdir']})"
    out.append(f"result: {verdict}")
    return "\n".join(out)


def run(models_dir: Path, model: str, *, quick: bool, as_json: bool, only: list[str] | None = None) -> int:
    """``edged soak``: 0 when the invariant holds, 1 otherwise."""
    report = soak(models_dir, model, quick=quick, only=only)
    print(json.dumps(report, indent=2) if as_json else format_report(report), flush=True)
    return 0 if report["ok"] else 1
