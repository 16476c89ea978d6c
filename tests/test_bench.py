"""`edged bench` runs end to end and reports every figure it promises (no timing is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model


def test_bench_quick_reports_engine_and_mqtt_figures(smollm2_dirs: dict[str, Path]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edged", "bench", "--quick", "--json", "--models-dir", str(smollm2_dirs["int4"].parent)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    report = json.loads(out)
    assert [row["model"] for row in report["engine"]] == ["smollm2-135m-instruct", "smollm2-135m-instruct-fp32"]
    assert all(row["decode_tok_s"] > 0 and row["ttft_ms"] > 0 for row in report["engine"])
    mqtt = report["mqtt"]
    assert mqtt["requests"] == 30
    assert 0 < mqtt["broker_echo_ms"]["p50"] <= mqtt["broker_echo_ms"]["p99"]
    assert mqtt["edged_overhead_ms"]["p50"] <= mqtt["edged_overhead_ms"]["p99"]
