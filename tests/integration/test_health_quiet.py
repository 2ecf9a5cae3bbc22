"""The backend health check leaves no line in PostgreSQL's log at its default logging
settings (issue 22 item 4), with a plaintext and a TLS backend, as a bare reachability check
and as the health-check user's login; and each host of a list is checked against its own
name under verify-full (issue 24)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Proxy, run_psql
from test_backend_tls import Pki

from proxy.tools.demo import TempPostgres

# PostgreSQL's defaults: TempPostgres turns both on for the other tests
DEFAULT_LOGGING = "log_connections = off\nlog_disconnections = off\n"
WATCH = 30.0  # seconds of log read, as the issue asks
TLS_HBA = """local all all trust
hostssl all all 127.0.0.0/8 trust clientcert=verify-full
hostnossl all all 127.0.0.0/8 reject
"""


@pytest.fixture(scope="module")
def qpki() -> Iterator[Pki]:
    folder = Path(tempfile.mkdtemp(prefix="dwsproxy-qpki-"))
    yield Pki(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def quiet_pgs(qpki: Pki) -> Iterator[tuple[TempPostgres, TempPostgres]]:
    plain = TempPostgres(extra_conf=DEFAULT_LOGGING).start()
    files = {"server.crt": (qpki.dir / "db.crt").read_bytes(),
             "server.key": (qpki.dir / "db.key").read_bytes(),
             "root.crt": (qpki.dir / "ca.pem").read_bytes()}
    tls = TempPostgres(hba=TLS_HBA, files=files, extra_conf=DEFAULT_LOGGING + (
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
        "ssl_ca_file = 'root.crt'\nlisten_addresses = '127.0.0.1,127.0.0.2'\n")).start()
    yield plain, tls
    plain.stop()
    tls.stop()


def tls_backend(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"sslmode": "verify-full", "sslrootcert": str(pki.dir / "ca.pem"),
            "sslcert": str(pki.dir / "client.crt"), "sslkey": str(pki.dir / "client.key"),
            **extra}


def checked_at(proxy: Proxy) -> list[str]:
    return [b["checked_at"] for b in proxy.admin_json("/status")["backends"]]


def test_the_health_check_leaves_no_line_in_postgresql_s_log(
        start_proxy: Callable[..., Proxy], quiet_pgs: tuple[TempPostgres, TempPostgres],
        qpki: Pki) -> None:
    plain, tls = quiet_pgs
    every = {"health_check_interval": 0.2, "host": "localhost"}
    proxies = [
        start_proxy(pg_port=plain.port, tls={"ssl": False}, backend=every),
        start_proxy(pg_port=plain.port, tls={"ssl": False},
                    backend={**every, "health_check_user": "postgres"}),
        start_proxy(pg_port=tls.port, tls={"ssl": False}, backend=tls_backend(qpki, **every)),
        start_proxy(pg_port=tls.port, tls={"ssl": False}, backend=tls_backend(
            qpki, health_check_user="postgres", **every)),
    ]
    ports = [plain.port, plain.port, tls.port, tls.port]
    for proxy, port in zip(proxies, ports, strict=True):
        # each has checked its backend at least once, and found it up
        proxy.wait_metric("dwsproxy_backend_up", 1, backend=f"localhost:{port}")
    sessions_before = logins(plain), logins(tls)
    offsets = {pg.port: pg.log_path.stat().st_size for pg in (plain, tls)}
    first = [checked_at(p) for p in proxies]
    deadline = time.monotonic() + WATCH
    while time.monotonic() < deadline:
        time.sleep(1.0)
        for pg in (plain, tls):
            with open(pg.log_path, errors="replace") as fh:
                fh.seek(offsets[pg.port])
                new = fh.read()
            assert new == "", f"PostgreSQL {pg.port} logged during the checks:\n{new}"
    # the checks kept running all along (5 a second per proxy), the logins too
    assert all(checked_at(p) != f for p, f in zip(proxies, first, strict=True))
    assert logins(plain) > sessions_before[0] and logins(tls) > sessions_before[1]
    for proxy, port in zip(proxies, ports, strict=True):
        assert proxy.metric("dwsproxy_backend_up", backend=f"localhost:{port}") == 1


def logins(pg: TempPostgres) -> int:
    """Sessions PostgreSQL counted (pg_stat_database.sessions, PostgreSQL 14+)."""
    pg.sql("SELECT pg_stat_clear_snapshot()")
    return int(pg.sql("SELECT sum(sessions) FROM pg_stat_database"))


def test_verify_full_checks_each_host_against_its_own_name(
        start_proxy: Callable[..., Proxy], quiet_pgs: tuple[TempPostgres, TempPostgres],
        qpki: Pki) -> None:
    _, tls = quiet_pgs
    # the database's certificate names localhost and 127.0.0.1, not 127.0.0.2: the first
    # host must fail its own name check, the second pass its own
    proxy = start_proxy(pg_port=tls.port, tls={"ssl": False}, backend=tls_backend(
        qpki, host=["127.0.0.2", "localhost"]))
    proc = run_psql(f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
                    "sslmode=disable", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert proc.returncode == 0 and proc.stdout.strip() == "t", proc.stderr
    rows = {b["address"]: b for b in proxy.admin_json("/status")["backends"]}
    assert rows[f"127.0.0.2:{tls.port}"]["up"] is False
    assert "does not match the host name" in rows[f"127.0.0.2:{tls.port}"]["error"]
    assert rows[f"localhost:{tls.port}"]["up"] is True
