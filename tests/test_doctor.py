"""`edged doctor` reports what it finds and fails only on what a person must fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests import sysfs
from tests.mqttlab import Mosquitto


def doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged", "doctor", "--config", str(config)], capture_output=True, text=True, timeout=60
    )


def test_doctor(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models["int4"], models / "tiny")
    sysfs.pi4(tmp_path / "board")
    broker = Mosquitto(tmp_path / "broker", users={"node": "right"}).start()
    config = tmp_path / "edged.toml"

    def write(password: str) -> None:
        (tmp_path / "pw").write_text(password)
        config.write_text(
            f'model = "tiny"\nmodels_dir = "{models}"\nstate_dir = "{tmp_path / "state"}"\n'
            f'sysfs_root = "{tmp_path / "board"}"\n[broker]\nurl = "mqtt://node@127.0.0.1:{broker.port}"\n'
            f'password_file = "{tmp_path / "pw"}"\n'
        )

    try:
        write("right")
        good = doctor(config)
        assert good.returncode == 0, good.stdout
        assert "ok    broker" in good.stdout and "accepts as node" in good.stdout
        assert "ok    model" in good.stdout and "checksums match" in good.stdout
        assert "cpu_temp" in good.stdout and "all good" in good.stdout

        write("wrong")
        (models / "tiny" / "tokenizer.json").write_text("{}")
        bad = doctor(config)
        assert bad.returncode == 1
        assert "FAIL  broker" in bad.stdout and "refused the login" in bad.stdout
        assert "FAIL  model" in bad.stdout and "tokenizer.json" in bad.stdout
        assert "2 problems to fix" in bad.stdout
    finally:
        broker.stop()
