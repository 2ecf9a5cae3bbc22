"""Descriptors and the negotiation budget against the real proxy (server.py): under a small
RLIMIT_NOFILE and a flood of idle sockets a real psql is still served, at once."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Proxy, raw_connect, run_psql

from proxy.protocol import wire

PRLIMIT = shutil.which("prlimit")
IDLE = 300


def limits_line(proxy: Proxy) -> re.Match[str]:
    text = proxy.wait_log("descriptor limits")
    found = re.search(r"descriptor limits(?: \(soft limit raised from (\d+)\))?: RLIMIT_NOFILE "
                      r"(\d+), .* (\d+) relayed sessions .* (\d+) connections negotiating "
                      r"\((\d+) per source address\)", text)
    assert found, text
    return found


def test_psql_is_served_under_nofile_256_with_300_idle_sockets(
        start_proxy: Callable[..., Proxy], pki: Path) -> None:
    assert PRLIMIT is not None, "prlimit (util-linux) missing: .ci/system-deps installs it"
    # startup_timeout far above the test: the idle sockets must not be what frees the way
    proxy = start_proxy(wrap=[PRLIMIT, "--nofile=256"], listen={"startup_timeout": 60.0},
                        args=["--log-level", "debug"])
    found = limits_line(proxy)
    # The fixture's port probe, still in the budget, would be the oldest connection: let it end.
    proxy.wait_log("outcome=empty")
    assert found.group(2) == "256" and found.group(1) is None  # soft = hard: nothing to raise
    relayed, negotiating, per_source = (int(found.group(i)) for i in (3, 4, 5))
    assert 2 * (relayed + negotiating) < 256
    assert "listen.max_connections=10000 cannot be reached" in proxy.log()
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE):
            idle.append(raw_connect(proxy.port))
        t0 = time.monotonic()
        proc = run_psql(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                        f"sslmode=verify-full sslrootcert={pki / 'cacert.pem'} "
                        "connect_timeout=10", "SELECT 'served'")
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0 and proc.stdout.strip() == "served", proc.stderr
        assert elapsed < 5, f"psql waited {elapsed:.1f}s behind the idle sockets"
        # Every idle socket from this address but the newest per_source - 1 (psql took the
        # last place) was dropped for a newer one, oldest first, and counted.
        proxy.wait_metric("dwsproxy_connections_rejected_total", IDLE - (per_source - 1),
                          reason="negotiation_budget")
        for sock in idle[:IDLE - (per_source - 1)]:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed by the proxy, not left open
        assert "Too many open files" not in proxy.log()
        assert "accept failed" not in proxy.log()
    finally:
        for sock in idle:
            sock.close()


def test_soft_nofile_is_raised_to_the_hard_limit(start_proxy: Callable[..., Proxy]) -> None:
    assert PRLIMIT is not None, "prlimit (util-linux) missing: .ci/system-deps installs it"
    proxy = start_proxy(wrap=[PRLIMIT, "--nofile=256:4096"], listen={"max_connections": 100})
    found = limits_line(proxy)
    assert (found.group(1), found.group(2)) == ("256", "4096")
    assert int(found.group(3)) == 100  # max_connections is reachable now: no warning
    assert "cannot be reached" not in proxy.log()
    status = (Path("/proc") / str(proxy.proc.pid) / "limits").read_text()
    assert re.search(r"Max open files\s+4096\s+4096", status), status


def test_a_stalled_tls_handshake_is_dropped_for_a_new_client(start_proxy: Callable[..., Proxy],
                                                             pki: Path) -> None:
    """The oldest negotiating connection may already have a transport (here: mid-handshake)."""
    proxy = start_proxy(listen={"max_connections": 8, "startup_timeout": 60.0},
                        args=["--log-level", "debug"])
    per_source = int(limits_line(proxy).group(5))
    proxy.wait_log("outcome=empty")  # the fixture's port probe has ended
    stalled: list[socket.socket] = []
    try:
        for _ in range(per_source):
            sock = raw_connect(proxy.port)
            sock.sendall(wire.build_request(wire.SSL_REQUEST_CODE))
            assert sock.recv(1) == b"S"
            sock.sendall(b"\x16\x03\x01\x02\x00")  # a record header; its 512 bytes never come
            stalled.append(sock)
        proc = run_psql(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                        f"sslmode=require connect_timeout=10", "SELECT 'served'")
        assert proc.returncode == 0 and proc.stdout.strip() == "served", proc.stderr
        proxy.wait_metric("dwsproxy_connections_rejected_total", 1, reason="negotiation_budget")
        with contextlib.suppress(ConnectionResetError):  # aborted: an RST is as good a close
            assert stalled[0].recv(1) == b""
        assert "outcome=negotiation_budget" in proxy.log()
    finally:
        for sock in stalled:
            sock.close()
