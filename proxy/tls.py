"""TLS objects and certificate facts.

Owns: building the client-facing `ssl.SSLContext` from `[tls]` (certificate chain, key and its
passphrase, CA, CRLs, versions, ciphers, ALPN), checking key-file permissions the way PostgreSQL
does, reading facts out of certificates and CRLs with `cryptography`, and naming why a handshake
failed. Must not do socket I/O or decide policy.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID

from .config import ConfigError, TlsConfig

log = logging.getLogger("dwsproxy.tls")

ALPN_POSTGRESQL = "postgresql"
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

# OpenSSL X509_V_ERR_* codes that the metrics and messages tell apart (x509_vfy.h).
X509_V_ERR_UNABLE_TO_GET_CRL = 3
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_CRL_HAS_EXPIRED = 12
X509_V_ERR_CERT_REVOKED = 23


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
    server_cert: CertFacts
    ca_certs: tuple[CertFacts, ...]
    crls: tuple[CrlFacts, ...]


class ChainCapturingSSLObject(ssl.SSLObject):
    """Keeps the client's unverified chain on a failed verification, so that the log can say
    which certificate (and which issuer without a CRL) was refused. asyncio and uvloop both create
    their SSLObject through `SSLContext.wrap_bio`, which honours `sslobject_class`; the chain
    accessor is CPython's private `_ssl._SSLSocket.get_unverified_chain` (public from 3.13)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except ssl.SSLCertVerificationError as exc:
            try:
                chain = self._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
                exc.dwsproxy_chain = [c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore
                                      for c in chain]
            except Exception:  # diagnostics only: never turn a refusal into a crash
                pass
            raise


def name_to_str(name: x509.Name) -> str:
    return name.rfc4514_string()


def cert_facts(cert: x509.Certificate) -> CertFacts:
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


def peer_cert_facts(ssl_object: ssl.SSLObject | None) -> CertFacts | None:
    """Facts of the verified client certificate, or None when none was presented."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
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
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    ctx.sslobject_class = ChainCapturingSSLObject

    server_certs = _read_pem_certs(tls.ssl_cert_file, "tls.ssl_cert_file")
    check_key_permissions(tls.ssl_key_file)
    key_pem = _read(tls.ssl_key_file, "tls.ssl_key_file")
    password = b""
    if tls.ssl_passphrase_file:
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
        if crls:
            _load_crls_into(ctx, crls)
            # Every CA in the chain must have a CRL: fail closed, as PostgreSQL does.
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
            _warn_cas_without_crl(ca_certs, crls)
    return ServerTls(
        context=ctx,
        server_cert=cert_facts(server_certs[0]),
        ca_certs=tuple(cert_facts(c) for c in ca_certs),
        crls=tuple(
            CrlFacts(
                issuer=name_to_str(c.issuer),
                next_update=c.next_update_utc.timestamp() if c.next_update_utc else None,
            )
            for c in crls
        ),
    )


def _load_crls_into(ctx: ssl.SSLContext, crls: list[x509.CertificateRevocationList]) -> None:
    # load_verify_locations(cadata=) takes certificates only; a PEM file may hold CRLs, so the
    # CRLs (PEM or DER in the sources) go through one private temporary PEM file.
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)
    with tempfile.NamedTemporaryFile(prefix="dwsproxy-crl-", suffix=".pem") as tmp:
        tmp.write(pem)
        tmp.flush()
        ctx.load_verify_locations(cafile=tmp.name)


def _warn_cas_without_crl(cas: list[x509.Certificate],
                          crls: list[x509.CertificateRevocationList]) -> None:
    issuers = {c.issuer for c in crls}
    for ca in cas:
        if ca.subject not in issuers:
            log.warning("no CRL loaded for CA %s: client certificates chaining to it will be "
                        "refused (CRL checking fails closed)", name_to_str(ca.subject))


def handshake_failure(exc: BaseException, crls: tuple[CrlFacts, ...] = ()) -> tuple[str, str]:
    """(metrics reason, one-line explanation for the log) of a failed server-side handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        chain = [x509.load_der_x509_certificate(d) for d in getattr(exc, "dwsproxy_chain", [])]
        leaf = f" subject={name_to_str(chain[0].subject)!r}" if chain else ""
        if code == X509_V_ERR_CERT_REVOKED:
            return "client_cert_revoked", f"client certificate revoked{leaf}"
        if code == X509_V_ERR_UNABLE_TO_GET_CRL:
            loaded = {c.issuer for c in crls}
            missing = [name_to_str(c.issuer) for c in chain
                       if name_to_str(c.issuer) not in loaded]
            which = f" issuer without a CRL: {missing[0]!r}" if missing else ""
            return "client_cert_invalid", (
                f"client certificate refused: no CRL loaded for a CA in its chain;{which}{leaf}")
        return "client_cert_invalid", f"client certificate invalid: {exc.verify_message}{leaf}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason:
            return "tls_version", f"TLS handshake failed: {exc.reason}"
        return "tls_handshake", f"TLS handshake failed: {exc.reason or exc}"
    return "tls_handshake", f"TLS handshake failed: {type(exc).__name__}: {exc}"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
