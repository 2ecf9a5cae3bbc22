"""Hostile packet orders against the real proxy, answered as PostgreSQL answers them (the
orders themselves are tests/unit/test_negotiation.py; here the wiring). A hand-made socket
client, since no real client sends these; PostgreSQL 15 itself is asked where it can be."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Proxy, clean_env, error_fields, raw_connect, read_until_close, run_psql

from proxy.protocol import wire
from proxy.tools.demo import TempPostgres

SSL_REQUEST = wire.build_request(wire.SSL_REQUEST_CODE)
GSSENC_REQUEST = wire.build_request(wire.GSSENC_REQUEST_CODE)


@pytest.fixture(scope="module")
def plain(start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy(tls={"ssl": False})


@pytest.fixture(scope="module")
def tls_on(start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy()


def second_ssl_request(port: int) -> tuple[bytes, dict[str, str]]:
    """SSLRequest, its answer, another SSLRequest: (first answer, the ErrorResponse's fields)."""
    sock = raw_connect(port)
    sock.sendall(SSL_REQUEST)
    first = sock.recv(1)
    sock.sendall(SSL_REQUEST)
    reply = read_until_close(sock)
    sock.close()
    return first, error_fields(reply[:1], reply[5:])


def test_second_ssl_request_after_n_is_refused_as_postgresql_does(plain: Proxy,
                                                                  pg: TempPostgres) -> None:
    before = plain.metric("dwsproxy_connections_rejected_total", reason="bad_startup")
    answer, fields = second_ssl_request(plain.port)
    pg_answer, pg_fields = second_ssl_request(pg.port)  # the test cluster runs with ssl off
    assert answer == pg_answer == b"N"
    assert fields["S"] == "FATAL" and fields["C"] == pg_fields["C"] == "0A000"
    # PostgreSQL reads the second request as protocol version 1234.5679; it names the versions
    # it speaks after the colon (15: "3.0 to 3.0"), the proxy those it relays
    assert fields["M"].split(":")[0] == pg_fields["M"].split(":")[0] == \
        "unsupported frontend protocol 1234.5679"
    plain.wait_metric("dwsproxy_connections_rejected_total", before + 1, reason="bad_startup")
    proc = run_psql(f"host=127.0.0.1 port={plain.port} user=postgres dbname=postgres "
                    "sslmode=prefer", "SELECT 1", env=clean_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr


def test_bytes_pipelined_after_gssenc_request_are_refused(tls_on: Proxy, pg: TempPostgres,
                                                          pki: Path) -> None:
    """CVE-2021-23214 for GSSAPI: PostgreSQL (postmaster.c, after GSSENCRequest) refuses bytes
    sent before its answer with 08P01; the test cluster is built with GSSAPI and answers G, so
    here the proxy is held to the source, and the backend must never see the pipelined user."""
    before = tls_on.metric("dwsproxy_connections_rejected_total", reason="bad_startup")
    sock = raw_connect(tls_on.port)
    sock.sendall(GSSENC_REQUEST
                 + wire.build_startup_message({"user": "gss_probe", "database": "postgres"}))
    reply = read_until_close(sock)
    sock.close()
    fields = error_fields(reply[:1], reply[5:])
    assert fields["S"] == "FATAL" and fields["C"] == "08P01"
    assert fields["M"] == "received unencrypted data after GSSAPI encryption request"
    tls_on.wait_metric("dwsproxy_connections_rejected_total", before + 1, reason="bad_startup")
    proc = run_psql(f"host=localhost port={tls_on.port} user=postgres dbname=postgres "
                    f"sslmode=verify-full sslrootcert={pki / 'cacert.pem'}", "SELECT 1")
    assert proc.returncode == 0, proc.stderr
    assert "gss_probe" not in pg.log_path.read_text()


def test_gssenc_request_then_ssl_request_still_works(tls_on: Proxy) -> None:
    # libpq's gssencmode=prefer order, answered N then S (GSSAPI refused, SSL negotiated)
    sock = raw_connect(tls_on.port)
    sock.sendall(GSSENC_REQUEST)
    assert sock.recv(1) == b"N"
    sock.sendall(SSL_REQUEST)
    assert sock.recv(1) == b"S"
    sock.close()


@pytest.mark.parametrize("request_code,version", [
    (wire.SSL_REQUEST_CODE, "1234.5679"), (wire.GSSENC_REQUEST_CODE, "1234.5680")])
def test_encryption_request_inside_tls_is_refused(tls_on: Proxy, pki: Path, request_code: int,
                                                  version: str) -> None:
    from conftest import read_message, ssl_request_handshake, tls_client_context

    with ssl_request_handshake(tls_on.port, tls_client_context(pki)) as tls:
        tls.sendall(wire.build_request(request_code))
        fields = error_fields(*read_message(tls))
    assert fields["C"] == "0A000"
    assert fields["M"].startswith(f"unsupported frontend protocol {version}:")


def test_a_clienthello_after_n_is_not_taken_for_direct_tls(tls_on: Proxy) -> None:
    # PostgreSQL looks for 0x16 in the first byte only; later it is the high byte of a length
    sock = raw_connect(tls_on.port)
    sock.sendall(GSSENC_REQUEST)
    assert sock.recv(1) == b"N"
    # a whole (malformed) ClientHello record: OpenSSL, were it handed this, would answer an alert
    sock.sendall(b"\x16\x03\x01\x00\xc8\x01" + b"\x00" * 199)
    # an impossible length: closed without a word (an RST, the record left unread)
    assert read_until_close(sock) == b""
    sock.close()
