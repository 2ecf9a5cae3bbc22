"""TLS post-handshake floods against the real proxy: clients that send TLS 1.3
KeyUpdate(update_requested) records (or TLS 1.2 renegotiation attempts) and never read.

Each KeyUpdate makes OpenSSL derive two keys and queue a reply; unchecked, two such clients
queued replies without bound and held the event loop for tens of milliseconds per read, so real
clients waited seconds and /healthz turned 503. The proxy closes a client after TLS_NOISE_LIMIT
bytes of such records (relay.py, rule 6) and counts it as rejected{reason="tls_flood"}, before
or after the StartupMessage. The flooders are hostile socket clients (tests/tls_records.py
writes their records); the client that must still be served is psql.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PSQL, Proxy, clean_env, raw_connect
from tls_records import HandmadeClient, Tls12Writer, Tls13Writer, ssl_request

from proxy.protocol import wire

FLOOD_SECONDS = 10.0
BATCH = 256  # records made and sent at a time


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy(tls={"require_ssl": True})


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Flooder(threading.Thread):
    """Connects, makes the handshake (and with `startup`, logs in and reads up to
    ReadyForQuery), then sends KeyUpdates (or, `tls12`, renegotiation attempts) and reads
    nothing, until the proxy closes the connection; then again, until stopped."""

    def __init__(self, port: int, *, startup: bool = False, tls12: bool = False) -> None:
        super().__init__(daemon=True)
        self.port, self.startup, self.tls12 = port, startup, tls12
        self.stop = threading.Event()
        self.closed_by_proxy = 0  # connections the proxy cut off
        self.sent = 0  # flood bytes sent
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._one()
            except Exception as exc:  # recorded for the test to show
                self.failures.append(repr(exc))
                return

    def _one(self) -> None:
        sock = raw_connect(self.port, timeout=10)
        client = HandmadeClient(tls12=self.tls12)
        try:
            ssl_request(sock)
            client.connect(sock)
            records_sent = 0
            if self.startup:
                client.sslobj.write(wire.build_startup_message({"user": "postgres",
                                                                "database": "postgres"}))
                sock.sendall(client.outgoing())
                records_sent = 1
                seen = b""
                while not seen.endswith(b"Z\x00\x00\x00\x05I"):
                    data = client.read(sock)
                    assert data, "closed before ReadyForQuery"
                    seen += data
            writer = client.writer(records_sent)
            while not self.stop.is_set():
                batch = b"".join(self._record(writer) for _ in range(BATCH))
                try:
                    sock.sendall(batch)
                except (ConnectionResetError, BrokenPipeError):
                    self.closed_by_proxy += 1
                    return
                except TimeoutError:
                    raise AssertionError("the proxy neither read nor closed for 10 s") from None
                self.sent += len(batch)
        finally:
            sock.close()
            client.close()

    def _record(self, writer: Tls13Writer | Tls12Writer) -> bytes:
        if isinstance(writer, Tls13Writer):
            return writer.key_update()
        return writer.renegotiation()


def flood_rejections(proxy: Proxy, before: float, at_least: int) -> float:
    """rejected{reason=tls_flood} since `before`, once it reached `at_least` (or after 10 s:
    a session is counted when it ends, just after its connection)."""
    deadline = time.monotonic() + 10
    while True:
        counted = proxy.metric("dwsproxy_connections_rejected_total",
                               reason="tls_flood") - before
        if counted >= at_least or time.monotonic() > deadline:
            return counted
        time.sleep(0.05)


def psql_select_1(proxy: Proxy, pki: Path) -> float:
    """Seconds for a real psql to connect (verify-full) and run SELECT 1."""
    assert PSQL is not None
    t0 = time.monotonic()
    out = subprocess.run(
        [PSQL, f"host=localhost port={proxy.port} user=postgres dbname=postgres "
               f"sslmode=verify-full sslrootcert={pki / 'cacert.pem'}",
         "-X", "-At", "-c", "SELECT 1"],
        capture_output=True, text=True, env=clean_env(), timeout=30)
    took = time.monotonic() - t0
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    return took


def test_two_key_update_flooders_for_10_s(proxy: Proxy, pki: Path) -> None:
    assert PSQL is not None, "psql is needed (make test installs postgresql-client)"
    pid = proxy.proc.pid
    before_count = proxy.metric("dwsproxy_connections_rejected_total", reason="tls_flood")
    psql_select_1(proxy, pki)  # warm: the first connection pays for imports
    rss_before = rss_kb(pid)
    flooders = [Flooder(proxy.port), Flooder(proxy.port, startup=True)]
    for flooder in flooders:
        flooder.start()
    psql_times: list[float] = []
    health: list[int] = []
    rss_max = rss_before
    deadline = time.monotonic() + FLOOD_SECONDS
    while time.monotonic() < deadline:
        psql_times.append(psql_select_1(proxy, pki))
        health.append(proxy.http("/healthz")[0])
        rss_max = max(rss_max, rss_kb(pid))
    for flooder in flooders:
        flooder.stop.set()
    for flooder in flooders:
        flooder.join(30)
    assert not any(f.failures for f in flooders), [f.failures for f in flooders]
    closed = sum(f.closed_by_proxy for f in flooders)
    assert all(f.closed_by_proxy >= 3 for f in flooders), [f.closed_by_proxy for f in flooders]
    # Every connection a flooder saw cut off is counted; the one it was on when told to stop
    # may have been cut off unseen, so up to one more per flooder.
    counted = flood_rejections(proxy, before_count, closed)
    assert closed <= counted <= closed + len(flooders), (closed, counted)
    print(f"flood: closed {[f.closed_by_proxy for f in flooders]}, "
          f"sent {[f.sent for f in flooders]}; psql {sorted(round(t, 3) for t in psql_times)}; "
          f"RSS {rss_before} -> {rss_max} kB")
    assert (rss_max - rss_before) < 20 * 1024, (rss_before, rss_max)
    assert max(psql_times) < 1.5, psql_times
    assert set(health) == {200}, health
    log = proxy.log()
    assert "outcome=tls_flood" in log or '"outcome": "tls_flood"' in log


def test_a_tls12_renegotiation_flooder_is_closed_and_counted(proxy: Proxy) -> None:
    before = proxy.metric("dwsproxy_connections_rejected_total", reason="tls_flood")
    flooder = Flooder(proxy.port, tls12=True)
    flooder.start()
    deadline = time.monotonic() + 20
    while flooder.closed_by_proxy < 3 and time.monotonic() < deadline and not flooder.failures:
        flooder.stop.wait(0.05)
    flooder.stop.set()
    flooder.join(30)
    assert not flooder.failures, flooder.failures
    assert flooder.closed_by_proxy >= 3
    counted = flood_rejections(proxy, before, flooder.closed_by_proxy)
    assert flooder.closed_by_proxy <= counted <= flooder.closed_by_proxy + 1


def test_a_client_that_sends_a_few_key_updates_is_served(proxy: Proxy) -> None:
    # Not every KeyUpdate is a flood: a few, with queries in between, are answered.
    before = proxy.metric("dwsproxy_connections_rejected_total", reason="tls_flood")
    sock = raw_connect(proxy.port)
    client = HandmadeClient()
    try:
        ssl_request(sock)
        client.connect(sock)
        writer = client.writer()
        startup = wire.build_startup_message({"user": "postgres", "database": "postgres"})
        query = b"Q" + (len(b"SELECT 42\0") + 4).to_bytes(4, "big") + b"SELECT 42\0"
        sock.sendall(writer.key_update() + writer.application_data(startup)
                     + b"".join(writer.key_update() for _ in range(20))
                     + writer.application_data(query))
        # The SSLObject still reads: the proxy's KeyUpdate(update_not_requested) replies
        # move its receiving key on, as any TLS 1.3 client's.
        seen = b""
        while b"\x00\x0242" not in seen or not seen.endswith(b"Z\x00\x00\x00\x05I"):
            data = client.read(sock)
            assert data, f"closed after {seen[-200:]!r}"
            seen += data
    finally:
        sock.close()
        client.close()
    assert proxy.metric("dwsproxy_connections_rejected_total", reason="tls_flood") == before
