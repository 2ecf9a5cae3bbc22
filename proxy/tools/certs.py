"""`dwsproxy certs …`: a small certificate authority for tests, the demo and first set-ups.

Owns: making a CA, server and client certificates (ECDSA P-256: cheap handshakes), CRLs, and
writing keys with mode 0600 from their creation (never a moment world-readable). Like the DWS
console's downloadable bundle: cacert.pem, server.crt/.key, client.crt/.key (+ .pk8 DER for
JDBC), crl.pem. Must not be imported by the proxy's serving path.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dwsproxy"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, *, parent: tuple[x509.Certificate, PrivateKey] | None = None,
            days: int = 3650) -> tuple[x509.Certificate, PrivateKey]:
    """A root CA, or an intermediate one when `parent` (its issuer's cert and key) is given."""
    key = new_key()
    issuer_name = parent[0].subject if parent else _name(cn)
    signing_key = parent[1] if parent else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    if parent:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent[1].public_key()),
            critical=False)
    return builder.sign(signing_key, hashes.SHA256()), key


def issue(ca: tuple[x509.Certificate, PrivateKey], cn: str, *, server: bool = False,
          sans: Iterable[str] = (), not_before: dt.datetime | None = None,
          not_after: dt.datetime | None = None,
          days: int = 825) -> tuple[x509.Certificate, PrivateKey]:
    """A leaf certificate signed by `ca`. Server certificates get localhost/127.0.0.1/::1 SANs."""
    key = new_key()
    start = not_before or _now() - dt.timedelta(minutes=5)
    end = not_after or _now() + dt.timedelta(days=days)
    alt: list[x509.GeneralName] = []
    names = list(sans) + (["localhost", "127.0.0.1", "::1"] if server else [])
    for name in dict.fromkeys(names):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()),
                       critical=False)
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


def make_crl(ca: tuple[x509.Certificate, PrivateKey], revoked_serials: Iterable[int] = (),
             *, next_update_days: int = 30) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca[0].subject)
        .last_update(_now() - dt.timedelta(minutes=5))
        .next_update(_now() + dt.timedelta(days=next_update_days))
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(_now() - dt.timedelta(minutes=1)).build())
    return builder.sign(ca[1], hashes.SHA256())


def write_certs(path: Path, *certs: x509.Certificate) -> None:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def write_key(path: Path, key: PrivateKey, *, passphrase: bytes | None = None,
              der_pkcs8: bool = False) -> None:
    """Write a private key, created 0600 (never world-readable, even for a moment)."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    data = key.private_bytes(
        serialization.Encoding.DER if der_pkcs8 else serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8, encryption)
    write_private(path, data)


def load_ca(folder: Path) -> tuple[x509.Certificate, PrivateKey]:
    cert = x509.load_pem_x509_certificate((folder / "cacert.pem").read_bytes())
    key = serialization.load_pem_private_key((folder / "cakey.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def write_client(folder: Path, ca: tuple[x509.Certificate, PrivateKey], cn: str,
                 days: int = 825) -> Path:
    cert, key = issue(ca, cn, days=days)
    write_certs(folder / f"{cn}.crt", cert)
    write_key(folder / f"{cn}.key", key)
    write_key(folder / f"{cn}.pk8", key, der_pkcs8=True)
    return folder / f"{cn}.crt"


def init(folder: Path, *, server_cn: str = "localhost", client_cn: str = "postgres",
         days: int = 825) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca("dwsproxy root CA")
    write_certs(folder / "cacert.pem", ca[0])
    write_key(folder / "cakey.pem", ca[1])
    server = issue(ca, server_cn, server=True, sans=[server_cn], days=days)
    write_certs(folder / "server.crt", server[0])
    write_key(folder / "server.key", server[1])
    cert, key = issue(ca, client_cn, days=days)
    write_certs(folder / "client.crt", cert)
    write_key(folder / "client.key", key)
    write_key(folder / "client.pk8", key, der_pkcs8=True)
    write_crl(folder / "crl.pem", make_crl(ca))


def revoke(folder: Path, cert_path: Path) -> int:
    ca = load_ca(folder)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.issuer != ca[0].subject:
        raise ValueError(f"{cert_path} was not issued by {folder / 'cacert.pem'}")
    serials = {cert.serial_number}
    crl_path = folder / "crl.pem"
    if crl_path.exists():
        old = x509.load_pem_x509_crl(crl_path.read_bytes())
        serials |= {r.serial_number for r in old}
    write_crl(crl_path, make_crl(ca, sorted(serials)))
    return cert.serial_number


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file, created 0600."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def encrypt_key(key_path: Path, stem: str, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Encrypt a PEM key in place with a passphrase kept in an openGauss pair beside it,
    `<stem>.key.cipher` + `<stem>.key.rand`, as `gs_guc encrypt` writes them. Without a
    passphrase, a random one of 15 characters (gs_guc's limit) is made."""
    import secrets
    import string

    from ..tls import gausskey

    if passphrase is None:
        alphabet = string.ascii_letters + string.digits
        passphrase = "".join(secrets.choice(alphabet) for _ in range(15)).encode()
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    write_key(key_path, key, passphrase=passphrase)
    cipher, rand = gausskey.encode(passphrase)
    cipher_path = key_path.parent / f"{stem}.key.cipher"
    rand_path = key_path.parent / f"{stem}.key.rand"
    write_private(cipher_path, cipher)
    write_private(rand_path, rand)
    return cipher_path, rand_path


BUNDLE_README = """Client bundle for {cn}, as the GaussDB(DWS) console hands it out.

Unzip it (unzip keeps client.key at mode 0600; libpq refuses a key others can read), then:

    export PGSSLCERT="$PWD/sslcert/client.crt"
    export PGSSLKEY="$PWD/sslcert/client.key"
    export PGSSLMODE="verify-ca"
    export PGSSLROOTCERT="$PWD/sslcert/cacert.pem"

JDBC: sslcert=sslcert/client.crt sslkey=sslcert/client.key.pk8 (DER PKCS#8).
{encrypted}"""

_ENCRYPTED_NOTE = """
client.key and client.key.pk8 are encrypted. Their passphrase is in the openGauss pair
client.key.cipher + client.key.rand beside them (gsql reads it there); for psql give it as
PGSSLPASSWORD or sslpassword.
"""


def bundle(folder: Path, cn: str, out: Path, *, encrypt: bool = False, days: int = 825) -> Path:
    """A zip of sslcert/{client.crt, client.key (0600), cacert.pem, client.key.pk8} and a README;
    with `encrypt`, both keys encrypted and client.key.cipher + client.key.rand added (written
    by `encrypt_key`, the same pair `certs encrypt-key` makes)."""
    import secrets
    import string
    import tempfile
    import zipfile

    ca = load_ca(folder)
    with tempfile.TemporaryDirectory(prefix="dwsproxy-bundle-") as tmp:
        staging = Path(tmp)
        cert, key = issue(ca, cn, days=days)
        write_certs(staging / "client.crt", cert)
        write_key(staging / "client.key", key)
        write_certs(staging / "cacert.pem", ca[0])
        names = ["client.crt", "client.key", "cacert.pem", "client.key.pk8"]
        passphrase: bytes | None = None
        if encrypt:
            alphabet = string.ascii_letters + string.digits
            passphrase = "".join(secrets.choice(alphabet) for _ in range(15)).encode()
            encrypt_key(staging / "client.key", "client", passphrase)
            names += ["client.key.cipher", "client.key.rand"]
        write_key(staging / "client.key.pk8", key, passphrase=passphrase, der_pkcs8=True)
        readme = BUNDLE_README.format(cn=cn, encrypted=_ENCRYPTED_NOTE if encrypt else "")
        out.unlink(missing_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(_member("README.txt", 0o644), readme)
            for name in names:
                secret = name.startswith("client.key")
                zf.writestr(_member(f"sslcert/{name}", 0o600 if secret else 0o644),
                            (staging / name).read_bytes())
    return out


def _member(name: str, mode: int) -> Any:
    import zipfile

    info = zipfile.ZipInfo(name, date_time=_now().timetuple()[:6])
    info.external_attr = (0o100000 | mode) << 16  # unzip restores these modes (0600 keys)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def main(args: argparse.Namespace) -> int:
    folder = Path(getattr(args, "dir", "."))
    try:
        if args.certs_command == "init":
            init(folder, server_cn=args.server_cn, client_cn=args.client_cn, days=args.days)
            print(f"certs: CA, server, client ({args.client_cn}) and empty CRL in {folder}")
        elif args.certs_command == "client":
            path = write_client(folder, load_ca(folder), args.cn, args.days)
            print(f"certs: client certificate {path}")
        elif args.certs_command == "bundle":
            path = bundle(folder, args.cn, Path(args.out), encrypt=args.encrypt, days=args.days)
            print(f"certs: client bundle for {args.cn} in {path}")
        elif args.certs_command == "encrypt-key":
            cipher, rand = encrypt_key(Path(args.key), args.stem)
            print(f"certs: {args.key} encrypted; its passphrase is in {cipher} + {rand}")
        else:
            serial = revoke(folder, Path(args.cert))
            print(f"certs: revoked serial {serial:x}; {folder / 'crl.pem'} re-signed")
    except (OSError, ValueError, TypeError) as exc:  # TypeError: the key is encrypted already
        print(f"certs: {exc}")
        return 1
    return 0
