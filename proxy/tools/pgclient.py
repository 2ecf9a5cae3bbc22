"""One libpq-like connection of `dwsproxy probe`, over a blocking socket with a deadline.

Owns: what libpq 15 does in one sslmode (fe-connect.c PQconnectPoll: `allow` retries with SSL
and `prefer` without it when the first try fails before authentication ends; the connect
timeout bounds the whole try of one host), the TLS context libpq builds (fe-secure-openssl.c:
the chain is checked whenever the root certificate file exists; verify-full's host-name rules
of libpq 14+, IP SANs included), authentication (cleartext, md5, SCRAM through `scramp` with
SASLprep and libpq's channel_binding rules). The socket and its strict reading are
`channel`'s.
Must not: guess. A cell is what really happened; bytes that are not PostgreSQL stay
`NotPostgres` (from `channel`) instead of becoming a refusal; no query is ever sent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any

import scramp

from ..protocol import wire
from .channel import Channel, Evidence, Silent, Unreachable, error_text, expired, ssl_text
from .conninfo import Target, default_file

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
APPLICATION_NAME = "dwsproxy-probe"
_PRE_AUTH = frozenset(b"REv")  # PQconnectPoll, CONNECTION_AWAITING_RESPONSE
_POST_AUTH = frozenset(b"SKZENv")  # ParameterStatus, BackendKeyData, ReadyForQuery, ...
_AUTH_NAMES = {2: "Kerberos V5", 7: "GSSAPI", 9: "SSPI"}


# -- libpq 14+ verify-full (fe-secure-common.c, fe-secure-openssl.c) ----------------------

def _wildcard_match(pattern: str, host: str) -> bool:
    if len(pattern) < 3 or not pattern.startswith("*.") or len(pattern) > len(host):
        return False
    start = len(host) - len(pattern) + 1
    if pattern[1:].lower() != host[start:].lower():
        return False
    # no dot left of where the pattern matched: `*` stands for exactly one label
    return host.index(".") >= start - 1


def _name_matches(name: str, host: str) -> bool:
    if "\0" in name:
        return False  # libpq refuses a certificate name with an embedded NUL
    return name.lower() == host.lower() or (name.startswith("*.") and
                                            _wildcard_match(name, host))


def hostname_matches(cert: Any, host: str) -> bool:
    """libpq 14+: dNSName SANs by name (one leading `*.` label), iPAddress SANs by address
    when the host is an address; the CN only when no SAN of the host's own kind exists."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [str(n) for n in sans.get_values_for_type(x509.DNSName)]
        ips = list(sans.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = [], []
    if any(_name_matches(n, host) for n in dns):
        return True
    if ip is not None and any(a.packed == ip.packed for a in ips):
        return True
    check_cn = not ips if ip is not None else not dns
    if check_cn:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return any(_name_matches(str(a.value), host) for a in cns)
    return False


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# -- one attempt ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    sslmode: str
    result: str  # "tls" | "plaintext" | "refused"
    detail: str


@dataclass
class Attempt:
    ok: bool
    encrypted: bool
    detail: str
    retry: bool = False  # libpq would retry the other way (failed before authentication ended)
    ssl_answer: str = ""  # "S", "N" or "" (no SSLRequest sent)


class Client:
    """libpq's side of a session to one host, with what CONNINFO gave it."""

    def __init__(self, target: Target, overall: float, timeout: float,
                 evidence: Evidence) -> None:
        self.target = target
        self.params = target.params
        self.overall = overall
        self.timeout = timeout
        self.evidence = evidence
        self.rootcert = default_file(self.params, "sslrootcert", "root.crt")
        self.sslcert = default_file(self.params, "sslcert", "postgresql.crt")
        self.sslkey = default_file(self.params, "sslkey", "postgresql.key")
        self.sslcrl = default_file(self.params, "sslcrl", "root.crl")

    def connect(self, deadline: float | None = None) -> Channel:
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        remaining = min(deadline, self.overall) - time.monotonic()
        if remaining <= 0:
            raise Silent("timeout expired")
        try:
            sock = socket.create_connection((self.target.address, self.target.port),
                                            timeout=remaining)
        except TimeoutError:
            expired(self.evidence, self.overall)
        except OSError as exc:
            raise Unreachable(f"cannot reach {self.target.server}: {exc}") from exc
        return Channel(sock, deadline, self.overall, self.evidence)

    def sni(self) -> str | None:
        host = self.target.host
        if not host or is_ip(host) or self.params.get("sslsni", "1") == "0":
            return None
        return host

    def context(self, sslmode: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        low = self.params.get("ssl_min_protocol_version") or "TLSv1.2"
        ctx.minimum_version = _VERSIONS.get(low, ssl.TLSVersion.TLSv1_2)
        high = self.params.get("ssl_max_protocol_version")
        if high:
            ctx.maximum_version = _VERSIONS[high]
        # libpq (initialize_SSL): whenever the root certificate file exists, the chain is
        # verified, whatever the sslmode (allow, prefer and require too).
        if sslmode in ("verify-ca", "verify-full") or self.rootcert:
            if not self.rootcert:
                raise ssl.SSLError("root certificate file does not exist; either provide the "
                                   "file or change sslmode to disable server certificate "
                                   "verification")
            ctx.load_verify_locations(cafile=self.rootcert)
            ctx.verify_mode = ssl.CERT_REQUIRED
            crldir = self.params.get("sslcrldir")
            if self.sslcrl or crldir:
                if self.sslcrl:
                    ctx.load_verify_locations(cafile=self.sslcrl)
                if crldir:
                    ctx.load_verify_locations(capath=crldir)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_CRL_CHECK_CHAIN
        if self.sslcert and self.sslkey:
            ctx.load_cert_chain(self.sslcert, self.sslkey,
                                password=self.params.get("sslpassword") or None)
        return ctx

    def start_tls(self, chan: Channel, sslmode: str) -> None:
        ctx = self.context(sslmode)
        try:
            chan.start_tls(ctx, self.sni())
        except ssl.SSLCertVerificationError:
            with self.evidence.lock:
                self.evidence.chain_verified = False
            raise
        assert chan.tls is not None
        der = chan.tls.getpeercert(binary_form=True)
        with self.evidence.lock:
            self.evidence.peer_der = self.evidence.peer_der or der
            version = chan.tls.version()
            if version:
                self.evidence.tls_versions.add(version)
            if ctx.verify_mode == ssl.CERT_REQUIRED:
                self.evidence.chain_verified = True
        if sslmode == "verify-full":
            self.verify_name(der)

    def verify_name(self, der: bytes | None) -> None:
        from cryptography import x509

        host = self.target.host
        if not host:
            raise ssl.SSLError("host name must be specified for a verified SSL connection")
        if not der or not hostname_matches(x509.load_der_x509_certificate(der), host):
            raise ssl.SSLError(f'server certificate does not match host name "{host}"')

    def attempt(self, use_ssl: bool, sslmode: str, required: bool, deadline: float) -> Attempt:
        try:
            chan = self.connect(deadline)
        except Unreachable as exc:
            return Attempt(False, False, str(exc))
        except Silent as exc:
            return Attempt(False, False, str(exc))
        try:
            answer = ""
            if use_ssl:
                answer = chan.ssl_answer()
                if answer == "S":
                    try:
                        self.start_tls(chan, sslmode)
                    except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
                        return Attempt(False, True, f"SSL error: {ssl_text(exc)}", retry=True,
                                       ssl_answer=answer)
                elif answer == "N" and required:
                    return Attempt(False, False, "server does not support SSL, but SSL was "
                                   "required", ssl_answer=answer)
                elif answer == "E":
                    _, body = chan.message(frozenset(b"E"))
                    return Attempt(False, False, error_text(body), retry=True,
                                   ssl_answer=answer)
                # "N" for allow/prefer: on in plaintext on the same connection
            result = self.startup(chan)
            result.ssl_answer = answer
            return result
        except Silent as exc:
            # libpq gives up on the host when its connect_timeout expires: no second try
            return Attempt(False, chan.tls is not None, str(exc))
        except (OSError, ssl.SSLError) as exc:
            return Attempt(False, chan.tls is not None, ssl_text(exc), retry=True)
        finally:
            chan.close()

    def startup_message(self) -> bytes:
        parameters = {"user": self.params["user"], "database": self.params["dbname"],
                      "application_name": APPLICATION_NAME}
        if self.params.get("options"):
            parameters["options"] = self.params["options"]
        return wire.build_startup_message(parameters)

    def startup(self, chan: Channel) -> Attempt:
        """StartupMessage, then authentication only where the server asks and a password is
        known; reaching an authentication request is enough to say the session connects."""
        encrypted = chan.tls is not None
        chan.send(self.startup_message())
        password = self.target.password
        binding = self.params.get("channel_binding") or "prefer"
        scram: scramp.ScramClient | None = None
        while True:
            kind, body = chan.message(_PRE_AUTH)
            if kind == b"E":
                return Attempt(False, encrypted, error_text(body), retry=True)
            if kind == b"v":
                return Attempt(False, encrypted, "protocol version not supported by server")
            (code,) = struct.unpack_from("!i", body)
            if code == 0:
                if binding == "require" and (scram is None or "PLUS" not in
                                             scram.mechanism_name):
                    return Attempt(False, encrypted, "channel binding required, but server "
                                   "authenticated client without channel binding")
                return self._after_auth(chan, encrypted)
            if code in (3, 5) and binding == "require":
                return Attempt(False, encrypted, "channel binding required but not supported "
                               "by server's authentication request")
            if code in (2, 7, 9):
                return Attempt(False, encrypted,
                               f"{_AUTH_NAMES[code]} authentication not supported")
            if code not in (3, 5, 10, 11, 12) or (code in (11, 12) and scram is None):
                return Attempt(False, encrypted, f"authentication method {code} not supported")
            if code in (3, 5, 10) and password is None:
                chan.send(b"X\0\0\0\4")
                name = {3: "password", 5: "md5", 10: "SASL"}[code]
                return Attempt(True, encrypted, f"authentication request reached ({name}; "
                               "no password given)")
            try:
                if code == 3:
                    assert password is not None
                    chan.send(_password_message(password.encode() + b"\0"))
                elif code == 5:
                    assert password is not None
                    inner = hashlib.md5(password.encode() + self.params["user"].encode())
                    outer = hashlib.md5(inner.hexdigest().encode() + body[4:8]).hexdigest()
                    chan.send(_password_message(b"md5" + outer.encode() + b"\0"))
                elif code == 10:
                    assert password is not None
                    scram_or_error = self._sasl_init(chan, body[4:], password, binding)
                    if isinstance(scram_or_error, Attempt):
                        return scram_or_error
                    scram = scram_or_error
                elif code == 11:
                    assert scram is not None
                    scram.set_server_first(body[4:].decode())
                    chan.send(_password_message(scram.get_client_final().encode()))
                else:
                    assert scram is not None
                    scram.set_server_final(body[4:].decode())
            except (scramp.ScramException, UnicodeDecodeError) as exc:
                return Attempt(False, encrypted, f"SCRAM: {exc}")

    def _sasl_init(self, chan: Channel, payload: bytes, password: str,
                   binding: str) -> scramp.ScramClient | Attempt:
        """fe-auth.c pg_SASL_init: SCRAM-SHA-256-PLUS when TLS is on and channel_binding is
        not disable; the "y" flag when TLS is on but the server offers no -PLUS."""
        encrypted = chan.tls is not None
        offered = [m.decode(errors="replace") for m in payload.split(b"\0") if m]
        selected = None
        if "SCRAM-SHA-256-PLUS" in offered:
            if not encrypted:
                return Attempt(False, False, "server offered SCRAM-SHA-256-PLUS "
                               "authentication over a non-SSL connection")
            if binding != "disable":
                selected = "SCRAM-SHA-256-PLUS"
        if selected is None and "SCRAM-SHA-256" in offered:
            selected = "SCRAM-SHA-256"
        if selected is None:
            return Attempt(False, encrypted, "none of the server's SASL authentication "
                           "mechanisms are supported")
        if binding == "require" and selected != "SCRAM-SHA-256-PLUS":
            return Attempt(False, encrypted, "channel binding is required, but server did "
                           "not offer an authentication method that supports channel binding")
        cb = (("tls-server-end-point", chan.tls) if chan.tls is not None
              and binding != "disable" else None)
        # the server ignores SCRAM's user name (it has the StartupMessage's); scramp
        # refuses an empty one, where libpq sends "n=,"
        scram = scramp.ScramClient([selected], self.params["user"] or "*", password,
                                   channel_binding=cb)
        first = scram.get_client_first().encode()
        chan.send(_password_message(selected.encode() + b"\0" + struct.pack("!i", len(first))
                                    + first))
        return scram

    def _after_auth(self, chan: Channel, encrypted: bool) -> Attempt:
        while True:  # bounded by the channel's deadline: a server may never say ReadyForQuery
            kind, body = chan.message(_POST_AUTH)
            if kind == b"Z":
                chan.send(b"X\0\0\0\4")
                return Attempt(True, encrypted, "connected")
            if kind == b"E":
                # after AuthenticationOk libpq retries nothing
                return Attempt(False, encrypted, error_text(body))

    def cell(self, sslmode: str) -> Cell:
        """libpq's tries for one sslmode; its connect_timeout bounds them together."""
        deadline = time.monotonic() + self.timeout
        steps = {"disable": [False], "allow": [False, True], "prefer": [True, False]}.get(
            sslmode, [True])
        required = sslmode not in ("disable", "allow", "prefer")
        last = Attempt(False, False, "not tried")
        for i, use_ssl in enumerate(steps):
            first = last
            last = self.attempt(use_ssl, sslmode, required or (i > 0 and use_ssl), deadline)
            if last.ok:
                return Cell(sslmode, "tls" if last.encrypted else "plaintext", last.detail)
            if i > 0 and use_ssl and last.ssl_answer == "N":
                last = first  # allow: the server's own refusal says more than its "N"
            if not last.retry or (use_ssl and last.ssl_answer == "N"):
                break
        return Cell(sslmode, "refused", last.detail)


_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
             "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _password_message(body: bytes) -> bytes:
    return b"p" + struct.pack("!i", len(body) + 4) + body
