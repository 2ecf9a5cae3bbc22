"""One connection of one real Python client, run in its own process by test_clients.py.

Owns: turning a connection spec (JSON, argv[1]) into one connection with pg8000, asyncpg,
psycopg (whichever libpq `PSYCOPG_IMPL` selects) or psqlODBC through pyodbc and unixODBC, running
one query on it, and printing one JSON object: the rows' digest on success, or what the client
raised (its exception type, the text it shows, and the SQLSTATE where the client exposes one).
Must not judge the outcome: test_clients.py does, so every client is asserted the same way.

Why a process per connection: psycopg's python implementation must load the distribution's libpq
without clashing with psycopg[binary] in the test process, and a client hung inside a blocking
read can only be stopped by ending its process; the test's timeout then says so.

Spec keys: client, host, port, user, dbname, application_name, tls (bool), ca, cert, key (paths
or null), query (SQL or null), timeout (seconds, for the connect and for the query; for psycopg a
watchdog over both, which on a hang prints {"hung": phase, ...} with where the bytes were).
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import select
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

Rows = Sequence[Sequence[Any]]


def digest(rows: Rows) -> dict[str, Any]:
    """What the test compares: row count, characters in all values, and a hash of every value
    in order, so a lost, repeated, reordered or altered byte shows."""
    h = hashlib.sha256()
    chars = 0
    for row in rows:
        line = "\t".join(str(v) for v in row) + "\n"
        chars += sum(len(str(v)) for v in row)
        h.update(line.encode())
    return {"rows": len(rows), "chars": chars, "sha256": h.hexdigest()}


def ssl_context(spec: dict[str, Any]) -> ssl.SSLContext:
    # Full verification: the proxy's certificate has 127.0.0.1 among its SANs.
    ctx = ssl.create_default_context(cafile=spec["ca"])
    if spec["cert"]:
        ctx.load_cert_chain(spec["cert"], spec["key"])
    return ctx


def libpq_conninfo(spec: dict[str, Any], none_dir: str) -> dict[str, str]:
    params = {"host": spec["host"], "port": str(spec["port"]), "user": spec["user"],
              "dbname": spec["dbname"], "application_name": spec["application_name"],
              "connect_timeout": str(int(spec["timeout"]))}
    if not spec["tls"]:
        params["sslmode"] = "disable"
        return params
    params |= {"sslmode": "verify-full", "sslrootcert": spec["ca"]}
    # Without a certificate, point libpq away from ~/.postgresql/postgresql.crt so that it
    # really offers none.
    params["sslcert"] = spec["cert"] or f"{none_dir}/none.crt"
    params["sslkey"] = spec["key"] or f"{none_dir}/none.key"
    return params


def run_pg8000(spec: dict[str, Any]) -> dict[str, Any]:
    import pg8000.exceptions
    import pg8000.native

    try:
        conn = pg8000.native.Connection(
            spec["user"], host=spec["host"], port=spec["port"], database=spec["dbname"],
            application_name=spec["application_name"], timeout=spec["timeout"],
            # False, not None: None is pg8000's default, TLS when offered, unverified.
            ssl_context=ssl_context(spec) if spec["tls"] else False)
    except pg8000.exceptions.DatabaseError as exc:
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        return failure(exc, fields.get("C"))
    except pg8000.exceptions.InterfaceError as exc:
        return failure(exc, None)
    try:
        return success(conn.run(spec["query"]) if spec["query"] else [], {})
    finally:
        conn.close()


def run_asyncpg(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncpg

    async def main() -> dict[str, Any]:
        try:
            conn = await asyncpg.connect(
                host=spec["host"], port=spec["port"], user=spec["user"],
                database=spec["dbname"], timeout=spec["timeout"],
                ssl=ssl_context(spec) if spec["tls"] else False,
                server_settings={"application_name": spec["application_name"]})
        except asyncpg.PostgresError as exc:
            return failure(exc, exc.sqlstate)
        try:
            rows = (await conn.fetch(spec["query"], timeout=spec["timeout"])
                    if spec["query"] else [])
            return success([tuple(r) for r in rows], {})
        finally:
            await conn.close(timeout=spec["timeout"])

    return asyncio.run(main())


def run_psycopg(spec: dict[str, Any], none_dir: str) -> dict[str, Any]:
    import psycopg

    extra = {"psycopg_impl": psycopg.pq.__impl__, "libpq": psycopg.pq.version()}
    phase = {"now": "connect", "conn": None}
    # psycopg's sync API has no client-side query timeout: a watchdog ends a hang, after
    # looking at where the bytes are (see diagnose_hang).
    watchdog = threading.Timer(spec["timeout"], lambda: report_hang(phase, extra))
    watchdog.daemon = True
    watchdog.start()
    try:
        try:
            conn = psycopg.connect(**libpq_conninfo(spec, none_dir))
        except psycopg.OperationalError as exc:
            return failure(exc, exc.sqlstate) | extra
        phase |= {"now": "query", "conn": conn}
        with conn:
            rows = conn.execute(spec["query"]).fetchall() if spec["query"] else []
            return success(rows, extra)
    finally:
        watchdog.cancel()


def report_hang(phase: dict[str, Any], extra: dict[str, Any]) -> None:
    out = {"ok": False, "hung": phase["now"], **extra}
    if phase["conn"] is not None:
        out |= diagnose_hang(phase["conn"])
    print(json.dumps(out), flush=True)
    os._exit(0)


def diagnose_hang(conn: Any) -> dict[str, Any]:
    """Where a hung query's bytes are. The main thread is parked in psycopg's poll() on the
    socket, outside libpq, so looking at the PGconn from here is safe enough just before the
    process exits. The signature of the known libpq <= 17 defect (issue 10 item 1): the socket
    is not readable, OpenSSL holds decrypted bytes libpq has not taken (SSL_pending > 0), and
    one more PQconsumeInput completes the result."""
    import ctypes
    import ctypes.util

    import psycopg

    pgconn = conn.pgconn
    readable = bool(select.select([pgconn.socket], [], [], 0)[0])
    pending = None
    if psycopg.pq.__impl__ == "python":
        from psycopg.pq import _pq_ctypes

        libpq = _pq_ctypes.pq
        libpq.PQgetssl.restype = ctypes.c_void_p
        libpq.PQgetssl.argtypes = [ctypes.c_void_p]
        ssl_ptr = libpq.PQgetssl(pgconn.pgconn_ptr)
        name = ctypes.util.find_library("ssl")
        if ssl_ptr and name:
            libssl = ctypes.CDLL(name)  # the one libpq has loaded (same soname)
            libssl.SSL_pending.argtypes = [ctypes.c_void_p]
            pending = int(libssl.SSL_pending(ssl_ptr))
    busy_before = bool(pgconn.is_busy())
    rounds = 0
    while pgconn.is_busy() and rounds < 1000:
        pgconn.consume_input()
        rounds += 1
    return {"socket_readable": readable, "ssl_pending": pending, "busy": busy_before,
            "completed_by_consume_input": busy_before and not pgconn.is_busy(),
            "consume_input_calls": rounds}


def odbc_driver() -> str:
    # The driver library itself, not the name odbcinst.ini registers: the test needs no
    # system-wide DSN set-up, and unixODBC's driver manager still loads it.
    found = sorted(glob.glob("/usr/lib/*/odbc/psqlodbcw.so"))
    if not found:
        raise SystemExit("psqlODBC (odbc-postgresql) is not installed: run `make setup`")
    return found[0]


def run_pyodbc(spec: dict[str, Any], none_dir: str) -> dict[str, Any]:
    import pyodbc

    params = libpq_conninfo(spec, none_dir)
    # psqlODBC connects with libpq: SSLmode is its own keyword, and pqopt hands the other libpq
    # parameters through unchanged.
    pqopt = " ".join(f"{k}={params[k]}" for k in ("sslrootcert", "sslcert", "sslkey",
                                                   "application_name") if k in params)
    conn_str = (f"Driver={{{odbc_driver()}}};Server={spec['host']};Port={spec['port']};"
                f"Database={spec['dbname']};UID={spec['user']};SSLmode={params['sslmode']};"
                f"pqopt={{{pqopt}}}")
    extra: dict[str, Any] = {"conn_str": conn_str}
    try:
        conn = pyodbc.connect(conn_str, timeout=int(spec["timeout"]), autocommit=True)
    except pyodbc.Error as exc:
        # args: (SQLSTATE, the diagnostic message an ODBC application displays)
        state, message = (*exc.args, None, None)[:2]
        return failure(exc, state) | extra | {"shown": message}
    # No query timeout here: psqlODBC refuses pyodbc's Connection.timeout (connect attribute
    # 113, SQL_ATTR_CONNECTION_TIMEOUT), and its statement timeout is a server-side
    # statement_timeout, which cannot end a client stuck in a read; the test's process timeout
    # does.
    try:
        rows = conn.execute(spec["query"]).fetchall() if spec["query"] else []
        return success([tuple(r) for r in rows],
                       extra | {"driver": conn.getinfo(pyodbc.SQL_DRIVER_NAME),
                                "driver_version": conn.getinfo(pyodbc.SQL_DRIVER_VER)})
    finally:
        conn.close()


def success(rows: Rows, extra: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, **digest(rows), **extra}


def failure(exc: BaseException, sqlstate: str | None) -> dict[str, Any]:
    return {"ok": False, "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "shown": str(exc), "sqlstate": sqlstate}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    none_dir = spec.get("none_dir", "/nonexistent")
    started = time.monotonic()
    client = spec["client"]
    if client == "pg8000":
        out = run_pg8000(spec)
    elif client == "asyncpg":
        out = run_asyncpg(spec)
    elif client == "psycopg":
        out = run_psycopg(spec, none_dir)
    elif client == "pyodbc":
        out = run_pyodbc(spec, none_dir)
    else:
        raise SystemExit(f"client_probe: unknown client {client!r}")
    out["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
