"""The proxy as a client of the database: the second hop.

Owns: connecting to the backend with `[backend]`'s TLS settings (libpq's sslmode meanings,
SSLRequest or direct TLS with ALPN `postgresql`, SNI, the client certificate), and naming why
that failed in terms a client can act on (`dwsproxy_backend_tls_failures_total` reasons). Used
for sessions, for forwarded CancelRequests and for the health check, so all three speak to
the database the same way. Must not decide policy or relay bytes (relay.py does).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..protocol import wire
from ..tls.contexts import ALPN_POSTGRESQL
from .backend_tls import ClientTls
from .relay import Endpoint

if TYPE_CHECKING:
    from ..config.schema import BackendConfig
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


async def connect(cfg: BackendConfig, btls: BackendTls | None,
                  endpoint: Endpoint) -> Connected:
    """Connect `endpoint` to the backend, with TLS as configured; BackendError on failure.
    The caller bounds the time (backend.connect_timeout)."""
    loop = asyncio.get_running_loop()
    try:
        if btls is not None and btls.direct:
            tls = ClientTls(endpoint, btls.context, btls.server_hostname or None)
            transport, _ = await loop.create_connection(lambda: tls, cfg.host, cfg.port)
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
        await loop.create_connection(lambda: endpoint, cfg.host, cfg.port)
    except ssl.SSLError as exc:
        raise _tls_error(exc) from None
    except OSError as exc:
        raise BackendError(exc.strerror or repr(exc)) from None
    if btls is None:
        return Connected(False, None)
    return await _ssl_request(endpoint, btls, cfg)


async def _ssl_request(endpoint: Endpoint, btls: BackendTls, cfg: BackendConfig) -> Connected:
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
                        "unencrypted connection", cfg.address)
            return Connected(False, None)
        raise BackendError(f"the server does not support SSL, but backend.sslmode is "
                           f"\"{btls.sslmode}\"", "ssl_refused")
    if answer != wire.SSL_ACCEPT:
        raise BackendError(f"unexpected answer {answer!r} to the SSLRequest", "handshake")
    if len(endpoint.buffer) > 1:
        # CVE-2021-23222 (libpq): bytes after 'S' and before the handshake could be injected
        raise BackendError("received unencrypted data after SSL response", "handshake")
    del endpoint.buffer[:1]
    tls = ClientTls(endpoint, btls.context, btls.server_hostname)
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


async def probe(cfg: BackendConfig, btls: BackendTls | None) -> None:
    """Connect as a session would (TLS included) and close: the health check."""
    endpoint = Endpoint()
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            await connect(cfg, btls, endpoint)
    except TimeoutError:
        raise BackendError("timeout") from None
    finally:
        if endpoint.transport is not None:
            endpoint.transport.abort()


async def send_cancel(cfg: BackendConfig, btls: BackendTls | None, packet: bytes) -> None:
    """A CancelRequest to the backend over the same settings as the sessions."""
    endpoint = Endpoint()
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            await connect(cfg, btls, endpoint)
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
