"""The byte pump: one `asyncio.Protocol` per side of a session.

Owns: buffering a side's bytes while the session is still negotiating (`read_packet`), then
relaying both ways byte for byte once `link()` joins the two sides, with flow control (a side whose
outgoing buffer is full pauses reading on the other side), half-close where both transports can
do it, and close propagation. Must not parse beyond the start-up packet, decide policy or touch
metrics: it only counts bytes in plain ints, which the session flushes.
"""

from __future__ import annotations

import asyncio

from . import wire

# While negotiating, a client may legitimately have sent at most one start-up packet (10000
# bytes); anything past this is buffered no further: reading pauses until the session decides.
STARTUP_BUFFER_LIMIT = 64 * 1024
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
        elif not transport.is_closing():
            transport.close()
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
