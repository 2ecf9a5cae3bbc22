"""[listen] tcp_keepalives_* and tcp_user_timeout (issue 21 item 10): the values on the
proxy's accepted and backend sockets, read from the running proxy (pidfd_getfd duplicates its
descriptors into this process: root or ptrace rights needed), and a silently dead client (its
packets routed into a black hole by an `ip rule` on its source port, in a network namespace
made for the test, so no other traffic of the machine is touched; tc and iptables need kernel
modules this machine's containers cannot load) whose backend session is gone from pg_stat_activity
within the configured time."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from conftest import Proxy

from proxy.tools.demo import TempPostgres

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 share it
CLONE_NEWNET = 0x40000000


def _proxy_sockets(pid: int) -> Iterator[socket.socket]:
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            sock = socket.socket(fileno=fd)
            if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_INET:
                sock.close()
                continue
            yield sock
    finally:
        os.close(pidfd)


def _options(sock: socket.socket) -> tuple[int, int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


def test_accepted_and_backend_sockets_carry_the_configured_values(
        start_proxy: Callable[..., Proxy], pg: TempPostgres) -> None:
    proxy = start_proxy(tls={"ssl": False}, listen={
        "tcp_keepalives_idle": 17, "tcp_keepalives_interval": 3, "tcp_keepalives_count": 4,
        "tcp_user_timeout": 12345})
    with psycopg.connect(host="127.0.0.1", port=proxy.port, user="postgres",
                         dbname="postgres", sslmode="disable") as conn:
        conn.execute("SELECT 1")
        client_port = socket.socket(fileno=os.dup(conn.pgconn.socket)).getsockname()[1]
        found = {}
        for sock in _proxy_sockets(proxy.proc.pid):
            with sock:
                try:
                    local, peer = sock.getsockname(), sock.getpeername()
                except OSError:
                    continue
                if local[1] == proxy.port and peer[1] == client_port:
                    found["accepted"] = _options(sock)
                elif peer[1] == pg.port:
                    found["backend"] = _options(sock)
    assert found == {"accepted": (1, 17, 3, 4, 12345), "backend": (1, 17, 3, 4, 12345)}, found


def test_defaults_reap_a_dead_client_within_minutes(
        start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(tls={"ssl": False})
    with psycopg.connect(host="127.0.0.1", port=proxy.port, user="postgres",
                         dbname="postgres", sslmode="disable") as conn:
        conn.execute("SELECT 1")
        client_port = socket.socket(fileno=os.dup(conn.pgconn.socket)).getsockname()[1]
        for sock in _proxy_sockets(proxy.proc.pid):
            with sock:
                try:
                    if sock.getpeername()[1] != client_port:
                        continue
                except OSError:
                    continue
                keepalive, idle, interval, count, _ = _options(sock)
                assert keepalive == 1 and idle + interval * count <= 300, (idle, interval, count)
                return
    raise AssertionError("the accepted socket was not found")


@contextmanager
def _in_new_netns() -> Iterator[None]:
    """This thread (and what it starts) in a network namespace of its own, with lo up."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and ip for a network namespace")
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            pytest.skip(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield
        finally:
            assert _libc.setns(original, CLONE_NEWNET) == 0
    finally:
        os.close(original)


def _unacked(proxy_port: int, client_port: int) -> int:
    """Bytes the proxy sent the client that it has not acknowledged (ss's Send-Q)."""
    out = subprocess.run(["ss", "-tnH", "state", "established", "src",
                          f"127.0.0.1:{proxy_port}", "dst", f"127.0.0.1:{client_port}"],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[1]) if out else 0


@pytest.mark.parametrize("case", ["idle", "unacked"])
def test_a_silently_dead_client_loses_its_backend_session_in_time(
        pki: object, workdir: object, case: str) -> None:
    """A client inside a transaction holding a lock goes silent (every packet it sends is
    dropped: no ACK, no FIN, no RST). `idle`: everything the proxy sent it was acknowledged,
    and keepalive 1 s + 2 x 1 s drops it. `unacked`: the ACK of its last reply is lost too, so
    the proxy's socket retransmits instead of probing (keepalive never starts, and the kernel
    would retry for ~15 minutes): tcp_user_timeout bounds that. Either way its backend session
    ends within seconds (the OS defaults would be 2 hours, or 15 minutes)."""
    from pathlib import Path

    listen: dict[str, object] = {"tcp_keepalives_idle": 1, "tcp_keepalives_interval": 1,
                                 "tcp_keepalives_count": 2}
    if case == "unacked":
        listen["tcp_user_timeout"] = 3000
    with _in_new_netns():
        pg = TempPostgres().start()
        proxy = None
        try:
            proxy = Proxy(Path(str(workdir)), pg.port, Path(str(pki)), tls={"ssl": False},
                          listen=listen)
            conn = psycopg.connect(host="127.0.0.1", port=proxy.port, user="postgres",
                                   dbname="postgres", sslmode="disable",
                                   application_name="deadclient")
            conn.execute("CREATE TABLE IF NOT EXISTS held (x int)")
            conn.commit()
            conn.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")  # a transaction, a lock
            port = socket.socket(fileno=os.dup(conn.pgconn.socket)).getsockname()[1]
            count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deadclient'"
            assert pg.sql(count) == "1"
            if case == "idle":  # the client's delayed ACK of the LOCK's reply has gone out
                deadline = time.monotonic() + 5
                while _unacked(proxy.port, port):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            # every packet the client sends from now on is routed into a black hole (a
            # policy rule ahead of the local table): it neither ACKs nor resets anything
            for rule in (["del", "pref", "0", "lookup", "local"],
                         ["add", "pref", "100", "lookup", "local"],
                         ["add", "pref", "10", "ipproto", "tcp", "sport", str(port),
                          "blackhole"]):
                subprocess.run(["ip", "rule", *rule], check=True)
            t0 = time.monotonic()
            while pg.sql(count) != "0":
                assert time.monotonic() - t0 < 30, "the dead client's session is still there"
                time.sleep(0.2)
            took = time.monotonic() - t0
            print(f"dead client's backend session gone after {took:.1f} s")
            assert took < 10  # idle 1 + 2 x 1 s (or the 3 s user timeout), and the close
            assert pg.sql("SELECT count(*) FROM pg_locks WHERE relation = 'held'::regclass") \
                == "0"
        finally:
            if proxy is not None:
                proxy.stop()
            pg.stop()
