"""tlsclient.py: the backend hop's TLS on memory BIOs, against a server SSLObject on memory BIOs,
with a transport that keeps what is written."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
from pathlib import Path
from typing import Any

import pytest
from bio_watch import WatchedBio

from proxy.runtime import backend_tls as tlsclient
from proxy.runtime import relay
from proxy.tools import certs


class Wire(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.protocol: Any = None
        self.reading = True
        self.closed = False

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def write(self, data: Any) -> None:
        self.buffer += data

    def take(self) -> bytes:
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def _server(tmp: Path, maximum: ssl.TLSVersion | None = None,
            ) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, ssl.SSLContext]:
    certs.init(tmp)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if maximum is not None:
        sctx.maximum_version = maximum
    sctx.load_cert_chain(tmp / "server.crt", tmp / "server.key")
    si, so = ssl.MemoryBIO(), ssl.MemoryBIO()
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(tmp / "cacert.pem")
    return sctx.wrap_bio(si, so, server_side=True), si, so, cctx


class Hop:
    """A ClientTls on a Wire, taken over from an Endpoint as after the SSLRequest's `S`, and the
    server it talks to."""

    def __init__(self, tmp: Path, hostname: str,
                 maximum: ssl.TLSVersion | None = None) -> None:
        self.server, self.si, self.so, cctx = _server(tmp, maximum)
        self.inner = relay.Endpoint()
        self.wire = Wire()
        self.inner.connection_made(self.wire)
        self.tls = tlsclient.ClientTls(self.inner, cctx, hostname)
        self.tls.start(self.wire)  # the ClientHello goes out

    def handshake(self, errors: type[Exception]) -> None:
        for _ in range(4):
            self.si.write(self.wire.take())
            with contextlib.suppress(errors):
                self.server.do_handshake()
            data = self.so.read()
            if data:
                self.tls.data_received(data)
            if self.tls.handshake.done():
                break


def test_handshake_then_both_directions_in_small_steps(tmp_path: Path) -> None:
    async def main() -> None:
        hop = Hop(tmp_path, "localhost")
        server, si, so, inner, wire, tls = hop.server, hop.si, hop.so, hop.inner, hop.wire, hop.tls
        assert wire.protocol is tls and inner.transport is tls.facade
        hop.handshake(ssl.SSLWantReadError)
        await tls.handshake
        si.write(wire.take())  # the client's Finished
        server.do_handshake()
        assert tls.facade.get_extra_info("ssl_object").getpeercert(True)
        # backend -> proxy: 1 MB of records in uvloop-sized reads; the incoming BIO holds a
        # step and the rest of one record at most (its buffer is kept for the session's life)
        watched = WatchedBio(tls._incoming)
        tls._incoming = watched  # type: ignore[assignment]
        payload = os.urandom(1_000_000)
        for start in range(0, len(payload), 16_000):
            server.write(payload[start:start + 16_000])
        stream = so.read()
        for start in range(0, len(stream), 256_000):
            tls.data_received(stream[start:start + 256_000])
        # the server's NewSessionTickets are records without application data: the rest of
        # that read waits for the next loop turn (rule 7), and nothing is lost or reordered
        while tls._turn:
            await asyncio.sleep(0)
        assert bytes(inner.buffer) == payload
        # (a step ends where the record that passes STEP_BYTES ends)
        assert watched.most <= relay.STEP_BYTES + 16_000 + 256, watched.most
        # proxy -> backend: one record per 8 KiB, in order
        wire.take()
        tls.facade.write(payload[:300_000])
        si.write(wire.take())
        got = bytearray()
        with contextlib.suppress(ssl.SSLWantReadError):
            while len(got) < 300_000:
                got += server.read(65536)
        assert bytes(got) == payload[:300_000]
        # our close: close_notify, then the transport closes
        tls.facade.close()
        assert wire.closed

    asyncio.run(main())


def test_a_wrong_name_fails_the_handshake_with_the_verification_error(tmp_path: Path) -> None:
    async def main() -> None:
        hop = Hop(tmp_path, "not-this-host.example")
        wire, tls = hop.wire, hop.tls
        hop.handshake(ssl.SSLError)
        try:
            await tls.handshake
        except ssl.SSLCertVerificationError as exc:
            assert exc.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH
        else:
            raise AssertionError("the handshake did not fail")
        assert wire.closed

    asyncio.run(main())


def test_close_after_a_timed_out_handshake_does_not_raise(tmp_path: Path) -> None:
    # A caller's timeout while the handshake is awaited (send_cancel, probe) must end in its
    # own error: closing the half-made connection may not raise CancelledError instead.
    async def main() -> None:
        hop = Hop(tmp_path, "localhost")  # the server never answers
        inner, wire, tls = hop.inner, hop.wire, hop.tls
        try:
            async with asyncio.timeout(0.05):
                await asyncio.shield(tls.handshake)
        except TimeoutError:
            pass
        assert not tls.handshake.done()
        tls.handshake.cancel()  # even a cancelled future (an unshielded caller's)
        assert inner.transport is tls.facade
        inner.transport.close()
        assert wire.closed
        tls.connection_lost(None)
        assert inner.transport is None and tls.facade is None  # no cycle left

    asyncio.run(main())


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_records_of_the_largest_size_leave_nothing_in_openssl(tmp_path: Path,
                                                              version: ssl.TLSVersion) -> None:
    # relay.SSL_READ_SIZE is what one record can hold (2^14): a backend's full-size records,
    # read in any split, arrive whole and leave no plaintext behind in the SSL object
    async def main() -> None:
        hop = Hop(tmp_path, "localhost", maximum=version)
        server, si, so, inner, wire, tls = hop.server, hop.si, hop.so, hop.inner, hop.wire, hop.tls
        hop.handshake(ssl.SSLWantReadError)
        await tls.handshake
        si.write(wire.take())
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        assert tls.sslobj.version() == ("TLSv1.2" if version is ssl.TLSVersion.TLSv1_2
                                        else "TLSv1.3")
        payload = os.urandom(40 * 16384 + 1)
        for start in range(0, len(payload), 16384):
            server.write(payload[start:start + 16384])  # one record each, the last of 1 byte
        stream = so.read()
        rng = random.Random(1)
        at = 0
        while at < len(stream):
            step = rng.choice((1, 5, 37, 16389, 16421, 70_000, 256_000))
            tls.data_received(stream[at:at + step])
            at += step
            assert tls.sslobj.pending() == 0
        assert bytes(inner.buffer) == payload

    asyncio.run(main())
