"""Home Assistant MQTT discovery: retained config messages describing the node's sensors."""

from __future__ import annotations

import json

import edged

# key in telemetry, name, device_class, unit, state_class (None where Home Assistant has no class)
_SENSORS = (
    ("cpu_temp_c", "CPU temperature", "temperature", "°C", "measurement"),
    ("cpu_freq_mhz", "CPU frequency", "frequency", "MHz", "measurement"),
    ("power_w", "Power", "power", "W", "measurement"),
    ("voltage_v", "Voltage", "voltage", "V", "measurement"),
    ("current_a", "Current", "current", "A", "measurement"),
    ("energy_j_total", "Energy", "energy", "J", "total_increasing"),
    ("tokens_per_s", "Tokens per second", None, "tok/s", "measurement"),
    ("queue", "Queue depth", None, None, "measurement"),
)


def discovery(prefix: str, node: str, topic_prefix: str, model: str) -> list[tuple[str, bytes]]:
    """(topic, payload) of every discovery message; all retained. Availability follows the status topic."""
    base = f"{topic_prefix}/{node}"
    device = {
        "identifiers": [f"edged_{node}"],
        "name": f"edged {node}",
        "manufacturer": "edged",
        "model": model,
        "sw_version": edged.__version__,
    }
    common = {
        "state_topic": f"{base}/telemetry",
        "availability_topic": f"{base}/status",
        "availability_template": "{{ 'offline' if value_json.state == 'offline' else 'online' }}",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
    }
    out: list[tuple[str, bytes]] = []

    def add(component: str, key: str, config: dict[str, object]) -> None:
        uid = f"edged_{node}_{key}"
        body = {"unique_id": uid, "object_id": uid, **common, **config}
        out.append((f"{prefix}/{component}/{uid}/config", json.dumps(body).encode()))

    for key, name, device_class, unit, state_class in _SENSORS:
        config: dict[str, object] = {"name": name, "value_template": f"{{{{ value_json.{key} }}}}"}
        if device_class:
            config["device_class"] = device_class
        if unit:
            config["unit_of_measurement"] = unit
        if state_class:
            config["state_class"] = state_class
        add("sensor", key, config)
    add(
        "sensor",
        "battery",
        {
            "name": "Battery",
            "device_class": "battery",
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "value_template": "{{ value_json.battery.percent if value_json.battery else None }}",
        },
    )
    add(
        "sensor",
        "governor",
        {
            "name": "Governor",
            "device_class": "enum",
            "options": ["normal", "warm", "hot", "critical", "low_power"],
            "value_template": "{{ value_json.governor }}",
        },
    )
    add(
        "binary_sensor",
        "throttled",
        {
            "name": "Throttled",
            "device_class": "problem",
            "value_template": _flag("throttled"),
        },
    )
    add(
        "binary_sensor",
        "under_voltage",
        {
            "name": "Under-voltage",
            "device_class": "problem",
            "value_template": _flag("under_voltage"),
        },
    )
    return out


def _flag(name: str) -> str:
    """ON/OFF from the firmware's "now" throttle flags (null on boards without them: OFF)."""
    return f"{{{{ 'ON' if value_json.throttled.now and value_json.throttled.now.{name} else 'OFF' }}}}"
