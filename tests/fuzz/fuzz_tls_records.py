"""Fuzz target (atheris, coverage-guided): the client side's TLS record path, relay.TlsEndpoint,
fed arbitrary bytes after a completed handshake over memory BIOs and a fake transport.

Each input is a list of steps after a real handshake (TLS 1.2 or 1.3, picked by the first byte):
raw bytes straight into data_received, application data the client encrypts (one record, several
in one delivery, split at a fuzzed offset, or with one byte flipped), the client's close_notify,
or its EOF. Checked: nothing raises out of
data_received; nothing is written to a transport after it was closed; and while only valid
records came, the backend got exactly the client's plaintext. Only TlsEndpoint's public surface
is used (constructor, the asyncio.Protocol callbacks, `handshake`, `relay.link`), so the target
survives changes inside relay.py. Run it with `make fuzz` or
`python tests/fuzz/fuzz_tls_records.py CORPUS... -max_total_time=N`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["proxy.runtime.relay"]):
    from proxy.runtime import relay

from proxy.config.schema import TlsConfig
from proxy.tls.loader import server_tls as build_server_tls
from proxy.tools import certs


class FakeTransport(asyncio.Transport):
    """Records what is written; a write after close or abort is a bug (uvloop raises there)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: Any) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        assert not self.closed, "write_eof after close"

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _contexts() -> tuple[ssl.SSLContext, dict[int, ssl.SSLContext]]:
    folder = Path(tempfile.mkdtemp(prefix="dwsproxy-fuzz-"))
    ca = certs.make_ca("Fuzz Root")
    server = certs.issue(ca, "localhost", server=True)
    certs.write_certs(folder / "server.crt", server[0])
    certs.write_key(folder / "server.key", server[1])
    server_ctx = build_server_tls(TlsConfig(ssl_cert_file=str(folder / "server.crt"),
                                            ssl_key_file=str(folder / "server.key")),
                                  cert_requested=False).context
    clients = {}
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        clients[version == ssl.TLSVersion.TLSv1_3] = ctx
    return server_ctx, clients


SERVER_CTX, CLIENT_CTXS = _contexts()
LOOP = asyncio.new_event_loop()


async def run(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    endpoint = relay.TlsEndpoint(SERVER_CTX)
    raw = FakeTransport()
    endpoint.connection_made(raw)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = CLIENT_CTXS[fdp.ConsumeBool()].wrap_bio(incoming, outgoing,
                                                     server_hostname="localhost")
    for _ in range(8):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            endpoint.data_received(outgoing.read())
            incoming.write(raw.take())
    endpoint.data_received(outgoing.read())  # the client's Finished (TLS 1.3)
    incoming.write(raw.take())
    assert endpoint.handshake.done() and endpoint.handshake.exception() is None
    backend = relay.Endpoint()
    backend_raw = FakeTransport()
    backend.connection_made(backend_raw)
    relay.link(endpoint, backend, b"")
    sent = bytearray()
    valid = True
    try:
        while fdp.remaining_bytes() and not raw.closed:
            step = fdp.ConsumeIntInRange(0, 6)
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
            if step == 0:  # raw bytes: garbage, or a record the fuzzer made up
                valid = valid and not chunk
                endpoint.data_received(chunk)
                continue
            if step == 4:
                endpoint.eof_received()
                break
            if step == 6:  # the client's close_notify, maybe with bytes after it
                with contextlib.suppress(ssl.SSLWantReadError):
                    client.unwrap()
                endpoint.data_received(outgoing.read() + chunk)
                break
            if not chunk:
                continue
            client.write(chunk)
            if step == 5:  # several records in one delivery
                client.write(chunk[::-1])
                chunk += chunk[::-1]
            record = outgoing.read()
            if step in (1, 5):
                sent += chunk
                endpoint.data_received(record)
            elif step == 2:  # one record split in two deliveries
                sent += chunk
                cut = fdp.ConsumeIntInRange(0, len(record))
                endpoint.data_received(record[:cut])
                endpoint.data_received(record[cut:])
            else:  # one byte flipped: the record's MAC fails, the connection must end
                at = fdp.ConsumeIntInRange(0, len(record) - 1)
                flip = fdp.ConsumeIntInRange(1, 255)
                valid = False
                endpoint.data_received(record[:at] + bytes([record[at] ^ flip]) + record[at + 1:])
            if valid:
                assert bytes(backend_raw.out) == bytes(sent), "plaintext lost or changed"
            incoming.write(raw.take())  # whatever the proxy answered reaches the client
        if valid and not raw.closed:
            assert bytes(backend_raw.out) == bytes(sent)
    finally:
        endpoint.connection_lost(None)
        backend.connection_lost(None)


def one_input(data: bytes) -> None:
    LOOP.run_until_complete(run(data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
