"""The probe's pure parts (conninfo, .pgpass, TLS record reading, --expect, findings), and that
its TLS 1.0 try can see a server that accepts TLS 1.0 (a stand-in: no real server here will)."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.protocol import wire
from proxy.tools import certs, probe


def test_conninfo_keywords_quotes_and_environment() -> None:
    params = probe.parse_conninfo("host=db.example port = 6432 user='o\\'neil' sslmode=require",
                                  {"PGDATABASE": "app", "PGHOST": "ignored",
                                   "PGSSLROOTCERT": "/ca.pem"})
    assert params["host"] == "db.example"
    assert params["port"] == "6432"
    assert params["user"] == "o'neil"
    assert params["dbname"] == "app"
    assert params["sslrootcert"] == "/ca.pem"


def test_conninfo_uri_and_defaults() -> None:
    params = probe.parse_conninfo("postgresql://alice:s%40cret@[::1]:7000/sales?sslcert=/c.crt",
                                  {})
    assert (params["host"], params["port"], params["user"], params["password"],
            params["dbname"], params["sslcert"]) == ("::1", "7000", "alice", "s@cret", "sales",
                                                     "/c.crt")
    bare = probe.parse_conninfo("", {"PGUSER": "bob"})
    assert (bare["host"], bare["port"], bare["user"], bare["dbname"]) == (
        "localhost", "5432", "bob", "bob")


def test_pgpass_matching(tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_text("# comment\nother:5432:*:bob:no\nlocalhost:*:*:bob:pa\\:ss\n")
    path.chmod(0o600)
    params = probe.parse_conninfo(f"host=localhost port=5432 user=bob passfile={path}", {})
    assert probe.pgpass_password(params) == "pa:ss"
    params["user"] = "carol"
    assert probe.pgpass_password(params) is None
    params["user"] = "bob"
    path.chmod(0o644)  # libpq ignores a password file others can read
    assert probe.pgpass_password(params) is None


def _record(*messages: tuple[int, bytes]) -> bytes:
    body = b"".join(bytes([kind]) + len(data).to_bytes(3, "big") + data for kind, data in messages)
    return b"\x16\x03\x03" + struct.pack("!H", len(body)) + body


def test_certificate_request_is_read_from_the_tls12_flight() -> None:
    hello, cert, request, done = (2, b"h" * 40), (11, b"c" * 300), (13, b"r" * 20), (14, b"")
    assert probe.certificate_requested(_record(hello, cert, request, done)) is True
    assert probe.certificate_requested(_record(hello, cert, done)) is False
    # split over two records
    assert probe.certificate_requested(_record(hello) + _record(cert, request, done)) is True
    assert probe.certificate_requested(b"\x17\x03\x03\x00\x10" + b"x" * 16) is None


def _report(**kw: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "ssl": "on", "require_ssl": "on", "client_cert": "none",
        "cells": [{"sslmode": m, "result": "tls", "detail": ""} for m in probe.SSLMODES],
        "tls_versions": {"TLSv1": False, "TLSv1.1": False, "TLSv1.2": True, "TLSv1.3": True},
        "tls12_ciphers": ["ECDHE-ECDSA-AES128-GCM-SHA256"],
        "certificate": {"days_left": 400, "chain_verified": True, "hostname_ok": True}}
    report.update(kw)
    return report


def test_expectations() -> None:
    report = _report()
    assert probe.check_expectations(report, ["ssl=on", "min_tls=1.2", "client_cert=none"]) == []
    assert probe.check_expectations(report, ["require_ssl=off", "min_tls=TLSv1.3"]) == [
        "expected require_ssl=off, got require_ssl=on",
        "expected min_tls=TLSv1.3, got min_tls=TLSv1.2"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        probe.check_expectations(report, ["colour=blue"])


def test_findings() -> None:
    assert probe.findings(_report()) == []
    bad = _report(tls_versions={"TLSv1": True, "TLSv1.1": False, "TLSv1.2": True,
                                "TLSv1.3": False},
                  tls12_ciphers=["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA"],
                  certificate={"days_left": 12, "chain_verified": False, "hostname_ok": False})
    bad["cells"][0]["result"] = "plaintext"
    assert probe.findings(bad) == [
        "plaintext accepted (sslmode=disable)", "TLSv1 accepted (below TLS 1.2)",
        "CBC suites accepted: ECDHE-ECDSA-AES128-SHA", "certificate expires in 12 days",
        "certificate chain not verified against sslrootcert",
        "certificate does not name the host"]


@pytest.fixture()
def tls10_server(tmp_path: Path) -> Iterator[int]:
    """Answers SSLRequest with S and speaks only TLS 1.0 (at @SECLEVEL=0), then refuses the
    session: the unsound server the probe must be able to catch."""
    certs.init(tmp_path)
    warnings.simplefilter("ignore", DeprecationWarning)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    if conn.recv(8) != wire.build_request(wire.SSL_REQUEST_CODE):
                        continue
                    conn.sendall(b"S")
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1000)
                        tls.sendall(wire.error_response("28000", "go away"))
                except (OSError, ssl.SSLError):
                    continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    socket.create_connection(listener.getsockname(), timeout=5).close()  # wake accept()
    listener.close()
    thread.join(5)


def test_tls10_acceptance_is_seen(tls10_server: int) -> None:
    params = probe.parse_conninfo(f"host=127.0.0.1 port={tls10_server} user=x", {})
    prober = probe.Prober(params)
    assert prober.version_accepted("TLSv1") is True
    assert prober.version_accepted("TLSv1.2") is False
    # libpq's own floor is TLS 1.2 (ssl_min_protocol_version): its cells are refused
    cell = prober.cell("require")
    assert (cell.result, cell.detail) == ("refused", "SSL error: tlsv1 alert protocol version")
    report = {"tls_versions": {"TLSv1": True}, "cells": [], "ssl": "on", "tls12_ciphers": [],
              "certificate": None}
    assert probe.findings(report) == ["TLSv1 accepted (below TLS 1.2)"]
