"""A running daemon on a fake board: the governor's states, energy per answer, Home Assistant discovery."""

from __future__ import annotations

import json
import queue
import socket
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests import sysfs
from tests.conftest import SMOLLM2
from tests.mqttlab import Listener, Mosquitto, Node, free_port

pytestmark = pytest.mark.model


def wait_for(lst: Listener, predicate: Any, timeout_s: float = 15) -> dict[str, Any]:
    """The first message on ``lst`` that satisfies ``predicate``."""
    deadline = time.monotonic() + timeout_s
    while True:
        msg = lst.next(max(0.05, deadline - time.monotonic()))
        body = json.loads(msg.payload)
        if predicate(msg.topic, body):
            return dict(body)


def test_governor_walks_through_the_states(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Warm paces and caps, hot refuses and holds the queue, critical stops the running answer, cool resumes;
    the node leaves and rejoins the fleet; status and telemetry show each step; nothing accepted is lost."""
    temp = sysfs.pi4(tmp_path / "board", temp_mc=50_000, throttled="0x0")
    node = Node(
        tmp_path / "node",
        broker.url,
        "hotpi",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        slots=1,  # one answer at a time, so the queue holds what the governor holds back
        topic_prefix="therm",
        sysfs_root=str(tmp_path / "board"),
        sensor_interval_s=0.2,
        telemetry_interval_s=0.5,
        governor_warm_max_tokens=8,
        governor_warm_pause_ms=250.0,
        governor_retry_after_s=30.0,
    ).start(broker.port, prefix="therm")
    watch = Listener(broker.port, "therm/hotpi/status", "therm/hotpi/telemetry")
    replies = Listener(broker.port, "r/hot")
    finals: Counter[str] = Counter()

    def ask(rid: str, topic: str = "therm/hotpi/ask", **fields: Any) -> None:
        replies.publish(
            topic, json.dumps({"id": rid, "prompt": "Tell me about the sea.", **fields}), response_topic="r/hot"
        )

    def final(timeout_s: float = 30) -> dict[str, Any]:
        body = wait_for(replies, lambda _t, b: b.get("done"), timeout_s)
        finals[body["id"]] += 1
        return body

    def heat(celsius: float, governor: str) -> dict[str, Any]:
        temp.write_text(f"{int(celsius * 1000)}\n")
        return wait_for(watch, lambda t, b: t.endswith("/status") and b["governor"] == governor)

    try:
        telemetry = wait_for(watch, lambda t, b: t.endswith("/telemetry"))
        assert telemetry["cpu_temp_c"] == 50.0 and telemetry["governor"] == "normal"
        assert telemetry["power_w"] is None and telemetry["power_source"] == "model"
        assert telemetry["throttled"]["now"]["throttled"] is False and telemetry["cpu_freq_mhz"] == 1500.0

        ask("fleet-1", "therm/fleet/ask", max_tokens=3)
        assert final()["status"] == "ok"

        status = heat(72.0, "warm")
        assert status["state"] == "online"
        ask("w-1", max_tokens=200)
        warm = final()
        assert warm["finish_reason"] == "length" and warm["usage"]["completion_tokens"] == 8  # warm cap
        assert warm["timings"]["total_ms"] > 7 * 250  # paced: a pause between tokens

        temp.write_text("67000\n")  # inside the hysteresis band: still warm
        time.sleep(1.0)
        assert wait_for(watch, lambda t, b: t.endswith("/telemetry") and b["cpu_temp_c"] == 67.0)["governor"] == "warm"

        ask("a-run", max_tokens=200, stream=True)  # runs (paced) while the next two wait behind it
        wait_for(replies, lambda _t, b: b.get("id") == "a-run")
        ask("b-wait")
        ask("c-expire", deadline_ms=2500)
        status = heat(81.0, "hot")
        assert status["state"] == "degraded" and "hot" in status["reason"]
        ask("d-refused")
        refused = final()
        assert refused["id"] == "d-refused" and refused["error"]["code"] == "thermal"
        assert refused["error"]["retry_after_s"] == 30.0
        ask("fleet-2", "therm/fleet/ask", max_tokens=3)  # the node left the fleet: nobody gets this
        held = {body["id"]: body for body in (final(), final())}
        assert set(held) == {"a-run", "c-expire"}
        assert held["a-run"]["finish_reason"] == "length", "hot lets the running answer finish"
        assert held["c-expire"]["finish_reason"] == "deadline", "a queued request waits, then expires"

        status = heat(60.0, "normal")
        assert status["state"] == "online"
        assert final()["id"] == "b-wait"

        ask("e-stopped", max_tokens=400, stream=True)
        wait_for(replies, lambda _t, b: b.get("id") == "e-stopped" and not b.get("done"))
        heat(90.0, "critical")
        stopped = final()
        assert stopped["id"] == "e-stopped" and stopped["finish_reason"] == "thermal"
        assert stopped["usage"]["completion_tokens"] < 400

        heat(50.0, "normal")  # the node is back in the fleet before its status says normal
        ask("fleet-3", "therm/fleet/ask", max_tokens=3)
        assert final()["id"] == "fleet-3", "back in the fleet"
        with pytest.raises(queue.Empty):
            final(timeout_s=1.0)
        assert set(finals.values()) == {1}
        assert "fleet-2" not in finals
    finally:
        watch.close()
        replies.close()
        node.stop()


def test_energy_per_answer_from_a_power_sensor(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A fake INA219 reads a constant 5 W: an answer's energy_j is 5 W x its duration within 10 %.

    The answer is 160 tokens long so that it lasts well over half a second on a fast machine too.
    """
    sysfs.ina219_battery(tmp_path / "board", power_uw=5_000_000, capacity=90)
    node = Node(
        tmp_path / "node",
        broker.url,
        "metered",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        sysfs_root=str(tmp_path / "board"),
        sensor_interval_s=0.2,
        telemetry_interval_s=0.3,
    ).start(broker.port)
    lst = Listener(broker.port, "r/energy", "edged/metered/telemetry")
    try:
        lst.publish(
            "edged/metered/ask",
            json.dumps({"prompt": "Describe the sea.", "max_tokens": 160}),
            response_topic="r/energy",
        )
        reply = wait_for(lst, lambda t, b: t == "r/energy", 60)
        seconds = reply["timings"]["total_ms"] / 1000
        assert seconds > 0.5
        assert reply["energy_j"] == pytest.approx(5.0 * seconds, rel=0.10)
        telemetry = wait_for(lst, lambda t, b: t.endswith("/telemetry") and b["energy_j_total"] > reply["energy_j"])
        assert telemetry["power_source"] == "sensor" and telemetry["power_w"] == 5.0
        assert telemetry["voltage_v"] == 5.08 and telemetry["battery"] == {"percent": 90.0, "status": "Discharging"}
        assert telemetry["cpu_temp_c"] is None and telemetry["throttled"] == {"now": None, "since_boot": None}
    finally:
        lst.close()
        node.stop()


# Home Assistant's MQTT discovery keys for sensors and binary sensors (full names) and its device classes
# with their accepted units, as documented at home-assistant.io/integrations/sensor.mqtt and sensor#device-class.
_HA_KEYS = {
    "name",
    "unique_id",
    "object_id",
    "state_topic",
    "value_template",
    "device_class",
    "unit_of_measurement",
    "state_class",
    "availability_topic",
    "availability_template",
    "payload_available",
    "payload_not_available",
    "device",
    "options",
}
_HA_DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model", "sw_version"}
_HA_UNITS = {
    "temperature": {"°C", "°F", "K"},
    "frequency": {"Hz", "kHz", "MHz", "GHz"},
    "power": {"W", "kW"},
    "voltage": {"V", "mV"},
    "current": {"A", "mA"},
    "energy": {"J", "kJ", "MJ", "Wh", "kWh"},
    "battery": {"%"},
    "enum": {None},
}
_HA_STATE_CLASSES = {"measurement", "total", "total_increasing"}


def test_home_assistant_discovery(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path) -> None:
    sysfs.pi4(tmp_path / "board")
    node = Node(
        tmp_path / "node",
        broker.url,
        "ha-pi",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        sysfs_root=str(tmp_path / "board"),
    ).start(broker.port)
    lst = Listener(broker.port, "homeassistant/#")
    try:
        configs = {}
        while True:
            try:
                msg = lst.next(1.0)
            except queue.Empty:
                break
            configs[msg.topic] = json.loads(msg.payload)
        sensors = {t: c for t, c in configs.items() if t.startswith("homeassistant/sensor/")}
        binaries = {t: c for t, c in configs.items() if t.startswith("homeassistant/binary_sensor/")}
        wanted = {
            "cpu_temp_c",
            "cpu_freq_mhz",
            "power_w",
            "voltage_v",
            "current_a",
            "battery",
            "energy_j_total",
            "tokens_per_s",
            "queue",
            "governor",
        }
        assert {c["unique_id"].removeprefix("edged_ha-pi_") for c in sensors.values()} == wanted
        assert {c["unique_id"].removeprefix("edged_ha-pi_") for c in binaries.values()} == {
            "throttled",
            "under_voltage",
        }
        assert len({c["unique_id"] for c in configs.values()}) == len(configs) == 12
        for topic, c in configs.items():
            assert topic == f"homeassistant/{topic.split('/')[1]}/{c['unique_id']}/config"
            assert set(c) <= _HA_KEYS, set(c) - _HA_KEYS
            assert set(c["device"]) <= _HA_DEVICE_KEYS and c["device"]["identifiers"] == ["edged_ha-pi"]
            assert c["availability_topic"] == "edged/ha-pi/status" and c["state_topic"] == "edged/ha-pi/telemetry"
            if "state_class" in c:
                assert c["state_class"] in _HA_STATE_CLASSES
        for c in sensors.values():
            if "device_class" in c:
                assert c.get("unit_of_measurement") in _HA_UNITS[c["device_class"]], c
        assert {c["device_class"] for c in binaries.values()} == {"problem"}

        lst.publish("homeassistant/status", "online")  # Home Assistant restarted: announce again
        again = set()
        while True:
            try:
                again.add(lst.next(2.0).topic)
            except queue.Empty:
                break
        assert set(configs) <= again
    finally:
        lst.close()
        node.stop()


def test_systemd_status_lines_and_prometheus_metrics(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """READY=1 and STATUS= lines with the governor reach a real NOTIFY_SOCKET; /metrics serves the figures."""
    sysfs.pi4(tmp_path / "board", temp_mc=71_500, throttled="0x0")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    port = free_port()
    node = Node(
        tmp_path / "node",
        broker.url,
        "sd",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        sysfs_root=str(tmp_path / "board"),
        sensor_interval_s=0.2,
        metrics_port=port,
    )
    node.start(broker.port, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        status = next(line for m in messages for line in m.splitlines() if line.startswith("STATUS="))
        assert "governor warm" in status and "71.5 C" in status and "queue 0/16" in status
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "edged_cpu_temperature_celsius 71.5" in metrics
        assert 'edged_governor_state{state="warm"} 1' in metrics
    finally:
        node.stop()
        sock.close()


def test_the_governor_decodes_fewer_answers_together_when_warm(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Four slots decode four answers together; warm caps that at two (less heat), so the third and fourth
    answers start only when earlier ones end. Measured from the streams: answers under way at once."""
    temp = sysfs.pi4(tmp_path / "board", temp_mc=50_000, throttled="0x0")
    node = Node(
        tmp_path / "node",
        broker.url,
        "slotpi",
        smollm2_dirs["int4"].parent,
        model=SMOLLM2,
        slots=4,
        topic_prefix="slots",
        sysfs_root=str(tmp_path / "board"),
        sensor_interval_s=0.2,
        governor_warm_max_tokens=6,
        governor_warm_pause_ms=60.0,
    ).start(broker.port, prefix="slots")
    watch = Listener(broker.port, "slots/slotpi/status")
    replies = Listener(broker.port, "r/slots")

    def most_at_once(tag: str) -> int:
        """Sends four streamed questions at once; the most answers between first chunk and final at a time."""
        for i in range(4):
            # 32 tokens: the first answer is still running when the fourth has been journaled and joins (warm caps
            # them at 6 tokens).
            body = {"id": f"{tag}-{i}", "prompt": f"Tell me about the sea, part {i}.", "max_tokens": 32, "stream": True}
            replies.publish("slots/slotpi/ask", json.dumps(body), response_topic="r/slots")
        events: list[tuple[float, int]] = []  # (time, +1 at an answer's first chunk, -1 at its final)
        started: set[str] = set()
        finals = 0
        while finals < 4:
            body = json.loads(replies.next(60).payload)
            if body.get("done"):
                assert body["status"] == "ok", body
                finals += 1
                events.append((time.monotonic(), -1))
            elif body["id"] not in started:
                started.add(body["id"])
                events.append((time.monotonic(), +1))
        level = peak = 0
        for _, change in sorted(events, key=lambda e: (e[0], e[1])):
            level += change
            peak = max(peak, level)
        return peak

    try:
        wait_for(watch, lambda _t, b: b.get("governor") == "normal")
        assert most_at_once("normal") == 4
        temp.write_text("72000\n")
        wait_for(watch, lambda _t, b: b.get("governor") == "warm")
        assert most_at_once("warm") == 2
    finally:
        watch.close()
        replies.close()
        node.stop()
