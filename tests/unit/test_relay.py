"""relay.py: the TLS endpoint on a real socket pair (the proxy's side on the event loop, the
client a blocking `ssl` socket in a thread); then, without sockets, its states, the records it
sends, both directions of flow control and the flood budget, with memory BIOs on both ends and
a fake transport."""

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
from bio_watch import WatchedBio
from tls_records import HandmadeClient

from proxy.config.schema import TlsConfig
from proxy.protocol import wire
from proxy.runtime import relay
from proxy.tls.loader import server_tls as build_server_tls
from proxy.tools import certs


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


# -- without sockets: memory BIOs on both ends and a fake transport ---------------------------


class FakeTransport(asyncio.Transport):
    """A transport with a write buffer the test drains by hand (`take`), uvloop's flow control
    (pause_writing past the high-water mark, resume_writing at the low one), and a reading
    flag; close/abort end it with connection_lost on the next loop turn, as real ones do."""

    def __init__(self, protocol: asyncio.Protocol, high: int = 64 * 1024) -> None:
        super().__init__()
        self.protocol = protocol
        self.buffer = bytearray()
        self.high, self.low = high, high // 4
        self.paused = False  # the protocol was told pause_writing
        self.reading = True
        self.closing = False
        self.aborted = False
        self.eof_written = False

    def write(self, data: Any) -> None:
        assert not self.closing or not self.aborted, "write after abort"
        self.buffer += data
        if not self.paused and len(self.buffer) > self.high:
            self.paused = True
            self.protocol.pause_writing()

    def take(self, n: int | None = None) -> bytes:
        """The peer reads n bytes (all by default) of what was written."""
        n = len(self.buffer) if n is None else n
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        if self.paused and len(self.buffer) <= self.low:
            self.paused = False
            self.protocol.resume_writing()
        return out

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high if high is not None else self.high
        self.low = low if low is not None else self.high // 4

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self.aborted = True
        self._end()

    def _end(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Pair:
    """A TlsEndpoint on a FakeTransport, a HandmadeClient on memory BIOs, and (once linked) a
    ToTlsEndpoint on another FakeTransport: the whole relay of a TLS session, without a
    socket."""

    def __init__(self, context: ssl.SSLContext, *, tls12: bool = False) -> None:
        self.client = HandmadeClient(tls12=tls12)
        self.endpoint = relay.TlsEndpoint(context)
        self.raw = FakeTransport(self.endpoint)
        self.endpoint.connection_made(self.raw)
        self.backend: relay.ToTlsEndpoint | None = None
        self.backend_transport: FakeTransport | None = None
        for _ in range(10):
            done = self.client.handshake_step()
            self._handshake_feed(self.client.outgoing())
            self.client.feed(self.raw.take())
            if done and self.endpoint.state is relay.OPEN:
                break
        assert self.endpoint.state is relay.OPEN and self.endpoint.handshake.done()

    async def to_proxy(self, data: bytes, chunk: int = 256000) -> None:
        """As uvloop delivers it: reads of at most `chunk` bytes (uvloop's buffer: 256000),
        none while the endpoint does not read; the loop turns of rule 7 are let run."""
        for start in range(0, len(data), chunk):
            await self.turns()
            if self.endpoint.state is relay.ABORTED or not self.raw.reading:
                return
            self.endpoint.data_received(data[start:start + chunk])
        await self.turns()

    async def turns(self) -> None:
        while self.endpoint._paused & relay.TURN:
            await asyncio.sleep(0)

    def _handshake_feed(self, data: bytes) -> None:
        if data:
            self.endpoint.data_received(data)

    def link(self, high: int = relay.WRITE_HIGH_WATER) -> None:
        self.backend = relay.ToTlsEndpoint()
        self.backend_transport = FakeTransport(self.backend)
        self.backend.connection_made(self.backend_transport)  # sets WRITE_HIGH_WATER
        self.backend_transport.high = high
        relay.link(self.endpoint, self.backend, b"")

    def client_reads(self) -> bytes:
        self.client.feed(self.raw.take())
        return self.client.read()


def records(data: bytes) -> list[tuple[int, int]]:
    """(content type, length) of each TLS record in `data`."""
    out, at = [], 0
    while at + 5 <= len(data):
        length = int.from_bytes(data[at + 3:at + 5], "big")
        out.append((data[at], length))
        at += 5 + length
    assert at == len(data)
    return out


def test_tls_state_transitions_are_named_and_checked(contexts: dict[str, Any]) -> None:
    async def main() -> list[relay.TlsState]:
        pair = Pair(contexts["plain"])
        seen = [pair.endpoint.state]
        assert pair.endpoint.transport is not None
        pair.endpoint.transport.close()  # our close_notify
        seen.append(pair.endpoint.state)
        await asyncio.sleep(0)  # connection_lost
        seen.append(pair.endpoint.state)
        with pytest.raises(AssertionError):
            pair.endpoint._set_state(relay.OPEN)  # no way back from CLOSED
        return seen

    assert run(main()) == [relay.OPEN, relay.CLOSING, relay.CLOSED]


def test_a_failed_handshake_is_failed_then_closed(contexts: dict[str, Any]) -> None:
    async def main() -> tuple[relay.TlsState, bool, relay.TlsState]:
        endpoint = relay.TlsEndpoint(contexts["plain"])
        raw = FakeTransport(endpoint)
        endpoint.connection_made(raw)
        assert endpoint.state is relay.HANDSHAKE
        endpoint.data_received(b"\x16\x03\x01\x00\x05junk!")
        state = endpoint.state
        endpoint.data_received(os.urandom(1000))  # dropped, not kept
        assert endpoint._incoming.pending == 0
        endpoint.eof_received()
        assert endpoint.transport is not None
        endpoint.transport.close()
        await asyncio.sleep(0)
        return state, raw.eof_written, endpoint.state

    assert run(main()) == (relay.FAILED, True, relay.CLOSED)


# -- records of at most 8 KiB ------------------------------------------------------------------


def test_records_to_the_client_hold_at_most_8_kib(contexts: dict[str, Any]) -> None:
    # libpq <= 17 reads into >= 8 KiB of free buffer and then waits on the socket: from a
    # larger record OpenSSL would keep plaintext it never asks for (test_libpq15.py).
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link()
        assert pair.backend is not None and pair.endpoint.transport is not None
        sent = os.urandom(300_000)
        pair.backend.data_received(sent[:250_000])  # a backend read of uvloop's size
        pair.endpoint.transport.write(sent[250_000:])  # the session's own writes
        wire_bytes = bytes(pair.raw.buffer)
        app = [length for kind, length in records(wire_bytes) if kind == 23]
        assert max(app) <= relay.TLS_RECORD_MAX + 1 + 16  # content type, AEAD tag
        # libpq's view: a read of 8 KiB never leaves plaintext behind in OpenSSL
        pair.client.feed(pair.raw.take())
        got = bytearray()
        while len(got) < len(sent):
            got += pair.client.sslobj.read(relay.TLS_RECORD_MAX)
            assert pair.client.sslobj.pending() == 0
        assert bytes(got) == sent

    run(main())


# -- flow control, backend to client -----------------------------------------------------------


def test_backend_to_client_ciphertext_waits_then_the_backend_pauses(
        contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link()
        backend, bt = pair.backend, pair.backend_transport
        assert backend is not None and bt is not None
        sent = bytearray()
        while bt.reading:  # the client reads nothing
            chunk = os.urandom(100_000)
            sent += chunk
            backend.data_received(chunk)
            assert len(sent) < 2 * 1024 * 1024, "the backend was never paused"
        # rule 2: the raw transport took what fits its 64 KiB, the rest waited as ciphertext,
        # out of the BIO (whose buffer OpenSSL would keep at that size for the session's life)
        assert pair.endpoint.raw_paused and pair.raw.get_write_buffer_size() < 200_000
        assert pair.endpoint._backlog_size >= relay.WRITE_HIGH_WATER
        assert pair.endpoint._outgoing.pending == 0
        assert not pair.raw.aborted
        got = bytearray()
        while len(got) < len(sent):  # the client reads: everything arrives, the backend resumes
            got += pair.client_reads()
        assert bytes(got) == bytes(sent)
        assert bt.reading and not pair.endpoint.raw_paused

    run(main())


def test_the_outgoing_bio_never_holds_more_than_one_record(contexts: dict[str, Any]) -> None:
    # OpenSSL grows a memory BIO's buffer to the most it ever held and never gives it back: a
    # 256 KiB reply encrypted into it whole left 262 KiB allocated for the session's life. Each
    # record is taken out as soon as it is made, whether the client reads or not.
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link()
        endpoint, backend, bt = pair.endpoint, pair.backend, pair.backend_transport
        assert backend is not None and bt is not None
        most = 0
        encrypt = endpoint._encrypt

        def watched(data: Any) -> int:
            nonlocal most
            assert endpoint._outgoing.pending == 0  # nothing left from an earlier record
            written: int = encrypt(data)
            most = max(most, endpoint._outgoing.pending)
            return written

        endpoint._encrypt = watched
        for size in (256_000, 100, 65_536, 256_000):  # the client reads (raw not paused)
            chunk = os.urandom(size)
            backend.data_received(chunk)
            got = bytearray()
            while len(got) < size:
                got += pair.client_reads()
            assert bytes(got) == chunk
        tail = bytearray()
        while bt.reading:  # then it stops reading: the backlog fills, the backend pauses
            chunk = os.urandom(256_000)
            tail += chunk
            backend.data_received(chunk)
        assert endpoint._backlog_size >= relay.WRITE_HIGH_WATER
        got = bytearray()
        for _ in range(1000):  # the client reads again: all of it arrives, in order
            if len(got) >= len(tail):
                break
            got += pair.client_reads()
        assert bytes(got) == bytes(tail) and bt.reading
        assert 0 < most <= relay.TLS_RECORD_MAX + relay.RECORD_OVERHEAD, most

    run(main())


def test_rule_4_a_backend_that_goes_on_while_paused_is_cut_off(
        contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link()
        assert pair.backend is not None
        for _ in range(40):  # ignores pause_reading: 4 MB
            pair.backend.data_received(bytes(100_000))
            if pair.raw.aborted:
                break
        assert pair.raw.aborted and pair.endpoint.state is relay.ABORTED
        assert pair.endpoint._backlog_size <= relay.WRITE_CAP + 100_000 + 8192

    run(main())


# -- flow control, client to backend -----------------------------------------------------------


def test_client_to_backend_pauses_the_client_while_the_backend_is_full(
        contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link()
        bt = pair.backend_transport
        assert bt is not None
        writer = pair.client.writer()
        sent = bytearray()
        while pair.raw.reading:  # the backend reads nothing
            chunk = os.urandom(16_000)
            sent += chunk
            await pair.to_proxy(writer.application_data(chunk))
            assert len(sent) < 2 * 1024 * 1024, "the client was never paused"
        assert len(bt.buffer) > relay.WRITE_HIGH_WATER
        assert pair.endpoint._paused == relay.PEER_FULL
        assert bytes(bt.take()) == bytes(sent)  # the backend reads: the client resumes
        assert pair.raw.reading and not pair.endpoint._paused

    run(main())


def test_the_incoming_bio_holds_one_step_at_a_time(contexts: dict[str, Any]) -> None:
    # What the incoming BIO holds once, its buffer keeps for the session's life (OpenSSL never
    # shrinks it): a client's 256,000-byte read goes in by steps of about 16 KiB.
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link()
        bt = pair.backend_transport
        assert bt is not None
        watched = WatchedBio(pair.endpoint._incoming)
        pair.endpoint._incoming = watched  # type: ignore[assignment]
        writer = pair.client.writer()
        payload = os.urandom(1_000_000)
        stream = b"".join(writer.application_data(payload[i:i + 16_000])
                          for i in range(0, len(payload), 16_000))
        got = bytearray()
        for start in range(0, len(stream), 256_000):  # uvloop's reads; the backend reads all
            await pair.to_proxy(stream[start:start + 256_000])
            got += bt.take()
        assert bytes(got) == payload
        # 16 KiB steps: at most a step's records and the part of one split between reads
        assert watched.most <= 16 * 1024 + 2 * (16_000 + relay.RECORD_OVERHEAD), watched.most

    run(main())


def test_rule_3_a_client_that_does_not_read_is_not_decrypted(
        contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link()
        assert pair.backend is not None and pair.backend_transport is not None
        bt = pair.backend_transport
        while not pair.endpoint.raw_paused:  # the client does not read what it is sent
            pair.backend.data_received(bytes(50_000))
        bt.take()
        writer = pair.client.writer()
        request = writer.application_data(b"Q" * 1000)
        await pair.to_proxy(request)
        assert bt.buffer == b"" and pair.raw.reading  # kept as ciphertext, still reading
        assert pair.endpoint._held == request
        flood = b"".join(writer.application_data(bytes(1000)) for _ in range(70))
        await pair.to_proxy(flood)  # past INPUT_HOLD: not read either
        assert not pair.raw.reading and pair.endpoint._paused == relay.OWN_FULL
        while pair.raw.buffer or pair.endpoint._backlog:  # the client reads now
            pair.client_reads()
        assert pair.raw.reading and not pair.endpoint._held
        assert bytes(bt.buffer) == b"Q" * 1000 + bytes(70_000)  # in order, nothing lost

    run(main())


def test_pause_reasons_compose(contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        endpoint = pair.endpoint
        assert endpoint.transport is not None
        endpoint._pause(relay.PEER_FULL)
        endpoint.transport.pause_reading()  # Session.terminate
        endpoint._resume(relay.PEER_FULL)
        assert not pair.raw.reading  # the session's reason still holds
        endpoint.transport.resume_reading()
        assert pair.raw.reading

    run(main())


def test_rule_5_the_startup_buffer_pauses_the_client_until_linked(
        contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        writer = pair.client.writer()
        while pair.raw.reading:
            await pair.to_proxy(writer.application_data(bytes(8000)))
            assert len(pair.endpoint.buffer) < 200_000
        assert pair.endpoint._paused == relay.STARTUP
        pair.link()
        assert pair.raw.reading and pair.endpoint.buffer == b""

    run(main())


# -- rule 6: TLS post-handshake floods ---------------------------------------------------------

KEY_UPDATE_REPLY = 5 + 5 + 1 + 16  # the server's KeyUpdate(update_not_requested) record


@pytest.mark.parametrize("linked", [False, True], ids=["negotiating", "relaying"])
def test_a_key_update_flood_is_closed_within_the_budget(contexts: dict[str, Any],
                                                        linked: bool) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        if linked:
            pair.link()
        writer = pair.client.writer()
        flood = b"".join(writer.key_update() for _ in range(10_000))  # 270 KB
        endpoint = pair.endpoint
        endpoint.data_received(flood[:256000])
        # rule 7: one step in this callback, the rest waits for the next loop turn
        answered = (len(pair.raw.buffer) + endpoint._outgoing.pending) // KEY_UPDATE_REPLY
        assert answered <= relay.STEP_RECORDS and endpoint._paused & relay.TURN, answered
        assert not pair.raw.reading and len(endpoint._held) > 200_000
        await pair.to_proxy(flood[256000:])
        assert endpoint.violation is not None and endpoint.violation[0] == "tls_flood"
        assert pair.raw.aborted and endpoint.state is relay.ABORTED
        # the work was bounded: OpenSSL answered only the KeyUpdates within the budget
        answered = (len(pair.raw.buffer) + endpoint._outgoing.pending) // KEY_UPDATE_REPLY
        assert answered <= relay.TLS_NOISE_LIMIT // 27 + relay.STEP_RECORDS + 1, answered

    run(main())


def test_a_key_update_flood_in_small_reads_is_closed_too(contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        writer = pair.client.writer()
        for _ in range(3000):  # one KeyUpdate per read: the fast path's size
            await pair.to_proxy(writer.key_update())
            if pair.raw.aborted:
                break
        assert pair.endpoint.violation is not None and pair.raw.aborted

    run(main())


def test_rule_7_a_read_with_key_updates_waits_a_turn_then_goes_on(
        contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link(high=1 << 30)
        bt = pair.backend_transport
        assert bt is not None
        writer = pair.client.writer()
        data = os.urandom(200_000)
        stream = b"".join(writer.key_update() for _ in range(100)) + b"".join(
            writer.application_data(data[i:i + 16000]) for i in range(0, len(data), 16000))
        pair.endpoint.data_received(stream)  # one read
        assert pair.endpoint._paused == relay.TURN and not pair.raw.reading
        assert len(pair.endpoint._held) > relay.INPUT_HOLD  # (not rule 3's: no OWN_FULL)
        await pair.turns()
        assert bytes(bt.take()) == data
        assert pair.raw.reading and not pair.endpoint._paused and not pair.endpoint._held
        assert pair.endpoint.violation is None

    run(main())


def test_key_updates_between_application_data_are_fine(contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link()
        bt = pair.backend_transport
        assert bt is not None
        writer = pair.client.writer()
        sent = bytearray()
        for i in range(500):  # a KeyUpdate now and then, as a long-lived client may send
            data = os.urandom(200 + i)
            sent += data
            await pair.to_proxy(writer.application_data(data)
                          + (writer.key_update() if i % 5 == 0 else b""))
            pair.client_reads()
        assert pair.endpoint.violation is None and not pair.raw.aborted
        assert bytes(bt.take()) == bytes(sent)

    run(main())


@pytest.mark.parametrize("chunk", [1, 7, 1000, 16_389, 256_000])
def test_application_data_in_any_split_is_not_noise(contexts: dict[str, Any],
                                                    chunk: int) -> None:
    # Records split between reads count as noise until they complete; tiny records (one
    # per message, as node-postgres writes them) cost more than their plaintext.
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link(high=1 << 30)  # the backend takes it all: rule 1 is another test's
        bt = pair.backend_transport
        assert bt is not None
        writer = pair.client.writer()
        n = 1 if chunk < 100 else 10  # byte by byte: fewer of them
        sizes = [1] * 300 * n + [16384] * 2 * n + [5, 70_000 % 16384, 3] * 10 * n
        sent = bytearray()
        stream = bytearray()
        for size in sizes:
            data = os.urandom(size)
            sent += data
            stream += writer.application_data(data)
        await pair.to_proxy(bytes(stream), chunk=chunk)
        assert pair.endpoint.violation is None and not pair.raw.aborted
        assert bytes(bt.take()) == bytes(sent)

    run(main())


def test_tls12_renegotiation_attempts_are_refused_and_a_flood_closed(
        contexts: dict[str, Any]) -> None:
    async def main() -> None:
        pair = Pair(contexts["plain"], tls12=True)
        pair.link()
        bt = pair.backend_transport
        assert bt is not None and pair.endpoint.ssl_object.version() == "TLSv1.2"
        writer = pair.client.writer()
        await pair.to_proxy(writer.renegotiation() + writer.application_data(b"still here"))
        assert bt.take() == b"still here"  # refused with a warning alert, the session goes on
        alerts = [r for r in records(bytes(pair.raw.buffer)) if r[0] == 21]
        assert len(alerts) == 1
        await pair.to_proxy(b"".join(writer.renegotiation() for _ in range(5000)))
        assert pair.endpoint.violation is not None
        assert pair.endpoint.violation[0] == "tls_flood" and pair.raw.aborted

    run(main())


def test_a_terminated_plain_client_stays_unread_when_flow_control_resumes() -> None:
    # Session.terminate stops reading the client until the backend reaches a message boundary;
    # the backend draining meanwhile (its resume_writing) must not read the client again.
    from proxy.config import schema as config_mod
    from proxy.config.snapshot import Snapshot
    from proxy.runtime.session import Session
    from proxy.tls.loader import Loaded

    class State:
        text = '[backend]\nhost = "127.0.0.1"\nport = 5432\n'
        loaded = Loaded(config_mod.parse(text, "t.toml"), Snapshot("t.toml", text))

        def register(self, session: object) -> str:
            return "1"

    async def main() -> None:
        client, backend = relay.Endpoint(), relay.Endpoint()
        ct, bt = FakeTransport(client), FakeTransport(backend)
        client.connection_made(ct)
        backend.connection_made(bt)
        relay.link(client, backend, b"")
        session = Session(None, State())  # type: ignore[arg-type]
        session.client, session.backend = client, backend
        backend.last = b"D\x00\x00\x00\x0b"  # mid-reply: the FATAL waits for a boundary
        client._pause(relay.PEER_FULL)  # the backend's buffer is full
        session.terminate("rule", "a rule now refuses it")
        assert not ct.reading
        client._resume(relay.PEER_FULL)  # the backend drained
        assert not ct.reading, "a terminated client was read again"

    run(main())


async def _instances() -> list[object]:
    endpoint = relay.Endpoint()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls = relay.TlsEndpoint(ctx)
    return [endpoint, tls, relay.ToTlsEndpoint(), relay.TlsTransport(tls, None)]  # type: ignore[arg-type]


def test_relay_instances_have_no_dict() -> None:
    # Two endpoints and a transport live as long as each session: __slots__ on every class of
    # the chain (asyncio.Protocol and asyncio.Transport declare theirs), no per-instance dict.
    for obj in asyncio.run(_instances()):
        assert not hasattr(obj, "__dict__"), type(obj).__name__



# Run in a fresh interpreter that imports nothing else (no pytest): glibc's mmap threshold
# starts at 128 KiB and only a large free raises it, so what a process did before would hide
# the cost measured here.
_READ_FAULTS = """
import asyncio, contextlib, resource, ssl, sys
sys.path.insert(0, sys.argv[1])
from proxy.runtime import relay

class Raw:
    def __init__(self):
        self.out = []
    def write(self, data):
        self.out.append(data)
    def writelines(self, pieces):
        self.out.extend(pieces)
    def is_closing(self):
        return False
    def set_write_buffer_limits(self, high=None, low=None):
        pass
    def pause_reading(self):
        pass
    def resume_reading(self):
        pass

class Backend:
    def write(self, data):
        pass

async def main():
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(sys.argv[2], sys.argv[3])
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    endpoint, raw = relay.TlsEndpoint(server), Raw()
    endpoint.connection_made(raw)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing)
    while endpoint.state is not relay.OPEN:
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        endpoint.data_received(outgoing.read())
        incoming.write(b"".join(raw.out))
        raw.out.clear()
    peer = relay.Endpoint()
    peer.transport = Backend()
    endpoint.peer = peer
    records = []
    for _ in range(2000):
        tls.write(b"Q" * 100)  # a pgbench -S query: one small record
        records.append(outgoing.read())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for record in records:
        endpoint.data_received(record)  # the per-message fast path
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

asyncio.run(main())
"""


def test_a_small_record_costs_no_page_fault_to_read(contexts: dict[str, Any]) -> None:
    # _ssl allocates SSL_READ_SIZE bytes for every read: at 256 KiB, above glibc's first mmap
    # threshold, each small message was an mmap, two page faults, an mremap and a munmap
    # (~17 us against ~1.5 for the read itself).
    import subprocess
    import sys

    # glibc's own allocator with its defaults: no MALLOC_* tuning, no preloaded allocator
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run(
        [sys.executable, "-c", _READ_FAULTS, str(Path(__file__).resolve().parents[2]),
         str(contexts["dir"] / "server.crt"), str(contexts["dir"] / "server.key")],
        capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    faults = int(out.stdout.split()[-1])
    assert faults < 200, f"{faults} minor page faults for 2000 small records"
