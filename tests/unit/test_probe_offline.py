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
from proxy.tools import certs, conninfo, pgclient, probe


@pytest.fixture()
def no_pg_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """libpq reads the process environment: none of the caller's PG* variables, an empty
    HOME (no ~/.pgpass, ~/.pg_service.conf)."""
    import os

    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_conninfo_is_libpqs(no_pg_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [t] = conninfo.resolve("host=db.example port = 6432 user='o\\'neil' sslmode=require")
    assert (t.host, t.port, t.params["user"], t.params["dbname"]) == (
        "db.example", 6432, "o'neil", "o'neil")
    monkeypatch.setenv("PGDATABASE", "app")
    monkeypatch.setenv("PGHOST", "ignored")
    monkeypatch.setenv("PGSSLROOTCERT", "/ca.pem")
    [t] = conninfo.resolve("host=db.example user=u")
    assert (t.host, t.params["dbname"], t.params["sslrootcert"]) == ("db.example", "app",
                                                                     "/ca.pem")


def test_conninfo_uri_and_host_lists(no_pg_env: Path) -> None:
    [t] = conninfo.resolve("postgresql://alice:s%40cret@[::1]:7000/sales?sslcert=/c.crt")
    assert (t.host, t.port, t.params["user"], t.password, t.params["dbname"],
            t.params["sslcert"], t.server) == ("::1", 7000, "alice", "s@cret", "sales",
                                               "/c.crt", "[::1]:7000")
    hosts = conninfo.resolve("host=a,b,c port=1,,3 user=u")
    assert [(t.host, t.port) for t in hosts] == [("a", 1), ("b", 5432), ("c", 3)]
    [t] = conninfo.resolve("host=db.example hostaddr=127.0.0.1 user=u")
    assert (t.host, t.address) == ("db.example", "127.0.0.1")


@pytest.mark.parametrize(("text", "message"), [
    ("hots=127.0.0.1", 'invalid connection option "hots"'),
    ("host=a sslmode=bogus", 'invalid sslmode value: "bogus"'),
    ("host=a gssencmode=bogus", 'invalid gssencmode value: "bogus"'),
    ("host='a", "unterminated quoted string in connection info string"),
    ("postgresql://[::1", "end of string reached when looking for matching \"]\""),
    ("host=a,b port=1,2,3 user=u", "could not match 3 port numbers to 2 hosts"),
    ("host=a port=x user=u", 'invalid port number: "x"'),
    ("service=nope host=a", 'definition of service "nope" not found'),
    ("user=u", "is a Unix-domain socket"),
    ("host=/tmp user=u", "is a Unix-domain socket"),
])
def test_conninfo_refused_with_libpqs_words(no_pg_env: Path, text: str, message: str) -> None:
    with pytest.raises(conninfo.ConninfoError) as caught:
        conninfo.resolve(text)
    assert message in str(caught.value)


def test_service_file_fills_what_conninfo_leaves_out(no_pg_env: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    services = no_pg_env / "services"
    services.write_text("[mydb]\nhost=127.0.0.1\nport=7777\ndbname=sales\nuser=svc\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGPORT", "1111")  # the service's entries come before PG* variables
    [t] = conninfo.resolve("service=mydb port=8888")  # and CONNINFO before both
    assert (t.host, t.port, t.params["dbname"], t.params["user"]) == (
        "127.0.0.1", 8888, "sales", "svc")
    monkeypatch.setenv("PGSERVICE", "mydb")
    [t] = conninfo.resolve("")
    assert (t.host, t.port) == ("127.0.0.1", 7777)


def test_resolving_connects_to_nothing(no_pg_env: Path) -> None:
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    try:
        conninfo.resolve(f"host=127.0.0.1 port={listener.getsockname()[1]} user=u")
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.parametrize(("line", "password"), [
    ("localhost:5432:db:bob:pa\\:ss", "pa:ss"),
    ("*:*:*:*:any", "any"),
    ("localhost:5432:db:bob:ends:here", "ends"),  # libpq stops at an unescaped ':'
    ("local\\host:5432:db:bob:esc", "esc"),  # an escaped ordinary character is itself
    ("localhost:5432:db:bob:back\\\\slash", "back\\slash"),
    ("localhost:5432:d*:bob:x", None),  # '*' only as a whole field
    ("localhost:5433:db:bob:x", None),
    ("# localhost:5432:db:bob:x", None),
])
def test_pgpass_lines(tmp_path: Path, line: str, password: str | None) -> None:
    path = tmp_path / "pass"
    path.write_text(line + "\n")
    path.chmod(0o600)
    assert conninfo.pgpass_password(path, "localhost", "5432", "db", "bob") == password


def test_pgpass_first_match_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_text("other:5432:*:bob:no\r\nlocalhost:*:*:bob:pa\\:ss\nlocalhost:*:*:bob:2nd\n")
    path.chmod(0o600)
    assert conninfo.pgpass_password(path, "localhost", "5432", "x", "bob") == "pa:ss"
    assert conninfo.pgpass_password(path, "", "5432", "x", "bob") == "pa:ss"  # '' is localhost
    assert conninfo.pgpass_password(path, "localhost", "5432", "x", "carol") is None
    path.chmod(0o640)  # libpq ignores a password file the group or others can read
    assert conninfo.pgpass_password(path, "localhost", "5432", "x", "bob") is None


def _cert(cn: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> Any:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = certs.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(1).not_valid_before(now)
               .not_valid_after(now + dt.timedelta(days=1)))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(("cert", "host", "ok"), [
    (("db.example", ("db.example",), ()), "db.example", True),
    (("db.example", ("DB.Example",), ()), "db.example", True),
    (("x", ("*.example",), ()), "db.example", True),
    (("x", ("*.example",), ()), "a.db.example", False),  # one label only
    (("x", ("*.example",), ()), "example", False),
    (("db.example", ("other.example",), ()), "db.example", False),  # a dNSName hides the CN
    (("db.example", (), ()), "db.example", True),  # no SAN: the CN
    (("db.example", (), ("127.0.0.1",)), "db.example", True),  # no dNSName: the CN
    (("x", (), ("127.0.0.1",)), "127.0.0.1", True),
    (("x", (), ("127.0.0.2",)), "127.0.0.1", False),
    (("127.0.0.1", (), ("127.0.0.2",)), "127.0.0.1", False),  # an IP SAN hides the CN
    (("127.0.0.1", ("localhost",), ()), "127.0.0.1", True),  # no IP SAN: the CN
    (("x", ("127.0.0.1",), ()), "127.0.0.1", True),  # a dNSName compared as a string
    (("x", ("localhost",), ()), "127.0.0.1", False),
    (("x", (), ("::1",)), "::1", True),
    (("x", (), ("::1",)), "0:0:0:0:0:0:0:1", True),  # compared as addresses
    (("x", (), ("127.0.0.1",)), "localhost", False),
])
def test_verify_full_names_as_libpq(cert: tuple[str, tuple[str, ...], tuple[str, ...]],
                                    host: str, ok: bool) -> None:
    assert pgclient.hostname_matches(_cert(*cert), host) is ok


def test_server_bytes_are_escaped() -> None:
    assert probe.escaped(b"HTTP/1.1 400\r\n") == "HTTP/1.1 400\\r\\n"
    assert probe.escaped(b"\x1b[2J'\\\xff") == r"\x1b[2J\'\\\xff"
    assert probe.escaped(b"a" * 100).endswith("a…")


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
        probe.validate_expects(["colour=blue"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        probe.validate_expects(["ssl"])


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
                        # a StartupMessage in plaintext: refused as a server would refuse it
                        conn.sendall(wire.error_response("28000", "SSL required"))
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


def test_tls10_acceptance_is_seen(tls10_server: int, no_pg_env: Path) -> None:
    import time

    [target] = conninfo.resolve(f"host=127.0.0.1 port={tls10_server} user=x connect_timeout=5")
    report = probe.probe_target(target, deadline=time.monotonic() + 60,
                                expects=["min_tls=TLSv1.2"])
    assert report["tls_versions"] == {"TLSv1": True, "TLSv1.1": False, "TLSv1.2": False,
                                      "TLSv1.3": False}
    assert probe.min_tls(report) == "TLSv1"
    # libpq's own floor is TLS 1.2 (ssl_min_protocol_version): its cells are refused
    assert report["cells"][3] == {"sslmode": "require", "result": "refused",
                                  "detail": "SSL error: tlsv1 alert protocol version"}
    assert report["require_ssl"] == "on"
    assert report["findings"] == ["TLSv1 accepted (below TLS 1.2)"]
    assert report["tls12_ciphers"] is None  # --expect without --full: no suite enumeration


def test_connect_timeout_as_libpq_reads_it() -> None:
    assert probe.connect_timeout({}) == probe.DEFAULT_CONNECT_TIMEOUT
    assert probe.connect_timeout({"connect_timeout": "0"}) == probe.DEFAULT_CONNECT_TIMEOUT
    assert probe.connect_timeout({"connect_timeout": "1"}) == 2  # libpq's minimum
    assert probe.connect_timeout({"connect_timeout": " 7 "}) == 7
    with pytest.raises(conninfo.ConninfoError, match='invalid integer value "x"'):
        probe.connect_timeout({"connect_timeout": "x"})


def test_a_bad_connect_timeout_is_exit_2(no_pg_env: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    import argparse

    args = argparse.Namespace(conninfo="host=127.0.0.1 port=9 user=u connect_timeout=x",
                              json=False, expect=None, full=False, timeout=5.0)
    assert probe.main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        'probe: invalid integer value "x" for connection option "connect_timeout"']


def test_a_bad_timeout_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    args = argparse.Namespace(conninfo="host=127.0.0.1 user=u", json=False, expect=None,
                              full=False, timeout=-1.0)
    assert probe.main(args) == 2
    assert capsys.readouterr().err == "probe: --timeout -1: want a number of seconds above 0\n"


def test_psycopgs_bundled_libpq_reads_conninfo_the_same(no_pg_env: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the system has no libpq.so.5, the copy in psycopg's wheel is the parser."""
    bundled = [c for c in conninfo.libpq_candidates() if "psycopg_binary" in c]
    assert bundled, "psycopg[binary] (a test dependency) bundles a libpq"
    monkeypatch.setattr(conninfo, "_LIB", None)
    monkeypatch.setattr(conninfo, "libpq_candidates", lambda: bundled)
    assert conninfo.libpq_version() >= 150000
    [t] = conninfo.resolve("postgresql://u@127.0.0.1:7000/db")
    assert (t.host, t.port, t.params["dbname"]) == ("127.0.0.1", 7000, "db")
    with pytest.raises(conninfo.ConninfoError, match='invalid connection option "hots"'):
        conninfo.resolve("hots=x")
    monkeypatch.setattr(conninfo, "_LIB", None)
    monkeypatch.setattr(conninfo, "libpq_candidates", lambda: ["/nonexistent/libpq.so.5"])
    with pytest.raises(conninfo.ConninfoError, match="libpq not found"):
        conninfo.resolve("host=x")
