"""Client certificates after the handshake: OpenSSL's own chain and CRL verification.

Owns: reading CRLs out of a snapshot (a file, a folder) and what makes one usable; one
X509_STORE (pyOpenSSL) per configuration holding the CA file and those CRLs; checking a
presented chain against it for every connection that shows a certificate, resumed sessions
included; and turning OpenSSL's verdict into a refusal that names the certificate or issuer.
Must not do I/O or decide policy.

Why OpenSSL and not our own CRL rules: a CRL is only as good as its scope, its kind (complete,
delta, CA-only), its validity window and its critical extensions, and OpenSSL's X509_STORE
already knows all of them. Its defaults do not: without X509_V_FLAG_EXTENDED_CRL_SUPPORT it
ignores issuing-distribution-point scopes and can take a delta CRL for a complete one, and it
accepts a CRL without nextUpdate, which the contract's "currently valid" forbids: such a CRL is
left out here, so its issuer has no usable CRL and its certificates are refused (fail closed).

The handshake (ssl, CERT_OPTIONAL) has already checked the chain without CRLs; checking again
here, after it, lets the refusal be an ErrorResponse that names what is wrong, which a TLS alert
cannot say.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ..config.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509
    from OpenSSL import crypto

    from ..config.snapshot import Snapshot

log = logging.getLogger("dwsproxy.tls")

# X509_V_FLAG_* (openssl/x509_vfy.h) that Python's bindings have no name for.
X509_V_FLAG_EXTENDED_CRL_SUPPORT = 0x1000
X509_V_FLAG_USE_DELTAS = 0x2000

# X509_V_ERR_* codes (openssl/x509_vfy.h) that get their own message.
_UNABLE_TO_GET_CRL = 3
_CRL_SIGNATURE_FAILURE = 8
_CRL_NOT_YET_VALID = 11
_CRL_HAS_EXPIRED = 12
_CERT_REVOKED = 23
_UNHANDLED_CRITICAL_CRL_EXTENSION = 36
_DIFFERENT_CRL_SCOPE = 44
# The failures that time alone causes (x509_vfy.h): a certificate or CRL that expired (or is
# not yet valid) since an open session's handshake does not end it; every other failure does.
# A list of the codes that mean "distrusted" instead would be steerable: OpenSSL builds the path
# from certificates the client chose to send, and a forged issuer turns a removed CA into a
# signature or CRL failure that no such list names.
_TIME_ONLY = frozenset({
    9,  # X509_V_ERR_CERT_NOT_YET_VALID
    10,  # X509_V_ERR_CERT_HAS_EXPIRED
    11,  # X509_V_ERR_CRL_NOT_YET_VALID
    12,  # X509_V_ERR_CRL_HAS_EXPIRED
})

_PEM_CRL_END = b"-----END X509 CRL-----"


class CertVerdict(NamedTuple):
    """Why a presented certificate is refused. `hint` is set when the fault is the proxy's
    own (its CRL expired, none usable): the client cannot fix that, the operator must; ""
    leaves the policy's hint, which tells the client to fix its certificate."""

    reason: str
    message: str
    hint: str = ""


@dataclass(frozen=True)
class CrlFacts:
    issuer: str
    next_update: float | None


def name_to_str(name: x509.Name) -> str:
    return name.rfc4514_string()


def parse_crls(data: bytes, path: str, key: str) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (any number of blocks) or one DER CRL; [] for a PEM file with
    no CRL in it (a certificate in a shared folder); ConfigError for anything else."""
    from cryptography import x509

    try:
        if b"-----BEGIN" in data:
            blocks = data.split(_PEM_CRL_END)[:-1]
            if data.count(b"-----BEGIN X509 CRL-----") != len(blocks):
                raise ValueError("a CRL block is not terminated (a half-written file?)")
            return [x509.load_pem_x509_crl(block + _PEM_CRL_END + b"\n") for block in blocks]
        return [x509.load_der_x509_crl(data)]
    except ValueError as exc:
        raise ConfigError(key, f"'{path}' is not a CRL (PEM or DER): {exc}") from None


@dataclass(frozen=True)
class LoadedCrls:
    usable: tuple[x509.CertificateRevocationList, ...]
    # issuer (RFC 4514) -> why a CRL of it was left out, to say so when its certificates fail
    left_out: dict[str, str]


def load_crls(snap: Snapshot, crl_file: str, crl_dir: str) -> LoadedCrls:
    """The CRLs of `ssl_crl_file` and of every file in `ssl_crl_dir`. A configured source that
    yields no usable CRL is a config error naming it: it must never turn revocation off."""
    usable: list[x509.CertificateRevocationList] = []
    left_out: dict[str, str] = {}
    sources: list[tuple[str, str, list[str]]] = []
    if crl_file:
        sources.append(("tls.ssl_crl_file", crl_file, [crl_file]))
    if crl_dir:
        sources.append(("tls.ssl_crl_dir", crl_dir, list(snap.listdir(crl_dir,
                                                                     "tls.ssl_crl_dir"))))
    for key, where, paths in sources:
        found = 0
        for path in paths:
            data = snap.read(path, key)
            try:
                crls = parse_crls(data, path, key)
            except ConfigError as exc:
                if key == "tls.ssl_crl_file" or _looks_like_crl(path, data):
                    # a half-written new CRL must not leave the old one in force unnoticed
                    raise
                log.warning("%s: skipped, not a CRL: %s", key, exc)
                continue
            if not crls and key == "tls.ssl_crl_file":
                raise ConfigError(key, f"'{path}' holds no CRL")
            if not crls:
                log.warning("%s: '%s' holds no CRL: skipped", key, path)
            for crl in crls:
                issuer = name_to_str(crl.issuer)
                if crl.next_update_utc is None:
                    # OpenSSL would take it as valid for ever; the contract says "currently
                    # valid", which needs an end.
                    left_out[issuer] = f"its CRL in '{path}' has no nextUpdate and is not used"
                    log.warning("%s: the CRL of \"%s\" in '%s' has no nextUpdate: not used "
                                "(certificates it covers are refused)", key, issuer, path)
                    continue
                usable.append(crl)
                found += 1
        if not found:
            what = "folder" if key == "tls.ssl_crl_dir" else "file"
            raise ConfigError(key, f"the {what} '{where}' yields no usable CRL (PEM or DER "
                              "X.509 CRLs with a nextUpdate); CRL checking cannot be on "
                              "without one")
    _refuse_unusable_deltas(usable, "tls.ssl_crl_dir" if crl_dir else "tls.ssl_crl_file")
    return LoadedCrls(tuple(usable), left_out)


def _looks_like_crl(path: str, data: bytes) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    return (b"-----BEGIN X509 CRL-----" in data or suffix in ("crl", "der")
            or (len(suffix) == 2 and suffix[0] == "r" and suffix[1].isdigit()))


def _refuse_unusable_deltas(crls: list[x509.CertificateRevocationList], key: str) -> None:
    """OpenSSL applies a delta CRL only when the base CRL (or the certificate) carries a
    Freshest CRL extension (x509_vfy.c get_delta_sk): otherwise a delta that revokes a
    certificate is loaded and silently has no effect. Such a delta that revokes anything its
    complete CRLs do not is refused at load; one that adds nothing is only logged."""
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID

    def has(crl: x509.CertificateRevocationList, oid: x509.ObjectIdentifier) -> bool:
        try:
            crl.extensions.get_extension_for_oid(oid)
            return True
        except x509.ExtensionNotFound:
            return False

    for delta in crls:
        if not has(delta, ExtensionOID.DELTA_CRL_INDICATOR):
            continue
        bases = [c for c in crls if c.issuer == delta.issuer
                 and not has(c, ExtensionOID.DELTA_CRL_INDICATOR)]
        if any(has(b, ExtensionOID.FRESHEST_CRL) for b in bases):
            continue
        issuer = name_to_str(delta.issuer)
        known = {r.serial_number for b in bases for r in b}
        lost = [r.serial_number for r in delta if r.serial_number not in known]
        if lost:
            raise ConfigError(key, f"a delta CRL of \"{issuer}\" revokes serial {lost[0]:x}"
                              f"{f' and {len(lost) - 1} more' if len(lost) > 1 else ''}, but "
                              "OpenSSL would ignore it: no complete CRL of that issuer has a "
                              "Freshest CRL extension; merge it into a complete CRL")
        log.warning("%s: a delta CRL of \"%s\" is not used (no Freshest CRL extension in its "
                    "complete CRL); it revokes nothing more", key, issuer)


class Verifier:
    """The X509_STORE of one configuration: trusted CAs, CRLs, flags. Built once, shared by
    every session of that configuration (a store context is made per check)."""

    def __init__(self, ca_certs: Sequence[x509.Certificate], crls: LoadedCrls) -> None:
        from OpenSSL import crypto

        self.store = crypto.X509Store()
        for ca in ca_certs:
            self.store.add_cert(crypto.X509.from_cryptography(ca))
        for crl in crls.usable:
            self.store.add_crl(crl)
        self.crl_checking = bool(crls.usable) or bool(crls.left_out)
        if self.crl_checking:
            self.store.set_flags(crypto.X509StoreFlags.CRL_CHECK
                                 | crypto.X509StoreFlags.CRL_CHECK_ALL
                                 | X509_V_FLAG_EXTENDED_CRL_SUPPORT | X509_V_FLAG_USE_DELTAS)
        self.left_out = crls.left_out
        self.next_update: dict[str, dt.datetime] = {}
        for crl in crls.usable:
            issuer, end = name_to_str(crl.issuer), crl.next_update_utc
            if end is not None and (issuer not in self.next_update
                                    or end > self.next_update[issuer]):
                self.next_update[issuer] = end
        self.crl_facts = tuple(CrlFacts(issuer, end.timestamp())
                               for issuer, end in sorted(self.next_update.items()))

    def check(self, leaf_der: bytes, chain_ders: Iterable[bytes]) -> CertVerdict | None:
        """The refusal when OpenSSL refuses the chain now, else None."""
        from OpenSSL import crypto

        leaf = crypto.load_certificate(crypto.FILETYPE_ASN1, leaf_der)
        chain = [crypto.load_certificate(crypto.FILETYPE_ASN1, der) for der in chain_ders]
        try:
            crypto.X509StoreContext(self.store, leaf, chain).verify_certificate()
        except crypto.X509StoreContextError as exc:
            return self._explain(exc)
        return None

    def still_trusts(self, leaf_der: bytes,
                     chain_ders: Iterable[bytes]) -> tuple[str, str] | None:
        """For an open session after a reload: (reason, message) when this configuration
        refuses its chain for any reason but time (revoked, its CA removed, no usable CRL, a
        forged issuer that no longer verifies), which ends the session; None otherwise. Time
        alone (the certificate or a CRL expiring since the handshake) does not end a session,
        as PostgreSQL checks a certificate only at connection: new connections are refused
        for it, open ones are not cut."""
        from OpenSSL import crypto

        leaf = crypto.load_certificate(crypto.FILETYPE_ASN1, leaf_der)
        chain = [crypto.load_certificate(crypto.FILETYPE_ASN1, der) for der in chain_ders]
        try:
            crypto.X509StoreContext(self.store, leaf, chain).verify_certificate()
        except crypto.X509StoreContextError as exc:
            code = exc.errors[0] if len(exc.errors) == 3 else 0
            if code in _TIME_ONLY:
                return None
            if code == _CERT_REVOKED:
                verdict = self._explain(exc)
                return verdict.reason, verdict.message
            subject, issuer, _serial = _describe(exc.certificate)
            text = exc.errors[2] if len(exc.errors) == 3 else str(exc)
            return ("client_cert_invalid",
                    f"client certificate no longer trusted by the configuration in force: "
                    f"{text} (\"{subject}\", issuer \"{issuer}\")")
        return None

    def _explain(self, exc: crypto.X509StoreContextError) -> CertVerdict:
        code, _depth, text = exc.errors if len(exc.errors) == 3 else (0, 0, str(exc))
        subject, issuer, serial = _describe(exc.certificate)
        of = f"\"{issuer}\" (of \"{subject}\")"
        if code == _CERT_REVOKED:
            return CertVerdict("client_cert_revoked",
                               f"client certificate revoked: \"{subject}\" serial {serial} is "
                               f"in the CRL of \"{issuer}\"")
        # From here on a CRL problem is the proxy's, not the client's: the hint says so, so
        # that nobody reissues a good client certificate for a CRL the operator let lapse.
        if code in (_UNABLE_TO_GET_CRL, _DIFFERENT_CRL_SCOPE):
            why = self.left_out.get(issuer, "")
            scope = " covering it" if code == _DIFFERENT_CRL_SCOPE else ""
            return CertVerdict("client_cert_invalid",
                               f"client certificate refused: no usable CRL{scope} of issuer "
                               f"{of}" + (f": {why}" if why else "")
                               + "; CRL checking fails closed",
                               f"the proxy has no usable CRL for \"{issuer}\"; the operator "
                               "must install one")
        if code == _CRL_HAS_EXPIRED:
            end = self.next_update.get(issuer)
            when = f" at {_stamp(end)}" if end is not None else ""
            return CertVerdict("client_cert_invalid",
                               f"client certificate refused: the CRL of {of} expired{when}",
                               f"the proxy's CRL for \"{issuer}\" expired{when}; the operator "
                               "must renew it")
        problems = {
            _CRL_NOT_YET_VALID: "is not yet valid (its thisUpdate is in the future)",
            _CRL_SIGNATURE_FAILURE: "has a bad signature",
            _UNHANDLED_CRITICAL_CRL_EXTENSION: "has a critical extension OpenSSL does not "
                                               "handle",
        }
        if code in problems:
            return CertVerdict("client_cert_invalid",
                               f"client certificate refused: the CRL of {of} {problems[code]}",
                               f"the proxy's CRL for \"{issuer}\" {problems[code]}; the "
                               "operator must replace it")
        return CertVerdict("client_cert_invalid",
                           f"client certificate invalid: {text} (\"{subject}\")")


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(cert: crypto.X509 | None) -> tuple[str, str, str]:
    """(subject, issuer, serial in hex) of the certificate OpenSSL names, as far as they parse."""
    if cert is None:
        return "?", "?", "?"
    serial = f"{cert.get_serial_number():x}"
    try:
        parsed = cert.to_cryptography()
        return name_to_str(parsed.subject), name_to_str(parsed.issuer), serial
    except Exception:  # ValueError, and x509.InvalidVersion for a version-2 certificate
        return "(unparseable)", "(unparseable)", serial
