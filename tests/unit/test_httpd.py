"""The operator listeners' HTTP server: the Host check, the headers, and the connection cap."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.ops import httpd
from proxy.ops.httpd import Request, Response, host_allowed


@pytest.mark.parametrize("host, local, ok", [
    (None, ("127.0.0.1", 9188), True),
    ("127.0.0.1:9188", ("127.0.0.1", 9188), True),
    ("localhost:9188", ("127.0.0.1", 9188), True),
    ("LOCALHOST", ("127.0.0.1", 9188), True),
    ("127.0.0.5", ("127.0.0.1", 9188), True),
    ("[::1]:9188", ("::1", 9188), True),
    ("10.1.2.3:9188", ("10.1.2.3", 9188), True),          # the listener's own address
    ("10.1.2.3", ("::ffff:10.1.2.3", 9188), True),
    ("10.1.2.4:9188", ("10.1.2.3", 9188), False),
    ("evil.example:9188", ("127.0.0.1", 9188), False),    # DNS rebinding
    ("evil.example", ("127.0.0.1", 9188), False),
    ("localhost.evil.example", ("127.0.0.1", 9188), False),
    ("127.0.0.1:x", ("127.0.0.1", 9188), False),
    ("[::1", ("::1", 9188), False),
    ("", ("127.0.0.1", 9188), False),
])
def test_host_check(host: str | None, local: tuple[str, int], ok: bool) -> None:
    assert host_allowed(host, local) is ok


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
    ("10.0.0.1", False), ("", False), ("metrics.example", False),
])
def test_loopback_listen_hosts(host: str, loopback: bool) -> None:
    assert httpd.is_loopback_host(host) is loopback


async def _get(port: int, head: bytes = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def test_responses_carry_the_security_headers_and_close() -> None:
    async def main() -> bytes:
        async def handler(request: Request) -> Response:
            return Response(200, request.path.encode())

        listener = httpd.HttpListener(httpd.listen_socket("127.0.0.1", 0), handler,
                                      max_connections=4, name="test")
        try:
            return await _get(listener.address[1])
        finally:
            listener.close()

    data = asyncio.run(main())
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b"/x"
    for header in (b"X-Frame-Options: DENY", b"Content-Security-Policy: default-src 'none'",
                   b"X-Content-Type-Options: nosniff", b"Connection: close"):
        assert header in head


def test_a_malformed_request_is_a_400() -> None:
    async def main() -> bytes:
        async def handler(request: Request) -> Response:
            raise AssertionError("not called")

        listener = httpd.HttpListener(httpd.listen_socket("127.0.0.1", 0), handler,
                                      max_connections=4, name="test")
        try:
            return await _get(listener.address[1], b"GARBAGE\r\n\r\n")
        finally:
            listener.close()

    assert asyncio.run(main()).startswith(b"HTTP/1.1 400")


def test_idle_connections_past_the_cap_drop_the_oldest_and_a_request_still_gets_through() -> None:
    cap = 8

    async def main() -> tuple[int, int, bytes]:
        async def handler(request: Request) -> Response:
            return Response(200, b"ok")

        listener = httpd.HttpListener(httpd.listen_socket("127.0.0.1", 0), handler,
                                      max_connections=cap, name="test")
        port = listener.address[1]
        idle = []
        most = 0
        try:
            for _ in range(100):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setblocking(False)
                idle.append(sock)
                await asyncio.sleep(0)  # let the listener accept
                most = max(most, listener.open)
            data = await _get(port)
            return most, listener.dropped, data
        finally:
            for sock in idle:
                sock.close()
            listener.close()

    most, dropped, data = asyncio.run(main())
    assert most <= 2 * cap
    assert dropped >= 100 - 2 * cap
    assert data.endswith(b"ok")
