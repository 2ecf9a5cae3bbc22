"""How sessions end, with real clients: who ended each relayed session and how
(dwsproxy_sessions_ended_total{end} and `end=` in its log line), a backend that drops or
never answers during start-up (FATAL 08006, counted as backend_unavailable, never a bare EOF),
and a reload that stops trusting an open session's CA (it ends, as revocation does)."""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Proxy, error_fields, raw_connect, read_message, run_psql
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

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
        deadline = time.monotonic() + 10
        while pg.sql("SELECT count(*) FROM pg_stat_activity "
                     "WHERE application_name = 'to_terminate'") != "0":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        # Nothing sent after the backend's end: a query sent into its closed socket could
        # draw an RST, and the end would be (rightly) backend_reset.
        conn.close()
    proxy.wait_metric("dwsproxy_sessions_ended_total", 1, end="backend_closed")
    proxy.wait_log("end=backend_closed")
    assert ended(proxy, "client_closed") == ended(proxy, "client_reset") == 0


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


# -- what a hostile review of the above found ---------------------------------------------------
def forged_ca(copied: tuple[Any, Any], issuer: x509.Name, *, version2: bool = False) -> bytes:
    """A CA certificate that copies `copied`'s subject and key identifier, claims `issuer`, and
    is signed by a key of its own (PEM). OpenSSL prefers the trusted store at the handshake,
    so it is ignored there; once `copied` is no longer trusted it is what the path is built
    through. `version2`: X.509 v2, which OpenSSL reads and `cryptography` refuses to."""
    key = certs.new_key()
    now = dt.datetime.now(dt.UTC)
    skid = copied[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder().subject_name(copied[0].subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(skid, critical=False)
            .sign(key, hashes.SHA256()))
    der = cert.public_bytes(Encoding.DER)
    if version2:
        der = der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x01", 1)
    return ssl.DER_cert_to_PEM_cert(der).encode()


class TwoCas:
    """A kept CA and one a reload drops from ssl_ca_file; clients of each, and an attacker's
    client of the dropped CA whose chain carries a forged issuer."""

    def __init__(self, folder: Path, forge: Callable[[Any, Any], bytes]) -> None:
        self.dir = folder
        self.kept, self.dropped = certs.make_ca("Kept CA"), certs.make_ca("Dropped CA")
        for name, ca in (("kept", self.kept), ("dropped", self.dropped), ("evil", self.dropped)):
            cert, key = certs.issue(ca, "postgres")
            certs.write_certs(folder / f"{name}.crt", cert)
            certs.write_key(folder / f"{name}.key", key)
        with open(folder / "evil.crt", "ab") as fh:
            fh.write(forge(self.kept, self.dropped))
        self.bundle = folder / "cas.pem"
        certs.write_certs(self.bundle, self.kept[0], self.dropped[0])

    def connect(self, proxy: Proxy, name: str) -> Any:
        import psycopg

        return psycopg.connect(tls(proxy.port, Path(), sslcert=str(self.dir / f"{name}.crt"),
                                   sslkey=str(self.dir / f"{name}.key")))

    def drop(self) -> None:
        certs.write_certs(self.bundle, self.kept[0])


def alive(conn: Any) -> bool:
    import psycopg

    try:
        conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def test_a_forged_issuer_does_not_keep_a_session_past_its_cas_removal(
        start_proxy: Callable[..., Proxy], tmp_path: Path) -> None:
    cas = TwoCas(tmp_path, lambda kept, dropped: forged_ca(dropped, kept[0].subject))
    proxy = start_proxy(tls={"ssl_ca_file": str(cas.bundle), "clientcert": "verify-ca"})
    honest, evil, kept = (cas.connect(proxy, n) for n in ("dropped", "evil", "kept"))
    try:
        assert all(alive(c) for c in (honest, evil, kept))
        cas.drop()
        proxy.signal(signal.SIGHUP)
        proxy.wait_metric("dwsproxy_sessions_terminated_total", 2, reason="client_cert_invalid")
        assert not alive(honest) and not alive(evil) and alive(kept)
    finally:
        for conn in (honest, evil, kept):
            conn.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unreadable_forged_certificate_does_not_stop_a_reload(
        start_proxy: Callable[..., Proxy], tmp_path: Path, workers: int) -> None:
    """A chain certificate `cryptography` cannot read (X.509 v2) made the recheck raise: the
    reload stopped half-way in the main process (later sessions unchecked, workers never
    told) and killed the worker holding it, with its bystanders."""
    cas = TwoCas(tmp_path, lambda kept, dropped: forged_ca(dropped, dropped[0].subject,
                                                          version2=True))
    proxy = start_proxy(tls={"ssl_ca_file": str(cas.bundle), "clientcert": "verify-ca"},
                        listen={"workers": workers})
    if workers > 1:
        proxy.wait_log("worker 1 started")
    doomed = [cas.connect(proxy, n) for n in ("evil", "dropped") * 3]
    kept = [cas.connect(proxy, "kept") for _ in range(4)]
    try:
        assert all(alive(c) for c in doomed + kept)
        cas.drop()
        proxy.signal(signal.SIGHUP)
        proxy.wait_metric("dwsproxy_sessions_terminated_total", 6, reason="client_cert_invalid")
        assert [alive(c) for c in doomed] == [False] * 6
        assert all(alive(c) for c in kept)
        assert proxy.metric("dwsproxy_config_reloads_total", result="success") == 1
        assert "exited with" not in proxy.log()  # no worker died for it
        for _ in range(4):  # no process still trusts the dropped CA
            with pytest.raises(Exception):  # noqa: B017 - psycopg's OperationalError
                cas.connect(proxy, "dropped").execute("SELECT 1")
    finally:
        for conn in doomed + kept:
            conn.close()


class SlowForwarder:
    """Forwards to the real database after a delay: a backend (or a pooler waiting for a
    server connection) slow to answer the StartupMessage."""

    def __init__(self, upstream: int, delay: float) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.upstream, self.delay = upstream, delay
        self.started = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        # The session's connection, not the health check's: it carries a StartupMessage,
        # which the proxy now sends before the backend answered (peeked, left to pass on).
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            if b"user\0postgres" in conn.recv(65536, socket.MSG_PEEK):
                self.started.set()
        conn.settimeout(None)
        time.sleep(self.delay)
        up = socket.create_connection(("127.0.0.1", self.upstream))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump, args=(conn, up), daemon=True).start()
        pump(up, conn)


def test_a_pipelined_query_never_runs_for_a_session_refused_at_link(
        start_proxy: Callable[..., Proxy], pg: TempPostgres, tmp_path: Path) -> None:
    """A client pipelines a query after its StartupMessage; a revoking reload lands while the
    backend is slow to answer. The client is refused at link and its query never reaches the
    database (it used to be sent with the StartupMessage, before the last check)."""
    ca = certs.make_ca("Window CA")
    cert, key = certs.issue(ca, "postgres")
    certs.write_certs(tmp_path / "ca.pem", ca[0])
    certs.write_certs(tmp_path / "c.crt", cert)
    certs.write_key(tmp_path / "c.key", key)
    crl = tmp_path / "crl.pem"
    certs.write_crl(crl, certs.make_crl(ca, []))
    forwarder = SlowForwarder(pg.port, 2.0)
    proxy = start_proxy(pg_port=forwarder.port, tls={
        "ssl_ca_file": str(tmp_path / "ca.pem"), "ssl_crl_file": str(crl),
        "clientcert": "verify-ca"})
    pg.sql("DROP TABLE IF EXISTS pipelined_past_refusal")
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(tmp_path / "c.crt", tmp_path / "c.key")
    sock = raw_connect(proxy.port, timeout=10)
    sock.sendall(wire.build_request(wire.SSL_REQUEST_CODE))
    assert sock.recv(1) == b"S"
    with ctx.wrap_socket(sock) as conn:
        query = b"CREATE TABLE pipelined_past_refusal(x int)\0"
        conn.sendall(wire.build_startup_message({"user": "postgres", "database": "postgres"})
                     + b"Q" + struct.pack("!i", len(query) + 4) + query)
        assert forwarder.started.wait(10)  # allowed: the proxy now waits for the backend
        certs.write_crl(crl, certs.make_crl(ca, [cert.serial_number]))
        proxy.signal(signal.SIGHUP)
        fields = error_fields(*read_message(conn))
    assert fields["C"] == "28000" and "certificate revoked" in fields["M"], fields
    time.sleep(2.5)  # what the forwarder would pass on arrives after its delay
    assert pg.sql("SELECT to_regclass('pipelined_past_refusal') IS NULL") == "t"
