"""What OpenSSL itself keeps per server-side TLS session, in this process's RSS.

`.venv/bin/python benchmarks/tls_memory.py [N]` makes N server SSLObjects over memory BIOs (as
the relay does) with the ECDSA certificate of `proxy.certs`, each completing a TLS 1.3 handshake
with a client object that is freed right after (so the clients' memory is reused, not counted),
and one small exchange each way; it prints the RSS growth per session before any handshake
(SSL_new and the two BIOs) and after. That is the floor of a TLS session's memory for any proxy
on this OpenSSL, PgBouncer included: the rest of dwsproxy's figure is Python's.
"""

from __future__ import annotations

import contextlib
import gc
import re
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proxy import certs


def rss_kib() -> int:
    m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    assert m
    return int(m.group(1))


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


def measure(n: int, mode: str) -> float:
    """KiB of RSS per session kept, in a fresh process (no freed memory to reuse)."""
    with tempfile.TemporaryDirectory() as tmp:
        server, client = contexts(Path(tmp))
        session(server, client)
        gc.collect()
        r0 = rss_kib()
        if mode == "bare":
            kept = [(server.wrap_bio(i, o, server_side=True), i, o)
                    for i, o in ((ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(n))]
        else:
            kept = [session(server, client) for _ in range(n)]
        grown = rss_kib() - r0
        del kept
        return grown / n


def main(n: int) -> None:
    def run(mode: str) -> str:
        return subprocess.run([sys.executable, __file__, str(n), mode], capture_output=True,
                              text=True, check=True).stdout.strip()

    print(f"{ssl.OPENSSL_VERSION}, {n} server sessions, TLS 1.3, ECDSA P-256, each measured "
          "in a fresh process:")
    print(f"  SSL_new + 2 memory BIOs, no handshake: {run('bare')} KiB per session")
    print(f"  after the handshake and one exchange:   {run('full')} KiB per session")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        print(f"{measure(int(sys.argv[1]), sys.argv[2]):.1f}")
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
