"""The byte pump: one `asyncio.Protocol` per side of a session.

Owns: buffering a side's bytes while the session is still negotiating (`read_packet`), then
relaying both ways byte for byte once `link()` joins the two sides, with flow control (a side whose
outgoing buffer is full pauses reading on the other side), half-close where both transports can
do it, and close propagation; and the client side's TLS record layer (`TlsEndpoint`). Must not
parse beyond the start-up packet, decide policy or touch metrics: it only counts bytes in plain
ints, which the session flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from . import wire

# While negotiating, a client may legitimately have sent at most one start-up packet (10000
# bytes); anything past this is buffered no further: reading pauses until the session decides.
STARTUP_BUFFER_LIMIT = 64 * 1024
# Messages read by the session before link() (authentication requests and answers) are small.
MAX_PRELINK_MESSAGE = STARTUP_BUFFER_LIMIT
# Write buffer high-water mark per transport: bounds memory per session at roughly 2× this.
WRITE_HIGH_WATER = 256 * 1024
# A graceful close flushes what is queued; a peer that never reads must not hold the session
# (and its socket) forever, so the close turns into an abort after this long.
CLOSE_TIMEOUT = 3.0


class Endpoint(asyncio.Protocol):
    """One side of a session (client or backend)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        self.buffer = bytearray()
        self.received = 0  # bytes received while relaying
        self.last = b""  # the tail of the last chunk relayed: see Session.terminate
        self.eof = False
        self.closed = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._paused_for_buffer = False
        self._close_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: duck-typed on purpose.
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            self.received += len(data)
            self.last = data[-6:]
            assert peer.transport is not None
            peer.transport.write(data)
            return
        # Decrypted data may arrive before start_tls()/connect_accepted_socket() returns
        # (TLS 1.3 sends Finished and the StartupMessage in one flight): keep it, never drop it.
        self.buffer += data
        if len(self.buffer) > STARTUP_BUFFER_LIMIT and self.transport is not None:
            self.transport.pause_reading()
            self._paused_for_buffer = True
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        peer = self.peer
        if peer is None or peer.transport is None:
            # Still negotiating: keep a half-closed plain client open, link() passes the FIN
            # on once the backend is there (a TLS transport cannot half-close: it closes).
            return True if self.transport is not None and self.transport.can_write_eof() \
                else None
        if (peer.transport.can_write_eof() and self.transport is not None
                and self.transport.can_write_eof()):
            # Half-close: pass the FIN on, keep the other direction flowing until it ends too.
            peer.transport.write_eof()
            if peer.eof:
                self._close_both()
            return True
        peer.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            # A pending timer would keep this endpoint (transport, SSL object, buffers) alive.
            self._close_timer.cancel()
            self._close_timer = None
        self.eof = True
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)
        peer, self.peer = self.peer, None  # break the client <-> backend reference cycle
        if peer is not None:
            # What the peer still receives has nowhere to go: it must not be written to this
            # closed transport (uvloop raises there); it is buffered (bounded) until it closes.
            peer.peer = None
            peer.close(abort=exc is not None)

    def pause_writing(self) -> None:
        # Our outgoing buffer is full: stop reading the side that fills it.
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    # -- negotiation phase ----------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_for_bytes(self, n: int) -> bool:
        """Until the buffer holds `n` bytes (True) or the peer closed first (False)."""
        while len(self.buffer) < n:
            if self.eof:
                return False
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return True

    async def read_message(self) -> tuple[bytes, bytes] | None:
        """One regular protocol message (type byte, body) from the buffer, before link();
        None when the peer closed first or the length is absurd."""
        if not await self.wait_for_bytes(5):
            return None
        length = int.from_bytes(self.buffer[1:5], "big")
        if length < 4 or length > MAX_PRELINK_MESSAGE:
            return None
        if not await self.wait_for_bytes(1 + length):
            return None
        kind, body = bytes(self.buffer[:1]), bytes(self.buffer[5:1 + length])
        del self.buffer[:1 + length]
        return kind, body

    async def read_packet(self) -> wire.Event | None:
        """The next start-up packet from the buffer; None when the peer closed first."""
        while True:
            event, used = wire.parse_startup_packet(self.buffer)
            if not isinstance(event, wire.NeedMore):
                del self.buffer[:used]
                return event
            if self.eof:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # -- relaying -------------------------------------------------------------------------------
    def _close_both(self) -> None:
        for side in (self, self.peer):
            if side is not None:
                side.close()

    def close(self, abort: bool = False) -> None:
        """Close: flush what is queued, but abort after CLOSE_TIMEOUT if the peer won't read."""
        transport = self.transport
        if transport is None or self.closed.done():
            return
        if abort:
            transport.abort()
            return
        if not transport.is_closing():
            transport.close()
        if self._close_timer is None:
            # also when the transport is already closing (the peer's FIN or close_notify began
            # it): a peer that stops reading would otherwise hold its unsent bytes forever
            self._close_timer = asyncio.get_running_loop().call_later(
                CLOSE_TIMEOUT, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and not self.closed.done():
            self.transport.abort()


def link(client: Endpoint, backend: Endpoint, first: bytes) -> None:
    """Join two sides: `first` (the StartupMessage plus anything the client sent after it) goes
    to the backend, then every byte is relayed as it comes."""
    assert client.transport is not None and backend.transport is not None
    client.peer, backend.peer = backend, client
    pending = first + bytes(client.buffer)
    client.buffer.clear()
    client.received += len(pending)
    backend.transport.write(pending)
    if backend.buffer:  # the backend spoke before being linked (it should not, but lose nothing)
        data = bytes(backend.buffer)
        backend.buffer.clear()
        backend.received += len(data)
        client.transport.write(data)
    if client._paused_for_buffer:
        client._paused_for_buffer = False
        client.transport.resume_reading()
    if client.eof:
        client.eof_received()
    if backend.eof:
        backend.eof_received()


# Plaintext asked of the SSL object per read call (it returns at most one 16 KiB record).
SSL_READ_SIZE = 256 * 1024


def _c_methods(sslobj: ssl.SSLObject) -> Any:
    """The C object under an `ssl.SSLObject`: its methods skip ssl.py's Python wrappers, one
    frame per call on the per-message path."""
    return getattr(sslobj, "_sslobj", sslobj)


class TlsEndpoint(Endpoint):
    """The client side over TLS: an `ssl.SSLObject` on two MemoryBIOs, driven from a plain
    transport's callbacks, in place of uvloop's SSL protocol.

    Why our own: (1) a failed handshake's alert is in the outgoing BIO, which asyncio's and
    uvloop's SSL protocols drop (python/cpython#98078): here it is sent, then a FIN, and the
    transport stays open until the client closes, so the alert is not overtaken by an RST.
    (2) A relayed message costs one Python frame each way (this class's `data_received`, and
    `ToTlsEndpoint.data_received`), where uvloop's layer calls ssl.py's wrappers several times
    and raises SSLWantReadError once per message.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        c = _c_methods(self.ssl_object)
        self._read, self._pending, self.encrypt = c.read, c.pending, c.write
        self.raw: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready = False  # handshake done and not failed
        # The plain transport keeps uvloop's default limits (64 KiB); while it is paused,
        # ciphertext waits in the outgoing BIO, and only past WRITE_HIGH_WATER there is the
        # backend paused, as uvloop's SSL protocol does. (A/B of a 500 MB COPY out: 787 vs
        # 783 MB/s for uvloop's; one 256 KiB limit on the plain transport gave 726 vs 757.)
        self.raw_paused = False
        self.peer_paused = False
        self.failed = False  # the handshake failed: its alert is sent, input is discarded
        self.initial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        self.transport = TlsTransport(self, self.raw)  # type: ignore[arg-type]
        if self.initial:  # bytes the session already read (a direct-TLS ClientHello)
            data, self.initial = self.initial, b""
            self.data_received(data)

    def pause_writing(self) -> None:
        self.raw_paused = True

    def resume_writing(self) -> None:
        self.raw_paused = False
        self._flush()
        if self.peer_paused and not self.raw_paused:
            self.peer_paused = False
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return  # the alert is sent; what the client still sends is dropped, not kept
        incoming = self._incoming
        incoming.write(data)
        if not self._ready and not self._do_handshake():
            return
        read, pending = self._read, self._pending
        closed = False
        try:
            # One record per message is the common case: it is read outside the loop, which
            # only runs when more came in (one loop for both measured ~1 us more per -S txn).
            chunk = read(SSL_READ_SIZE)
            if not chunk:
                closed = True  # the client's close_notify
            elif incoming.pending or pending():  # more than one record came in
                parts = [chunk]
                while True:
                    try:
                        more = read(SSL_READ_SIZE)
                    except ssl.SSLWantReadError:
                        break
                    if not more:
                        closed = True
                        break
                    parts.append(more)
                    if not incoming.pending and not pending():
                        break
                chunk = b"".join(parts)
        except ssl.SSLWantReadError:
            chunk = b""  # a partial record: wait for the rest
        except ssl.SSLError:
            # a corrupt record, data after close_notify...: an ordinary disconnect
            self._flush()
            if self.raw is not None:
                self.raw.abort()
            return
        if chunk:
            peer = self.peer
            if peer is not None:
                self.received += len(chunk)
                peer.transport.write(chunk)  # type: ignore[union-attr]
            else:
                Endpoint.data_received(self, chunk)
        if self._outgoing.pending:  # an alert, or an answer to a post-handshake message
            self._flush()
        if closed:
            self._tls_closed()

    def _do_handshake(self) -> bool:
        try:
            self.ssl_object.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            self._flush()
            return False
        except ssl.SSLError as exc:
            self._fail(exc)
            return False
        self._flush()
        self._ready = True
        if not self.handshake.done():  # cancelled if the session was (shutdown)
            self.handshake.set_result(None)
        return True

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self._incoming.read()  # drop the rest of the client's flight
        self._flush()  # the alert that says why
        if self.raw is not None and not self.raw.is_closing() and self.raw.can_write_eof():
            self.raw.write_eof()
        self._settle(exc)

    def _settle(self, exc: BaseException) -> None:
        if not self.handshake.done():
            # without its traceback: frames of ours would keep this endpoint alive through it
            self.handshake.set_exception(exc.with_traceback(None))
            self.handshake.exception()  # whoever awaits it still gets it; nobody must

    def _flush(self) -> None:
        out = self._outgoing.read()
        if out and self.raw is not None and not self.raw.is_closing():
            self.raw.write(out)

    def _tls_closed(self) -> None:
        # close_notify: TLS has no half-close, so the session ends as on a FIN
        self.eof = True
        self._wake()
        if self.peer is not None:
            self.peer.close()
        self.close()

    def eof_received(self) -> bool | None:
        if not self.handshake.done():
            self._settle(ConnectionResetError("client closed during the TLS handshake"))
            self.eof = True
            return None
        if self.failed:
            self.eof = True
            return None  # the client read the alert and closed: close too
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(exc or ConnectionResetError("connection closed during the TLS handshake"))
        super().connection_lost(exc)
        self.transport = None  # TlsTransport points back here: break the cycle


class ToTlsEndpoint(Endpoint):
    """The backend side of a TLS session: encrypts what it receives straight onto the client's
    plain transport, in this one frame."""

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if not isinstance(peer, TlsEndpoint):
            Endpoint.data_received(self, data)  # still negotiating, or the client is gone
            return
        self.received += len(data)
        self.last = data[-6:]
        try:
            peer.encrypt(data)  # a memory BIO takes it all: no partial write
        except ssl.SSLError:
            return  # our close_notify went out (unwrap): the session is ending
        if peer.raw_paused:
            if peer._outgoing.pending >= WRITE_HIGH_WATER and not peer.peer_paused:
                peer.peer_paused = True
                assert self.transport is not None
                self.transport.pause_reading()
            return
        # peer._flush(), inlined: this is the per-message path
        out = peer._outgoing.read()
        raw = peer.raw
        if out and raw is not None and not raw.is_closing():
            raw.write(out)


class TlsTransport(asyncio.Transport):
    """The client transport of a TLS session as the session and the relay see it: `write()`
    encrypts onto the plain transport underneath."""

    def __init__(self, endpoint: TlsEndpoint, raw: asyncio.Transport) -> None:
        super().__init__()
        self._endpoint = endpoint
        self._raw = raw
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        endpoint = self._endpoint
        try:
            endpoint.encrypt(data)
        except ssl.SSLError:
            self.abort()
            return
        endpoint._flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        endpoint = self._endpoint
        if endpoint._ready:
            # queues our close_notify; SSLWantReadError: the client's is not awaited
            with contextlib.suppress(ssl.SSLError, ValueError):
                endpoint.ssl_object.unwrap()
            endpoint._flush()
        if endpoint.failed and not endpoint.eof:
            return  # closed when the client closes; Endpoint.close()'s timer bounds the wait
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._endpoint.ssl_object
        return self._raw.get_extra_info(name, default)
