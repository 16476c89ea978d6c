"""Who may ask as whom: the shipped Mosquitto ACL, confined reply routes, TLS, and no password in the clear."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edged.client import AskClient, BrokerError, ReplyError
from tests.conftest import SMOLLM2
from tests.mqttlab import Listener, Mosquitto, Node, free_port, wait_port

REPO = Path(__file__).parent.parent
DEPLOY = REPO / "deploy" / "mosquitto"
USERS = {"edged": "node-pw", "homeassistant": "ha-pw", "kiosk1": "kiosk1-pw", "kiosk2": "kiosk2-pw"}


def auth(user: str) -> tuple[str, str]:
    return user, USERS[user]


def deploy_broker(workdir: Path) -> Mosquitto:
    """A broker with the shipped edged.conf and edged.acl; only the listener and the password file are the test's."""
    conf = (DEPLOY / "edged.conf").read_text()
    conf = re.sub(
        r"^(listener|protocol|password_file|acl_file|allow_anonymous|per_listener_settings) .*$", "", conf, flags=re.M
    )
    return Mosquitto(workdir, users=USERS, extra_conf=conf + f"acl_file {DEPLOY / 'edged.acl'}\n").start()


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = deploy_broker(tmp_path / "broker")
    yield broker
    broker.stop()


def edged(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run(
        [sys.executable, "-m", "edged", *args], capture_output=True, text=True, timeout=180, env=env, cwd=REPO
    )


def answer(port: int, topic: str, body: dict[str, Any]) -> None:
    """Publishes a final reply as a node would (QoS 1), from a connection of its own."""
    node = Listener(port)
    try:
        node.publish(topic, json.dumps(body))
    finally:
        node.close()


# --- the shipped ACL on a real Mosquitto, no daemon ------------------------------------------------------------


def test_a_kiosk_reads_its_own_answers_and_no_one_elses(deployed: Mosquitto) -> None:
    """Answers can hold what a person asked: kiosk2 must not see kiosk1's, even with wildcards."""
    mine = Listener(deployed.port, "edged/pi/answer/kiosk1/#", auth=auth("kiosk1"))
    other = Listener(
        deployed.port, "edged/+/answer/#", "edged/pi/answer/kiosk1/#", "#", "kiosk/kiosk1/#", auth=auth("kiosk2")
    )
    node = Listener(deployed.port, auth=auth("edged"))
    try:
        node.publish("edged/pi/answer/kiosk1/x", b'{"id": "x", "done": true}')
        node.publish("kiosk/kiosk1/answer/y", b'{"id": "y", "done": true}')  # a fleet answer
        assert mine.next(5).topic == "edged/pi/answer/kiosk1/x"
        assert other.drain(1.0) == []
    finally:
        for c in (mine, other, node):
            c.close()


def test_a_kiosk_may_ask_and_cancel_only_as_itself(deployed: Mosquitto) -> None:
    """kiosk1 posing as kiosk2, or on the anonymous v1 topics, reaches no node; its own topics do."""
    node = Listener(deployed.port, "edged/#", auth=auth("edged"))
    fleet = Listener(deployed.port, "$share/edged/edged/fleet/ask/+", auth=auth("edged"))
    kiosk = Listener(deployed.port, auth=auth("kiosk1"))
    try:
        for topic in ("edged/pi/ask/kiosk2", "edged/pi/cancel/kiosk2", "edged/fleet/ask/kiosk2", "edged/pi/ask"):
            kiosk.publish(topic, b'{"id": "sneaky", "prompt": "hi"}')
        for topic in ("edged/pi/cancel", "edged/pi/status", "edged/pi/answer/kiosk2/z", "kiosk/kiosk2/x"):
            kiosk.publish(topic, b'{"id": "sneaky"}')
        assert node.drain(1.0) == [] and fleet.drain(0.1) == []
        # and the same kiosk on its own topics: the node (and its fleet share) gets exactly these
        for topic in ("edged/pi/ask/kiosk1", "edged/pi/cancel/kiosk1", "edged/fleet/ask/kiosk1"):
            kiosk.publish(topic, b'{"id": "mine"}')
        assert [node.next(5).topic for _ in range(3)] == [
            "edged/pi/ask/kiosk1",
            "edged/pi/cancel/kiosk1",
            "edged/fleet/ask/kiosk1",
        ]
        assert fleet.next(5).topic == "edged/fleet/ask/kiosk1"
    finally:
        for c in (node, fleet, kiosk):
            c.close()


def test_ask_client_says_when_the_broker_refuses_the_question(deployed: Mosquitto) -> None:
    """Logged in as kiosk1 but claiming to be kiosk2: a clear BrokerError at once, not a two-minute timeout."""
    with AskClient(f"mqtt://kiosk1@127.0.0.1:{deployed.port}", "pi", client="kiosk2", password="kiosk1-pw") as k:
        started = time.monotonic()
        with pytest.raises(BrokerError, match="refused"):
            k.ask("hi", timeout_s=30)
        assert time.monotonic() - started < 5
    with pytest.raises(BrokerError, match="refused the login of kiosk1"):
        AskClient(f"mqtt://kiosk1@127.0.0.1:{deployed.port}", "pi", password="wrong")


def test_the_broker_caps_packets_above_the_nodes_payload_limit(deployed: Mosquitto) -> None:
    """max_packet_size: a request the node would call too_long still reaches it; a far bigger one does not."""
    node = Listener(deployed.port, "edged/pi/ask/+", auth=auth("edged"))
    kiosk = Listener(deployed.port, auth=auth("kiosk1"))
    try:
        kiosk.publish("edged/pi/ask/kiosk1", b"a" * 40_000)  # over max_payload_bytes (32768): the node answers
        assert len(node.next(5).payload) == 40_000
        kiosk.client.publish("edged/pi/ask/kiosk1", b"b" * 70_000, qos=1)
        assert node.drain(1.5) == []
    finally:
        node.close()
        kiosk.close()


# --- the ask client: scoped topics, persistent session, reconnects ---------------------------------------------


@dataclass
class Asked:
    topic: str
    response_topic: str
    body: dict[str, Any]


def asked(node: Listener) -> Asked:
    msg = node.next(10)
    return Asked(msg.topic, msg.properties.ResponseTopic, json.loads(msg.payload))  # type: ignore[union-attr]


def test_ask_client_uses_the_client_scoped_topics(broker: Mosquitto) -> None:
    """Identity from the argument, else the URL's user, else ask-<hex>; node and fleet asks, and cancel."""
    node = Listener(broker.port, "edged/+/ask/+", "edged/+/cancel/+")
    try:
        with AskClient(broker.url, "pi", client="lobby") as k, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(k.ask, "hi", timeout_s=10, id="q-1")
            q = asked(node)
            assert q.topic == "edged/pi/ask/lobby" and q.response_topic == "edged/pi/answer/lobby/q-1"
            assert q.body == {"id": "q-1", "prompt": "hi"}
            k.cancel("q-1")
            cancel = node.next(5)
            assert (cancel.topic, json.loads(cancel.payload)) == ("edged/pi/cancel/lobby", {"id": "q-1"})
            answer(broker.port, q.response_topic, {"id": "q-1", "done": True, "status": "ok", "text": "hello"})
            assert pending.result(10)["text"] == "hello"
        with AskClient(f"mqtt://kiosk7@127.0.0.1:{broker.port}", None) as k, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(k.ask, "hi", timeout_s=10, id="q-2")
            q = asked(node)
            assert q.topic == "edged/fleet/ask/kiosk7" and q.response_topic == "kiosk/kiosk7/answer/q-2"
            error = {"code": "busy", "message": "the queue is full", "retry_after_s": 2}
            answer(broker.port, q.response_topic, {"id": "q-2", "done": True, "status": "error", "error": error})
            with pytest.raises(ReplyError) as refused:
                pending.result(10)
            assert refused.value.code == "busy" and refused.value.retry_after_s == 2
            with pytest.raises(ValueError, match="node="):
                k.cancel("q-2")
        with AskClient(broker.url, "pi") as k:
            assert k.client.startswith("ask-") and k.ask_topic == f"edged/pi/ask/{k.client}"
        with pytest.raises(ValueError, match="client identity"):
            AskClient(broker.url, "pi", client="kiosk/1")
    finally:
        node.close()


def _restart_while_answering(broker: Mosquitto, persistent: bool, *, lose_session: bool = False) -> Any:
    """ask() is waiting when the broker stops; the answer is published before the client is back."""
    node = Listener(broker.port, "edged/pi/ask/+")
    with (
        AskClient(broker.url, "pi", client="kiosk1", persistent=persistent) as k,
        ThreadPoolExecutor(1) as pool,
    ):
        # The client's first retry comes 4 s after the broker went: the answer goes out well before, whatever
        # the machine's speed (with the 1 s of AskClient's own backoff, a slow stop could let it back in first).
        k._client.reconnect_delay_set(min_delay=4, max_delay=8)
        pending = pool.submit(k.ask, "hi", timeout_s=8)
        q = asked(node)
        node.close()
        broker.stop()  # SIGTERM: Mosquitto writes its database, persistent sessions included
        if lose_session:
            (broker.dir / "mosquitto.db").unlink()
        time.sleep(1.5)
        broker.start()
        final = {"id": q.body["id"], "done": True, "status": "ok", "text": "still here"}
        if not lose_session:
            answer(broker.port, q.response_topic, final)
            return pending.result(15)
        # nothing kept our subscription: publish until the client has subscribed again on its own
        while not pending.done():
            answer(broker.port, q.response_topic, final)
            time.sleep(0.3)
        return pending.result()


def test_a_persistent_ask_gets_the_answer_sent_while_the_broker_restarted(broker: Mosquitto) -> None:
    """The broker queues the QoS 1 answer in the kept session and hands it over after the reconnect."""
    assert _restart_while_answering(broker, persistent=True)["text"] == "still here"


def test_without_a_persistent_session_that_answer_is_lost(broker: Mosquitto) -> None:
    """The control for the case above: it is the session that carries the answer, not luck in timing."""
    with pytest.raises(TimeoutError, match="no answer from pi"):
        _restart_while_answering(broker, persistent=False)


def test_ask_subscribes_again_when_the_broker_lost_the_session(broker: Mosquitto) -> None:
    """A broker restarted without its database forgets subscriptions: ask() must renew its own."""
    assert _restart_while_answering(broker, persistent=True, lose_session=True)["text"] == "still here"


def test_closing_a_persistent_client_ends_its_session(broker: Mosquitto) -> None:
    """close() sets Session Expiry 0: no session is left queueing answers for a client that is gone."""
    with AskClient(broker.url, "pi", client="kiosk1", persistent=True):
        pass
    flags: queue.Queue[bool] = queue.Queue()
    probe = paho.Client(CallbackAPIVersion.VERSION2, client_id="edged-ask-kiosk1", protocol=paho.MQTTv5)
    probe.on_connect = lambda _c, _u, f, *_: flags.put(f.session_present)
    probe.connect("127.0.0.1", broker.port, clean_start=False)
    probe.loop_start()
    try:
        assert flags.get(timeout=5) is False
    finally:
        probe.disconnect()
        probe.loop_stop()


# --- no password in the clear --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("broker", "extra", "ok"),
    [
        ("mqtt://kiosk1@192.168.1.20", "", False),
        ("mqtt://192.168.1.20", 'password = "pw"', False),
        ("mqtt://kiosk1@pi.local:1883", "", False),
        ("mqtt://kiosk1@192.168.1.20", "allow_plaintext_password = true", True),
        ("mqtts://kiosk1@192.168.1.20", 'password = "pw"', True),
        ("mqtt://192.168.1.20", "", True),
        ("mqtt://edged@127.0.0.1:1883", 'password = "pw"', True),
        ("mqtt://edged@127.3.4.5", 'password = "pw"', True),
        ("mqtt://edged@localhost", 'password = "pw"', True),
        ("mqtt://edged@[::1]:1883", 'password = "pw"', True),
    ],
)
def test_config_check_refuses_a_password_over_plain_tcp_to_another_host(
    tmp_path: Path, broker: str, extra: str, ok: bool
) -> None:
    """Anyone on the LAN can read an mqtt:// login; only loopback, mqtts or an explicit opt-in pass."""
    path = tmp_path / "edged.toml"
    path.write_text(f'[broker]\nurl = "{broker}"\n{extra}\n')
    r = edged("config", "check", str(path))
    if ok:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 1 and "use mqtts:// or set broker.allow_plaintext_password = true" in r.stderr
        assert "pw" not in r.stderr.replace("password", "")  # the error does not echo a password


# --- TLS -------------------------------------------------------------------------------------------------------


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(dirpath: Path, name: str) -> tuple[Path, Path]:
    key, cert = dirpath / f"{name}.key", dirpath / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", key, "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


@dataclass
class Pki:
    ca: Path
    other_ca: Path  # signed nothing of ours
    server_cert: Path
    server_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a server certificate for 127.0.0.1 and localhost, made with the openssl command line."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line")
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca(d, "edged-test-ca")
    _, other_ca = make_ca(d, "someone-else")
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.crt", d / "server.ext"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", key, "-out", csr)
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
        "-extfile", ext, "-out", cert,
    )  # fmt: skip
    return Pki(ca, other_ca, cert, key)


@dataclass
class TlsBroker:
    broker: Mosquitto
    tls_port: int

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[TlsBroker]:
    """Mosquitto with a plain loopback listener (for the test's own clients) and a TLS one."""
    tls_port = free_port()
    extra = f"listener {tls_port} 127.0.0.1\ncafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
    broker = Mosquitto(tmp_path / "broker", extra_conf=extra).start()
    wait_port(tls_port)
    yield TlsBroker(broker, tls_port)
    broker.stop()


def test_ask_client_over_tls_trusts_the_configured_ca(tls_broker: TlsBroker, pki: Pki) -> None:
    """ca_file is the trust anchor: with it the client connects and asks; the node side is played here."""
    node = Listener(tls_broker.broker.port, "edged/pi/ask/+")
    try:
        with AskClient(tls_broker.url, "pi", client="kiosk1", ca_file=str(pki.ca)) as k, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(k.ask, "hi", timeout_s=10)
            q = asked(node)
            answer(tls_broker.broker.port, q.response_topic, {"id": q.body["id"], "done": True, "text": "secret"})
            assert pending.result(10)["text"] == "secret"
    finally:
        node.close()


def test_ask_refuses_a_broker_the_ca_did_not_sign(tls_broker: TlsBroker, pki: Pki, tmp_path: Path) -> None:
    """A wrong CA (a man in the middle looks the same) fails the connect, saying why, library and CLI alike."""
    with pytest.raises(BrokerError, match="certificate verify failed"):
        AskClient(tls_broker.url, "pi", client="kiosk1", ca_file=str(pki.other_ca))
    config = tmp_path / "ask.toml"
    config.write_text(f'[broker]\nca_file = "{pki.other_ca}"\n')
    r = edged("ask", "--broker", tls_broker.url, "--config", str(config), "--node", "pi", "--timeout", "5", "hi")
    assert r.returncode == 1 and "certificate verify failed" in r.stderr, r.stderr


# --- end to end with the daemon -------------------------------------------------------------------------------


@pytest.fixture
def node_on_deployed(deployed: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path) -> Iterator[Node]:
    (tmp_path / "node-pw").write_text(USERS["edged"])
    node = Node(
        tmp_path / "node",
        f"mqtt://edged@127.0.0.1:{deployed.port}",
        "pi",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        broker_password_file=str(tmp_path / "node-pw"),
    )
    node.start(deployed.port, auth=auth("edged"))
    yield node
    node.stop()


@pytest.mark.model
def test_a_kiosk_asks_cancels_and_asks_the_fleet_behind_the_shipped_acl(
    deployed: Mosquitto, node_on_deployed: Node
) -> None:
    """The whole v1.1 path on the deploy broker: scoped ask, its own answer topic, cancel, the fleet."""
    url = f"mqtt://kiosk1@127.0.0.1:{deployed.port}"
    with AskClient(url, "pi", password=USERS["kiosk1"]) as kiosk:
        reply = kiosk.ask("Say hi", max_tokens=3, timeout_s=60)
        assert reply["status"] == "ok" and reply["node"] == "pi" and reply["usage"]["completion_tokens"] <= 3
        cancelled = threading.Event()

        def cancel_once(_delta: str) -> None:
            if not cancelled.is_set():
                cancelled.set()
                kiosk.cancel("long-1")

        long = kiosk.ask("Tell a long story about a fox.", id="long-1", max_tokens=400, on_delta=cancel_once)
        assert long["finish_reason"] == "cancelled" and long["usage"]["completion_tokens"] < 400
    with AskClient(url, None, password=USERS["kiosk1"]) as kiosk:
        reply = kiosk.ask("Say hi", max_tokens=3, timeout_s=60)
        assert reply["status"] == "ok" and reply["node"] == "pi"


@pytest.mark.model
def test_a_kiosk_cannot_route_answers_to_others(deployed: Mosquitto, node_on_deployed: Node) -> None:
    """The node may write kiosk/#, homeassistant/# and edged/#; it must not do so on a kiosk's say-so."""
    kiosk = Listener(deployed.port, "edged/pi/answer/kiosk1/#", auth=auth("kiosk1"))
    watchers = [
        Listener(deployed.port, "kiosk/kiosk2/#", auth=auth("kiosk2")),
        Listener(deployed.port, "homeassistant/sensor/x/config", auth=auth("homeassistant")),
        Listener(deployed.port, "edged/other/#", auth=auth("edged")),
    ]
    try:
        ids = []
        for n, target in enumerate(("kiosk/kiosk2/x", "homeassistant/sensor/x/config", "edged/other/status")):
            body = {"id": f"r-{n}a", "prompt": "Say hi", "max_tokens": 3, "reply_to": target}
            kiosk.publish("edged/pi/ask/kiosk1", json.dumps(body))
            kiosk.publish(
                "edged/pi/ask/kiosk1",
                json.dumps({"id": f"r-{n}b", "prompt": "Say hi", "max_tokens": 3}),
                response_topic=target,
                correlation=f"r-{n}b".encode(),
            )
            ids += [f"r-{n}a", f"r-{n}b"]
        finals = {}
        for _ in ids:
            msg = kiosk.next(30)
            finals[json.loads(msg.payload)["id"]] = (msg.topic, json.loads(msg.payload))
        for rid in ids:
            topic, reply = finals[rid]
            assert topic == f"edged/pi/answer/kiosk1/{rid}"
            assert reply["status"] == "error" and reply["error"]["code"] == "invalid_request", reply
        for w in watchers:
            assert w.drain(1.0) == []
    finally:
        kiosk.close()
        for w in watchers:
            w.close()


@pytest.mark.model
def test_tls_end_to_end_and_a_wrong_ca(
    tls_broker: TlsBroker, pki: Pki, smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """edged serve and edged ask over mqtts:// with [broker] ca_file; a node with the wrong CA stays off."""
    models = smollm2_dirs["int4"].parent
    node = Node(tmp_path / "node", tls_broker.url, "tls", models, model=SMOLLM2, broker_ca_file=str(pki.ca))
    node.start(tls_broker.broker.port)
    try:
        config = tmp_path / "ask.toml"
        config.write_text(f'[broker]\nca_file = "{pki.ca}"\n')
        r = edged(
            "ask", "--broker", tls_broker.url, "--config", str(config), "--node", "tls", "--client", "kiosk-tls",
            "--json", "--max-tokens", "3", "Say hi",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["node"] == "tls"
    finally:
        node.stop()

    wrong = Node(tmp_path / "wrong", tls_broker.url, "wrong", models, model=SMOLLM2, broker_ca_file=str(pki.other_ca))
    with pytest.raises(queue.Empty):
        wrong.start(tls_broker.broker.port, timeout_s=15)
    try:
        deadline = time.monotonic() + 60  # a slow start may not have tried the broker yet
        while "certificate verify failed" not in wrong.log.read_text():
            assert time.monotonic() < deadline, wrong.log.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        wrong.stop()
