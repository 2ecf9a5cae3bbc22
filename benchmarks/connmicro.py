"""Micro-benchmarks of what every new connection pays in Python besides its I/O: the log line
(KeyValueFormatter through the logging machinery, to /dev/null), the metric updates of one TLS
session, and an `asyncio.timeout` block, on uvloop. `.venv/bin/python benchmarks/connmicro.py`
(from a tree: `cd TREE && python /path/to/connmicro.py` measures that tree's proxy/)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import timeit

sys.path.insert(0, os.getcwd())
import uvloop

from proxy import cli
from proxy.ops import metrics
from proxy.runtime import session

N = 20000
FIELDS = {"peer": "127.0.0.1:51234", "worker_pid": 1234, "encryption": "tls",
          "backend_encryption": "plain", "tls_version": "TLSv1.3",
          "cipher": "TLS_AES_256_GCM_SHA384", "direct_tls": False, "client_cert": "",
          "user": "postgres", "database": "postgres", "application_name": "pgbench",
          "outcome": "ok", "detail": "", "bytes_in": 400, "bytes_out": 1200, "duration": 0.0123}


def per_call(fn: object) -> float:
    return min(timeit.repeat(fn, number=N, repeat=5)) / N * 1e6  # type: ignore[arg-type]


def main() -> None:
    cli.setup_logging("info", "kv")
    handler = logging.getLogger().handlers[0]
    handler.stream = open(os.devnull, "w")
    log = logging.getLogger("dwsproxy.session")
    record = log.makeRecord(log.name, logging.INFO, "", 0, "connection closed", (), None,
                            extra={"fields": FIELDS})
    assert handler.formatter is not None
    def line() -> None:
        log.log(logging.INFO, "connection closed", extra={"fields": dict(FIELDS)})

    print(f"log line (log.log to /dev/null): {per_call(line):.2f} us")
    print(f"  of which format(): {per_call(lambda: handler.formatter.format(record)):.2f} us")

    def session_metrics() -> None:
        metrics.ssl_request("S")
        metrics.HANDSHAKE_SECONDS.observe(0.002)
        metrics.BACKEND_CONNECT_SECONDS.observe(0.0007)
        metrics.accepted("tls", "TLSv1.3", False, False)
        metrics.active("tls", 1)
        metrics.active("tls", -1)
        metrics.add_bytes(400, 1200)

    print(f"metric updates of one TLS session: {per_call(session_metrics):.2f} us")

    async def timeouts() -> None:
        async def one() -> None:
            async with asyncio.timeout(10):
                pass

        async def bare() -> None:
            pass

        async def within() -> None:
            if hasattr(session, "within"):
                await session.within(10, bare())

        best = []
        for fn in (one, bare, within):
            t0 = time.perf_counter()
            for _ in range(N):
                await fn()
            best.append((time.perf_counter() - t0) / N * 1e6)
        print(f"asyncio.timeout block: {best[0] - best[1]:.2f} us")
        if hasattr(session, "within"):
            print(f"session.within: {best[2] - best[1]:.2f} us")

    uvloop.run(timeouts())


if __name__ == "__main__":
    main()
