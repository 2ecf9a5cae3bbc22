"""relay.py's TLS endpoint on a real socket pair: the proxy's side runs on the event loop, the
client is a blocking `ssl` socket in a thread."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import certs, relay, wire
from proxy.config import TlsConfig
from proxy.loader import server_tls as build_server_tls


@pytest.fixture()
def contexts(tmp_path: Path) -> dict[str, Any]:
    ca = certs.make_ca("Root")
    server = certs.issue(ca, "localhost", server=True)
    certs.write_certs(tmp_path / "server.crt", server[0])
    certs.write_key(tmp_path / "server.key", server[1])
    certs.write_certs(tmp_path / "root.pem", ca[0])
    client = certs.issue(ca, "postgres")
    certs.write_certs(tmp_path / "client.crt", client[0])
    certs.write_key(tmp_path / "client.key", client[1])
    plain = build_server_tls(TlsConfig(ssl_cert_file=str(tmp_path / "server.crt"),
                                       ssl_key_file=str(tmp_path / "server.key")),
                             cert_requested=False)
    verify = build_server_tls(TlsConfig(ssl_cert_file=str(tmp_path / "server.crt"),
                                        ssl_key_file=str(tmp_path / "server.key"),
                                        ssl_ca_file=str(tmp_path / "root.pem"),
                                        clientcert="verify-ca"), cert_requested=True)
    good = ssl.create_default_context(cafile=str(tmp_path / "root.pem"))
    good.load_cert_chain(tmp_path / "client.crt", tmp_path / "client.key")
    return {"plain": plain.context, "verify": verify.context, "client": good,
            "dir": tmp_path}


def run_pair(server_ctx: ssl.SSLContext, client: Callable[[socket.socket], Any],
             server: Callable[[relay.TlsEndpoint], Any]) -> tuple[Any, Any]:
    """`client(sock)` in a thread against a TlsEndpoint driven by `server(endpoint)`."""
    a, b = socket.socketpair()
    out: dict[str, Any] = {}

    def client_thread() -> None:
        try:
            out["client"] = client(b)
        except BaseException as exc:  # handed to the test
            out["client"] = exc
        finally:
            b.close()

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        endpoint = relay.TlsEndpoint(server_ctx)
        a.setblocking(False)
        await loop.connect_accepted_socket(lambda: endpoint, a)
        thread = threading.Thread(target=client_thread)
        thread.start()
        try:
            return await asyncio.wait_for(server(endpoint), 10)
        finally:
            endpoint.close()
            await asyncio.wait_for(endpoint.closed, 10)
            await asyncio.to_thread(thread.join, 10)

    result = asyncio.run(main())
    return result, out.get("client")


def test_failed_handshake_sends_its_alert_then_a_fin(contexts: dict[str, Any]) -> None:
    # A client certificate from a CA the proxy does not trust: OpenSSL refuses it with an
    # alert, which the client must read (not "unexpected EOF").
    d = contexts["dir"]
    stranger = certs.issue(certs.make_ca("Other"), "postgres")
    certs.write_certs(d / "other.crt", stranger[0])
    certs.write_key(d / "other.key", stranger[1])
    anonymous = ssl.create_default_context(cafile=str(d / "root.pem"))
    anonymous.load_cert_chain(d / "other.crt", d / "other.key")

    def client(sock: socket.socket) -> str:
        with anonymous.wrap_socket(sock, server_hostname="localhost") as tls_sock:
            try:
                tls_sock.sendall(b"hello")  # TLS 1.3: the server's verdict comes after this
                data = tls_sock.recv(100)
            except ssl.SSLError as exc:
                return f"alert: {exc.reason}"
            return f"read {data!r}"

    async def server(endpoint: relay.TlsEndpoint) -> BaseException | None:
        try:
            await endpoint.handshake
        except ssl.SSLError as exc:
            return exc
        return None

    exc, seen = run_pair(contexts["verify"], client, server)
    assert isinstance(exc, ssl.SSLError)
    assert seen == "alert: TLSV1_ALERT_UNKNOWN_CA", seen


def test_handshake_then_data_in_one_flight_then_close_notify(contexts: dict[str, Any]) -> None:
    packet = wire.build_startup_message({"user": "alice", "database": "db"})
    big = os.urandom(3 * 1024 * 1024 + 17)

    def client(sock: socket.socket) -> tuple[bytes, bytes]:
        with contexts["client"].wrap_socket(sock, server_hostname="localhost") as tls_sock:
            tls_sock.sendall(packet)  # in the flight of the client's Finished (TLS 1.3)
            got = bytearray()
            while len(got) < len(big):
                chunk = tls_sock.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
            tail = tls_sock.recv(10)  # b"": the server's close_notify, not a bare FIN
            return bytes(got), tail

    async def server(endpoint: relay.TlsEndpoint) -> tuple[wire.Event | None, str]:
        await endpoint.handshake
        event = await endpoint.read_packet()
        assert endpoint.transport is not None
        endpoint.transport.write(big)
        return event, endpoint.ssl_object.version() or ""

    (event, version), (got, tail) = run_pair(contexts["verify"], client, server)
    assert version == "TLSv1.3"
    assert isinstance(event, wire.StartupMessage) and event.user == "alice"
    assert got == big and tail == b""


def test_client_closing_during_the_handshake(contexts: dict[str, Any]) -> None:
    def client(sock: socket.socket) -> None:
        sock.sendall(b"\x16\x03\x01\x00\x05junk")  # a record header, then gone
        sock.shutdown(socket.SHUT_WR)

    async def server(endpoint: relay.TlsEndpoint) -> BaseException | None:
        try:
            await endpoint.handshake
        except (ssl.SSLError, ConnectionError) as exc:
            return exc
        return None

    exc, _ = run_pair(contexts["plain"], client, server)
    assert isinstance(exc, (ssl.SSLError, ConnectionError))


def test_input_after_a_failed_handshake_is_dropped(contexts: dict[str, Any]) -> None:
    sent = threading.Event()

    def client(sock: socket.socket) -> None:
        sock.sendall(b"\x16\x03\x01\x00\x05junk" + os.urandom(1 << 20))  # fails, then floods
        sent.set()
        sock.recv(100)  # the alert, then our FIN

    async def server(endpoint: relay.TlsEndpoint) -> int:
        with pytest.raises(ssl.SSLError):
            await endpoint.handshake
        await asyncio.to_thread(sent.wait, 10)
        for _ in range(20):  # let the loop read what the kernel holds
            await asyncio.sleep(0.01)
        return endpoint._incoming.pending

    pending, _ = run_pair(contexts["plain"], client, server)
    assert pending == 0


def test_a_client_that_closes_without_reading_is_aborted_in_time(
        contexts: dict[str, Any]) -> None:
    # The client sends its FIN while our writes to it are stuck in a full buffer: closing must
    # not wait for that buffer forever.
    done = threading.Event()

    def client(sock: socket.socket) -> None:
        tls_sock = contexts["client"].wrap_socket(sock, server_hostname="localhost")
        tls_sock.sendall(b"x")
        tls_sock.shutdown(socket.SHUT_WR)  # a FIN (no close_notify), and never a read
        done.wait(20)

    async def server(endpoint: relay.TlsEndpoint) -> float:
        await endpoint.handshake
        assert endpoint.transport is not None
        for _ in range(64):
            endpoint.transport.write(os.urandom(256 * 1024))  # far more than socket buffers
        while not endpoint.eof:
            await asyncio.sleep(0.01)
        assert endpoint.raw is not None and endpoint.raw.get_write_buffer_size() > 0
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        endpoint.close()
        await asyncio.wait_for(asyncio.shield(endpoint.closed), relay.CLOSE_TIMEOUT + 5)
        done.set()
        return loop.time() - t0

    took, _ = run_pair(contexts["plain"], client, server)
    assert took <= relay.CLOSE_TIMEOUT + 1
