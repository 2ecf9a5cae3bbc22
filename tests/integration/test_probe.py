"""`dwsproxy probe` against real servers, with the real psql as the reference for every cell, and
`dwsproxy certs bundle` unzipped and used by psql as its README says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Proxy, clean_env, run_psql
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.tls import gausskey
from proxy.tools import certs
from proxy.tools.demo import SSLMODES, TempPostgres, free_port, wait_port

PG_HBA = """local all all trust
hostssl all carol,dora,erin 127.0.0.1/32 scram-sha-256
hostssl all all 127.0.0.1/32 trust
hostnossl all all 127.0.0.1/32 reject
"""


NON_ASCII_PASSWORD = "s\u00e9same\u00a0ouvre-toi \u2168\u00ad"
PGPASS_PASSWORD = "pa:ss\\wd*"


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None)


def run_probe(conninfo: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "probe", conninfo, *args],
                          capture_output=True, text=True, env=env or clean_env(), cwd=REPO,
                          timeout=60)


def probe_json(conninfo: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = run_probe(conninfo, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def psql_result(conninfo: str, sslmode: str, env: dict[str, str] | None = None
                ) -> tuple[str, str]:
    proc = run_psql(f"{conninfo} sslmode={sslmode}", env=env)
    if proc.returncode != 0:
        return "refused", proc.stderr.strip()
    return ("tls" if "SSL connection (protocol:" in proc.stdout else "plaintext"), proc.stdout


def conninfo_for(port: int, pki: Path) -> str:
    # the probe's and psql's tries share one generous timeout: two cores shared with others
    return (f"host=localhost port={port} user=postgres dbname=postgres "
            f"sslrootcert={pki / 'cacert.pem'} connect_timeout=10")


@pytest.fixture(scope="module")
def tls_postgres(pki: Path) -> Iterator[TempPostgres]:
    files = {"server.crt": (pki / "server.crt").read_bytes(),
             "server.key": (pki / "server.key").read_bytes()}
    server = TempPostgres(hba=PG_HBA, files=files, extra_conf=(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"))
    server.start()
    server.sql("CREATE ROLE carol LOGIN PASSWORD 'sesame'")
    # SASLprep (RFC 4013) maps these: U+00A0 to a space, U+2168 to "IX", U+00AD to nothing;
    # the server stores the verifier of the prepared password, libpq prepares what it sends
    server.sql(f"CREATE ROLE dora LOGIN PASSWORD '{NON_ASCII_PASSWORD}'")
    server.sql(f"CREATE ROLE erin LOGIN PASSWORD '{PGPASS_PASSWORD}'")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pgbouncer(pg: TempPostgres, pki: Path) -> Iterator[int]:
    binary = pgbouncer_binary()
    if binary is None:
        pytest.fail("pgbouncer not installed (.ci/system-deps installs it)")
    folder = Path(tempfile.mkdtemp(prefix="dwsproxy-pgb-"))
    os.chmod(folder, 0o755)
    port = free_port()
    for name in ("server.crt", "server.key"):
        shutil.copy(pki / name, folder / name)
    (folder / "userlist.txt").write_text('"postgres" ""\n')
    (folder / "pgbouncer.ini").write_text(f"""[databases]
* = host=127.0.0.1 port={pg.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder / 'userlist.txt'}
pool_mode = session
ignore_startup_parameters = extra_float_digits,options
client_tls_sslmode = require
client_tls_cert_file = {folder / 'server.crt'}
client_tls_key_file = {folder / 'server.key'}
server_tls_sslmode = disable
logfile = {folder / 'pgbouncer.log'}
""")
    user = None
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        user = "postgres"
        for path in [folder, *folder.iterdir()]:
            shutil.chown(path, "postgres", "postgres")
    proc = subprocess.Popen([binary, str(folder / "pgbouncer.ini")], user=user, group=user,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 15)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def servers(start_proxy: Callable[..., Proxy], tls_postgres: TempPostgres, pgbouncer: int,
            pki: Path) -> dict[str, tuple[int, str, str]]:
    """name -> (port, expected ssl, expected require_ssl)."""
    on = start_proxy(tls={"ssl": True, "require_ssl": True})
    off = start_proxy(tls={"ssl": False, "require_ssl": False})
    return {"proxy-require_ssl": (on.port, "on", "on"),
            "proxy-ssl-off": (off.port, "off", "off"),
            "postgresql-hostnossl-reject": (tls_postgres.port, "on", "on"),
            "pgbouncer-require": (pgbouncer, "on", "on")}


@pytest.mark.parametrize("name", ["proxy-require_ssl", "proxy-ssl-off",
                                  "postgresql-hostnossl-reject", "pgbouncer-require"])
def test_every_cell_is_what_psql_gets(servers: dict[str, tuple[int, str, str]], pki: Path,
                                      name: str) -> None:
    port, want_ssl, want_require = servers[name]
    conninfo = conninfo_for(port, pki)
    with ThreadPoolExecutor(len(SSLMODES) + 1) as pool:
        report_f = pool.submit(probe_json, conninfo)
        psql = dict(zip(SSLMODES, pool.map(lambda m: psql_result(conninfo, m), SSLMODES),
                        strict=True))
        report = report_f.result()
    assert [c["sslmode"] for c in report["cells"]] == list(SSLMODES)
    for cell in report["cells"]:
        assert cell["result"] == psql[cell["sslmode"]][0], (name, cell, psql[cell["sslmode"]])
    assert report["ssl"] == want_ssl
    assert report["require_ssl"] == want_require
    if want_require == "on":
        assert report["cells"][0]["detail"], "a refusal carries the server's text"
        assert "plaintext accepted" not in " ".join(report["findings"])


@pytest.mark.parametrize(("password", "want"), [
    ("sesame", ["refused"] + ["tls"] * 5), ("wrong", ["refused"] * 6)])
def test_scram_authentication_as_psql(tls_postgres: TempPostgres, pki: Path, password: str,
                                      want: list[str]) -> None:
    conninfo = conninfo_for(tls_postgres.port, pki).replace("user=postgres", "user=carol")
    env = clean_env(PGPASSWORD=password)
    report = probe_json(conninfo, env=env)
    psql = [psql_result(conninfo, mode, env)[0] for mode in SSLMODES]
    assert [c["result"] for c in report["cells"]] == psql == want
    if password == "wrong":
        assert "password authentication failed for user \"carol\"" in report["cells"][3]["detail"]
    else:
        assert report["cells"][3]["detail"] == "connected"


def test_password_from_pgpass_and_none_at_all(tls_postgres: TempPostgres, pki: Path,
                                              tmp_path: Path) -> None:
    conninfo = conninfo_for(tls_postgres.port, pki).replace("user=postgres", "user=carol")
    report = probe_json(conninfo, env=clean_env(HOME=str(tmp_path)))
    # no password: reaching the authentication request is what a probe can know
    assert report["cells"][3] == {"sslmode": "require", "result": "tls",
                                  "detail": "authentication request reached (SASL; no "
                                            "password given)"}
    pgpass = tmp_path / ".pgpass"
    pgpass.write_text(f"localhost:{tls_postgres.port}:*:carol:sesame\n")
    pgpass.chmod(0o600)
    report = probe_json(conninfo, env=clean_env(HOME=str(tmp_path)))
    assert report["cells"][3]["detail"] == "connected"
    pgpass.write_text(f"localhost:{tls_postgres.port}:*:carol:wrong\n")
    report = probe_json(conninfo, env=clean_env(HOME=str(tmp_path)))
    assert "password authentication failed" in report["cells"][3]["detail"]


def test_table_output_is_aligned(servers: dict[str, tuple[int, str, str]], pki: Path) -> None:
    proc = run_probe(conninfo_for(servers["proxy-require_ssl"][0], pki))
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.split(" ", 1)[0] in SSLMODES]
    assert [r.split()[0] for r in rows] == list(SSLMODES)
    assert len({r.index(r.split()[1]) for r in rows}) == 1, rows  # one column for results
    assert "Inferred policy: ssl = on, require_ssl = on" in proc.stdout


def test_tls_facts_of_a_sound_proxy(servers: dict[str, tuple[int, str, str]], pki: Path) -> None:
    report = probe_json(conninfo_for(servers["proxy-require_ssl"][0], pki))
    assert report["tls_versions"] == {"TLSv1": False, "TLSv1.1": False, "TLSv1.2": True,
                                      "TLSv1.3": True}
    assert report["tls12_ciphers"] and all("GCM" in c or "CHACHA20" in c
                                           for c in report["tls12_ciphers"])
    cert = report["certificate"]
    assert cert["chain_verified"] and cert["hostname_ok"]
    assert "CN=localhost" in cert["subject"]
    assert 820 <= cert["days_left"] <= 825
    assert report["client_cert"] == "none"
    assert report["direct_ssl"] is True
    assert report["findings"] == []


def test_cbc_suite_and_expiring_certificate_are_findings(
        start_proxy: Callable[..., Proxy], tmp_path: Path, pki: Path) -> None:
    ca = certs.load_ca(pki)
    cert, key = certs.issue(ca, "localhost", server=True, days=10)
    certs.write_certs(tmp_path / "short.crt", cert)
    certs.write_key(tmp_path / "short.key", key)
    proxy = start_proxy(tls={"ssl_ciphers": "ECDHE-ECDSA-AES128-SHA256",
                             "ssl_cert_file": str(tmp_path / "short.crt"),
                             "ssl_key_file": str(tmp_path / "short.key")})
    report = probe_json(conninfo_for(proxy.port, pki))
    assert report["tls12_ciphers"] == ["ECDHE-ECDSA-AES128-SHA256"]
    assert report["certificate"]["days_left"] in (9, 10)
    findings = " | ".join(report["findings"])
    assert "CBC suites accepted: ECDHE-ECDSA-AES128-SHA256" in findings
    assert f"certificate expires in {report['certificate']['days_left']} days" in findings


def test_untrusted_root_is_a_finding(servers: dict[str, tuple[int, str, str]], pki: Path,
                                     tmp_path: Path) -> None:
    other = tmp_path / "other"
    certs.init(other)
    conninfo = (f"host=127.0.0.1 port={servers['proxy-require_ssl'][0]} user=postgres "
                f"dbname=postgres sslrootcert={other / 'cacert.pem'} connect_timeout=10")
    report = probe_json(conninfo)
    # libpq verifies the chain in allow/prefer/require too once a root certificate file is there
    assert [c["result"] for c in report["cells"]] == [psql_result(conninfo, m)[0]
                                                      for m in SSLMODES]
    assert report["certificate"]["chain_verified"] is False
    assert report["certificate"]["hostname_ok"] is True  # the certificate has an IP SAN
    assert [c["result"] for c in report["cells"][3:]] == ["refused"] * 3
    assert "certificate chain not verified against sslrootcert" in report["findings"]


@pytest.mark.parametrize(("clientcert", "want"), [
    ("none", "none"), ("optional", "optional"), ("verify-ca", "required")])
def test_client_cert(start_proxy: Callable[..., Proxy], pki: Path, clientcert: str,
                     want: str) -> None:
    tls = {"clientcert": clientcert}
    if clientcert != "none":
        tls["ssl_ca_file"] = str(pki / "cacert.pem")
    proxy = start_proxy(tls=tls)
    report = probe_json(conninfo_for(proxy.port, pki))
    assert report["client_cert"] == want
    if want == "required":
        assert all(c["result"] == "refused" for c in report["cells"])
        with_cert = probe_json(f"{conninfo_for(proxy.port, pki)} "
                               f"sslcert={pki / 'client.crt'} sslkey={pki / 'client.key'}")
        assert [c["result"] for c in with_cert["cells"][1:]] == ["tls"] * 5


def test_expect_exit_codes(servers: dict[str, tuple[int, str, str]], pki: Path) -> None:
    conninfo = conninfo_for(servers["proxy-require_ssl"][0], pki)
    ok = run_probe(conninfo, "--expect", "ssl=on", "--expect", "require_ssl=on",
                   "--expect", "client_cert=none", "--expect", "min_tls=TLSv1.2")
    assert ok.returncode == 0, ok.stderr
    drift = run_probe(conninfo, "--json", "--expect", "require_ssl=off", "--expect",
                      "min_tls=1.3")
    assert drift.returncode == 1
    assert drift.stderr.splitlines() == ["probe: expected require_ssl=off, got require_ssl=on",
                                         "probe: expected min_tls=TLSv1.3, got min_tls=TLSv1.2"]
    json.loads(drift.stdout)  # the report is still printed


def test_closed_port_exits_2_with_one_line() -> None:
    port = free_port()
    proc = run_probe(f"host=127.0.0.1 port={port} user=postgres")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"probe: cannot reach 127.0.0.1:{port}: [Errno 111] Connection refused"]


def _unzip(bundle: Path, into: Path) -> None:
    unzip = shutil.which("unzip")
    if unzip is None:
        pytest.fail("unzip not installed (.ci/system-deps installs it)")
    subprocess.run([unzip, "-q", str(bundle), "-d", str(into)], check=True)


def _export_env(readme: str, folder: Path) -> dict[str, str]:
    env = clean_env()
    for name, value in re.findall(r'^\s*export (PGSSL\w+)="([^"]*)"', readme, re.M):
        env[name] = value.replace("$PWD", str(folder))
    return env


def test_bundle_is_what_psql_uses(start_proxy: Callable[..., Proxy], pki: Path,
                                  tmp_path: Path) -> None:
    out = tmp_path / "bundle.zip"
    made = subprocess.run([sys.executable, "-m", "proxy", "certs", "bundle", str(pki), "--cn",
                           "postgres", "--out", str(out)], capture_output=True, text=True,
                          cwd=REPO)
    assert made.returncode == 0, made.stdout + made.stderr
    _unzip(out, tmp_path / "u")
    folder = tmp_path / "u"
    assert sorted(p.name for p in (folder / "sslcert").iterdir()) == [
        "cacert.pem", "client.crt", "client.key", "client.key.pk8"]
    assert (folder / "sslcert" / "client.key").stat().st_mode & 0o777 == 0o600
    env = _export_env((folder / "README.txt").read_text(), folder)
    assert set(env) >= {"PGSSLCERT", "PGSSLKEY", "PGSSLMODE", "PGSSLROOTCERT"}
    assert env["PGSSLMODE"] == "verify-ca"
    proxy = start_proxy(tls={"clientcert": "verify-ca", "ssl_ca_file": str(pki / "cacert.pem"),
                             "require_ssl": True})
    conninfo = f"host=localhost port={proxy.port} user=postgres dbname=postgres"
    through = run_psql(conninfo, env=env)
    assert through.returncode == 0 and "SSL connection" in through.stdout, through.stderr
    without = {k: v for k, v in env.items() if k not in ("PGSSLCERT", "PGSSLKEY")}
    refused = run_psql(conninfo, env=without)
    assert refused.returncode != 0  # the bundle's certificate is what let psql in
    key = serialization.load_der_private_key((folder / "sslcert" / "client.key.pk8")
                                             .read_bytes(), None)
    cert = x509.load_pem_x509_certificate((folder / "sslcert" / "client.crt").read_bytes())
    assert key.public_key() == cert.public_key()


def test_encrypted_bundle_round_trips_through_the_pair(pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "enc.zip"
    subprocess.run([sys.executable, "-m", "proxy", "certs", "bundle", str(pki), "--cn", "alice",
                    "--out", str(out), "--encrypt"], check=True, capture_output=True, cwd=REPO)
    _unzip(out, tmp_path)
    ssl_dir = tmp_path / "sslcert"
    for name in ("client.key", "client.key.pk8", "client.key.cipher", "client.key.rand"):
        assert (ssl_dir / name).stat().st_mode & 0o777 == 0o600, name
    pem = (ssl_dir / "client.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(pem, None)
    passphrase = gausskey.decode((ssl_dir / "client.key.cipher").read_bytes(),
                                 (ssl_dir / "client.key.rand").read_bytes())
    key = serialization.load_pem_private_key(pem, passphrase)
    pk8 = serialization.load_der_private_key((ssl_dir / "client.key.pk8").read_bytes(),
                                             passphrase)
    cert = x509.load_pem_x509_certificate((ssl_dir / "client.crt").read_bytes())
    assert key.public_key() == cert.public_key() == pk8.public_key()
    assert "CN=alice" in cert.subject.rfc4514_string()
    assert "encrypted" in (tmp_path / "README.txt").read_text()


# -- third round: libpq's connection rules, SASLprep, verify-full on IP hosts, a quiet probe ----

def cells_of(report: dict[str, Any]) -> list[str]:
    return [c["result"] for c in report["cells"]]


def psql_cells(conninfo: str, env: dict[str, str] | None = None) -> list[str]:
    return [psql_result(conninfo, mode, env)[0] for mode in SSLMODES]


@pytest.mark.parametrize("binding", ["prefer", "require", "disable"])
def test_non_ascii_password_goes_through_saslprep_as_psql(tls_postgres: TempPostgres,
                                                          pki: Path, binding: str) -> None:
    conninfo = (conninfo_for(tls_postgres.port, pki).replace("user=postgres", "user=dora")
                + f" channel_binding={binding}")
    env = clean_env(PGPASSWORD=NON_ASCII_PASSWORD)
    report = probe_json(conninfo, env=env)
    assert cells_of(report) == psql_cells(conninfo, env) == ["refused"] + ["tls"] * 5
    assert report["cells"][3]["detail"] == "connected"
    # the password as typed, not prepared, is what a client without SASLprep would send
    wrong = clean_env(PGPASSWORD=NON_ASCII_PASSWORD.replace("\u2168", "IX!"))
    assert cells_of(probe_json(conninfo, env=wrong)) == ["refused"] * 6


def test_channel_binding_require_without_tls_as_psql(pg: TempPostgres) -> None:
    """PGCHANNELBINDING is one of the PG* variables libpq reads: with trust and no TLS, psql
    refuses every sslmode ("channel binding required, but server authenticated client
    without channel binding")."""
    conninfo = f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres"
    env = clean_env(PGCHANNELBINDING="require")
    report = probe_json(conninfo, env=env)
    assert cells_of(report) == psql_cells(conninfo, env) == ["refused"] * 6
    assert "channel binding required" in report["cells"][0]["detail"]


def test_pgpass_escapes_as_psql(tls_postgres: TempPostgres, pki: Path, tmp_path: Path) -> None:
    conninfo = conninfo_for(tls_postgres.port, pki).replace("user=postgres", "user=erin")
    escaped = PGPASS_PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"# a comment\nlocalhost:{tls_postgres.port}:postgres:carol:no\n"
                        # libpq ends the password at an unescaped ':'
                        f"*:{tls_postgres.port}:*:erin:{escaped}:not-the-password\n")
    passfile.chmod(0o600)
    env = clean_env(HOME=str(tmp_path), PGPASSFILE=str(passfile))
    report = probe_json(conninfo, env=env)
    assert cells_of(report) == psql_cells(conninfo, env) == ["refused"] + ["tls"] * 5
    assert report["cells"][3]["detail"] == "connected"
    passfile.chmod(0o644)  # libpq ignores a file others can read: no password at all then
    report = probe_json(conninfo, env=env)
    assert report["cells"][3]["detail"].endswith("no password given)")
    assert psql_result(conninfo, "require", env)[0] == "refused"


@pytest.mark.parametrize("how", ["service=", "PGSERVICE", "PGSYSCONFDIR"])
def test_service_file_reaches_the_server_psql_reaches(pg: TempPostgres, tmp_path: Path,
                                                      how: str) -> None:
    text = (f"[probe_svc]\nhost=127.0.0.1\nport={pg.port}\nuser=postgres\n"
            "dbname=postgres\n")
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home))
    if how == "PGSYSCONFDIR":
        (tmp_path / "pg_service.conf").write_text(text)
        env["PGSYSCONFDIR"] = str(tmp_path)
    else:
        (tmp_path / "services").write_text(text)
        env["PGSERVICEFILE"] = str(tmp_path / "services")
    conninfo = "service=probe_svc"
    if how != "service=":
        env["PGSERVICE"] = "probe_svc"
        conninfo = ""
    report = probe_json(conninfo, env=env)
    assert report["server"] == f"127.0.0.1:{pg.port}"
    assert cells_of(report) == psql_cells(conninfo, env) == ["plaintext"] * 3 + ["refused"] * 3


def test_unknown_service_and_unknown_key_are_refused_as_psql(pg: TempPostgres,
                                                            tmp_path: Path) -> None:
    (tmp_path / "services").write_text("[other]\nhost=127.0.0.1\n")
    env = clean_env(HOME=str(tmp_path), PGSERVICEFILE=str(tmp_path / "services"))
    for conninfo, message in [
            (f"hots=127.0.0.1 port={pg.port} user=postgres", 'invalid connection option "hots"'),
            ("service=mydb", 'definition of service "mydb" not found')]:
        proc = run_probe(conninfo, env=env)
        assert proc.returncode == 2, (conninfo, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        assert proc.stderr.splitlines() == [f"probe: {message}"]
        assert message in run_psql(conninfo, env=env).stderr


def test_pg_variables_fill_what_conninfo_leaves_out(pg: TempPostgres) -> None:
    env = clean_env(PGHOST="127.0.0.1", PGPORT=str(pg.port), PGUSER="alice",
                    PGDATABASE="app", PGCONNECT_TIMEOUT="7")
    report = probe_json("", env=env)
    assert report["server"] == f"127.0.0.1:{pg.port}"
    assert cells_of(report) == psql_cells("", env)
    # psql's bare word is a database name
    assert cells_of(probe_json("app", env=env)) == cells_of(report)


def test_no_host_is_the_unix_socket_not_localhost() -> None:
    proc = run_probe("user=postgres dbname=postgres")
    assert proc.returncode == 2
    assert proc.stderr.startswith("probe: host '(none: the Unix-domain socket)' is a "
                                  "Unix-domain socket"), proc.stderr


def test_every_host_of_a_list_is_probed(servers: dict[str, tuple[int, str, str]],
                                        pg: TempPostgres, pki: Path) -> None:
    on = servers["proxy-require_ssl"][0]
    conninfo = (f"host=localhost,127.0.0.1 port={on},{pg.port} user=postgres dbname=postgres "
                f"sslrootcert={pki / 'cacert.pem'} connect_timeout=10")
    proc = run_probe(conninfo, "--json", "--expect", "require_ssl=on")
    assert proc.returncode == 1, proc.stderr  # the second host has no TLS at all
    assert proc.stderr.splitlines() == [
        f"probe: 127.0.0.1:{pg.port}: expected require_ssl=on, got require_ssl=off"]
    reports = json.loads(proc.stdout)["servers"]
    assert [r["server"] for r in reports] == [f"localhost:{on}", f"127.0.0.1:{pg.port}"]
    assert cells_of(reports[0]) == psql_cells(conninfo_for(on, pki))
    assert cells_of(reports[1]) == psql_cells(
        f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres "
        f"sslrootcert={pki / 'cacert.pem'}")


def _leaf(pki: Path, folder: Path, name: str, cn: str, sans: list[x509.GeneralName]
          ) -> tuple[Path, Path]:
    """A server certificate from the test CA with exactly these SANs (certs.issue would add
    localhost/127.0.0.1/::1)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = certs.load_ca(pki)
    key = certs.new_key()
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    certs.write_certs(folder / f"{name}.crt", cert)
    certs.write_key(folder / f"{name}.key", key)
    return folder / f"{name}.crt", folder / f"{name}.key"


def _ip(text: str) -> x509.GeneralName:
    import ipaddress

    return x509.IPAddress(ipaddress.ip_address(text))


# name -> (CN, SANs); libpq 14+ checks an IP host against iPAddress SANs, a name against
# dNSName SANs, each as a plain string too, and the CN only when no SAN of the host's kind
VERIFY_FULL_CERTS: dict[str, tuple[str, list[x509.GeneralName]]] = {
    "dns-localhost": ("localhost", [x509.DNSName("localhost")]),
    "ip-only": ("db.invalid", [_ip("127.0.0.1")]),
    "cn-ip-no-san": ("127.0.0.1", []),
    "dns-holding-the-ip": ("db.invalid", [x509.DNSName("127.0.0.1")]),
    "other-ip-and-cn": ("127.0.0.1", [_ip("127.0.0.2")]),
    "other-ip-and-dns-localhost": ("db.invalid", [_ip("127.0.0.2"), x509.DNSName("localhost")]),
}


@pytest.mark.parametrize("name", sorted(VERIFY_FULL_CERTS))
def test_verify_full_names_and_ip_addresses_as_psql(start_proxy: Callable[..., Proxy],
                                                    pki: Path, tmp_path: Path,
                                                    name: str) -> None:
    cn, sans = VERIFY_FULL_CERTS[name]
    crt, key = _leaf(pki, tmp_path, name, cn, sans)
    proxy = start_proxy(tls={"ssl_cert_file": str(crt), "ssl_key_file": str(key)})
    seen = {}
    for host in ("127.0.0.1", "localhost"):
        conninfo = (f"host={host} port={proxy.port} user=postgres dbname=postgres "
                    f"sslrootcert={pki / 'cacert.pem'} connect_timeout=10")
        report = probe_json(conninfo)
        cells = cells_of(report)
        assert cells == psql_cells(conninfo), (name, host, report["cells"])
        seen[host] = cells[-1]
    # every certificate here makes one of the two hosts fail verify-full, or both pass
    assert set(seen.values()) <= {"tls", "refused"}


def test_application_name_in_a_real_server_log(tls_postgres: TempPostgres, pki: Path) -> None:
    """Every session the probe opens names itself, as PostgreSQL's log_connections shows."""
    import time

    tls_postgres.sql("ALTER SYSTEM SET log_connections = on")
    tls_postgres.sql("SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 10
        while tls_postgres.sql("SHOW log_connections") != "on":  # the reload has landed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        offset = tls_postgres.log_path.stat().st_size
        probe_json(conninfo_for(tls_postgres.port, pki))
        with tls_postgres.log_path.open("rb") as f:
            f.seek(offset)
            log = f.read().decode(errors="replace")
    finally:
        tls_postgres.sql("ALTER SYSTEM RESET log_connections")
        tls_postgres.sql("SELECT pg_reload_conf()")
    authorized = [ln for ln in log.splitlines() if "connection authorized:" in ln]
    assert len(authorized) >= 5, log[-2000:]  # allow..verify-full, versions, client_cert
    assert all("application_name=dwsproxy-probe" in ln for ln in authorized), authorized


def _rejections(proxy: Proxy) -> float:
    return sum(v for (name, _), v in proxy.metrics().items()
               if name == "dwsproxy_connections_rejected_total")


def _settled(proxy: Proxy) -> None:
    """Every session of the probe has ended (its outcome is counted when it ends)."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        active = sum(v for (name, _), v in proxy.metrics().items()
                     if name == "dwsproxy_active_connections")
        if active == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the proxy still has sessions open")


def test_an_expect_probe_is_quiet_on_the_proxy(start_proxy: Callable[..., Proxy], pki: Path,
                                               tmp_path: Path) -> None:
    """Counts what one cron probe (all four --expect keys) costs a require_ssl proxy, and runs
    the promtool case of tests/unit/test_probe_alert.py with that count."""
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    import test_probe_alert as alert

    proxy = start_proxy(tls={"ssl": True, "require_ssl": True})
    conninfo = conninfo_for(proxy.port, pki)
    _settled(proxy)
    before = _rejections(proxy)
    proc = run_probe(conninfo, "--expect", "ssl=on", "--expect", "require_ssl=on",
                     "--expect", "client_cert=none", "--expect", "min_tls=TLSv1.2")
    assert proc.returncode == 0, proc.stderr
    _settled(proxy)
    caused = int(_rejections(proxy) - before)
    # disable and allow's first try (ssl_required), the TLS 1.0 and 1.1 tries (tls_version)
    assert caused == alert.PROBE_EXPECT_REJECTIONS, caused
    result = alert.run_promtool(alert.promtool_case(caused, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    # --full still enumerates the suites (and says so in the proxy's counters)
    before = _rejections(proxy)
    assert run_probe(conninfo, "--full", "--expect", "ssl=on").returncode == 0
    _settled(proxy)
    assert _rejections(proxy) - before > 20
