"""Where the Python part of an idle TLS session's memory goes, by the line that allocated it.

`.venv/bin/python benchmarks/session_memory.py [N]` starts a throwaway PostgreSQL and one
dwsproxy (workers = 1, plaintext backend) under tracemalloc, opens N psycopg TLS sessions that
each run `SELECT 1` and stay idle, and compares two snapshots of the proxy's Python allocations:
before the sessions (after 32 sessions came and went) and with them open. It prints the growth
per session by allocation site. What OpenSSL allocates is not Python's and is not here:
`benchmarks/tls_memory.py` has it.
"""

from __future__ import annotations

import asyncio
import linecache
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve()


def serve(argv: list[str]) -> int:
    """The proxy, traced: SIGUSR1 writes a snapshot to $SESSION_MEMORY_DIR/snap-<k>.bin.
    (The harness also runs `-m compileall` with this interpreter: that runs as it is.)"""
    if argv[:1] == ["-m"] and argv[1:2] != ["proxy.cli"]:
        import runpy

        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    tracemalloc.start(8)
    out, taken = Path(os.environ["SESSION_MEMORY_DIR"]), [0]

    def dump(_signum: int, _frame: object) -> None:
        import gc

        gc.collect()
        part = out / f"snap-{taken[0]}.part"
        tracemalloc.take_snapshot().dump(str(part))
        part.rename(out / f"snap-{taken[0]}.bin")  # whole, or not there
        taken[0] += 1

    signal.signal(signal.SIGUSR1, dump)
    if argv[:2] == ["-m", "proxy.cli"]:
        argv = argv[2:]
    sys.path.insert(0, str(HERE.parents[1]))
    from proxy import cli

    sys.argv = ["dwsproxy", *argv]
    return int(cli.main() or 0)


async def hold(port: int, n: int, pid: int, snaps: Path) -> None:
    import harness as h
    import psycopg

    async def snapshot(k: int) -> None:
        os.kill(pid, signal.SIGUSR1)
        for _ in range(200):
            if (snaps / f"snap-{k}.bin").exists():
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the proxy wrote no snapshot")

    sem, conns = asyncio.Semaphore(32), []

    async def one(keep: list) -> None:
        async with sem:
            conn = await psycopg.AsyncConnection.connect(h.conninfo(port), autocommit=True)
            keep.append(conn)
            await (await conn.execute("SELECT 1")).fetchall()

    # a few sessions first, closed again: what the first sessions allocate once (caches,
    # the loop's own structures) is not charged to the N
    warm: list = []
    await asyncio.gather(*(one(warm) for _ in range(32)))
    await asyncio.gather(*(c.close() for c in warm))
    await asyncio.sleep(1.0)
    await snapshot(0)
    try:
        await asyncio.gather(*(one(conns) for _ in range(n)))
        await asyncio.sleep(1.0)
        await snapshot(1)
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def main(n: int) -> None:
    sys.path.insert(0, str(HERE.parent))
    import harness as h

    st = h.Stack()
    try:
        snaps = st.work / "snapshots"
        snaps.mkdir()
        wrapper = st.work / "traced-python"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE}" --serve "$@"\n')
        wrapper.chmod(0o755)
        os.environ["SESSION_MEMORY_DIR"] = str(snaps)
        st.proxy_python = str(wrapper)
        st.start_postgres()
        t = st.start_dwsproxy("traced", "1")
        asyncio.run(hold(t.port, n, t.proc.pid, snaps))
        before = tracemalloc.Snapshot.load(str(snaps / "snap-0.bin"))
        after = tracemalloc.Snapshot.load(str(snaps / "snap-1.bin"))
        diff = after.compare_to(before, "traceback")
        total = sum(d.size_diff for d in diff)
        # by the innermost frame of ours (else the innermost of all): the line of proxy/ that
        # made the object, however deep in asyncio or uvloop it was allocated
        sites: dict[tuple[str, int], int] = {}
        for d in diff:
            frames = list(reversed(d.traceback))
            where = next((f for f in frames if "/proxy/" in f.filename), frames[0])
            key = (where.filename, where.lineno)
            sites[key] = sites.get(key, 0) + d.size_diff
        print(f"{n} idle TLS sessions: Python allocations grew {total / n:,.0f} bytes per "
              "session (tracemalloc, 8 frames); by the line of proxy/ that made them, 1% or "
              "more:")
        for (filename, lineno), size in sorted(sites.items(), key=lambda kv: -kv[1]):
            if size < total / 100:
                break
            code = linecache.getline(filename, lineno).strip()[:60]
            print(f"  {size / n:7,.0f} B  {Path(filename).name}:{lineno}  {code}")
    finally:
        st.close()
        time.sleep(0.2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(serve(sys.argv[2:]))
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
