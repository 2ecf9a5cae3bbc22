"""Fuzz target (atheris, coverage-guided): proxyproto.parse_header, the PROXY protocol header a
load balancer sends before the client's first byte. Each input is parsed whole and again by the
session's exact reads (NeedMore by NeedMore): the same answer, never a byte read past the header,
nothing consumed unless a header was accepted, and an accepted header rebuilt from its event
parses to the same addresses.

Input: the bytes as the balancer sends them. Run it with `make fuzz`, or
`python tests/fuzz/fuzz_proxyproto.py CORPUS...` with libFuzzer flags (-max_total_time=N).
A finding is an exception: a parser bug.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["proxy.protocol.proxyproto"]):
    from proxy.protocol import proxyproto, wire
    from proxy.protocol.proxyproto import Local, Malformed, NoHeader, ProxyHeader

LONGEST = max(proxyproto.MAX_V1_LINE, proxyproto.MAX_V2_HEADER)


def exact_reads(stream: bytes) -> tuple[proxyproto.Event, int, int]:
    buf = bytearray()
    while True:
        event, used = proxyproto.parse_header(buf)
        if not isinstance(event, wire.NeedMore):
            return event, used, len(buf)
        assert event.count > 0
        if len(buf) + event.count > len(stream):
            return event, used, len(buf)
        buf += stream[len(buf):len(buf) + event.count]


def one_input(data: bytes) -> None:
    event, used = proxyproto.parse_header(data)
    assert 0 <= used <= min(len(data), LONGEST)
    if isinstance(event, (ProxyHeader, Local)):
        assert used > 0
    else:
        assert used == 0 and isinstance(event, (wire.NeedMore, NoHeader, Malformed))
    if isinstance(event, NoHeader):
        assert data[:1] not in (b"P", b"\r") or not (
            proxyproto.V1_SIGNATURE.startswith(data[:6])
            or proxyproto.V2_SIGNATURE.startswith(data[:12]))
    again, again_used, read = exact_reads(data)
    if isinstance(again, wire.NeedMore):
        # The stream ended before the count the parser asked for; read whole, the parser may
        # already have seen a wrong signature byte or a bad v1 byte.
        assert isinstance(event, (wire.NeedMore, Malformed, NoHeader))
    else:
        assert (again, again_used) == (event, used), (again, event)
        assert not used or read == used  # not a byte of what follows the header
    if isinstance(event, ProxyHeader):
        build = proxyproto.build_v1 if event.version == 1 else proxyproto.build_v2
        rebuilt, _ = proxyproto.parse_header(build(event.source, event.dest))
        assert rebuilt == event, (rebuilt, event)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
