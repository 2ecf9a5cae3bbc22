"""The PROXY protocol in front of the proxy: psql through a real HAProxy (send-proxy and
send-proxy-v2) is judged by the address in the header, and every way a header can be wrong
closes the connection, counted in dwsproxy_proxy_protocol_total.

HAProxy connects to the proxy from 127.0.0.3 (`source`), the only trusted address; psql
connects to HAProxy from 127.0.0.1, the address the header carries."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Proxy, clean_env, read_until_close, run_psql

from proxy.protocol import proxyproto, wire
from proxy.tools.demo import free_port, wait_port

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                      if Path("/usr/sbin/haproxy").exists() else None)
BALANCER = "127.0.0.3"
PP = {"proxy_protocol": True, "trusted_proxies": [f"{BALANCER}/32"]}


@pytest.fixture()
def haproxy(tmp_path: Path) -> Iterator[Callable[[int, str], int]]:
    """start(proxy_port, "send-proxy" | "send-proxy-v2") -> the port psql connects to. Its
    readiness check is a connection through HAProxy: one header reaches the proxy."""
    if HAPROXY is None:
        pytest.fail("haproxy is not installed (.ci/system-deps installs it)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: int, mode: str) -> int:
        port = free_port()
        cfg = tmp_path / f"haproxy-{port}.cfg"
        cfg.write_text(
            "global\n  maxconn 200\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
            "  timeout server 60s\n"
            f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n"
            f"backend be\n  server dwsproxy 127.0.0.1:{target} {mode} source {BALANCER}\n")
        log = open(tmp_path / f"haproxy-{port}.log", "wb")
        procs.append(subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=log,
                                      stderr=subprocess.STDOUT))
        wait_port(port, 10)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def psql_via(port: int, command: str = "SELECT 'through'",
             app: str = "pp-test") -> subprocess.CompletedProcess[str]:
    return run_psql(f"host=127.0.0.1 port={port} user=postgres dbname=postgres "
                    f"sslmode=require application_name={app}", command,
                    env=clean_env(PGCONNECT_TIMEOUT="10"))


@pytest.mark.parametrize("mode", ["send-proxy", "send-proxy-v2"])
def test_psql_through_haproxy_meets_address_rules_by_the_header(
        start_proxy: Callable[..., Proxy], haproxy: Callable[[int, str], int],
        mode: str) -> None:
    # The balancer's own address is refused, the client's allowed: only the header's source
    # can let psql in.
    proxy = start_proxy(listen=PP, rules=[
        {"address": f"{BALANCER}/32", "action": "reject"},
        {"address": "127.0.0.1/32", "action": "allow"}])
    front = haproxy(proxy.port, mode)
    # the fixture's port check went through HAProxy too: a header, then EOF
    proxy.wait_metric("dwsproxy_proxy_protocol_total", 1, result="accepted")
    done = psql_via(front, "SELECT 'through ' || current_user")
    assert done.returncode == 0 and done.stdout.strip() == "through postgres", done.stderr
    proxy.wait_metric("dwsproxy_proxy_protocol_total", 2, result="accepted")
    line = proxy.wait_log("application_name=pp-test")
    assert "peer=127.0.0.1:" in line and f"peer={BALANCER}:" not in line

    # The other way round: the header's address is refused, the balancer's would be allowed.
    refusing = start_proxy(listen=PP, rules=[
        {"address": "127.0.0.1/32", "action": "reject"},
        {"address": f"{BALANCER}/32", "action": "allow"}])
    front = haproxy(refusing.port, mode)
    done = psql_via(front)
    assert done.returncode != 0 and "connection refused by rule #1" in done.stderr, done.stderr


def test_sessions_view_shows_the_header_address(start_proxy: Callable[..., Proxy],
                                                haproxy: Callable[[int, str], int]) -> None:
    import psycopg

    proxy = start_proxy(listen=PP)
    front = haproxy(proxy.port, "send-proxy-v2")
    with psycopg.connect(f"host=127.0.0.1 port={front} user=postgres dbname=postgres "
                         "sslmode=require application_name=pp-view") as conn:
        conn.execute("SELECT 1")
        mine = socket.socket(fileno=os.dup(conn.pgconn.socket))
        local_port = mine.getsockname()[1]  # psql's own end, which HAProxy's header names
        mine.close()
        rows = [s for s in proxy.admin_json("/sessions")["sessions"]
                if s["application_name"] == "pp-view"]
        assert len(rows) == 1, proxy.admin_json("/sessions")
        assert rows[0]["peer"] == f"127.0.0.1:{local_port}"


def raw_from(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


SSL_REQUEST = wire.build_request(wire.SSL_REQUEST_CODE)
GOOD_V2 = proxyproto.build_v2(("198.51.100.7", 40000), ("127.0.0.1", 6432))


@pytest.mark.parametrize("source, send, why", [
    ("127.0.0.1", GOOD_V2 + SSL_REQUEST, "from an untrusted peer"),
    ("127.0.0.1", proxyproto.build_v1(("198.51.100.7", 1), ("127.0.0.1", 2)) + SSL_REQUEST,
     "from an untrusted peer"),
    (BALANCER, SSL_REQUEST, "no PROXY protocol header"),
    (BALANCER, b"PROXY TCP4 198.51.100.007 127.0.0.1 1 2\r\n" + SSL_REQUEST, "v1:"),
    (BALANCER, proxyproto.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4000), "v2:"),
    (BALANCER, b"PROXY " + b"1" * 120, "v1:"),
    (BALANCER, GOOD_V2[:20], "incomplete"),  # then EOF: the header never became whole
])
def test_bad_headers_close_the_connection_counted(start_proxy: Callable[..., Proxy],
                                                  source: str, send: bytes, why: str) -> None:
    proxy = start_proxy(listen=PP)
    sock = raw_from(proxy.port, source)
    sock.sendall(send)
    sock.shutdown(socket.SHUT_WR)
    assert read_until_close(sock) == b""  # closed without a byte of answer
    sock.close()
    proxy.wait_metric("dwsproxy_proxy_protocol_total", 1, result="refused")
    assert proxy.metric("dwsproxy_proxy_protocol_total", result="accepted") == 0
    line = proxy.wait_log("outcome=proxy_protocol")
    assert why in line


def test_a_header_not_whole_within_startup_timeout_is_refused(
        start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(listen={**PP, "startup_timeout": 1.0})
    sock = raw_from(proxy.port, BALANCER)
    sock.sendall(GOOD_V2[:10])
    t0 = time.monotonic()
    assert read_until_close(sock) == b""
    assert time.monotonic() - t0 < 4
    proxy.wait_metric("dwsproxy_proxy_protocol_total", 1, result="refused")


def test_local_and_unknown_use_the_balancers_own_address(start_proxy: Callable[..., Proxy]
                                                         ) -> None:
    """v2 LOCAL (a balancer's health check) and v1 UNKNOWN: the connection goes on as the
    balancer's own; the rules judge 127.0.0.3."""
    proxy = start_proxy(listen=PP, rules=[{"address": f"{BALANCER}/32", "action": "allow"}])
    for header in (proxyproto.build_v2(None), proxyproto.build_v1(None)):
        sock = raw_from(proxy.port, BALANCER)
        sock.sendall(header + SSL_REQUEST)
        assert sock.recv(1) in (b"S", b"N")
        sock.close()
    proxy.wait_metric("dwsproxy_proxy_protocol_total", 2, result="accepted")


def test_off_by_default_a_header_is_a_bad_startup(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy()
    sock = raw_from(proxy.port)
    sock.sendall(GOOD_V2 + SSL_REQUEST)
    assert read_until_close(sock) == b""
    proxy.wait_metric("dwsproxy_connections_rejected_total", 1, reason="bad_startup")
    assert proxy.metric("dwsproxy_proxy_protocol_total", result="refused") == 0
