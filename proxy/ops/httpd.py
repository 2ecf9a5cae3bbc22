"""The small HTTP/1.1 server behind the two operator listeners, `[metrics]` and `[admin]`.

Owns: serving at most `max_connections` at once (a new connection at the cap drops the oldest
one still waiting for its request, so a flood of idle connections holds a fixed number of
descriptors, `descriptors`, counted in the server's descriptor reserve, and never starves
sessions or a reload), reading one bounded request head within a deadline, the `Host` check
against DNS rebinding, and the security headers every response carries. Must not know the views: a
`Handler` maps a `Request` to a `Response`.

One request per connection (`Connection: close`): the views are small and scraped seconds apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..config.schema import is_loopback_host

__all__ = ["HttpListener", "Request", "Response", "host_allowed", "is_loopback_host"]

log = logging.getLogger("dwsproxy.http")

# Connections each operator listener serves at once: Prometheus, probes and an operator need
# a few. server/state.py reserves descriptors for both listeners from this.
MAX_CONNECTIONS = 16
MAX_HEAD = 8192  # request line and headers; a view's request is a few hundred bytes
HEAD_TIMEOUT = 5.0  # seconds to send the request head
WRITE_TIMEOUT = 10.0  # seconds for the client to take the response
ACCEPT_BATCH = 64
LOOPBACK_NAMES = ("localhost",)

_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    local: tuple[str, int]  # the listener's address this connection arrived on


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


Handler = Callable[[Request], Awaitable[Response]]


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


def host_allowed(host_header: str | None, local: tuple[str, int]) -> bool:
    """The `Host` a browser sends names the site it thinks it talks to: a DNS-rebinding page
    sends its own name. Allowed: none at all (not a browser), a loopback name or address, or
    the address this connection arrived on; with or without a port."""
    if host_header is None:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        if end < 0:
            return False
        name, rest = host[1:end], host[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return False
    else:
        name, _, port = host.partition(":")
        if port and not port.isdigit():
            return False
    if name in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if address.is_loopback:
        return True
    try:
        here = ipaddress.ip_address(local[0].split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(here, "ipv4_mapped", None)
    return address in (here, mapped)


def security_headers(csp: str) -> tuple[tuple[str, str], ...]:
    return (("X-Frame-Options", "DENY"), ("Content-Security-Policy", csp),
            ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"),
            ("Referrer-Policy", "no-referrer"))


DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


class HttpListener:
    """One listening socket; each accepted connection is served by `handler`."""

    def __init__(self, sock: socket.socket, handler: Handler, *, max_connections: int,
                 name: str) -> None:
        self.sock = sock
        self.handler = handler
        self.max_connections = max_connections
        self.name = name
        self.loop = asyncio.get_running_loop()
        # connections not yet answered, oldest first: the one dropped at the cap
        self.waiting: dict[socket.socket, None] = {}
        self.open = 0
        self.dropped = 0
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("%s listener: accept failed: %s; pausing accepts for 1s",
                              self.name, exc)
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(1.0, self._rewatch)
                return
            if self.open >= self.max_connections:
                self._drop_oldest()
            if self.open >= self.descriptors:
                # The dropped ones have not finished closing yet: this one goes at once.
                self.dropped += 1
                conn.close()
                continue
            conn.setblocking(False)
            self.open += 1
            task = self.loop.create_task(self._serve(conn))
            self.waiting[conn] = None
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def descriptors(self) -> int:
        """The most sockets this listener holds at once: its cap, and as many again that were
        dropped for newer ones and are still closing (server.py reserves them)."""
        return 2 * self.max_connections

    def _rewatch(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _drop_oldest(self) -> None:
        """The oldest connection still waiting for its request head gets an EOF: its task
        ends at its next read and closes it (a shutdown, not a close: the descriptor stays
        the task's until then, so no stale reader can meet a reused descriptor number)."""
        for conn in self.waiting:
            del self.waiting[conn]
            self.dropped += 1
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            return

    async def _serve(self, conn: socket.socket) -> None:
        try:
            local = conn.getsockname()[:2]
            try:
                head = await asyncio.wait_for(self._read_head(conn), HEAD_TIMEOUT)
            except (TimeoutError, ValueError, ConnectionError, OSError):
                return
            if head is None:
                return
            self.waiting.pop(conn, None)
            request = _parse(head, local)
            if request is None:
                response = text(400, "bad request")
            else:
                try:
                    response = await self.handler(request)
                except Exception:
                    log.exception("%s listener: a view failed", self.name)
                    response = text(503, "the view failed; see the proxy's log")
            with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                await asyncio.wait_for(self._write(conn, response, request), WRITE_TIMEOUT)
        finally:
            self.waiting.pop(conn, None)
            self.open -= 1
            with contextlib.suppress(OSError):
                conn.close()

    async def _read_head(self, conn: socket.socket) -> bytes | None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                raise ValueError("request head too long")
            chunk = await self.loop.sock_recv(conn, 4096)
            if not chunk:
                return None
            buf += chunk
        return buf.split(b"\r\n\r\n", 1)[0]

    async def _write(self, conn: socket.socket, response: Response,
                     request: Request | None) -> None:
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))), ("Connection", "close"),
                   *security_headers(DEFAULT_CSP), *response.headers]
        # a response's own CSP (the status page's) replaces the default one
        seen: dict[str, str] = {}
        for name, value in headers:
            seen[name.lower()] = f"{name}: {value}"
        status = f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}"
        body = response.body if request is None or request.method != "HEAD" else b""
        data = ("\r\n".join([status, *seen.values()]) + "\r\n\r\n").encode("latin-1") + body
        await self.loop.sock_sendall(conn, data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in list(self._tasks):
            task.cancel()


def _parse(head: bytes, local: tuple[str, int]) -> Request | None:
    try:
        lines = head.decode("latin-1").split("\r\n")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1].split("?", 1)[0], headers, (local[0], int(local[1])))


def listen_socket(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(128)
    sock.setblocking(False)
    return sock
