"""Fuzz target (atheris, coverage-guided): wire.parse_startup_packet and the negotiation state
machine, fed bytes as the session gets them: the first byte (0x16 or not), then whole packets
(NeedMore), the CVE-2021-23214 check, the handshake and the policy. The session reads greedily
into its own buffer; exact reads within a flight give the same events, and what is left of a
flight when we answer is what the session finds left in its buffer (pipelined).

Input: one byte of switches (ssl, direct_ssl, the handshake fails, the policy refuses), then what
the client sends, in flights separated by FF FF (the client waits for an answer between them).
Run it with `make fuzz`, or `python tests/fuzz/fuzz_negotiation.py CORPUS...` with libFuzzer
flags (-max_total_time=N). A finding is an exception: a parser or machine bug.
"""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports(include=["proxy.protocol.wire", "proxy.protocol.negotiation"]):
    from proxy.protocol import negotiation, wire
    from proxy.protocol.decision import Allow, Reject
    from proxy.protocol.negotiation import (
        AskPolicy,
        ClientHello,
        Close,
        Connect,
        Eof,
        ForwardCancel,
        Negotiation,
        Phase,
        Refuse,
        Reply,
        StartTls,
        TlsEstablished,
        TlsFailed,
    )

DENY = Reject("rule", wire.INVALID_AUTHORIZATION, "connection refused by rule #1")
FAILED = TlsFailed("tls_handshake", "TLS handshake failed")
FLIGHT_END = b"\xff\xff"


def check_parser(stream: bytes) -> None:
    """One packet parsed at once, and again by exact reads: the same event, never a byte past it."""
    event, used = wire.parse_startup_packet(stream)
    assert 0 <= used <= len(stream)
    if isinstance(event, wire.NeedMore):
        assert used == 0 and event.count > 0
        if len(stream) >= 4:
            (length,) = struct.unpack_from("!i", stream)
            assert len(stream) + event.count == length  # exactly the rest of the packet
    elif used == 0:
        assert isinstance(event, wire.ProtocolViolation) and not event.reply
    else:
        (length,) = struct.unpack_from("!i", stream)
        assert used == length and wire.MIN_STARTUP_LENGTH <= used <= wire.MAX_STARTUP_LENGTH
    if isinstance(event, wire.StartupMessage):
        assert event.raw == stream[:used] and event.user and event.major == 3
        again, _ = wire.parse_startup_packet(
            wire.build_startup_message(event.parameters, event.major, event.minor))
        assert isinstance(again, wire.StartupMessage) and again.parameters == event.parameters
    if isinstance(event, wire.CancelRequest):
        assert event.raw == stream[:used]
    buf = bytearray()
    while True:  # the session's exact reads
        step, step_used = wire.parse_startup_packet(buf)
        if not isinstance(step, wire.NeedMore):
            break
        if len(buf) + step.count > len(stream):
            assert isinstance(event, wire.NeedMore)
            return
        buf += stream[len(buf):len(buf) + step.count]
    assert (step, step_used) == (event, used), (step, event)


class Client:
    """What the client sends, in flights: it sends a flight, then waits for our answer (a flight
    ends at FLIGHT_END). Bytes left in the current flight when we answer were pipelined."""

    def __init__(self, stream: bytes) -> None:
        self.flights = stream.split(FLIGHT_END)
        self.pos = 0

    def _current(self) -> bytes:
        while self.flights and self.pos >= len(self.flights[0]):
            self.flights.pop(0)
            self.pos = 0
        return self.flights[0] if self.flights else b""

    def peek(self) -> int | None:
        flight = self._current()
        return flight[self.pos] if flight else None

    def take(self, n: int) -> bytes:
        flight = self._current()
        chunk = flight[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def pipelined(self) -> bool:
        return bool(self.flights) and self.pos < len(self.flights[0])


def read_packet(client: Client) -> negotiation.Event:
    buf = bytearray()
    while True:
        event, _ = wire.parse_startup_packet(buf)
        if not isinstance(event, wire.NeedMore):
            return event
        chunk = client.take(event.count)
        if not chunk:
            return Eof(partial=bool(buf))
        buf += chunk


def drive(stream: bytes, *, ssl: bool, direct_ssl: bool, tls_ok: bool, allow: bool) -> None:
    neg = Negotiation(ssl=ssl, direct_ssl=direct_ssl)
    client = Client(stream)
    actions: list[negotiation.Action] = []
    for _ in range(len(stream) + 8):  # every reading step takes a byte or ends: this bounds it
        phase = neg.phase
        if phase is Phase.CONNECT or phase is Phase.CLOSED:
            break
        event: negotiation.Event
        if phase is Phase.HANDSHAKE:
            event = TlsEstablished() if tls_ok else FAILED
        elif phase is Phase.POLICY:
            event = Allow() if allow else DENY
        elif phase is Phase.START and client.peek() == wire.TLS_HANDSHAKE_BYTE:
            event = ClientHello()  # what follows is what TLS would decrypt, in this simulation
        else:
            event = read_packet(client)
        pipelined = None
        if isinstance(event, (wire.SSLRequest, wire.GSSENCRequest)) and phase is not Phase.TLS:
            pipelined = client.pipelined()
        out = neg.receive(event, pipelined)
        for action in out:
            if isinstance(action, StartTls):
                assert ssl and ((isinstance(event, ClientHello) and direct_ssl)
                                or (isinstance(event, wire.SSLRequest) and not pipelined))
            elif isinstance(action, Connect):
                assert isinstance(event, Allow) and allow
            elif isinstance(action, AskPolicy):
                assert action.startup is event
            elif isinstance(action, Refuse):
                assert action.sqlstate and action.message
        actions.extend(out)
    else:
        raise AssertionError(f"negotiation did not end: {neg.phase}")
    kinds = [type(a) for a in actions]
    assert kinds.count(StartTls) <= 1 and kinds.count(AskPolicy) <= 1
    if Connect in kinds:
        assert kinds[-2:] == [AskPolicy, Connect]
    requests = [a.request for a in actions if isinstance(a, Reply)]
    assert requests.count("SSLRequest") <= 1 and requests.count("GSSENCRequest") <= 1
    assert sum(k in (Refuse, Close, ForwardCancel, Connect) for k in kinds) == 1
    assert kinds[-1] in (Refuse, Close, ForwardCancel, Connect)


def one_input(data: bytes) -> None:
    switches = data[0] if data else 0
    stream = data[1:]
    check_parser(stream)
    drive(stream, ssl=not switches & 1, direct_ssl=not switches & 2, tls_ok=not switches & 4,
          allow=not switches & 8)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
