"""Several backends (issue 24) with real PostgreSQL: a primary and its streaming standby made
with pg_basebackup -R, libpq's host lists through the proxy, target_session_attrs learnt on the
proxy's own connection, load balancing, per-host health in /status and the metrics, and a
CancelRequest sent to the host that holds the session."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Proxy, StandbyPostgres, run_psql

from proxy.tools.demo import TempPostgres, free_port

PrimaryStandby = tuple[TempPostgres, StandbyPostgres]


def server_port(proxy: Proxy, user: str = "postgres") -> int:
    """The port of the PostgreSQL server a new session through the proxy landed on."""
    proc = run_psql(f"host=127.0.0.1 port={proxy.port} user={user} dbname=postgres "
                    "sslmode=disable", "SELECT inet_server_port()")
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


def start(start_proxy: Callable[..., Proxy], hosts: list[int], **backend: Any) -> Proxy:
    return start_proxy(backend={"host": ["127.0.0.1"] * len(hosts), "port": hosts,
                                "connect_timeout": 2.0, **backend},
                       tls={"ssl": False})


def test_first_host_down_sessions_land_on_the_next_within_connect_timeout(
        start_proxy: Callable[..., Proxy], primary_standby: PrimaryStandby) -> None:
    primary, _ = primary_standby
    down = free_port()  # nothing listens there: refused at once, as a stopped CN
    proxy = start(start_proxy, [down, primary.port])
    for _ in range(5):
        t0 = time.monotonic()
        assert server_port(proxy) == primary.port
        assert time.monotonic() - t0 < 2.0  # within connect_timeout
    status = proxy.admin_json("/status")
    rows = {b["address"]: b for b in status["backends"]}
    assert rows[f"127.0.0.1:{down}"]["up"] is False
    assert rows[f"127.0.0.1:{primary.port}"]["up"] is True


def test_none_fits_names_every_host_tried_and_why(
        start_proxy: Callable[..., Proxy], primary_standby: PrimaryStandby) -> None:
    _, standby = primary_standby
    down = free_port()
    proxy = start(start_proxy, [standby.port, down], target_session_attrs="read-write",
                  health_check_user="health")
    proc = run_psql(f"host=127.0.0.1 port={proxy.port} user=postgres sslmode=disable",
                    "SELECT 1")
    assert proc.returncode != 0
    assert "could not connect to any database server" in proc.stderr
    assert f"127.0.0.1:{standby.port}: session is read-only" in proc.stderr
    assert f"127.0.0.1:{down}: " in proc.stderr and "refused" in proc.stderr.lower()


def test_read_write_with_the_standby_first_puts_every_session_on_the_primary(
        start_proxy: Callable[..., Proxy], primary_standby: PrimaryStandby) -> None:
    primary, standby = primary_standby
    proxy = start(start_proxy, [standby.port, primary.port],
                  target_session_attrs="read-write", health_check_user="health")
    assert {server_port(proxy) for _ in range(10)} == {primary.port}
    # the role was learnt on the proxy's own connection, as the health-check user: the
    # client's session carried its own StartupMessage only
    status = proxy.admin_json("/status")
    roles = {b["address"]: b["role"] for b in status["backends"]}
    assert roles == {f"127.0.0.1:{standby.port}": "standby",
                     f"127.0.0.1:{primary.port}": "primary"}


@pytest.mark.parametrize("attrs", ["standby", "read-only", "prefer-standby"])
def test_standby_puts_every_session_on_the_standby(
        start_proxy: Callable[..., Proxy], primary_standby: PrimaryStandby, attrs: str) -> None:
    primary, standby = primary_standby
    proxy = start(start_proxy, [primary.port, standby.port], target_session_attrs=attrs,
                  health_check_user="health")
    assert {server_port(proxy) for _ in range(8)} == {standby.port}


def test_prefer_standby_falls_back_to_the_primary_when_no_standby_answers(
        start_proxy: Callable[..., Proxy], primary_standby: PrimaryStandby) -> None:
    primary, _ = primary_standby
    proxy = start(start_proxy, [free_port(), primary.port],
                  target_session_attrs="prefer-standby", health_check_user="health")
    assert server_port(proxy) == primary.port


def test_random_spreads_40_sessions_over_two_hosts(
        start_proxy: Callable[..., Proxy], primary_standby: PrimaryStandby) -> None:
    primary, standby = primary_standby
    proxy = start(start_proxy, [primary.port, standby.port], load_balance_hosts="random")
    counts = Counter(server_port(proxy) for _ in range(40))
    assert set(counts) == {primary.port, standby.port}
    assert min(counts.values()) >= 8, counts


def test_backend_up_per_host(start_proxy: Callable[..., Proxy],
                             primary_standby: PrimaryStandby) -> None:
    primary, standby = primary_standby
    down = free_port()
    proxy = start(start_proxy, [primary.port, standby.port, down],
                  health_check_interval=0.2)
    proxy.wait_metric("dwsproxy_backend_up", 1, backend=f"127.0.0.1:{primary.port}")
    proxy.wait_metric("dwsproxy_backend_up", 1, backend=f"127.0.0.1:{standby.port}")
    proxy.wait_metric("dwsproxy_backend_up", 0, backend=f"127.0.0.1:{down}")
    assert ("dwsproxy_backend_up", (("backend", f"127.0.0.1:{down}"),)) in proxy.metrics()
    assert proxy.http("/livez")[0] == 200
    assert proxy.http("/readyz")[0] == 200


def test_readyz_is_503_when_no_host_answers_and_asks_itself_with_interval_0(
        start_proxy: Callable[..., Proxy]) -> None:
    down = free_port()
    proxy = start(start_proxy, [down], health_check_interval=0)
    assert proxy.http("/livez")[0] == 200
    assert proxy.http("/readyz")[0] == 503
    status = proxy.admin_json("/status")
    assert status["backends"][0]["address"] == f"127.0.0.1:{down}"
    assert status["backends"][0]["up"] is False and status["backends"][0]["checked_at"]


def test_a_cancel_reaches_the_host_that_holds_the_session(
        start_proxy: Callable[..., Proxy], primary_standby: PrimaryStandby) -> None:
    primary, standby = primary_standby
    # the session lands on the second host: a cancel sent to the first would not stop it
    proxy = start(start_proxy, [primary.port, standby.port], target_session_attrs="standby",
                  health_check_user="health")
    primary_log = primary.log_path.read_text(errors="replace")
    with psycopg.connect(f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
                         "sslmode=disable", autocommit=True) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (standby.port,)
        pid = conn.info.backend_pid
        timer = threading.Timer(1.0, conn.cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - t0 < 10
        timer.join()
    assert "did not match any process" not in \
        primary.log_path.read_text(errors="replace")[len(primary_log):]
    assert f"backend 127.0.0.1:{standby.port}" in proxy.wait_log("cancel_forwarded")
    assert pid


@pytest.mark.parametrize("method", ["scram-sha-256", "md5", "password"])
def test_the_health_check_user_logs_in_with_its_password_file(
        start_proxy: Callable[..., Proxy], workdir: Path, method: str) -> None:
    hba = (f"local all all trust\nhost all health 127.0.0.1/32 {method}\n"
           "host all all 127.0.0.1/32 trust\n")
    encryption = "md5" if method == "md5" else "scram-sha-256"
    server = TempPostgres(hba=hba, extra_conf=f"password_encryption = '{encryption}'\n").start()
    try:
        server.sql("CREATE ROLE health LOGIN PASSWORD 'h3alth-pw'")
        good, bad = workdir / f"health-{method}.pw", workdir / f"health-{method}-bad.pw"
        good.write_text("h3alth-pw\n")
        bad.write_text("wrong\n")
        for f in (good, bad):
            f.chmod(0o600)
        proxy = start(start_proxy, [server.port], target_session_attrs="primary",
                      health_check_user="health", health_check_password_file=str(good))
        assert server_port(proxy) == server.port
        assert proxy.admin_json("/status")["backends"][0]["role"] == "primary"
        wrong = start(start_proxy, [server.port], target_session_attrs="primary",
                      health_check_user="health", health_check_password_file=str(bad))
        proc = run_psql(f"host=127.0.0.1 port={wrong.port} user=postgres sslmode=disable",
                        "SELECT 1")
        assert proc.returncode != 0
        assert "password authentication failed" in proc.stderr, proc.stderr
        assert "h3alth-pw" not in wrong.log() and "wrong" not in proc.stderr
    finally:
        server.stop()


def test_sessions_arriving_together_do_not_queue_behind_a_hanging_hosts_role_check(
        start_proxy: Callable[..., Proxy], pg: TempPostgres) -> None:
    """A host that completes TCP and never answers (a CN hung in a failover), listed first,
    with a target_session_attrs that needs its role: eight psql sessions at once. The first
    role check pays connect_timeout and its failure is given to every session waiting on it,
    and to later ones while the host is in back-off; before, each waiting session ran its own
    check in turn (the eighth waited ~8 s at connect_timeout 1). Found by a hostile review."""
    import socket

    hanging = socket.create_server(("127.0.0.1", 0), backlog=64)  # never accepts, never speaks
    try:
        proxy = start_proxy(tls={"ssl": False}, listen={"startup_timeout": 10.0}, backend={
            "host": ["127.0.0.1", "127.0.0.1"], "port": [hanging.getsockname()[1], pg.port],
            "connect_timeout": 1.0, "target_session_attrs": "read-write",
            "health_check_user": "postgres", "health_check_interval": 600.0})
        took: list[float] = []
        codes: list[int] = []

        def one() -> None:
            t0 = time.monotonic()
            proc = run_psql(f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
                            "sslmode=disable", "SELECT 1", timeout=60)
            took.append(time.monotonic() - t0)
            codes.append(proc.returncode)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert codes == [0] * 8
        assert max(took) < 1.0 + 2.0, sorted(took)  # one role check's timeout, and slack
    finally:
        hanging.close()


def test_a_guessed_cancel_key_is_not_fanned_out_to_every_host(
        start_proxy: Callable[..., Proxy]) -> None:
    """One process and three hosts: a CancelRequest with a key no session of it holds is
    stale or guessed; sent to every host it was three backend forks for one request, charged
    one token of the source's cancel rate (hostile review). Now it goes nowhere."""
    import contextlib
    import os
    import socket
    import struct

    class Host(threading.Thread):
        def __init__(self) -> None:
            super().__init__(daemon=True)
            self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
            self.port = self.sock.getsockname()[1]
            self.accepted = 0

        def run(self) -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = self.sock.accept()
                    self.accepted += 1
                    conn.close()

    hosts = [Host() for _ in range(3)]
    for host in hosts:
        host.start()
    try:
        proxy = start_proxy(tls={"ssl": False}, backend={
            "host": ["127.0.0.1"] * 3, "port": [h.port for h in hosts],
            "health_check_interval": 600.0})
        deadline = time.monotonic() + 10
        while any(h.accepted == 0 for h in hosts):  # the first health round
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = [h.accepted for h in hosts]
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall(struct.pack("!iiI", 16, 80877102, 4242) + os.urandom(4))
                with contextlib.suppress(OSError):
                    sock.recv(1)  # the proxy closes: PostgreSQL never answers a cancel
        proxy.wait_metric("dwsproxy_cancel_requests_total", 10, result="refused")
        assert [h.accepted for h in hosts] == before
    finally:
        for host in hosts:
            host.sock.close()
