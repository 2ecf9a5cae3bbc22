"""Table 3 of the seed with real libpq clients: psql (the system's libpq 15) and psycopg
(bundled libpq 18), every cell: ssl × require_ssl × sslmode."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Proxy, clean_env, run_psql

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# Written out from ../shared/spec/ssl-policy.md, not computed by product code. The seed's rows
# for ssl off are the same with either require_ssl; require_ssl = true with ssl = false is
# refused by check-config (tests/integration/test_commands.py), so ssl off runs with it off.
EXPECTED = {
    (True, True): dict(disable="refused", allow="TLS", prefer="TLS", require="TLS",
                       **{"verify-ca": "TLS", "verify-full": "TLS"}),
    (True, False): dict(disable="plaintext", allow="plaintext", prefer="TLS", require="TLS",
                        **{"verify-ca": "TLS", "verify-full": "TLS"}),
    (False, False): dict(disable="plaintext", allow="plaintext", prefer="plaintext",
                         require="refused", **{"verify-ca": "refused", "verify-full": "refused"}),
}
CELLS = [(s, r, m) for (s, r) in EXPECTED for m in SSLMODES]


def cell_id(cell: tuple[bool, bool, str]) -> str:
    return f"ssl={'on' if cell[0] else 'off'}-require_ssl={'on' if cell[1] else 'off'}-{cell[2]}"


@pytest.fixture(scope="module")
def proxies(start_proxy: Callable[..., Proxy]) -> dict[tuple[bool, bool], Proxy]:
    return {key: start_proxy(tls={"ssl": key[0], "require_ssl": key[1]}) for key in EXPECTED}


def conninfo(port: int, sslmode: str, pki: Path) -> str:
    # host=localhost so that verify-full checks the name against the certificate's SAN.
    return (f"host=localhost port={port} user=postgres dbname=postgres sslmode={sslmode} "
            f"sslrootcert={pki / 'cacert.pem'} connect_timeout=10")


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_psql(cell: tuple[bool, bool, str], proxies: dict, pki: Path) -> None:
    ssl_on, require, mode = cell
    proc = run_psql(conninfo(proxies[(ssl_on, require)].port, mode, pki))
    if proc.returncode != 0:
        seen = "refused"
    else:
        seen = "TLS" if "SSL connection (protocol: TLSv1." in proc.stdout else "plaintext"
    assert seen == EXPECTED[(ssl_on, require)][mode], proc.stdout + proc.stderr
    if seen == "refused" and ssl_on:
        assert "FATAL:  SSL connection is required by the server" in proc.stderr
    if seen == "refused" and not ssl_on:
        assert "server does not support SSL, but SSL was required" in proc.stderr


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_psycopg(cell: tuple[bool, bool, str], proxies: dict, pki: Path) -> None:
    import psycopg

    ssl_on, require, mode = cell
    try:
        with psycopg.connect(conninfo(proxies[(ssl_on, require)].port, mode, pki)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            seen = "TLS" if conn.pgconn.ssl_in_use else "plaintext"
    except psycopg.OperationalError as exc:
        seen = "refused"
        message = str(exc)
        if ssl_on:
            assert "SSL connection is required by the server" in message
        else:
            assert "server does not support SSL" in message
    assert seen == EXPECTED[(ssl_on, require)][mode]


def test_refusal_as_psql_prints_it(proxies: dict, pki: Path) -> None:
    proc = run_psql(conninfo(proxies[(True, True)].port, "disable", pki))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].endswith(
        "failed: FATAL:  SSL connection is required by the server (require_ssl is on)")
    assert proc.stderr.splitlines()[1] == (
        "DETAIL:  refused by dwsproxy: SQLSTATE 28000, reason ssl_required")
    assert proc.stderr.splitlines()[2] == (
        "HINT:  connect with SSL: set sslmode=require (or prefer, verify-ca, verify-full) in "
        "the connection string or PGSSLMODE")


def test_refusal_sqlstate_seen_by_asyncpg(proxies: dict) -> None:
    import asyncpg

    async def attempt() -> None:
        await asyncpg.connect(host="127.0.0.1", port=proxies[(True, True)].port,
                              user="postgres", database="postgres", ssl=False)

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(attempt())
    assert info.value.sqlstate == "28000"
    assert "SSL connection is required by the server" in str(info.value)


def test_psql_env_pgsslmode_allow_retries_with_tls(proxies: dict, pki: Path) -> None:
    # The same cell with the environment variables a DWS user is told to set.
    proc = run_psql(f"host=localhost port={proxies[(True, True)].port} user=postgres "
                    "dbname=postgres",
                    env=clean_env(PGSSLMODE="allow", PGSSLROOTCERT=str(pki / "cacert.pem")))
    assert proc.returncode == 0 and "SSL connection (protocol:" in proc.stdout


def test_metrics_count_the_table(proxies: dict) -> None:
    # Every psql/psycopg refusal in the require_ssl proxy was counted as ssl_required, every
    # refusal with ssl off (the client closes after N) as ssl_disabled.
    on = proxies[(True, True)]
    off = proxies[(False, False)]
    assert on.metric("dwsproxy_connections_rejected_total", reason="ssl_required") >= 2
    assert off.metric("dwsproxy_connections_rejected_total", reason="ssl_disabled") >= 3
    assert off.metric("dwsproxy_ssl_requests_total", response="N") >= 3
    assert on.metric("dwsproxy_ssl_requests_total", response="S") >= 5
