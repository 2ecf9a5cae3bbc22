"""The PROXY protocol header (HAProxy's doc/proxy-protocol.txt, versions 1 and 2), sans-IO.

Owns: recognising the header a load balancer puts before the client's first byte, and turning it
into a typed event: `ProxyHeader(source, dest)` (the client's address and the one it connected
to), `Local` (the balancer speaks for itself, or could not name the client: use the socket's
peer), `NoHeader` (the first bytes are no header signature), `Malformed(reason)`, or
`wire.NeedMore(count)`. Must not touch sockets, the loop, the config or metrics, and must not
decide whom to trust: the session does that with `[listen] trusted_proxies`.

Reads are exact as wire.py's: `NeedMore(count)` never asks for a byte past the header, so what
follows it (the client's SSLRequest, sent with the header in one segment) stays in the caller's
buffer. Malformed input is refused as soon as it is seen, as the spec recommends ("abort the
connection as soon as possible"): a v1 line's bytes are checked as they come, a v2 header's
fixed part before its addresses are awaited.

Bounds: a v1 line is at most 107 bytes with its CRLF (the spec's worst case). A v2 header may
announce up to 16 + 65535 bytes; we refuse more than MAX_V2_HEADER before reading them: the
addresses take at most 216 bytes (AF_UNIX), and the TLVs balancers send (ALPN, authority, a
unique ID of at most 128 bytes, the SSL sub-TLVs, cloud endpoint IDs) stay far below it, while
every byte we accept is memory a connection holds before anything about it is known.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

from .wire import NeedMore

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_SIGNATURE = b"PROXY "
V2_FIXED = 16  # signature, version/command, family/protocol, length
MAX_V1_LINE = 107  # "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n"
MIN_V1_LINE = len(b"PROXY UNKNOWN\r\n")
MAX_V2_HEADER = 2048

# v2, the 14th byte: family in the high nibble, transport in the low one.
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0, 1, 2, 3
PROTO_UNSPEC, PROTO_STREAM, PROTO_DGRAM = 0, 1, 2
_ADDRESS_LENGTH = {AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}
CMD_LOCAL, CMD_PROXY = 0, 1
PP2_TYPE_CRC32C = 0x03

# The bytes a v1 line may hold: the keyword, families, addresses (v4 dotted, v6 hex and colons),
# ports and the separating spaces. Anything else is refused when it arrives.
_V1_BYTES = frozenset(b"PROXYTCPUNKW0123456789abcdefABCDEF.: \r\n")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V4 = re.compile(rf"{_OCTET}(\.{_OCTET}){{3}}")
_V6 = re.compile(r"[0-9A-Fa-f:]{2,39}")
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


@dataclass(frozen=True)
class ProxyHeader:
    """A relayed connection: `source` is the client as the balancer saw it, `dest` the address
    the client connected to."""

    version: int
    source: tuple[str, int]
    dest: tuple[str, int]


@dataclass(frozen=True)
class Local:
    """A valid header that names no client: the v2 LOCAL command (the balancer's own health
    check), v1 UNKNOWN, or a v2 family we do not relay (UNSPEC, AF_UNIX). The spec says to use
    the connection's own endpoints then."""

    version: int
    why: str


@dataclass(frozen=True)
class NoHeader:
    """The first bytes are no PROXY header signature (a PostgreSQL packet, a TLS ClientHello)."""


@dataclass(frozen=True)
class Malformed:
    """A header signature followed by something the spec does not allow, or too long."""

    reason: str


Event = NeedMore | ProxyHeader | Local | NoHeader | Malformed


def parse_header(buf: bytes | bytearray) -> tuple[Event, int]:
    """Parse the PROXY header at the start of `buf`. Returns the event and the bytes it used
    (the header's length for ProxyHeader and Local, 0 otherwise)."""
    if not buf:
        return NeedMore(1), 0
    if buf[0] == V2_SIGNATURE[0]:
        return _parse_v2(buf)
    if buf[0] == V1_SIGNATURE[0]:
        return _parse_v1(buf)
    return NoHeader(), 0


def _signature(buf: bytes | bytearray, signature: bytes) -> NeedMore | NoHeader | None:
    """None when `buf` starts with the whole signature; NeedMore while it is a prefix of it."""
    have = bytes(buf[:len(signature)])
    if not signature.startswith(have):
        return NoHeader()
    if len(have) < len(signature):
        return NeedMore(len(signature) - len(have))
    return None


# -- version 1: one line of text ----------------------------------------------------------------
def _parse_v1(buf: bytes | bytearray) -> tuple[Event, int]:
    partial = _signature(buf, V1_SIGNATURE)
    if partial is not None:
        return partial, 0
    window = bytes(buf[:MAX_V1_LINE])
    end = window.find(b"\r\n")
    body = window if end < 0 else window[:end]
    for i, byte in enumerate(body):
        # The spec: "must not tolerate a single CR or LF character to end the line".
        if byte not in _V1_BYTES or byte == 0x0A or (byte == 0x0D and i + 1 < len(window)):
            return Malformed("v1: unexpected byte in the PROXY line"), 0
    if end < 0:
        if len(window) >= MAX_V1_LINE:
            return Malformed(f"v1: no CRLF within {MAX_V1_LINE} bytes"), 0
        # Every line ends with CRLF and is at least MIN_V1_LINE long: asking for this much
        # never reads past the header.
        need = 1 if window.endswith(b"\r") else 2
        return NeedMore(max(need, MIN_V1_LINE - len(window))), 0
    used = end + 2
    parts = body.decode("ascii").split(" ")
    if parts[1] == "UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF is found"
        return Local(1, "v1 UNKNOWN"), used
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        return Malformed("v1: expected PROXY TCP4|TCP6|UNKNOWN SRC DST SPORT DPORT"), 0
    source = _v1_address(parts[2], parts[1])
    dest = _v1_address(parts[3], parts[1])
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    if source is None or dest is None:
        return Malformed(f"v1: an address is not a canonical {parts[1]} address"), 0
    if sport is None or dport is None:
        return Malformed("v1: a port is not a decimal 0..65535 without leading zeros"), 0
    return ProxyHeader(1, (source, sport), (dest, dport)), used


def _v1_address(text: str, family: str) -> str | None:
    if family == "TCP4":
        return text if _V4.fullmatch(text) else None
    # Hex groups and one "::" only: no dotted tail, no zone (neither is in the spec's format).
    if not _V6.fullmatch(text):
        return None
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        return None


def _v1_port(text: str) -> int | None:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        return None
    return int(text)


# -- version 2: binary ---------------------------------------------------------------------------
def _parse_v2(buf: bytes | bytearray) -> tuple[Event, int]:
    partial = _signature(buf, V2_SIGNATURE)
    if partial is not None:
        return partial, 0
    if len(buf) < V2_FIXED:
        return NeedMore(V2_FIXED - len(buf)), 0
    ver_cmd, fam, length = struct.unpack_from("!BBH", buf, 12)
    if ver_cmd >> 4 != 2:
        return Malformed(f"v2: version {ver_cmd >> 4}, only 2 is defined"), 0
    command = ver_cmd & 0x0F
    if command not in (CMD_LOCAL, CMD_PROXY):
        return Malformed(f"v2: unassigned command {command}"), 0
    family, proto = fam >> 4, fam & 0x0F
    if family > AF_UNIX or proto > PROTO_DGRAM:
        return Malformed(f"v2: unassigned family/protocol byte 0x{fam:02x}"), 0
    total = V2_FIXED + length
    if total > MAX_V2_HEADER:
        return Malformed(f"v2: a {total}-byte header, more than {MAX_V2_HEADER}"), 0
    if len(buf) < total:
        return NeedMore(total - len(buf)), 0
    header = bytes(buf[:total])
    if command == CMD_LOCAL:
        # "must use the real connection endpoints and discard the protocol block"
        return Local(2, "v2 LOCAL"), total
    if family == AF_UNSPEC:
        # The address block's layout is unknown: it and any TLVs are skipped whole.
        return Local(2, "v2 PROXY with family UNSPEC"), total
    need = _ADDRESS_LENGTH[family]
    if length < need:
        return Malformed(f"v2: {length} address bytes, family {family} needs {need}"), 0
    tlv_error = _check_tlvs(header, V2_FIXED + need)
    if tlv_error:
        return Malformed(f"v2: {tlv_error}"), 0
    if family == AF_UNIX or proto == PROTO_UNSPEC:
        # Receivers may fall back to the socket's endpoints for what they do not use: an
        # AF_UNIX path is no address a rule can match.
        return Local(2, "v2 PROXY without an IP address"), total
    if proto == PROTO_DGRAM:
        return Malformed("v2: a datagram connection cannot carry PostgreSQL"), 0
    if family == AF_INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", header, V2_FIXED)
        return ProxyHeader(2, (str(ipaddress.IPv4Address(src)), sport),
                           (str(ipaddress.IPv4Address(dst)), dport)), total
    src, dst, sport, dport = struct.unpack_from("!16s16sHH", header, V2_FIXED)
    return ProxyHeader(2, (_v6_text(src), sport), (_v6_text(dst), dport)), total


def _v6_text(packed: bytes) -> str:
    # An IPv4 client of a dual-stack balancer arrives as ::ffff:a.b.c.d: rules see a.b.c.d,
    # as they do for a direct client (session.py unmaps the accepted socket's peer the same way).
    address = ipaddress.IPv6Address(packed)
    return str(address.ipv4_mapped or address)


def _check_tlvs(header: bytes, start: int) -> str:
    """The TLVs after the addresses must tile the rest of the header exactly; a CRC32C one must
    match (the spec: a receiver that supports it MUST check it). Others are skipped."""
    pos = start
    while pos < len(header):
        if len(header) - pos < 3:
            return "a truncated TLV"
        kind, size = struct.unpack_from("!BH", header, pos)
        if pos + 3 + size > len(header):
            return f"TLV 0x{kind:02x} runs past the header"
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                return "a CRC32C TLV that is not 4 bytes"
            zeroed = header[:pos + 3] + b"\0\0\0\0" + header[pos + 7:]
            if crc32c(zeroed) != struct.unpack_from("!I", header, pos + 3)[0]:
                return "the CRC32C does not match"
        pos += 3 + size
    return ""


def _crc32c_table() -> tuple[int, ...]:
    # Castagnoli polynomial, reflected (RFC 4960 Appendix B).
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- building headers (tests, the fuzz target and the probe speak as a balancer would) ------------
def build_v1(source: tuple[str, int] | None, dest: tuple[str, int] | None = None) -> bytes:
    """A v1 line; `source` None builds "PROXY UNKNOWN"."""
    if source is None or dest is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {dest[0]} {source[1]} {dest[1]}\r\n").encode("ascii")


def build_v2(source: tuple[str, int] | None, dest: tuple[str, int] | None = None, *,
             tlvs: bytes = b"", crc: bool = False) -> bytes:
    """A v2 header; `source` None builds a LOCAL command. With `crc`, a CRC32C TLV is added."""
    if source is None or dest is None:
        ver_cmd, fam, addresses = 0x20 | CMD_LOCAL, 0x00, b""
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(dest[0])
        family = AF_INET6 if src.version == 6 else AF_INET
        ver_cmd, fam = 0x20 | CMD_PROXY, (family << 4) | PROTO_STREAM
        addresses = src.packed + dst.packed + struct.pack("!HH", source[1], dest[1])
    body = addresses + tlvs + (struct.pack("!BH", PP2_TYPE_CRC32C, 4) + b"\0" * 4 if crc else b"")
    header = V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body
    if crc:
        header = header[:-4] + struct.pack("!I", crc32c(header))
    return header
