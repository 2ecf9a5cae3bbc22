"""The second hop: TLS from the proxy to a real PostgreSQL that accepts only `hostssl … cert`,
the openGauss key pair, SCRAM channel binding across the proxy, direct TLS to a backend (a
dwsproxy acting as one), cancels over backend TLS, and the errors a client can act on."""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Proxy, clean_env, run_psql

from proxy.tools import certs
from proxy.tools.demo import TempPostgres

HBA = """local all all trust
hostssl all scram_user 127.0.0.0/8 scram-sha-256
hostssl all all 127.0.0.0/8 trust clientcert=verify-full
hostnossl all all 127.0.0.0/8 reject
"""


class Pki:
    """A CA for the database's certificate and the proxy's client certificates, another one
    for a wrong sslrootcert."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.ca = certs.make_ca("Backend CA")
        self.other = certs.make_ca("Unrelated CA")
        certs.write_certs(folder / "ca.pem", self.ca[0])
        certs.write_certs(folder / "other.pem", self.other[0])
        db = certs.issue(self.ca, "localhost", server=True)
        certs.write_certs(folder / "db.crt", db[0])
        certs.write_key(folder / "db.key", db[1])
        now = dt.datetime.now(dt.UTC)
        old = certs.issue(self.ca, "localhost", server=True, not_before=now - dt.timedelta(days=9),
                          not_after=now - dt.timedelta(days=1))
        certs.write_certs(folder / "expired.crt", old[0])
        certs.write_key(folder / "expired.key", old[1])
        proxy_client = certs.issue(self.ca, "postgres")  # clientcert=verify-full: CN = user
        certs.write_certs(folder / "client.crt", proxy_client[0])
        certs.write_key(folder / "client.key", proxy_client[1])
        front = certs.issue(self.ca, "localhost", server=True)  # the proxy's own, not the db's
        certs.write_certs(folder / "front.crt", front[0])
        certs.write_key(folder / "front.key", front[1])


@pytest.fixture(scope="module")
def bpki() -> Iterator[Pki]:
    folder = Path(tempfile.mkdtemp(prefix="dwsproxy-bpki-"))
    yield Pki(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_tls(bpki: Pki) -> Iterator[TempPostgres]:
    files = {"server.crt": (bpki.dir / "db.crt").read_bytes(),
             "server.key": (bpki.dir / "db.key").read_bytes(),
             "root.crt": (bpki.dir / "ca.pem").read_bytes()}
    server = TempPostgres(hba=HBA, files=files, extra_conf=(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
        "ssl_ca_file = 'root.crt'\nlisten_addresses = '127.0.0.1,127.0.0.2'\n"
        "password_encryption = 'scram-sha-256'\n")).start()
    server.sql("CREATE ROLE scram_user LOGIN PASSWORD 'right-password'")
    yield server
    server.stop()


def backend_cfg(pg: TempPostgres, bpki: Pki, **extra: object) -> dict[str, object]:
    return {"port": pg.port, "sslmode": "verify-full", "sslrootcert": str(bpki.dir / "ca.pem"),
            "sslcert": str(bpki.dir / "client.crt"), "sslkey": str(bpki.dir / "client.key"),
            "host": "localhost", **extra}


def front_tls(bpki: Pki, cert: str = "front") -> dict[str, object]:
    return {"ssl_cert_file": str(bpki.dir / f"{cert}.crt"),
            "ssl_key_file": str(bpki.dir / f"{cert}.key")}


def plain(port: int, user: str = "postgres", **extra: str) -> str:
    info = f"host=127.0.0.1 port={port} user={user} dbname=postgres sslmode=disable"
    return info + "".join(f" {k}={v}" for k, v in extra.items())


def tls_client(port: int, bpki: Pki, user: str = "postgres", **extra: str) -> str:
    info = (f"host=localhost port={port} user={user} dbname=postgres sslmode=verify-full "
            f"sslrootcert={bpki.dir / 'ca.pem'}")
    return info + "".join(f" {k}={v}" for k, v in extra.items())


def test_hostssl_cert_only_backend_through_the_proxy(start_proxy: Callable[..., Proxy],
                                                     pg_tls: TempPostgres, bpki: Pki) -> None:
    direct = run_psql(plain(pg_tls.port), "SELECT 1")
    assert direct.returncode != 0 and "no encryption" in direct.stderr  # hostnossl reject
    proxy = start_proxy(tls=front_tls(bpki), backend=backend_cfg(pg_tls, bpki))
    query = ("SELECT s.ssl, s.client_dn FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()")
    proc = run_psql(plain(proxy.port), query)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "t|/O=dwsproxy/CN=postgres"
    proxy.wait_metric("dwsproxy_connections_total", 1, encryption="plain", tls_version="",
                      client_cert="none", backend_encryption="tls")
    metrics = proxy.http("/metrics")[1]
    assert 'role="backend_ca"' in metrics and 'role="backend_client"' in metrics
    assert proxy.http("/healthz")[0] == 200  # the health check speaks TLS too


def refused(proxy: Proxy, reason: str) -> str:
    t0 = time.monotonic()
    proc = run_psql(plain(proxy.port), "SELECT 1")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 10
    assert "could not connect to the database server at" in proc.stderr, proc.stderr
    assert "SQLSTATE 08006" in proc.stderr
    proxy.wait_metric("dwsproxy_backend_tls_failures_total", 1, reason=reason)
    return proc.stderr


def test_wrong_ca_wrong_name_expired_and_ssl_off(start_proxy: Callable[..., Proxy],
                                                 pg_tls: TempPostgres, bpki: Pki,
                                                 pg: TempPostgres, pki: Path) -> None:
    wrong_ca = start_proxy(tls=front_tls(bpki), backend=backend_cfg(
        pg_tls, bpki, sslrootcert=str(bpki.dir / "other.pem")))
    assert "server certificate not trusted" in refused(wrong_ca, "untrusted")
    wrong_name = start_proxy(tls=front_tls(bpki), backend=backend_cfg(pg_tls, bpki,
                                                                      host="127.0.0.2"))
    assert "does not match the host name" in refused(wrong_name, "name_mismatch")
    # an expired certificate: a dwsproxy stands in for the database
    expired_backend = start_proxy(tls=front_tls(bpki, "expired"),
                                  backend=backend_cfg(pg_tls, bpki))
    expired = start_proxy(tls=front_tls(bpki), backend=backend_cfg(
        pg_tls, bpki, port=expired_backend.port, sslcert="", sslkey=""))
    assert "expired" in refused(expired, "expired")
    # the suite's PostgreSQL has ssl = off
    required = start_proxy(backend={"sslmode": "require"})
    assert "does not support SSL" in refused(required, "ssl_refused")
    preferred = start_proxy(backend={"sslmode": "prefer"})
    proc = run_psql(plain(preferred.port), "SELECT 1")
    assert proc.returncode == 0, proc.stderr
    preferred.wait_metric("dwsproxy_connections_total", 1, encryption="plain", tls_version="",
                          client_cert="none", backend_encryption="plain")


def test_scram_channel_binding(start_proxy: Callable[..., Proxy], pg_tls: TempPostgres,
                               bpki: Pki) -> None:
    backend = backend_cfg(pg_tls, bpki, sslcert="", sslkey="")
    same = start_proxy(tls=front_tls(bpki, "db"), backend=backend)  # the database's own cert
    for binding in ("prefer", "require"):
        proc = subprocess.run(
            ["psql", tls_client(same.port, bpki, "scram_user", channel_binding=binding),
             "-XAtc", "SELECT 1"], capture_output=True, text=True, timeout=30,
            env=clean_env(PGPASSWORD="right-password"))
        assert proc.returncode == 0 and proc.stdout.strip() == "1", (binding, proc.stderr)
    wrong = subprocess.run(["psql", tls_client(same.port, bpki, "scram_user"), "-XAtc",
                            "SELECT 1"], capture_output=True, text=True, timeout=30,
                           env=clean_env(PGPASSWORD="wrong"))
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    other = start_proxy(tls=front_tls(bpki), backend=backend)
    proc = subprocess.run(["psql", tls_client(other.port, bpki, "scram_user",
                                              channel_binding="prefer"), "-XAtc", "SELECT 1"],
                          capture_output=True, text=True, timeout=30,
                          env=clean_env(PGPASSWORD="right-password"))
    assert proc.returncode != 0
    assert "channel binding cannot cross this proxy" in proc.stderr, proc.stderr
    assert "channel_binding=disable" in proc.stderr
    other.wait_metric("dwsproxy_connections_rejected_total", 1, reason="channel_binding")
    proc = subprocess.run(["psql", tls_client(other.port, bpki, "scram_user",
                                              channel_binding="disable"), "-XAtc", "SELECT 1"],
                          capture_output=True, text=True, timeout=30,
                          env=clean_env(PGPASSWORD="right-password"))
    assert proc.returncode == 0, proc.stderr


def test_opengauss_key_pairs(start_proxy: Callable[..., Proxy], pg_tls: TempPostgres,
                             bpki: Pki, tmp_path: Path) -> None:
    """The proxy's own key encrypted with server.key.cipher/.rand beside it, and the backend
    client key with client.key.cipher/.rand beside sslcert, both written by `dwsproxy certs
    encrypt-key`."""
    for name in ("front.crt", "front.key", "client.crt", "client.key"):
        shutil.copy(bpki.dir / name, tmp_path / name)
    for key, stem in (("front.key", "server"), ("client.key", "client")):
        out = subprocess.run([sys.executable, "-m", "proxy", "certs", "encrypt-key",
                              str(tmp_path / key), "--stem", stem], capture_output=True,
                             text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        assert b"ENCRYPTED" in (tmp_path / key).read_bytes()
        assert (tmp_path / f"{stem}.key.rand").stat().st_mode & 0o077 == 0
    proxy = start_proxy(tls={"ssl_cert_file": str(tmp_path / "front.crt"),
                             "ssl_key_file": str(tmp_path / "front.key")},
                        backend=backend_cfg(pg_tls, bpki, sslcert=str(tmp_path / "client.crt"),
                                            sslkey=str(tmp_path / "client.key")))
    proc = run_psql(tls_client(proxy.port, bpki), "SELECT ssl FROM pg_stat_ssl "
                    "WHERE pid = pg_backend_pid()")
    assert proc.returncode == 0 and proc.stdout.strip() == "t", proc.stderr
    # a wrong .rand: exit 2, one line naming the file
    rand = tmp_path / "server.key.rand"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(bpki.dir / "front.key", other / "k.key")
    subprocess.run([sys.executable, "-m", "proxy", "certs", "encrypt-key", str(other / "k.key"),
                    "--stem", "server"], check=True, capture_output=True, cwd=REPO)
    shutil.copy(other / "server.key.rand", rand)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[tls]\nssl_cert_file = '{tmp_path / 'front.crt'}'\n"
                   f"ssl_key_file = '{tmp_path / 'front.key'}'\n")
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(cfg)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert str(rand) in out.stderr and "tls.ssl_key_rand_file" in out.stderr


def test_direct_tls_to_a_backend(start_proxy: Callable[..., Proxy], pg_tls: TempPostgres,
                                 bpki: Pki) -> None:
    """PostgreSQL 17 is not packaged here: a dwsproxy (direct_ssl on) plays the backend."""
    inner = start_proxy(tls={**front_tls(bpki, "db"), "require_ssl": True},
                        backend=backend_cfg(pg_tls, bpki))
    outer = start_proxy(tls=front_tls(bpki), backend=backend_cfg(
        pg_tls, bpki, port=inner.port, sslnegotiation="direct", sslcert="", sslkey=""))
    proc = run_psql(plain(outer.port), "SELECT ssl FROM pg_stat_ssl WHERE pid = "
                    "pg_backend_pid()")
    assert proc.returncode == 0 and proc.stdout.strip() == "t", proc.stderr
    inner.wait_log("direct_tls=True")


def test_cancel_over_backend_tls(start_proxy: Callable[..., Proxy], pg_tls: TempPostgres,
                                 bpki: Pki) -> None:
    import psycopg

    proxy = start_proxy(tls=front_tls(bpki), backend=backend_cfg(pg_tls, bpki))
    with psycopg.connect(plain(proxy.port)) as conn:
        timer = threading.Timer(0.5, lambda: conn.pgconn.get_cancel().cancel())
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - t0 < 10
        timer.join()
    proxy.wait_metric("dwsproxy_cancel_requests_total", 1, result="forwarded")


def test_large_transfers_both_ways_over_both_hops(start_proxy: Callable[..., Proxy],
                                                  pg_tls: TempPostgres, bpki: Pki) -> None:
    """The backend hop's own TLS (proxy/tlsclient.py): replies, a COPY out and a COPY in of
    many records, byte for byte, with TLS on both hops; then the session still works."""
    import hashlib

    import psycopg

    proxy = start_proxy(tls=front_tls(bpki), backend=backend_cfg(pg_tls, bpki))
    rows = [f"{i:08d}" + "x" * 1000 for i in range(20_000)]  # ~20 MB each way
    with psycopg.connect(tls_client(proxy.port, bpki), autocommit=True) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                            ).fetchone() == (True,)
        big = conn.execute("SELECT repeat('y', 300000)").fetchone()
        assert big is not None and big[0] == "y" * 300000
        conn.execute("CREATE TEMP TABLE t (line text)")
        with conn.cursor().copy("COPY t FROM STDIN") as copy:
            for start in range(0, len(rows), 500):
                copy.write("".join(r + "\n" for r in rows[start:start + 500]))
        got = conn.execute("SELECT count(*), md5(string_agg(line, E'\\n' ORDER BY line)) "
                           "FROM t").fetchone()
        expected = hashlib.md5("\n".join(sorted(rows)).encode()).hexdigest()
        assert got == (len(rows), expected)
        out = bytearray()
        with conn.cursor().copy("COPY (SELECT line FROM t ORDER BY line) TO STDOUT") as copy:
            for chunk in copy:
                out += chunk
        assert bytes(out) == "".join(r + "\n" for r in sorted(rows)).encode()
        assert conn.execute("SELECT 42").fetchone() == (42,)


def test_a_revoking_reload_reaches_a_session_in_the_scram_plus_check(
        start_proxy: Callable[..., Proxy], pg_tls: TempPostgres, bpki: Pki,
        tmp_path: Path) -> None:
    """The window between the policy's Allow and link(): a client holds the proxy in its
    SCRAM-SHA-256-PLUS check (TLS both hops, the proxy's certificate not the database's) while
    a reload revokes its certificate. It must be judged by the configuration in force when it
    is linked: refused, never relayed on."""
    import ssl
    import struct

    from conftest import error_fields, raw_connect, read_message

    from proxy.protocol import wire

    ca = bpki.ca
    cert, key = certs.issue(ca, "scram_user")
    certs.write_certs(tmp_path / "c.crt", cert)
    certs.write_key(tmp_path / "c.key", key)
    crl = tmp_path / "crl.pem"
    certs.write_crl(crl, certs.make_crl(ca, []))
    proxy = start_proxy(tls={**front_tls(bpki), "ssl_ca_file": str(bpki.dir / "ca.pem"),
                             "ssl_crl_file": str(crl), "clientcert": "verify-ca"},
                        backend=backend_cfg(pg_tls, bpki))
    ctx = ssl.create_default_context(cafile=str(bpki.dir / "ca.pem"))
    ctx.load_cert_chain(tmp_path / "c.crt", tmp_path / "c.key")
    sock = raw_connect(proxy.port)
    sock.sendall(wire.build_request(wire.SSL_REQUEST_CODE))
    assert sock.recv(1) == b"S"
    with ctx.wrap_socket(sock, server_hostname="localhost") as conn:
        conn.sendall(wire.build_startup_message({"user": "scram_user",
                                                 "database": "postgres"}))
        kind, body = read_message(conn)
        assert kind == b"R" and body[:4] == struct.pack("!i", 10), (kind, body)
        assert b"SCRAM-SHA-256-PLUS" in body  # the proxy now waits in its -PLUS check
        certs.write_crl(crl, certs.make_crl(ca, [cert.serial_number]))
        proxy.signal(signal.SIGHUP)
        proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="success")
        first = b"n,,n=,r=0123456789abcdefghijklmn"
        mechanism = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
        conn.sendall(b"p" + struct.pack("!i", len(mechanism) + 4) + mechanism)
        fields = error_fields(*read_message(conn))
    assert fields["C"] == "28000" and "certificate revoked" in fields["M"], fields
    assert proxy.metric("dwsproxy_connections_total", encryption="tls", tls_version="TLSv1.3",
                        client_cert="verified", backend_encryption="tls") == 0
    proxy.wait_log("outcome=client_cert_revoked")
