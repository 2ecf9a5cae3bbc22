"""Every metric of docs/metrics.md, declared once, and the HTTP endpoint serving them.

Owns: metric objects and their label values, the byte counters' periodic flush, and the tiny
HTTP listener for GET /metrics and GET /healthz. Must not decide policy or touch client sockets.

With several workers prometheus-client's multiprocess mode is used: the CLI sets
PROMETHEUS_MULTIPROC_DIR before this module is first imported (the library reads it at import).
Each `inc()` then writes to an mmap under a lock, so nothing here is called per relayed chunk:
bytes are summed in plain ints by the relay and flushed once a second and at session end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from ..tls.contexts import BackendTls, ServerTls
    from ..tls.loader import Loaded
    from .httpd import HttpListener

log = logging.getLogger("dwsproxy.metrics")

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# No `_created` series: one per counter/histogram series doubles what Prometheus stores, and a
# counter's reset already shows a restart. Called before any metric below is declared.
disable_created_metrics()  # type: ignore[no-untyped-call,unused-ignore]

REJECT_REASONS = (
    "ssl_required", "ssl_disabled", "client_cert_missing", "client_cert_invalid",
    "client_cert_revoked", "tls_version", "tls_handshake", "rule", "bad_startup",
    "startup_timeout", "too_many_connections", "backend_unavailable",
    # SCRAM-SHA-256-PLUS chosen while the proxy's certificate is not the database's
    "channel_binding",
    # a TLS client closed for post-handshake floods (KeyUpdate, renegotiation; relay.py rule
    # 6), before or after the backend: a relayed one is in dwsproxy_connections_total too
    "tls_flood",
    # dropped while still negotiating, for a newer connection (server.NegotiationBudget)
    "negotiation_budget",
)
BACKEND_TLS_REASONS = ("untrusted", "name_mismatch", "expired", "ssl_refused", "handshake",
                       # direct TLS: the server selected no ALPN, or not "postgresql"
                       "alpn",
                       # a backend closed for a post-handshake TLS flood (backend_tls.py)
                       "flood")

CONNECTIONS = Counter(
    "dwsproxy_connections_total", "Sessions handed to the backend.",
    ["encryption", "tls_version", "client_cert", "backend_encryption"])
REJECTED = Counter(
    "dwsproxy_connections_rejected_total", "Connections refused or closed before the backend.",
    ["reason"])
ACTIVE = Gauge(
    "dwsproxy_active_connections", "Client connections open now.", ["encryption"],
    multiprocess_mode="livesum")
SSL_REQUESTS = Counter(
    "dwsproxy_ssl_requests_total", "SSLRequest packets by the answer given.", ["response"])
HANDSHAKE_SECONDS = Histogram(
    "dwsproxy_tls_handshake_seconds", "Client-side TLS handshake duration.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BACKEND_CONNECT_SECONDS = Histogram(
    "dwsproxy_backend_connect_seconds", "TCP connect to the backend.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
BYTES = Counter("dwsproxy_bytes_total", "Bytes relayed.", ["direction"])
BACKEND_TLS_FAILURES = Counter(
    "dwsproxy_backend_tls_failures_total", "Connections to the backend that failed in TLS.",
    ["reason"])
CANCELS = Counter("dwsproxy_cancel_requests_total", "CancelRequest packets, by what was done.",
                  ["result"])
TERMINATED = Counter(
    "dwsproxy_sessions_terminated_total",
    "Open sessions ended by the proxy: by a reload (a CRL revoking their certificate, rules "
    "refusing them) or by hand (admin).",
    ["reason"])
# revoked by a reload's CRLs, no longer trusted by its CA file, refused by its rules, or ended
# by hand (POST /sessions/{id}/terminate)
TERMINATE_REASONS = ("client_cert_revoked", "client_cert_invalid", "rule", "admin")
ENDED = Counter(
    "dwsproxy_sessions_ended_total",
    "Relayed sessions by who ended them and how, each once.", ["end"])
SESSION_ENDS = ("client_closed", "client_reset", "backend_closed", "backend_reset",
                "idle_timeout", "shutdown", "terminated")
PROXY_PROTOCOL = Counter(
    "dwsproxy_proxy_protocol_total",
    "PROXY protocol headers ([listen] proxy_protocol): accepted, or refused and closed "
    "(malformed, too long, incomplete, missing from a trusted balancer, or sent by an "
    "untrusted peer).", ["result"])
ADMIN_REQUESTS = Counter(
    "dwsproxy_admin_requests_total", "Requests to the [admin] listener, by view and result "
    "(ok; unauthorized: no or a wrong token; refused: a foreign Host, an unknown view or "
    "session, a bad request).", ["view", "result"])
ADMIN_VIEWS = ("page", "status", "sessions", "terminate", "other")
ADMIN_RESULTS = ("ok", "unauthorized", "refused")


class _TlsFacts:
    """Certificate expiry and CRL nextUpdate of the config in force, read at scrape time by a
    custom collector in the serving process: a gauge series of a replaced certificate then
    disappears with it (multiprocess gauges cannot drop a label set)."""

    def __init__(self) -> None:
        self.server_tls: ServerTls | None = None
        self.backend_tls: BackendTls | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        expiry = GaugeMetricFamily(
            "dwsproxy_certificate_expiry_timestamp_seconds",
            "notAfter of the loaded certificates.", labels=["role", "subject"])
        crl_next = GaugeMetricFamily(
            "dwsproxy_crl_next_update_timestamp_seconds", "nextUpdate of the loaded CRLs.",
            labels=["issuer"])
        st = self.server_tls
        if st is not None:
            if st.server_cert is not None:
                expiry.add_metric(["server", st.server_cert.subject], st.server_cert.not_after)
            for ca in st.ca_certs:
                expiry.add_metric(["ca", ca.subject], ca.not_after)
            for crl in st.crls:
                if crl.next_update is not None:
                    crl_next.add_metric([crl.issuer], crl.next_update)
        bt = self.backend_tls
        if bt is not None:
            for ca in bt.ca_certs:
                expiry.add_metric(["backend_ca", ca.subject], ca.not_after)
            if bt.client_cert is not None:
                expiry.add_metric(["backend_client", bt.client_cert.subject],
                                  bt.client_cert.not_after)
        yield expiry
        yield crl_next


TLS_FACTS = _TlsFacts()


class _Info:
    """dwsproxy_build_info and dwsproxy_config_info, read at scrape time in the serving process
    like the TLS facts: one series each, whatever the number of workers, and the replaced
    configuration's series gone with it. `count by (sha256) (dwsproxy_config_info)` across
    replicas is the fleet's "synchronized"."""

    def __init__(self) -> None:
        self.config_sha256 = ""
        self._build: tuple[str, str, str] | None = None

    def build(self) -> tuple[str, str, str]:
        if self._build is None:  # importlib.metadata only when first scraped (admin.version)
            import platform
            import ssl

            from .admin import version

            self._build = (version(), platform.python_version(), ssl.OPENSSL_VERSION)
        return self._build

    def collect(self) -> Iterator[GaugeMetricFamily]:
        build = GaugeMetricFamily("dwsproxy_build_info", "The running dwsproxy's version, "
                                  "Python and OpenSSL (value 1).",
                                  labels=["version", "python", "openssl"])
        build.add_metric(list(self.build()), 1)
        yield build
        config = GaugeMetricFamily("dwsproxy_config_info", "The configuration in force: sha256 "
                                   "of its file and every file it names (value 1).",
                                   labels=["sha256"])
        if self.config_sha256:
            config.add_metric([self.config_sha256], 1)
        yield config


INFO = _Info()
RELOADS = Counter("dwsproxy_config_reloads_total", "Configuration reloads.", ["result"])
LAST_RELOAD_SUCCESS = Gauge(
    "dwsproxy_config_last_reload_success_timestamp_seconds",
    "When the configuration in force was loaded.", multiprocess_mode="mostrecent")

# The series a dashboard expects to see at zero, created up front and kept: labels() takes a
# lock and builds a key on every call.
_REJECTED_SERIES = {reason: REJECTED.labels(reason) for reason in REJECT_REASONS}
_SSL_REQUEST_SERIES = {answer: SSL_REQUESTS.labels(answer) for answer in ("S", "N")}
for _result in ("success", "failure"):
    RELOADS.labels(_result)
_CANCEL_SERIES = {result: CANCELS.labels(result) for result in ("forwarded", "refused")}
_TERMINATED_SERIES = {reason: TERMINATED.labels(reason) for reason in TERMINATE_REASONS}
_PROXY_PROTOCOL_SERIES = {result: PROXY_PROTOCOL.labels(result)
                          for result in ("accepted", "refused")}
_ADMIN_SERIES = {(view, result): ADMIN_REQUESTS.labels(view, result)
                 for view in ADMIN_VIEWS for result in ADMIN_RESULTS}
_BYTES_C2B = BYTES.labels("client_to_backend")
_BYTES_B2C = BYTES.labels("backend_to_client")


_CONNECTION_SERIES: dict[tuple[str, str, bool, bool], Any] = {}
_BACKEND_TLS_SERIES = {reason: BACKEND_TLS_FAILURES.labels(reason)
                       for reason in BACKEND_TLS_REASONS}


def accepted(encryption: str, tls_version: str, client_cert: bool,
             backend_encrypted: bool = False) -> None:
    key = (encryption, tls_version, client_cert, backend_encrypted)
    series = _CONNECTION_SERIES.get(key)
    if series is None:
        series = _CONNECTION_SERIES[key] = CONNECTIONS.labels(
            encryption, tls_version, "verified" if client_cert else "none",
            "tls" if backend_encrypted else "plain")
    series.inc()


def backend_tls_failed(reason: str) -> None:
    _BACKEND_TLS_SERIES[reason].inc()


def rejected(reason: str) -> None:
    series = _REJECTED_SERIES.get(reason)
    if series is None:
        raise ValueError(f"unknown rejection reason {reason!r}")
    series.inc()


def cancel_request(result: str) -> None:
    _CANCEL_SERIES[result].inc()


_ENDED_SERIES = {end: ENDED.labels(end) for end in SESSION_ENDS}


def session_ended(end: str) -> None:
    _ENDED_SERIES[end].inc()


def terminated(reason: str) -> None:
    _TERMINATED_SERIES[reason].inc()


def proxy_protocol(result: str) -> None:
    _PROXY_PROTOCOL_SERIES[result].inc()


def admin_request(view: str, result: str) -> None:
    _ADMIN_SERIES[(view if view in ADMIN_VIEWS else "other", result)].inc()


def ssl_request(answer: str) -> None:
    _SSL_REQUEST_SERIES[answer].inc()


_ACTIVE_SERIES = {enc: ACTIVE.labels(enc) for enc in ("tls", "plain")}


def active(encryption: str, delta: int) -> None:
    _ACTIVE_SERIES[encryption].inc(delta)


def add_bytes(client_to_backend: int, backend_to_client: int) -> None:
    if client_to_backend:
        _BYTES_C2B.inc(client_to_backend)
    if backend_to_client:
        _BYTES_B2C.inc(backend_to_client)


class _BackendUp:
    """dwsproxy_backend_up{backend}, read at scrape time from the health checker of the
    serving process: a host removed by a reload disappears with it."""

    def __init__(self) -> None:
        self.hosts: Callable[[], list[tuple[str, bool]]] = list

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("dwsproxy_backend_up",
                               "Whether each backend host answered its last check (1) or not.",
                               labels=["backend"])
        for address, ok in self.hosts():
            up.add_metric([address], 1.0 if ok else 0.0)
        yield up


BACKEND_UP = _BackendUp()


def config_loaded(loaded: Loaded, *, reload: bool) -> None:
    """Point the certificate/CRL gauges at a newly loaded config; count a reload."""
    TLS_FACTS.server_tls = loaded.server_tls
    TLS_FACTS.backend_tls = loaded.backend_tls
    INFO.config_sha256 = loaded.snapshot.sha256
    if reload:
        RELOADS.labels("success").inc()
    LAST_RELOAD_SUCCESS.set(time.time())


def reload_failed() -> None:
    RELOADS.labels("failure").inc()


def registry() -> CollectorRegistry:
    """The registry the serving process exposes (called once, by serve_http)."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
    else:
        reg = REGISTRY
    reg.register(TLS_FACTS)  # type: ignore[arg-type,unused-ignore]
    reg.register(INFO)  # type: ignore[arg-type,unused-ignore]
    reg.register(BACKEND_UP)  # type: ignore[arg-type,unused-ignore]
    return reg


def mark_process_dead(pid: int) -> None:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


async def serve_http(host: str, port: int, healthy: Callable[[], bool], *,
                     live: Callable[[], bool] | None = None,
                     ready: Callable[[], Awaitable[bool]] | None = None) -> HttpListener:
    """GET /metrics (Prometheus text), GET /healthz, /livez (the process serves) and /readyz
    (a backend answered within connect_timeout), each 200 or 503; at most
    httpd.MAX_CONNECTIONS at once. The admin views have their own listener (admin.py)."""
    from . import httpd

    reg = registry()
    loop = asyncio.get_running_loop()

    async def handle(request: httpd.Request) -> httpd.Response:
        if request.method not in ("GET", "HEAD"):
            return httpd.text(405, "GET only")
        if request.path == "/metrics":
            body = await loop.run_in_executor(None, generate_latest, reg)
            return httpd.Response(200, body, CONTENT_TYPE_LATEST)
        if request.path in ("/healthz", "/livez", "/readyz"):
            if request.path == "/livez":
                ok = (live or healthy)()
            elif request.path == "/readyz":
                ok = await ready() if ready is not None else healthy()
            else:
                ok = healthy()
            return httpd.text(200 if ok else 503, "ok" if ok else "unhealthy")
        return httpd.text(404, "not found")

    return httpd.HttpListener(httpd.listen_socket(host, port), handle,
                              max_connections=httpd.MAX_CONNECTIONS, name="metrics")
