"""Real parts for the daemon tests: a private Mosquitto on a free loopback port, edged nodes, a listener."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# Every test node's <state_dir>/prepared points here: one prepared copy of each model for the whole suite,
# not one of a few hundred MB per node (edged.llm.session keeps one per build and deletes older ones).
PREPARED = Path(os.environ.get("TMPDIR", "/tmp")) / f"edged-tests-prepared-{os.getuid()}"
SMOLLM2 = "smollm2-135m-instruct"
# What the contract suites share: one answer running and a queue of two (so "full" is reachable), a
# 512-token context, a 4 KB payload cap, and a rate limit that a suite sending many requests does not hit.
CONTRACT_SETTINGS: dict[str, Any] = {
    "model": SMOLLM2,
    "slots": 1,
    "queue_capacity": 2,
    "context_tokens": 512,
    "max_payload_bytes": 4096,
    "rate_limit_per_min": 6000.0,
    "rate_limit_burst": 500,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class Mosquitto:
    """A broker of the test's own, with its own config, loopback only."""

    def __init__(
        self, workdir: Path, port: int | None = None, users: dict[str, str] | None = None, extra_conf: str = ""
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        conf = self.dir / "mosquitto.conf"
        auth = "allow_anonymous true\n"
        if users:
            passwords = self.dir / "passwd"
            passwords.touch()
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True)
            auth = f"allow_anonymous false\npassword_file {passwords}\n"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n{auth}set_tcp_nodelay true\n"
            f"persistence true\npersistence_location {self.dir}/\nautosave_interval 1\n"
            f"log_dest file {self.dir}/mosquitto.log\nuser root\n{extra_conf}"
        )

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")], stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class Listener:
    """An MQTT v5 (or 3.1.1) client that records every message on its subscriptions."""

    def __init__(self, port: int, *topics: str, v5: bool = True, auth: tuple[str, str] | None = None) -> None:
        protocol = paho.MQTTv5 if v5 else paho.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=protocol)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.client.on_message = lambda _c, _u, m: self.messages.put(m)
        if auth:
            self.client.username_pw_set(*auth)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        for t in topics:
            self.subscribe(t)

    def subscribe(self, topic: str) -> None:
        done: queue.Queue[int] = queue.Queue()
        self.client.on_subscribe = lambda _c, _u, mid, *_: done.put(mid)
        _, mid = self.client.subscribe(topic, 1)
        assert done.get(timeout=10) == mid

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        qos: int = 1,
    ) -> None:
        props = None
        if response_topic or correlation:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=qos, properties=props).wait_for_publish(10)

    def next(self, timeout_s: float = 60) -> paho.MQTTMessage:
        return self.messages.get(timeout=timeout_s)

    def json(self, timeout_s: float = 60) -> dict[str, Any]:
        return dict(json.loads(self.next(timeout_s).payload))

    def finals(self, count: int, timeout_s: float = 120) -> list[dict[str, Any]]:
        """The next ``count`` final replies, skipping stream chunks."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count:
            reply = self.json(max(0.1, deadline - time.monotonic()))
            if reply.get("done"):
                out.append(reply)
        return out

    def drain(self, quiet_s: float = 1.0) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.json(quiet_s))
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Node:
    """`edged serve` as a real subprocess with a config file of the test's own."""

    def __init__(self, workdir: Path, broker_url: str, node_id: str, models_dir: Path, **settings: Any) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        PREPARED.mkdir(exist_ok=True)
        if not (self.dir / "prepared").exists():
            (self.dir / "prepared").symlink_to(PREPARED)
        self.node_id = node_id
        self.broker_url = broker_url
        lines = [f'node_id = "{node_id}"', f'state_dir = "{workdir}"', f'models_dir = "{models_dir}"']
        tables: dict[str, dict[str, Any]] = {
            "broker": {"url": broker_url} if broker_url else {},
            "governor": {},
            "http": {},
        }
        for key, value in settings.items():
            table, _, name = key.partition("_")
            if table in tables:
                tables[table][name] = value
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        for table, values in tables.items():
            lines.append(f"[{table}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        self.config = workdir / "edged.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "edged.log"

    def start(
        self,
        port: int,
        timeout_s: float = 60,
        prefix: str = "edged",
        auth: tuple[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Node:
        """Starts the daemon and waits for its retained status to say online."""
        started = int(time.time()) - 1  # status "since" has whole seconds
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edged", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        wait_port(port, timeout_s)  # the node may be starting its own broker
        watcher = Listener(port, f"{prefix}/{self.node_id}/status", auth=auth)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                status = watcher.json(max(0.1, deadline - time.monotonic()))
                since = datetime.fromisoformat(str(status.get("since", "1970-01-01T00:00:00Z"))).timestamp()
                # a retained status of an earlier run of the same node does not count
                if status.get("state") in ("online", "degraded") and since >= started:
                    return self
        finally:
            watcher.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def wait_queue(port: int, node_id: str, depth: int, timeout_s: float = 15) -> None:
    """Until the node's retained status says ``depth`` requests wait in its queue (published at most once a
    second)."""
    watch = Listener(port, f"edged/{node_id}/status")
    try:
        deadline = time.monotonic() + timeout_s
        while watch.json(max(0.1, deadline - time.monotonic())).get("queue") != depth:
            assert time.monotonic() < deadline, f"{node_id}'s queue never held {depth}"
    finally:
        watch.close()


def contract_node(workdir: Path, broker: Mosquitto, models_dir: Path, node_id: str = "pi", **settings: Any) -> Node:
    """A started `edged serve` with the real model and CONTRACT_SETTINGS (``settings`` override them)."""
    return Node(workdir, broker.url, node_id, models_dir, **{**CONTRACT_SETTINGS, **settings}).start(broker.port)


def http_node(workdir: Path, broker: Mosquitto, models_dir: Path, **settings: Any) -> tuple[Node, int]:
    """A contract node with the HTTP front door on a free loopback port and a queue of one (so "full" is
    reachable); and that port, open."""
    port = free_port()
    node = contract_node(
        workdir, broker, models_dir, queue_capacity=1, http_enabled=True, http_listen=f"127.0.0.1:{port}", **settings
    )
    wait_port(port)
    return node, port


# Fixtures a module shares by importing them (conftest's `broker` is one per test).


@pytest.fixture(scope="module", name="broker")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One Mosquitto for the whole module."""
    b = Mosquitto(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(name="listener")
def reply_listener(broker: Mosquitto) -> Iterator[Listener]:
    """A client listening on a reply topic of its own, ``listener.reply_topic``."""
    topic = f"replies/{uuid.uuid4().hex[:8]}"
    lst = Listener(broker.port, topic)
    lst.reply_topic = topic  # type: ignore[attr-defined]
    yield lst
    lst.close()
