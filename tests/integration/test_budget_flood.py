"""The negotiation budget under a flood from several addresses (issue 21 item 4): three
loopback addresses (127.0.1.1-3, all loopback on Linux) open idle connections as fast as they
can, each under the per-address cap, while real psql clients from 127.0.0.1 connect with TLS.
Before: "drop the oldest" evicted every slower real client (0 of 10 got through at
max_connections 100 and 400); now the source holding the most slots pays for each new one."""

from __future__ import annotations

import errno
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PSQL, Proxy, clean_env

SOURCES = ("127.0.1.1", "127.0.1.2", "127.0.1.3")
ATTEMPTS = 10


class Flooder(threading.Thread):
    """Opens connections from `source` without a byte sent, as fast as it can, keeping up to
    `hold` of them; the ones the proxy closed are replaced."""

    def __init__(self, port: int, source: str, hold: int) -> None:
        super().__init__(daemon=True)
        self.port, self.source, self.hold = port, source, hold
        self.stop = threading.Event()
        self.opened = 0
        self.failures: list[str] = []

    def run(self) -> None:
        open_: list[socket.socket] = []
        try:
            while not self.stop.is_set():
                sock = socket.socket()
                sock.bind((self.source, 0))
                try:
                    sock.connect(("127.0.0.1", self.port))
                except OSError as exc:
                    sock.close()
                    if exc.errno in (errno.EADDRNOTAVAIL, errno.ECONNREFUSED):
                        time.sleep(0.001)
                        continue
                    raise
                self.opened += 1
                open_.append(sock)
                if len(open_) >= self.hold:
                    # the closed ones (evicted) are readable: EOF; keep the rest
                    readable, _, _ = select.select(open_, [], [], 0)
                    for dead in readable:
                        dead.close()
                        open_.remove(dead)
                    if len(open_) >= self.hold:
                        open_.pop(0).close()
        except Exception as exc:
            self.failures.append(repr(exc))
        finally:
            for sock in open_:
                sock.close()


def _psql(proxy: Proxy, pki: Path) -> bool:
    assert PSQL is not None
    out = subprocess.run(
        [PSQL, f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
               f"sslmode=verify-ca sslrootcert={pki / 'cacert.pem'} connect_timeout=10",
         "-X", "-At", "-c", "SELECT 1"],
        capture_output=True, text=True, env=clean_env(), timeout=30)
    return out.returncode == 0 and out.stdout.strip() == "1"


@pytest.mark.parametrize("max_connections", [100, 400])
def test_real_clients_get_through_a_flood_from_three_addresses(
        start_proxy: Callable[..., Proxy], pki: Path, max_connections: int) -> None:
    proxy = start_proxy(listen={"max_connections": max_connections, "startup_timeout": 10.0})
    negotiating = max(16, max_connections // 4)
    # each address stays under the per-address cap (half the budget); together they are over
    flooders = [Flooder(proxy.port, source, negotiating // 2 - 1) for source in SOURCES]
    for flooder in flooders:
        flooder.start()
    deadline = time.monotonic() + 10
    while proxy.metric("dwsproxy_connections_rejected_total", reason="negotiation_budget") \
            < 3 * negotiating and time.monotonic() < deadline:
        time.sleep(0.05)
    ok = 0
    try:
        for _ in range(ATTEMPTS):
            ok += _psql(proxy, pki)
    finally:
        for flooder in flooders:
            flooder.stop.set()
        for flooder in flooders:
            flooder.join(10)
    evicted = proxy.metric("dwsproxy_connections_rejected_total", reason="negotiation_budget")
    print(f"max_connections {max_connections}: {ok}/{ATTEMPTS} psql clients got through; "
          f"flood connections opened {[f.opened for f in flooders]}, evicted {evicted:.0f}")
    assert not any(f.failures for f in flooders), [f.failures for f in flooders]
    assert evicted >= 3 * negotiating, "the flood never filled the budget: not a test"
    assert ok == ATTEMPTS
