"""`dwsproxy probe [CONNINFO]`: what a libpq client gets from any PostgreSQL-protocol server.

Owns: trying every sslmode the way libpq 15/16 does (fe-connect.c: `allow` retries with SSL and
`prefer` without it when the first attempt fails before authentication completes), the server's
TLS facts (versions, TLS 1.2 suites, certificate, client-certificate demand, direct TLS), the
inferred `ssl` / `require_ssl`, and the report (table, `--json`, `--expect`). Every cell is a real
connection; nothing is inferred from another cell. Speaks the protocol over blocking sockets in a
thread pool (tries in parallel, each with a short timeout); the packet layouts come from `wire`.
Must not be imported by the proxy's serving path, and never sends anything but start-up,
authentication and Terminate: it runs no query.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
import ssl
import struct
import sys
import urllib.parse
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol import wire

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
            "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
EXPIRY_WARNING_DAYS = 30
_ENV = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
        "password": "PGPASSWORD", "passfile": "PGPASSFILE", "sslrootcert": "PGSSLROOTCERT",
        "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "sslpassword": "PGSSLPASSWORD",
        "connect_timeout": "PGCONNECT_TIMEOUT"}


class Unreachable(Exception):
    """Not even a TCP connection: the probe has nothing to report."""


# -- connection parameters, as libpq reads them ---------------------------------------------

def parse_conninfo(text: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """A libpq keyword/value string or URI; PG* variables fill what it leaves out."""
    env = os.environ if environ is None else environ
    params: dict[str, str] = {}
    if text.startswith(("postgresql://", "postgres://")):
        url = urllib.parse.urlsplit(text)
        if url.hostname:
            params["host"] = url.hostname
        if url.port:
            params["port"] = str(url.port)
        if url.username:
            params["user"] = urllib.parse.unquote(url.username)
        if url.password:
            params["password"] = urllib.parse.unquote(url.password)
        if url.path.strip("/"):
            params["dbname"] = urllib.parse.unquote(url.path.strip("/"))
        params.update(dict(urllib.parse.parse_qsl(url.query)))
    else:
        # key = value pairs; values may be single-quoted with \' and \\ escapes (libpq).
        for match in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)", text):
            value = match.group(2)
            if value.startswith("'"):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[match.group(1)] = value
    for key, var in _ENV.items():
        if key not in params and env.get(var):
            params[key] = env[var]
    params.setdefault("host", "localhost")
    params.setdefault("port", "5432")
    params.setdefault("user", _os_user())
    params.setdefault("dbname", params["user"])
    params.setdefault("connect_timeout", "5")
    return params


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # pragma: no cover - a uid without a passwd entry
        return "postgres"


def pgpass_password(params: dict[str, str]) -> str | None:
    """The first matching ~/.pgpass line (host:port:database:user:password, `*` wildcards,
    `\\:` and `\\\\` escapes), ignored like libpq when the file is group/world readable."""
    path = Path(params.get("passfile") or Path.home() / ".pgpass")
    try:
        if path.stat().st_mode & 0o077:
            return None
        lines = path.read_text().splitlines()
    except OSError:
        return None
    want = [params["host"], params["port"], params["dbname"], params["user"]]
    for line in lines:
        if not line or line.startswith("#"):
            continue
        fields = [re.sub(r"\\(.)", r"\1", f) for f in re.split(r"(?<!\\):", line, maxsplit=4)]
        if len(fields) == 5 and all(f in ("*", w)
                                    for f, w in zip(fields[:4], want, strict=True)):
            return fields[4]
    return None


def _path_or_default(params: dict[str, str], key: str, default: str) -> str | None:
    value = params.get(key) or str(Path.home() / ".postgresql" / default)
    return value if Path(value).is_file() else None


# -- one channel: plaintext socket or TLS over memory BIOs -----------------------------------

class Channel:
    """A socket, optionally upgraded to TLS with an `ssl.SSLObject` (memory BIOs, so that the
    server's TLS 1.2 handshake records can be read: they say whether a CertificateRequest came)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tls: ssl.SSLObject | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.handshake_bytes = bytearray()
        self.buffer = bytearray()

    def start_tls(self, ctx: ssl.SSLContext, server_hostname: str | None) -> None:
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError(
                        "server closed the connection during the handshake") from None
                self.handshake_bytes += data
                self._in.write(data)
        self._flush()

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(data)
            return
        self.tls.write(data)
        self._flush()

    def _fill(self) -> None:
        if self.tls is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection unexpectedly")
            self.buffer += data
            return
        while True:
            try:
                self.buffer += self.tls.read(65536)
                return
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection unexpectedly") from None
                self._in.write(data)

    def recv_exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def message(self) -> tuple[bytes, bytes]:
        head = self.recv_exact(5)
        (length,) = struct.unpack("!i", head[1:])
        if length < 4 or length > 1 << 20:
            raise ConnectionError(f"not a PostgreSQL message (type {head[:1]!r}, length {length})")
        return head[:1], self.recv_exact(length - 4)

    def close(self) -> None:
        self.sock.close()


def certificate_requested(handshake: bytes) -> bool | None:
    """Whether the server's plaintext TLS 1.2 flight holds a CertificateRequest (handshake type
    13, RFC 5246 7.4.4); None if the flight was not plaintext (TLS 1.3 encrypts it)."""
    payload = bytearray()
    pos = 0
    while pos + 5 <= len(handshake) and handshake[pos] == 22:
        (length,) = struct.unpack_from("!H", handshake, pos + 3)
        payload += handshake[pos + 5:pos + 5 + length]
        pos += 5 + length
    pos = 0
    seen_hello = False
    while pos + 4 <= len(payload):
        kind = payload[pos]
        length = int.from_bytes(payload[pos + 1:pos + 4], "big")
        if kind == 2:
            seen_hello = True
        if kind == 13:
            return True
        if kind == 14:  # ServerHelloDone: the server's flight is complete
            return False
        pos += 4 + length
    return None if not seen_hello else False


# -- one libpq-like attempt -----------------------------------------------------------------

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


class Prober:
    def __init__(self, params: dict[str, str]) -> None:
        self.params = params
        self.host = params["host"]
        self.port = int(params["port"])
        self.timeout = float(params.get("connect_timeout") or 5) or 5.0
        self.password = params.get("password") or pgpass_password(params)
        self.rootcert = _path_or_default(params, "sslrootcert", "root.crt")
        self.sslcert = _path_or_default(params, "sslcert", "postgresql.crt")
        self.sslkey = _path_or_default(params, "sslkey", "postgresql.key")

    # connections
    def connect(self) -> Channel:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise Unreachable(f"cannot reach {self.host}:{self.port}: {exc}") from exc
        sock.settimeout(self.timeout)
        return Channel(sock)

    def ssl_request(self, chan: Channel) -> str:
        chan.send(wire.build_request(wire.SSL_REQUEST_CODE))
        answer = chan.recv_exact(1)
        return answer.decode("latin-1")

    def client_context(self, sslmode: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # libpq (initialize_SSL): whenever the root certificate file exists, the chain is
        # verified, whatever the sslmode (allow, prefer and require too).
        if sslmode in ("verify-ca", "verify-full") or self.rootcert:
            if not self.rootcert:
                raise ssl.SSLError("root certificate file does not exist; either provide the "
                                   "file or change sslmode to disable server certificate "
                                   "verification")
            ctx.load_verify_locations(cafile=self.rootcert)
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = sslmode == "verify-full"
        if self.sslcert and self.sslkey:
            ctx.load_cert_chain(self.sslcert, self.sslkey,
                                password=self.params.get("sslpassword") or None)
        return ctx

    def attempt(self, use_ssl: bool, sslmode: str, required: bool) -> Attempt:
        try:
            chan = self.connect()
        except Unreachable as exc:
            return Attempt(False, False, str(exc))
        try:
            answer = ""
            if use_ssl:
                answer = self.ssl_request(chan)
                if answer == "S":
                    try:
                        chan.start_tls(self.client_context(sslmode), self._sni())
                    except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
                        return Attempt(False, True, f"SSL error: {_ssl_text(exc)}", retry=True,
                                       ssl_answer=answer)
                elif answer == "N":
                    if required:
                        return Attempt(False, False, "server does not support SSL, but SSL "
                                       "was required", ssl_answer=answer)
                    # allow/prefer go on in plaintext on the same connection
                else:
                    return Attempt(False, False, f"unexpected answer {answer!r} to SSLRequest",
                                   ssl_answer=answer)
            result = self.startup(chan)
            result.ssl_answer = answer
            return result
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            return Attempt(False, chan.tls is not None, _ssl_text(exc), retry=True)
        finally:
            chan.close()

    def _sni(self) -> str | None:
        try:
            ipaddress.ip_address(self.host)
            return None
        except ValueError:
            return self.host

    def startup(self, chan: Channel) -> Attempt:
        """StartupMessage, then authentication only where the server asks and a password is
        known; reaching an authentication request is enough to say the session connects."""
        encrypted = chan.tls is not None
        chan.send(wire.build_startup_message({
            "user": self.params["user"], "database": self.params["dbname"],
            "application_name": "dwsproxy-probe"}))
        scram: _Scram | None = None
        while True:
            kind, body = chan.message()
            if kind == b"E":
                fields = wire.parse_error_response(kind + struct.pack("!i", len(body) + 4) + body)
                return Attempt(False, encrypted, f"{fields.get('S', 'FATAL')}:  "
                               f"{fields.get('M', '')}", retry=True)
            if kind != b"R":
                return Attempt(False, encrypted, f"unexpected message {kind!r} before "
                               "authentication", retry=True)
            (code,) = struct.unpack_from("!i", body)
            if code == 0:
                return self._after_auth(chan, encrypted)
            if self.password is None:
                chan.send(b"X\0\0\0\4")
                return Attempt(True, encrypted, f"authentication request reached "
                               f"({_AUTH_NAMES.get(code, code)}; no password given)")
            if code == 3:
                chan.send(_password_message(self.password.encode() + b"\0"))
            elif code == 5:
                inner = hashlib.md5(self.password.encode() + self.params["user"].encode())
                outer = hashlib.md5(inner.hexdigest().encode() + body[4:8]).hexdigest()
                chan.send(_password_message(b"md5" + outer.encode() + b"\0"))
            elif code == 10:
                mechanisms = body[4:].split(b"\0")
                if b"SCRAM-SHA-256" not in mechanisms:
                    return Attempt(False, encrypted, f"no supported SASL mechanism in "
                                   f"{[m.decode() for m in mechanisms if m]}")
                scram = _Scram(self.password)
                first = scram.client_first()
                chan.send(_password_message(b"SCRAM-SHA-256\0" + struct.pack("!i", len(first))
                                            + first))
            elif code == 11 and scram is not None:
                chan.send(_password_message(scram.client_final(body[4:])))
            elif code == 12 and scram is not None:
                if not scram.verify_server(body[4:]):
                    return Attempt(False, encrypted, "SCRAM server signature does not match")
            else:
                return Attempt(False, encrypted, f"unsupported authentication request {code}")

    def _after_auth(self, chan: Channel, encrypted: bool) -> Attempt:
        while True:
            kind, body = chan.message()
            if kind == b"Z":
                chan.send(b"X\0\0\0\4")
                return Attempt(True, encrypted, "connected")
            if kind == b"E":
                fields = wire.parse_error_response(kind + struct.pack("!i", len(body) + 4) + body)
                # after AuthenticationOk libpq retries nothing
                return Attempt(False, encrypted, f"{fields.get('S', 'FATAL')}:  "
                               f"{fields.get('M', '')}")

    # cells
    def cell(self, sslmode: str) -> Cell:
        if sslmode == "disable":
            steps = [False]
        elif sslmode == "allow":
            steps = [False, True]
        elif sslmode == "prefer":
            steps = [True, False]
        else:
            steps = [True]
        required = sslmode not in ("disable", "allow", "prefer")
        last = Attempt(False, False, "not tried")
        for i, use_ssl in enumerate(steps):
            first = last
            last = self.attempt(use_ssl, sslmode, required or (i > 0 and use_ssl))
            if last.ok:
                return Cell(sslmode, "tls" if last.encrypted else "plaintext", last.detail)
            if i > 0 and use_ssl and last.ssl_answer == "N":
                last = first  # allow: the server's own refusal says more than its "N"
            if not last.retry or (use_ssl and last.ssl_answer == "N"):
                break
        return Cell(sslmode, "refused", last.detail)

    # TLS facts
    def handshake(self, ctx: ssl.SSLContext) -> Channel:
        chan = self.connect()
        try:
            if self.ssl_request(chan) != "S":
                raise ConnectionError("SSLRequest not accepted")
            chan.start_tls(ctx, self._sni())
        except BaseException:
            chan.close()
            raise
        return chan

    def tries_tls(self, ctx: ssl.SSLContext) -> ssl.SSLObject | None:
        try:
            chan = self.handshake(ctx)
        except (OSError, ssl.SSLError, ConnectionError, Unreachable):
            return None
        chan.close()
        return chan.tls

    def version_accepted(self, name: str) -> bool:
        ctx = _bare_context()
        ctx.minimum_version = ctx.maximum_version = VERSIONS[name]
        if name in ("TLSv1", "TLSv1.1"):
            # OpenSSL 3 will not even offer 1.0/1.1 at the default security level
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        obj = self.tries_tls(ctx)
        return obj is not None and obj.version() == name

    def suite_accepted(self, name: str) -> bool:
        ctx = _bare_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.set_ciphers(f"{name}:@SECLEVEL=0")
        except ssl.SSLError:
            return False
        obj = self.tries_tls(ctx)
        cipher = obj.cipher() if obj is not None else None
        return cipher is not None and cipher[0] == name

    def certificate(self) -> dict[str, Any] | None:
        obj = self.tries_tls(_bare_context())
        der = obj.getpeercert(binary_form=True) if obj is not None else None
        if not der:
            return None
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        chain_verified = False
        if self.rootcert:
            ctx = _bare_context()
            ctx.load_verify_locations(cafile=self.rootcert)
            ctx.verify_mode = ssl.CERT_REQUIRED
            chain_verified = self.tries_tls(ctx) is not None
        not_after = cert.not_valid_after_utc
        return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
                "not_after": not_after.isoformat(),
                "days_left": (not_after - dt.datetime.now(dt.UTC)).days,
                "chain_verified": chain_verified, "hostname_ok": hostname_matches(cert, self.host)}

    def client_cert(self) -> str:
        """"required" when a session without a certificate is refused (at the handshake or by
        an ErrorResponse that names the certificate), "optional" when a TLS 1.2 server asks for
        one but goes on without, "none" when it never asks."""
        ctx = _bare_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        asked: bool | None = None
        try:
            chan = self.handshake(ctx)
        except ssl.SSLError as exc:
            return "required" if "certificate" in str(exc).lower() or "HANDSHAKE" in str(
                exc) else "unknown"
        except (OSError, ConnectionError, Unreachable):
            ctx = _bare_context()  # perhaps TLS 1.3 only: the request is encrypted there
            try:
                chan = self.handshake(ctx)
            except (OSError, ssl.SSLError, ConnectionError, Unreachable):
                return "unknown"
        else:
            asked = certificate_requested(bytes(chan.handshake_bytes))
        try:
            outcome = self.startup(chan)
        except ssl.SSLError as exc:
            outcome = Attempt(False, True, _ssl_text(exc))
        except (OSError, ConnectionError) as exc:
            outcome = Attempt(False, True, str(exc))
        finally:
            chan.close()
        if not outcome.ok and "certificate" in outcome.detail.lower():
            return "required"
        if asked is None:
            return "unknown"
        return "optional" if asked else "none"

    def direct_ssl(self) -> bool:
        ctx = _bare_context()
        ctx.set_alpn_protocols(["postgresql"])
        try:
            chan = self.connect()
        except Unreachable:
            return False
        try:
            chan.start_tls(ctx, self._sni())
            assert chan.tls is not None
            return chan.tls.selected_alpn_protocol() == "postgresql"
        except (OSError, ssl.SSLError, ConnectionError):
            return False
        finally:
            chan.close()


_AUTH_NAMES = {2: "Kerberos", 3: "password", 5: "md5", 7: "GSSAPI", 9: "SSPI", 10: "SASL"}


def _password_message(body: bytes) -> bytes:
    return b"p" + struct.pack("!i", len(body) + 4) + body


class _Scram:
    """SCRAM-SHA-256 without channel binding (RFC 5802/7677), as libpq does with
    channel_binding=prefer when it cannot bind."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.server_key = b""
        self.auth_message = b""

    def client_first(self) -> bytes:
        return f"n,,{self.first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
        salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(attrs["s"]),
                                     int(attrs["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        self.server_key = hmac.digest(salted, b"Server Key", "sha256")
        without_proof = f"c=biws,r={attrs['r']}"
        self.auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), self.auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server(self, server_final: bytes) -> bool:
        expected = hmac.digest(self.server_key, self.auth_message, "sha256")
        return server_final.decode().strip() == f"v={base64.b64encode(expected).decode()}"


def _bare_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def hostname_matches(cert: Any, host: str) -> bool:
    """libpq's verify-full: SAN dNSName (one leading `*.` label wildcard) or iPAddress; the CN
    only when there is no dNSName SAN."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    try:
        return str(ipaddress.ip_address(host)) in ips
    except ValueError:
        pass
    names = dns or [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    host = host.lower().rstrip(".")
    for name in names:
        name = str(name).lower().rstrip(".")
        if name == host or (name.startswith("*.") and "." in host
                            and host.split(".", 1)[1] == name[2:]):
            return True
    return False


def tls12_suite_names() -> list[str]:
    """Every TLS 1.2-capable suite this OpenSSL can offer with a certificate-based key
    exchange (PSK and SRP need secrets a probe has not got)."""
    ctx = _bare_context()
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    names = []
    for c in ctx.get_ciphers():
        if c["protocol"] == "TLSv1.3" or c.get("kea") not in ("kx-ecdhe", "kx-dhe", "kx-rsa"):
            continue
        if c.get("auth") in ("auth-null", "auth-psk"):
            continue
        names.append(c["name"])
    return names


def _is_cbc(name: str) -> bool:
    ctx = _bare_context()
    try:
        ctx.set_ciphers(f"{name}:@SECLEVEL=0")
    except ssl.SSLError:
        return False
    return any(not c.get("aead") for c in ctx.get_ciphers() if c["name"] == name)


# -- the whole probe --------------------------------------------------------------------------

def probe(params: dict[str, str], workers: int = 16) -> dict[str, Any]:
    prober = Prober(params)
    prober.connect().close()  # Unreachable here means nothing else can work either
    warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 contexts are deliberate
    with ThreadPoolExecutor(max_workers=workers) as pool:
        cells_f = [pool.submit(prober.cell, mode) for mode in SSLMODES]
        ssl_f = pool.submit(_ssl_answer, prober)
        versions_f = {name: pool.submit(prober.version_accepted, name) for name in VERSIONS}
        suites_f = {name: pool.submit(prober.suite_accepted, name)
                    for name in tls12_suite_names()}
        cert_f = pool.submit(prober.certificate)
        client_f = pool.submit(prober.client_cert)
        direct_f = pool.submit(prober.direct_ssl)
        cells = [f.result() for f in cells_f]
        ssl_on = ssl_f.result()
        versions = {name: f.result() for name, f in versions_f.items()}
        suites = [name for name, f in suites_f.items() if f.result()]
        certificate = cert_f.result()
        client_cert = client_f.result() if ssl_on else "none"
        direct = direct_f.result()
    disable = cells[0]
    if disable.result == "plaintext":
        require_ssl = "off"
    elif re.search(r"ssl|encrypt|tls", disable.detail, re.I):
        require_ssl = "on"
    else:
        require_ssl = "unknown"
    report: dict[str, Any] = {
        "server": f"{prober.host}:{prober.port}",
        "cells": [{"sslmode": c.sslmode, "result": c.result, "detail": c.detail} for c in cells],
        "ssl": "on" if ssl_on else "off",
        "require_ssl": require_ssl,
        "tls_versions": versions,
        "tls12_ciphers": suites,
        "certificate": certificate,
        "client_cert": client_cert,
        "direct_ssl": direct,
    }
    report["findings"] = findings(report)
    return report


def _ssl_answer(prober: Prober) -> bool:
    chan = prober.connect()
    try:
        return prober.ssl_request(chan) == "S"
    except (OSError, ConnectionError):
        return False
    finally:
        chan.close()


def findings(report: dict[str, Any]) -> list[str]:
    out = []
    if report["ssl"] == "off":
        out.append("ssl is off: every session travels in plaintext")
    for cell in report["cells"]:
        if cell["result"] == "plaintext":
            out.append(f"plaintext accepted (sslmode={cell['sslmode']})")
            break
    for name in ("TLSv1", "TLSv1.1"):
        if report["tls_versions"].get(name):
            out.append(f"{name} accepted (below TLS 1.2)")
    cbc = [name for name in report["tls12_ciphers"] if _is_cbc(name)]
    if cbc:
        out.append(f"CBC suites accepted: {', '.join(cbc)}")
    cert = report["certificate"]
    if cert:
        if cert["days_left"] < 0:
            out.append(f"certificate expired {-cert['days_left']} days ago")
        elif cert["days_left"] < EXPIRY_WARNING_DAYS:
            out.append(f"certificate expires in {cert['days_left']} days")
        if not cert["chain_verified"]:
            out.append("certificate chain not verified against sslrootcert")
        if not cert["hostname_ok"]:
            out.append("certificate does not name the host")
    return out


def min_tls(report: dict[str, Any]) -> str:
    for name in VERSIONS:
        if report["tls_versions"].get(name):
            return name
    return "none"


def check_expectations(report: dict[str, Any], expects: list[str]) -> list[str]:
    """One line per mismatch; a bad --expect is a usage error (ValueError)."""
    actual = {"ssl": report["ssl"], "require_ssl": report["require_ssl"],
              "client_cert": report["client_cert"], "min_tls": min_tls(report)}
    lines = []
    for item in expects:
        key, sep, want = item.partition("=")
        if not sep or key not in actual:
            raise ValueError(f"--expect {item!r}: want KEY=VALUE with KEY one of "
                             f"{', '.join(actual)}")
        if key == "min_tls" and not want.startswith("TLS"):
            want = "TLSv" + want
        if actual[key] != want:
            lines.append(f"expected {key}={want}, got {key}={actual[key]}")
    return lines


def render(report: dict[str, Any]) -> str:
    rows = [("sslmode", "result", "detail")] + [
        (c["sslmode"], c["result"], c["detail"]) for c in report["cells"]]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"dwsproxy probe {report['server']}", ""]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    versions = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["tls_versions"].items())
    facts: list[tuple[str, str]] = [
        ("ssl", report["ssl"]),
        ("TLS versions", versions + "  (1.0/1.1 offered at @SECLEVEL=0)"),
        ("TLS 1.2 suites", ", ".join(report["tls12_ciphers"]) or "-"),
    ]
    cert = report["certificate"]
    if cert:
        facts.append(("certificate", f"{cert['subject']} (issuer {cert['issuer']})"))
        facts.append(("", f"not after {cert['not_after']}, {cert['days_left']} days left, "
                          f"chain {'verified' if cert['chain_verified'] else 'NOT verified'}, "
                          f"host name {'ok' if cert['hostname_ok'] else 'MISMATCH'}"))
    else:
        facts.append(("certificate", "-"))
    facts += [("client cert", report["client_cert"]),
              ("direct TLS", "accepted (ALPN postgresql)" if report["direct_ssl"]
               else "not accepted")]
    width = max(len(k) for k, _ in facts)
    lines += ["", "TLS facts:"] + [f"  {k:<{width}}  {v}" for k, v in facts]
    lines += ["", f"Inferred policy: ssl = {report['ssl']}, require_ssl = "
                  f"{report['require_ssl']}"]
    lines += ["", "Findings:"] + ([f"  - {f}" for f in report["findings"]] or ["  none"])
    return "\n".join(lines)


def main(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    params = parse_conninfo(args.conninfo or "")
    try:
        report = probe(params)
    except Unreachable as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    try:
        mismatches = check_expectations(report, args.expect or [])
    except ValueError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    out(json.dumps(report, indent=2) if args.json else render(report))
    for line in mismatches:
        print(f"probe: {line}", file=sys.stderr)
    return 1 if mismatches else 0
