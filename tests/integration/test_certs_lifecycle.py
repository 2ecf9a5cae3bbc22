"""The CA folder's life with a real proxy, PostgreSQL and psql: a lapsed CRL refuses a valid
client and says it is the proxy's fault, `dwsproxy certs crl` renews it, a reload lets the
client in again and the revoked stay refused; an encrypted client bundle used by psql with the
passphrase `certs show-passphrase` shows."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from conftest import REPO, Proxy, clean_env, run_psql
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from terminal import read_from_terminal

from proxy.tools import certs


def dwsproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def client(port: int, ca: Path, cert: Path, key: Path, user: str, **extra: str) -> str:
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    return (f"host=localhost port={port} user={user} dbname=postgres sslmode=verify-ca "
            f"sslrootcert={ca / 'cacert.pem'} sslcert={cert} sslkey={key} {more}")


def lapse(ca_dir: Path) -> x509.CertificateRevocationList:
    """Re-sign DIR/crl.pem as it would be after its nextUpdate passed: the same entries, the
    same number, nextUpdate yesterday."""
    ca = certs.load_ca(ca_dir)
    old = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca[0].subject)
               .last_update(now - dt.timedelta(days=31)).next_update(now - dt.timedelta(days=1))
               .add_extension(old.extensions.get_extension_for_class(x509.CRLNumber).value,
                              critical=False))
    for entry in old:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca[1], hashes.SHA256())
    certs.write_crl(ca_dir / "crl.pem", crl)
    return crl


def test_crl_renewal_end_to_end(start_proxy: Callable[..., Proxy], tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    for args in (("init", str(ca_dir)), ("client", str(ca_dir), "--cn", "alice"),
                 ("client", str(ca_dir), "--cn", "bob")):
        assert dwsproxy("certs", *args).returncode == 0
    assert dwsproxy("certs", "revoke", str(ca_dir), str(ca_dir / "bob.crt")).returncode == 0
    lapse(ca_dir)
    proxy = start_proxy(pki=ca_dir, tls={"clientcert": "verify-ca",
                                         "ssl_ca_file": str(ca_dir / "cacert.pem"),
                                         "ssl_crl_file": str(ca_dir / "crl.pem")})
    # start-up says it, and check-config refuses the configuration
    proxy.wait_log("tls.ssl_crl_file: the CRL of \"CN=dwsproxy root CA,O=dwsproxy\" expired at")
    checked = dwsproxy("check-config", str(proxy.config_path))
    assert checked.returncode == 2 and "tls.ssl_crl_file" in checked.stderr, checked.stderr

    alice = client(proxy.port, ca_dir, ca_dir / "alice.crt", ca_dir / "alice.key", "alice")
    bob = client(proxy.port, ca_dir, ca_dir / "bob.crt", ca_dir / "bob.key", "bob")
    refused = run_psql(alice, "SELECT 1")
    assert refused.returncode != 0
    # the hint is for the operator, not "fix your certificate"
    assert "HINT:  the proxy's CRL for \"CN=dwsproxy root CA,O=dwsproxy\" expired at " \
        in refused.stderr, refused.stderr
    assert "the operator must renew it" in refused.stderr
    assert "use a valid, unrevoked client certificate" not in refused.stderr

    renewed = dwsproxy("certs", "crl", str(ca_dir))
    assert renewed.returncode == 0, renewed.stderr
    checked = dwsproxy("check-config", str(proxy.config_path))
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    proxy.signal(signal.SIGHUP)
    proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="success")
    through = run_psql(alice, "SELECT current_user")
    assert through.returncode == 0 and through.stdout.strip() == "alice", through.stderr
    still = run_psql(bob, "SELECT 1")
    assert still.returncode != 0 and "client certificate revoked" in still.stderr, still.stderr
    listing = dwsproxy("certs", "list", str(ca_dir))
    bob_cert = x509.load_pem_x509_certificate((ca_dir / "bob.crt").read_bytes())
    bob_serial = f"{bob_cert.serial_number:x}"
    assert [line.split()[2] for line in listing.stdout.splitlines()
            if line.startswith(bob_serial + " ")] == ["revoked"]

    # a short CRL by choice: check-config and the reload both warn, clients still get in
    assert dwsproxy("certs", "crl", str(ca_dir), "--days", "2").returncode == 0
    checked = dwsproxy("check-config", str(proxy.config_path))
    assert checked.returncode == 0 and checked.stderr.startswith(
        "warning: tls.ssl_crl_file: the CRL of"), checked.stderr
    proxy.signal(signal.SIGHUP)
    proxy.wait_metric("dwsproxy_config_reloads_total", 2, result="success")
    proxy.wait_log("tls.ssl_crl_file: the CRL of \"CN=dwsproxy root CA,O=dwsproxy\" expires at")
    assert run_psql(alice, "SELECT 1").returncode == 0
    assert run_psql(bob, "SELECT 1").returncode != 0


def test_encrypted_bundle_with_psql_and_show_passphrase(start_proxy: Callable[..., Proxy],
                                                        tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert dwsproxy("certs", "init", str(ca_dir)).returncode == 0
    out = tmp_path / "alice.zip"
    made = dwsproxy("certs", "bundle", str(ca_dir), "--cn", "alice", "--out", str(out),
                    "--encrypt")
    assert made.returncode == 0, made.stderr
    unpacked = tmp_path / "u"
    with zipfile.ZipFile(out) as zf:
        zf.extractall(unpacked)
        readme = zf.read("README.txt").decode()
    assert "PGSSLPASSWORD" not in readme
    ssl_dir = unpacked / "sslcert"
    for name in ("client.key", "client.key.cipher", "client.key.rand"):
        (ssl_dir / name).chmod(0o600)  # zipfile does not restore modes; unzip does
    assert b"ENCRYPTED" in (ssl_dir / "client.key").read_bytes()
    # what the README says to run, in a terminal
    passphrase = read_from_terminal([sys.executable, "-m", "proxy", "certs", "show-passphrase",
                                     str(ssl_dir / "client.key")], REPO)
    assert len(passphrase) == 15 and passphrase.isalnum(), passphrase
    proxy = start_proxy(pki=ca_dir, tls={"clientcert": "verify-ca",
                                         "ssl_ca_file": str(ca_dir / "cacert.pem")})
    conninfo = client(proxy.port, ssl_dir, ssl_dir / "client.crt", ssl_dir / "client.key",
                      "alice")
    through = run_psql(conninfo + f" sslpassword={passphrase}", "SELECT current_user",
                       env=clean_env())
    assert through.returncode == 0 and through.stdout.strip() == "alice", through.stderr
    wrong = run_psql(conninfo + " sslpassword=not-the-passphrase", "SELECT 1", env=clean_env())
    assert wrong.returncode != 0 and "private key" in wrong.stderr, wrong.stderr
