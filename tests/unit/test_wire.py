"""The start-up parser and message builders: every malformed packet is one line here."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol import wire


def packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!iI", 8 + len(body), code) + body


def test_ssl_request_is_exactly_8_bytes() -> None:
    event, used = wire.parse_startup_packet(wire.build_request(wire.SSL_REQUEST_CODE))
    assert event == wire.SSLRequest() and used == 8


def test_ssl_request_followed_by_more_consumes_only_its_own_bytes() -> None:
    data = wire.build_request(wire.SSL_REQUEST_CODE) + wire.build_startup_message({"user": "u"})
    event, used = wire.parse_startup_packet(data)
    assert isinstance(event, wire.SSLRequest) and used == 8


def test_gssenc_request() -> None:
    event, _ = wire.parse_startup_packet(wire.build_request(wire.GSSENC_REQUEST_CODE))
    assert event == wire.GSSENCRequest()


def test_cancel_request_keeps_raw_bytes() -> None:
    raw = struct.pack("!iIii", 16, wire.CANCEL_REQUEST_CODE, 1234, 5678)
    event, used = wire.parse_startup_packet(raw)
    assert event == wire.CancelRequest(raw) and used == 16


def test_cancel_request_protocol_32_long_key() -> None:
    raw = struct.pack("!iIi", 12 + 32, wire.CANCEL_REQUEST_CODE, 99) + b"k" * 32
    event, _ = wire.parse_startup_packet(raw)
    assert isinstance(event, wire.CancelRequest) and event.raw == raw


def test_startup_message_parameters() -> None:
    raw = wire.build_startup_message({"user": "alice", "database": "db",
                                      "application_name": "gsql"})
    event, used = wire.parse_startup_packet(raw)
    assert isinstance(event, wire.StartupMessage)
    assert (event.user, event.database, event.application_name) == ("alice", "db", "gsql")
    assert (event.major, event.minor, event.raw, used) == (3, 0, raw, len(raw))


def test_database_defaults_to_user() -> None:
    event, _ = wire.parse_startup_packet(wire.build_startup_message({"user": "bob"}))
    assert isinstance(event, wire.StartupMessage) and event.database == "bob"


def test_protocol_32_passes() -> None:
    event, _ = wire.parse_startup_packet(wire.build_startup_message({"user": "u"}, 3, 2))
    assert isinstance(event, wire.StartupMessage) and event.minor == 2


@pytest.mark.parametrize("length", [0, 4, 7, 10001, 2**31 - 1, -1, -(2**31)])
def test_bad_lengths_are_refused_without_reply(length: int) -> None:
    event, used = wire.parse_startup_packet(struct.pack("!i", length) + b"\0" * 4)
    assert isinstance(event, wire.ProtocolViolation) and not event.reply and used == 0


def test_truncated_packet_needs_more() -> None:
    raw = wire.build_startup_message({"user": "alice"})
    for cut in range(len(raw)):
        event, used = wire.parse_startup_packet(raw[:cut])
        assert isinstance(event, wire.NeedMore) and used == 0
        assert event.count == (4 - cut if cut < 4 else len(raw) - cut)


def test_unknown_request_code() -> None:
    event, _ = wire.parse_startup_packet(packet((1234 << 16) | 9999))
    assert isinstance(event, wire.ProtocolViolation) and event.reply


def test_protocol_2_refused() -> None:
    event, _ = wire.parse_startup_packet(packet(2 << 16, b"user\0u\0\0"))
    assert isinstance(event, wire.ProtocolViolation)
    assert event.sqlstate == wire.FEATURE_NOT_SUPPORTED


@pytest.mark.parametrize("body", [b"user\0alice\0", b"user\0alice", b"user\0\0\0",
                                  b"user\0a\0x\0\0", b"\xff\xfe\0v\0\0", b""])
def test_bad_layouts(body: bytes) -> None:
    event, _ = wire.parse_startup_packet(packet(3 << 16, body))
    assert isinstance(event, wire.ProtocolViolation)


def test_ssl_request_with_wrong_length() -> None:
    event, _ = wire.parse_startup_packet(packet(wire.SSL_REQUEST_CODE, b"xxxx"))
    assert isinstance(event, wire.ProtocolViolation)


def test_error_response_round_trip() -> None:
    data = wire.error_response("28000", "no", hint="do this", detail="because")
    assert wire.parse_error_response(data) == {"S": "FATAL", "V": "FATAL", "C": "28000",
                                               "M": "no", "D": "because", "H": "do this"}
    assert struct.unpack_from("!i", data, 1)[0] == len(data) - 1


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=12000))
def test_parser_never_raises_and_never_overconsumes(data: bytes) -> None:
    event, used = wire.parse_startup_packet(data)
    assert 0 <= used <= len(data)
    if isinstance(event, wire.NeedMore):
        assert event.count > 0 and used == 0


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(alphabet=st.characters(blacklist_characters="\0",
                                                      blacklist_categories=("Cs",)),
                               min_size=1, max_size=20),
                       st.text(alphabet=st.characters(blacklist_characters="\0",
                                                      blacklist_categories=("Cs",)),
                               max_size=50), max_size=10))
def test_startup_round_trip(params: dict[str, str]) -> None:
    params = {"user": "u", **params}
    raw = wire.build_startup_message(params)
    event, _ = wire.parse_startup_packet(raw)
    if len(raw) > wire.MAX_STARTUP_LENGTH:
        assert isinstance(event, wire.ProtocolViolation)
    elif params.get("user"):
        assert isinstance(event, wire.StartupMessage) and event.parameters == params


@pytest.mark.parametrize("value,kind", [
    ("true", "physical"), ("ON", "physical"), ("1", "physical"), ("y", "physical"),
    ("tr", "physical"), ("yes", "physical"), ("database", "logical"), ("false", ""),
    ("off", ""), ("of", ""), ("0", ""), ("n", ""), ("o", None), ("", None), (" true", None),
    ("2", None), ("Database", None),
])
def test_replication_parameter_as_postgresql_reads_it(value: str, kind: str | None) -> None:
    packet = wire.build_startup_message({"user": "u", "database": "app", "replication": value})
    event, _ = wire.parse_startup_packet(packet)
    assert isinstance(event, wire.StartupMessage)
    assert event.replication == kind


def test_repeated_parameter_is_refused() -> None:
    """replication=database then replication=true: PostgreSQL opens a database walsender,
    a policy reading the last value would see physical replication."""
    body = struct.pack("!I", 3 << 16) + b"user\0u\0replication\0database\0replication\0true\0\0"
    event, _ = wire.parse_startup_packet(struct.pack("!i", len(body) + 4) + body)
    assert isinstance(event, wire.ProtocolViolation) and "given twice" in event.message


def _app_name(packet: bytes) -> str:
    event, _ = wire.parse_startup_packet(packet)
    assert isinstance(event, wire.StartupMessage)
    return event.application_name


@pytest.mark.parametrize("given, address, expected", [
    ("psql", "127.0.0.1:51234", "psql - 127.0.0.1:51234"),
    ("", "10.0.0.1:1", "app - 10.0.0.1:1"),                      # PgBouncer's default
    ("x" * 80, "198.51.100.7:40000", "x" * 42 + " - 198.51.100.7:40000"),
    ("naïve\x1b[2J", "10.0.0.1:1", "na?ve?[2J - 10.0.0.1:1"),
    ("y" * 10, "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
     "y" * 10 + " - [2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
])
def test_application_name_with_host(given: str, address: str, expected: str) -> None:
    params = {"user": "u", "database": "d", **({"application_name": given} if given else {})}
    startup = wire.parse_startup_packet(wire.build_startup_message(params, 3, 2))[0]
    assert isinstance(startup, wire.StartupMessage)
    packet = wire.application_name_with_host(startup, address)
    assert _app_name(packet) == expected and len(expected.encode()) <= 63
    again = wire.parse_startup_packet(packet)[0]
    assert isinstance(again, wire.StartupMessage) and again.minor == 2
    assert again.user == "u" and again.database == "d"


@given(st.text(max_size=100), st.sampled_from(["127.0.0.1:1", "[::1]:65535",
                                               "203.0.113.200:54321"]))
def test_application_name_keeps_the_whole_address(name: str, address: str) -> None:
    name = name.replace("\0", "")
    params = {"user": "u", **({"application_name": name} if name else {})}
    startup = wire.parse_startup_packet(wire.build_startup_message(params))[0]
    assert isinstance(startup, wire.StartupMessage)
    got = _app_name(wire.application_name_with_host(startup, address))
    assert got.endswith(" - " + address) and len(got.encode()) <= wire.APPLICATION_NAME_MAX
    assert got.isascii()
