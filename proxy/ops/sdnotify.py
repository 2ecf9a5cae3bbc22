"""systemd's readiness protocol (sd_notify(3)), for a unit with `Type=notify`.

Owns: sending one state datagram (`READY=1`, `RELOADING=1`, `STOPPING=1`, ...) to the socket named
by $NOTIFY_SOCKET. Must not fail the proxy: without the variable (not run by systemd) it does
nothing, and a socket that cannot be reached is logged once per call, never raised.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("dwsproxy.server")


def notify(state: str) -> bool:
    """Send `state` (newline-separated VAR=value lines) to $NOTIFY_SOCKET; True when sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] == "@":  # the abstract namespace: a leading NUL byte instead of '@'
        address = "\0" + address[1:]
    elif address[0] != "/":
        # systemd 253+ may also name an AF_VSOCK address ("vsock:CID:PORT"): not for a service
        log.warning("NOTIFY_SOCKET %r is not a unix socket: %s not sent", address, state)
        return False
    if state.startswith("RELOADING=1") and "MONOTONIC_USEC=" not in state:
        # systemd 253's Type=notify-reload wants the reload's start time beside RELOADING=1.
        state += f"\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True
