"""systemd adapters: sd_notify over $NOTIFY_SOCKET, and logging to journald with structured fields.

Both speak systemd's documented datagram protocols directly, so no compiled binding (systemd-python has no
wheel and needs a compiler on the board) is needed.
"""

from __future__ import annotations

import logging
import os
import socket
import struct

# How often an idle thread (the inbox, the worker) moves its heartbeat. The watchdog takes a heartbeat as
# stale only past WatchdogSec plus this, so an idle node keeps being fed under any WatchdogSec.
IDLE_BEAT_S = 1.0


def notify(*lines: str) -> bool:
    """Sends ``READY=1``, ``STATUS=...`` and the like; False when not run by systemd or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Extra fields edged attaches to log records (``extra={...}``), and their journal field names.
_FIELDS = {"request_id": "REQUEST_ID", "code": "ERROR_CODE", "node": "NODE"}
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalHandler(logging.Handler):
    """Structured records over journald's native protocol (a datagram of FIELD=value lines)."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET, node: str = "") -> None:
        super().__init__()
        self._path = socket_path
        self._node = node
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        fields = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
            "SYSLOG_IDENTIFIER": "edged",
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        if self._node:
            fields["NODE"] = self._node
        for attr, name in _FIELDS.items():
            value = getattr(record, attr, None)
            if value is not None:
                fields[name] = str(value)
        try:
            self._sock.sendto(_encode(fields), self._path)
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def _encode(fields: dict[str, str]) -> bytes:
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:  # multi-line values: the name, a newline, a 64-bit little-endian length, the data
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def setup_logging(env: dict[str, str], node: str = "", level: int = logging.INFO) -> None:
    """journald with structured fields when systemd runs us (JOURNAL_STREAM set), else plain stderr.

    Prompts, answers and secrets are never logged at info level: only ids, codes and counts.
    """
    root = logging.getLogger()
    root.setLevel(level)
    for old in list(root.handlers):
        root.removeHandler(old)
    socket_path = env.get("EDGED_JOURNAL_SOCKET", JOURNAL_SOCKET)
    if env.get("JOURNAL_STREAM") and os.path.exists(socket_path):
        handler: logging.Handler = JournalHandler(socket_path, node)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
