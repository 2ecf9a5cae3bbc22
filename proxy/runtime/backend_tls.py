"""TLS toward the backend on two memory BIOs, under a relay Endpoint.

Owns: the client side of the second hop's TLS once the TCP connection is there (after the
SSLRequest's `S`, or from the first byte for direct TLS): the handshake, decrypting what the
backend sends into the endpoint's `data_received`, encrypting what the endpoint's transport is
given, close_notify. Must not decide what to connect to or how to name a failure (backend.py),
nor relay (relay.py).

The same flood bounds as the client side (relay.py rules 4, 6, 7): a backend, or whoever sits on
the path under sslmode require/prefer without sslrootcert, can send TLS records that carry no
application data and each cost OpenSSL work and a reply (TLS 1.3 KeyUpdate(update_requested),
TLS 1.2 HelloRequest, which our client answers with a no_renegotiation alert). Unchecked, one
256 KiB read of KeyUpdates held the loop ~255 ms and queued a reply per record without limit.
Here ciphertext goes to OpenSSL at most STEP_RECORDS records at a time; after a step that had
such records the rest of the read waits for the next loop turn (the backend not read
meanwhile); more than TLS_NOISE_LIMIT bytes of them, net of what application records pay back,
or more than REPLY_HOLD bytes of replies queued while the backend does not read (WRITE_CAP in
all), closes the backend connection with violation "tls_flood", which the session counts
(dwsproxy_backend_tls_failures_total{reason="flood"}). Application data is never held back for
the backend's own reading: PostgreSQL does not read while it is blocked sending, so that
would deadlock a large pipelined exchange.

Why not uvloop's start_tls: its SSL protocol keeps a 256 KiB read buffer per connection and
writes whole reads into its incoming BIO, whose buffer OpenSSL never shrinks, so every session
that once had a large reply kept ~294 KiB for the rest of its life, idle or not
(benchmarks/burst_memory.py --hop tls). Here the BIOs are fed and drained in small steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from .relay import (
    RECORD_OVERHEAD,
    SSL_READ_SIZE,
    TLS_NOISE_LIMIT,
    TLS_RECORD_MAX,
    WRITE_CAP,
    Endpoint,
    c_methods,
    record_cuts,
    record_overhead,
    seal,
)

# Replies to the backend's records (KeyUpdate answers, alerts) queued while its transport is
# paused, i.e. while it does not read: a real server never asks for one.
REPLY_HOLD = 64 * 1024


class ClientTls(asyncio.Protocol):
    """The protocol on the plain transport: TLS records in and out, plaintext to and from
    `inner` (an Endpoint), whose `transport` is this object's `ClientTlsTransport`."""

    __slots__ = ("_asked", "_encrypt", "_head", "_held", "_incoming", "_noise", "_outgoing",
                 "_overhead", "_pending", "_read", "_replies", "_skip", "_turn",
                 "_writing_paused", "facade", "handshake", "inner", "raw", "sslobj")

    def __init__(self, inner: Endpoint, context: ssl.SSLContext,
                 server_hostname: str | None) -> None:
        self.inner = inner
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=False,
                                       server_hostname=server_hostname)
        c = c_methods(self.sslobj)
        self._read, self._encrypt, self._pending = c.read, c.write, c.pending
        self.raw: asyncio.Transport | None = None
        self.facade: ClientTlsTransport | None = ClientTlsTransport(self)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # a failure nobody awaits any more (the connect timed out) is not logged as unretrieved
        self.handshake.add_done_callback(_retrieve)
        # Flood bounds (module docstring). The stream is records from our first byte (direct
        # TLS) or from the byte after `S` (the endpoint's buffer held only that): where the next
        # record starts is tracked from there, for the steps.
        self._skip = 0
        self._head = b""
        self._noise = 0  # bytes of records without application data, net
        self._overhead = RECORD_OVERHEAD  # an application record's own, once the suite is known
        self._held = bytearray()  # the rest of a read, for the next loop turn
        self._turn = False  # that rest is waiting: the raw transport is not read meanwhile
        self._asked = False  # the relay paused reading (flow control)
        self._writing_paused = False  # the backend does not read what we send
        self._replies = 0  # reply bytes queued while _writing_paused

    # -- start ----------------------------------------------------------------------------------
    def start(self, raw: asyncio.Transport) -> None:
        """Take over `raw` (already the inner endpoint's, before the SSLRequest's answer) and
        send the ClientHello; `handshake` completes or fails with the ssl.SSLError."""
        self.raw = raw
        raw.set_protocol(self)
        self.inner.transport = self.facade
        self._step()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Direct TLS: this protocol is the connection's from the start."""
        self.raw = transport  # type: ignore[assignment]
        assert self.facade is not None
        self.inner.connection_made(self.facade)
        self._step()

    def _step(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert that says why
            if not self.handshake.done():
                # without its traceback: the frames (this one's 256 KiB `data`) would live on
                # in the BackendError's context
                self.handshake.set_exception(exc.with_traceback(None))
            if self.raw is not None:
                self.raw.abort()
            return
        self._flush()
        self._overhead = record_overhead(self.sslobj)
        if not self.handshake.done():
            self.handshake.set_result(None)

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._turn:  # the rest of an earlier read waits for its turn: this goes after it
            self._held += data
            return
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        incoming, read, pending = self._incoming, self._read, self._pending
        cuts, self._skip, self._head = record_cuts(data, self._skip, self._head)
        view = memoryview(data) if len(cuts) > 1 else data
        parts: list[bytes] = []  # delivered once per read: one write onward, not one a step
        start = 0
        for end in cuts:
            incoming.write(view[start:end])
            start = end
            if not self.handshake.done():
                self._step()
                if not self.handshake.done():
                    continue
                if self.handshake.exception() is not None:
                    return
            noise = self._noise  # rule 7 below: did this step's records add to it?
            while True:
                before = incoming.pending
                try:
                    chunk = read(SSL_READ_SIZE)
                except ssl.SSLWantReadError:
                    if self._account(before - incoming.pending, 0):
                        return
                    break
                except ssl.SSLError:
                    # a corrupt record, or (TLS 1.3) the server refusing our certificate after
                    # its Finished: what came before goes on, then the alert, then the end
                    self._deliver(parts)
                    self._flush()
                    if self.raw is not None:
                        self.raw.abort()
                    return
                if not chunk:  # close_notify
                    self._deliver(parts)
                    self._flush()
                    self._eof()
                    return
                parts.append(chunk)
                if self._account(before - incoming.pending, len(chunk)):
                    return
                if not incoming.pending and not pending():
                    break  # (a read takes a record whole: pending() is 0 here, checked anyway)
            if self._outgoing.pending and self._reply():
                return
            if end < len(data) and self._noise > noise:
                # records without application data in this step: the rest of the read waits
                # for the next loop turn, so other sessions run between steps of a flood;
                # `end` is where a record ends, so the held rest starts with a header
                self._skip, self._head = 0, b""
                self._held += view[end:]
                self._yield_turn()
                break
        self._deliver(parts)
        if self._outgoing.pending:  # an alert, or an answer to a post-handshake message
            self._reply()

    def _account(self, consumed: int, plaintext: int) -> bool:
        """relay.py's rule 6 for this hop: True when the backend was closed for a flood."""
        noise = self._noise + consumed
        if plaintext:
            noise = max(0, noise - plaintext - self._overhead)
        self._noise = noise
        if noise > TLS_NOISE_LIMIT:
            self._violate(f"more than {TLS_NOISE_LIMIT} bytes of TLS records with no "
                          "application data from the backend (KeyUpdate or renegotiation flood)")
            return True
        return False

    def _reply(self) -> bool:
        """What OpenSSL answered onto the wire; True when that closed the backend for a flood:
        REPLY_HOLD bytes of replies while it does not read, or WRITE_CAP queued in all."""
        size = self._outgoing.pending
        if self._writing_paused:
            self._replies += size
        self._flush()
        raw = self.raw
        if self._replies > REPLY_HOLD or (raw is not None
                                          and raw.get_write_buffer_size() > WRITE_CAP):
            self._violate(f"more than {REPLY_HOLD} bytes of TLS replies queued for a backend "
                          "that does not read them (KeyUpdate or renegotiation flood)")
            return True
        return False

    def _violate(self, detail: str) -> None:
        if self.inner.violation is None:
            self.inner.violation = ("tls_flood", detail)
        self._held.clear()
        if self.raw is not None:
            self.raw.abort()

    def _yield_turn(self) -> None:
        self._turn = True
        self._apply_reading()
        asyncio.get_running_loop().call_soon(self._take_turn)

    def _take_turn(self) -> None:
        self._turn = False
        self._apply_reading()
        if self._held and self.raw is not None and not self.raw.is_closing():
            held = bytes(self._held)
            self._held.clear()
            self._receive(held)

    # -- reading, paused for two reasons: the relay's flow control (_asked) and a turn --------
    def pause_reading(self) -> None:
        self._asked = True
        self._apply_reading()

    def resume_reading(self) -> None:
        self._asked = False
        self._apply_reading()

    def _apply_reading(self) -> None:
        raw = self.raw
        if raw is None or raw.is_closing():
            return
        if self._asked or self._turn:
            raw.pause_reading()
        else:
            raw.resume_reading()

    def _deliver(self, parts: list[bytes]) -> None:
        if parts:
            self.inner.data_received(parts[0] if len(parts) == 1 else b"".join(parts))

    def _eof(self) -> None:
        if not self.inner.eof_received() and self.raw is not None:
            self.raw.close()

    def eof_received(self) -> bool | None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionResetError(
                "the server closed the connection during the TLS handshake"))
            return None
        self.inner.eof_received()
        return None  # TLS cannot half-close: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            failure = exc or ConnectionResetError(
                "the server closed the connection during the TLS handshake")
            self.handshake.set_exception(failure.with_traceback(None))
        self.inner.connection_lost(exc)
        # the endpoint, the facade and this object point at one another: break the cycle
        self.inner.transport = None
        self.facade = None

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._replies = 0
        self.inner.resume_writing()

    # -- writing --------------------------------------------------------------------------------
    def _flush(self) -> None:
        out = self._outgoing.read()
        raw = self.raw
        if out and raw is not None and not raw.is_closing():
            raw.write(out)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt `data` onto the plain transport, one record at a time (relay.seal)."""
        raw = self.raw
        if raw is None or raw.is_closing():
            return
        if len(data) <= TLS_RECORD_MAX:
            self._encrypt(data)
            raw.write(self._outgoing.read())
            return
        raw.writelines(seal(self._encrypt, self._outgoing, data))


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class ClientTlsTransport(asyncio.Transport):
    """The backend transport as the endpoint, the session and the relay see it."""

    __slots__ = ("_closing", "_tls")

    def __init__(self, tls: ClientTls) -> None:
        super().__init__()
        self._tls = tls
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            try:
                self._tls.send(data)
            except ssl.SSLError:
                self.abort()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        tls = self._tls
        done = tls.handshake
        # (cancelled when a caller's timeout hit while it waited: exception() would raise)
        if done.done() and not done.cancelled() and done.exception() is None:
            # queues our close_notify; SSLWantReadError: the server's is not awaited
            with contextlib.suppress(ssl.SSLError, ValueError):
                tls.sslobj.unwrap()
            tls._flush()
        if tls.raw is not None:
            tls.raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._tls.raw is not None:
            self._tls.raw.abort()

    def is_closing(self) -> bool:
        raw = self._tls.raw
        return self._closing or raw is None or raw.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        self._tls.resume_reading()

    def is_reading(self) -> bool:
        raw = self._tls.raw
        return raw is not None and raw.is_reading()

    def get_write_buffer_size(self) -> int:
        raw = self._tls.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tls.raw is not None:
            self._tls.raw.set_write_buffer_limits(high=high, low=low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls.sslobj
        if name == "peercert":
            return self._tls.sslobj.getpeercert()
        raw = self._tls.raw
        return raw.get_extra_info(name, default) if raw is not None else default
