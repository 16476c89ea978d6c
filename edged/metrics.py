"""Optional Prometheus text metrics on 127.0.0.1 (off by default): the telemetry figures and counters."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_GAUGES = {
    "cpu_temp_c": "edged_cpu_temperature_celsius",
    "cpu_freq_mhz": "edged_cpu_frequency_mhz",
    "power_w": "edged_power_watts",
    "voltage_v": "edged_voltage_volts",
    "current_a": "edged_current_amperes",
    "tokens_per_s": "edged_tokens_per_second",
    "queue": "edged_queue_depth",
    "mem_available_mb": "edged_memory_available_megabytes",
    "load1": "edged_load1",
}


class Counts:
    """Event counters shared by the node's threads (received, refused by code, dropped, ...)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def render(telemetry: dict[str, Any], counters: dict[str, int]) -> str:
    lines = []
    for key, name in _GAUGES.items():
        if telemetry.get(key) is not None:
            lines += [f"# TYPE {name} gauge", f"{name} {float(telemetry[key])}"]
    lines += ["# TYPE edged_energy_joules_total counter", f"edged_energy_joules_total {telemetry['energy_j_total']}"]
    battery = telemetry.get("battery") or {}
    if battery.get("percent") is not None:
        lines += ["# TYPE edged_battery_percent gauge", f"edged_battery_percent {float(battery['percent'])}"]
    lines.append("# TYPE edged_governor_state gauge")
    for state in ("normal", "warm", "hot", "critical", "low_power"):
        lines.append(f'edged_governor_state{{state="{state}"}} {int(telemetry["governor"] == state)}')
    lines.append("# TYPE edged_requests_total counter")
    for key, value in sorted(counters.items()):
        lines.append(f'edged_requests_total{{outcome="{key}"}} {value}')
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(
        self, port: int, telemetry: Callable[[], bytes | None], counters: Callable[[], dict[str, int]]
    ) -> None:
        source_telemetry, source_counters = telemetry, counters

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                raw = source_telemetry()
                if self.path != "/metrics" or raw is None:
                    self.send_error(404)
                    return
                body = render(json.loads(raw), source_counters()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="edged-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
