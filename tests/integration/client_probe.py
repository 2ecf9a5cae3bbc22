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
or null), query (SQL or null), timeout (seconds, for the connect and for the query).
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import ssl
import sys
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
    try:
        conn = psycopg.connect(**libpq_conninfo(spec, none_dir))
    except psycopg.OperationalError as exc:
        return failure(exc, exc.sqlstate) | extra
    with conn:
        rows = conn.execute(spec["query"]).fetchall() if spec["query"] else []
        return success(rows, extra)


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
