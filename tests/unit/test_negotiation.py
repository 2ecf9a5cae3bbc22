"""negotiation.py without sockets: every order of start-up packets is one table entry, and a
property test walks random orders."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol import wire
from proxy.protocol.decision import Allow, Reject
from proxy.protocol.negotiation import (
    AskPolicy,
    ClientHello,
    Close,
    Connect,
    Eof,
    Event,
    ForwardCancel,
    Negotiation,
    NegotiationError,
    Phase,
    Refuse,
    Reply,
    StartTls,
    TlsEstablished,
    TlsFailed,
)

SSL = wire.SSLRequest()
GSS = wire.GSSENCRequest()
HELLO = ClientHello()
OK = TlsEstablished()
FAIL = TlsFailed("tls_handshake", "TLS handshake failed: no shared cipher")
EOF = Eof()
PART = Eof(partial=True)
STARTUP = wire.StartupMessage(wire.build_startup_message({"user": "u"}), 3, 0, {"user": "u"})
CANCEL = wire.CancelRequest(struct.pack("!iIii", 16, wire.CANCEL_REQUEST_CODE, 1, 2))
BAD = wire.ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
GARBAGE = wire.ProtocolViolation("invalid length of startup packet: 369295616", reply=False)
ALLOW = Allow()
DENY = Reject("ssl_required", wire.INVALID_AUTHORIZATION,
              "SSL connection is required by the server (require_ssl is on)", hint="use SSL")
PIPELINED = "pipelined"  # marks the request before it as followed by bytes before our answer


def feed(events: list[Any], *, ssl: bool = True, direct_ssl: bool = True
         ) -> tuple[Negotiation, list[str]]:
    """Feed events in order; returns the machine and its actions, written short."""
    neg = Negotiation(ssl=ssl, direct_ssl=direct_ssl)
    out: list[str] = []
    for i, event in enumerate(events):
        if event == PIPELINED:
            continue
        pipelined = None
        if isinstance(event, (wire.SSLRequest, wire.GSSENCRequest)) and neg.phase is not Phase.TLS:
            pipelined = i + 1 < len(events) and events[i + 1] == PIPELINED
        out.extend(short(a) for a in neg.receive(event, pipelined))
    return neg, out


def short(action: Any) -> str:
    if isinstance(action, Reply):
        return action.answer.decode()
    if isinstance(action, StartTls):
        return "tls"
    if isinstance(action, AskPolicy):
        return "policy"
    if isinstance(action, Connect):
        return "connect"
    if isinstance(action, ForwardCancel):
        return "cancel"
    if isinstance(action, Refuse):
        return f"refuse {action.reason} {action.sqlstate}: {action.message}"
    assert isinstance(action, Close)
    return f"close {action.reason}: {action.detail}"


UNSUPPORTED_SSL = "refuse bad_startup 0A000: unsupported frontend protocol 1234.5679: " \
                  "server supports 3.0 to 3.2"
UNSUPPORTED_GSS = "refuse bad_startup 0A000: unsupported frontend protocol 1234.5680: " \
                  "server supports 3.0 to 3.2"
SSL_PIPELINED = "refuse bad_startup 08P01: received unencrypted data after SSL request"
GSS_PIPELINED = "refuse bad_startup 08P01: received unencrypted data after GSSAPI encryption " \
                "request"
TLS_EOF = "close tls_handshake: client closed right after the TLS handshake (did it reject " \
          "the server certificate or host name?)"
PARTIAL = "close bad_startup: client closed in the middle of a start-up packet"

# (events, ssl, direct_ssl, expected actions, final phase)
TABLE: list[tuple[str, list[Any], bool, bool, list[str], Phase]] = [
    # the orders real clients use
    ("plaintext", [STARTUP, ALLOW], True, True, ["policy", "connect"], Phase.CONNECT),
    ("sslrequest", [SSL, OK, STARTUP, ALLOW], True, True,
     ["S", "tls", "policy", "connect"], Phase.CONNECT),
    ("direct tls", [HELLO, OK, STARTUP, ALLOW], True, True,
     ["tls", "policy", "connect"], Phase.CONNECT),
    ("gssenc then ssl (libpq gssencmode=prefer)", [GSS, SSL, OK, STARTUP, ALLOW], True, True,
     ["N", "S", "tls", "policy", "connect"], Phase.CONNECT),
    ("ssl off: N, then plaintext", [SSL, STARTUP, ALLOW], False, True,
     ["N", "policy", "connect"], Phase.CONNECT),
    ("ssl off: N to both", [SSL, GSS, STARTUP, ALLOW], False, True,
     ["N", "N", "policy", "connect"], Phase.CONNECT),
    ("ssl off: gss N then ssl N", [GSS, SSL, STARTUP, ALLOW], False, True,
     ["N", "N", "policy", "connect"], Phase.CONNECT),
    ("policy refuses", [STARTUP, DENY], True, True,
     ["policy", f"refuse ssl_required 28000: {DENY.message}"], Phase.CLOSED),
    ("policy refuses inside tls", [SSL, OK, STARTUP, DENY], True, True,
     ["S", "tls", "policy", f"refuse ssl_required 28000: {DENY.message}"], Phase.CLOSED),
    # cancel requests, plaintext or inside TLS (libpq 18 encrypts them)
    ("cancel", [CANCEL], True, True, ["cancel"], Phase.CLOSED),
    ("cancel inside tls", [SSL, OK, CANCEL], True, True, ["S", "tls", "cancel"], Phase.CLOSED),
    ("cancel after N", [SSL, CANCEL], False, True, ["N", "cancel"], Phase.CLOSED),
    # a second request for a layer already negotiated or refused: PostgreSQL reads it as a
    # protocol version (ssl_done / gss_done)
    ("second sslrequest after N", [SSL, SSL], False, True, ["N", UNSUPPORTED_SSL],
     Phase.CLOSED),
    ("second gssencrequest after N", [GSS, GSS], True, True, ["N", UNSUPPORTED_GSS],
     Phase.CLOSED),
    ("ssl N, gss N, ssl again", [SSL, GSS, SSL], False, True, ["N", "N", UNSUPPORTED_SSL],
     Phase.CLOSED),
    ("gss N, ssl N, gss again", [GSS, SSL, GSS], False, True, ["N", "N", UNSUPPORTED_GSS],
     Phase.CLOSED),
    ("sslrequest inside tls", [SSL, OK, SSL], True, True, ["S", "tls", UNSUPPORTED_SSL],
     Phase.CLOSED),
    ("gssencrequest inside tls", [SSL, OK, GSS], True, True, ["S", "tls", UNSUPPORTED_GSS],
     Phase.CLOSED),
    ("sslrequest inside direct tls", [HELLO, OK, SSL], True, True, ["tls", UNSUPPORTED_SSL],
     Phase.CLOSED),
    ("gssencrequest inside direct tls", [HELLO, OK, GSS], True, True, ["tls", UNSUPPORTED_GSS],
     Phase.CLOSED),
    # CVE-2021-23214: bytes sent before our answer
    ("ssl pipelined", [SSL, PIPELINED], True, True, [SSL_PIPELINED], Phase.CLOSED),
    ("ssl pipelined, ssl off", [SSL, PIPELINED], False, True, [SSL_PIPELINED], Phase.CLOSED),
    ("gss pipelined", [GSS, PIPELINED], True, True, [GSS_PIPELINED], Phase.CLOSED),
    ("gss N, then ssl pipelined", [GSS, SSL, PIPELINED], True, True, ["N", SSL_PIPELINED],
     Phase.CLOSED),
    ("ssl N, then gss pipelined", [SSL, GSS, PIPELINED], False, True, ["N", GSS_PIPELINED],
     Phase.CLOSED),
    ("second ssl pipelined is refused as a second ssl", [SSL, SSL, PIPELINED], False, True,
     ["N", UNSUPPORTED_SSL], Phase.CLOSED),
    # direct TLS
    ("direct tls, ssl off", [HELLO], False, True,
     ["close ssl_disabled: direct TLS ClientHello refused: ssl is off"], Phase.CLOSED),
    ("direct tls, direct_ssl off", [HELLO], True, False,
     ["close ssl_disabled: direct TLS ClientHello refused: direct_ssl is off"], Phase.CLOSED),
    ("direct tls, handshake fails", [HELLO, FAIL], True, True,
     ["tls", f"close tls_handshake: {FAIL.detail}"], Phase.CLOSED),
    ("sslrequest, handshake fails", [SSL, FAIL], True, True,
     ["S", "tls", f"close tls_handshake: {FAIL.detail}"], Phase.CLOSED),
    # malformed packets
    ("bad layout", [BAD], True, True, [f"refuse bad_startup 08P01: {BAD.message}"],
     Phase.CLOSED),
    ("garbage length: closed without a word", [GARBAGE], True, True,
     [f"close bad_startup: {GARBAGE.message}"], Phase.CLOSED),
    ("bad layout after N", [SSL, BAD], False, True,
     ["N", f"refuse bad_startup 08P01: {BAD.message}"], Phase.CLOSED),
    ("bad layout inside tls", [SSL, OK, BAD], True, True,
     ["S", "tls", f"refuse bad_startup 08P01: {BAD.message}"], Phase.CLOSED),
    # the client goes away
    ("bare connect (port probe)", [EOF], True, True, ["close empty: "], Phase.CLOSED),
    ("closed mid-packet", [PART], True, True, [PARTIAL], Phase.CLOSED),
    ("closed after N to ssl", [SSL, EOF], False, True,
     ["N", "close ssl_disabled: client closed after SSLRequest was answered N (ssl is off; "
      "it requires SSL)"], Phase.CLOSED),
    ("closed after N to gss", [GSS, EOF], True, True,
     ["N", "close bad_startup: client closed mid-negotiation"], Phase.CLOSED),
    ("closed after N to gss, mid-packet", [GSS, PART], True, True, ["N", PARTIAL],
     Phase.CLOSED),
    ("closed right after the handshake", [SSL, OK, EOF], True, True, ["S", "tls", TLS_EOF],
     Phase.CLOSED),
    ("closed inside tls mid-packet", [SSL, OK, PART], True, True, ["S", "tls", PARTIAL],
     Phase.CLOSED),
]


@pytest.mark.parametrize("name,events,ssl,direct_ssl,expected,phase", TABLE,
                         ids=[row[0] for row in TABLE])
def test_order(name: str, events: list[Any], ssl: bool, direct_ssl: bool, expected: list[str],
               phase: Phase) -> None:
    neg, actions = feed(events, ssl=ssl, direct_ssl=direct_ssl)
    assert actions == expected
    assert neg.phase is phase


def test_flags_follow_postgresql() -> None:
    neg, _ = feed([GSS], ssl=False)
    assert (neg.ssl_done, neg.gss_done, neg.encrypted) == (False, True, False)
    neg, _ = feed([SSL], ssl=False)
    assert (neg.ssl_done, neg.gss_done, neg.ssl_refused) == (True, False, True)
    neg, _ = feed([SSL, OK])
    assert (neg.ssl_done, neg.gss_done, neg.encrypted, neg.direct) == (True, True, True, False)
    neg, _ = feed([HELLO, OK])
    assert (neg.ssl_done, neg.gss_done, neg.encrypted, neg.direct) == (True, True, True, True)


def test_the_policy_refusal_keeps_its_hint() -> None:
    neg = Negotiation(ssl=True, direct_ssl=True)
    neg.receive(STARTUP)
    (refusal,) = neg.receive(DENY)
    assert refusal == Refuse(DENY.reason, DENY.sqlstate, DENY.message, DENY.hint)


def test_the_cve_refusal_names_the_cve_in_the_log_detail() -> None:
    (refusal,) = Negotiation(ssl=True, direct_ssl=True).receive(SSL, pipelined=True)
    assert isinstance(refusal, Refuse) and "CVE-2021-23214" in refusal.detail


# -- misuse by the session is a bug, raised, and changes nothing ---------------------------------
@pytest.mark.parametrize("events,ssl,bad", [
    ([], True, OK),  # no handshake under way
    ([], True, ALLOW),  # no StartupMessage asked about
    ([SSL], False, HELLO),  # only the first byte is looked at for 0x16
    ([SSL], True, STARTUP),  # no packet while the handshake runs
    ([STARTUP], True, SSL),  # no packet while the policy decides
    ([STARTUP, ALLOW], True, STARTUP),  # final
    ([CANCEL], True, EOF),  # final
    ([], True, wire.NeedMore(4)),  # only whole packets are events
], ids=["tls-done-at-start", "allow-at-start", "hello-after-n", "packet-in-handshake",
        "packet-in-policy", "after-connect", "after-cancel", "needmore"])
def test_misuse_raises(events: list[Any], ssl: bool, bad: Any) -> None:
    neg, _ = feed(events, ssl=ssl)
    before = snapshot(neg)
    with pytest.raises(NegotiationError):
        neg.receive(bad, pipelined=False)
    assert snapshot(neg) == before


def test_encryption_request_in_plaintext_needs_the_pipelined_answer() -> None:
    neg = Negotiation(ssl=True, direct_ssl=True)
    with pytest.raises(NegotiationError, match="pipelined"):
        neg.receive(SSL)
    assert neg.phase is Phase.START and not neg.ssl_done


def snapshot(neg: Negotiation) -> tuple[Any, ...]:
    return tuple(getattr(neg, name) for name in Negotiation.__slots__)


# -- property: whatever the order, one TLS start at most and no startup around the policy --------
EVENTS: list[Event] = [SSL, GSS, HELLO, OK, FAIL, EOF, PART, STARTUP, CANCEL, BAD, GARBAGE,
                       ALLOW, DENY]


@settings(max_examples=3000, deadline=None)
@given(ssl=st.booleans(), direct_ssl=st.booleans(),
       steps=st.lists(st.tuples(st.sampled_from(EVENTS), st.booleans()), max_size=12))
def test_no_order_starts_tls_twice_or_skips_the_policy(
        ssl: bool, direct_ssl: bool, steps: list[tuple[Event, bool]]) -> None:
    neg = Negotiation(ssl=ssl, direct_ssl=direct_ssl)
    actions: list[Any] = []
    asked_policy = False
    for event, pipelined in steps:
        final = neg.phase in (Phase.CONNECT, Phase.CLOSED)
        before = snapshot(neg)
        phase = neg.phase
        try:
            out = neg.receive(event, pipelined)
        except NegotiationError:
            assert snapshot(neg) == before  # a refused event changes nothing
            continue
        assert not final, "a final phase took an event"
        for action in out:
            if isinstance(action, Connect):
                # only the policy's Allow, for the StartupMessage it was asked about, connects
                assert isinstance(event, Allow) and phase is Phase.POLICY and asked_policy
            if isinstance(action, AskPolicy):
                assert isinstance(event, wire.StartupMessage)
                asked_policy = True
            if isinstance(action, StartTls):  # after an SSLRequest with nothing behind it
                assert ssl and (not pipelined if isinstance(event, wire.SSLRequest)
                                else isinstance(event, ClientHello) and direct_ssl)
        actions.extend(out)
    kinds = [type(a) for a in actions]
    assert kinds.count(StartTls) <= 1
    assert kinds.count(AskPolicy) <= 1 and kinds.count(Connect) <= 1
    answers = [a for a in actions if isinstance(a, Reply)]
    # each layer is answered once at most (ssl_done / gss_done), and S only when ssl is on
    assert [a.request for a in answers].count("SSLRequest") <= 1
    assert [a.request for a in answers].count("GSSENCRequest") <= 1
    for i, action in enumerate(actions):
        if isinstance(action, Reply) and action.answer == wire.SSL_ACCEPT:
            assert ssl and isinstance(actions[i + 1], StartTls)  # S then the handshake, always
        if isinstance(action, StartTls):
            assert not any(isinstance(a, Reply) for a in actions[i + 1:])  # nothing in clear
    if Connect in kinds:
        assert actions[-1] == Connect() and kinds.index(AskPolicy) == len(kinds) - 2
    terminal = [a for a in actions if isinstance(a, (Refuse, Close, ForwardCancel, Connect))]
    assert len(terminal) <= 1 and (not terminal or actions[-1] is terminal[0])
