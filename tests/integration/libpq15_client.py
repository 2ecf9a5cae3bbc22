"""Run by test_libpq15.py in a subprocess with PSYCOPG_IMPL=python: psycopg on the
distribution's libpq, sync or async, fetching results of the given shapes, each query under a
timeout. Prints one JSON object on stdout.

Usage: libpq15_client.py CONNINFO TIMEOUT MODE FRESH SHAPES_JSON
  MODE sync | async; FRESH 1: a new connection per query (libpq's input buffer starts at
  16 KB, so each query meets the same buffer), 0: one connection for all.

Why a separate process: the test process has already imported psycopg with the binary
implementation (psycopg[binary] bundles libpq 18, which drains what OpenSSL holds and so never
hangs); the implementation is chosen once, at first import, from PSYCOPG_IMPL.

A query that does not finish in time is recorded as a hang; its connection (and the thread or
task stuck in it) is abandoned and the next query gets a new connection, so one run says how
many queries hang, not just whether one did. The process ends with os._exit: an abandoned
connection must not block the interpreter's shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any


def query(width: int, rows: int) -> str:
    return f"SELECT repeat('x', {width}) FROM generate_series(1, {rows})"


def check(result: list[tuple[Any, ...]], width: int, rows: int) -> str | None:
    if len(result) != rows or any(len(r[0]) != width for r in result):
        return f"wrong result: {len(result)} rows"
    return None


def run_sync(conninfo: str, timeout: float, shapes: list[tuple[int, int]],
             fresh: bool) -> list[dict[str, Any]]:
    import psycopg

    records: list[dict[str, Any]] = []
    conn: psycopg.Connection[Any] | None = None
    for width, rows in shapes:
        if conn is None or fresh:
            conn = psycopg.connect(conninfo, autocommit=True)
        box: dict[str, Any] = {}

        def work(c: psycopg.Connection[Any] = conn, w: int = width, n: int = rows,
                 out: dict[str, Any] = box) -> None:
            try:
                out["error"] = check(c.execute(query(w, n)).fetchall(), w, n)
            except BaseException as exc:
                out["error"] = repr(exc)

        t0 = time.monotonic()
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        worker.join(timeout)
        hang = worker.is_alive()
        records.append({"width": width, "rows": rows, "hang": hang,
                        "error": box.get("error"), "seconds": time.monotonic() - t0})
        if hang:
            conn = None  # stuck waiting on the socket: abandoned with its thread
    return records


async def run_async(conninfo: str, timeout: float, shapes: list[tuple[int, int]],
                    fresh: bool) -> list[dict[str, Any]]:
    import psycopg

    records: list[dict[str, Any]] = []
    conn: psycopg.AsyncConnection[Any] | None = None
    abandoned: list[asyncio.Task[str | None]] = []
    for width, rows in shapes:
        if conn is None or fresh:
            conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)

        async def work(c: psycopg.AsyncConnection[Any] = conn, w: int = width,
                       n: int = rows) -> str | None:
            cur = await c.execute(query(w, n))
            return check(await cur.fetchall(), w, n)

        t0 = time.monotonic()
        task = asyncio.ensure_future(work())
        done, _ = await asyncio.wait({task}, timeout=timeout)
        hang = not done
        error: str | None = None
        if hang:
            # not cancelled: psycopg would send a cancel and wait on the socket again
            abandoned.append(task)
            conn = None
        else:
            exc = task.exception()
            error = repr(exc) if exc else task.result()
        records.append({"width": width, "rows": rows, "hang": hang, "error": error,
                        "seconds": time.monotonic() - t0})
    return records


def main() -> None:
    conninfo, timeout, mode, fresh = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
    shapes = [(int(w), int(n)) for w, n in json.loads(sys.argv[5])]
    import psycopg

    report: dict[str, Any] = {"impl": psycopg.pq.__impl__, "libpq": psycopg.pq.version()}
    if mode == "sync":
        report["records"] = run_sync(conninfo, timeout, shapes, fresh == "1")
    else:
        report["records"] = asyncio.run(run_async(conninfo, timeout, shapes, fresh == "1"))
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
