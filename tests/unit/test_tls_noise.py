"""Rule 6 and 7 of relay.py on both hops against a peer that interleaves tiny application
records with TLS 1.3 KeyUpdates (found by a hostile review): an application record pays back
only its own overhead, so the pairs cannot keep the noise count at 0, every step of such a read
yields the loop, and the flood is closed past TLS_NOISE_LIMIT."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

from test_relay import KEY_UPDATE_REPLY, FakeTransport, Pair, contexts  # noqa: F401
from tls_records import HandmadeServer

from proxy.runtime import backend_tls, relay

READ = 256_000  # what uvloop hands over in one data_received at most


def pairs(writer: Any, count: int) -> bytes:
    """`count` (KeyUpdate(update_requested), 1-byte application record) pairs, 50 bytes each."""
    return b"".join(writer.key_update() + writer.application_data(b"x") for _ in range(count))


def test_a_client_interleaving_keyupdates_is_bounded_per_read_and_closed(
        contexts: dict[str, Any]) -> None:  # noqa: F811
    async def main() -> None:
        pair = Pair(contexts["plain"])
        pair.link(high=1 << 30)
        pair.raw.high = 1 << 30  # the attacker reads its replies: never paused for them
        writer = pair.client.writer()
        pair.endpoint.data_received(pairs(writer, READ // 50))  # one callback
        answered = ((len(pair.raw.buffer) + pair.endpoint._outgoing.pending)
                    // KEY_UPDATE_REPLY)
        assert answered <= relay.STEP_RECORDS, answered  # one step, then the loop's turn
        for _ in range(200):
            if pair.raw.aborted:
                break
            await pair.turns()
            pair.raw.take()
        assert pair.raw.aborted and pair.endpoint.violation is not None
        assert pair.endpoint.violation[0] == "tls_flood"

    asyncio.run(main())


class Inner(relay.Endpoint):
    pass


def test_a_backend_interleaving_keyupdates_is_bounded_per_read_and_closed(
        contexts: dict[str, Any]) -> None:  # noqa: F811
    async def main() -> None:
        folder: Path = contexts["dir"]
        server = HandmadeServer(folder / "server.crt", folder / "server.key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        inner = Inner()
        tls = backend_tls.ClientTls(inner, ctx, None)
        raw = FakeTransport(tls, high=1 << 30)
        tls.connection_made(raw)
        for _ in range(10):
            server.feed(raw.take())
            with contextlib.suppress(ssl.SSLWantReadError):
                server.sslobj.do_handshake()
            out = server._out.read()
            if out:
                tls.data_received(out)
            if tls.handshake.done():
                break
        assert tls.handshake.done() and tls.handshake.exception() is None
        server.feed(raw.take())
        server.sslobj.do_handshake()
        tls.data_received(pairs(server.writer(), READ // 50))
        assert len(raw.buffer) // KEY_UPDATE_REPLY <= relay.STEP_RECORDS
        for _ in range(400):
            if raw.aborted:
                break
            await asyncio.sleep(0)
            raw.take()
        assert raw.aborted and inner.violation is not None
        server.close()

    asyncio.run(main())
