"""The negotiation budget under a flood from several addresses (issue 21 item 4): three
loopback addresses (127.0.1.1-3, all loopback on Linux) open idle connections as fast as they
can, each under the per-address cap, while real psql clients from 127.0.0.1 connect with TLS.
Before: "drop the oldest" evicted every slower real client (0 of 10 got through at
max_connections 100 and 400); now the source holding the most slots pays for each new one."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PSQL, Proxy, clean_env

SOURCES = ("127.0.1.1", "127.0.1.2", "127.0.1.3")
ATTEMPTS = 10


FLOOD_SCRIPT = r"""
import errno, socket, sys, time
port, source, hold, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
open_, opened, end = [], 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(64):  # non-blocking connects in batches: thousands a second
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        if sock.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
            sock.close()
            continue
        open_.append(sock)
        opened += 1
    while len(open_) > hold:  # the oldest go first: the address stays under its cap
        open_.pop(0).close()
print(opened)
"""


def _flood(port: int, source: str, hold: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", FLOOD_SCRIPT, str(port), source, str(hold),
                             str(seconds)], stdout=subprocess.PIPE, text=True)


def _psql(proxy: Proxy, pki: Path) -> str:
    """"" when psql got through, else its error."""
    assert PSQL is not None
    out = subprocess.run(
        [PSQL, f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
               f"sslmode=verify-ca sslrootcert={pki / 'cacert.pem'} connect_timeout=10",
         "-X", "-At", "-c", "SELECT 1"],
        capture_output=True, text=True, env=clean_env(), timeout=30)
    return "" if out.returncode == 0 and out.stdout.strip() == "1" else out.stderr.strip()


@pytest.mark.parametrize("max_connections", [100, 400])
def test_real_clients_get_through_a_flood_from_three_addresses(
        start_proxy: Callable[..., Proxy], pki: Path, max_connections: int) -> None:
    proxy = start_proxy(listen={"max_connections": max_connections, "startup_timeout": 10.0})
    negotiating = max(16, max_connections // 4)
    # each address stays under the per-address cap (half the budget); together they are over
    flooders = [_flood(proxy.port, source, negotiating // 2 - 1, 60) for source in SOURCES]
    errors: list[str] = []
    try:
        deadline = time.monotonic() + 10
        while proxy.metric("dwsproxy_connections_rejected_total", reason="negotiation_budget") \
                < 3 * negotiating and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(ATTEMPTS):
            errors.append(_psql(proxy, pki))
    finally:
        for flooder in flooders:
            flooder.kill()
            flooder.wait(10)
    ok = errors.count("")
    evicted = proxy.metric("dwsproxy_connections_rejected_total", reason="negotiation_budget")
    print(f"max_connections {max_connections}: {ok}/{ATTEMPTS} psql clients got through; "
          f"budget evictions {evicted:.0f}")
    assert evicted >= 3 * negotiating, "the flood never filled the budget: not a test"
    assert ok == ATTEMPTS, [e for e in errors if e]
