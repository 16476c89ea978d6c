"""sd_notify over the unix datagram socket systemd names in $NOTIFY_SOCKET (no-op elsewhere)."""

from __future__ import annotations

import os
import socket


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
