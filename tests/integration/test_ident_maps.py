"""pg_ident-style maps for verify-full, with real psql and certificates made here: a CN
alice@corp.example logs in as alice through a map and is refused as bob; a SPIFFE ID in a URI
SAN maps through a rule's own map."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Proxy, clean_env, run_psql
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.tools import certs

IDENT = """
[[ident]]
map = "corp"
system_user = '/^(.*)@corp\\.example$'
pg_user = '\\1'

[[ident]]
map = "spiffe"
system_user = '/^spiffe://corp\\.example/ns/[^/]+/sa/([a-z]+)$'
pg_user = '\\1'
"""


def client_cert(pki: Path, folder: Path, cn: str, uris: tuple[str, ...] = ()) -> tuple[Path,
                                                                                        Path]:
    """A client certificate from the test CA, with URI SANs if given."""
    ca_cert, ca_key = certs.load_ca(pki)
    key = certs.new_key()
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False))
    if uris:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    stem = cn.replace("@", "_").replace("/", "_")
    crt, pem = folder / f"{stem}.crt", folder / f"{stem}.key"
    certs.write_certs(crt, cert)
    certs.write_key(pem, key)
    return crt, pem


def psql_as(proxy: Proxy, pki: Path, user: str, crt: Path, key: Path
            ) -> tuple[int, str, str]:
    done = run_psql(f"host=localhost port={proxy.port} user={user} dbname=postgres "
                    f"sslmode=verify-full sslrootcert={pki / 'cacert.pem'} sslcert={crt} "
                    f"sslkey={key}", "SELECT current_user", env=clean_env())
    return done.returncode, done.stdout.strip(), done.stderr


def test_cn_maps_to_alice_and_not_to_bob(start_proxy: Callable[..., Proxy], pki: Path,
                                         tmp_path: Path) -> None:
    crt, key = client_cert(pki, tmp_path, "alice@corp.example")
    proxy = start_proxy(tls={"ssl_ca_file": str(pki / "cacert.pem"), "clientcert": "verify-full",
                             "ident_map": "corp"}, extra=IDENT)
    code, out, err = psql_as(proxy, pki, "alice", crt, key)
    assert code == 0 and out == "alice", err
    code, out, err = psql_as(proxy, pki, "bob", crt, key)
    assert code != 0
    assert 'certificate authentication failed for user "bob"' in err
    assert "ident_map=corp" in err


def test_without_a_map_verify_full_still_wants_the_exact_cn(start_proxy: Callable[..., Proxy],
                                                           pki: Path, tmp_path: Path) -> None:
    crt, key = client_cert(pki, tmp_path, "alice@corp.example")
    proxy = start_proxy(tls={"ssl_ca_file": str(pki / "cacert.pem"),
                             "clientcert": "verify-full"})
    code, _, err = psql_as(proxy, pki, "alice", crt, key)
    assert code != 0 and "does not match the user name" in err


def test_a_rules_map_over_a_spiffe_uri_san(start_proxy: Callable[..., Proxy], pki: Path,
                                           tmp_path: Path) -> None:
    crt, key = client_cert(pki, tmp_path, "workload-7",
                           uris=("spiffe://corp.example/ns/prod/sa/alice",))
    proxy = start_proxy(tls={"ssl_ca_file": str(pki / "cacert.pem"), "clientcert": "optional",
                             "clientname": "SAN"},
                        rules=[{"type": "hostssl", "clientcert": "verify-full",
                                "ident_map": "spiffe", "action": "allow"}],
                        extra=IDENT)
    code, out, err = psql_as(proxy, pki, "alice", crt, key)
    assert code == 0 and out == "alice", err
    code, _, err = psql_as(proxy, pki, "bob", crt, key)
    assert code != 0 and "rule #1" in err


@pytest.mark.parametrize("extra, tls, problem", [
    ("", {"ident_map": "nope"}, "tls.ident_map: no [[ident]] map named 'nope'"),
    ('[[ident]]\nmap = "m"\nsystem_user = "/("\npg_user = "x"\n', {},
     "ident[1].system_user: not a regular expression"),
    ('[[ident]]\nmap = "m"\nsystem_user = "a"\npg_user = "\\\\1"\n', {},
     "ident[1].pg_user"),
])
def test_check_config_refuses_bad_maps(tmp_path: Path, pki: Path, extra: str,
                                       tls: dict[str, str], problem: str) -> None:
    import subprocess
    import sys

    from conftest import REPO, toml_value

    text = (f'[tls]\nssl_cert_file = "{pki / "server.crt"}"\n'
            f'ssl_key_file = "{pki / "server.key"}"\n'
            + "".join(f"{k} = {toml_value(v)}\n" for k, v in tls.items()) + extra)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 2 and problem in out.stderr, out.stderr
