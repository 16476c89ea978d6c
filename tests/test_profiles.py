"""Assistant profiles over MQTT with the real SmolLM2 model: style, limits, overrides within caps, reload."""

from __future__ import annotations

import json
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edged.config import ConfigError, load
from tests.mqttlab import (
    Listener,
    Mosquitto,
    Node,
    contract_node,
    module_broker,  # noqa: F401 (a fixture)
    reply_listener,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.model

SHIPPED = Path(__file__).parent.parent / "profiles"
CAP = 80
GARDEN = "How do I start a vegetable garden?"
LONG = "Write a long story about a lighthouse keeper and the sea, with many details."


@pytest.fixture(scope="module")
def profiles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped profiles, and one of the test's own."""
    directory = tmp_path_factory.mktemp("profiles")
    for path in SHIPPED.glob("*.toml"):
        shutil.copy(path, directory)
    (directory / "teller.toml").write_text('max_tokens = 16\nstyle = "Tell it at length."\n')
    return directory


@pytest.fixture(scope="module")
def node(
    broker: Mosquitto, smollm2_dirs: dict[str, Path], profiles_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    n = contract_node(
        tmp_path_factory.mktemp("node"),
        broker,
        smollm2_dirs["int4"].parent,
        profiles_dir=str(profiles_dir),
        max_tokens=CAP,
        max_tokens_cap=CAP,
    )
    yield n
    assert n.stop() == 0, n.log.read_text()


def _ask(lst: Listener, **body: Any) -> dict[str, Any]:
    body.setdefault("id", uuid.uuid4().hex[:12])
    lst.publish("edged/pi/ask", json.dumps(body), response_topic=lst.reply_topic)  # type: ignore[attr-defined]
    return lst.finals(1, timeout_s=120)[0]


def test_a_profile_changes_the_answers_style_and_limits(node: Node, listener: Listener) -> None:
    """The same question: free, as the shipped `brief` profile (48 tokens, one paragraph) and as `checklist`."""
    plain = _ask(listener, prompt=GARDEN)
    brief = _ask(listener, prompt=GARDEN, profile="brief")
    checklist = _ask(listener, prompt=GARDEN, profile="checklist")
    for reply in (plain, brief, checklist):
        assert reply["status"] == "ok", reply
    assert plain["usage"]["completion_tokens"] > 48
    assert brief["usage"]["completion_tokens"] <= 48 and "\n\n" not in brief["text"]
    assert not plain["text"].lstrip().startswith("1.")
    assert checklist["text"].lstrip().startswith("1."), checklist["text"]


def test_an_unknown_profile_is_invalid_request_naming_the_known_ones(node: Node, listener: Listener) -> None:
    reply = _ask(listener, prompt="Hi", profile="pirate")
    assert reply["status"] == "error" and reply["error"]["code"] == "invalid_request"
    assert "pirate" in reply["error"]["message"]
    assert "brief, checklist, field-advisor, sensor-json, teller" in reply["error"]["message"]


def test_request_fields_override_the_profile_within_the_nodes_cap(node: Node, listener: Listener) -> None:
    """`teller` gives 16 tokens; a request asking for more gets it, up to the node's max_tokens_cap."""
    default = _ask(listener, prompt=LONG, profile="teller")
    more = _ask(listener, prompt=LONG, profile="teller", max_tokens=40)
    too_many = _ask(listener, prompt=LONG, profile="teller", max_tokens=100_000)
    assert default["usage"]["completion_tokens"] == 16 and default["finish_reason"] == "length"
    assert more["usage"]["completion_tokens"] == 40 and more["finish_reason"] == "length"
    assert too_many["usage"]["completion_tokens"] == CAP and too_many["finish_reason"] == "length"


def test_a_profile_format_makes_json_answers(node: Node, listener: Listener) -> None:
    """The shipped `sensor-json` profile: every answer is its status object, with no format in the request."""
    reply = _ask(listener, prompt="Soil moisture 4 %, temperature 41 C, pump off.", profile="sensor-json")
    value = json.loads(reply["text"])
    assert set(value) == {"status", "summary"} and value["status"] in ("ok", "warning", "alarm")


def test_profiles_and_the_default_profile_are_reloaded_on_sighup(
    node: Node, listener: Listener, profiles_dir: Path
) -> None:
    """An operator adds a profile file and makes it the default, then `systemctl reload edged`."""
    assert _ask(listener, prompt="Hi", profile="terse")["error"]["code"] == "invalid_request"
    (profiles_dir / "terse.toml").write_text("max_tokens = 3\n")
    config = node.config.read_text()
    node.config.write_text('profile = "terse"\n' + config)
    try:
        node.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while (reply := _ask(listener, prompt=LONG))["usage"]["completion_tokens"] != 3:
            assert time.monotonic() < deadline, reply
            time.sleep(0.5)
        assert _ask(listener, prompt=LONG, profile="teller")["usage"]["completion_tokens"] == 16
    finally:
        node.config.write_text(config)
        (profiles_dir / "terse.toml").unlink()
        node.signal(signal.SIGHUP)


def test_profile_files_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    """A typo in a profile is a configuration error at start (and `edged config check`), not a bad answer."""
    (tmp_path / "bad.toml").write_text("max_tokns = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key max_tokns"):
        load(None, {"EDGED_MODELS_DIR": str(tmp_path)}, {"profiles_dir": str(tmp_path)})
    (tmp_path / "bad.toml").write_text('format = "yaml"\n')
    with pytest.raises(ConfigError, match="format must be"):
        load(None, {}, {"profiles_dir": str(tmp_path)})
    (tmp_path / "bad.toml").unlink()
    with pytest.raises(ConfigError, match=r"profile .missing. .* not defined"):
        load(None, {}, {"profiles_dir": str(tmp_path), "profile": "missing"})
