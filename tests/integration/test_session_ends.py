"""How sessions end, with real clients: who ended each relayed session and how
(dwsproxy_sessions_ended_total{end} and `end=` in its log line), a backend that drops or
never answers during start-up (FATAL 08006, counted as backend_unavailable, never a bare EOF),
and a reload that stops trusting an open session's CA (it ends, as revocation does)."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Proxy, raw_connect, read_message, run_psql

from proxy.protocol import wire
from proxy.tools import certs
from proxy.tools.demo import TempPostgres


def plain(port: int, **extra: str) -> str:
    return (f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable "
            + " ".join(f"{k}={v}" for k, v in extra.items()))


def tls(port: int, pki: Path, **extra: str) -> str:
    return (f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require "
            + " ".join(f"{k}={v}" for k, v in extra.items()))


def ended(proxy: Proxy, end: str) -> float:
    return proxy.metric("dwsproxy_sessions_ended_total", end=end)


# -- who ended a relayed session ----------------------------------------------------------------
def test_a_client_that_quits_is_client_closed(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy()
    assert run_psql(plain(proxy.port), "SELECT 1").returncode == 0
    assert run_psql(tls(proxy.port, Path()), "SELECT 1").returncode == 0
    proxy.wait_metric("dwsproxy_sessions_ended_total", 2, end="client_closed")
    assert "end=client_closed" in proxy.wait_log("end=client_closed")
    assert ended(proxy, "backend_closed") == ended(proxy, "backend_reset") == 0


def test_pg_terminate_backend_is_backend_closed(start_proxy: Callable[..., Proxy],
                                               pg: TempPostgres) -> None:
    import psycopg

    proxy = start_proxy()
    conn = psycopg.connect(plain(proxy.port, application_name="to_terminate"))
    try:
        conn.execute("SELECT 1")
        pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               "WHERE application_name = 'to_terminate'")
        with pytest.raises(psycopg.OperationalError):  # its 57P01, then the close
            conn.execute("SELECT 1")
        proxy.wait_metric("dwsproxy_sessions_ended_total", 1, end="backend_closed")
        proxy.wait_log("end=backend_closed")
        assert ended(proxy, "client_closed") == 0
    finally:
        conn.close()


def test_a_client_reset_is_client_reset(start_proxy: Callable[..., Proxy], pki: Path) -> None:
    """A client whose connection is reset (a NAT or balancer dropping it): a raw TLS client
    that authenticated, then closes with SO_LINGER 0 (an RST, no close_notify, no FIN)."""
    proxy = start_proxy()
    ctx = ssl.create_default_context(cafile=str(pki / "cacert.pem"))
    ctx.check_hostname = False
    sock = raw_connect(proxy.port)
    sock.sendall(wire.build_request(wire.SSL_REQUEST_CODE))
    assert sock.recv(1) == b"S"
    conn = ctx.wrap_socket(sock)
    conn.sendall(wire.build_startup_message({"user": "postgres", "database": "postgres"}))
    while read_message(conn)[0] != b"Z":  # AuthenticationOk ... ReadyForQuery
        pass
    raw = socket.socket(fileno=conn.detach())
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    proxy.wait_metric("dwsproxy_sessions_ended_total", 1, end="client_reset")
    proxy.wait_log("end=client_reset")


def test_idle_timeout_and_shutdown_are_the_proxys_ends(start_proxy: Callable[..., Proxy]) -> None:
    import psycopg

    proxy = start_proxy(listen={"idle_timeout": 1.0, "shutdown_grace": 1.0})
    idle = psycopg.connect(plain(proxy.port))
    try:
        idle.execute("SELECT 1")
        proxy.wait_metric("dwsproxy_sessions_ended_total", 1, timeout=15, end="idle_timeout")
        proxy.wait_log("end=idle_timeout")
    finally:
        idle.close()
    busy = psycopg.connect(plain(proxy.port))
    try:
        busy.execute("SELECT 1")
        proxy.signal(signal.SIGTERM)  # the session outlives shutdown_grace: closed by it
        proxy.proc.wait(20)
        assert "end=shutdown" in proxy.log()
    finally:
        busy.close()


# -- a backend that drops the start-up ----------------------------------------------------------
class SilentBackend:
    """A TCP server on loopback that takes the StartupMessage and then closes without a byte
    (`answer=False`: holds it open without a byte), as a backend in a fast shutdown may."""

    def __init__(self, close: bool) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.close = close
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(65536)
            if self.close:
                conn.close()
            else:
                self.held.append(conn)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture(params=[True, False], ids=["closes", "never_answers"])
def silent_backend(request: pytest.FixtureRequest) -> Iterator[SilentBackend]:
    backend = SilentBackend(close=request.param)
    yield backend
    backend.stop()


def test_a_backend_that_drops_the_start_up_is_the_proxys_to_report(
        start_proxy: Callable[..., Proxy], silent_backend: SilentBackend) -> None:
    proxy = start_proxy(pg_port=silent_backend.port, listen={"startup_timeout": 2.0})
    t0 = time.monotonic()
    proc = run_psql(tls(proxy.port, Path()), "SELECT 1")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 10
    assert "EOF detected" not in proc.stderr and "SQLSTATE 08006" in proc.stderr, proc.stderr
    why = ("closed the connection before answering the start-up" if silent_backend.close
           else "did not answer the start-up within 2s")
    assert f"the database server at 127.0.0.1:{silent_backend.port} {why}" in proc.stderr
    proxy.wait_metric("dwsproxy_connections_rejected_total", 1, reason="backend_unavailable")
    assert sum(v for (name, _), v in proxy.metrics().items()
               if name == "dwsproxy_connections_total") == 0
    proxy.wait_log("outcome=backend_unavailable")


# -- a CA no longer trusted ---------------------------------------------------------------------
def test_a_reload_that_distrusts_a_ca_ends_the_sessions_it_authenticated(
        start_proxy: Callable[..., Proxy], tmp_path: Path, pki: Path) -> None:
    import psycopg

    kept_ca, dropped_ca = certs.make_ca("Kept CA"), certs.make_ca("Dropped CA")
    for name, ca in (("kept", kept_ca), ("dropped", dropped_ca)):
        cert, key = certs.issue(ca, "postgres")
        certs.write_certs(tmp_path / f"{name}.crt", cert)
        certs.write_key(tmp_path / f"{name}.key", key)
    bundle = tmp_path / "cas.pem"
    certs.write_certs(bundle, kept_ca[0], dropped_ca[0])
    proxy = start_proxy(tls={"ssl_ca_file": str(bundle), "clientcert": "verify-ca"})

    def connect(name: str) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(tls(proxy.port, pki, sslcert=str(tmp_path / f"{name}.crt"),
                                   sslkey=str(tmp_path / f"{name}.key")))

    doomed, kept = connect("dropped"), connect("kept")
    try:
        doomed.execute("SELECT 1")
        kept.execute("SELECT 1")
        certs.write_certs(bundle, kept_ca[0])
        proxy.signal(signal.SIGHUP)
        proxy.wait_metric("dwsproxy_sessions_terminated_total", 1, reason="client_cert_invalid")
        with pytest.raises(psycopg.OperationalError) as info:
            doomed.execute("SELECT 1")
        assert "client certificate no longer trusted" in str(info.value)
        assert kept.execute("SELECT 2").fetchone() == (2,)
        proxy.wait_metric("dwsproxy_sessions_ended_total", 1, end="terminated")
    finally:
        doomed.close()
        kept.close()
