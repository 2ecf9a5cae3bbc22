"""The real-client matrix: seven PostgreSQL clients through dwsproxy with require_ssl and two-way
authentication (clientcert=verify-ca, a CA and a CRL).

Owns: driving node-postgres, psqlODBC (through unixODBC, from pyodbc), pg8000, psycopg on the
distribution's libpq 15, psycopg[binary] on its bundled libpq 18, pgjdbc and asyncpg, each in its
own process, through one proxy; for each, four cases: a good certificate fetches a result of
about 500 KB that must arrive exactly; a revoked certificate, no certificate and a plaintext
connection are each refused, and the test asserts the refusal text and SQLSTATE as that client
shows them to its user, and the proxy's log line and metric for the same connection.
Must not: retry a connection or a query, or accept "some error" as a refusal.

Each client is a separate process (client_probe.py for the Python ones, node/probe.js, pgjdbc's
JdbcProbe from conftest.py), so that a hang is ended by a timeout and reported as a hang, with
the probe's diagnosis (client_probe.diagnose_hang). Every hang fails: the one psycopg on libpq
15 had (the end of a result left inside OpenSSL after a 16 KB record, issue 10 item 1) is gone
since the proxy sends records of at most 8 KB (test_libpq15.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from client_probe import digest
from conftest import REPO, ProbeRunner, Proxy, RevokedCert
from cryptography import x509

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"
NODE = shutil.which("node")

# About 500 KB in 500 rows, every row different, so that a lost, repeated or reordered TLS
# record changes the digest.
ROWS = 500
QUERY = f"SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, {ROWS}) AS g"
EXPECTED = digest([(g, hashlib.md5(str(g).encode()).hexdigest() * 32)
                   for g in range(1, ROWS + 1)])

CLIENT_TIMEOUT = 20  # seconds each client gives its connect and its query
PROCESS_TIMEOUT = 45  # the process as a whole (a JVM start, imports); ends a hung client

CLIENTS = ["node-postgres", "psqlodbc", "pg8000", "psycopg-libpq15", "psycopg-libpq18",
           "pgjdbc", "asyncpg"]
CASES = ["good", "revoked", "no_cert", "plaintext"]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    raw: dict[str, Any]  # what the probe printed, parsed
    shown: str = ""  # the error text the client shows its user
    sqlstate: str | None = None


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy], pki: Path, revoked_cert: RevokedCert) -> Proxy:
    return start_proxy(tls={"require_ssl": True, "clientcert": "verify-ca",
                            "ssl_ca_file": str(pki / "cacert.pem"),
                            "ssl_crl_file": str(revoked_cert.crl)},
                       args=["--log-format", "json"])


def spec_for(client: str, case: str, proxy: Proxy, pki: Path, revoked: RevokedCert,
             tmp_path: Path) -> dict[str, Any]:
    cert = key = None
    if case == "good":
        cert, key = pki / "client.crt", pki / "client.key"
    elif case == "revoked":
        cert, key = revoked.cert, revoked.key
    return {"client": client, "host": "127.0.0.1", "port": proxy.port, "user": "postgres",
            "dbname": "postgres", "application_name": f"matrix-{client}-{case}",
            "tls": case != "plaintext", "ca": str(pki / "cacert.pem"),
            "cert": str(cert) if cert else None, "key": str(key) if key else None,
            "query": QUERY if case == "good" else None, "timeout": CLIENT_TIMEOUT,
            "none_dir": str(tmp_path)}


def run_process(argv: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                              timeout=PROCESS_TIMEOUT, cwd=REPO, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what} hung: no answer in {PROCESS_TIMEOUT} s (stderr: {exc.stderr!r})")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def base_env(**extra: str) -> dict[str, str]:
    # No PG* variables (libpq, pg8000 and asyncpg read them): each connection is exactly what
    # its spec says.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSYCOPG"))}
    env.update(extra)
    return env


def python_client(spec: dict[str, Any], **env: str) -> Outcome:
    out = run_process([sys.executable, str(HERE / "client_probe.py"), json.dumps(spec)],
                      base_env(**env), spec["client"])
    return Outcome(out["ok"], out, out.get("shown", ""), out.get("sqlstate"))


def node_client(spec: dict[str, Any]) -> Outcome:
    if not NODE:
        pytest.fail("node is not on PATH (make setup installs nodejs)")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        pytest.fail(f"node-postgres is not installed in {NODE_DIR} (make setup runs npm install)")
    out = run_process([NODE, str(NODE_DIR / "probe.js"), json.dumps(spec)], base_env(),
                      "node-postgres")
    return Outcome(out["ok"], out, out.get("shown", ""), out.get("sqlstate"))


def jdbc_client(spec: dict[str, Any], run_probe: ProbeRunner) -> Outcome:
    props = {"user": spec["user"], "ApplicationName": spec["application_name"],
             # ApplicationName goes into the StartupMessage only when pgjdbc may assume a
             # server >= 9.0; the proxy's log line is found by it.
             "assumeMinServerVersion": "10",
             "connectTimeout": str(CLIENT_TIMEOUT), "socketTimeout": str(CLIENT_TIMEOUT),
             "loginTimeout": str(CLIENT_TIMEOUT)}
    if spec["tls"]:
        props |= {"sslmode": "verify-full", "sslrootcert": spec["ca"]}
        if spec["cert"]:
            # pgjdbc reads a DER PKCS-8 key: the .pk8 beside each PEM .key
            props |= {"sslcert": spec["cert"],
                      "sslkey": str(Path(spec["key"]).with_suffix(".pk8"))}
    else:
        props["sslmode"] = "disable"
    args = [f"--query={spec['query']}"] if spec["query"] else []
    url = f"jdbc:postgresql://{spec['host']}:{spec['port']}/{spec['dbname']}"
    try:
        proc = run_probe(url, *args, timeout=PROCESS_TIMEOUT, **props)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pgjdbc hung: no answer in {PROCESS_TIMEOUT} s")
    raw: dict[str, Any] = {"stdout": proc.stdout, "stderr": proc.stderr,
                           "exit": proc.returncode}
    found = re.search(r"^digest: rows=(\d+) chars=(\d+) sha256=([0-9a-f]+)$", proc.stdout, re.M)
    if proc.returncode == 0 and found:
        raw |= {"rows": int(found[1]), "chars": int(found[2]), "sha256": found[3]}
        return Outcome(True, raw)
    if proc.returncode == 0 and not spec["query"]:
        return Outcome(True, raw)
    error = re.search(r"^error: sqlstate=(\S+) message=(.*)$", proc.stdout, re.M)
    error_class = re.search(r"^error_class: (\S+)$", proc.stdout, re.M)
    assert proc.returncode == 1 and error and error_class, f"pgjdbc probe failed oddly:\n{raw}"
    raw["error_type"] = error_class[1]
    return Outcome(False, raw, error[2], error[1])


def connect(client: str, spec: dict[str, Any], run_probe: Callable[[], ProbeRunner]) -> Outcome:
    if client == "node-postgres":
        return node_client(spec)
    if client == "pgjdbc":
        return jdbc_client(spec, run_probe())
    if client == "psycopg-libpq15":
        outcome = python_client(spec | {"client": "psycopg"}, PSYCOPG_IMPL="python")
        # The python implementation loads the system's libpq5: Debian 12's is 15.
        assert outcome.raw["psycopg_impl"] == "python", outcome.raw
        assert outcome.raw["libpq"] // 10000 == 15, outcome.raw
        return outcome
    if client == "psycopg-libpq18":
        outcome = python_client(spec | {"client": "psycopg"}, PSYCOPG_IMPL="binary")
        assert outcome.raw["psycopg_impl"] == "binary", outcome.raw
        assert outcome.raw["libpq"] // 10000 == 18, outcome.raw
        return outcome
    if client == "psqlodbc":
        return python_client(spec | {"client": "pyodbc"})
    return python_client(spec)


@pytest.fixture
def lazy_probe(request: pytest.FixtureRequest) -> Callable[[], ProbeRunner]:
    # Only the pgjdbc cases compile the Java probe.
    return lambda: request.getfixturevalue("run_probe")


# The proxy's refusals, as policy.py words them (clientcert=verify-ca on the server).
NO_CERT = "connection requires a valid client certificate (the server: clientcert=verify-ca)"
SSL_REQUIRED = "SSL connection is required by the server (require_ssl is on)"


def revoked_message(pki: Path, revoked: RevokedCert) -> str:
    ca = x509.load_pem_x509_certificate((pki / "cacert.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate(revoked.cert.read_bytes())
    return (f"client certificate revoked: \"{leaf.subject.rfc4514_string()}\" serial "
            f"{revoked.serial:x} is in the CRL of \"{ca.subject.rfc4514_string()}\"")


@dataclass(frozen=True)
class Shows:
    """How a client shows the proxy's ErrorResponse (message M, reason R) to its user."""
    error_type: str
    sqlstate: str | None  # what the client reports as the SQLSTATE (None: it reports none)
    text: Callable[[str, str, int], str]  # (M, R, port) -> the text, or the part checked
    match: str  # "exact", "starts" or "contains"


def _libpq(m: str, r: str, port: int) -> str:
    # libpq prints the FATAL and, on its own lines, DETAIL (which carries the SQLSTATE libpq
    # never prints for a connection error) and HINT.
    return (f'connection to server at "127.0.0.1", port {port} failed: FATAL:  {m}\n'
            f"DETAIL:  refused by dwsproxy: SQLSTATE 28000, reason {r}\n")


SHOWS: dict[str, Shows] = {
    # pg's DatabaseError, whose name is "error": String(err) is what a Node program prints.
    "node-postgres": Shows("DatabaseError", "28000", lambda m, r, p: f"error: {m}", "exact"),
    # psqlODBC reports every failed connect as 08001 (SQLDriverConnect), with libpq's text.
    "psqlodbc": Shows("pyodbc.OperationalError", "08001",
                      lambda m, r, p: "[08001] " + _libpq(m, r, p), "starts"),
    # pg8000 raises the ErrorResponse's fields as a dict: that is its text.
    "pg8000": Shows("pg8000.exceptions.DatabaseError", "28000",
                    lambda m, r, p: f"{{'S': 'FATAL', 'V': 'FATAL', 'C': '28000', 'M': {m!r}, "
                                    f"'D': 'refused by dwsproxy: SQLSTATE 28000, reason {r}', ",
                    "starts"),
    # psycopg has no SQLSTATE for a connection that failed before a session existed.
    "psycopg-libpq15": Shows("psycopg.OperationalError", None,
                             lambda m, r, p: "connection failed: " + _libpq(m, r, p), "starts"),
    "psycopg-libpq18": Shows("psycopg.OperationalError", None,
                             lambda m, r, p: "connection failed: " + _libpq(m, r, p), "starts"),
    "pgjdbc": Shows("org.postgresql.util.PSQLException", "28000",
                    lambda m, r, p: f"FATAL: {m}", "exact"),
    # asyncpg maps 28000 to its own exception class; str() is the message, then DETAIL, HINT.
    "asyncpg": Shows("asyncpg.exceptions.InvalidAuthorizationSpecificationError", "28000",
                     lambda m, r, p: f"{m}\nDETAIL:  refused by dwsproxy: SQLSTATE 28000, "
                                     f"reason {r}\nHINT:  ", "starts"),
}

REFUSALS = {"revoked": "client_cert_revoked", "no_cert": "client_cert_missing",
            "plaintext": "ssl_required"}


def session_lines(proxy: Proxy, application_name: str) -> list[dict[str, Any]]:
    """The proxy's end-of-connection log lines (JSON) of connections with that name."""
    lines = []
    for text in proxy.log().splitlines():
        if application_name in text and text.startswith("{"):
            doc = json.loads(text)
            if doc.get("msg") == "connection closed" and \
                    doc.get("application_name") == application_name:
                lines.append(doc)
    return lines


def wait_session_line(proxy: Proxy, application_name: str, timeout: float = 10.0
                      ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = session_lines(proxy, application_name)
        if lines:
            assert len(lines) == 1, f"the client connected more than once: {lines}"
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line for {application_name}:\n{proxy.log()[-3000:]}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("client", CLIENTS)
def test_client(client: str, case: str, proxy: Proxy, pki: Path, revoked_cert: RevokedCert,
                tmp_path: Path, lazy_probe: Callable[[], ProbeRunner]) -> None:
    spec = spec_for(client, case, proxy, pki, revoked_cert, tmp_path)
    reason = REFUSALS.get(case)
    before = proxy.metric("dwsproxy_connections_rejected_total", reason=reason) if reason else 0
    outcome = connect(client, spec, lazy_probe)
    line = wait_session_line(proxy, spec["application_name"])
    if outcome.raw.get("hung"):
        pytest.fail(f"{client} hung in its {outcome.raw['hung']} after {CLIENT_TIMEOUT} s: "
                    f"{outcome.raw}")
    if case == "good":
        assert outcome.ok, f"{client} was refused: {outcome.raw}"
        got = {k: outcome.raw[k] for k in ("rows", "chars", "sha256")}
        assert got == EXPECTED, f"{client} received other rows than were sent: {outcome.raw}"
        assert line["outcome"] == "ok", line
        assert line["encryption"] == "tls" and line["client_cert"] == "CN=postgres,O=dwsproxy", \
            line
        assert line["bytes_out"] > EXPECTED["chars"], line  # the rows went through the proxy
        return
    assert reason is not None
    message = {"revoked": revoked_message(pki, revoked_cert), "no_cert": NO_CERT,
               "plaintext": SSL_REQUIRED}[case]
    assert not outcome.ok, f"{client} connected in case {case}: {outcome.raw}"
    shows = SHOWS[client]
    expected = shows.text(message, reason, proxy.port)
    said = f"{client} shows {outcome.shown!r}; expected ({shows.match}) {expected!r}"
    if shows.match == "exact":
        assert outcome.shown == expected, said
    elif shows.match == "starts":
        assert outcome.shown.startswith(expected), said
    else:
        assert expected in outcome.shown, said
    assert outcome.sqlstate == shows.sqlstate, outcome.raw
    assert outcome.raw["error_type"] == shows.error_type, outcome.raw
    # The refusal is the proxy's, after the start-up packet, counted once (no client retried).
    assert line["outcome"] == reason and line["detail"] == message, line
    assert line["encryption"] == ("plain" if case == "plaintext" else "tls"), line
    assert line["client_cert"] == ("CN=postgres,O=dwsproxy" if case == "revoked" else ""), line
    proxy.wait_metric("dwsproxy_connections_rejected_total", before + 1, reason=reason)
