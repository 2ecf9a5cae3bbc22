"""The proxy as a client of the database: the second hop.

Owns: connecting to the backend with `[backend]`'s TLS settings (libpq's sslmode meanings,
SSLRequest or direct TLS with ALPN `postgresql`, SNI, the client certificate), and naming why
that failed in terms a client can act on (`dwsproxy_backend_tls_failures_total` reasons). Used
for sessions, for forwarded CancelRequests and for the health check, so all three speak to
the database the same way. One call connects one host of `[backend] host`; which host, and
in what order, is backends.py's. A host that is a socket directory is reached over its Unix
socket, in plaintext as libpq does (PostgreSQL does no TLS on a Unix socket). Must not decide
policy or relay bytes (relay.py does).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..protocol import scram, wire
from ..tls.contexts import ALPN_POSTGRESQL
from .backend_tls import ClientTls
from .relay import Endpoint

if TYPE_CHECKING:
    from ..config.schema import BackendConfig, BackendHost
    from ..tls.contexts import BackendTls

log = logging.getLogger("dwsproxy.backend")

# X509_V_ERR_* (openssl/x509_vfy.h) that get their own reason
_CERT_HAS_EXPIRED = 10
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


class BackendError(Exception):
    """Connecting failed. `tls_reason` is a dwsproxy_backend_tls_failures_total reason, or ""
    for a plain TCP failure; str() is the text the client reads after the address."""

    def __init__(self, message: str, tls_reason: str = "") -> None:
        super().__init__(message)
        self.tls_reason = tls_reason


@dataclass(frozen=True)
class Connected:
    encrypted: bool
    peer_cert: bytes | None  # DER of the backend's certificate over TLS


async def connect(host: BackendHost, btls: BackendTls | None,
                  endpoint: Endpoint) -> Connected:
    """Connect `endpoint` to one backend host, with TLS as configured; BackendError on
    failure. The caller bounds the time (backend.connect_timeout)."""
    loop = asyncio.get_running_loop()
    try:
        if host.unix:
            # libpq: "Don't request SSL or GSSAPI over Unix sockets" (fe-connect.c)
            await loop.create_unix_connection(lambda: endpoint, host.socket_path)
            return Connected(False, None)
        if btls is not None and btls.direct:
            tls = ClientTls(endpoint, btls.context, btls.server_hostname(host.host))
            transport, _ = await loop.create_connection(lambda: tls, host.host, host.port)
            try:
                await asyncio.shield(tls.handshake)  # a timeout must not cancel the future
            except BaseException:
                transport.abort()
                raise
            refusal = _alpn_refusal(tls.sslobj.selected_alpn_protocol())
            if refusal:
                transport.abort()  # before a byte of the client's reaches that server
                raise BackendError(refusal, "alpn")
            return Connected(True, _peer_cert(endpoint))
        await loop.create_connection(lambda: endpoint, host.host, host.port)
    except ssl.SSLError as exc:
        raise _tls_error(exc) from None
    except OSError as exc:
        raise BackendError(exc.strerror or repr(exc)) from None
    if btls is None:
        return Connected(False, None)
    return await _ssl_request(endpoint, btls, host)


async def _ssl_request(endpoint: Endpoint, btls: BackendTls, host: BackendHost) -> Connected:
    transport = endpoint.transport
    assert transport is not None
    transport.write(wire.build_request(wire.SSL_REQUEST_CODE))
    if not await endpoint.wait_for_bytes(1):
        raise BackendError("the server closed the connection after the SSLRequest",
                           "handshake")
    answer = bytes(endpoint.buffer[:1])
    if answer == wire.SSL_REFUSE:
        del endpoint.buffer[:1]
        if btls.sslmode == "prefer":
            # libpq's prefer, but never silent: whoever answers `N` on the path gets plaintext
            log.warning("backend %s refused SSL: backend.sslmode = \"prefer\" falls back to an "
                        "unencrypted connection", host.address)
            return Connected(False, None)
        raise BackendError(f"the server does not support SSL, but backend.sslmode is "
                           f"\"{btls.sslmode}\"", "ssl_refused")
    if answer != wire.SSL_ACCEPT:
        raise BackendError(f"unexpected answer {answer!r} to the SSLRequest", "handshake")
    if len(endpoint.buffer) > 1:
        # CVE-2021-23222 (libpq): bytes after 'S' and before the handshake could be injected
        raise BackendError("received unencrypted data after SSL response", "handshake")
    del endpoint.buffer[:1]
    tls = ClientTls(endpoint, btls.context, btls.server_hostname(host.host))
    try:
        tls.start(transport)
        await asyncio.shield(tls.handshake)  # a timeout must not cancel ClientTls's future
    except ssl.SSLError as exc:
        transport.abort()
        raise _tls_error(exc) from None
    except (OSError, ConnectionError) as exc:
        transport.abort()
        raise BackendError(f"TLS handshake failed: {exc!r}", "handshake") from None
    except BaseException:
        transport.abort()  # timed out or cancelled: no half-made connection stays
        raise
    return Connected(True, _peer_cert(endpoint))


def _alpn_refusal(selected: str | None) -> str:
    """Why a direct-TLS server is refused for its ALPN answer, or "". As libpq 17
    (fe-secure-openssl.c, open_client_SSL): without an SSLRequest nothing but ALPN says the
    server speaks PostgreSQL, so a TLS server of another protocol that shares the certificate
    (an HTTPS server: the ALPACA attack) must not be sent the client's StartupMessage."""
    if selected is None:
        return ("direct TLS connection was established without ALPN protocol negotiation "
                f"(the server did not select \"{ALPN_POSTGRESQL}\")")
    if selected != ALPN_POSTGRESQL:
        shown = selected.encode("ascii", "backslashreplace").decode()[:64]
        return (f"direct TLS connection was established with unexpected ALPN protocol "
                f"{shown!r} (not \"{ALPN_POSTGRESQL}\")")
    return ""


def _peer_cert(endpoint: Endpoint) -> bytes | None:
    transport = endpoint.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    return der or None


def _tls_error(exc: ssl.SSLError) -> BackendError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == _CERT_HAS_EXPIRED:
            return BackendError(f"server certificate expired ({exc.verify_message})", "expired")
        if code in _NAME_MISMATCH:
            return BackendError(f"server certificate does not match the host name "
                                f"({exc.verify_message})", "name_mismatch")
        return BackendError(f"server certificate not trusted by backend.sslrootcert "
                            f"({exc.verify_message})", "untrusted")
    return BackendError(f"TLS handshake failed: {exc.reason or exc}", "handshake")


async def probe(host: BackendHost, cfg: BackendConfig, btls: BackendTls | None) -> None:
    """Connect as a session would (TLS included) and hang up quietly: the reachability check.

    Quiet means no line in PostgreSQL's log at its default settings. The server reads the
    first byte of a start-up packet; end-of-file there is logged by nobody ("Service-monitoring
    software also often just opens and closes a connection", ProcessStartupPacket), but a reset
    is ("could not receive data from client: Connection reset by peer", pq_recvbuf). After
    TLS, OpenSSL's SSL_ERROR_ZERO_RETURN (our close_notify) is an end-of-file too, while a
    bare FIN is SSL_ERROR_SYSCALL, which be_tls_read turns into ECONNRESET and so into the
    same line. So: never abort; after TLS send close_notify, then FIN (ClientTls's close)."""
    endpoint = Endpoint()
    quiet = False
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            await connect(host, btls, endpoint)
            quiet = True
    except TimeoutError:
        raise BackendError("timeout") from None
    finally:
        await hang_up(endpoint, quiet, cfg.connect_timeout)


async def hang_up(endpoint: Endpoint, quiet: bool, wait: float) -> None:
    """Close a connection of the proxy's own: gracefully (close_notify after TLS, then FIN)
    when it is in a state the server ends without a word, and wait for the server's side to
    close, so that no unread byte of ours turns our close into a reset; abort otherwise."""
    transport = endpoint.transport
    if transport is None:
        return
    if not quiet:
        transport.abort()
        return
    transport.close()
    try:
        async with asyncio.timeout(wait):
            await asyncio.shield(endpoint.closed)
    except TimeoutError:
        transport.abort()


async def send_cancel(host: BackendHost, cfg: BackendConfig, btls: BackendTls | None,
                      packet: bytes) -> None:
    """A CancelRequest to one backend host over the same settings as the sessions."""
    endpoint = Endpoint()
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            await connect(host, btls, endpoint)
            assert endpoint.transport is not None
            endpoint.transport.write(packet)
            # the server answers a cancel by closing: wait for it, so the packet is delivered
            # before our close_notify/FIN (PostgreSQL reads it, then hangs up)
            await endpoint.wait_for_bytes(1)
    except TimeoutError:
        raise BackendError("timeout") from None
    finally:
        if endpoint.transport is not None:
            endpoint.transport.close()


@dataclass(frozen=True)
class Role:
    """What target_session_attrs asks of a host, as libpq 14+ learns it: `in_hot_standby` and
    `default_transaction_read_only` from the ParameterStatus stream, or from a query where
    the server does not report them (before PostgreSQL 14, GaussDB)."""

    in_hot_standby: bool
    read_only: bool  # default_transaction_read_only on, or in hot standby (libpq's test)


_ROLE_QUERY = (b"SELECT pg_catalog.pg_is_in_recovery(), "
               b"pg_catalog.current_setting('transaction_read_only')")
_AUTH_OK, _AUTH_CLEARTEXT, _AUTH_MD5, _AUTH_SASL, _AUTH_SASL_CONTINUE, _AUTH_SASL_FINAL = (
    0, 3, 5, 10, 11, 12)


async def check_role(host: BackendHost, cfg: BackendConfig, btls: BackendTls | None,
                     password: str) -> Role:
    """Log in as backend.health_check_user on a connection of the proxy's own, learn the
    host's role, and end with a Terminate: PostgreSQL logs nothing for that at its default
    settings (log_disconnections is off). BackendError on any failure."""
    endpoint = Endpoint()
    quiet = False
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            await connect(host, btls, endpoint)
            role = await _login(endpoint, cfg, password)
            quiet = True
            return role
    except TimeoutError:
        raise BackendError("timeout") from None
    except scram.ScramError as exc:
        raise BackendError(str(exc)) from None
    except (ValueError, IndexError, UnicodeError) as exc:
        # a malformed answer is the server's fault (or not PostgreSQL): a failed check, not a bug
        raise BackendError(f"unexpected answer from the server: {exc}") from None
    finally:
        await hang_up(endpoint, quiet, cfg.connect_timeout)


async def _login(endpoint: Endpoint, cfg: BackendConfig, password: str) -> Role:
    transport = endpoint.transport
    assert transport is not None
    transport.write(wire.build_startup_message({
        "user": cfg.health_check_user, "database": cfg.health_check_dbname,
        "application_name": "dwsproxy-health"}))
    params: dict[str, str] = {}
    client: scram.ScramClient | None = None
    while True:
        message = await endpoint.read_message()
        if message is None:
            raise BackendError("the server closed the health-check connection")
        kind, body = message
        if kind == b"E":
            fields = wire.parse_error_response(_message(b"E", body))
            raise BackendError(f"health check login refused: {fields.get('M', '')}")
        if kind == b"S":
            name, _, rest = body.partition(b"\0")
            params[name.decode(errors="replace")] = rest.split(b"\0", 1)[0].decode(
                errors="replace")
        elif kind == b"Z":
            break
        elif kind == b"R":
            code = int.from_bytes(body[:4], "big")
            if code == _AUTH_OK:
                continue
            if code in (_AUTH_CLEARTEXT, _AUTH_MD5) and not password:
                raise BackendError("the server asks the health-check user for a password and "
                                   "backend.health_check_password_file is not set")
            if code == _AUTH_CLEARTEXT:
                transport.write(_message(b"p", password.encode() + b"\0"))
            elif code == _AUTH_MD5:
                user = cfg.health_check_user.encode()
                inner = hashlib.md5(password.encode() + user).hexdigest().encode()
                outer = hashlib.md5(inner + body[4:8]).hexdigest().encode()
                transport.write(_message(b"p", b"md5" + outer + b"\0"))
            elif code == _AUTH_SASL:
                if b"SCRAM-SHA-256" not in body[4:].split(b"\0"):
                    raise BackendError("the server offers no SASL mechanism the health check "
                                       "speaks (SCRAM-SHA-256)")
                client = scram.ScramClient(password)
                first = client.first()
                transport.write(_message(b"p", b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big")
                                         + first))
            elif code == _AUTH_SASL_CONTINUE and client is not None:
                transport.write(_message(b"p", client.final(body[4:])))
            elif code == _AUTH_SASL_FINAL and client is not None:
                client.verify(body[4:])
            else:
                raise BackendError(f"authentication method {code} is not supported by the "
                                   "health check")
    hot, read_only = params.get("in_hot_standby"), params.get("default_transaction_read_only")
    if hot is None or read_only is None:
        # an older server: libpq asks with a query; one query here answers both questions
        transport.write(_message(b"Q", _ROLE_QUERY + b"\0"))
        row: list[str] = []
        while True:
            message = await endpoint.read_message()
            if message is None:
                raise BackendError("the server closed the health-check connection")
            kind, body = message
            if kind == b"E":
                raise BackendError("role query failed: "
                                   + wire.parse_error_response(_message(b"E", body)).get("M", ""))
            if kind == b"D":
                row = _data_row(body)
            if kind == b"Z":
                break
        if len(row) != 2:
            raise BackendError("unexpected answer to the role query")
        hot = "on" if row[0] == "t" else "off"
        read_only = row[1] if read_only is None else read_only
    transport.write(b"X\x00\x00\x00\x04")  # Terminate: the server ends the session silently
    in_hot_standby = hot == "on"
    return Role(in_hot_standby, in_hot_standby or read_only == "on")


def _data_row(body: bytes) -> list[str]:
    count = int.from_bytes(body[:2], "big")
    out, pos = [], 2
    for _ in range(count):
        size = int.from_bytes(body[pos:pos + 4], "big", signed=True)
        pos += 4
        if size < 0:
            out.append("")
            continue
        out.append(body[pos:pos + size].decode(errors="replace"))
        pos += size
    return out


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body
