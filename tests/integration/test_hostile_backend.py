"""The backend hop against a hostile TLS server (issue 21 items 2, 3 and 9): a hand-made
server on loopback that floods the proxy's backend connection with TLS 1.3
KeyUpdate(update_requested) or TLS 1.2 HelloRequest records and never reads, one that selects
no ALPN or `http/1.1` under direct TLS, and one that answers the SSLRequest with `N` under
sslmode = prefer. Sessions that are not the flooder's are relayed by the same server to the
real PostgreSQL, so a real psql shows whether other sessions keep working during a flood."""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import PSQL, Proxy, clean_env
from tls_records import HandmadeServer, Tls12Writer, Tls13Writer, hello_request

from proxy.protocol import wire
from proxy.tools.demo import TempPostgres

BATCH = 256  # records made and sent at a time
FLOOD_USER = "flooder"


def rss_kb_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _startup_user(packet: bytes) -> str:
    fields = packet[8:].split(b"\0")
    pairs = dict(zip(fields[0::2], fields[1::2], strict=False))
    return pairs.get(b"user", b"").decode()


def _read_startup(server: HandmadeServer, sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < struct.unpack("!I", data[:4])[0]:
        more = server.read(sock)
        if not more:
            raise ConnectionError("closed before the StartupMessage")
        data += more
    return data


class HostileBackend(threading.Thread):
    """Listens on 127.0.0.1; per connection: `S` (or direct TLS), a handshake, then for the
    flood user KeyUpdates (or HelloRequests) until the proxy closes; for anyone else a relay of
    the plaintext to the real PostgreSQL."""

    def __init__(self, pki: Path, pg_port: int, *, tls12: bool = False, direct: bool = False,
                 alpn: list[str] | None = None, answer: bytes = b"S") -> None:
        super().__init__(daemon=True)
        self.pki, self.pg_port, self.tls12, self.direct = pki, pg_port, tls12, direct
        self.alpn, self.answer = alpn, answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.floods: list[tuple[int, float]] = []  # (bytes sent before the close, seconds)
        self.received_after_handshake: list[bytes] = []  # what reached a direct-TLS server
        self.failures: list[str] = []
        self.refused = 0  # SSLRequests answered N

    def run(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._one, args=(sock,), daemon=True).start()

    def _one(self, sock: socket.socket) -> None:
        try:
            with sock:
                sock.settimeout(20)
                if not self.direct:
                    request = sock.recv(8)
                    if request != wire.build_request(wire.SSL_REQUEST_CODE):
                        return
                    sock.sendall(self.answer)
                    if self.answer == b"N":
                        self.refused += 1
                        self._relay_plain(sock)
                        return
                server = HandmadeServer(self.pki / "server.crt", self.pki / "server.key",
                                        tls12=self.tls12, alpn=self.alpn)
                try:
                    server.accept(sock)
                    try:
                        startup = _read_startup(server, sock)
                    except ConnectionError:
                        return  # the proxy's health check: connect, TLS, close

                    if self.direct and self.alpn != ["postgresql"]:
                        self.received_after_handshake.append(startup)
                        return
                    if _startup_user(startup) == FLOOD_USER:
                        self._flood(server, sock)
                    else:
                        self._relay_tls(server, sock, startup)
                finally:
                    server.close()
        except Exception as exc:  # shown by the test
            if not self.stop.is_set():
                self.failures.append(repr(exc))

    def _flood(self, server: HandmadeServer, sock: socket.socket) -> None:
        ok = server.write(b"R\0\0\0\x08\0\0\0\0" + b"Z\0\0\0\x05I")  # AuthenticationOk
        sock.sendall(ok)
        writer = server.writer(records_sent=1)
        sent, t0 = 0, time.monotonic()
        while not self.stop.is_set():
            if isinstance(writer, Tls13Writer):
                batch = b"".join(writer.key_update() for _ in range(BATCH))
            else:
                assert isinstance(writer, Tls12Writer)
                batch = b"".join(hello_request(writer) for _ in range(BATCH))
            try:
                sock.sendall(batch)
            except (ConnectionResetError, BrokenPipeError):
                self.floods.append((sent, time.monotonic() - t0))
                return
            except TimeoutError:
                self.failures.append("the proxy neither read nor closed for 20 s")
                return
            sent += len(batch)

    def _relay_tls(self, server: HandmadeServer, sock: socket.socket, startup: bytes) -> None:
        with socket.create_connection(("127.0.0.1", self.pg_port)) as pg:
            pg.sendall(startup)
            while True:
                ready, _, _ = select.select([sock, pg], [], [], 20)
                if not ready:
                    return
                if pg in ready:
                    data = pg.recv(65536)
                    if not data:
                        return
                    sock.sendall(server.write(data))
                if sock in ready:
                    raw = sock.recv(65536)
                    if not raw:
                        return
                    server.feed(raw)
                    while True:
                        try:
                            plain = server.sslobj.read(65536)
                        except Exception:
                            break
                        if not plain:
                            return
                        pg.sendall(plain)

    def _relay_plain(self, sock: socket.socket) -> None:
        with socket.create_connection(("127.0.0.1", self.pg_port)) as pg:
            while True:
                ready, _, _ = select.select([sock, pg], [], [], 20)
                if not ready:
                    return
                for src, dst in ((sock, pg), (pg, sock)):
                    if src in ready:
                        data = src.recv(65536)
                        if not data:
                            return
                        dst.sendall(data)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.listener.close()


@pytest.fixture
def hostile(pki: Path, pg: TempPostgres) -> Iterator[Callable[..., HostileBackend]]:
    started: list[HostileBackend] = []

    def start(**kw: object) -> HostileBackend:
        server = HostileBackend(pki, pg.port, **kw)  # type: ignore[arg-type]
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def _flood_session(proxy: Proxy) -> None:
    """A real client logs in as the flood user; the backend floods once it said ReadyForQuery:
    the client's session ends when the proxy closes the backend."""
    try:
        with psycopg.connect(host="127.0.0.1", port=proxy.port, user=FLOOD_USER,
                             dbname="postgres", sslmode="disable", connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        pass


def _psql_select_1(proxy: Proxy) -> float:
    assert PSQL is not None
    t0 = time.monotonic()
    out = subprocess.run(
        [PSQL, f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres sslmode=disable",
         "-X", "-At", "-c", "SELECT 1"],
        capture_output=True, text=True, env=clean_env(), timeout=30)
    took = time.monotonic() - t0
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    return took


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13-keyupdate", "tls12-hellorequest"])
def test_a_backend_tls_flood_is_aborted_counted_and_bounded(
        start_proxy: Callable[..., Proxy], hostile: Callable[..., HostileBackend],
        tls12: bool) -> None:
    server = hostile(tls12=tls12)
    proxy = start_proxy(tls={"ssl": False}, backend={"port": server.port, "sslmode": "require"})
    _psql_select_1(proxy)  # warm, and proof that the relay through the hostile server works
    rss_before = rss_kb_of(proxy.proc.pid)
    floods = 4
    psql_times: list[float] = []
    health: list[float] = []
    threads = [threading.Thread(target=_flood_session, args=(proxy,)) for _ in range(floods)]
    for thread in threads:
        thread.start()
    rss_max = rss_before
    deadline = time.monotonic() + 30
    while len(server.floods) < floods and time.monotonic() < deadline and not server.failures:
        psql_times.append(_psql_select_1(proxy))
        t0 = time.monotonic()
        assert proxy.http("/healthz")[0] == 200
        health.append(time.monotonic() - t0)
        rss_max = max(rss_max, rss_kb_of(proxy.proc.pid))
    for thread in threads:
        thread.join(20)
    assert not server.failures, server.failures
    assert len(server.floods) == floods, server.floods
    proxy.wait_metric("dwsproxy_backend_tls_failures_total", floods, reason="flood")
    sent = [s for s, _ in server.floods]
    print(f"flood ({'TLS 1.2 HelloRequest' if tls12 else 'TLS 1.3 KeyUpdate'}): bytes sent "
          f"before the proxy closed {sent}, seconds {[round(t, 3) for _, t in server.floods]}; "
          f"psql {sorted(round(t, 3) for t in psql_times)}; /healthz max {max(health):.3f} s; "
          f"RSS {rss_before} -> {rss_max} kB")
    # TLS_NOISE_LIMIT (32 KiB) of records is read before the close; what was still in flight
    # (socket buffers both ways) is what else the server could write
    assert max(sent) < 8 * 1024 * 1024, sent
    assert max(psql_times) < 1.5, psql_times
    assert (rss_max - rss_before) < 20 * 1024, (rss_before, rss_max)
    assert "backend_tls_flood" in proxy.log()


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "http1.1"])
def test_direct_tls_refuses_a_server_without_alpn_postgresql(
        start_proxy: Callable[..., Proxy], hostile: Callable[..., HostileBackend],
        alpn: list[str] | None) -> None:
    server = hostile(direct=True, alpn=alpn)
    proxy = start_proxy(tls={"ssl": False}, backend={"port": server.port, "sslmode": "require",
                                                     "sslnegotiation": "direct"})
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(host="127.0.0.1", port=proxy.port, user="postgres", dbname="postgres",
                        sslmode="disable", connect_timeout=10)
    text = str(info.value)
    assert "ALPN" in text and "08006" in text, text
    # (a server that prefers http/1.1 has no protocol in common with our offer and selects
    # none; one that selected http/1.1 anyway is refused by OpenSSL itself, RFC 7301 3.2, and
    # by _alpn_refusal after it: tests/unit/test_backend_alpn.py)
    assert "without ALPN" in text, text
    proxy.wait_metric("dwsproxy_backend_tls_failures_total", 1, reason="alpn")
    assert server.received_after_handshake == [], "the client's StartupMessage reached it"


def test_direct_tls_with_alpn_postgresql_is_relayed(
        start_proxy: Callable[..., Proxy], hostile: Callable[..., HostileBackend]) -> None:
    server = hostile(direct=True, alpn=["postgresql"])
    proxy = start_proxy(tls={"ssl": False}, backend={"port": server.port, "sslmode": "require",
                                                     "sslnegotiation": "direct"})
    _psql_select_1(proxy)


def test_prefer_falling_back_to_plaintext_is_logged_once_per_connection(
        start_proxy: Callable[..., Proxy], hostile: Callable[..., HostileBackend]) -> None:
    server = hostile(answer=b"N")
    proxy = start_proxy(tls={"ssl": False}, backend={"port": server.port, "sslmode": "prefer"})
    for _ in range(2):
        _psql_select_1(proxy)
    line = f"backend 127.0.0.1:{server.port} refused SSL"
    proxy.wait_log(line)
    # one line per connection that fell back: the two sessions, and the health check's
    # connections (they fall back too), no more and no fewer
    deadline = time.monotonic() + 10
    while proxy.log().count(line) != server.refused and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.refused >= 2
    assert proxy.log().count(line) == server.refused, proxy.log()[-2000:]
    while proxy.log().count("backend_encryption=plain") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # a session's line is written when the proxy sees it end
    assert proxy.log().count("backend_encryption=plain") >= 2
