"""deploy/install.sh: installs a venv, the unit, the configuration and a bundle; a second run changes nothing
it should not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from edged.store import pack

REPO = Path(__file__).parent.parent


def test_install_twice(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "src"
    shutil.copytree(tiny_models["int4"], models / "tiny")
    bundle = pack(models, "tiny", tmp_path / "tiny.edged.tar")
    root = tmp_path / "root"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "EDGED_PIP_ARGS": "--no-deps", "HOME": str(tmp_path)}

    def run() -> subprocess.CompletedProcess[str]:
        cmd = [str(REPO / "deploy/install.sh"), "--root", str(root), "--bundle", str(bundle), "--mosquitto"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    first = run()
    assert first.returncode == 0, first.stderr
    assert (root / "opt/edged/venv/bin/edged").is_file()
    assert (root / "etc/systemd/system/edged.service").read_text() == (REPO / "deploy/edged.service").read_text()
    assert (root / "etc/edged/edged.toml").read_text() == (REPO / "deploy/edged.toml").read_text()
    assert (root / "etc/edged/broker-password").stat().st_mode & 0o777 == 0o600
    assert (root / "etc/mosquitto/conf.d/edged.conf").is_file() and (root / "etc/mosquitto/edged.acl").is_file()
    assert (root / "var/lib/edged/models/tiny/model.onnx").is_file()
    help_text = subprocess.run([str(root / "opt/edged/venv/bin/edged"), "--help"], capture_output=True, text=True)
    assert "serve" in help_text.stdout

    (root / "etc/edged/edged.toml").write_text('node_id = "pi-kitchen"\n')
    second = run()
    assert second.returncode == 0, second.stderr
    assert (root / "etc/edged/edged.toml").read_text() == 'node_id = "pi-kitchen"\n', "config is never overwritten"
    assert "wrote" not in second.stdout
    assert (root / "var/lib/edged/models/tiny/model.onnx").is_file()
