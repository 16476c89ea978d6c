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
        ("[http]\nlisten = 'localhost'\n", "must look like 127.0.0.1:11434"),
        ("[http]\nenabled = true\nlisten = '0.0.0.0:11434'\n", "set http.api_key"),
        ("[http]\nport = 80\n", "unknown key port in [http]"),
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


def test_config_check_refuses_a_lan_listen_address_without_an_api_key(tmp_path: Path) -> None:
    """Anyone on the LAN could use the node's model, and read what others ask, without a key."""

    def check(text: str) -> subprocess.CompletedProcess[str]:
        path = write(tmp_path, text)
        return subprocess.run(
            [sys.executable, "-m", "edged", "config", "check", str(path)], capture_output=True, text=True, timeout=60
        )

    lan = check('[http]\nenabled = true\nlisten = "192.168.1.20:11434"\n')
    assert lan.returncode == 1 and "http.listen 192.168.1.20:11434 is reachable from other machines" in lan.stderr
    keyed = check('[http]\nenabled = true\nlisten = "192.168.1.20:11434"\napi_key = "k3y"\n')
    assert keyed.returncode == 0, keyed.stderr
    loopback = check('[http]\nenabled = true\nlisten = "[::1]:11434"\n')
    assert loopback.returncode == 0, loopback.stderr


def test_the_api_key_comes_from_the_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "http-api-key").write_text("t0ken\n")
    path = write(tmp_path, '[http]\nenabled = true\nlisten = "0.0.0.0:11434"\n')
    config = load(path, {"CREDENTIALS_DIRECTORY": str(tmp_path)}, {})
    assert config.http.api_key == "t0ken" and config.http.port == 11434 and config.http.host == "0.0.0.0"


def test_example_config_documents_every_key_and_loads() -> None:
    """deploy/edged.toml is the reference: it must load, and name every key the code knows."""
    from dataclasses import fields

    from edged.config import BrokerConfig, Config, HttpConfig
    from edged.governor import Thresholds

    path = Path(__file__).parent.parent / "deploy" / "edged.toml"
    config = load(path, {}, {})
    assert config.broker.url == "" and config.queue_capacity == 16
    text = path.read_text()
    for f in fields(Config) + fields(Thresholds):
        if f.name not in ("broker", "governor", "http", "profiles"):
            assert re.search(rf"^#? ?{f.name} =", text, re.M), f.name
    for f in fields(BrokerConfig):
        assert re.search(rf"^#? ?{f.name} =", text, re.M), f"broker.{f.name}"
    for f in fields(HttpConfig):
        assert re.search(rf"^#? ?{f.name} =", text, re.M), f"http.{f.name}"
    assert re.search(r"^# \[profiles\.\w+\]", text, re.M)
