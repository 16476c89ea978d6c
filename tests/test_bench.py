"""`edged bench` runs end to end and reports every figure it promises, each one plausible.

No speed is asserted (machines differ), but every figure must be one a real measurement can give: a negative
or absurd overhead means the bench subtracts the wrong thing or mixes units, and its ratios would mislead.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

# Generous bounds for one request over loopback, far above a loaded 2-core runner and far below a unit mix-up.
OVERHEAD_P50_MAX_MS = 250.0
OVERHEAD_P99_MAX_MS = 1000.0


def _finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_bench_quick_reports_plausible_engine_and_mqtt_figures(smollm2_dirs: dict[str, Path]) -> None:
    """The round trip is engine time plus MQTT overhead: the overhead is positive, bounded, and above the broker."""
    out = subprocess.run(
        [sys.executable, "-m", "edged", "bench", "--quick", "--json", "--models-dir", str(smollm2_dirs["int4"].parent)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    report = json.loads(out)
    assert [row["model"] for row in report["engine"]] == ["smollm2-135m-instruct", "smollm2-135m-instruct-fp32"]
    for row in report["engine"]:
        assert _finite_positive(row["decode_tok_s"]) and _finite_positive(row["ttft_ms"]), row
        assert row["threads"] >= 1, row

    mqtt = report["mqtt"]
    assert mqtt["requests"] == 30
    echo, rtt, over = mqtt["broker_echo_ms"], mqtt["edged_round_trip_ms"], mqtt["edged_overhead_ms"]
    engine_p50 = mqtt["engine_ms"]["p50"]
    for figures in (echo, rtt, over):
        assert all(math.isfinite(v) for v in figures.values()), mqtt
        assert figures["p50"] <= figures["p99"], mqtt
    assert echo["p50"] > 0, mqtt
    assert 0 <= over["p50"] <= OVERHEAD_P50_MAX_MS and over["p99"] <= OVERHEAD_P99_MAX_MS, mqtt
    assert _finite_positive(engine_p50) and engine_p50 < rtt["p50"], "the engine ran inside the round trip"
    # edged's path is the broker's path plus the daemon's work: it cannot beat a bare echo.
    assert echo["p50"] < rtt["p50"] and echo["p50"] <= over["p50"], mqtt
