"""The order of a connection's start-up packets, sans-IO: a state machine of one client.

Owns: which packet may come when and what answers it, as PostgreSQL's ProcessSSLStartup and
ProcessStartupPacket decide (src/backend/tcop/backend_startup.c, postmaster.c before 17): the
phases of one connection, the `ssl_done` / `gss_done` flags, and the rule that a StartupMessage
reaches the backend only through the policy's `Allow`. Events go in (wire's packets, a first byte
of 0x16, the TLS handshake's end, EOF, the policy's decision) and actions come out (answer `S` or
`N`, start TLS, refuse with an ErrorResponse, close silently, forward a cancel, ask the policy,
connect the backend). Must not touch sockets, the loop, the config or metrics, nor decide policy:
the session reads, feeds events in and carries the actions out, so every packet order is a
one-line table test.

    START ── 0x16 (direct TLS) ─────────────────────┐
      │  SSLRequest: S ───────────────────────┐     ▼
      │  SSLRequest, GSSENCRequest: N ─▶ PLAIN ─ S ─▶ HANDSHAKE ── TlsEstablished ──▶ TLS
      │                                   │                                           │
      └── StartupMessage ─────────────────┴────────────────▶ POLICY ◀─ StartupMessage ┘
                                                               │ Allow ──▶ CONNECT
    a refusal, EOF, CancelRequest, TlsFailed or Reject ──▶ CLOSED
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from . import wire
from .decision import Allow, Reject


class Phase(enum.Enum):
    START = "start"  # nothing read: the session peeks at the first byte (0x16: direct TLS)
    PLAIN = "plain"  # after an `N`: the next start-up packet, in plaintext, exact reads
    HANDSHAKE = "handshake"  # `S` sent or a ClientHello seen: the TLS handshake runs
    TLS = "tls"  # handshake done: the start-up packet comes inside TLS
    POLICY = "policy"  # a StartupMessage is in: waiting for the policy's decision
    CONNECT = "connect"  # allowed: the session connects the backend and relays (final)
    CLOSED = "closed"  # refused, closed or cancel forwarded (final)


# -- events the session feeds in, besides wire's packets and policy's decision -------------------
@dataclass(frozen=True, slots=True)
class ClientHello:
    """The connection's first byte is 0x16: a direct-TLS ClientHello (PostgreSQL 17)."""


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    pass


@dataclass(frozen=True, slots=True)
class TlsFailed:
    reason: str  # a dwsproxy_connections_rejected_total reason (tls.handshake_failure)
    detail: str


@dataclass(frozen=True, slots=True)
class Eof:
    """The client closed; `partial`: in the middle of a start-up packet."""

    partial: bool = False


# wire.Event includes NeedMore, which is refused: only whole packets are events.
Event = wire.Event | ClientHello | TlsEstablished | TlsFailed | Eof | Allow | Reject


# -- actions the session carries out, in order ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reply:
    """Write one answer byte on the raw socket (`S` or `N`)."""

    answer: bytes
    request: Literal["SSLRequest", "GSSENCRequest"]


@dataclass(frozen=True, slots=True)
class StartTls:
    """Run the TLS handshake on the socket; feed back TlsEstablished or TlsFailed."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Send a FATAL ErrorResponse, then close; counted under `reason`."""

    reason: str
    sqlstate: str
    message: str
    hint: str = ""
    detail: str = ""  # for the log line, when it says more than `message`


@dataclass(frozen=True, slots=True)
class Close:
    """Close without a word; counted under `reason`, except "empty" (a bare TCP connect, e.g. a
    port probe: as PostgreSQL, not worth a complaint)."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    """Police the CancelRequest (policy.decide_cancel, the per-address rate) and forward it;
    never an answer to the client, as PostgreSQL."""

    request: wire.CancelRequest


@dataclass(frozen=True, slots=True)
class AskPolicy:
    """Gather the facts, ask policy.decide, and feed its decision back."""

    startup: wire.StartupMessage


@dataclass(frozen=True, slots=True)
class Connect:
    """The policy allowed the StartupMessage: connect the backend and relay."""


Action = Reply | StartTls | Refuse | Close | ForwardCancel | AskPolicy | Connect

_PACKETS = (wire.StartupMessage, wire.SSLRequest, wire.GSSENCRequest, wire.CancelRequest,
            wire.ProtocolViolation)

# Shared, immutable: no allocation per connection for the common answers.
_START_TLS = (StartTls(),)
_ACCEPT_SSL = (Reply(wire.SSL_ACCEPT, "SSLRequest"), StartTls())
_REFUSE_SSL = (Reply(wire.SSL_REFUSE, "SSLRequest"),)
_REFUSE_GSS = (Reply(wire.SSL_REFUSE, "GSSENCRequest"),)
_CONNECT = (Connect(),)
_NOTHING: tuple[Action, ...] = ()

# CVE-2021-23214: bytes that came before our answer could have been injected by a man in the
# middle; PostgreSQL refuses them after either request (pq_buffer_remaining_data), as we do.
_SSL_PIPELINED = Refuse("bad_startup", wire.PROTOCOL_VIOLATION,
                        "received unencrypted data after SSL request",
                        detail="unencrypted data after SSLRequest (CVE-2021-23214)")
_GSS_PIPELINED = Refuse("bad_startup", wire.PROTOCOL_VIOLATION,
                        "received unencrypted data after GSSAPI encryption request",
                        detail="unencrypted data after GSSENCRequest (CVE-2021-23214)")


def _unsupported(code: int, detail: str) -> tuple[Action, ...]:
    bad = wire.unsupported_protocol(code)
    return (Refuse("bad_startup", bad.sqlstate, bad.message, detail=detail),)


class NegotiationError(Exception):
    """The session fed an event the phase cannot take: a bug in the caller, never the client's
    doing (whatever the client sends arrives as one of the events a reading phase takes)."""


class Negotiation:
    """One client's negotiation. `receive()` takes one event and returns the actions to carry
    out, in order; `phase` says what the session reads next."""

    __slots__ = ("direct", "direct_ssl", "encrypted", "gss_done", "packets", "phase", "ssl",
                 "ssl_done", "ssl_refused")

    def __init__(self, *, ssl: bool, direct_ssl: bool) -> None:
        self.ssl = ssl  # [tls] ssl: an SSLRequest is answered S
        self.direct_ssl = direct_ssl  # [tls] direct_ssl: a ClientHello as first byte is taken
        self.phase = Phase.START
        # PostgreSQL's flags: a layer that was negotiated, or refused, may not be asked for again.
        self.ssl_done = False
        self.gss_done = False
        self.ssl_refused = False  # an SSLRequest was answered N
        self.encrypted = False
        self.direct = False
        self.packets = 0  # start-up packets read, for what an EOF means

    def receive(self, event: Event, pipelined: bool | None = None) -> tuple[Action, ...]:
        """`pipelined` is required with an SSLRequest or GSSENCRequest read in plaintext: whether
        bytes already followed it before any answer (the session peeks at the socket)."""
        # Identity tests, not a set of phases or a dict by phase: Enum's __hash__ is Python
        # code, and this runs a few times for every new connection.
        phase = self.phase
        if phase is Phase.START or phase is Phase.PLAIN or phase is Phase.TLS:
            if isinstance(event, _PACKETS):
                self.packets += 1
                return self._packet(event, pipelined)
            if isinstance(event, Eof):
                return self._eof(event)
            if isinstance(event, ClientHello) and phase is Phase.START:
                return self._client_hello()
            # Only the very first byte is looked at for 0x16; later it is a length's high byte.
        elif phase is Phase.HANDSHAKE:
            if isinstance(event, TlsEstablished):
                # PostgreSQL after `S`: ProcessStartupPacket(port, true, true); after a direct
                # handshake it would answer N inside TLS, which no client asks: refused here.
                self.ssl_done = self.gss_done = self.encrypted = True
                self.phase = Phase.TLS
                return _NOTHING
            if isinstance(event, TlsFailed):
                return self._close(event.reason, event.detail)
        elif phase is Phase.POLICY:
            if isinstance(event, Allow):
                self.phase = Phase.CONNECT
                return _CONNECT
            if isinstance(event, Reject):
                self.phase = Phase.CLOSED
                return (Refuse(event.reason, event.sqlstate, event.message, event.hint),)
        raise NegotiationError(f"{type(event).__name__} in phase {phase.name}")

    # -- per event ------------------------------------------------------------------------------
    def _client_hello(self) -> tuple[Action, ...]:
        if not self.ssl or not self.direct_ssl:
            return self._close("ssl_disabled", "direct TLS ClientHello refused: "
                               + ("ssl is off" if not self.ssl else "direct_ssl is off"))
        self.direct = True
        self.phase = Phase.HANDSHAKE
        return _START_TLS

    def _packet(self, event: wire.Event, pipelined: bool | None) -> tuple[Action, ...]:
        if isinstance(event, wire.StartupMessage):
            self.phase = Phase.POLICY
            return (AskPolicy(event),)
        if isinstance(event, wire.SSLRequest):
            if self.ssl_done:
                # PostgreSQL reads a second SSLRequest as a protocol version 1234.5679.
                return self._refuse_all(_unsupported(
                    wire.SSL_REQUEST_CODE, "SSLRequest after SSL was negotiated or refused"))
            if self._pipelined(pipelined):
                return self._refuse_all((_SSL_PIPELINED,))
            self.ssl_done = True
            if self.ssl:
                self.phase = Phase.HANDSHAKE
                return _ACCEPT_SSL
            self.ssl_refused = True
            self.phase = Phase.PLAIN
            return _REFUSE_SSL
        if isinstance(event, wire.GSSENCRequest):
            if self.gss_done:
                return self._refuse_all(_unsupported(
                    wire.GSSENC_REQUEST_CODE,
                    "GSSENCRequest after GSSAPI or SSL was negotiated or refused"))
            if self._pipelined(pipelined):
                return self._refuse_all((_GSS_PIPELINED,))
            # No GSSAPI encryption here: always N, and the client may go on (to SSL or not).
            # PostgreSQL recurses with fresh flags, ProcessStartupPacket(port, GSSok == 'G',
            # true), so an N to GSSAPI resets ssl_done and SSLRequest/GSSENCRequest may
            # alternate without end; flags that only ever become true keep its documented rule
            # ("a rejected negotiation sets only the flag for that layer") and end the loop.
            self.gss_done = True
            self.phase = Phase.PLAIN
            return _REFUSE_GSS
        if isinstance(event, wire.CancelRequest):
            self.phase = Phase.CLOSED
            return (ForwardCancel(event),)
        assert isinstance(event, wire.ProtocolViolation)
        if event.reply:
            return self._refuse_all((Refuse("bad_startup", event.sqlstate, event.message),))
        return self._close("bad_startup", event.message)

    @staticmethod
    def _pipelined(pipelined: bool | None) -> bool:
        # Only asked in plaintext: after a handshake both flags are set and a request is refused.
        if pipelined is None:
            raise NegotiationError("an encryption request in plaintext needs `pipelined`")
        return pipelined

    def _eof(self, event: Eof) -> tuple[Action, ...]:
        if event.partial:
            return self._close("bad_startup", "client closed in the middle of a start-up packet")
        if self.phase is Phase.TLS:
            return self._close("tls_handshake", "client closed right after the TLS handshake "
                               "(did it reject the server certificate or host name?)")
        if self.ssl_refused:
            return self._close("ssl_disabled", "client closed after SSLRequest was answered N "
                               "(ssl is off; it requires SSL)")
        if self.packets:
            return self._close("bad_startup", "client closed mid-negotiation")
        return self._close("empty", "")

    def _close(self, reason: str, detail: str) -> tuple[Action, ...]:
        self.phase = Phase.CLOSED
        return (Close(reason, detail),)

    def _refuse_all(self, actions: tuple[Action, ...]) -> tuple[Action, ...]:
        self.phase = Phase.CLOSED
        return actions
