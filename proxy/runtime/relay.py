"""The byte pump: one `asyncio.Protocol` per side of a session.

Owns: buffering a side's bytes while the session is still negotiating (`read_packet`), then
relaying both ways byte for byte once `link()` joins the two sides, with flow control, half-close
where both transports can do it, and close propagation; and the client side's TLS record layer
(`TlsEndpoint`, its states in `TlsState`). Must not parse beyond the start-up packet (TLS record
headers aside), decide policy or touch metrics: it only counts bytes in plain ints, which the
session flushes, and names why it closed a client (`violation`), which the session records.

Back-pressure: who pauses whom. A side reads while none of its reasons to pause holds (bits
PEER_FULL, OWN_FULL, STARTUP, ASKED, TURN of `_paused`; `_pause()`/`_resume()`), so the end of
one reason never resumes a side another one holds; one method per rule.

    client ─▶ transport ─▶ Endpoint / TlsEndpoint (decrypt) ─────────▶ transport ─▶ backend
    client ◀─ raw transport ◀─ outgoing BIO ◀─ encrypt (ToTlsEndpoint) ◀─ transport ◀─ backend

  1. a transport past WRITE_HIGH_WATER pauses the other side's reading, until it drained
     (Endpoint.pause_writing / resume_writing).
  2. TLS client, backend → client: while the raw transport is past its limits (64 KiB, uvloop's
     default) ciphertext waits in the outgoing BIO; past WRITE_HIGH_WATER there the backend is
     paused (ToTlsEndpoint._hold), resumed once the BIO drained (TlsEndpoint.resume_writing).
  3. TLS client, client → client: while its raw transport is past its limits, what the client
     sends is not decrypted (its records can ask for replies: KeyUpdate, alerts, that would
     queue without end); it waits as ciphertext, and past INPUT_HOLD the client is not read
     either (TlsEndpoint._hold_input, resumed in resume_writing). Below that, reading goes
     on, so a client's FIN is still seen.
  4. More than WRITE_CAP queued for a TLS client (BIO and raw transport): abort
     (TlsEndpoint._check_cap). Rules 2 and 3 keep far below it; it bounds what they miss.
  5. Negotiating: past STARTUP_BUFFER_LIMIT of plaintext the client is not read until link()
     (Endpoint.data_received).
  6. More than TLS_NOISE_LIMIT bytes of TLS records that carry no application data (post-
     handshake handshake messages: KeyUpdate, renegotiation attempts) — net of what application
     records pay back — closes the client with violation "tls_flood" (TlsEndpoint._account).
  7. Work per callback is bounded: ciphertext goes to OpenSSL at most STEP_RECORDS records (or
     STEP_BYTES) at a time, rule 6 checked in between; after a step that had records without
     application data, the rest of the read waits for the next loop turn and the client is
     not read meanwhile (TlsEndpoint._receive, _yield_turn), so other clients are served
     between steps of a flood. Application data goes on in the same callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import ssl
from collections.abc import Callable
from typing import Any

from ..protocol import wire

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

# Why a side is not reading: the bits of Endpoint._paused.
PEER_FULL = 1  # rules 1, 2: the other side's outgoing buffer is full
OWN_FULL = 2  # rule 3: this TLS client's own outgoing buffer is full
STARTUP = 4  # rule 5: negotiating, and the startup buffer is full
ASKED = 8  # the session asked (TlsTransport.pause_reading: Session.terminate)
TURN = 16  # rule 7: the rest of a read waits for the next loop turn


_END_ORDER = itertools.count()


class Endpoint(asyncio.Protocol):
    """One side of a session (client or backend)."""

    # No per-instance dict: two or three of these live as long as each session.
    __slots__ = ("_close_timer", "_paused", "_waiter", "buffer", "closed", "ended", "eof", "last",
                 "peer", "received", "transport", "violation", "watch")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        self.buffer = bytearray()
        self.received = 0  # bytes received while relaying
        self.last = b""  # the tail of the last chunk relayed: see Session.terminate
        self.eof = False
        self.closed = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = 0  # reasons not to read: PEER_FULL | OWN_FULL | STARTUP | ASKED
        self._close_timer: asyncio.TimerHandle | None = None
        # (reason, detail) when the relay closed this side for cause (a metrics reason)
        self.violation: tuple[str, str] | None = None
        # (order, "closed" | "reset"): when and how this side's peer first ended the
        # connection; the lower order of the two sides says who ended a session
        # and the tail of what the other side last sent by then (Session._ended_by)
        self.ended: tuple[int, str, bytes] | None = None
        # Shown each relayed chunk, in order, until it returns True (the session's
        # backendkey.KeyScan over the backend's first messages); never changes a byte.
        self.watch: Callable[[bytes], bool] | None = None

    def _mark_end(self, how: str) -> None:
        if self.ended is None:
            peer = self.peer
            self.ended = (next(_END_ORDER), how, peer.last if peer is not None else b"")

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
            if self.watch is not None and self.watch(data):
                self.watch = None
            return
        # Decrypted data may arrive before start_tls()/connect_accepted_socket() returns
        # (TLS 1.3 sends Finished and the StartupMessage in one flight): keep it, never drop it.
        self.buffer += data
        if len(self.buffer) > STARTUP_BUFFER_LIMIT:
            self._pause(STARTUP)  # rule 5
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._mark_end("closed")
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
        self._mark_end("closed" if exc is None else "reset")
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
        # Rule 1: our outgoing buffer is full: stop reading the side that fills it.
        if self.peer is not None:
            self.peer._pause(PEER_FULL)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer._resume(PEER_FULL)

    # -- flow control ---------------------------------------------------------------------------
    def hold(self) -> None:
        """Stop reading this side for good: the session is ending it (Session.terminate)."""
        self._pause(ASKED)

    def _reading(self) -> asyncio.Transport | None:
        """The transport whose reading the reasons of `_paused` stop. (Not kept in an
        attribute: tlsclient.py swaps `transport` for its TLS facade after the SSLRequest.)"""
        return self.transport

    def _pause(self, why: int) -> None:
        if not self._paused:
            transport = self._reading()
            if transport is not None:
                transport.pause_reading()
        self._paused |= why

    def _resume(self, why: int) -> None:
        if self._paused & why:
            self._paused &= ~why
            if not self._paused:
                transport = self._reading()
                if transport is not None:
                    transport.resume_reading()

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
            if not await self.wait_for_bytes(len(self.buffer) + event.count):
                return None

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
    if backend.buffer:  # what the backend answered the StartupMessage before link()
        data = bytes(backend.buffer)
        backend.buffer.clear()
        backend.received += len(data)
        backend.last = data[-6:]  # a ReadyForQuery there is a message boundary (terminate)
        client.transport.write(data)
        if backend.watch is not None and backend.watch(data):
            backend.watch = None
    client._resume(STARTUP)
    if client.eof:
        client.eof_received()
    if backend.eof:
        backend.eof_received()


# Plaintext asked of the SSL object per read call: what one record can hold (2^14 bytes, RFC
# 8446 5.1; an SSL_read returns one record's), so a read takes its record whole and OpenSSL keeps
# no plaintext back (SSL_pending is then 0). Not more: _ssl allocates the whole size for every
# read and shrinks it after, and 256 KiB is above glibc's mmap threshold (128 KiB until a large
# free raises it): each read was then an mmap, two page faults, an mremap and a munmap, ~17 us a
# message in a fresh process against ~1.5 for the read itself (test_relay.py:
# test_a_small_record_costs_no_page_fault_to_read).
SSL_READ_SIZE = 16 * 1024
# Plaintext per record sent to a client. libpq <= 17 in non-blocking mode reads into the free
# space of its input buffer (at least 8 KiB, pqReadData) and does not drain what OpenSSL keeps
# of a larger record before it waits on the socket (fixed in libpq 18): the end of a reply can
# sit decrypted in the client's OpenSSL for ever (psycopg on libpq 15 hung on results of a few
# tens of KB). PostgreSQL never sends more than its 8 KiB send buffer in a record; nor do we.
TLS_RECORD_MAX = 8192
# Rule 6: bytes of TLS records without application data a client may send, net of what its
# application records pay back. TLS 1.3 KeyUpdate(update_requested) costs OpenSSL two key
# derivations and a reply (~25-50 us here per 27-byte record): 32 KiB is ~1200 of them.
TLS_NOISE_LIMIT = 32 * 1024
# What one application record may take beyond its plaintext (header, explicit IV, MAC or tag,
# CBC padding up to 255): an application record pays back at most this much beyond its own
# plaintext towards rule 6. Only its own overhead, never others' records: with the CBC bound on
# an AEAD session, each 1-byte record (23 bytes in TLS 1.3) paid back ~300 bytes, 11 KeyUpdates,
# and a client interleaving them kept the count at 0 while OpenSSL answered 5,000 KeyUpdates
# in one 256 KiB read (hostile review, 2026-12-06).
RECORD_OVERHEAD = 5 + 16 + 48 + 256
# An AEAD record's overhead is fixed by its suite, and is what it pays back exactly: TLS 1.3
# header 5, inner content type 1, tag 16; TLS 1.2 GCM/CCM header 5, explicit nonce 8, tag 16;
# TLS 1.2 ChaCha20-Poly1305 header 5, tag 16. With no slack, a KeyUpdate between application
# records always adds to the count, and every step that had one yields the loop.
TLS13_RECORD_OVERHEAD = 5 + 1 + 16
TLS12_GCM_RECORD_OVERHEAD = 5 + 8 + 16
TLS12_CHACHA_RECORD_OVERHEAD = 5 + 16


def record_overhead(sslobj: ssl.SSLObject) -> int:
    """What an application record of this session adds to its plaintext, at the most."""
    if sslobj.version() == "TLSv1.3":
        return TLS13_RECORD_OVERHEAD
    suite = sslobj.cipher()
    name = suite[0] if suite else ""
    if "CHACHA20" in name:
        return TLS12_CHACHA_RECORD_OVERHEAD
    if "GCM" in name or "CCM" in name:
        return TLS12_GCM_RECORD_OVERHEAD
    return RECORD_OVERHEAD  # CBC, only where an operator enabled such suites
# Work per step: ciphertext goes to OpenSSL at most this many records (or bytes) at a time, so
# a read full of KeyUpdates is stopped by rule 6 within a step (~64 records, a few ms). A step
# is also what the incoming BIO holds at once, and OpenSSL keeps a memory BIO's buffer at the
# most it ever held for the session's life: steps of 64 KiB left ~90 KiB per session after one
# large upload, steps of 16 KiB (two of libpq's 8 KiB records, or one 16 KiB record) 34 KiB,
# decrypting as fast (in-process, 100 MB of 8 KiB records: 1323 vs 1321-1373 MB/s; 8 KiB steps:
# 1263-1279) (benchmarks/bio_memory.py).
STEP_RECORDS = 64
STEP_BYTES = 16 * 1024
# A read this small goes to OpenSSL whole, without a look at its record headers: the
# per-message path (a pgbench -S query is one record of ~100 bytes).
FAST_MAX = 2048
# Rule 4: queued for one TLS client, far above what rules 2 and 3 let through (~576 KiB).
WRITE_CAP = 4 * WRITE_HIGH_WATER
# Rule 3: ciphertext kept undecrypted while the client's own transport is paused.
INPUT_HOLD = 64 * 1024

# what a read loop ended with
_DRAINED, _CLOSE_NOTIFY, _STOP = 0, 1, 2


class TlsState(enum.Enum):
    HANDSHAKE = "handshake"  # OpenSSL's handshake runs; application data after it is kept
    OPEN = "open"  # application data both ways
    FAILED = "failed"  # the handshake failed: alert and FIN sent, input dropped till the close
    CLOSING = "closing"  # our close_notify is sent (or the client's came): input dropped
    ABORTED = "aborted"  # a broken record, rule 4 or rule 6: the transport was aborted
    CLOSED = "closed"  # connection_lost


# Members are singletons: hashing by identity is C, Enum's __hash__ is a Python call (and
# _set_state hashes twice, three times per connection).
TlsState.__hash__ = object.__hash__  # type: ignore[method-assign]
HANDSHAKE, OPEN, FAILED, CLOSING, ABORTED, CLOSED = TlsState
_NEXT: dict[TlsState, frozenset[TlsState]] = {
    HANDSHAKE: frozenset({OPEN, FAILED, CLOSING, ABORTED, CLOSED}),
    OPEN: frozenset({CLOSING, ABORTED, CLOSED}),
    FAILED: frozenset({ABORTED, CLOSED}),
    CLOSING: frozenset({ABORTED, CLOSED}),
    ABORTED: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


def seal(write: Callable[[Any], int], outgoing: ssl.MemoryBIO,
         data: bytes | bytearray | memoryview) -> list[bytes]:
    """`data` as records of at most TLS_RECORD_MAX bytes (`write`: the SSL object's, one call
    makes one record of up to 16 KiB), each taken out of `outgoing` as soon as it is made, after
    what was there before. OpenSSL grows a memory BIO's buffer to the most it ever held and never
    shrinks it: filled with a whole 256 KiB read, it kept 262 KiB per session for the session's
    life; one record at a time, ~12 KiB (benchmarks/bio_memory.py). Both hops use it."""
    read = outgoing.read
    view = memoryview(data)
    out = []
    for start in range(0, len(view), TLS_RECORD_MAX):
        write(view[start:start + TLS_RECORD_MAX])
        out.append(read())
    return out


def record_cuts(data: bytes, skip: int, head: bytes) -> tuple[list[int], int, bytes]:
    """Rule 7's steps: offsets in `data` after STEP_RECORDS records or STEP_BYTES, where a record
    ends, and at the end. `skip` bytes of a record are still to come, or `head` is the start of
    a header split between reads; returned anew for the next read. Both hops use it."""
    n = len(data)
    if head:  # a record header split between reads
        header = head + data[:5 - len(head)]
        if len(header) < 5:
            return [n], 0, header
        at = 5 - len(head) + (header[3] << 8 | header[4])
    else:
        at = skip
    cuts: list[int] = []
    start = records = 0
    while at + 5 <= n:
        at += 5 + (data[at + 3] << 8 | data[at + 4])
        records += 1
        if (records == STEP_RECORDS or at - start >= STEP_BYTES) and at < n:
            cuts.append(at)
            start, records = at, 0
    cuts.append(n)
    if at >= n:
        return cuts, at - n, b""
    return cuts, 0, bytes(data[at:])


def c_methods(sslobj: ssl.SSLObject) -> Any:
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
    and raises SSLWantReadError once per message. (3) We own the incoming ciphertext, so rules
    3, 4 and 6 (module docstring) can be kept, and records to the client stay <= 8 KiB.
    """

    __slots__ = ("_backlog", "_backlog_size", "_encrypt", "_fast", "_head", "_held", "_incoming",
                 "_noise", "_outgoing", "_overhead", "_pending", "_read", "_skip", "handshake",
                 "initial", "raw", "raw_paused", "ssl_object", "state")

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        c = c_methods(self.ssl_object)
        self._read, self._pending, self._encrypt = c.read, c.pending, c.write
        self.raw: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.state = HANDSHAKE
        # The plain transport keeps uvloop's default limits (64 KiB); while it is paused,
        # ciphertext waits in _backlog, and only past WRITE_HIGH_WATER there is the backend
        # paused, as uvloop's SSL protocol does. (A/B of a 500 MB COPY out: 787 vs 783 MB/s
        # for uvloop's; one 256 KiB limit on the plain transport gave 726 vs 757.) Not in the
        # outgoing BIO: OpenSSL never shrinks a memory BIO's buffer, so whatever it held once
        # would stay allocated as long as the session, idle or not (see seal()).
        self._backlog: list[bytes] = []
        self._backlog_size = 0
        self.raw_paused = False
        self._held = bytearray()  # rule 3: ciphertext not decrypted while raw_paused
        self._fast = False  # OPEN and not raw_paused: data_received may take its fast path
        self._noise = 0  # rule 6: bytes without application data, net
        self._overhead = RECORD_OVERHEAD  # an application record's own, once the suite is known
        # Where the next record header starts, for the steps of _receive: bytes of a record
        # still to come, or the first bytes of a header split between reads. Valid while
        # _noise > 0 (a partial record counts as noise until it completes); at 0 the stream
        # is between records.
        self._skip = 0
        self._head = b""
        self.initial = b""

    def _set_state(self, state: TlsState) -> None:
        if state is not self.state:
            assert state in _NEXT[self.state], (self.state, state)
            self.state = state
            self._fast = state is OPEN and not self.raw_paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        self.transport = TlsTransport(self, self.raw)  # type: ignore[arg-type]
        if self.initial:  # bytes the session already read (a direct-TLS ClientHello)
            data, self.initial = self.initial, b""
            self.data_received(data)

    def _reading(self) -> asyncio.Transport | None:
        return self.raw

    # -- rules 2 and 3 --------------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.raw_paused = True
        self._fast = False

    def resume_writing(self) -> None:
        self.raw_paused = False
        self._flush()
        if self.raw_paused:
            return  # the flush filled it again
        self._fast = self.state is OPEN
        self._resume(OWN_FULL)
        if self.peer is not None:
            self.peer._resume(PEER_FULL)
        if self._held and not self._paused & TURN:  # (else _take_turn takes it up)
            self._take_held()

    def _hold_input(self, data: bytes | memoryview) -> None:
        """Rule 3: keep the client's ciphertext undecrypted; past INPUT_HOLD stop reading."""
        self._held += data
        if len(self._held) > INPUT_HOLD:
            self._pause(OWN_FULL)

    def _take_held(self) -> None:
        held = bytes(self._held)
        self._held.clear()
        self._receive(held)

    # -- reading --------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self._fast or len(data) > FAST_MAX:
            self._receive(data)
            return
        incoming = self._incoming
        incoming.write(data)
        try:
            chunk: bytes | None = self._read(SSL_READ_SIZE)
        except ssl.SSLWantReadError:
            chunk = None  # a partial record, or records with no application data
        except ssl.SSLError:
            self._broken()
            return
        # One whole application record is the common case, handled here in one frame; the
        # rest (several records, a partial one, close_notify, noise to count) is not.
        if (not chunk or incoming.pending or self._noise
                or len(data) - len(chunk) > self._overhead):
            self._after_read(data, chunk)
            return
        peer = self.peer
        if peer is not None:
            self.received += len(chunk)
            peer.transport.write(chunk)  # type: ignore[union-attr]
        else:
            Endpoint.data_received(self, chunk)
        if self._outgoing.pending:  # an alert, or an answer to a post-handshake message
            self._flush()

    def _after_read(self, data: bytes, chunk: bytes | None) -> None:
        """data_received when its first read was not one whole application record."""
        if not self._noise:
            self._skip, self._head = 0, b""
        self._record_cuts(data)  # where the next record starts, for later steps
        consumed = len(data) - self._incoming.pending
        parts: list[bytes] = []
        if chunk is None:
            status = self._account(consumed, 0)
        elif not chunk:
            status = _CLOSE_NOTIFY
        else:
            parts.append(chunk)
            status = self._account(consumed, len(chunk)) or self._read_loop(parts)
        self._conclude(parts, status)

    def _receive(self, data: bytes) -> None:
        """data_received in any state but OPEN, or of more than FAST_MAX bytes: fed to OpenSSL
        in steps of whole records (STEP_RECORDS, STEP_BYTES), rule 6 checked after each."""
        state = self.state
        if state is not OPEN and state is not HANDSHAKE:
            return  # FAILED, CLOSING, ABORTED: dropped, not kept
        if self.raw_paused:
            self._hold_input(data)
            return
        if self._paused & TURN:  # (not read meanwhile; kept in order all the same)
            self._held += data
            return
        if state is OPEN and not self._noise:
            self._skip, self._head = 0, b""
        cuts = self._record_cuts(data)
        view = memoryview(data) if len(cuts) > 1 else data
        parts: list[bytes] = []
        status = _DRAINED
        start = 0
        for end in cuts:
            self._incoming.write(view[start:end])
            start = end
            if self.state is HANDSHAKE and not self._do_handshake():
                if self.state is HANDSHAKE:
                    continue
                return  # failed: the alert is sent, the rest is dropped
            noise = self._noise
            status = self._read_loop(parts)
            if status:
                break
            # rule 7 after a step whose records added noise (whatever came before it: a
            # session's few old tickets or alerts must not make it yield for good)
            if end < len(data) and (self.raw_paused or self._noise > noise):
                # rule 3, or rule 7 after records without application data: the rest waits;
                # `end` is where a record ends, so the next one starts there
                self._skip, self._head = 0, b""
                if self.raw_paused:
                    self._hold_input(view[end:])
                else:
                    self._held += view[end:]
                    self._yield_turn()
                break
        self._conclude(parts, status)

    def _yield_turn(self) -> None:
        """Rule 7: the held rest of a read is taken up on the next loop turn."""
        self._pause(TURN)
        asyncio.get_running_loop().call_soon(self._take_turn)

    def _take_turn(self) -> None:
        self._resume(TURN)
        if not self._held:
            return
        if self.raw_paused:
            self._hold_input(b"")  # rule 3 has it now: resume_writing takes it up
        else:
            self._take_held()

    def _record_cuts(self, data: bytes) -> list[int]:
        """Offsets in `data` where a step ends (record_cuts), keeping where the next record
        starts in _skip and _head. Only the size of the steps depends on it, never what OpenSSL
        is given."""
        cuts, self._skip, self._head = record_cuts(data, self._skip, self._head)
        return cuts

    def _read_loop(self, parts: list[bytes]) -> int:
        """Read every record the incoming BIO holds into `parts`, each one accounted."""
        incoming, read, pending = self._incoming, self._read, self._pending
        while incoming.pending or pending():
            before = incoming.pending
            try:
                chunk = read(SSL_READ_SIZE)
            except ssl.SSLWantReadError:
                return self._account(before - incoming.pending, 0)
            except ssl.SSLError:
                self._broken()
                return _STOP
            if not chunk:
                return _CLOSE_NOTIFY
            parts.append(chunk)
            status = self._account(before - incoming.pending, len(chunk))
            if status:
                return status
        return _DRAINED

    def _account(self, consumed: int, plaintext: int) -> int:
        """Rule 6. `consumed` bytes of ciphertext gave `plaintext` bytes: what did not become
        plaintext counts, less the record's own overhead for an application record (the suite's
        bound, `_overhead`), so that no record pays for another's. A record split
        between reads counts until its end arrives and pays it back."""
        noise = self._noise + consumed
        if plaintext:
            noise -= plaintext + self._overhead
            if noise < 0:
                noise = 0
        self._noise = noise
        if noise > TLS_NOISE_LIMIT:
            self._violate("tls_flood", f"more than {TLS_NOISE_LIMIT} bytes of TLS records "
                          "with no application data (KeyUpdate or renegotiation flood)")
            return _STOP
        return _DRAINED

    def _conclude(self, parts: list[bytes], status: int) -> None:
        if status == _STOP:
            return  # aborted: what came before is dropped with the connection
        if parts:
            chunk = parts[0] if len(parts) == 1 else b"".join(parts)
            peer = self.peer
            if peer is not None:
                self.received += len(chunk)
                self.last = chunk[-6:]
                peer.transport.write(chunk)  # type: ignore[union-attr]
            else:
                Endpoint.data_received(self, chunk)
        if self._outgoing.pending:
            self._flush()
            if self.raw_paused:
                self._check_cap()
        if status == _CLOSE_NOTIFY:
            self._tls_closed()

    # -- the handshake --------------------------------------------------------------------------
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
        self._overhead = record_overhead(self.ssl_object)
        self._set_state(OPEN)
        if not self.handshake.done():  # cancelled if the session was (shutdown)
            self.handshake.set_result(None)
        return True

    def _fail(self, exc: BaseException) -> None:
        self._set_state(FAILED)
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

    # -- writing --------------------------------------------------------------------------------
    def _flush(self) -> None:
        """What the outgoing BIO holds (after the backlog, in order) onto the plain transport."""
        out = self._outgoing.read()
        raw = self.raw
        if self._backlog:
            pieces = self._backlog
            self._backlog, self._backlog_size = [], 0
            if out:
                pieces.append(out)
            if raw is not None and not raw.is_closing():
                raw.writelines(pieces)
        elif out and raw is not None and not raw.is_closing():
            raw.write(out)

    def _check_cap(self) -> None:
        """Rule 4, where the relay makes the bytes: replies to what the client sent, and the
        backend's stream. (What the session writes itself is its own to bound.)"""
        raw = self.raw
        if raw is not None and raw.get_write_buffer_size() + self._backlog_size > WRITE_CAP:
            self._abort()

    # -- ending ---------------------------------------------------------------------------------
    def _violate(self, reason: str, detail: str) -> None:
        self.violation = (reason, detail)
        self._abort()

    def _broken(self) -> None:
        # a corrupt record, data after close_notify...: an ordinary disconnect, its alert sent
        self._flush()
        self._abort()

    def _abort(self) -> None:
        if self.state is not CLOSED:
            self._set_state(ABORTED)
        if self.raw is not None:
            self.raw.abort()

    def _tls_closed(self) -> None:
        # close_notify: TLS has no half-close, so the session ends as on a FIN
        self.eof = True
        self._mark_end("closed")
        self._wake()
        if self.peer is not None:
            self.peer.close()
        self.close()

    def eof_received(self) -> bool | None:
        if not self.handshake.done():
            self._settle(ConnectionResetError("client closed during the TLS handshake"))
            self.eof = True
            return None
        if self.state is FAILED:
            self.eof = True
            return None  # the client read the alert and closed: close too
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_state(CLOSED)
        self._settle(exc or ConnectionResetError("connection closed during the TLS handshake"))
        super().connection_lost(exc)
        self.transport = None  # TlsTransport points back here: break the cycle


class ToTlsEndpoint(Endpoint):
    """The backend side of a TLS session: encrypts what it receives straight onto the client's
    plain transport, in this one frame."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if not isinstance(peer, TlsEndpoint):
            Endpoint.data_received(self, data)  # still negotiating, or the client is gone
            return
        self.received += len(data)
        self.last = data[-6:]
        if self.watch is not None and self.watch(data):
            self.watch = None
        try:
            # a memory BIO takes it all: no partial write
            if len(data) <= TLS_RECORD_MAX:
                peer._encrypt(data)
                out = peer._outgoing.read()
                if peer.raw_paused:
                    self._hold(peer, [out])
                    return
                # peer._flush(), inlined: this is the per-message path
                raw = peer.raw
                if raw is not None and not raw.is_closing():
                    if peer._backlog:
                        peer._flush()  # (empty while raw is not paused; kept in order anyway)
                    raw.write(out)
                return
            pieces = seal(peer._encrypt, peer._outgoing, data)
        except ssl.SSLError:
            return  # our close_notify went out (unwrap): the session is ending
        if peer.raw_paused:
            self._hold(peer, pieces)
            return
        peer._backlog += pieces
        peer._flush()  # the backlog, then these, in one writelines

    def _hold(self, peer: TlsEndpoint, pieces: list[bytes]) -> None:
        """Rule 2: the ciphertext waits in the client's backlog; past WRITE_HIGH_WATER there
        the backend stops (TlsEndpoint.resume_writing sends it and resumes the backend)."""
        peer._backlog += pieces
        peer._backlog_size += sum(map(len, pieces))
        if peer._backlog_size >= WRITE_HIGH_WATER:
            self._pause(PEER_FULL)
            peer._check_cap()


class TlsTransport(asyncio.Transport):
    """The client transport of a TLS session as the session and the relay see it: `write()`
    encrypts onto the plain transport underneath."""

    __slots__ = ("_closing", "_endpoint", "_raw")

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
            if len(data) <= TLS_RECORD_MAX:
                endpoint._encrypt(data)
            else:
                endpoint._backlog += seal(endpoint._encrypt, endpoint._outgoing, data)
        except ssl.SSLError:
            self.abort()
            return
        endpoint._flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        endpoint = self._endpoint
        state = endpoint.state
        if state is OPEN:
            # queues our close_notify; SSLWantReadError: the client's is not awaited
            with contextlib.suppress(ssl.SSLError, ValueError):
                endpoint.ssl_object.unwrap()
            endpoint._flush()
        if state is FAILED and not endpoint.eof:
            return  # closed when the client closes; Endpoint.close()'s timer bounds the wait
        if state is OPEN or state is HANDSHAKE:
            endpoint._set_state(CLOSING)
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._endpoint._abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def pause_reading(self) -> None:
        self._endpoint._pause(ASKED)

    def resume_reading(self) -> None:
        self._endpoint._resume(ASKED)

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
