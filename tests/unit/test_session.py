"""session.py's raw start of a connection, on real loopback sockets without a backend: how many
system calls the first packet costs, and what the accepted socket already carries."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.protocol import wire
from proxy.runtime.server import make_listen_socket
from proxy.runtime.session import Session, within
from proxy.runtime.state import ServerState
from proxy.tls import loader
from proxy.tools import certs

SSL_REQUEST = struct.pack("!II", 8, wire.SSL_REQUEST_CODE)


class CountingSocket(socket.socket):
    """A client socket as the session sees it, with its recv() calls and peeks counted."""

    recvs: list[tuple[int, int]]

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.recvs.append((bufsize, flags))
        return super().recv(bufsize, flags)

    def getpeername(self) -> Any:
        raise AssertionError("the peer address comes from accept(), not getpeername()")


@pytest.fixture()
def config(tmp_path: Path) -> Any:
    certs.init(tmp_path)
    path = tmp_path / "dwsproxy.toml"
    path.write_text(f"""
[listen]
host = "127.0.0.1"
port = 1
startup_timeout = 5.0

[backend]
host = "127.0.0.1"
port = 1
sslmode = "disable"

[tls]
ssl = true
require_ssl = true
ssl_cert_file = "{tmp_path / 'server.crt'}"
ssl_key_file = "{tmp_path / 'server.key'}"
""")
    return loader.load(str(path))


@pytest.fixture()
def listening() -> Iterator[socket.socket]:
    sock = make_listen_socket("127.0.0.1", 0, reuse_port=False)
    yield sock
    sock.close()


def serve_one(listening: socket.socket, config: Any, sent: bytes,
              answer_size: int) -> tuple[Session, CountingSocket, bytes]:
    """Connect, send `sent` at once, then let one Session take the accepted socket; read
    `answer_size` bytes of its answer and close. The session's raw reads are counted."""
    client = socket.create_connection(listening.getsockname())
    client.sendall(sent)
    listening.setblocking(True)
    conn, addr = listening.accept()
    counted = CountingSocket(conn.family, conn.type, fileno=conn.detach())
    counted.recvs = []

    async def main() -> tuple[Session, bytes]:
        session = Session(counted, ServerState(config), addr)
        task = asyncio.get_running_loop().create_task(session.run())
        loop = asyncio.get_running_loop()
        answer = b""
        while len(answer) < answer_size:
            chunk = await loop.run_in_executor(None, client.recv, 4096)
            if not chunk:
                break
            answer += chunk
        client.close()
        await asyncio.wait_for(task, 10)
        return session, answer

    try:
        # uvloop, as in production (it reads the peer address from the descriptor itself)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            session, answer = runner.run(main())
    finally:
        client.close()
    return session, counted, answer


def test_an_ssl_request_is_read_with_one_recv_and_no_peek(listening: socket.socket,
                                                          config: Any) -> None:
    session, sock, answer = serve_one(listening, config, SSL_REQUEST, 1)
    assert answer == wire.SSL_ACCEPT
    assert len(sock.recvs) == 1  # the TLS transport reads the rest
    assert not any(flags & socket.MSG_PEEK for _, flags in sock.recvs)
    assert session.peer_addr.startswith("127.0.0.1:")


def test_bytes_read_with_the_ssl_request_are_refused_without_a_peek(listening: socket.socket,
                                                                    config: Any) -> None:
    """CVE-2021-23214: what came with the SSLRequest is what one read found after it."""
    session, sock, answer = serve_one(listening, config, SSL_REQUEST + b"Q", 1)
    assert answer[:1] == b"E" and b"received unencrypted data after SSL request" in answer
    assert session.outcome == "bad_startup"
    assert len(sock.recvs) == 1
    assert not any(flags & socket.MSG_PEEK for _, flags in sock.recvs)


def test_a_plaintext_startup_message_is_read_with_one_recv(listening: socket.socket,
                                                           config: Any) -> None:
    startup = _startup()
    session, sock, answer = serve_one(listening, config, startup, 1)
    assert answer[:1] == b"E"
    assert session.outcome == "ssl_required"
    assert len(sock.recvs) == 1  # then the loop's transport reads (and refuses)


def _startup() -> bytes:
    body = struct.pack("!I", 3 << 16) + b"user\0postgres\0database\0postgres\0\0"
    return struct.pack("!I", 4 + len(body)) + body


def test_accepted_sockets_inherit_keepalive_from_the_listening_socket(
        listening: socket.socket) -> None:
    client = socket.create_connection(listening.getsockname())
    listening.setblocking(True)
    conn, _ = listening.accept()
    try:
        assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        conn.close()
        client.close()


def run_uvloop(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def test_within_gives_the_result_and_leaves_no_timer() -> None:
    async def main() -> tuple[int, int]:
        async def answer() -> int:
            await asyncio.sleep(0)
            return 42

        got = await within(5.0, answer())
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0.02)
        return got, task.cancelling()

    assert run_uvloop(main()) == (42, 0)


def test_within_turns_its_own_expiry_into_a_timeout() -> None:
    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await within(0.05, asyncio.sleep(10))
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # uncancelled: usable afterwards
        await asyncio.sleep(0)
        return time.monotonic() - start

    assert 0.04 <= run_uvloop(main()) < 5


def test_a_cancellation_that_is_not_within_s_stays_a_cancellation() -> None:
    async def main() -> None:
        inner = asyncio.get_running_loop().create_task(within(5.0, asyncio.sleep(10)))
        await asyncio.sleep(0.01)
        inner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await inner

    run_uvloop(main())


def test_one_readiness_event_accepts_every_pending_connection(listening: socket.socket,
                                                             config: Any) -> None:
    """Listener._on_readable: several clients waiting in the backlog are all taken in one
    callback, not one per loop iteration."""
    from proxy.runtime.server import Listener

    clients = [socket.create_connection(listening.getsockname()) for _ in range(5)]

    async def main() -> tuple[int, int]:
        state = ServerState(config)
        listener = Listener(listening, state)
        listener._unwatch()  # called by hand below, once
        listener._on_readable()
        opened, tasks = state.open, len(state.tasks)
        for client in clients:
            client.close()
        await asyncio.wait_for(asyncio.gather(*state.tasks), 10)
        return opened, tasks

    try:
        assert run_uvloop(main()) == (5, 5)
    finally:
        for client in clients:
            client.close()


def test_tls_state_hashes_by_identity_in_c() -> None:
    from proxy.runtime import relay

    assert relay.TlsState.__hash__ is object.__hash__
    assert {relay.OPEN: 1}[relay.TlsState("open")] == 1


def test_session_ids_need_no_getpid_per_connection(config: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    state = ServerState(config)
    monkeypatch.setattr(os, "getpid", lambda: (_ for _ in ()).throw(AssertionError("getpid")))
    assert state.register(object()) == f"{state._pid}-1"  # type: ignore[arg-type]


def test_a_session_keeps_its_state_in_slots_not_a_dict() -> None:
    # An idle session costs what its object holds: no per-instance dict (1.3 KiB a session
    # measured with benchmarks/run --tests idle_1000_rss).
    assert "__dict__" not in Session.__dict__  # a class without __slots__ has one here
    assert "terminating" in Session.__slots__


@pytest.mark.parametrize(("client_end", "backend_end", "expected"), [
    ((1, "closed", b""), (2, "closed", b""), "client_closed"),
    ((2, "closed", b""), (1, "closed", b""), "backend_closed"),
    ((2, "closed", b""), (1, "reset", b""), "backend_reset"),
    ((1, "reset", b""), None, "client_reset"),
    # the backend closed first, but for the client's Terminate: the client ended it
    ((2, "closed", b""), (1, "closed", b"Q\x00X\x00\x00\x00\x04"), "client_closed"),
])
def test_who_ended_a_session_is_read_off_the_order_of_its_sides(
        client_end: Any, backend_end: Any, expected: str) -> None:
    from proxy.runtime import relay

    async def main() -> str:
        session = Session.__new__(Session)
        session.client, session.backend = relay.Endpoint(), relay.Endpoint()
        session.client.ended, session.backend.ended = client_end, backend_end
        session.end = None
        return session._ended_by()

    assert run_uvloop(main()) == expected
