"""The start-up protocol against the real proxy and a real PostgreSQL: CVE-2021-23214, malformed
input, TLS versions and suites, direct TLS, GSSENCRequest, CancelRequest, and the relay."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    REPO,
    Proxy,
    error_fields,
    raw_connect,
    read_message,
    read_until_close,
    ssl_request_handshake,
    tls_client_context,
)

from proxy.protocol import wire
from proxy.tools.demo import TempPostgres


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy(tls={"require_ssl": True}, listen={"startup_timeout": 2.0})


def psycopg_ok(port: int, pki: Path, **extra: str) -> bool:
    import psycopg

    params = " ".join(f"{k}={v}" for k, v in extra.items())
    with psycopg.connect(f"host=localhost port={port} user=postgres dbname=postgres "
                         f"sslmode=verify-full sslrootcert={pki / 'cacert.pem'} {params}") as conn:
        return conn.execute("SELECT 42").fetchone() == (42,) and conn.pgconn.ssl_in_use


def startup_over(sock: socket.socket | ssl.SSLSocket, user: str = "postgres") -> None:
    """Send a StartupMessage and read until ReadyForQuery (trust auth behind)."""
    sock.sendall(wire.build_startup_message({"user": user, "database": "postgres"}))
    while True:
        kind, body = read_message(sock)
        if kind == b"E":
            raise AssertionError(error_fields(kind, body))
        if kind == b"Z":
            return


def test_cve_2021_23214_ssl_request_and_startup_in_one_segment(proxy: Proxy, pg: TempPostgres,
                                                               pki: Path) -> None:
    before = proxy.metric("dwsproxy_connections_rejected_total", reason="bad_startup")
    sock = raw_connect(proxy.port)
    sock.sendall(wire.build_request(wire.SSL_REQUEST_CODE)
                 + wire.build_startup_message({"user": "cve_probe", "database": "postgres"}))
    reply = read_until_close(sock)
    sock.close()
    fields = error_fields(reply[:1], reply[5:])
    assert fields["C"] == "08P01" and "unencrypted data after SSL request" in fields["M"]
    proxy.wait_metric("dwsproxy_connections_rejected_total", before + 1, reason="bad_startup")
    # The backend never saw a session for that user (PostgreSQL logs every authorized one).
    assert psycopg_ok(proxy.port, pki)
    assert "user=postgres" in pg.log_path.read_text()
    assert "cve_probe" not in pg.log_path.read_text()


MALFORMED = {
    "random_bytes": b"\x00\xff" + os.urandom(62),
    "length_0": struct.pack("!i", 0) + b"\0" * 8,
    "length_7": struct.pack("!i", 7) + b"\0" * 8,
    "length_10001": struct.pack("!i", 10001) + b"\0" * 8,
    "length_2^31-1": struct.pack("!i", 2**31 - 1) + b"\0" * 8,
    "unknown_code": struct.pack("!iI", 8, (1234 << 16) | 9999),
    "protocol_2": struct.pack("!iI", 16, 2 << 16) + b"user\0u\0\0",
    "truncated_then_close": wire.build_startup_message({"user": "postgres"})[:11],
    "truncated_length_then_close": b"\x00\x00",
    "bad_layout": struct.pack("!iI", 14, 3 << 16) + b"user\0u",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_startup_closes_cleanly(name: str, proxy: Proxy, pki: Path) -> None:
    before = proxy.metric("dwsproxy_connections_rejected_total", reason="bad_startup")
    sock = raw_connect(proxy.port)
    sock.sendall(MALFORMED[name])
    if name.startswith("truncated"):
        sock.shutdown(socket.SHUT_WR)  # the client closes mid-packet
    t0 = time.monotonic()
    reply = read_until_close(sock)
    sock.close()
    assert time.monotonic() - t0 < 1.5, "closed by the startup timeout, not at once"
    if reply:
        fields = error_fields(reply[:1], reply[5:])
        assert fields["S"] == "FATAL" and fields["C"] in ("08P01", "0A000")
    proxy.wait_metric("dwsproxy_connections_rejected_total", before + 1, reason="bad_startup")
    assert psycopg_ok(proxy.port, pki)  # the next real client still works


def test_tls_junk_after_s(proxy: Proxy, pki: Path) -> None:
    before = proxy.metric("dwsproxy_connections_rejected_total", reason="tls_handshake")
    sock = raw_connect(proxy.port)
    sock.sendall(wire.build_request(wire.SSL_REQUEST_CODE))
    assert sock.recv(1) == b"S"
    sock.sendall(b"\x16\x03\x01\x00\x05hello" + os.urandom(100))
    read_until_close(sock)
    sock.close()
    proxy.wait_metric("dwsproxy_connections_rejected_total", before + 1, reason="tls_handshake")
    assert psycopg_ok(proxy.port, pki)


def test_silent_client_closed_after_startup_timeout(proxy: Proxy, pki: Path) -> None:
    before = proxy.metric("dwsproxy_connections_rejected_total", reason="startup_timeout")
    sock = raw_connect(proxy.port, timeout=10)
    t0 = time.monotonic()
    assert read_until_close(sock) == b""
    assert 1.8 < time.monotonic() - t0 < 5  # startup_timeout = 2.0
    proxy.wait_metric("dwsproxy_connections_rejected_total", before + 1,
                      reason="startup_timeout")
    assert psycopg_ok(proxy.port, pki)


def test_tls11_client_refused(proxy: Proxy, pki: Path) -> None:
    before = proxy.metric("dwsproxy_connections_rejected_total", reason="tls_version")
    ctx = tls_client_context(pki)
    with pytest.warns(DeprecationWarning):  # deprecated on purpose: this is the old client
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    with pytest.warns(DeprecationWarning):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client really offer TLS 1.1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        ssl_request_handshake(proxy.port, ctx)
    proxy.wait_metric("dwsproxy_connections_rejected_total", before + 1, reason="tls_version")


def test_tls12_cbc_only_client_refused(proxy: Proxy, pki: Path) -> None:
    before = proxy.metric("dwsproxy_connections_rejected_total", reason="tls_handshake")
    ctx = tls_client_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:"
                    "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA256")
    with pytest.raises(ssl.SSLError):
        ssl_request_handshake(proxy.port, ctx)
    proxy.wait_metric("dwsproxy_connections_rejected_total", before + 1, reason="tls_handshake")


@pytest.mark.parametrize("version,cipher", [
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305"),
    (ssl.TLSVersion.TLSv1_3, None),
])
def test_aead_suites_work(proxy: Proxy, pki: Path, version: ssl.TLSVersion,
                          cipher: str | None) -> None:
    ctx = tls_client_context(pki, minimum_version=version, maximum_version=version)
    if cipher:
        ctx.set_ciphers(cipher)
    with ssl_request_handshake(proxy.port, ctx) as tls:
        assert tls.version() == version.name.replace("_", ".").replace("v1.", "v1.")
        if cipher:
            assert tls.cipher()[0] == cipher
        startup_over(tls)


def test_psql_tls_versions(proxy: Proxy, pki: Path) -> None:
    from conftest import clean_env, run_psql

    for version in ("TLSv1.2", "TLSv1.3"):
        proc = run_psql(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                        f"sslmode=verify-full sslrootcert={pki / 'cacert.pem'}",
                        env=clean_env(PGSSLMINPROTOCOLVERSION=version,
                                      PGSSLMAXPROTOCOLVERSION=version))
        assert proc.returncode == 0 and f"protocol: {version}" in proc.stdout, proc.stderr


def test_direct_tls_with_libpq18(proxy: Proxy, pki: Path) -> None:
    import psycopg

    if psycopg.pq.version() < 170000:
        pytest.skip(f"psycopg's libpq {psycopg.pq.version()} has no sslnegotiation=direct")
    assert psycopg_ok(proxy.port, pki, sslnegotiation="direct")
    assert "direct_tls=True" in proxy.wait_log("direct_tls=True")


@pytest.mark.parametrize("offer", [None, ["http/1.1"], ["http/1.1", "h2"]])
def test_direct_tls_without_alpn_fails_the_handshake(proxy: Proxy, pki: Path,
                                                     offer: list[str] | None) -> None:
    """As PostgreSQL 17: no ALPN "postgresql" on direct TLS is a no_application_protocol
    alert in the handshake, not a refusal after it."""
    before = proxy.metric("dwsproxy_connections_rejected_total", reason="tls_handshake")
    ctx = tls_client_context(pki)
    if offer:
        ctx.set_alpn_protocols(offer)
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        ctx.wrap_socket(raw_connect(proxy.port), server_hostname="localhost")
    proxy.wait_metric("dwsproxy_connections_rejected_total", before + 1, reason="tls_handshake")


def split_client_hello_handshake(port: int, ctx: ssl.SSLContext, pieces: int) -> str:
    """A direct-TLS handshake whose ClientHello is cut into `pieces` TLS records (legal, and
    how a reassembling check can be dodged); returns the client's error text or "ok"."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    record = outgoing.read()
    body = record[5:]
    step = -(-len(body) // pieces)
    framed = b"".join(record[:3] + len(chunk).to_bytes(2, "big") + chunk
                      for chunk in (body[i:i + step] for i in range(0, len(body), step)))
    with raw_connect(port) as sock:
        sock.sendall(framed)
        for _ in range(50):
            try:
                client.do_handshake()
                return "ok"
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    return "closed"
                incoming.write(data)
                if outgoing.pending:
                    sock.sendall(outgoing.read())
            except ssl.SSLError as exc:
                return str(exc)
    return "no result"


@pytest.mark.parametrize("offer", [None, ["http/1.1"]])
def test_direct_tls_alpn_check_survives_a_split_client_hello(proxy: Proxy, pki: Path,
                                                             offer: list[str] | None) -> None:
    ctx = tls_client_context(pki)
    if offer:
        ctx.set_alpn_protocols(offer)
    assert "no application protocol" in split_client_hello_handshake(proxy.port, ctx, 3)
    good = tls_client_context(pki)
    good.set_alpn_protocols(["postgresql"])
    assert split_client_hello_handshake(proxy.port, good, 3) == "ok"


def test_direct_tls_with_alpn_works(proxy: Proxy, pki: Path) -> None:
    ctx = tls_client_context(pki)
    ctx.set_alpn_protocols(["postgresql"])
    with ctx.wrap_socket(raw_connect(proxy.port), server_hostname="localhost") as tls:
        assert tls.selected_alpn_protocol() == "postgresql"
        startup_over(tls)


def test_direct_tls_off(start_proxy: Callable[..., Proxy], pki: Path) -> None:
    import psycopg

    off = start_proxy(tls={"direct_ssl": False})
    with pytest.raises(psycopg.OperationalError):
        psycopg_ok(off.port, pki, sslnegotiation="direct")
    assert psycopg_ok(off.port, pki)  # SSLRequest negotiation still works


def test_gssenc_request_answered_n_then_ssl(proxy: Proxy, pki: Path) -> None:
    sock = raw_connect(proxy.port)
    sock.sendall(wire.build_request(wire.GSSENC_REQUEST_CODE))
    assert sock.recv(1) == b"N"
    sock.sendall(wire.build_request(wire.SSL_REQUEST_CODE))
    assert sock.recv(1) == b"S"
    with tls_client_context(pki).wrap_socket(sock, server_hostname="localhost") as tls:
        startup_over(tls)


@pytest.mark.parametrize("how", ["libpq18_cancel", "legacy_plaintext_cancel"])
def test_cancel_request_is_forwarded(proxy: Proxy, pki: Path, how: str) -> None:
    import psycopg

    with psycopg.connect(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                         f"sslmode=require sslrootcert={pki / 'cacert.pem'}") as conn:
        def cancel() -> None:
            if how == "libpq18_cancel":
                conn.cancel_safe()
            else:
                conn.pgconn.get_cancel().cancel()  # PQcancel: a plaintext CancelRequest

        timer = threading.Timer(0.5, cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - t0 < 10
        timer.join()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_relay_flow_control_with_a_slow_reader(proxy: Proxy, pki: Path) -> None:
    """200 MB from the backend to a client that stops reading: the proxy pauses the backend
    instead of buffering, then delivers every byte once the client reads again."""
    ctx = tls_client_context(pki)
    with ssl_request_handshake(proxy.port, ctx) as tls:
        startup_over(tls)
        rows, width = 200, 1_000_000
        query = f"SELECT repeat('x', {width}) FROM generate_series(1, {rows})".encode() + b"\0"
        tls.sendall(b"Q" + struct.pack("!i", len(query) + 4) + query)
        base = rss_kib(proxy.proc.pid)
        time.sleep(2.0)  # not reading: the backend must be paused, not buffered
        grown = rss_kib(proxy.proc.pid) - base
        assert grown < 32 * 1024, f"proxy RSS grew {grown} KiB while the client did not read"
        data_rows = payload = 0
        while True:
            kind, body = read_message(tls)
            if kind == b"D":
                data_rows += 1
                payload += len(body)
            elif kind == b"Z":
                break
        assert data_rows == rows and payload >= rows * width


def test_relay_client_to_backend_bulk(proxy: Proxy, pki: Path, pg: TempPostgres) -> None:
    import psycopg

    with psycopg.connect(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                         f"sslmode=require sslrootcert={pki / 'cacert.pem'}") as conn:
        conn.execute("CREATE TEMP TABLE t (b text)")
        line = b"y" * 8000 + b"\n"
        with conn.cursor().copy("COPY t FROM STDIN") as copy:
            for _ in range(5000):  # 40 MB client -> backend
                copy.write(line)
        assert conn.execute("SELECT count(*), sum(length(b)) FROM t").fetchone() == \
            (5000, 5000 * 8000)


def test_half_close_keeps_the_reply(start_proxy: Callable[..., Proxy]) -> None:
    plain = start_proxy(tls={"ssl": False})
    sock = raw_connect(plain.port)
    startup_over(sock)
    query = b"SELECT 'still here'\0"
    sock.sendall(b"Q" + struct.pack("!i", len(query) + 4) + query)
    sock.shutdown(socket.SHUT_WR)  # FIN right after the query: the reply must still arrive
    reply = read_until_close(sock)
    assert b"still here" in reply and b"Z" in reply


def test_demo_non_interactive(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "proxy", "demo", "--dir", str(tmp_path),
                           "--no-wait"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "18/18 cells as the seed's Table 3 says" in proc.stdout
    assert proc.stdout.count(" ok ") == 18
    assert "Inferred policy: ssl = on, require_ssl = on" in proc.stdout
    assert "  probe: ok" in proc.stdout


def test_half_close_during_startup_loses_nothing(start_proxy: Callable[..., Proxy]) -> None:
    plain = start_proxy(tls={"ssl": False})
    sock = raw_connect(plain.port)
    query = b"SELECT 'early bird'\0"
    sock.sendall(wire.build_startup_message({"user": "postgres", "database": "postgres"})
                 + b"Q" + struct.pack("!i", len(query) + 4) + query)
    sock.shutdown(socket.SHUT_WR)  # FIN before the proxy has even reached the backend
    reply = read_until_close(sock)
    assert b"early bird" in reply
