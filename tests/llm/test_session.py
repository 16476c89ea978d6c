"""The onnxruntime adapter: where the KV cache may be overwritten, and what a long prompt costs in memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edged.llm.session import _kv_lag

PEAK_LIMIT_MB = 500
# What a 2,048-token context may keep after the request: the arena's decode-sized regions, not the prompt's.
AFTER_SLACK_MB = 64


def _names(*pairs: tuple[int, str]) -> list[str]:
    return [f"past_key_values.{layer}.{kind}" for layer, kind in pairs]


@pytest.mark.parametrize(
    ("names", "lag"),
    [
        (_names((0, "key"), (0, "value"), (1, "key"), (1, "value"), (2, "key"), (2, "value")), 2),
        (_names((0, "key"), (1, "key"), (2, "key")), 1),
        (_names((1, "key"), (1, "value"), (0, "key"), (0, "value")), 4),  # not in layer order
        (_names((0, "key"), (0, "value"), (1, "key")), 2),  # a short last layer: still a layer back
        (_names((0, "key"), (1, "key"), (1, "value")), 3),  # a longer later layer: not
        (["past_key_values.0.key", "past.1.value"], 2),  # names that do not say the layer
    ],
)
def test_a_present_overwrites_a_past_only_one_layer_back_when_the_names_prove_the_order(
    names: list[str], lag: int
) -> None:
    """One layer back is safe only in layer order; anything else must fall back to a full second copy."""
    assert _kv_lag(names) == lag


_PROBE = """
import json, resource, sys
from pathlib import Path
from edged.llm import Engine, GenerationRequest, Message

def rss_mb():
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20

def peak_mb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so it would report the test
    # process's own RSS at spawn (1.5 GB once earlier tests had loaded SmolLM2 twice) instead of this one's.
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024

engine = Engine(Path(sys.argv[1]), threads=2, context_tokens=2048)
engine.complete(GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=2))
baseline = rss_mb()
text = "The tomato plants on the south balcony need water every morning in July. " * 140
request = GenerationRequest(messages=(Message("user", text),), max_tokens=4)
result = engine.complete(request)
print(json.dumps({
    "prompt_tokens": result.usage.prompt_tokens,
    "completion_tokens": result.usage.completion_tokens,
    "baseline_mb": baseline,
    "peak_mb": peak_mb(),
    "after_mb": rss_mb(),
}))
"""


@pytest.mark.model
def test_a_prompt_that_fills_the_context_stays_under_500_mb(smollm2_dirs: dict[str, Path]) -> None:
    """A 2,000-token prompt once took the process from ~370 MB to ~2 GB and kept it; a Pi has 512 MB-1 GB."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(smollm2_dirs["int4"])],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1900 <= probe["prompt_tokens"] < 2048 - 4, probe
    assert probe["completion_tokens"] >= 1, probe
    assert probe["peak_mb"] < PEAK_LIMIT_MB, probe
    assert probe["after_mb"] < probe["baseline_mb"] + AFTER_SLACK_MB, probe
