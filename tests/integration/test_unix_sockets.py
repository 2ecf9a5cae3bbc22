"""Unix sockets on both hops (issue 26): psql and psycopg through the proxy's Unix-socket
listener ([listen] unix_socket_dir) and to a backend given as a socket directory, as libpq
reads `host=/dir`; rules of type "local" for the listener's clients."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import Proxy, run_psql

from proxy.tools.demo import TempPostgres


@pytest.fixture()
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dwsproxy-sock-") as folder:
        os.chmod(folder, 0o755)
        yield Path(folder)


def test_psql_and_psycopg_through_a_unix_socket_listener_to_a_unix_socket_backend(
        start_proxy: Callable[..., Proxy], pg: TempPostgres, sockdir: Path) -> None:
    proxy = start_proxy(listen={"unix_socket_dir": str(sockdir), "unix_socket_mode": "0770"},
                        backend={"host": str(pg.dir)}, tls={"ssl": True, "require_ssl": True})
    path = sockdir / f".s.PGSQL.{proxy.port}"
    proxy.wait_log(f"listening on {path}")
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o770
    # the backend session's client is the proxy on PostgreSQL's Unix socket: no client address
    query = "SELECT coalesce(inet_client_addr()::text, 'unix') || ' ' || current_user"
    proc = run_psql(f"host={sockdir} port={proxy.port} user=alice dbname=postgres", query)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "unix alice"
    with psycopg.connect(host=str(sockdir), port=proxy.port, user="postgres",
                         dbname="postgres") as conn:
        assert conn.execute(query).fetchone() == ("unix postgres",)
        assert conn.pgconn.ssl_in_use is False  # no TLS on a Unix socket, as PostgreSQL
    # require_ssl still holds for TCP clients
    proc = run_psql(f"host=127.0.0.1 port={proxy.port} user=alice dbname=postgres "
                    "sslmode=disable", "SELECT 1")
    assert proc.returncode != 0 and "SSL connection is required" in proc.stderr
    assert "[local]" in proxy.log()
    proxy.stop()
    assert not path.exists()  # removed at shutdown


def test_a_local_rule_judges_unix_socket_clients_only(
        start_proxy: Callable[..., Proxy], sockdir: Path) -> None:
    proxy = start_proxy(listen={"unix_socket_dir": str(sockdir)}, tls={"ssl": False}, rules=[
        {"type": "local", "user": "alice", "action": "reject"},
        {"type": "local", "action": "allow"},
        {"type": "host", "user": "postgres", "action": "allow"},
    ])
    proxy.wait_log("listening on")
    local = f"host={sockdir} port={proxy.port} dbname=postgres"
    refused = run_psql(f"{local} user=alice", "SELECT 1")
    assert refused.returncode != 0 and "rule #1 (type=local, user=alice)" in refused.stderr
    assert run_psql(f"{local} user=postgres", "SELECT 1").stdout.strip() == "1"
    with psycopg.connect(host=str(sockdir), port=proxy.port, user="bob",
                         dbname="postgres") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("bob",)
    tcp = f"host=127.0.0.1 port={proxy.port} dbname=postgres sslmode=disable"
    # over TCP the local rules do not apply: alice matches no host rule, postgres is allowed
    refused = run_psql(f"{tcp} user=alice", "SELECT 1")
    assert refused.returncode != 0 and "no rule matches host" in refused.stderr
    assert run_psql(f"{tcp} user=postgres", "SELECT 1").stdout.strip() == "1"


def test_a_stale_socket_file_left_by_a_killed_proxy_is_replaced(
        start_proxy: Callable[..., Proxy], sockdir: Path) -> None:
    first = start_proxy(listen={"unix_socket_dir": str(sockdir)}, tls={"ssl": False})
    first.wait_log("listening on")
    path = sockdir / f".s.PGSQL.{first.port}"
    first.proc.kill()  # no clean-up: the socket file stays behind
    first.proc.wait(10)
    assert path.exists()
    second = start_proxy(listen={"unix_socket_dir": str(sockdir), "port": first.port},
                         tls={"ssl": False})
    second.wait_log(f"listening on {path}")
    proc = run_psql(f"host={sockdir} port={first.port} user=postgres dbname=postgres",
                    "SELECT 1")
    assert proc.stdout.strip() == "1", proc.stderr
