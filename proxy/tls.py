"""TLS objects and certificate facts.

Owns: building the client-facing `ssl.SSLContext` from `[tls]` (certificate chain, key and its
passphrase, CA, CRLs, versions, ciphers, ALPN), checking key-file permissions the way PostgreSQL
does, reading facts out of certificates and CRLs with `cryptography`, and naming why a handshake
failed. Must not do socket I/O or decide policy.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, TlsConfig

if TYPE_CHECKING:
    from cryptography import x509

# `cryptography` is imported only where a CA file is configured (client certificates, CRLs):
# it costs ~9 MB of RSS per process, and a plain TLS-terminating worker never needs it.

log = logging.getLogger("dwsproxy.tls")

ALPN_POSTGRESQL = "postgresql"
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

# SSL_CTX_ctrl commands and values (openssl/ssl.h), for the one setting Python does not expose.
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_SESS_CACHE_OFF = 0


@dataclass(frozen=True)
class CertFacts:
    subject: str
    common_name: str
    sans: tuple[str, ...]
    issuer: str
    serial: int
    not_after: float  # Unix time

    def names(self) -> tuple[str, ...]:
        return ((self.common_name,) if self.common_name else ()) + self.sans


@dataclass(frozen=True)
class CrlFacts:
    issuer: str
    next_update: float | None


@dataclass(frozen=True)
class ServerTls:
    context: ssl.SSLContext
    crl_by_issuer: dict[x509.Name, x509.CertificateRevocationList]
    # (issuer, issuer key DER) -> its CRL's signature is valid: verified once, not per client
    crl_signature_ok: dict[tuple[x509.Name, bytes], bool]
    resumable: bool  # the session cache could not be switched off
    server_cert: CertFacts
    ca_certs: tuple[CertFacts, ...]
    crls: tuple[CrlFacts, ...]


def disable_session_cache(ctx: ssl.SSLContext) -> bool:
    """SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF), as PostgreSQL's be_tls_init
    does. Without it a TLS 1.2 client may resume a session whose certificate was refused (or
    revoked since), and a resumed session has no verified chain to re-check against the CRLs.
    Python has no API for it: the SSL_CTX pointer is read from the SSLContext object and checked
    (its options must read back as ctx.options) before anything is written; False when unsure."""
    import ctypes

    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # dlsym: its libssl
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                     ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        # PySSLContext: PyObject_HEAD (refcount, type), then `SSL_CTX *ctx`.
        ptr = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
        if not ptr or lib.SSL_CTX_get_options(ptr) != ctx.options:
            return False
        lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
        return bool(lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None)
                    == _SSL_SESS_CACHE_OFF)
    except (OSError, AttributeError, ValueError):
        return False


def name_to_str(name: x509.Name) -> str:
    return name.rfc4514_string()


def cert_facts(cert: x509.Certificate) -> CertFacts:
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID, NameOID

    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    sans: list[str] = []
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        san = ext.value
        assert isinstance(san, x509.SubjectAlternativeName)
        sans += san.get_values_for_type(x509.DNSName)
        sans += san.get_values_for_type(x509.RFC822Name)
    except x509.ExtensionNotFound:
        pass
    return CertFacts(
        subject=name_to_str(cert.subject),
        common_name=cn,
        sans=tuple(sans),
        issuer=name_to_str(cert.issuer),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc.timestamp(),
    )


# Short names of RFC 4514 for the attributes the stdlib decoder spells out.
_RFC4514 = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
            "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
            "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID"}


def server_cert_facts(path: str) -> CertFacts:
    """Facts of the first (leaf) certificate of a PEM file, read with the stdlib's decoder so
    that a worker without client certificates never loads `cryptography`. The subject is
    written like cryptography's rfc4514_string (last RDN first), so metric labels agree."""
    key = "tls.ssl_cert_file"
    _read(path, key)  # a clear error for a missing or unreadable file
    try:
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - a Python without the helper
        return cert_facts(_read_pem_certs(path, key)[0])
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(key, f"'{path}' holds no readable PEM certificate: {exc}") from None

    def name(rdns: tuple[tuple[tuple[str, str], ...], ...]) -> str:
        return ",".join("+".join(f"{_RFC4514.get(k, k)}={_escape(v)}" for k, v in rdn)
                        for rdn in reversed(rdns))

    subject = decoded.get("subject", ())
    cns = [v for rdn in subject for k, v in rdn if k == "commonName"]
    sans = tuple(v for kind, v in decoded.get("subjectAltName", ()) if kind in ("DNS", "email"))
    return CertFacts(subject=name(subject), common_name=cns[0] if cns else "", sans=sans,
                     issuer=name(decoded.get("issuer", ())),
                     serial=int(decoded.get("serialNumber", "0"), 16),
                     not_after=float(ssl.cert_time_to_seconds(decoded["notAfter"])))


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def peer_cert_facts(ssl_object: ssl.SSLObject | None) -> CertFacts | None:
    """Facts of the verified client certificate, or None when none was presented."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509

    return cert_facts(x509.load_der_x509_certificate(der))


def check_key_permissions(path: str, key: str = "tls.ssl_key_file") -> None:
    """PostgreSQL's rule (be-secure-common.c): owned by us with no group/other access, or owned
    by root with at most group read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(key, f"no such file '{path}'") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(key, f"'{path}' is not a regular file")
    if st.st_uid != os.geteuid() and st.st_uid != 0:
        raise ConfigError(key, f"'{path}' must be owned by the proxy's user or root")
    if (st.st_uid == os.geteuid() and st.st_mode & 0o077) or (
        st.st_uid == 0 and st.st_mode & 0o037
    ):
        raise ConfigError(
            key,
            f"'{path}' has group or world access (mode {stat.S_IMODE(st.st_mode):04o}); "
            "chmod 600 it (or 640 if owned by root)",
        )


def _read_pem_certs(path: str, key: str) -> list[x509.Certificate]:
    from cryptography import x509

    data = _read(path, key)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(key, f"'{path}' holds no readable PEM certificate: {exc}") from None
    return certs


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(key, f"no such file '{path}'") from None
    except OSError as exc:
        raise ConfigError(key, f"cannot read '{path}': {exc.strerror}") from None


def _load_crls(tls: TlsConfig) -> list[x509.CertificateRevocationList]:
    from cryptography import x509

    sources: list[tuple[str, str]] = []
    if tls.ssl_crl_file:
        sources.append(("tls.ssl_crl_file", tls.ssl_crl_file))
    if tls.ssl_crl_dir:
        folder = Path(tls.ssl_crl_dir)
        if not folder.is_dir():
            raise ConfigError("tls.ssl_crl_dir", f"no such directory '{folder}'")
        for entry in sorted(folder.iterdir()):
            if entry.suffix in (".crl", ".pem", ".r0") and entry.is_file():
                sources.append(("tls.ssl_crl_dir", str(entry)))
    crls: list[x509.CertificateRevocationList] = []
    for key, path in sources:
        data = _read(path, key)
        try:
            if b"-----BEGIN X509 CRL-----" in data:
                blocks = data.split(b"-----END X509 CRL-----")
                for block in blocks[:-1]:
                    crls.append(x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n"))
            else:
                crls.append(x509.load_der_x509_crl(data))
        except ValueError as exc:
            raise ConfigError(key, f"'{path}' is not a CRL (PEM or DER): {exc}") from None
    return crls


def build_server_tls(tls: TlsConfig, *, cert_requested: bool) -> ServerTls:
    """Everything TLS for the client-facing side, or ConfigError naming the key at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.ssl_min_protocol_version]
    ctx.maximum_version = (
        _VERSIONS[tls.ssl_max_protocol_version]
        if tls.ssl_max_protocol_version
        else ssl.TLSVersion.MAXIMUM_SUPPORTED
    )
    try:
        ctx.set_ciphers(tls.ssl_ciphers)
    except ssl.SSLError:
        raise ConfigError("tls.ssl_ciphers", f"no usable cipher in {tls.ssl_ciphers!r}") from None
    # No compression (CRIME), no renegotiation, server picks the suite; no session tickets, as
    # PostgreSQL (be-secure-openssl.c) — libpq never resumes, tickets would only cost a key.
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET)
    ctx.num_tickets = 0
    resumable = not disable_session_cache(ctx)
    if resumable:
        log.warning("could not switch off the TLS session cache: resumed sessions with a "
                    "client certificate will be refused (their chain cannot be re-checked)")
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])

    server_cert = server_cert_facts(tls.ssl_cert_file)
    check_key_permissions(tls.ssl_key_file)
    key_pem = _read(tls.ssl_key_file, "tls.ssl_key_file")
    password = b""
    if tls.ssl_passphrase_file:
        check_key_permissions(tls.ssl_passphrase_file, "tls.ssl_passphrase_file")
        password = _read(tls.ssl_passphrase_file, "tls.ssl_passphrase_file").rstrip(b"\r\n")
    encrypted = b"ENCRYPTED" in key_pem
    if encrypted and not password:
        raise ConfigError("tls.ssl_key_file",
                          "the key is encrypted: set tls.ssl_passphrase_file")
    try:
        # Always pass a password: without one OpenSSL would prompt on the terminal.
        ctx.load_cert_chain(tls.ssl_cert_file, tls.ssl_key_file, password=password or b"-")
    except ssl.SSLError as exc:
        if encrypted:
            raise ConfigError("tls.ssl_passphrase_file",
                              "wrong passphrase for tls.ssl_key_file") from None
        raise ConfigError("tls.ssl_key_file",
                          f"cannot use the key with tls.ssl_cert_file: {exc.reason}") from None

    ca_certs: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    if tls.ssl_ca_file:
        ca_certs = _read_pem_certs(tls.ssl_ca_file, "tls.ssl_ca_file")
        crls = _load_crls(tls)
    elif tls.ssl_crl_file or tls.ssl_crl_dir:
        raise ConfigError("tls.ssl_crl_file", "a CRL needs tls.ssl_ca_file")
    if cert_requested:
        ctx.load_verify_locations(cafile=tls.ssl_ca_file)
        # Asked for and verified when presented; a missing certificate is refused after the
        # handshake with an ErrorResponse (PostgreSQL does the same), so the client reads why.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        # CRLs are checked after the handshake (check_revocation), not by OpenSSL inside it:
        # a refusal is then an ErrorResponse that names the revoked certificate or the issuer
        # whose CRL is missing, which a TLS alert cannot say (OpenSSL also frees the peer chain
        # of a failed verification, so the log could not name it either).
        if crls:
            _warn_cas_without_crl(ca_certs, crls)
    by_issuer: dict[x509.Name, x509.CertificateRevocationList] = {}
    for crl in crls:  # the newest CRL of each issuer counts
        old = by_issuer.get(crl.issuer)
        if old is None or crl.last_update_utc > old.last_update_utc:
            by_issuer[crl.issuer] = crl
    return ServerTls(
        context=ctx,
        resumable=resumable,
        crl_by_issuer=by_issuer,
        crl_signature_ok={},
        server_cert=server_cert,
        ca_certs=tuple(cert_facts(c) for c in ca_certs),
        crls=tuple(
            CrlFacts(
                issuer=name_to_str(c.issuer),
                next_update=c.next_update_utc.timestamp() if c.next_update_utc else None,
            )
            for c in by_issuer.values()
        ),
    )


def _warn_cas_without_crl(cas: list[x509.Certificate],
                          crls: list[x509.CertificateRevocationList]) -> None:
    issuers = {c.issuer for c in crls}
    for ca in cas:
        if ca.subject not in issuers:
            log.warning("no CRL loaded for CA %s: client certificates chaining to it will be "
                        "refused (CRL checking fails closed)", name_to_str(ca.subject))


def handshake_failure(exc: BaseException) -> tuple[str, str]:
    """(metrics reason, one-line explanation for the log) of a failed server-side handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "client_cert_invalid", f"client certificate invalid: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason:
            return "tls_version", f"TLS handshake failed: {exc.reason}"
        return "tls_handshake", f"TLS handshake failed: {exc.reason or exc}"
    return "tls_handshake", f"TLS handshake failed: {type(exc).__name__}: {exc}"


def verified_chain(ssl_object: ssl.SSLObject) -> list[x509.Certificate]:
    """The chain OpenSSL verified, leaf first, trust anchor last."""
    from cryptography import x509

    getter = getattr(ssl_object, "get_verified_chain", None)  # public from Python 3.13
    if getter is None:
        getter = ssl_object._sslobj.get_verified_chain  # type: ignore[attr-defined]
    return [x509.load_der_x509_certificate(c.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore
            for c in getter() or []]


def _crl_signature_ok(server_tls: ServerTls, crl: x509.CertificateRevocationList,
                      issuer_cert: x509.Certificate) -> bool:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = issuer_cert.public_key()
    cache_key = (crl.issuer, key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    ok = server_tls.crl_signature_ok.get(cache_key)
    if ok is None:
        ok = server_tls.crl_signature_ok[cache_key] = crl.is_signature_valid(
            key)  # type: ignore[arg-type]
    return ok


def check_revocation(server_tls: ServerTls, ssl_object: ssl.SSLObject,
                     now: float) -> tuple[str, str] | None:
    """CRL check of every certificate of a verified client chain, the trust anchor included,
    as OpenSSL's X509_V_FLAG_CRL_CHECK_ALL does: each needs its issuer's CRL (fail closed),
    correctly signed and not past its nextUpdate. Returns (reason, message) or None."""
    if ssl_object.session_reused and server_tls.resumable:
        return ("client_cert_invalid",
                "client certificate refused: resumed TLS session (its chain cannot be re-checked)")
    if not server_tls.crl_by_issuer:
        return None
    chain = verified_chain(ssl_object)
    if not chain:  # fail closed: nothing to check is not "nothing revoked"
        return ("client_cert_invalid", "client certificate refused: no verified chain to check")
    for i, cert in enumerate(chain):
        issuer_cert = chain[i + 1] if i + 1 < len(chain) else cert
        issuer = name_to_str(cert.issuer)
        crl = server_tls.crl_by_issuer.get(cert.issuer)
        if crl is None:
            return ("client_cert_invalid",
                    f"client certificate refused: no CRL loaded for issuer \"{issuer}\" "
                    f"(of \"{name_to_str(cert.subject)}\"); CRL checking fails closed")
        if not _crl_signature_ok(server_tls, crl, issuer_cert):
            return ("client_cert_invalid",
                    f"client certificate refused: the CRL of \"{issuer}\" has a bad signature")
        if crl.next_update_utc is not None and crl.next_update_utc.timestamp() < now:
            return ("client_cert_invalid",
                    f"client certificate refused: the CRL of \"{issuer}\" expired at "
                    f"{crl.next_update_utc.isoformat()}")
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            return ("client_cert_revoked",
                    f"client certificate revoked: \"{name_to_str(cert.subject)}\" serial "
                    f"{cert.serial_number:x} is in the CRL of \"{issuer}\"")
    return None
