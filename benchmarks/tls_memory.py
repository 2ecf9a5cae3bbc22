"""What OpenSSL itself keeps per server-side TLS session, in this process's RSS.

`.venv/bin/python benchmarks/tls_memory.py [N]` makes N server SSLObjects over memory BIOs (as
the relay does) with the ECDSA certificate of `proxy.certs`, each completing a TLS 1.3 handshake
with a client object that is freed right after (so the clients' memory is reused, not counted),
and one small exchange each way; it prints the RSS growth per session before any handshake
(SSL_new and the two BIOs) and after, and beside it what glibc counts as allocated and not freed
(mallinfo2), which tells real allocations from fragmentation. That is the floor of a TLS
session's memory for a proxy on this OpenSSL with memory BIOs: the rest of dwsproxy's figure is
Python's. A proxy on socket BIOs (PgBouncer) does not keep the two BIOs' buffers: the
`bios` line shows what a pair of memory BIOs keeps after a handshake's worth of bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proxy.tools import certs


def rss_kib() -> int:
    m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    assert m
    return int(m.group(1))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def allocated_bytes() -> int:
    """Bytes glibc's malloc has handed out and not had back (glibc >= 2.33)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def contexts(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    certs.init(folder)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "server.crt", folder / "server.key")
    server.num_tickets = 0  # as proxy/tls.py sets it
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    return server, client


def session(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[object, ...]:
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(si, so, server_side=True)
    c = client.wrap_bio(ci, co)
    for _ in range(4):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        si.write(co.read())
        ci.write(so.read())
    c.write(b"Q" * 100)
    si.write(co.read())
    s.read()
    s.write(b"D" * 300)
    ci.write(so.read())
    c.read()
    return s, si, so


def used_bios() -> tuple[ssl.MemoryBIO, ssl.MemoryBIO]:
    """Two memory BIOs after what a TLS 1.3 handshake passes through them here (a ClientHello
    in, the server's flight out): OpenSSL keeps a memory BIO's buffer at its largest."""
    bios = ssl.MemoryBIO(), ssl.MemoryBIO()
    for bio, size in zip(bios, (517, 833), strict=True):  # as measured in session() here
        bio.write(b"x" * size)
        bio.read()
    return bios


def measure(n: int, mode: str) -> str:
    """KiB of RSS and of allocated bytes per session kept, in a fresh process (no freed memory
    to reuse)."""
    with tempfile.TemporaryDirectory() as tmp:
        server, client = contexts(Path(tmp))
        session(server, client)
        gc.collect()
        r0, a0 = rss_kib(), allocated_bytes()
        kept: list[object]
        if mode == "bare":
            kept = [(server.wrap_bio(i, o, server_side=True), i, o)
                    for i, o in ((ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(n))]
        elif mode == "bios":
            kept = [used_bios() for _ in range(n)]
        else:
            kept = [session(server, client) for _ in range(n)]
        grown, allocated = rss_kib() - r0, (allocated_bytes() - a0) / 1024
        del kept
        return f"{grown / n:.1f} KiB per session (allocated: {allocated / n:.1f} KiB)"


def main(n: int) -> None:
    def run(mode: str) -> str:
        return subprocess.run([sys.executable, __file__, str(n), mode], capture_output=True,
                              text=True, check=True).stdout.strip()

    print(f"{ssl.OPENSSL_VERSION}, {n} server sessions, TLS 1.3, ECDSA P-256, each measured "
          "in a fresh process:")
    print(f"  SSL_new + 2 memory BIOs, no handshake: {run('bare')}")
    print(f"  after the handshake and one exchange:   {run('full')}")
    print(f"  bios: 2 memory BIOs after a handshake's bytes, no SSL object: {run('bios')}")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        print(measure(int(sys.argv[1]), sys.argv[2]))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
