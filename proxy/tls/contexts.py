"""TLS objects and certificate facts.

Owns: building the client-facing `ssl.SSLContext` from `[tls]` and a snapshot of its files
(certificate chain, key and its passphrase, CA, versions, ciphers, ALPN) together with the
client-certificate `Verifier` (verify.py), reading facts out of certificates, finding the ALPN
offer of a direct-TLS ClientHello, and naming why a handshake failed. Must not do socket I/O,
read files from disk (snapshot.py does) or decide policy.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.errors import ConfigError
from ..config.schema import BackendConfig, TlsConfig
from ..config.snapshot import Snapshot, as_path
from .verify import CrlFacts, Verifier, load_crls, name_to_str

if TYPE_CHECKING:
    from cryptography import x509

# `cryptography` and pyOpenSSL are imported only where a CA file is configured (client
# certificates, CRLs): they cost ~9 MB of RSS per process, and a plain TLS-terminating worker
# never needs them.

log = logging.getLogger("dwsproxy.tls")

ALPN_POSTGRESQL = "postgresql"
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

@dataclass(frozen=True)
class CertFacts:
    subject: str
    common_name: str
    sans: tuple[str, ...]
    issuer: str
    serial: int
    not_after: float  # Unix time


@dataclass(frozen=True)
class ServerTls:
    context: ssl.SSLContext
    # None without a CA file: then no client certificate is ever asked for
    verifier: Verifier | None
    server_cert: CertFacts
    server_cert_der: bytes  # what SCRAM-SHA-256-PLUS binds to on the client's side
    ca_certs: tuple[CertFacts, ...]
    crls: tuple[CrlFacts, ...]


def cert_facts(cert: x509.Certificate) -> CertFacts:
    """Facts of a parsed certificate. Raises ValueError for one that `cryptography` cannot
    parse although OpenSSL accepted it (e.g. a non-ASCII dNSName): the caller refuses it."""
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
        # URI SANs: SPIFFE IDs (spiffe://trust-domain/path) name workloads, for clientname=SAN
        # and [[ident]] maps
        sans += san.get_values_for_type(x509.UniformResourceIdentifier)
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


def server_cert_facts(pem: bytes, path: str) -> CertFacts:
    """Facts of the first (leaf) certificate of a PEM file, read with the stdlib's decoder so
    that a worker without client certificates never loads `cryptography`. The subject is
    written like cryptography's rfc4514_string (last RDN first), so metric labels agree."""
    key = "tls.ssl_cert_file"
    try:
        with as_path(pem, "server.crt") as readable:
            decoded = ssl._ssl._test_decode_cert(readable)  # type: ignore[attr-defined]
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


def peer_chain(ssl_object: ssl.SSLObject) -> tuple[bytes, tuple[bytes, ...]] | None:
    """(leaf, certificates the client sent after it) in DER, or None without a certificate.
    A resumed TLS 1.2 session has the leaf but no chain: the Verifier then needs the issuer in
    the CA file, so resumption can never skip a check."""
    leaf = ssl_object.getpeercert(binary_form=True)
    if not leaf:
        return None
    sslobj = getattr(ssl_object, "_sslobj", ssl_object)
    getter = getattr(sslobj, "get_unverified_chain", None)  # public from Python 3.13
    sent = (getter() or []) if getter is not None else []
    ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in sent]  # type: ignore[attr-defined]
    return leaf, tuple(d for d in ders if d != leaf)


def peer_cert_facts(leaf_der: bytes) -> CertFacts:
    """Facts of the client's certificate; ValueError when `cryptography` cannot parse it."""
    from cryptography import x509

    return cert_facts(x509.load_der_x509_certificate(leaf_der))


def _pem_certs(data: bytes, path: str, key: str) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(key, f"'{path}' holds no readable PEM certificate: {exc}") from None


def build_server_tls(tls: TlsConfig, snap: Snapshot, *, cert_requested: bool) -> ServerTls:
    """Everything TLS for the client-facing side from a snapshot's bytes, or ConfigError
    naming the key at fault."""
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
    # A TLS 1.2 session-ID resumption is still possible (Python cannot switch OpenSSL's server
    # cache off without poking at its memory); it skips nothing: every presented certificate
    # is checked again by the Verifier, resumed or not.
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET)
    ctx.num_tickets = 0
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    ctx.sni_callback = _refuse_without_alpn

    cert_pem = snap.read(tls.ssl_cert_file, "tls.ssl_cert_file")
    server_cert = server_cert_facts(cert_pem, tls.ssl_cert_file)
    pair = key_pair(tls.ssl_key_cipher_file, tls.ssl_key_rand_file, tls.ssl_key_file, "server")
    load_key(ctx, snap, cert_pem, ("tls.ssl_cert_file", tls.ssl_cert_file),
             ("tls.ssl_key_file", tls.ssl_key_file),
             ("tls.ssl_passphrase_file", tls.ssl_passphrase_file),
             (("tls.ssl_key_cipher_file", pair[0]), ("tls.ssl_key_rand_file", pair[1])))

    verifier = None
    ca_facts: tuple[CertFacts, ...] = ()
    crl_facts: tuple[CrlFacts, ...] = ()
    if tls.ssl_ca_file:
        ca_pem = snap.read(tls.ssl_ca_file, "tls.ssl_ca_file")
        ca_certs = _pem_certs(ca_pem, tls.ssl_ca_file, "tls.ssl_ca_file")
        crls = load_crls(snap, tls.ssl_crl_file, tls.ssl_crl_dir)
        verifier = Verifier(ca_certs, crls)
        ca_facts = tuple(cert_facts(c) for c in ca_certs)
        crl_facts = verifier.crl_facts
        if crls.usable:
            _warn_cas_without_crl(ca_certs, crls.usable)
        if cert_requested:
            ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
            # Asked for and verified when presented; a missing certificate is refused after
            # the handshake with an ErrorResponse (PostgreSQL does the same), so the client
            # reads why. CRLs are the Verifier's, after the handshake, for the same reason.
            ctx.verify_mode = ssl.CERT_OPTIONAL
    elif tls.ssl_crl_file or tls.ssl_crl_dir:
        raise ConfigError("tls.ssl_crl_file", "a CRL needs tls.ssl_ca_file")
    begin = max(cert_pem.find(b"-----BEGIN CERTIFICATE-----"), 0)
    leaf_pem = cert_pem[begin:].split(b"-----END CERTIFICATE-----", 1)[0] + (
        b"-----END CERTIFICATE-----\n")
    return ServerTls(context=ctx, verifier=verifier, server_cert=server_cert,
                     server_cert_der=ssl.PEM_cert_to_DER_cert(leaf_pem.decode("ascii",
                                                                             "replace")),
                     ca_certs=ca_facts, crls=crl_facts)


def load_key(ctx: ssl.SSLContext, snap: Snapshot, cert_pem: bytes, cert: tuple[str, str],
             key: tuple[str, str], passphrase_file: tuple[str, str],
             pair: tuple[tuple[str, str], tuple[str, str]]) -> None:
    """Load a certificate and its key into `ctx`. The key's passphrase comes from a passphrase
    file, or from an openGauss .cipher/.rand pair when the snapshot holds one (configured, or
    found beside the key / certificate as openGauss and gsql look). Errors name the key at
    fault, never the secret."""
    from . import gausskey

    key_pem = snap.read(key[1], key[0])
    password = b""
    (cipher_key, cipher_path), (rand_key, rand_path) = pair
    if passphrase_file[1]:
        password = snap.read(passphrase_file[1], passphrase_file[0]).rstrip(b"\r\n")
    elif snap.has(cipher_path) and snap.has(rand_path):
        try:
            password = gausskey.decode(snap.read(cipher_path, cipher_key),
                                       snap.read(rand_path, rand_key),
                                       cipher_name=f"'{cipher_path}'", rand_name=f"'{rand_path}'")
        except gausskey.PairError as exc:
            raise ConfigError(rand_key, str(exc)) from None
    encrypted = b"ENCRYPTED" in key_pem
    if encrypted and not password:
        raise ConfigError(key[0], f"the key is encrypted: set {passphrase_file[0]} or give the "
                          f"{cipher_key}/{rand_key} pair")
    try:
        # Always pass a password: without one OpenSSL would prompt on the terminal.
        with as_path(cert_pem, "cert") as cert_path, as_path(key_pem, "key") as kp:
            ctx.load_cert_chain(cert_path, kp, password=password or b"-")
    except ssl.SSLError as exc:
        if encrypted:
            # A wrong .rand usually fails gausskey's checks, but it has no MAC: about one in
            # 256 decodes to a wrong passphrase, which OpenSSL refuses here. Name the file.
            source, path = ((passphrase_file[0], passphrase_file[1]) if passphrase_file[1]
                            else (rand_key, rand_path))
            raise ConfigError(source, f"wrong passphrase for {key[0]} (from '{path}')") from None
        raise ConfigError(key[0], f"cannot use the key with {cert[0]}: {exc.reason}") from None


def key_pair(cfg_cipher: str, cfg_rand: str, beside: str, stem: str) -> tuple[str, str]:
    """The .cipher/.rand pair of a key: as configured, else `<stem>.key.cipher/.rand` in the
    folder of `beside` (openGauss looks beside ssl_key_file; gsql beside sslcert)."""
    if cfg_cipher:
        return cfg_cipher, cfg_rand
    folder = os.path.dirname(beside)
    return (os.path.join(folder, f"{stem}.key.cipher"),
            os.path.join(folder, f"{stem}.key.rand"))


@dataclass(frozen=True)
class BackendTls:
    """The proxy as a TLS client of the database ([backend] sslmode and friends)."""

    context: ssl.SSLContext
    sslmode: str  # as configured: prefer falls back to plaintext on N
    direct: bool  # sslnegotiation = direct: TLS from the first byte, ALPN postgresql
    ca_certs: tuple[CertFacts, ...]
    client_cert: CertFacts | None
    sslsni: bool = True

    def server_hostname(self, host: str) -> str | None:
        """SNI and the name verify-full checks, for one host of a host list (each host is
        checked against its own name, as libpq does per host). An IP address is checked
        (IP SANs) but never sent as SNI (RFC 6066 3)."""
        try:
            ipaddress.ip_address(host)
            return host if self.context.check_hostname else None
        except ValueError:
            return host if (self.sslsni or self.context.check_hostname) else None


def build_backend_tls(b: BackendConfig, snap: Snapshot) -> BackendTls:
    """libpq's sslmode meanings: require checks nothing unless sslrootcert is set (then as
    verify-ca); verify-ca checks the chain; verify-full also the host name (SAN, or CN without
    SANs; IP SANs for an address)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[b.ssl_min_protocol_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    verify = b.sslmode in ("verify-ca", "verify-full") or (
        b.sslmode in ("require", "prefer") and bool(b.sslrootcert))
    ctx.check_hostname = b.sslmode == "verify-full"
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    ca_facts: tuple[CertFacts, ...] = ()
    if verify:
        ca_pem = snap.read(b.sslrootcert, "backend.sslrootcert")
        ca_certs = _pem_certs(ca_pem, b.sslrootcert, "backend.sslrootcert")
        ca_facts = tuple(cert_facts(c) for c in ca_certs)
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        if b.sslcrl:
            crl_pem = snap.read(b.sslcrl, "backend.sslcrl")
            try:
                with as_path(crl_pem, "backend.crl") as crl_path:
                    ctx.load_verify_locations(cafile=crl_path)
            except ssl.SSLError as exc:
                raise ConfigError("backend.sslcrl", f"'{b.sslcrl}' is not a PEM CRL: "
                                  f"{exc.reason}") from None
            # libpq: X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL with sslcrl
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    client: CertFacts | None = None
    if b.sslcert:
        cert_pem = snap.read(b.sslcert, "backend.sslcert")
        client = cert_facts(_pem_certs(cert_pem, b.sslcert, "backend.sslcert")[0])
        pair = key_pair(b.sslkey_cipher_file, b.sslkey_rand_file, b.sslcert, "client")
        load_key(ctx, snap, cert_pem, ("backend.sslcert", b.sslcert),
                 ("backend.sslkey", b.sslkey), ("backend.sslpassword_file", b.sslpassword_file),
                 (("backend.sslkey_cipher_file", pair[0]),
                  ("backend.sslkey_rand_file", pair[1])))
    direct = b.sslnegotiation == "direct"
    if direct:
        ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    return BackendTls(context=ctx, sslmode=b.sslmode, direct=direct,
                      ca_certs=ca_facts, client_cert=client, sslsni=b.sslsni)


def _warn_cas_without_crl(cas: list[x509.Certificate],
                          crls: tuple[x509.CertificateRevocationList, ...]) -> None:
    issuers = {c.issuer for c in crls}
    for ca in cas:
        if ca.subject not in issuers:
            log.warning("no CRL loaded for CA %s: client certificates chaining to it will be "
                        "refused (CRL checking fails closed)", name_to_str(ca.subject))


# -- direct TLS and ALPN ---------------------------------------------------------------------
# PostgreSQL 17 requires ALPN "postgresql" on direct TLS (against cross-protocol attacks) and
# refuses a ClientHello that offers other protocols with the no_application_protocol alert
# (be-secure-openssl.c alpn_cb). Python's ALPN callback only ever declines (NOACK), so the offer
# is read from the ClientHello record before OpenSSL sees it, and OpenSSL itself is made to
# send the alert: a servername callback that returns an alert aborts the handshake with it.
ALERT_NO_APPLICATION_PROTOCOL = 120
_REFUSE_ALPN = "_dwsproxy_refuse_alpn"


def refuse_alpn(ssl_object: ssl.SSLObject) -> None:
    """Make this connection's handshake fail with no_application_protocol."""
    setattr(ssl_object, _REFUSE_ALPN, True)


def _refuse_without_alpn(ssl_object: ssl.SSLObject, _name: str | None,
                         _ctx: ssl.SSLContext) -> int | None:
    return ALERT_NO_APPLICATION_PROTOCOL if getattr(ssl_object, _REFUSE_ALPN, False) else None


TLS_RECORD_HEADER = 5
TLS_MAX_RECORD = 16384 + 2048  # a TLSPlaintext record's limit, with room for an expansion
CLIENT_HELLO_MAX = 64 * 1024  # a ClientHello with post-quantum key shares is a few KiB
CLIENT_HELLO_MAX_RECORDS = 8


def client_hello_alpn(handshake: bytes) -> tuple[bytes, ...] | None:
    """The ALPN protocols offered in a ClientHello handshake message (its records' payloads
    joined); () when it offers none; None when it is not a well-formed ClientHello (the
    connection is then refused like one without ALPN)."""
    try:
        if handshake[0] != 1:  # client_hello
            return None
        body = handshake[4:4 + int.from_bytes(handshake[1:4], "big")]
        pos = 2 + 32  # legacy_version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + struct.unpack_from("!H", body, pos)[0]  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos == len(body):
            return ()  # no extensions at all
        if pos > len(body):
            return None
        (ext_total,) = struct.unpack_from("!H", body, pos)
        pos += 2
        end = pos + ext_total
        if end > len(body):
            return None
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", body, pos)
            pos += 4
            if pos + ext_len > end:
                return None
            if ext_type == 16:  # application_layer_protocol_negotiation (RFC 7301)
                names = []
                (list_len,) = struct.unpack_from("!H", body, pos)
                at, stop = pos + 2, min(pos + 2 + list_len, pos + ext_len)
                while at < stop:
                    size = body[at]
                    names.append(bytes(body[at + 1:at + 1 + size]))
                    at += 1 + size
                return tuple(names)
            pos += ext_len
        return ()
    except (IndexError, struct.error):
        return None


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


