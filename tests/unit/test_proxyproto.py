"""The PROXY protocol header parser (HAProxy's doc/proxy-protocol.txt): each rule of the spec one
line here, and property tests for the round trip and for exact reads."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol import proxyproto, wire
from proxy.protocol.proxyproto import Local, Malformed, NoHeader, ProxyHeader, parse_header

STARTUP = wire.build_request(wire.SSL_REQUEST_CODE)
SIG = proxyproto.V2_SIGNATURE


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(body)) + body


V4_BODY = bytes([10, 1, 2, 3, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 6432)


# -- version 1 -----------------------------------------------------------------------------------
def test_v1_tcp4_then_the_client_bytes_stay() -> None:
    line = b"PROXY TCP4 192.0.2.10 127.0.0.1 51234 6432\r\n"
    event, used = parse_header(line + STARTUP)
    assert event == ProxyHeader(1, ("192.0.2.10", 51234), ("127.0.0.1", 6432))
    assert used == len(line)


def test_v1_tcp6_is_normalised() -> None:
    event, _ = parse_header(b"PROXY TCP6 2001:DB8:0:0::1 ::1 1 65535\r\n")
    assert event == ProxyHeader(1, ("2001:db8::1", 1), ("::1", 65535))


@pytest.mark.parametrize("line", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:"
    b"ffff 65535 65535\r\n",  # the spec's worst case: 107 bytes
])
def test_v1_unknown_uses_the_real_peer(line: bytes) -> None:
    assert len(line) <= proxyproto.MAX_V1_LINE
    event, used = parse_header(line + STARTUP)
    assert isinstance(event, Local) and used == len(line)


def test_v1_without_crlf_in_107_bytes_is_refused() -> None:
    line = b"PROXY UNKNOWN " + b"f" * (proxyproto.MAX_V1_LINE - 14)
    assert len(line) == proxyproto.MAX_V1_LINE
    assert isinstance(parse_header(line)[0], Malformed)
    assert isinstance(parse_header(line[:-1])[0], wire.NeedMore)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.010 127.0.0.1 1 2\r\n",     # leading zero: octal confusion
    b"PROXY TCP4 192.0.2.256 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 127.0.0.1 01 2\r\n",       # leading zero in a port
    b"PROXY TCP4 192.0.2.1 127.0.0.1 65536 2\r\n",
    b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n",              # family and address disagree
    b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
    b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",       # dotted tail: not the spec's format
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",           # zone id
    b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
    b"PROXY TCP4  192.0.2.1 127.0.0.1 1 2\r\n",       # two spaces
    b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2 \r\n",
    b"PROXY TCP4 192.0.2.1 127.0.0.1 1\r\n",
    b"PROXY UDP4 192.0.2.1 127.0.0.1 1 2\r\n",
    b"PROXY \r\n",
    b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\n",          # a lone LF
    b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\rX",         # a CR not followed by LF
    b"PROXY TCP4 192.0.2.1\x00",                      # no such byte in a v1 line
])
def test_v1_malformed_lines_are_refused(line: bytes) -> None:
    event, used = parse_header(line)
    assert isinstance(event, Malformed) and used == 0, event


def test_v1_bad_byte_is_refused_before_the_line_ends() -> None:
    assert isinstance(parse_header(b"PROXY TCP4 1.2.3.4\x16")[0], Malformed)


def test_v1_needs_more_never_reads_past_the_shortest_line() -> None:
    assert parse_header(b"PROXY ")[0] == wire.NeedMore(proxyproto.MIN_V1_LINE - 6)
    assert parse_header(b"PROXY UNKNOWN")[0] == wire.NeedMore(2)
    assert parse_header(b"PROXY UNKNOWN\r")[0] == wire.NeedMore(1)


# -- not a header ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [
    STARTUP, wire.build_startup_message({"user": "u"}), b"\x16\x03\x01\x00\x10",
    b"PROXX", b"\r\n\r\n\x01", b"GET / HTTP/1.1\r\n",
])
def test_other_first_bytes_are_no_header(data: bytes) -> None:
    assert parse_header(data) == (NoHeader(), 0)


def test_a_signature_prefix_needs_the_rest_of_the_signature() -> None:
    assert parse_header(b"PRO") == (wire.NeedMore(3), 0)
    assert parse_header(SIG[:5]) == (wire.NeedMore(7), 0)
    assert parse_header(b"") == (wire.NeedMore(1), 0)


# -- version 2 ------------------------------------------------------------------------------------
def test_v2_tcp4() -> None:
    header = v2(0x21, 0x11, V4_BODY)
    event, used = parse_header(header + STARTUP)
    assert event == ProxyHeader(2, ("10.1.2.3", 40000), ("127.0.0.1", 6432))
    assert used == len(header) == 28


def test_v2_tcp6_and_a_mapped_ipv4_client() -> None:
    src = ipaddress.IPv6Address("::ffff:198.51.100.7").packed
    dst = ipaddress.IPv6Address("2001:db8::5").packed
    event, _ = parse_header(v2(0x21, 0x21, src + dst + struct.pack("!HH", 5, 6)))
    assert event == ProxyHeader(2, ("198.51.100.7", 5), ("2001:db8::5", 6))


def test_v2_local_ignores_whatever_address_block_it_has() -> None:
    header = v2(0x20, 0x11, V4_BODY + b"\xff")  # not a valid TLV: LOCAL's block is discarded
    assert parse_header(header + STARTUP) == (Local(2, "v2 LOCAL"), len(header))


@pytest.mark.parametrize("fam, body", [
    (0x00, b""), (0x00, b"anything"), (0x31, b"/run/a.sock".ljust(108, b"\0") * 2),
    (0x10, V4_BODY),
])
def test_v2_proxy_without_an_ip_uses_the_real_peer(fam: int, body: bytes) -> None:
    header = v2(0x21, fam, body)
    event, used = parse_header(header)
    assert isinstance(event, Local) and used == len(header)


@pytest.mark.parametrize("ver_cmd, fam, body, why", [
    (0x11, 0x11, V4_BODY, "version"),
    (0x31, 0x11, V4_BODY, "version"),
    (0x22, 0x11, V4_BODY, "command"),
    (0x2F, 0x11, V4_BODY, "command"),
    (0x21, 0x41, V4_BODY, "family"),
    (0x21, 0x13, V4_BODY, "family/protocol"),
    (0x21, 0x11, V4_BODY[:11], "address bytes"),
    (0x21, 0x21, V4_BODY, "address bytes"),
    (0x21, 0x31, b"x" * 215, "address bytes"),
    (0x21, 0x12, V4_BODY, "datagram"),
    (0x21, 0x11, V4_BODY + b"\x01\x00", "truncated TLV"),
    (0x21, 0x11, V4_BODY + b"\x01\x00\x05abc", "runs past"),
    (0x21, 0x11, V4_BODY + b"\x03\x00\x02ab", "CRC32C"),
])
def test_v2_malformed_headers_are_refused(ver_cmd: int, fam: int, body: bytes, why: str) -> None:
    event, used = parse_header(v2(ver_cmd, fam, body))
    assert isinstance(event, Malformed) and why in event.reason and used == 0, event


def test_v2_tlvs_are_skipped() -> None:
    tlvs = struct.pack("!BH", 0x05, 3) + b"id1" + struct.pack("!BH", 0x04, 0)
    header = v2(0x21, 0x11, V4_BODY + tlvs)
    event, used = parse_header(header)
    assert isinstance(event, ProxyHeader) and used == len(header)


def test_v2_crc32c_is_checked() -> None:
    good = proxyproto.build_v2(("192.0.2.1", 1), ("127.0.0.1", 2), crc=True)
    assert isinstance(parse_header(good)[0], ProxyHeader)
    bad = good[:-1] + bytes([good[-1] ^ 1])
    event, _ = parse_header(bad)
    assert isinstance(event, Malformed) and "CRC32C" in event.reason


def test_crc32c_known_answer() -> None:
    # RFC 3720 B.4: 32 bytes of zeros.
    assert proxyproto.crc32c(b"\0" * 32) == 0x8A9136AA
    assert proxyproto.crc32c(b"123456789") == 0xE3069283


def test_v2_oversized_is_refused_before_the_body_is_read() -> None:
    fixed = SIG + struct.pack("!BBH", 0x21, 0x11, proxyproto.MAX_V2_HEADER - 16 + 1)
    event, used = parse_header(fixed)  # 16 bytes only: the body is never awaited
    assert isinstance(event, Malformed) and "more than" in event.reason and used == 0
    at_cap = SIG + struct.pack("!BBH", 0x21, 0x11, proxyproto.MAX_V2_HEADER - 16)
    assert parse_header(at_cap)[0] == wire.NeedMore(proxyproto.MAX_V2_HEADER - 16)


def test_v2_asks_for_exactly_the_rest() -> None:
    header = v2(0x21, 0x11, V4_BODY)
    assert parse_header(header[:13]) == (wire.NeedMore(3), 0)
    assert parse_header(header[:20]) == (wire.NeedMore(8), 0)


# -- properties -----------------------------------------------------------------------------------
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)


def exact_reads(stream: bytes) -> tuple[proxyproto.Event, int, int]:
    """Feed the parser as the session does, NeedMore by NeedMore; returns the event, the bytes
    consumed and the bytes read."""
    buf = bytearray()
    while True:
        event, used = parse_header(buf)
        if not isinstance(event, wire.NeedMore):
            return event, used, len(buf)
        assert event.count > 0
        if len(buf) + event.count > len(stream):
            return event, used, len(buf)
        buf += stream[len(buf):len(buf) + event.count]


@settings(max_examples=300)
@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports,
       st.sampled_from(["v1", "v2", "v2crc"]), st.binary(max_size=40))
def test_round_trip_and_exact_reads_stop_at_the_header(
        addresses: tuple[str, str], sport: int, dport: int, kind: str, after: bytes) -> None:
    source, dest = (addresses[0], sport), (addresses[1], dport)
    header = (proxyproto.build_v1(source, dest) if kind == "v1"
              else proxyproto.build_v2(source, dest, crc=kind == "v2crc"))
    expected = ProxyHeader(1 if kind == "v1" else 2, source, dest)
    assert parse_header(header + after) == (expected, len(header))
    event, used, read = exact_reads(header + after)
    assert (event, used) == (expected, len(header))
    assert read == len(header)  # never a byte of what follows


@settings(max_examples=500)
@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.binary(max_size=300).map(lambda b: SIG + b),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=260)).map(
        lambda t: v2(t[0], t[1], t[2])),
))
def test_any_bytes_give_one_answer_whole_or_by_exact_reads(data: bytes) -> None:
    event, used = parse_header(data)
    assert 0 <= used <= len(data)
    if isinstance(event, (ProxyHeader, Local)):
        assert used > 0
        assert used <= max(proxyproto.MAX_V1_LINE, proxyproto.MAX_V2_HEADER)
    else:
        assert used == 0
    again, again_used, read = exact_reads(data)
    if isinstance(again, wire.NeedMore):
        # The stream ended inside the header; read whole, a bad byte may already be seen
        # (the exact reader stopped short, waiting for a count the stream does not have).
        assert isinstance(event, (wire.NeedMore, Malformed, NoHeader))
    else:
        assert (again, again_used) == (event, used)
        if used:
            assert read == used
