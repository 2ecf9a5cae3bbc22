"""`dwsproxy certs …`: a small certificate authority for tests, the demo and production.

Owns: making a CA, server and client certificates (ECDSA P-256: cheap handshakes), CRLs, and
the CA folder's life: `init`, `client`, `bundle` (like the DWS console's download), `revoke`,
`crl` (re-sign, every revoked serial kept), `list`, with the issuance record of carecord.py.
Files: cacert.pem, cakey.pem, server.crt/.key, client.crt/.key (+ .pk8 DER for JDBC), crl.pem,
issued.jsonl. Every file is replaced atomically, keys created 0600; nothing that exists is
overwritten without --force. Must not be imported by the proxy's serving path.

The CRL's nextUpdate defaults to the CA certificate's own end. The proxy checks CRLs fail
closed, so a CRL that lapses refuses every client of its CA: a short default (openssl ca's 30
days) is an outage on a date nobody chose. A CRL here is a local file the operator replaces,
not one fetched from a distribution point, so a short nextUpdate buys no freshness: whoever
can replace the file with an older signed CRL can as well delete it. Past the CA's end every
certificate it issued is invalid anyway, so the CRL adds no date of its own. `--days N` sets a
shorter one where a policy asks for it; check-config, the start-up log and the
DwsproxyCrlExpiringSoon alert then warn 3 days ahead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import carecord, keyfiles
from .carecord import Entry

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


class CertsError(ValueError):
    """A refusal with a sentence for the operator (exit 2); nothing was changed."""


def crl_end(ca: tuple[x509.Certificate, PrivateKey], days: int | None) -> dt.datetime:
    """nextUpdate: `days` from now, or by default the CA certificate's own end (see the
    module docstring for why)."""
    if days is None:
        return ca[0].not_valid_after_utc
    if days < 1:
        raise CertsError(f"--days {days}: a CRL must be valid for at least one day")
    return _now() + dt.timedelta(days=days)


def make_crl(ca: tuple[x509.Certificate, PrivateKey], revoked_serials: Iterable[int] = (),
             *, next_update_days: int | None = None,
             keep: Iterable[x509.RevokedCertificate] = (),
             number: int = 1) -> x509.CertificateRevocationList:
    """A CRL of `ca` revoking `keep` (entries of an earlier CRL, their dates and reasons as
    they were) and `revoked_serials` (revoked now)."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca[0].subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(crl_end(ca, next_update_days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()),
                       critical=False)
    )
    seen: set[int] = set()
    for entry in keep:
        if entry.serial_number not in seen:
            seen.add(entry.serial_number)
            builder = builder.add_revoked_certificate(entry)
    for serial in revoked_serials:
        if serial not in seen:
            seen.add(serial)
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=1)).build())
    return builder.sign(ca[1], hashes.SHA256())


def write_certs(path: Path, *certs: x509.Certificate) -> None:
    carecord.write_atomic(path, b"".join(c.public_bytes(serialization.Encoding.PEM)
                                         for c in certs))


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    carecord.write_atomic(path, crl.public_bytes(serialization.Encoding.PEM))


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


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file, created 0600, replacing any old one atomically."""
    carecord.write_atomic(path, data, mode=0o600)


def load_ca(folder: Path) -> tuple[x509.Certificate, PrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((folder / "cacert.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "cakey.pem").read_bytes(), None)
    except FileNotFoundError as exc:
        raise CertsError(f"'{folder}' holds no CA ({exc.filename} is missing): make one with "
                         "`dwsproxy certs init DIR`") from None
    except (ValueError, TypeError) as exc:
        raise CertsError(f"cannot read the CA in '{folder}': {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"'{folder / 'cakey.pem'}' is not an EC key (not made by dwsproxy)")
    return cert, key


# -- the issuance record ------------------------------------------------------------------------
def _entry(cert: x509.Certificate, role: str, file: str) -> Entry:
    return Entry(serial=f"{cert.serial_number:x}", role=role,
                 subject=cert.subject.rfc4514_string(),
                 not_after=carecord.stamp(cert.not_valid_after_utc), file=file)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _record(folder: Path, ca: tuple[x509.Certificate, PrivateKey]) -> list[Entry]:
    """The folder's record; for a folder made before there was one, what its *.crt files and
    CRL say (the record is written from then on)."""
    entries = carecord.read(folder)
    if entries is not None:
        return entries
    entries = [_entry(ca[0], "ca", "cacert.pem")]
    for path in sorted(folder.glob("*.crt")):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            continue
        if cert.serial_number != ca[0].serial_number and _issued_by(cert, ca[0]):
            entries.append(_entry(cert, "server" if path.name == "server.crt" else "client",
                                  path.name))
    crl = _current_crl(folder, ca)
    for revoked in crl or ():
        entries = carecord.mark_revoked(entries, revoked.serial_number,
                                        carecord.stamp(revoked.revocation_date_utc))
    return entries


def _current_crl(folder: Path, ca: tuple[x509.Certificate, PrivateKey]
                 ) -> x509.CertificateRevocationList | None:
    path = folder / "crl.pem"
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise CertsError(f"'{path}' is not a PEM CRL: {exc}") from None
    if crl.issuer != ca[0].subject or not crl.is_signature_valid(ca[1].public_key()):
        raise CertsError(f"'{path}' was not signed by this folder's CA; refusing to replace "
                         "it (its revocations would be lost)")
    return crl


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 1
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    except x509.ExtensionNotFound:
        return 2


# -- commands -----------------------------------------------------------------------------------
INIT_FILES = ("cacert.pem", "cakey.pem", "crl.pem", carecord.RECORD, "server.crt", "server.key",
              "client.crt", "client.key", "client.pk8")


def init(folder: Path, *, server_cn: str = "localhost", client_cn: str = "postgres",
         days: int = 825, force: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    existing = [name for name in INIT_FILES if os.path.lexists(folder / name)]
    if existing and not force:
        raise CertsError(
            f"'{folder}' already holds {', '.join(existing)}: init would make a new CA key and "
            "an empty CRL, so every certificate the old CA issued would stop verifying and "
            "every revoked one would be un-revoked. Use another folder, or --force to replace "
            "the CA anyway")
    ca = make_ca("dwsproxy root CA")
    server = issue(ca, server_cn, server=True, sans=[server_cn], days=days)
    client = issue(ca, client_cn, days=days)
    write_key(folder / "cakey.pem", ca[1])
    write_certs(folder / "cacert.pem", ca[0])
    write_certs(folder / "server.crt", server[0])
    write_key(folder / "server.key", server[1])
    write_certs(folder / "client.crt", client[0])
    write_key(folder / "client.key", client[1])
    write_key(folder / "client.pk8", client[1], der_pkcs8=True)
    write_crl(folder / "crl.pem", make_crl(ca))
    carecord.write(folder, [_entry(ca[0], "ca", "cacert.pem"),
                            _entry(server[0], "server", "server.crt"),
                            _entry(client[0], "client", "client.crt")])


def _check_cn_as_file_name(cn: str) -> None:
    if not cn or cn.startswith(".") or "/" in cn or "\0" in cn or not cn.isprintable():
        raise CertsError(f"--cn '{carecord.printable(cn)}': the CN names the files "
                         "(CN.crt, CN.key), so it must be a plain file name")


def write_client(folder: Path, ca: tuple[x509.Certificate, PrivateKey], cn: str,
                 days: int = 825, *, force: bool = False) -> Path:
    """CN.crt, CN.key, CN.pk8 in `folder`, recorded. Existing files of that CN are kept
    unless `force` (the old certificate then stays valid until revoked)."""
    _check_cn_as_file_name(cn)
    names = [f"{cn}.crt", f"{cn}.key", f"{cn}.pk8"]
    with carecord.locked(folder):
        existing = [n for n in names if os.path.lexists(folder / n)]
        if existing and not force:
            raise CertsError(f"{', '.join(existing)} exist in '{folder}': a client "
                             f"certificate for {cn} was issued already (`dwsproxy certs list "
                             "DIR`); --force issues a new one over them")
        entries = _record(folder, ca)
        cert, key = issue(ca, cn, days=days)
        write_key(folder / names[1], key)
        write_key(folder / names[2], key, der_pkcs8=True)
        write_certs(folder / names[0], cert)
        carecord.write(folder, [*entries, _entry(cert, "client", names[0])])
    return folder / names[0]


def revoke(folder: Path, cert_path: Path | None = None, *, serial: int | None = None,
           force: bool = False) -> tuple[int, bool]:
    """Add a certificate (by file or serial) to DIR/crl.pem and re-sign it, every earlier
    entry kept. (serial, False) when it was revoked already. The CA's own certificate and
    the proxy's server certificate need `force`: revoking them refuses every client."""
    ca = load_ca(folder)
    if cert_path is not None:
        serial = _serial_of(cert_path, ca)
    assert serial is not None
    with carecord.locked(folder):
        entries = _record(folder, ca)
        protected = {f"{ca[0].serial_number:x}": "the CA's own certificate"}
        protected.update({e.serial: f"the proxy's server certificate ({e.file})"
                          for e in entries if e.role == "server"})
        protected.update({e.serial: "a CA certificate" for e in entries if e.role == "ca"
                          and e.serial not in protected})
        what = protected.get(f"{serial:x}")
        if what and not force:
            raise CertsError(f"serial {serial:x} is {what}: revoking it refuses every client "
                             "that connects through it. Issue and install a new one first; "
                             "--force revokes it anyway")
        old = _current_crl(folder, ca)
        kept = list(old or ())
        fresh = all(r.serial_number != serial for r in kept)
        if fresh:
            write_crl(folder / "crl.pem", make_crl(ca, [serial], keep=kept,
                                                    next_update_days=None,
                                                    number=_crl_number(old)))
        carecord.write(folder, carecord.mark_revoked(entries, serial, carecord.stamp(_now())))
    return serial, fresh


def _serial_of(cert_path: Path, ca: tuple[x509.Certificate, PrivateKey]) -> int:
    try:
        data = cert_path.read_bytes()
    except FileNotFoundError:
        hint = ""
        try:
            carecord.parse_serial(str(cert_path))
            hint = f"; to revoke by serial number: --serial {carecord.printable(str(cert_path))}"
        except ValueError:
            pass
        raise CertsError(f"no such certificate file '{carecord.printable(str(cert_path))}'"
                         + hint) from None
    except OSError as exc:
        raise CertsError(f"cannot read '{carecord.printable(str(cert_path))}': "
                         f"{exc.strerror}") from None
    try:
        cert = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data))
    except ValueError:
        raise CertsError(f"'{carecord.printable(str(cert_path))}' is not a certificate "
                         "(PEM or DER)") from None
    if not _issued_by(cert, ca[0]):
        raise CertsError(f"'{carecord.printable(str(cert_path))}' was not issued by this "
                         "folder's CA")
    return cert.serial_number


def renew_crl(folder: Path, days: int | None = None) -> tuple[int, dt.datetime]:
    """Re-sign DIR/crl.pem with a new nextUpdate, keeping every revoked entry (of the old CRL,
    expired or not, and of the record). (entries, nextUpdate)."""
    ca = load_ca(folder)
    end = crl_end(ca, days)
    with carecord.locked(folder):
        old = _current_crl(folder, ca)
        kept = list(old or ())
        known = {r.serial_number for r in kept}
        recorded = [int(e.serial, 16) for e in carecord.read(folder) or () if e.revoked]
        missing = [s for s in recorded if s not in known]
        crl = make_crl(ca, missing, keep=kept, next_update_days=days, number=_crl_number(old))
        write_crl(folder / "crl.pem", crl)
    return len(kept) + len(missing), end


def list_lines(folder: Path) -> list[str]:
    """`certs list`: one line per certificate the CA issued, and what the CRL says."""
    ca = load_ca(folder)
    entries = _record(folder, ca)
    crl = _current_crl(folder, ca)
    revoked = {r.serial_number: r for r in crl or ()}
    now = _now()
    rows: list[tuple[str, ...]] = [("SERIAL", "ROLE", "STATUS", "NOT_AFTER", "FILE",
                                    "SUBJECT")]
    for e in entries:
        serial = int(e.serial, 16)
        if serial in revoked:
            status = "revoked"
        elif e.revoked:
            status = "revoked-not-in-crl"
        elif e.not_after < carecord.stamp(now):
            status = "expired"
        else:
            status = "valid"
        rows.append((e.serial, e.role, status, e.not_after, e.file, e.subject))
    listed = {int(e.serial, 16) for e in entries}
    for serial in sorted(set(revoked) - listed):
        rows.append((f"{serial:x}", "?", "revoked", "?", "?", "(not in the record)"))
    rows = [tuple(carecord.printable(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]])
             for r in rows]
    if crl is None:
        lines.append(f"crl: none ({folder / 'crl.pem'} is missing)")
    else:
        end = crl.next_update_utc
        state = "EXPIRED" if end is not None and end < now else "valid"
        lines.append(f"crl: {len(revoked)} revoked, next update "
                     f"{carecord.stamp(end) if end else 'none'} ({state})")
    return lines


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
client.key.cipher + client.key.rand beside them; gsql reads it there by itself. Other
clients need the passphrase itself. Show it on your terminal with

    dwsproxy certs show-passphrase sslcert/client.key

psql and other libpq programs: type it at the "Enter PEM pass phrase:" prompt, or give it as
sslpassword=... in the connection string or a pg_service.conf entry (libpq reads no
environment variable for it). JDBC: the sslpassword property.
"""


def bundle(folder: Path, cn: str, out: Path, *, encrypt: bool = False, days: int = 825,
           force: bool = False) -> Path:
    """A zip of sslcert/{client.crt, client.key (0600), cacert.pem, client.key.pk8} and a README;
    with `encrypt`, both keys encrypted and client.key.cipher + client.key.rand added (written
    by `encrypt_key`, the same pair `certs encrypt-key` makes)."""
    import tempfile
    import zipfile

    ca = load_ca(folder)
    if os.path.lexists(out) and not force:
        raise CertsError(f"'{carecord.printable(str(out))}' exists (it may be the only copy of "
                         "a key handed out before); --force replaces it")
    with tempfile.TemporaryDirectory(prefix="dwsproxy-bundle-") as tmp, \
            carecord.locked(folder):
        staging = Path(tmp)
        entries = _record(folder, ca)
        cert, key = issue(ca, cn, days=days)
        write_certs(staging / "client.crt", cert)
        write_key(staging / "client.key", key)
        write_certs(staging / "cacert.pem", ca[0])
        names = ["client.crt", "client.key", "cacert.pem", "client.key.pk8"]
        passphrase: bytes | None = None
        if encrypt:
            passphrase = keyfiles.random_passphrase()
            keyfiles.encrypt_key(staging / "client.key", "client", passphrase)
            names += ["client.key.cipher", "client.key.rand"]
        write_key(staging / "client.key.pk8", key, passphrase=passphrase, der_pkcs8=True)
        readme = BUNDLE_README.format(cn=cn, encrypted=_ENCRYPTED_NOTE if encrypt else "")
        zipped = staging / "bundle.zip"
        fd = os.open(zipped, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(_member("README.txt", 0o644), readme)
            for name in names:
                secret = name.startswith("client.key")
                zf.writestr(_member(f"sslcert/{name}", 0o600 if secret else 0o644),
                            (staging / name).read_bytes())
        write_private(out, zipped.read_bytes())
        carecord.write(folder, [*entries, _entry(cert, "client", out.name)])
    return out


def _member(name: str, mode: int) -> Any:
    import zipfile

    info = zipfile.ZipInfo(name, date_time=_now().timetuple()[:6])
    info.external_attr = (0o100000 | mode) << 16  # unzip restores these modes (0600 keys)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def encrypt_key(key_path: Path, stem: str, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """See keyfiles.encrypt_key (kept here for callers of the library)."""
    return keyfiles.encrypt_key(key_path, stem, passphrase)


def _show_passphrase(args: argparse.Namespace) -> int:
    # Only to a terminal: a passphrase in a pipe or a file ends up in logs and shell history.
    if not sys.stdout.isatty():
        print("certs show-passphrase: prints only to a terminal (standard output is a pipe "
              "or a file); run it in a terminal and copy the passphrase from there",
              file=sys.stderr)
        return 2
    passphrase = keyfiles.read_passphrase(Path(args.pair))
    print(carecord.printable(passphrase.decode("latin-1")))
    return 0


def main(args: argparse.Namespace) -> int:
    """Exit 0 done, 2 refused or failed (one line on stderr saying why, nothing changed)."""
    folder = Path(getattr(args, "dir", "."))
    command = args.certs_command
    try:
        if command == "init":
            init(folder, server_cn=args.server_cn, client_cn=args.client_cn, days=args.days,
                 force=args.force)
            print(f"certs: CA, server, client ({args.client_cn}) and empty CRL in {folder}")
        elif command == "client":
            old = folder / f"{args.cn}.crt"
            old_serial = _serial_or_none(old) if args.force else None
            path = write_client(folder, load_ca(folder), args.cn, args.days, force=args.force)
            print(f"certs: client certificate {path}")
            if old_serial is not None:
                print(f"certs: the replaced certificate (serial {old_serial:x}) stays valid "
                      f"until revoked: dwsproxy certs revoke {folder} --serial {old_serial:x}")
        elif command == "bundle":
            path = bundle(folder, args.cn, Path(args.out), encrypt=args.encrypt, days=args.days,
                          force=args.force)
            print(f"certs: client bundle for {args.cn} in {path}")
        elif command == "encrypt-key":
            cipher, rand = keyfiles.encrypt_key(Path(args.key), args.stem, force=args.force)
            print(f"certs: {args.key} encrypted; its passphrase is in {cipher} + {rand}")
        elif command == "show-passphrase":
            return _show_passphrase(args)
        elif command == "crl":
            count, end = renew_crl(folder, args.days)
            print(f"certs: {folder / 'crl.pem'} re-signed with {count} revoked "
                  f"serial{'s' if count != 1 else ''}, next update {carecord.stamp(end)}; "
                  "install it where the proxy reads it and reload")
        elif command == "list":
            print("\n".join(list_lines(folder)))
        elif command == "revoke":
            serial_arg = carecord.parse_serial(args.serial) if args.serial else None
            if (args.cert is None) == (serial_arg is None):
                raise CertsError("give the certificate file or --serial HEX (one of them)")
            serial, fresh = revoke(folder, Path(args.cert) if args.cert else None,
                                   serial=serial_arg, force=args.force)
            if fresh:
                print(f"certs: revoked serial {serial:x}; {folder / 'crl.pem'} re-signed; "
                      "install it where the proxy reads it and reload")
            else:
                print(f"certs: serial {serial:x} was revoked already; nothing changed")
    except (CertsError, keyfiles.KeyFileError, carecord.RecordError, ValueError) as exc:
        print(f"certs {command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" '{carecord.printable(str(exc.filename))}'" if exc.filename else ""
        print(f"certs {command}:{where} {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _serial_or_none(path: Path) -> int | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    except (OSError, ValueError):
        return None
