"""A private Mosquitto on 127.0.0.1, started and supervised when the configuration names no broker."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")


class BrokerUnavailable(RuntimeError):
    pass


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path=os.pathsep.join(_SEARCH))


class LocalBroker:
    """Mosquitto bound to loopback only, TCP_NODELAY and persistence on, its files under ``state_dir``."""

    def __init__(self, state_dir: Path, port: int, *, autosave_s: int = 10, ws_port: int = 0) -> None:
        self.dir = state_dir / "broker"
        self.port = port
        self.ws_port = ws_port  # MQTT over WebSockets on 127.0.0.1 for the kiosk page; 0: none
        self._autosave_s = autosave_s  # how much a SIGKILLed broker may lose of what it was given
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerUnavailable(
                "no broker configured and mosquitto is not installed: `apt install mosquitto`, "
                "or set broker.url / --broker to an existing broker"
            )
        if _listening(self.port):
            raise BrokerUnavailable(
                f"port {self.port} on 127.0.0.1 is taken (another broker?): set broker.url to "
                f"mqtt://127.0.0.1:{self.port} to use it, or broker.local_port to another port"
            )
        if self.ws_port and _listening(self.ws_port):
            raise BrokerUnavailable(
                f"port {self.ws_port} on 127.0.0.1 is taken: set broker.local_ws_port to another port (0: none)"
            )
        websockets = f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\n" if self.ws_port else ""
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            "# Written by edged for its private broker; edits are overwritten at start.\n"
            f"listener {self.port} 127.0.0.1\n"
            f"{websockets}"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            f"autosave_interval {self._autosave_s}\n"
            f"log_dest file {self.dir}/mosquitto.log\n"
        )
        if os.geteuid() == 0:  # mosquitto drops root for user "mosquitto", which must own its files
            try:
                user = pwd.getpwnam("mosquitto")
                for path in (self.dir, *self.dir.iterdir()):
                    os.chown(path, user.pw_uid, user.pw_gid)
            except KeyError:
                pass
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while not _listening(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise BrokerUnavailable(f"mosquitto did not start; see {self.dir}/mosquitto.log")
            time.sleep(0.02)
        log.info("private mosquitto on 127.0.0.1:%d (pid %d)", self.port, self._proc.pid)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: mosquitto saves its persistence file; SIGKILL (the soak's fault) loses what came since the
        last autosave."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
