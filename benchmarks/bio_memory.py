"""What a TLS session keeps allocated after one large transfer, through the relay's own classes.

OpenSSL grows a memory BIO's buffer to the most it ever held and never shrinks it, so what the
relay puts into the client's two BIOs at once stays allocated for the rest of the session, idle
or not. `.venv/bin/python benchmarks/bio_memory.py [N] [--src DIR ...]` links N sessions
(`relay.TlsEndpoint` and `relay.ToTlsEndpoint`, on transports that throw the bytes away, a TLS 1.3
client on memory BIOs), then measures, each in a fresh process, the RSS per session kept after:

- reply:  one 256 KiB read from the backend (uvloop reads up to 256 KiB at a time), relayed to
          the client, then nothing more;
- upload: one 256,000-byte read of the client's records (uvloop's read size), relayed to the
          backend, then nothing more (less what the test's client itself keeps, measured apart).

Give `--src` another source tree (a folder with proxy/, e.g. a `git worktree` of an earlier
commit) to measure it beside this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


def rss_kib() -> int:
    m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    assert m
    return int(m.group(1))


class Sink(asyncio.Transport):
    """Takes what is written; keeps it only while `keep` (the handshake)."""

    def __init__(self) -> None:
        super().__init__()
        self.keep = True
        self.kept = bytearray()

    def write(self, data: Any) -> None:
        if self.keep:
            self.kept += data

    def writelines(self, pieces: Any) -> None:  # as uvloop's: no join
        for piece in pieces:
            self.write(piece)

    def take(self) -> bytes:
        out = bytes(self.kept)
        self.kept.clear()
        return out

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def measure(n: int, mode: str) -> float:
    from proxy.runtime import relay
    from proxy.tools import certs

    with tempfile.TemporaryDirectory() as tmp:
        certs.init(Path(tmp))
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(Path(tmp) / "server.crt", Path(tmp) / "server.key")
        server.num_tickets = 0
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE

    def session() -> tuple[Any, ...]:
        endpoint = relay.TlsEndpoint(server)
        raw = Sink()
        endpoint.connection_made(raw)
        ci, co = ssl.MemoryBIO(), ssl.MemoryBIO()
        c = client.wrap_bio(ci, co)
        for _ in range(4):
            with contextlib.suppress(ssl.SSLWantReadError):
                c.do_handshake()
            data = co.read()
            if data:
                endpoint.data_received(data)
            ci.write(raw.take())
        assert endpoint.state is relay.OPEN
        backend = relay.ToTlsEndpoint()
        bt = Sink()
        bt.keep = False
        backend.connection_made(bt)
        relay.link(endpoint, backend, b"")
        raw.keep = False
        return endpoint, backend, raw, bt, c, co

    async def main() -> float:
        sessions = [session() for _ in range(n)]
        upload = b""
        if mode != "reply":  # each client encrypts its own (records are per session)
            payload = os.urandom(256_000)
        reply = os.urandom(256 * 1024)
        gc.collect()
        r0 = rss_kib()
        for endpoint, backend, _raw, _bt, c, co in sessions:
            if mode == "reply":
                backend.data_received(reply)
                continue
            pieces = []  # the client's BIO drained per record: it stays small (counted apart)
            for start in range(0, len(payload), 16384):
                c.write(payload[start:start + 16384])
                pieces.append(co.read())
            upload = b"".join(pieces)
            if mode == "upload":
                endpoint.data_received(upload[:256_000])
                endpoint.data_received(upload[256_000:])
        upload = b""
        gc.collect()
        return (rss_kib() - r0) / n

    return asyncio.run(main())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", nargs="?", type=int, default=300, help="sessions, default 300")
    p.add_argument("--src", action="append", default=[], help="another source tree to measure")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print(f"{measure(a.n, a.mode):.1f}")
        return
    print(f"{ssl.OPENSSL_VERSION}, {a.n} linked TLS sessions, TLS 1.3; KiB of RSS per session "
          "kept after one transfer, each figure from a fresh process:")
    for src in [str(HERE), *a.src]:
        env = dict(os.environ, PYTHONPATH=src)
        got = {}
        for mode in ("reply", "upload", "client"):
            got[mode] = subprocess.run(
                [sys.executable, __file__, str(a.n), "--mode", mode], env=env,
                capture_output=True, text=True, check=True).stdout.strip()
        upload = float(got["upload"]) - float(got["client"])
        print(f"  {src}: 256 KiB reply {got['reply']} KiB, 256 KB upload {upload:.1f} KiB "
              f"(net of the client's own {got['client']} KiB)")


if __name__ == "__main__":
    main()
