"""What the relay's own Python frames cost per message, apart from the OpenSSL calls they make.

`.venv/bin/python benchmarks/relay_frames.py [N]` links a TlsEndpoint (after a real TLS 1.3
handshake with a client SSLObject on memory BIOs) to a ToTlsEndpoint, both on transports that
drop what they are given, and times in this process, per message:
  client -> backend: TlsEndpoint.data_received of one record of a 100-byte query, against the
                     two C calls it makes (the incoming BIO's write, the SSL object's read);
  backend -> client: ToTlsEndpoint.data_received of a 300-byte reply, against its two C calls
                     (the SSL object's write, the outgoing BIO's read).
The difference is the Python the relay adds per message on top of OpenSSL; what a real session
pays beyond that is uvloop's callback and the socket calls. Each figure is the best of 5.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proxy.runtime import relay
from proxy.tools import certs


class Sink:
    """A transport that keeps what it is given while `keep`, and drops it after."""

    def __init__(self) -> None:
        self.keep = True
        self.got: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.keep:
            self.got.append(bytes(data))

    def writelines(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.write(piece)

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def best(runs: int, fn: Any) -> float:
    return min(fn() for _ in range(runs))


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        certs.init(folder)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(folder / "server.crt", folder / "server.key")
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
        endpoint, raw = relay.TlsEndpoint(server), Sink()
        endpoint.connection_made(raw)  # type: ignore[arg-type]
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_ctx.wrap_bio(incoming, outgoing)
        while endpoint.state is not relay.OPEN:
            with contextlib.suppress(ssl.SSLWantReadError):
                client.do_handshake()
            endpoint.data_received(outgoing.read())
            incoming.write(b"".join(raw.got))
            raw.got.clear()
        raw.keep = False
        backend, backend_raw = relay.ToTlsEndpoint(), Sink()
        backend_raw.keep = False
        backend.connection_made(backend_raw)  # type: ignore[arg-type]
        endpoint.peer, backend.peer = backend, endpoint

        query, reply = b"Q" * 100, b"D" * 300
        c_write, c_read = relay.c_methods(client).write, outgoing.read

        def records() -> list[bytes]:
            out = []
            for _ in range(n):
                c_write(query)
                out.append(c_read())
            return out

        def frame_in() -> float:
            recs = records()
            t = time.perf_counter()
            for rec in recs:
                endpoint.data_received(rec)
            return (time.perf_counter() - t) / n

        feed, read = endpoint._incoming.write, endpoint._read

        def bare_in() -> float:
            recs = records()
            t = time.perf_counter()
            for rec in recs:
                feed(rec)
                read(relay.SSL_READ_SIZE)
            return (time.perf_counter() - t) / n

        def frame_out() -> float:
            t = time.perf_counter()
            for _ in range(n):
                backend.data_received(reply)
            return (time.perf_counter() - t) / n

        encrypt, take = endpoint._encrypt, endpoint._outgoing.read

        def bare_out() -> float:
            t = time.perf_counter()
            for _ in range(n):
                encrypt(reply)
                take()
            return (time.perf_counter() - t) / n

        fi, bi = best(5, frame_in), best(5, bare_in)
        fo, bo = best(5, frame_out), best(5, bare_out)
        print(f"{ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}, {n} messages a run, "
              "best of 5 (µs per message):")
        print(f"  client -> backend: TlsEndpoint.data_received {fi * 1e6:.2f}, its C calls "
              f"alone {bi * 1e6:.2f}: the frame adds {(fi - bi) * 1e6:.2f}")
        print(f"  backend -> client: ToTlsEndpoint.data_received {fo * 1e6:.2f}, its C calls "
              f"alone {bo * 1e6:.2f}: the frame adds {(fo - bo) * 1e6:.2f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
