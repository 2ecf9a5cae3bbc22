"""What the proxy keeps per idle session after each session moved one large reply, per hop.

`.venv/bin/python benchmarks/burst_memory.py [N] [--src DIR] [--hop plain|tls|both]` starts a
throwaway PostgreSQL (TLS on) and, for each backend hop (plaintext, and TLS with verify-full),
two fresh dwsproxy processes (workers = 1). Through each it opens N TLS sessions that each run
one query and then stay idle: `SELECT 1` on the first proxy, `SELECT repeat('x', 262144)` (a
256 KiB row) on the second. It prints the proxy's RSS per session for both and the difference:
what one large reply leaves allocated per session for the rest of its life. `--src` runs the
proxy from another source tree (an A/B: run it once per tree).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h


async def _hold(port: int, count: int, query: str, measure) -> dict:
    import psycopg

    sem = asyncio.Semaphore(32)
    conns: list = []

    async def one() -> None:
        async with sem:
            conn = await psycopg.AsyncConnection.connect(h.conninfo(port), autocommit=True)
            conns.append(conn)
            cur = await conn.execute(query)
            await cur.fetchall()

    try:
        await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.sleep(1.0)
        return measure()
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def main(n: int, src: str, hops: list[bool]) -> None:
    st = h.Stack(proxy_src=Path(src).resolve() if src else None)
    try:
        st.start_postgres()
        print(f"{n} TLS sessions per proxy, each idle after one query; proxy RSS (workers = 1, "
              "a fresh process each):")
        for backend_tls in hops:
            per: dict[str, float] = {}
            for label, query in (("small", "SELECT 1"),
                                 ("large", "SELECT repeat('x', 262144)")):
                name = f"burst-{'btls' if backend_tls else 'plain'}-{label}"
                t = st.start_dwsproxy(name, "1", backend_tls=backend_tls)
                before = t.memory()["rss_mb"]
                after = asyncio.run(_hold(t.port, n, query, lambda t=t: t.memory()["rss_mb"]))
                per[label] = (after - before) * 1024 / n
                print(f"  backend {'TLS' if backend_tls else 'plaintext'}, {label} query: "
                      f"{before:.1f} -> {after:.1f} MB, {per[label]:.1f} KiB per session")
                h.stop_process(t.proc, name)
                st.wait_backends_below(5)
                time.sleep(0.5)
            print(f"  backend {'TLS' if backend_tls else 'plaintext'}: one 256 KiB reply leaves "
                  f"{per['large'] - per['small']:.1f} KiB per session")
    finally:
        st.close()


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", nargs="?", type=int, default=200, help="sessions, default 200")
    p.add_argument("--src", default="", help="run dwsproxy from this source tree instead")
    p.add_argument("--hop", choices=("plain", "tls", "both"), default="both")
    a = p.parse_args()
    main(a.n, a.src, {"plain": [False], "tls": [True], "both": [False, True]}[a.hop])
