"""Configuration: file, environment and flags in that order; unknown keys and bad values rejected clearly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from edged.config import ConfigError, load


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edged.toml"
    path.write_text(text)
    return path


def test_flags_override_environment_which_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'node_id = "from-file"\nmodel = "m-file"\n[broker]\nurl = "mqtt://file:1883"\n')
    env = {"EDGED_NODE": "from-env", "EDGED_BROKER": "mqtt://env:1884"}
    config = load(path, env, {"node_id": "from-flag", "broker": None})
    assert config.node_id == "from-flag"
    assert config.broker.url == "mqtt://env:1884" and config.broker.port == 1884
    assert config.model == "m-file"


def test_password_comes_from_the_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "broker-password").write_text("s3cret\n")
    config = load(
        write(tmp_path, '[broker]\nurl = "mqtts://kiosk@host"\n'), {"CREDENTIALS_DIRECTORY": str(tmp_path)}, {}
    )
    assert config.broker.password == "s3cret" and config.broker.username == "kiosk"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max_tokenz = 5\n", "unknown key max_tokenz"),
        ("[broker]\nhost = 'x'\n", "unknown key host in [broker]"),
        ("queue_capacity = 'many'\n", "queue_capacity must be a int"),
        ("max_tokens = 900\nmax_tokens_cap = 100\n", "above max_tokens_cap"),
        ("node_id = 'pi kitchen'\n", "node_id"),
        ("[broker]\nurl = 'http://x'\n", "mqtt://"),
        ("[broker]\nprotocol = 'v4'\n", "broker.protocol"),
        ("node_id = \n", "not valid TOML"),
    ],
)
def test_bad_configuration_is_rejected_with_the_reason(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        load(write(tmp_path, text), {}, {})


def test_config_check_command(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "edged", "config", "check", str(write(tmp_path, 'node_id = "pi-kitchen"\n'))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert good.returncode == 0 and "OK" in good.stdout and "pi-kitchen" in good.stdout
    bad_path = tmp_path / "bad.toml"
    bad_path.write_text("colour = 'red'\n")
    bad = subprocess.run(
        [sys.executable, "-m", "edged", "config", "check", str(bad_path)], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "unknown key colour" in bad.stderr


def test_example_config_documents_every_key_and_loads() -> None:
    """deploy/edged.toml is the reference: it must load, and name every key the code knows."""
    from dataclasses import fields

    from edged.config import BrokerConfig, Config
    from edged.governor import Thresholds

    path = Path(__file__).parent.parent / "deploy" / "edged.toml"
    config = load(path, {}, {})
    assert config.broker.url == "" and config.queue_capacity == 16
    text = path.read_text()
    for f in fields(Config) + fields(Thresholds):
        if f.name not in ("broker", "governor", "profiles"):
            assert re.search(rf"^#? ?{f.name} =", text, re.M), f.name
    for f in fields(BrokerConfig):
        assert re.search(rf"^#? ?{f.name} =", text, re.M), f"broker.{f.name}"
    assert re.search(r"^# \[profiles\.\w+\]", text, re.M)
