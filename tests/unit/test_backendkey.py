"""The BackendKeyData scan over the backend's first messages, whatever the chunking."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol import wire
from proxy.protocol.backendkey import BackendKey, KeyScan


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


AUTH_OK = message(b"R", struct.pack("!i", 0))
PARAMS = b"".join(message(b"S", f"{k}\0{v}\0".encode())
                  for k, v in [("server_version", "15.8"), ("application_name", "x" * 60)])
READY = message(b"Z", b"I")


def stream(secret: bytes = b"\x01\x02\x03\x04", pid: int = 4242) -> bytes:
    return AUTH_OK + PARAMS + message(b"K", struct.pack("!i", pid) + secret) + READY


def scan(chunks: list[bytes]) -> tuple[KeyScan, int]:
    keys = KeyScan()
    for i, chunk in enumerate(chunks):
        if keys.feed(chunk):
            return keys, i
    return keys, -1


def test_key_in_one_chunk() -> None:
    keys, at = scan([stream()])
    assert keys.key == BackendKey(4242, b"\x01\x02\x03\x04") and at == 0


@given(st.lists(st.integers(1, 40), min_size=1, max_size=60),
       st.binary(min_size=4, max_size=256))
def test_any_chunking_and_protocol_32_key_lengths(cuts: list[int], secret: bytes) -> None:
    data = stream(secret)
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(data[pos:pos + size])
        pos += size
    chunks.append(data[pos:])
    keys, _ = scan([c for c in chunks if c])
    assert keys.key == BackendKey(4242, secret)


def test_an_error_ends_the_scan_without_a_key() -> None:
    keys, at = scan([AUTH_OK, message(b"E", b"SFATAL\0\0"), b"garbage"])
    assert keys.key is None and at == 1


def test_ready_for_query_without_a_key() -> None:
    assert scan([AUTH_OK + READY])[0].key is None


def test_a_broken_length_ends_the_scan() -> None:
    keys, at = scan([b"S" + struct.pack("!i", 2)])
    assert keys.key is None and at == 0
    oversized = b"K" + struct.pack("!i", 4 + 4 + 257)
    assert scan([oversized])[1] == 0


def test_cancel_request_is_what_wire_parses() -> None:
    key = BackendKey(77, b"s" * 32)
    event, used = wire.parse_startup_packet(key.cancel_request())
    assert isinstance(event, wire.CancelRequest) and used == len(key.cancel_request())
    assert event.raw[8:12] == struct.pack("!i", 77) and event.raw[12:] == b"s" * 32
