"""The PostgreSQL start-up protocol, sans-IO.

Owns: recognising the first packets of a connection (SSLRequest, GSSENCRequest, CancelRequest,
StartupMessage) from bytes, and building the few messages the proxy itself sends (`S`/`N`,
ErrorResponse). Must not touch sockets, the event loop, the config or metrics: every malformed
packet is a one-line unit test.

Packet layout (PostgreSQL protocol docs, "Message Formats"): an Int32 length that includes itself,
an Int32 code, then the body. Lengths outside 8..10000 are refused as PostgreSQL's
ProcessStartupPacket refuses them (MAX_STARTUP_PACKET_LENGTH is 10000).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MIN_STARTUP_LENGTH = 8
MAX_STARTUP_LENGTH = 10000

# Request codes are "protocol versions" 1234.5678 / .5679 / .5680 (pqcomm.h).
CANCEL_REQUEST_CODE = (1234 << 16) | 5678
SSL_REQUEST_CODE = (1234 << 16) | 5679
GSSENC_REQUEST_CODE = (1234 << 16) | 5680

# A TLS record of type handshake starts with 0x16: the first byte of a direct-TLS ClientHello
# (PostgreSQL 17 sslnegotiation=direct). A startup packet's first byte is the high byte of a
# length <= 10000, i.e. always 0x00, so the two can never be confused.
TLS_HANDSHAKE_BYTE = 0x16

SSL_ACCEPT = b"S"
SSL_REFUSE = b"N"

# SQLSTATEs used by the proxy (PostgreSQL errcodes.txt).
PROTOCOL_VIOLATION = "08P01"
INVALID_AUTHORIZATION = "28000"
TOO_MANY_CONNECTIONS = "53300"
CONNECTION_FAILURE = "08006"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_PARAMETER_VALUE = "22023"
ADMIN_SHUTDOWN = "57P01"


@dataclass(frozen=True)
class NeedMore:
    """The packet is incomplete: `count` more bytes are needed before it can be parsed."""

    count: int


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    raw: bytes  # forwarded unchanged: protocol 3.2 allows secret keys longer than 4 bytes


@dataclass(frozen=True)
class StartupMessage:
    raw: bytes
    major: int
    minor: int
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        # PostgreSQL: the database defaults to the user name.
        return self.parameters.get("database") or self.user

    @property
    def application_name(self) -> str:
        return self.parameters.get("application_name", "")

    @property
    def replication(self) -> str | None:
        """"physical" (a walsender for the whole cluster, whatever `database` says),
        "logical" (replication=database: bound to its database), "" for a normal session,
        None for a value PostgreSQL refuses (ProcessStartupPacket: "database" or parse_bool)."""
        value = self.parameters.get("replication")
        if value is None:
            return ""
        if value == "database":
            return "logical"
        flag = parse_bool(value)
        if flag is None:
            return None
        return "physical" if flag else ""


def parse_bool(value: str) -> bool | None:
    """PostgreSQL's parse_bool (src/backend/utils/adt/bool.c): case-insensitive, any unique
    prefix of true/false/yes/no, on/off (at least "of"), 1/0; None otherwise."""
    text = value.lower()
    if not text:
        return None
    if "true".startswith(text) or "yes".startswith(text) or text in ("on", "1"):
        return True
    if "false".startswith(text) or "no".startswith(text) or text in ("off", "of", "0"):
        return False
    return None


@dataclass(frozen=True)
class ProtocolViolation:
    """A packet the proxy refuses. `reply` says whether an ErrorResponse may be sent: a peer whose
    length word is garbage is not speaking our protocol, and PostgreSQL just closes (COMMERROR)."""

    message: str
    reply: bool = True
    sqlstate: str = PROTOCOL_VIOLATION


Event = NeedMore | SSLRequest | GSSENCRequest | CancelRequest | StartupMessage | ProtocolViolation


def parse_startup_packet(buf: bytes | bytearray) -> tuple[Event, int]:
    """Parse the first packet in `buf`. Returns the event and how many bytes it consumed (0 unless
    a whole packet was recognised). A bad length is reported as soon as the length word is in."""
    if len(buf) < 4:
        return NeedMore(4 - len(buf)), 0
    (length,) = struct.unpack_from("!i", buf, 0)
    if length < MIN_STARTUP_LENGTH or length > MAX_STARTUP_LENGTH:
        return ProtocolViolation(f"invalid length of startup packet: {length}", reply=False), 0
    if len(buf) < length:
        return NeedMore(length - len(buf)), 0
    packet = bytes(buf[:length])
    (code,) = struct.unpack_from("!I", packet, 4)
    if code == SSL_REQUEST_CODE:
        return (SSLRequest() if length == 8 else _bad_length("SSLRequest", length)), length
    if code == GSSENC_REQUEST_CODE:
        return (GSSENCRequest() if length == 8 else _bad_length("GSSENCRequest", length)), length
    if code == CANCEL_REQUEST_CODE:
        # 16 bytes in protocol 3.0; 3.2 allows a secret key of up to 256 bytes.
        if 16 <= length <= 12 + 256:
            return CancelRequest(packet), length
        return _bad_length("CancelRequest", length), length
    if code >> 16 != 3:
        return unsupported_protocol(code), length
    params = _parse_parameters(packet[8:])
    if isinstance(params, ProtocolViolation):
        return params, length
    if not params.get("user"):
        return (
            ProtocolViolation(
                "no PostgreSQL user name specified in startup packet",
                sqlstate=INVALID_AUTHORIZATION,
            ),
            length,
        )
    return StartupMessage(packet, code >> 16, code & 0xFFFF, params), length


def unsupported_protocol(code: int) -> ProtocolViolation:
    """What PostgreSQL answers a packet whose code is no protocol 3 version: also an SSLRequest
    or GSSENCRequest it no longer expects (1234.5679 / 1234.5680 read as a version number)."""
    major, minor = code >> 16, code & 0xFFFF
    return ProtocolViolation(
        f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2",
        sqlstate=FEATURE_NOT_SUPPORTED,
    )


def _bad_length(what: str, length: int) -> ProtocolViolation:
    return ProtocolViolation(f"invalid length of {what}: {length}")


def _parse_parameters(body: bytes) -> dict[str, str] | ProtocolViolation:
    # name\0value\0 ... \0 — the last byte must be the terminator (ProcessStartupPacket).
    if not body or body[-1] != 0:
        return ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = body[:-1].split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    else:
        return ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    if len(parts) % 2:
        return ProtocolViolation("invalid startup packet layout: parameter without a value")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts), 2):
            name = parts[i].decode()
            if name in params:
                # The packet goes to the backend unchanged, and PostgreSQL reads repeated
                # names its own way (replication=database then replication=true stays a
                # database walsender): the policy must never judge other values than it does.
                return ProtocolViolation(
                    f"invalid startup packet: parameter \"{name[:64]}\" given twice")
            params[name] = parts[i + 1].decode()
    except UnicodeDecodeError:
        return ProtocolViolation("invalid startup packet: parameters are not valid UTF-8")
    return params


def build_startup_message(parameters: dict[str, str], major: int = 3, minor: int = 0) -> bytes:
    body = struct.pack("!I", (major << 16) | minor)
    for key, value in parameters.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


# NAMEDATALEN - 1: PostgreSQL keeps this many bytes of application_name (pg_stat_activity).
APPLICATION_NAME_MAX = 63


def application_name_with_host(startup: StartupMessage, address: str) -> bytes:
    """The StartupMessage with PgBouncer's application_name_add_host applied: "NAME - ADDRESS"
    ("app" when the client gave none). Only the client's part is cut to fit NAMEDATALEN, never
    the address; and its characters outside printable ASCII become "?" first, as PostgreSQL
    15 cleans them (16 and later escape each byte as four characters, which would push the
    address out)."""
    suffix = f" - {address}"
    name = startup.application_name or "app"
    name = "".join(c if " " <= c <= "~" else "?" for c in name)
    name = name[:max(0, APPLICATION_NAME_MAX - len(suffix))]
    parameters = dict(startup.parameters)
    parameters["application_name"] = name + suffix
    return build_startup_message(parameters, startup.major, startup.minor)


def build_request(code: int) -> bytes:
    return struct.pack("!iI", 8, code)


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "FATAL",
    detail: str = "",
    hint: str = "",
) -> bytes:
    """An ErrorResponse ('E'): S and V severity, C SQLSTATE, M message, optional D and H."""
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    if detail:
        fields.append((b"D", detail))
    if hint:
        fields.append((b"H", hint))
    body = b"".join(tag + value.encode() + b"\0" for tag, value in fields) + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


def parse_error_response(data: bytes) -> dict[str, str]:
    """Fields of one ErrorResponse, keyed by their one-letter tag (used by tests and the demo)."""
    if len(data) < 5 or data[0:1] != b"E":
        raise ValueError("not an ErrorResponse")
    (length,) = struct.unpack_from("!i", data, 1)
    body = data[5 : 1 + length]
    fields: dict[str, str] = {}
    for item in body.split(b"\0"):
        if item:
            fields[chr(item[0])] = item[1:].decode()
    return fields
