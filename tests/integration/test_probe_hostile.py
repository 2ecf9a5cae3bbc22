"""`dwsproxy probe` against servers that are not what they seem: a listener that never answers,
an HTTP server, an SSH server, a TLS impostor, a server that never finishes its start-up. The
probe must say exit 2 with one line (never "ssl = off"), stay within its deadline, and where
the server does speak PostgreSQL, say what psql says."""

from __future__ import annotations

import contextlib
import os
import pty
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import REPO, clean_env, run_psql

from proxy.protocol import wire
from proxy.tools import certs
from proxy.tools.demo import SSLMODES, TempPostgres

Handler = Callable[[socket.socket], None]


class Hostile:
    """A loopback listener running `handler` on every connection in its own thread."""

    def __init__(self, handler: Handler) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        self.stopping = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)


@pytest.fixture()
def hostile() -> Iterator[Callable[[Handler], Hostile]]:
    started: list[Hostile] = []

    def start(handler: Handler) -> Hostile:
        server = Hostile(handler)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def drain(conn: socket.socket) -> None:
    """Read and drop until the client goes away: a listener that never answers."""
    conn.settimeout(120)
    while conn.recv(4096):
        pass


def silent(conn: socket.socket) -> None:
    drain(conn)


def http(conn: socket.socket) -> None:
    conn.settimeout(30)
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def ssh(conn: socket.socket) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    drain(conn)


def escape_codes(conn: socket.socket) -> None:
    conn.settimeout(30)
    conn.recv(4096)
    conn.sendall(b"\x1b[2J\x1b]0;owned\x07hello")


def read_packet(conn: socket.socket | ssl.SSLSocket) -> bytes:
    head = b""
    while len(head) < 4:
        chunk = conn.recv(4 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    (length,) = struct.unpack("!i", head)
    body = b""
    while len(body) < length - 4:
        chunk = conn.recv(length - 4 - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head + body


def endless_parameter_status(conn: socket.socket) -> None:
    """A server that authenticates everyone and then never says ReadyForQuery."""
    conn.settimeout(120)
    packet = read_packet(conn)
    if packet == wire.build_request(wire.SSL_REQUEST_CODE):
        conn.sendall(b"N")
        read_packet(conn)
    conn.sendall(b"R" + struct.pack("!ii", 8, 0))
    n = 0
    while True:
        n += 1
        body = b"dwsproxy_tick\0" + str(n).encode() + b"\0"
        conn.sendall(b"S" + struct.pack("!i", len(body) + 4) + body)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def impostor_ctx(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    folder = tmp_path_factory.mktemp("impostor")
    certs.init(folder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "server.crt", folder / "server.key")
    return ctx


def run_probe(conninfo: str, *args: str, timeout: float = 60
              ) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "proxy", "probe", conninfo, *args],
                          capture_output=True, text=True, env=clean_env(), cwd=REPO,
                          timeout=timeout)
    return proc, time.monotonic() - start


def test_silent_listener_is_exit_2_within_connect_timeout(hostile: Callable[[Handler], Hostile]
                                                          ) -> None:
    server = hostile(silent)
    proc, took = run_probe(f"host=127.0.0.1 port={server.port} user=x connect_timeout=2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"probe: 127.0.0.1:{server.port} did not answer within 2 s"]
    assert took < 10, took


@pytest.mark.parametrize(("handler", "answer"), [
    (http, "HTTP/1.1 400 Bad Request\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n"),
    (ssh, "SSH-2.0-OpenSSH_9.2p1 Debian-2\\r\\n"),
    (escape_codes, "\\x1b[2J\\x1b]0;owned\\x07hello"),
], ids=["http", "ssh-banner", "escape-codes"])
def test_not_postgresql_is_exit_2_with_its_answer(hostile: Callable[[Handler], Hostile],
                                                  handler: Handler, answer: str) -> None:
    server = hostile(handler)
    proc, _ = run_probe(f"host=127.0.0.1 port={server.port} user=x connect_timeout=2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"probe: 127.0.0.1:{server.port} is not a PostgreSQL server: it answered '{answer}'"]
    assert "\x1b" not in proc.stderr  # nothing the server chose reaches the terminal raw


def test_tls_impostor_is_not_postgresql(hostile: Callable[[Handler], Hostile],
                                        impostor_ctx: ssl.SSLContext) -> None:
    """Says 'S', completes a real TLS handshake, then speaks HTTP inside it (and closes a
    plaintext StartupMessage without a word): 'ssl = on' would be a lie."""

    def impostor(conn: socket.socket) -> None:
        conn.settimeout(30)
        if read_packet(conn) != wire.build_request(wire.SSL_REQUEST_CODE):
            return
        conn.sendall(b"S")
        with impostor_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(4096)
            tls.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    server = hostile(impostor)
    proc, _ = run_probe(f"host=127.0.0.1 port={server.port} user=x connect_timeout=2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"probe: 127.0.0.1:{server.port} is not a PostgreSQL server: it answered "
        "'HTTP/1.1 400 Bad Request\\r\\n\\r\\n'"]


def test_tls_impostor_that_never_speaks_inside_tls(hostile: Callable[[Handler], Hostile],
                                                   impostor_ctx: ssl.SSLContext) -> None:
    def impostor(conn: socket.socket) -> None:
        conn.settimeout(60)
        if read_packet(conn) != wire.build_request(wire.SSL_REQUEST_CODE):
            return
        conn.sendall(b"S")
        with impostor_ctx.wrap_socket(conn, server_side=True) as tls:
            while tls.recv(4096):
                pass

    server = hostile(impostor)
    proc, took = run_probe(f"host=127.0.0.1 port={server.port} user=x connect_timeout=2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"probe: 127.0.0.1:{server.port} did not answer within 2 s"]
    assert took < 15, took


def test_endless_parameter_status_is_bounded_and_agrees_with_psql(
        hostile: Callable[[Handler], Hostile]) -> None:
    """AuthenticationOk, then a ParameterStatus every 0.5 s for ever: psql with
    connect_timeout=2 gives up with "timeout expired" in every sslmode; so must the probe, and
    it must end."""
    server = hostile(endless_parameter_status)
    conninfo = f"host=127.0.0.1 port={server.port} user=x dbname=x connect_timeout=2"
    proc, took = run_probe(conninfo, "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    cells = {c["sslmode"]: (c["result"], c["detail"]) for c in report["cells"]}
    for mode in SSLMODES:
        psql = run_psql(f"{conninfo} sslmode={mode}")
        want = "refused" if psql.returncode else "plaintext"
        assert cells[mode][0] == want, (mode, cells[mode], psql.stderr)
        if want == "refused" and "timeout expired" in psql.stderr:
            assert cells[mode][1] == "timeout expired", (mode, cells[mode])
    assert cells["disable"] == ("refused", "timeout expired")
    assert took < 20, took


def test_timeout_bounds_the_whole_probe(hostile: Callable[[Handler], Hostile]) -> None:
    """No connect_timeout (libpq would wait for ever): --timeout ends it, exit 2, one line."""
    server = hostile(endless_parameter_status)
    proc, took = run_probe(f"host=127.0.0.1 port={server.port} user=x", "--timeout", "3")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"probe: 127.0.0.1:{server.port}: the probe did not finish within 3 s (--timeout)"]
    assert took < 10, took


def test_a_line_per_step_on_a_terminal(pg: TempPostgres) -> None:
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "probe",
                                 f"host=127.0.0.1 port={pg.port} user=postgres"],
                                stdout=subprocess.PIPE, stderr=secondary, env=clean_env(),
                                cwd=REPO)
        os.close(secondary)
        out, _ = proc.communicate(timeout=60)
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(primary)
    assert proc.returncode == 0, seen
    lines = seen.decode().splitlines()
    assert lines[0] == f"probe: connecting to 127.0.0.1:{pg.port} …", lines
    assert "probe: sslmode=disable …" in lines
    assert b"Inferred policy: ssl = off" in out
    # and nothing of that kind when stderr is not a terminal
    quiet, _ = run_probe(f"host=127.0.0.1 port={pg.port} user=postgres")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_a_servers_error_text_is_escaped_in_the_table(hostile: Callable[[Handler], Hostile]
                                                      ) -> None:
    """A server that speaks PostgreSQL but puts terminal escapes in its ErrorResponse."""

    def refuser(conn: socket.socket) -> None:
        conn.settimeout(30)
        if read_packet(conn) == wire.build_request(wire.SSL_REQUEST_CODE):
            conn.sendall(b"N")
            read_packet(conn)
        conn.sendall(wire.error_response("28000", "\x1b[2J\x1b]0;pwned\x07no entry"))

    server = hostile(refuser)
    proc, _ = run_probe(f"host=127.0.0.1 port={server.port} user=x connect_timeout=2")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "FATAL:  \\x1b[2J\\x1b]0;pwned\\x07no entry" in proc.stdout
