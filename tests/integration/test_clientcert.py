"""Two-way authentication: client certificates against the CA and CRLs (fail closed),
intermediate CAs, verify-full, optional; [[rules]]; an encrypted server key."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Proxy, clean_env, run_psql

from proxy.tools import certs


class Pki:
    """Root CA -> server cert; root -> client certs; root -> intermediate -> client certs;
    another CA for a foreign client."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.root = certs.make_ca("Test Root CA")
        self.inter = certs.make_ca("Test Intermediate CA", parent=self.root)
        self.other = certs.make_ca("Other CA")
        certs.write_certs(folder / "root.pem", self.root[0])
        server = certs.issue(self.root, "localhost", server=True)
        certs.write_certs(folder / "server.crt", server[0])
        certs.write_key(folder / "server.key", server[1])
        self.revoked_serials: list[int] = []
        self.inter_revoked: list[int] = []
        self.client("good", "postgres")
        self.client("alice", "alice")
        self.client("revoked", "postgres", revoke=True)
        now = dt.datetime.now(dt.UTC)
        self.client("expired", "postgres", not_before=now - dt.timedelta(days=30),
                    not_after=now - dt.timedelta(days=1))
        self.client("future", "postgres", not_before=now + dt.timedelta(days=1),
                    not_after=now + dt.timedelta(days=30))
        self.client("foreign", "postgres", ca=self.other)
        self.client("chained", "postgres", ca=self.inter)
        self.client("chained_revoked", "postgres", ca=self.inter, revoke=True)
        root_crl = certs.make_crl(self.root, self.revoked_serials)
        inter_crl = certs.make_crl(self.inter, self.inter_revoked)
        certs.write_crl(folder / "root.crl", root_crl)
        certs.write_crl(folder / "inter.crl", inter_crl)
        (folder / "both.crl").write_bytes((folder / "root.crl").read_bytes()
                                          + (folder / "inter.crl").read_bytes())

    def client(self, name: str, cn: str, *, ca: tuple | None = None, revoke: bool = False,
               **validity: dt.datetime) -> None:
        ca = ca or self.root
        cert, key = certs.issue(ca, cn, **validity)
        chain = [cert] + ([self.inter[0]] if ca is self.inter else [])
        certs.write_certs(self.dir / f"{name}.crt", *chain)  # leaf + intermediate
        certs.write_key(self.dir / f"{name}.key", key)
        if revoke:
            (self.inter_revoked if ca is self.inter else self.revoked_serials).append(
                cert.serial_number)

    def tls(self, **extra: object) -> dict[str, object]:
        return {"ssl_cert_file": str(self.dir / "server.crt"),
                "ssl_key_file": str(self.dir / "server.key"),
                "ssl_ca_file": str(self.dir / "root.pem"), "require_ssl": True, **extra}


@pytest.fixture(scope="module")
def pki2() -> Iterator[Pki]:
    folder = Path(tempfile.mkdtemp(prefix="dwsproxy-pki2-"))
    yield Pki(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def verify_ca(start_proxy: Callable[..., Proxy], pki2: Pki) -> Proxy:
    return start_proxy(tls=pki2.tls(clientcert="verify-ca",
                                    ssl_crl_file=str(pki2.dir / "both.crl")))


def conninfo(proxy: Proxy, pki2: Pki, cert: str | None, user: str = "postgres") -> str:
    info = (f"host=localhost port={proxy.port} user={user} dbname=postgres sslmode=verify-full "
            f"sslrootcert={pki2.dir / 'root.pem'} connect_timeout=10")
    if cert is None:
        # Point libpq away from ~/.postgresql/postgresql.crt so that it really sends none.
        return info + f" sslcert={pki2.dir / 'none.crt'} sslkey={pki2.dir / 'none.key'}"
    return info + f" sslcert={pki2.dir / (cert + '.crt')} sslkey={pki2.dir / (cert + '.key')}"


def psql(proxy: Proxy, pki2: Pki, cert: str | None, user: str = "postgres",
         **env: str) -> subprocess.CompletedProcess[str]:
    return run_psql(conninfo(proxy, pki2, cert, user), "SELECT current_user",
                    env=clean_env(**env))


def psycopg_error(proxy: Proxy, pki2: Pki, cert: str | None, user: str = "postgres") -> str:
    import psycopg

    try:
        with psycopg.connect(conninfo(proxy, pki2, cert, user)) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        return str(exc)
    return ""


def test_good_certificate_connects(verify_ca: Proxy, pki2: Pki) -> None:
    proc = psql(verify_ca, pki2, "good")
    assert proc.returncode == 0 and proc.stdout.strip() == "postgres", proc.stderr
    assert psycopg_error(verify_ca, pki2, "good") == ""
    assert verify_ca.metric("dwsproxy_connections_total", encryption="tls",
                            tls_version="TLSv1.3", client_cert="verified",
                            backend_encryption="plain") >= 2
    assert 'client_cert="CN=postgres,O=dwsproxy"' in verify_ca.log()


@pytest.mark.parametrize("cert,reason,client_says,log_says", [
    (None, "client_cert_missing", "connection requires a valid client certificate",
     "connection requires a valid client certificate"),
    ("revoked", "client_cert_revoked", "certificate revoked", "client certificate revoked"),
    ("expired", "client_cert_invalid", "certificate expired", "certificate has expired"),
    ("future", "client_cert_invalid", "bad certificate", "certificate is not yet valid"),
    ("foreign", "client_cert_invalid", "unknown ca", "unable to get local issuer certificate"),
    ("chained_revoked", "client_cert_revoked", "certificate revoked",
     "client certificate revoked"),
])
def test_bad_certificates_refused(verify_ca: Proxy, pki2: Pki, cert: str | None, reason: str,
                                  client_says: str, log_says: str) -> None:
    before = verify_ca.metric("dwsproxy_connections_rejected_total", reason=reason)
    proc = psql(verify_ca, pki2, cert)
    assert proc.returncode != 0
    assert client_says in proc.stderr, proc.stderr
    assert client_says in psycopg_error(verify_ca, pki2, cert)
    verify_ca.wait_metric("dwsproxy_connections_rejected_total", before + 2, reason=reason)
    assert log_says in verify_ca.wait_log(f"outcome={reason}")


def test_intermediate_chain_connects_with_both_crls(verify_ca: Proxy, pki2: Pki) -> None:
    proc = psql(verify_ca, pki2, "chained")
    assert proc.returncode == 0, proc.stderr


def test_crl_checking_fails_closed(start_proxy: Callable[..., Proxy], pki2: Pki) -> None:
    # Only the root's CRL: the intermediate has none, so its certificates are refused, and the
    # log names the issuer without a CRL.
    proxy = start_proxy(tls=pki2.tls(clientcert="verify-ca",
                                     ssl_crl_file=str(pki2.dir / "root.crl")))
    assert psql(proxy, pki2, "good").returncode == 0
    proc = psql(proxy, pki2, "chained")
    assert proc.returncode != 0
    message = ('no usable CRL of issuer "CN=Test Intermediate CA,O=dwsproxy" (of '
               '"CN=postgres,O=dwsproxy"); CRL checking fails closed')
    assert message in proc.stderr
    assert message.replace('"', '\\"') in proxy.wait_log("outcome=client_cert_invalid")
    assert proxy.metric("dwsproxy_connections_rejected_total", reason="client_cert_invalid") == 1


def test_crl_dir(start_proxy: Callable[..., Proxy], pki2: Pki, tmp_path: Path) -> None:
    (tmp_path / "root.crl").write_bytes((pki2.dir / "root.crl").read_bytes())
    (tmp_path / "inter.pem").write_bytes((pki2.dir / "inter.crl").read_bytes())
    proxy = start_proxy(tls=pki2.tls(clientcert="verify-ca", ssl_crl_dir=str(tmp_path)))
    assert psql(proxy, pki2, "chained").returncode == 0
    assert "certificate revoked" in psql(proxy, pki2, "chained_revoked").stderr


def test_verify_full_matches_user(start_proxy: Callable[..., Proxy], pki2: Pki) -> None:
    proxy = start_proxy(tls=pki2.tls(clientcert="verify-full",
                                     ssl_crl_file=str(pki2.dir / "both.crl")))
    ok = psql(proxy, pki2, "alice", user="alice")
    assert ok.returncode == 0 and ok.stdout.strip() == "alice", ok.stderr
    bad = psql(proxy, pki2, "alice", user="postgres")
    assert bad.returncode != 0
    assert ('certificate authentication failed for user "postgres": client certificate CN '
            '"alice" does not match the user name') in bad.stderr
    assert proxy.metric("dwsproxy_connections_rejected_total", reason="client_cert_invalid") == 1


def test_optional(start_proxy: Callable[..., Proxy], pki2: Pki) -> None:
    proxy = start_proxy(tls=pki2.tls(clientcert="optional",
                                     ssl_crl_file=str(pki2.dir / "both.crl")))
    assert psql(proxy, pki2, None).returncode == 0
    assert psql(proxy, pki2, "good").returncode == 0
    assert "certificate revoked" in psql(proxy, pki2, "revoked").stderr
    assert "unknown ca" in psql(proxy, pki2, "foreign").stderr
    assert proxy.metric("dwsproxy_connections_total", encryption="tls", tls_version="TLSv1.3",
                        client_cert="none", backend_encryption="plain") == 1


def test_gsql_rule_limits_tls_version(start_proxy: Callable[..., Proxy], pki2: Pki) -> None:
    proxy = start_proxy(tls=pki2.tls(), rules=[
        {"application_name": "gsql", "ssl_protocols": ["TLSv1.2"], "action": "allow"},
        {"type": "hostssl", "action": "allow"}])
    refused = psql(proxy, pki2, None, PGAPPNAME="gsql")
    assert refused.returncode != 0
    assert ("rule #1 (type=host, application_name=gsql) requires TLSv1.2, this connection "
            "negotiated TLSv1.3") in refused.stderr
    assert "PGSSLMAXPROTOCOLVERSION=TLSv1.2" in refused.stderr
    ok = psql(proxy, pki2, None, PGAPPNAME="gsql", PGSSLMAXPROTOCOLVERSION="TLSv1.2")
    assert ok.returncode == 0, ok.stderr
    assert psql(proxy, pki2, None, PGAPPNAME="psql").returncode == 0
    assert proxy.metric("dwsproxy_connections_rejected_total", reason="tls_version") == 1


def test_hostssl_hostnossl_and_cidr_rules(start_proxy: Callable[..., Proxy], pki2: Pki) -> None:
    proxy = start_proxy(tls=pki2.tls(require_ssl=False), rules=[
        {"type": "hostnossl", "address": "10.0.0.0/8", "action": "allow"},
        {"type": "hostssl", "address": "127.0.0.0/8", "user": "alice", "action": "allow"},
        {"type": "hostnossl", "address": "127.0.0.1/32", "database": "app", "action": "allow"}])
    base = (f"host=localhost port={proxy.port} sslrootcert={pki2.dir / 'root.pem'} "
            f"sslcert={pki2.dir / 'none.crt'}")
    assert run_psql(f"{base} user=alice dbname=postgres sslmode=require",
                    "SELECT 1").returncode == 0
    nossl = run_psql(f"{base} user=alice dbname=postgres sslmode=disable", "SELECT 1")
    assert nossl.returncode != 0 and "no rule matches" in nossl.stderr
    assert "no encryption" in nossl.stderr
    assert run_psql(f"{base} user=bob dbname=app sslmode=disable", "SELECT 1").returncode == 0
    wrong_user = run_psql(f"{base} user=bob dbname=postgres sslmode=require", "SELECT 1")
    assert wrong_user.returncode != 0 and "SSL encryption" in wrong_user.stderr
    assert proxy.metric("dwsproxy_connections_rejected_total", reason="rule") == 2


def test_encrypted_server_key(tmp_path: Path, pki2: Pki, start_proxy: Callable[..., Proxy],
                              ) -> None:
    cert, key = certs.issue(pki2.root, "localhost", server=True)
    certs.write_certs(tmp_path / "enc.crt", cert)
    certs.write_key(tmp_path / "enc.key", key, passphrase=b"correct horse")
    (tmp_path / "pass").write_text("correct horse\n")
    (tmp_path / "wrong").write_text("battery staple\n")
    for secret in ("pass", "wrong"):
        (tmp_path / secret).chmod(0o600)  # a passphrase file is a secret: 0600 like the key
    tls = {"ssl_cert_file": str(tmp_path / "enc.crt"), "ssl_key_file": str(tmp_path / "enc.key")}
    proxy = start_proxy(tls={**tls, "ssl_passphrase_file": str(tmp_path / "pass")})
    assert psql(proxy, pki2, None).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(proxy.config_path.read_text().replace(str(tmp_path / "pass"),
                                                         str(tmp_path / "wrong")))
    proc = subprocess.run([sys.executable, "-m", "proxy", "--config", str(bad)],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("config error: tls.ssl_passphrase_file: wrong passphrase "
                                   f"for tls.ssl_key_file (from '{tmp_path / 'wrong'}')")
    assert "correct horse" not in proc.stderr and "battery" not in proc.stderr
