"""CRLs of every kind the revocation tests need, made on the fly: complete, delta, CA-only (ARL),
with an unknown critical extension, not yet valid, expired, and without nextUpdate (which
`cryptography` refuses to build, so it is re-encoded and re-signed here)."""

from __future__ import annotations

import base64
import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ObjectIdentifier

CA = tuple  # (certificate, private key), as proxy.certs makes them
ARL_SCOPE = x509.IssuingDistributionPoint(
    full_name=None, relative_name=None, only_contains_user_certs=False,
    only_contains_ca_certs=True, only_some_reasons=None, indirect_crl=False,
    only_contains_attribute_certs=False)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_crl(ca: CA, serials: list[int] = (), *, number: int = 1,  # type: ignore[assignment]
             delta_of: int | None = None, scope: x509.IssuingDistributionPoint | None = None,
             critical_unknown: bool = False, this_update: dt.datetime | None = None,
             next_update: dt.datetime | None = None) -> x509.CertificateRevocationList:
    this = this_update or now() - dt.timedelta(minutes=5)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca[0].subject)
               .last_update(this)
               .next_update(next_update or this + dt.timedelta(days=7))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca[1].public_key()), critical=False))
    if delta_of is not None:
        builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
    if scope is not None:
        builder = builder.add_extension(scope, critical=True)
    if critical_unknown:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"),
            critical=True)
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(this).build())
    return builder.sign(ca[1], hashes.SHA256())


# -- a CRL without nextUpdate: drop the field from the DER and sign again ----------------------
def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end) of the DER element at pos."""
    tag, first = data[pos], data[pos + 1]
    if first < 0x80:
        return tag, pos + 2, pos + 2 + first
    n = first & 0x7F
    length = int.from_bytes(data[pos + 2:pos + 2 + n], "big")
    return tag, pos + 2 + n, pos + 2 + n + length


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def without_next_update(ca: CA, serials: list[int] = (),  # type: ignore[assignment]
                        this_update: dt.datetime | None = None) -> bytes:
    """PEM of a CRL whose TBSCertList has no nextUpdate, signed by `ca` (ECDSA)."""
    der = make_crl(ca, serials, this_update=this_update).public_bytes(Encoding.DER)
    _, body, _ = _tlv(der, 0)  # CertificateList
    _, tbs_start, tbs_end = _tlv(der, body)
    tbs_elem_start = body
    alg_start = tbs_end
    _, _, alg_end = _tlv(der, alg_start)
    sig_alg = der[alg_start:alg_end]
    fields, pos = [], tbs_start
    while pos < tbs_end:
        tag, _, end = _tlv(der, pos)
        fields.append((tag, der[pos:end]))
        pos = end
    assert der[tbs_elem_start] == 0x30
    # version, signature, issuer, thisUpdate, nextUpdate (a Time: 0x17/0x18), ...
    times = [i for i, (tag, _) in enumerate(fields) if tag in (0x17, 0x18)]
    assert len(times) == 2, times
    del fields[times[1]]
    tbs = _der(0x30, b"".join(raw for _, raw in fields))
    key = ca[1]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    der = _der(0x30, tbs + sig_alg + _der(0x03, b"\x00" + signature))
    text = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(text[i:i + 64] for i in range(0, len(text), 64))
    return b"-----BEGIN X509 CRL-----\n" + lines + b"\n-----END X509 CRL-----\n"
