"""What a DBA sees of proxied sessions, read on PostgreSQL directly (never through the proxy):
the client's address in application_name, /sessions joined to pg_stat_activity by backend_pid,
and terminations that end the running query, not only the client's connection."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Proxy

from proxy.tools.demo import TempPostgres

SLEEP = "SELECT pg_sleep(60)"


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def activity(pg: TempPostgres, where: str) -> list[str]:
    out = pg.sql(f"SELECT pid || '|' || coalesce(application_name, '') || '|' || state || '|' "
                 f"|| coalesce(client_port, -1) FROM pg_stat_activity WHERE {where}")
    return [line for line in out.splitlines() if line]


def connect(proxy: Proxy, app: str, **kw: str) -> Any:
    import psycopg

    extra = " ".join(f"{k}={v}" for k, v in kw.items())
    return psycopg.connect(f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
                           f"sslmode=require application_name={app} {extra}", autocommit=True)


class Sleeper:
    """A psycopg session running pg_sleep(60) through the proxy, in a thread; `error` is what
    the query ended with."""

    def __init__(self, proxy: Proxy, app: str) -> None:
        self.conn = connect(proxy, app)
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.execute(SLEEP)
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.conn.close()


def running(pg: TempPostgres, pid: int) -> bool:
    return bool(activity(pg, f"pid = {pid} AND query = '{SLEEP}'"))


# -- the client's address in application_name ---------------------------------------------------
def test_application_name_add_host_seen_in_pg_stat_activity(
        start_proxy: Callable[..., Proxy], pg: TempPostgres) -> None:
    # the rule matches the client's own application_name, not the one the backend gets
    proxy = start_proxy(backend={"application_name_add_host": True},
                        rules=[{"application_name": "dba-app", "action": "allow"}])
    with connect(proxy, "dba-app") as conn:
        pid, port = conn.execute("SELECT pg_backend_pid(), inet_client_port()").fetchone()
        local = conn.pgconn.socket
        assert local >= 0
        row = activity(pg, f"pid = {pid}")
        name = row[0].split("|")[1]
        client = next(s for s in proxy.admin_json("/sessions")["sessions"]
                  if s["backend_pid"] == pid)["peer"]
        assert name == f"dba-app - {client}", (name, client)
        assert client.startswith("127.0.0.1:") and port == int(row[0].split("|")[3])
        # what the client itself sees is what the backend was told (ParameterStatus)
        assert conn.execute("SHOW application_name").fetchone()[0] == name


def test_application_name_add_host_truncates_the_clients_part_never_the_address(
        start_proxy: Callable[..., Proxy], pg: TempPostgres) -> None:
    proxy = start_proxy(backend={"application_name_add_host": True})
    long_name = "x" * 70
    with connect(proxy, long_name) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        name = activity(pg, f"pid = {pid}")[0].split("|")[1]
        peer = next(s for s in proxy.admin_json("/sessions")["sessions"]
                if s["backend_pid"] == pid)["peer"]
        assert name.endswith(f" - {peer}") and len(name.encode()) <= 63, name
        assert name.startswith("x" * 20)


def test_application_name_add_host_off_by_default(start_proxy: Callable[..., Proxy],
                                                  pg: TempPostgres) -> None:
    proxy = start_proxy()
    with connect(proxy, "plain-app") as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert activity(pg, f"pid = {pid}")[0].split("|")[1] == "plain-app"


# -- /sessions joined to pg_stat_activity --------------------------------------------------------
def test_sessions_show_backend_pid_and_local_port(start_proxy: Callable[..., Proxy],
                                                  pg: TempPostgres) -> None:
    proxy = start_proxy()
    with connect(proxy, "join-me") as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        rows = [s for s in proxy.admin_json("/sessions")["sessions"]
                if s["application_name"] == "join-me"]
        assert len(rows) == 1
        row = rows[0]
        assert row["backend_pid"] == pid
        assert row["backend_secret_known"] is True
        assert row["backend"] == f"127.0.0.1:{pg.port}"
        client_port = int(activity(pg, f"pid = {pid}")[0].split("|")[3])
        assert row["backend_local_port"] == client_port
        assert "secret" not in str(row).replace("backend_secret_known", "")
        out = subprocess.run(
            [sys.executable, "-m", "proxy", "sessions", "--config", str(proxy.config_path)],
            capture_output=True, text=True, cwd=REPO, timeout=30)
        assert out.returncode == 0, out.stderr
        line = next(ln for ln in out.stdout.splitlines() if "join-me" in ln)
        assert str(pid) in line.split() and str(client_port) in line.split()


# -- termination that stops the work ---------------------------------------------------------
def test_terminate_by_hand_cancels_the_running_query(start_proxy: Callable[..., Proxy],
                                                     pg: TempPostgres) -> None:
    import psycopg

    proxy = start_proxy()
    sleeper = Sleeper(proxy, "to-kill")
    try:
        wait_until(lambda: running(pg, sleeper.pid), 10, "pg_sleep running")
        sid = next(s for s in proxy.admin_json("/sessions")["sessions"]
               if s["backend_pid"] == sleeper.pid)["id"]
        status, _, body = proxy.admin_http(f"/sessions/{sid}/terminate", method="POST",
                                           token=True)
        assert status == 202, body
        took = wait_until(lambda: not activity(pg, f"pid = {sleeper.pid}"), 3,
                          "the backend left pg_stat_activity")
        sleeper.thread.join(5)
        assert isinstance(sleeper.error, psycopg.errors.AdminShutdown), repr(sleeper.error)
        print(f"terminate: backend gone after {took:.2f}s")
    finally:
        sleeper.close()
    proxy.wait_metric("dwsproxy_sessions_terminated_total", 1, reason="admin")


def test_dwsproxy_kill_from_the_shell(start_proxy: Callable[..., Proxy],
                                      pg: TempPostgres) -> None:
    proxy = start_proxy()
    sleeper = Sleeper(proxy, "to-kill-cli")
    try:
        wait_until(lambda: running(pg, sleeper.pid), 10, "pg_sleep running")
        sid = next(s for s in proxy.admin_json("/sessions")["sessions"]
               if s["backend_pid"] == sleeper.pid)["id"]
        out = subprocess.run([sys.executable, "-m", "proxy", "kill", sid, "--config",
                              str(proxy.config_path)], capture_output=True, text=True,
                             cwd=REPO, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        wait_until(lambda: not activity(pg, f"pid = {sleeper.pid}"), 3,
                   "the backend left pg_stat_activity")
        again = subprocess.run([sys.executable, "-m", "proxy", "kill", sid, "--config",
                                str(proxy.config_path)], capture_output=True, text=True,
                               cwd=REPO, timeout=30)
        assert again.returncode != 0 and "no such session" in again.stderr
    finally:
        sleeper.close()


def test_a_revoking_reload_ends_the_running_query(start_proxy: Callable[..., Proxy],
                                                  pg: TempPostgres) -> None:
    proxy = start_proxy(rules=[{"user": "postgres", "action": "allow"}])
    sleeper = Sleeper(proxy, "to-revoke")
    try:
        wait_until(lambda: running(pg, sleeper.pid), 10, "pg_sleep running")
        text = proxy.config_path.read_text().replace('action = "allow"', 'action = "reject"')
        proxy.config_path.write_text(text)
        proxy.signal(signal.SIGHUP)
        took = wait_until(lambda: not activity(pg, f"pid = {sleeper.pid}"), 3,
                          "the backend left pg_stat_activity")
        print(f"revoked: backend gone after {took:.2f}s")
        sleeper.thread.join(5)
        assert "terminating connection: connection refused by rule #1" in str(sleeper.error)
    finally:
        sleeper.close()


def test_shutdown_past_grace_ends_the_running_query(start_proxy: Callable[..., Proxy],
                                                    pg: TempPostgres) -> None:
    proxy = start_proxy(listen={"shutdown_grace": 0.5})
    sleeper = Sleeper(proxy, "to-shut")
    try:
        wait_until(lambda: running(pg, sleeper.pid), 10, "pg_sleep running")
        proxy.signal(signal.SIGTERM)
        wait_until(lambda: not activity(pg, f"pid = {sleeper.pid}"), 3.5,
                   "the backend left pg_stat_activity")
        sleeper.thread.join(5)
        assert "the proxy is shutting down" in str(sleeper.error), sleeper.error
    finally:
        sleeper.close()


# -- the admin plane of its own ------------------------------------------------------------------
@pytest.fixture()
def admin_proxy(start_proxy: Callable[..., Proxy]) -> Iterator[Proxy]:
    yield start_proxy()


def test_views_left_the_metrics_listener(admin_proxy: Proxy) -> None:
    assert admin_proxy.http("/sessions")[0] == 404
    assert admin_proxy.http("/metrics")[0] == 200
    assert admin_proxy.admin_http("/sessions")[0] == 200


def test_admin_token_host_and_headers(admin_proxy: Proxy) -> None:
    status, headers, _ = admin_proxy.admin_http("/sessions", token=False)
    assert status == 401  # the fixture configures a token file
    status, headers, _ = admin_proxy.admin_http("/sessions", token="wrong")
    assert status == 401
    status, headers, _ = admin_proxy.admin_http("/sessions", token=True, host="evil.example")
    assert status == 403
    status, headers, _ = admin_proxy.admin_http("/", token=True)
    assert status == 200 and headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert admin_proxy.admin_http("/sessions/nope/terminate", method="POST",
                                  token=True)[0] == 404
    admin_proxy.wait_metric("dwsproxy_admin_requests_total", 2, view="sessions",
                            result="unauthorized")
    admin_proxy.wait_metric("dwsproxy_admin_requests_total", 1, view="sessions",
                            result="refused")


def test_actions_need_a_token_even_on_loopback(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(admin={"token_file": ""})
    assert proxy.admin_http("/sessions", token=False)[0] == 200  # loopback, no token
    status, _, body = proxy.admin_http("/sessions/1-1/terminate", method="POST", token=False)
    assert status == 401 and b"token_file" in body


def test_a_flood_of_idle_admin_connections_leaves_psql_and_sighup_working(
        start_proxy: Callable[..., Proxy]) -> None:
    """1,000 idle connections to the admin port (and 300 to the metrics port) against a proxy
    with 512 descriptors: while they are open, psql connects at once and a SIGHUP applies."""
    import resource
    import select
    import socket

    from conftest import clean_env, run_psql

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    proxy = start_proxy(wrap=["prlimit", "--nofile=512"])
    idle: list[socket.socket] = []
    try:
        for port, count in ((proxy.admin_port, 1000), (proxy.metrics_port, 300)):
            for _ in range(count):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", port))
                idle.append(sock)
        # until every flood connection is established (the listeners keep accepting), or 4 s:
        # well inside the 5 s a connection may take to send its request
        poll = select.poll()
        pending = {sock.fileno(): sock for sock in idle}
        for fd in pending:
            poll.register(fd, select.POLLOUT)
        t0 = time.monotonic()
        while pending and time.monotonic() - t0 < 4:
            for fd, _ in poll.poll(200):
                poll.unregister(fd)
                del pending[fd]
        env = clean_env(PGCONNECT_TIMEOUT="3")
        t1 = time.monotonic()
        done_psql = run_psql(f"host=127.0.0.1 port={proxy.port} user=postgres "
                             "dbname=postgres sslmode=require", "SELECT 'still here'", env=env)
        assert done_psql.returncode == 0 and done_psql.stdout.strip() == "still here", (
            done_psql.stderr)
        assert time.monotonic() - t1 < 3
        before = proxy.log().count("configuration in force")
        proxy.signal(signal.SIGHUP)
        wait_until(lambda: proxy.log().count("configuration in force") > before, 3,
                   "the reload applied while the flood is open")
        assert "Too many open files" not in proxy.log()
        print(f"flood: {len(idle) - len(pending)} of {len(idle)} connections established")
    finally:
        for sock in idle:
            sock.close()


def test_cli_escapes_what_clients_chose(start_proxy: Callable[..., Proxy], tmp_path: Path
                                        ) -> None:
    proxy = start_proxy()
    evil = "evil\x1b]0;owned\x07\x1b[2J"
    with connect(proxy, "'" + evil.replace("\\", "\\\\").replace("'", "\\'") + "'"):
        out = subprocess.run(
            [sys.executable, "-m", "proxy", "sessions", "--config", str(proxy.config_path)],
            capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "evil\\x1b]0;owned\\x07\\x1b[2J" in out.stdout


def test_terminate_reaches_a_session_held_by_a_worker(start_proxy: Callable[..., Proxy],
                                                      pg: TempPostgres) -> None:
    """With workers = 2 the main process serves the admin listener; a session held by the
    other worker is ended there, its query cancelled."""
    import psycopg

    proxy = start_proxy(listen={"workers": 2})
    deadline = time.monotonic() + 20
    while proxy.log().count("listening on") < 2:
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)
    conns = [connect(proxy, f"w-{i}") for i in range(10)]
    try:
        rows = [s for s in proxy.admin_json("/sessions")["sessions"]
                if (s["application_name"] or "").startswith("w-")]
        elsewhere = [s for s in rows if s["worker"] != proxy.proc.pid]
        assert elsewhere, "SO_REUSEPORT gave the other worker none of 10 sessions"
        target = elsewhere[0]
        victim = conns[int(target["application_name"][2:])]
        holder = threading.Thread(target=lambda: _sleep_quietly(victim), daemon=True)
        holder.start()
        wait_until(lambda: running(pg, target["backend_pid"]), 10, "pg_sleep running")
        status, _, body = proxy.admin_http(f"/sessions/{target['id']}/terminate",
                                           method="POST")
        assert status == 202, body
        wait_until(lambda: not activity(pg, f"pid = {target['backend_pid']}"), 3,
                   "the worker's backend left pg_stat_activity")
        holder.join(5)
        others = [c for c in conns if c is not victim]
        assert all(c.execute("SELECT 1").fetchone() == (1,) for c in others)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
    finally:
        for conn in conns:
            conn.close()


def _sleep_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.execute(SLEEP)
