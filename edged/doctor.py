"""``edged doctor``: a short report on what this node needs; non-zero when a person must fix something."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from edged.broker import find_mosquitto
from edged.config import Config
from edged.sensors import Sensors
from edged.store import read_manifest, verify

Check = tuple[str, str, str]  # (ok | FAIL | info, topic, detail)


def run(config: Config, config_source: str, env: dict[str, str], out: Callable[[str], None] = print) -> int:
    checks: list[Check] = [("ok", "config", config_source)]
    checks += _model(config)
    checks.append(_broker(config))
    checks.append(_state_dir(config))
    found = {k: v for k, v in Sensors(Path(config.sysfs_root)).found().items() if v}
    checks.append(("info", "sensors", ", ".join(sorted(found)) or "none found: energy from the power model"))
    checks.append(_systemd(env))
    for status, topic, detail in checks:
        out(f"{status:<4}  {topic:<8}  {detail}")
    failed = [c for c in checks if c[0] == "FAIL"]
    out(f"\n{len(failed)} problem{'s' if len(failed) != 1 else ''} to fix" if failed else "\nall good")
    return 1 if failed else 0


def _model(config: Config) -> list[Check]:
    model_dir = config.resolved_models_dir() / config.model
    problems = verify(model_dir)
    if problems:
        return [
            (
                "FAIL",
                "model",
                f"{model_dir}: {'; '.join(problems)} (build or install it: `edged model build "
                f"{config.model}` or `edged model install BUNDLE`)",
            )
        ]
    manifest = read_manifest(model_dir)
    size_mb = sum(int(f["bytes"]) for f in manifest["files"].values()) / 1e6
    checks: list[Check] = [("ok", "model", f"{model_dir} ({manifest.get('quant')}, {size_mb:.0f} MB, checksums match)")]
    # onnxruntime keeps the weights plus prepacked copies; the KV cache and the tokenizer come on top.
    need_mb = size_mb * 1.5 + 100
    available = Sensors(Path(config.sysfs_root)).read().mem_available_mb
    if available is None:
        checks.append(("info", "memory", "available memory unknown"))
    elif available < need_mb:
        checks.append(("FAIL", "memory", f"{available:.0f} MB available, the model needs about {need_mb:.0f} MB"))
    else:
        checks.append(("ok", "memory", f"{available:.0f} MB available, about {need_mb:.0f} MB needed"))
    return checks


def _broker(config: Config) -> Check:
    broker = config.broker
    if not broker.url:
        binary = find_mosquitto()
        if binary is None:
            return ("FAIL", "broker", "no broker configured and mosquitto is not installed (apt install mosquitto)")
        with socket.socket() as s:
            taken = s.connect_ex(("127.0.0.1", broker.local_port)) == 0
        if taken:
            return ("FAIL", "broker", f"127.0.0.1:{broker.local_port} is taken; set broker.url to use that broker")
        return ("ok", "broker", f"private mosquitto ({binary}) on 127.0.0.1:{broker.local_port}")
    return _connect(config)


def _connect(config: Config) -> Check:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    broker = config.broker
    answer: list[str] = []
    done = threading.Event()
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edged-doctor-{os.getpid()}",
        protocol=paho.MQTTv5 if broker.protocol == "v5" else paho.MQTTv311,
    )

    def connected(_c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        answer.append(str(reason))
        done.set()

    client.on_connect = connected
    if broker.username:
        client.username_pw_set(broker.username, broker.password or None)
    if broker.tls:
        client.tls_set(
            ca_certs=broker.ca_file or None, certfile=broker.cert_file or None, keyfile=broker.key_file or None
        )
    try:
        client.connect(broker.host, broker.port, keepalive=10)
    except OSError as exc:
        return ("FAIL", "broker", f"{broker.host}:{broker.port} unreachable: {exc.strerror or exc}")
    client.loop_start()
    done.wait(5)
    client.disconnect()
    client.loop_stop()
    if not answer:
        return ("FAIL", "broker", f"{broker.host}:{broker.port} accepted TCP but sent no MQTT CONNACK")
    if answer[0] != "Success":
        return ("FAIL", "broker", f"{broker.host}:{broker.port} refused the login: {answer[0]}")
    who = f" as {broker.username}" if broker.username else ""
    return ("ok", "broker", f"{broker.host}:{broker.port} accepts{who} ({broker.protocol})")


def _state_dir(config: Config) -> Check:
    path = config.resolved_state_dir()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if os.access(probe, os.W_OK):
        return ("ok", "state", f"{path} writable")
    return ("FAIL", "state", f"{path} is not writable by this user (set state_dir or run as the service)")


def _systemd(env: dict[str, str]) -> Check:
    unit = Path("/etc/systemd/system/edged.service")
    if env.get("INVOCATION_ID") or env.get("NOTIFY_SOCKET"):
        return ("info", "systemd", "running under systemd")
    installed = "installed" if unit.is_file() else "not installed (deploy/install.sh)"
    return (
        "info",
        "systemd",
        f"not running under systemd; unit {installed}; `systemctl` available: "
        f"{'yes' if shutil.which('systemctl') else 'no'}",
    )
