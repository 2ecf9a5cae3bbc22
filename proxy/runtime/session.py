"""One client from its first byte to its close.

Owns: carrying out the negotiation's actions (negotiation.py decides which packet may come when:
SSLRequest / GSSENCRequest / CancelRequest / direct TLS / StartupMessage), gathering the facts
the policy needs, acting on its decision (ErrorResponse or backend connect), handing both sides
to the relay, and recording one outcome: one metric and one log line. Must not decide the order
of packets (negotiation.py) or policy (policy.py), nor parse packets itself (wire.py).

The first reads are done on the raw, non-blocking socket, before any asyncio transport exists,
into the session's own buffer (`_raw`): one recv() takes whatever the client sent, up to
RAW_READ bytes, so a first packet costs one system call — no peek at the first byte, no second
look for bytes after an SSLRequest. A first byte 0x16 is a direct-TLS ClientHello: its records
(and anything read after them) go to OpenSSL from that buffer. Whatever the client sent past an
SSLRequest's 8 bytes before our `S` is a protocol violation (CVE-2021-23214): it is what is left
in the buffer, as in PostgreSQL (pq_buffer_remaining_data), and is refused with 08P01 before the
handshake. Only then is the socket given to `loop.connect_accepted_socket`, with TLS or without.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

from .. import policy
from ..config.schema import address_matches
from ..ops import metrics
from ..protocol import negotiation, proxyproto, wire
from ..protocol.backendkey import BackendKey, KeyScan
from ..protocol.negotiation import (
    AskPolicy,
    Close,
    Connect,
    ForwardCancel,
    Negotiation,
    Phase,
    Refuse,
    Reply,
    StartTls,
)
from ..tls import contexts as tls
from ..tls.verify import CertVerdict
from . import backend as backend_mod
from . import tcp
from .backends import HostState, NoBackend
from .relay import Endpoint, TlsEndpoint, ToTlsEndpoint, link
from .timeouts import within as within

ALPN_OFFER = tls.ALPN_POSTGRESQL.encode()

if TYPE_CHECKING:
    from ..config.schema import Config
    from ..tls.loader import Loaded
    from .state import ServerState

log = logging.getLogger("dwsproxy.session")

_PID = os.getpid()
_CLIENT_HELLO = negotiation.ClientHello()
_TLS_ESTABLISHED = negotiation.TlsEstablished()
_ENCRYPTION_REQUESTS = (wire.SSLRequest, wire.GSSENCRequest)
_FIRST_PACKETS = (wire.StartupMessage, wire.CancelRequest, wire.ProtocolViolation)
# What one raw read asks for: more than an SSLRequest or a usual StartupMessage (at most 10000
# bytes) or ClientHello, so that one recv() takes what the client sent at once.
RAW_READ = 8192


class Session:
    # Slots, not a per-instance dict: a session lives as long as its client, and idle
    # sessions are most of a busy proxy's memory.
    __slots__ = ("_addr", "_header_pending", "_raw", "_terminate_deadline", "alpn", "backend",
                 "backend_encrypted", "backend_host", "backend_keys", "cancel_key",
                 "cert_error", "cipher", "client", "client_cert", "detail", "direct",
                 "encrypted", "end", "evicted", "facts", "flushed_b2c", "flushed_c2b", "id",
                 "idle_marker", "idle_since", "linked", "loaded", "local", "loop", "negotiation",
                 "outcome", "peer_addr", "peer_chain", "peer_host", "sock", "started",
                 "started_at", "startup", "state", "terminating", "tls_version", "via")

    def __init__(self, sock: socket.socket, state: ServerState[Session],
                 addr: Any = None) -> None:
        self.sock = sock
        self._addr = addr  # the peer address accept() returned
        self._raw = bytearray()  # read from the raw socket, not yet taken by the negotiation
        self.state = state
        # the configuration in force at accept, until a reload catches up with this session
        self.loaded: Loaded = state.loaded
        self.loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        self.started_at = time.time()
        self.id = state.register(self)
        self.client: Endpoint | None = None
        self.backend: Endpoint | None = None
        self.startup: wire.StartupMessage | None = None
        self.peer_addr = ""
        self.peer_host = ""
        self.encrypted = False
        self.direct = False
        self.tls_version = ""
        self.cipher = ""
        self.alpn: str | None = None
        self.client_cert: tls.CertFacts | None = None
        # the presented chain (DER), kept to check it again when a reload brings new CRLs
        self.peer_chain: tuple[bytes, tuple[bytes, ...]] | None = None
        self.cert_error: CertVerdict | None = None
        self.facts: policy.Facts | None = None  # what the policy allowed, for reload rechecks
        self.backend_encrypted = False
        self.backend_host: HostState | None = None  # the host of [backend] host serving it
        self.cancel_key: bytes | None = None  # its BackendKeyData, with several hosts
        self.backend_keys: KeyScan | None = None  # the BackendKeyData seen in passing
        self.via = ""  # the load balancer's address when a PROXY header named the client
        self._header_pending = False  # reading the PROXY protocol header
        self.terminating: bytes | None = None  # the FATAL a reload ends this session with
        self._terminate_deadline = 0.0
        self.outcome = "closed"
        self.detail = ""
        # how a relayed session ended when the proxy ended it (idle_timeout, shutdown,
        # terminated); else who ended it is read off the two sides at the end
        self.end: str | None = None
        self.linked = False
        # a client of the Unix-socket listener: no TLS there, as PostgreSQL answers 'N' to an
        # SSLRequest on a Unix socket; rules see it as `local`
        self.local = sock is not None and sock.family == socket.AF_UNIX
        self.negotiation = Negotiation(ssl=self.cfg.tls.ssl and not self.local,
                                       direct_ssl=self.cfg.tls.direct_ssl and not self.local)
        self.evicted: str | None = None  # why the server dropped it (negotiation budget)
        self.flushed_c2b = 0
        self.flushed_b2c = 0
        self.idle_marker: tuple[int, int] = (0, 0)
        self.idle_since = time.monotonic()

    @property
    def cfg(self) -> Config:
        return self.loaded.config

    # -- entry point ----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            self._prepare_socket()
            try:
                allowed = await within(self.cfg.listen.startup_timeout, self._negotiate())
            except TimeoutError:
                if self._header_pending:
                    self._proxy_refused("the PROXY protocol header was incomplete after "
                                        f"listen.startup_timeout "
                                        f"({self.cfg.listen.startup_timeout}s)")
                    return
                self._reject("startup_timeout",
                             f"start-up not finished within {self.cfg.listen.startup_timeout}s")
                return
            finally:
                self.state.negotiated(self)  # out of the negotiation budget, whatever the end
            if allowed:
                await self._connect_and_relay()
        except (ConnectionError, OSError) as exc:
            if not self.linked and self.outcome == "closed":
                self._reject("bad_startup", f"connection error during start-up: {exc!r}")
        except asyncio.CancelledError:
            self.outcome = self.outcome if self.outcome != "closed" else "shutdown"
            raise
        except Exception:
            log.exception("session failed unexpectedly peer=%s", self.peer_addr)
            self.outcome = "internal_error"
        finally:
            self._finish()

    def _prepare_socket(self) -> None:
        sock = self.sock
        sock.setblocking(False)
        # Keepalive and the user timeout come from the listening socket (Linux copies them to
        # accepted sockets: server.Listener._keepalive);
        # TCP_NODELAY: uvloop sets it on every TCP transport it makes. The peer address is the
        # one accept() returned: no getpeername().
        if self.local:
            self.peer_addr = "[local]"  # PostgreSQL's word for a Unix-socket client
            return
        try:
            host, port = (self._addr if self._addr is not None else sock.getpeername())[:2]
            if ":" in host:  # IPv6; an IPv4 client of a dual-stack listener is ::ffff:a.b.c.d
                mapped = ipaddress.IPv6Address(host).ipv4_mapped
                host = str(mapped) if mapped is not None else host
            self.peer_host = host
            self.peer_addr = f"{host}:{port}"
        except (OSError, ValueError, TypeError):
            self.peer_addr = "unknown"

    def _peer_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.peer_host) if self.peer_host else None
        except ValueError:
            return None

    # -- raw socket helpers (negotiation only) ----------------------------------------------------
    async def _wait_readable(self) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        fd = self.sock.fileno()

        def readable() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_reader(fd, readable)
        try:
            await fut
        finally:
            self.loop.remove_reader(fd)

    async def _fill(self, n: int) -> bool:
        """Read until the raw buffer holds `n` bytes (True), or the client closed (False).
        Each read asks for RAW_READ bytes at least: it takes what the client sent in one go."""
        raw = self._raw
        while len(raw) < n:
            try:
                data = self.sock.recv(max(RAW_READ, n - len(raw)))
            except (BlockingIOError, InterruptedError):
                await self._wait_readable()
                continue
            if not data:
                return False
            raw += data
        return True

    async def _take(self, n: int) -> bytes | None:
        """The next `n` raw bytes; None when the client closed first."""
        if not await self._fill(n):
            return None
        data = bytes(self._raw[:n])
        del self._raw[:n]
        return data

    async def _read_raw_packet(self) -> wire.Event | negotiation.Eof:
        raw = self._raw
        while True:
            event, used = wire.parse_startup_packet(raw)
            if not isinstance(event, wire.NeedMore):
                del raw[:used]
                return event
            if not await self._fill(len(raw) + event.count):
                return negotiation.Eof(partial=bool(raw))

    # -- negotiation: negotiation.py decides the order, this carries out its actions ------------
    async def _read_event(self, phase: Phase) -> negotiation.Event:
        if phase is Phase.START:
            if not await self._fill(1):
                return negotiation.Eof()
            self.state.budget.spoke(self)  # talking: evicted after the idle ones
            if self._raw[0] == wire.TLS_HANDSHAKE_BYTE:
                return _CLIENT_HELLO
        elif phase is Phase.TLS:
            assert self.client is not None
            event = await self.client.read_packet()
            if event is None:
                return negotiation.Eof(partial=bool(self.client.buffer))
            return event
        return await self._read_raw_packet()

    async def _negotiate(self) -> bool:
        if self.cfg.listen.proxy_protocol and not await self._proxy_header():
            return False
        neg = self.negotiation
        event: negotiation.Event | None = None
        while True:
            if event is None:
                event = await self._read_event(neg.phase)
            pipelined = None
            if self.client is None:
                if isinstance(event, _ENCRYPTION_REQUESTS):
                    pipelined = bool(self._raw)  # read with the request, before our answer
                elif isinstance(event, _FIRST_PACKETS):
                    # The loop owns the socket from here: what the client sent after this
                    # packet is read (relayed after a StartupMessage, else dropped), so a close
                    # is a FIN after any ErrorResponse, never an RST over unread bytes.
                    self.client = await self._wrap()
            actions = neg.receive(event, pipelined)
            event = None
            for action in actions:
                if isinstance(action, Reply):
                    if action.request == "SSLRequest":
                        metrics.ssl_request(action.answer.decode())
                    await self._send_raw(action.answer)
                elif isinstance(action, StartTls):
                    event = await self._start_tls()
                elif isinstance(action, AskPolicy):
                    event = self._ask_policy(action.startup)
                elif isinstance(action, Connect):
                    if self.evicted is not None:  # dropped while the policy was asked
                        self._reject("negotiation_budget", self.evicted)
                        return False
                    return True
                elif isinstance(action, Refuse):
                    if self.client is None:
                        await self._refuse_raw(action.reason, action.sqlstate, action.message,
                                               action.hint, detail=action.detail)
                    else:
                        self._refuse(action.reason, action.sqlstate, action.message,
                                     action.hint, detail=action.detail)
                    return False
                elif isinstance(action, Close):
                    if action.reason == "empty":
                        self._quiet_close()
                    else:
                        self._reject(action.reason, action.detail)
                    return False
                else:
                    assert isinstance(action, ForwardCancel)
                    self._catch_up()
                    await self._cancel(action.request)
                    return False

    # -- the PROXY protocol header, before anything else -----------------------------------------
    async def _proxy_header(self) -> bool:
        """With `[listen] proxy_protocol`: a trusted balancer's connection must begin with a
        header, whose source becomes this session's peer for rules, cancel limits, logs, views
        and metrics; anyone else's must not begin with one. Nothing is answered before the
        header is whole (the spec: the receiver "MUST NOT start processing the connection"
        before it). False: the connection was closed, counted."""
        peer = self._peer_ip()
        trusted = peer is not None and any(
            address_matches(net, peer) for net in self.cfg.listen.trusted_proxies)
        raw = self._raw
        self._header_pending = True
        while True:
            event, used = proxyproto.parse_header(raw)
            if not isinstance(event, wire.NeedMore):
                break
            if not await self._fill(len(raw) + event.count):
                self._header_pending = False
                if not raw:
                    self._quiet_close()  # a bare TCP connect: a balancer's port check
                else:
                    self._proxy_refused("the connection closed before the PROXY protocol "
                                        "header was whole (incomplete header)")
                return False
        self._header_pending = False
        if not trusted:
            if isinstance(event, proxyproto.NoHeader):
                return True  # an ordinary client, judged by its own address
            self._proxy_refused(f"a PROXY protocol header from an untrusted peer "
                                f"{self.peer_addr} (listen.trusted_proxies)")
            return False
        if isinstance(event, proxyproto.NoHeader):
            self._proxy_refused(f"no PROXY protocol header from the trusted balancer "
                                f"{self.peer_addr} (listen.proxy_protocol is on)")
            return False
        if isinstance(event, proxyproto.Malformed):
            self._proxy_refused(f"malformed PROXY protocol header from {self.peer_addr}: "
                                f"{event.reason}")
            return False
        del raw[:used]
        metrics.proxy_protocol("accepted")
        if isinstance(event, proxyproto.ProxyHeader):
            self.via = self.peer_addr
            host, port = event.source
            self.peer_host = host
            self.peer_addr = f"{host}:{port}"  # as for a direct client
        return True

    def _proxy_refused(self, detail: str) -> None:
        metrics.proxy_protocol("refused")
        self.outcome = "proxy_protocol"
        self.detail = detail

    async def _wrap(self) -> Endpoint:
        endpoint = Endpoint()
        endpoint.buffer += self._raw  # sent after the packet: relayed after a StartupMessage
        self._raw.clear()
        await self.loop.connect_accepted_socket(lambda: endpoint, self.sock)
        return endpoint

    async def _send_raw(self, data: bytes) -> None:
        # A fresh socket's send buffer is empty: `S`/`N` or an ErrorResponse goes out in one
        # send(); the loop's sock_sendall costs ~10% of a connection's CPU under uvloop.
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            await self.loop.sock_sendall(self.sock, data[sent:])

    async def _read_client_hello(self) -> tuple[bytes, bytes | None] | None:
        """The TLS records that carry a direct-TLS ClientHello, read whole, so its ALPN offer
        is checked before OpenSSL answers it: (the records as received, the ClientHello
        handshake message or None when it is not a well-formed one within the bounds).
        None when the client closed first."""
        records, handshake = b"", b""
        for _ in range(tls.CLIENT_HELLO_MAX_RECORDS):
            head = await self._take(tls.TLS_RECORD_HEADER)
            if head is None:
                return None
            size = int.from_bytes(head[3:5], "big")
            if head[0] != wire.TLS_HANDSHAKE_BYTE or size > tls.TLS_MAX_RECORD:
                return records + head, None
            body = await self._take(size)
            if body is None:
                return None
            records += head + body
            handshake += body
            if len(handshake) >= 4:
                want = 4 + int.from_bytes(handshake[1:4], "big")
                if want > tls.CLIENT_HELLO_MAX:
                    return records, None
                if len(handshake) >= want:
                    return records, handshake[:want]
        return records, None

    async def _start_tls(self) -> negotiation.TlsEstablished | negotiation.TlsFailed:
        server_tls = self.loaded.server_tls
        assert server_tls is not None
        records, hello = b"", None
        self.direct = self.negotiation.direct
        if self.direct:
            read = await self._read_client_hello()
            if read is None:
                return negotiation.TlsFailed("tls_handshake",
                                             "client closed in the middle of its ClientHello")
            records, hello = read
            # OpenSSL gets whatever followed the ClientHello too (read with it)
            records += self._raw
            self._raw.clear()
        t0 = time.perf_counter()
        client = TlsEndpoint(server_tls.context)
        if records:  # direct TLS: no ALPN "postgresql" in the offer, or no readable offer
            offered = tls.client_hello_alpn(hello) if hello is not None else None
            if offered is None or ALPN_OFFER not in offered:
                tls.refuse_alpn(client.ssl_object)
            client.initial = records  # fed to OpenSSL in connection_made, before any read
        await self.loop.connect_accepted_socket(lambda: client, self.sock)
        self.client = client  # from here on _finish() closes it, whatever happens
        try:
            await client.handshake
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            return negotiation.TlsFailed(*tls.handshake_failure(exc))
        metrics.HANDSHAKE_SECONDS.observe(time.perf_counter() - t0)
        self.encrypted = True
        sslobj = client.ssl_object
        self.tls_version = sslobj.version() or ""
        cipher = sslobj.cipher()
        self.cipher = cipher[0] if cipher else ""
        self.alpn = sslobj.selected_alpn_protocol()
        self.peer_chain = tls.peer_chain(sslobj)
        if self.peer_chain is not None:
            self.cert_error = self._check_certificate(server_tls)
        return _TLS_ESTABLISHED

    def _check_certificate(self, server_tls: tls.ServerTls) -> CertVerdict | None:
        """Facts of the presented certificate and OpenSSL's verdict on it with the CRLs of
        `server_tls`; (reason, message) when it must be refused."""
        assert self.peer_chain is not None
        leaf, chain = self.peer_chain
        try:
            self.client_cert = tls.peer_cert_facts(leaf)
        except ValueError as exc:
            # OpenSSL accepted it, `cryptography` cannot read it (e.g. a non-ASCII dNSName):
            # without its names no policy can be applied to it.
            return CertVerdict("client_cert_invalid",
                                      f"client certificate refused: it cannot be parsed ({exc})")
        if server_tls.verifier is None:  # pragma: no cover - certificates need a CA file
            return CertVerdict("client_cert_invalid",
                                      "client certificate refused: no CA configured")
        return server_tls.verifier.check(leaf, chain)

    def _catch_up(self) -> None:
        """A reload happened while this connection negotiated: it is judged by the
        configuration in force now, not the one at accept, its certificate checked again (a
        connection that finished its handshake just before a revoking reload must not slip
        in after it)."""
        new = self.state.loaded
        if new is self.loaded:
            return
        self.loaded = new
        if self.peer_chain is not None and new.server_tls is not None \
                and new.server_tls.verifier is not None:
            self.cert_error = self._check_certificate(new.server_tls)

    def _decide(self) -> policy.Decision:
        assert self.startup is not None
        event = self.startup
        self.facts = self._facts(user=event.user, database=event.database,
                                 application_name=event.application_name,
                                 replication=event.replication == "physical")
        return policy.decide(self.cfg.tls, self.cfg.rules, self.facts, self.cfg.ident)

    def _ask_policy(self, startup: wire.StartupMessage) -> policy.Decision:
        """The decision on a StartupMessage: the connection limit, the replication parameter,
        then policy.decide; the negotiation turns it into Connect or a refusal."""
        self._catch_up()
        self.startup = startup
        if self.state.sessions_over_limit():
            return policy.Reject("too_many_connections", wire.TOO_MANY_CONNECTIONS,
                                 "sorry, too many clients already",
                                 hint=self.state.too_many_hint())
        if startup.replication is None:
            value = startup.parameters["replication"]
            return policy.Reject("bad_startup", wire.INVALID_PARAMETER_VALUE,
                                 f"invalid value for parameter \"replication\": \"{value}\"",
                                 hint="Valid values are: \"false\", 0, \"true\", 1, "
                                      "\"database\".")
        return self._decide()

    def _facts(self, **startup: Any) -> policy.Facts:
        return policy.Facts(
            encrypted=self.encrypted, tls_version=self.tls_version, cipher=self.cipher,
            direct_tls=self.direct, alpn=self.alpn, client_cert=self.client_cert,
            client_cert_error=self.cert_error,
            peer=self._peer_ip() if self.cfg.rules else None,  # only [[rules]] look at it
            local=self.local, **startup)

    async def _cancel(self, event: wire.CancelRequest) -> None:
        """Police a CancelRequest, then forward exactly its packet (policy.decide_cancel)."""
        decision = policy.decide_cancel(self.cfg.rules, self._facts())
        if isinstance(decision, policy.Reject):
            self._cancel_refused(decision.message)
            return
        if not self.state.cancel_allowed(self.peer_host):
            self._cancel_refused(f"more than {self.state.cancel_rate_text} from {self.peer_host}")
            return
        await self._forward_cancel(event.raw)

    def _cancel_refused(self, why: str) -> None:
        # No answer: PostgreSQL never replies to a CancelRequest, so neither does a refusal.
        metrics.cancel_request("refused")
        self.outcome = "cancel_refused"
        self.detail = why

    async def _forward_cancel(self, raw: bytes) -> None:
        # Sessions are relayed 1:1, so the backend's own BackendKeyData reached the client and
        # the key in this request is the backend's: pass it on unchanged, over the same TLS
        # settings as the sessions, to the host that holds the session. With several hosts,
        # a key this process did not see goes nowhere when this is the only process (it is
        # stale or guessed), and to every host when workers share the port (its session may
        # be another worker's; the secret key makes it a no-op where it does not belong), each
        # host charged to the source's cancel rate: one request is not N backend forks.
        cfg = self.cfg.backend
        hosts = cfg.hosts
        if len(hosts) > 1:
            # the request's pid and key are the BackendKeyData's body (protocol 3.2 keys are
            # longer than 3.0's four bytes: the whole rest of the packet)
            address = self.state.cancel_keys.get(raw[8:])
            host = self.state.backends.host_of(cfg, address) if address else None
            if host is not None:
                hosts = (host,)
            elif self.state.processes == 1:
                self._cancel_refused("no session of this proxy holds that cancel key")
                return
            elif not all(self.state.cancel_allowed(self.peer_host)
                         for _ in range(len(hosts) - 1)):
                self._cancel_refused(f"more than {self.state.cancel_rate_text} from "
                                     f"{self.peer_host} (a key sent to {len(hosts)} hosts)")
                return
        metrics.cancel_request("forwarded")
        self.outcome = "cancel_forwarded"
        self.detail = f"backend {','.join(h.address for h in hosts)}"
        results = await asyncio.gather(
            *(backend_mod.send_cancel(h, cfg, self.loaded.backend_tls, raw) for h in hosts),
            return_exceptions=True)
        failed = [f"{h.address}: {r}" for h, r in zip(hosts, results, strict=True)
                  if isinstance(r, BaseException)]
        if len(failed) == len(hosts):
            self.outcome = "cancel_failed"
            self.detail = "backend " + "; ".join(failed)

    # -- backend and relay ----------------------------------------------------------------------
    async def _connect_and_relay(self) -> None:
        assert self.client is not None and self.startup is not None
        cfg = self.cfg.backend
        t0 = time.perf_counter()
        factory = ToTlsEndpoint if self.encrypted else Endpoint
        try:
            chosen, backend = await self.state.backends.connect(
                self.loaded, factory, self.loaded.health_check_password)
        except NoBackend as exc:
            if len(cfg.hosts) == 1 and len(exc.tried) == 1:
                message = (f"could not connect to the database server at {exc.tried[0][0]}: "
                           f"{exc.tried[0][1]}")
            else:  # as libpq: every host tried, and why
                message = f"could not connect to any database server: {exc}"
            self._refuse(
                "backend_unavailable", wire.CONNECTION_FAILURE, message,
                hint="the proxy is up but its connection to the database is not; check the "
                     "database server" + (" and [backend] TLS settings" if exc.tls_reasons
                                          else "")
                     + ("" if cfg.target_session_attrs == "any" else
                        f" (backend.target_session_attrs is {cfg.target_session_attrs})"))
            return
        connected = chosen.connected
        self.backend_host = chosen.state
        self.backend = backend
        self.backend_encrypted = connected.encrypted
        # The backend's BackendKeyData passes through to the client; the session keeps a copy:
        # /sessions joins pg_stat_activity by its pid, and a termination cancels the running
        # query with its key.
        self.backend_keys = KeyScan()
        backend.watch = self.backend_keys.feed
        # a backend that vanished without FIN/RST is seen too, not only a dead client
        tcp.apply(backend.transport and backend.transport.get_extra_info("socket"),
                  self.cfg.listen)
        metrics.BACKEND_CONNECT_SECONDS.observe(time.perf_counter() - t0)
        plus = self._channel_binding_differs(connected)
        if plus or len(cfg.hosts) > 1:
            if not await self._startup_by_hand(plus, len(cfg.hosts) > 1):
                return
        else:
            # The StartupMessage alone: whatever the client pipelined after it stays in
            # client.buffer until link(), after the last check, so that a session refused
            # there has had no query run on the backend.
            self._to_backend(self._startup_for_backend())
        if not await self._backend_spoke():
            return
        # No await from here to link(): the session is judged by the configuration in force
        # at the moment it is linked, whatever a reload changed during the awaits above (the
        # backend connect, its first answer, the SCRAM-SHA-256-PLUS check).
        if not self._still_allowed():
            return
        encryption = "tls" if self.encrypted else "plain"
        metrics.accepted(encryption, self.tls_version, self.client_cert is not None,
                         connected.encrypted)
        metrics.active(encryption, 1)
        self.linked = True
        self.outcome = "ok"
        try:
            link(self.client, self.backend, b"")
            self.state.live.add(self)
            await self.client.closed
            await self.backend.closed
        finally:
            self.state.live.discard(self)
            metrics.active(encryption, -1)

    def _to_backend(self, data: bytes) -> None:
        """Client bytes written to the backend before link(), counted as relayed."""
        assert self.client is not None and self.backend is not None
        assert self.backend.transport is not None
        self.client.received += len(data)
        self.backend.transport.write(data)

    def _to_client(self, data: bytes) -> None:
        """Backend bytes written to the client before link(), counted as relayed."""
        assert self.client is not None and self.backend is not None
        assert self.client.transport is not None
        self.backend.received += len(data)
        self.backend.last = data[-6:]
        self.client.transport.write(data)
        if self.backend.watch is not None and self.backend.watch(data):
            self.backend.watch = None

    async def _backend_spoke(self) -> bool:
        """Wait for the backend's first answer to the StartupMessage. Until a byte of it is
        relayed, a backend that closes (a restart, `pg_ctl stop -m fast`) or never answers is
        the proxy's to report: FATAL 08006 naming the backend, never a bare EOF the client
        must guess at (libpq: "SSL SYSCALL error: EOF detected")."""
        backend = self.backend
        assert backend is not None
        if backend.received or backend.buffer:
            return True
        wait = self.cfg.listen.startup_timeout
        try:
            if await within(wait, backend.wait_for_bytes(1)):
                return True
            why = "closed the connection before answering the start-up"
        except TimeoutError:
            why = f"did not answer the start-up within {wait:g}s"
        backend.close(abort=True)
        self._refuse("backend_unavailable", wire.CONNECTION_FAILURE,
                     f"the database server at {self.backend_address()} {why}",
                     hint="the database may be restarting or shutting down; try again, and "
                          "check the database server's log")
        return False

    def backend_address(self) -> str:
        """`host:port` of the backend host this session uses (all of them before it has one)."""
        return self.backend_host.address if self.backend_host else self.cfg.backend.address

    def _still_allowed(self) -> bool:
        """Right before link(): the client is still there and the configuration in force now
        (a reload may have landed during any await since the policy's decision) still
        allows this session, its certificate checked against the new CRLs and CAs."""
        assert self.client is not None and self.backend is not None
        if self.client.closed.done():
            self.outcome = "client_gone"
            self.backend.close()
            return False
        if self.state.loaded is self.loaded:
            return True
        self._catch_up()
        decision = self._decide()
        if isinstance(decision, policy.Reject):
            self.backend.close()
            self._refuse(decision.reason, decision.sqlstate, decision.message,
                         hint=decision.hint)
            return False
        return True

    def _startup_for_backend(self) -> bytes:
        """The client's StartupMessage as the backend gets it: unchanged, or with the client's
        address added to application_name ([backend] application_name_add_host). The rules
        judged the client's own."""
        assert self.startup is not None
        if not self.cfg.backend.application_name_add_host:
            return self.startup.raw
        host, _, port = self.peer_addr.rpartition(":")
        address = f"[{host}]:{port}" if ":" in host else self.peer_addr
        return wire.application_name_with_host(self.startup, address)

    @property
    def backend_key(self) -> BackendKey | None:
        return self.backend_keys.key if self.backend_keys is not None else None

    def _cancel_backend_query(self) -> None:
        """Before the proxy closes a backend socket for good: a CancelRequest with the
        session's own key to the host holding it, so a running query stops now. PostgreSQL
        notices a vanished client only when it next writes to it; pg_sleep or a long sort
        would run on, holding locks."""
        key = self.backend_key
        if key is None or self.backend_host is None:
            return
        host, cfg, backend_tls = self.backend_host.host, self.cfg.backend, self.loaded.backend_tls

        async def send() -> None:
            try:
                await backend_mod.send_cancel(host, cfg, backend_tls, key.cancel_request())
            except backend_mod.BackendError as exc:
                log.warning("cancel of backend pid %d at %s failed: %s", key.pid,
                            host.address, exc)

        task = self.loop.create_task(send())
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)

    def _channel_binding_differs(self, connected: backend_mod.Connected) -> bool:
        """SCRAM-SHA-256-PLUS binds to the certificate the client saw (tls-server-end-point):
        across the proxy it can only succeed when the proxy presents the database's own."""
        server_tls = self.loaded.server_tls
        return (self.encrypted and connected.encrypted and server_tls is not None
                and connected.peer_cert != server_tls.server_cert_der)

    async def _startup_by_hand(self, plus: bool, want_key: bool) -> bool:
        """Relay the start-up message by message before link(), for two reasons:

        - `plus`: refuse a client that answers an AuthenticationSASL offering
          SCRAM-SHA-256-PLUS by picking it (the backend would only say "channel binding check
          failed"): across the proxy it can only succeed when the proxy presents the
          database's own certificate. Stripping -PLUS from the offer does not help: the client
          then sends the 'y' flag and a backend on TLS takes it for a downgrade.
        - `want_key`: with several backend hosts, follow the authentication to the
          BackendKeyData and note it, so that a CancelRequest carrying that key goes to the
          host holding the session.

        Only the StartupMessage and the client's answers to authentication requests ('p'
        messages) reach the backend here, each after the configuration in force is checked
        again; anything else the client sent waits in its buffer for link(), after the last
        check, so that a refused session has had no query run. Ends at the BackendKeyData,
        an ErrorResponse, a ReadyForQuery, or an exchange it does not follow (GSSAPI, SSPI).
        False when the session was refused."""
        assert self.client is not None and self.backend is not None and self.startup
        client, backend = self.client, self.backend
        assert client.transport is not None and backend.transport is not None
        self._to_backend(self._startup_for_backend())
        try:
            async with asyncio.timeout(self.cfg.listen.startup_timeout):
                while True:
                    message = await backend.read_message()
                    if message is None:
                        return True  # link() passes on whatever came, then the close
                    kind, body = message
                    self._to_client(_message(kind, body))
                    if kind == b"K":
                        self._note_cancel_key(body)
                        return True
                    if kind in (b"E", b"Z"):
                        return True
                    if kind != b"R" or body[:4] in _AUTH_SILENT:
                        # ParameterStatus, NoticeResponse, AuthenticationOk, SASLFinal: the
                        # backend goes on without the client
                        if want_key:
                            continue
                        return True
                    if body[:4] not in _AUTH_ANSWERED:
                        return True  # GSSAPI, SSPI: not followed here
                    answer = await client.read_message()
                    if answer is None:
                        return True
                    akind, abody = answer
                    if (plus and akind == b"p" and body[:4] == _AUTH_SASL
                            and _SCRAM_PLUS in body[4:].split(b"\0")
                            and abody.split(b"\0", 1)[0] == _SCRAM_PLUS):
                        self._refuse(
                            "channel_binding", wire.INVALID_AUTHORIZATION,
                            "channel binding cannot cross this proxy: the client chose "
                            "SCRAM-SHA-256-PLUS, but the certificate the proxy presents is "
                            "not the database's",
                            hint="connect with channel_binding=disable, or give the proxy the "
                                 "database's own certificate and key (tls.ssl_cert_file, "
                                 "tls.ssl_key_file)")
                        return False
                    if not want_key or akind != b"p":
                        # link() sends it, after the last check of the configuration
                        client.buffer[:0] = _message(akind, abody)
                        return True
                    if not self._still_allowed():
                        return False
                    self._to_backend(_message(akind, abody))
        except TimeoutError:
            self._refuse("startup_timeout", wire.PROTOCOL_VIOLATION,
                         "authentication not answered within listen.startup_timeout")
            return False

    def _note_cancel_key(self, key: bytes) -> None:
        if self.backend_host is not None:
            self.cancel_key = bytes(key)
            self.state.cancel_keys[self.cancel_key] = self.backend_host.address

    def flush_bytes(self) -> None:
        c2b = self.client.received if self.client else 0
        b2c = self.backend.received if self.backend else 0
        metrics.add_bytes(c2b - self.flushed_c2b, b2c - self.flushed_b2c)
        self.flushed_c2b, self.flushed_b2c = c2b, b2c

    def close(self, outcome: str) -> None:
        """The proxy ends the session: `outcome` is idle_timeout or shutdown."""
        self.outcome = outcome
        if self.end is None:
            self.end = outcome
        for side in (self.client, self.backend):
            if side is not None:
                side.close()

    # -- the admin view -------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """This connection as /sessions shows it (admin.md); never a secret."""
        startup = self.startup
        cert = self.client_cert
        key = self.backend_key
        backend_tls = ""
        if self.backend_encrypted and self.backend is not None and self.backend.transport:
            sslobj = self.backend.transport.get_extra_info("ssl_object")
            if sslobj is not None:
                suite = sslobj.cipher()
                backend_tls = f"{sslobj.version()}/{suite[0] if suite else ''}"
        c2b = self.client.received if self.client else 0
        b2c = self.backend.received if self.backend else 0
        return {
            "id": self.id, "worker": _PID, "peer": self.peer_addr,
            "state": "relaying" if self.linked else "negotiating",
            "user": startup.user if startup else None,
            "database": startup.database if startup else None,
            "application_name": startup.application_name if startup else None,
            "encryption": "tls" if self.encrypted else "plain",
            "tls": f"{self.tls_version}/{self.cipher}" if self.encrypted else "",
            "tls_version": self.tls_version, "cipher": self.cipher, "direct": self.direct,
            "client_cert": None if cert is None else {
                "subject": cert.subject, "issuer": cert.issuer, "serial": f"{cert.serial:x}",
                "not_after": _rfc3339(cert.not_after)},
            "backend_tls": backend_tls,
            "backend": self.backend_host.address if self.backend_host else None,
            "backend_local_port": _port(self.backend, "sockname"),
            "backend_pid": key.pid if key is not None else None,
            "backend_secret_known": key is not None,  # never the key itself
            "started": _rfc3339(self.started_at),
            "bytes_in": c2b, "bytes_out": b2c,
        }

    # -- a reload reaching an open session ------------------------------------------------------
    def recheck(self, new: Loaded) -> tuple[str, str] | None:
        """(reason, message) when the configuration `new` must end this open session: its
        certificate is revoked by the new CRLs or its chain no longer trusted by the new CA
        file, or the new rules refuse it. Other changes (require_ssl, clientcert levels, a
        certificate or CRL expiring) apply to new connections only, as in PostgreSQL."""
        server_tls = new.server_tls
        if self.peer_chain is not None and server_tls is not None and server_tls.verifier:
            verdict = server_tls.verifier.still_trusts(*self.peer_chain)
            if verdict is not None:
                return verdict
        if self.facts is not None:
            cfg = new.config
            facts = dataclasses.replace(self.facts,
                                        peer=self._peer_ip() if cfg.rules else None)
            decision = policy.decide_rules(cfg.tls.clientname, cfg.rules, facts, cfg.ident)
            if isinstance(decision, policy.Reject):
                return "rule", decision.message
        return None

    def terminate(self, reason: str, message: str) -> bool:
        """End a relaying session with a FATAL the client reads (57P01, as PostgreSQL's
        pg_terminate_backend): by a reload (reason client_cert_revoked, client_cert_invalid,
        rule), by hand (admin) or at the end of the shutdown grace (shutdown). The backend gets
        a CancelRequest with the session's key at once, so a running query stops; no new query
        is read from the client, and the error goes out at the next message boundary of the
        backend's stream (its ReadyForQuery, which the cancel brings), within TERMINATE_WAIT;
        past that the session is closed without it. False when the session is not relaying
        (yet, or any more)."""
        if self.terminating is not None or self.client is None or self.backend is None:
            return False
        if reason != "shutdown":  # a shutdown is not a termination of this session's doing
            metrics.terminated(reason)
        text = f"terminating connection: {message}"
        log.warning("%s", text, extra={"fields": {"peer": self.peer_addr,
                                                   "reason": reason}})
        self.terminating = wire.error_response(
            wire.ADMIN_SHUTDOWN, text,
            detail=_TERMINATE_DETAIL.get(
                reason, f"closed by dwsproxy after a configuration reload, reason {reason}"),
            hint="reconnect with a certificate and settings the new configuration allows"
            if reason not in _TERMINATE_DETAIL else "")
        self.detail = text
        self.outcome = f"terminated_{reason}" if reason != "shutdown" else "shutdown"
        self.end = "terminated" if reason != "shutdown" else "shutdown"
        # As a reason of the relay's own (ASKED), so that flow control resuming the client
        # (the backend drained) does not read it again; a plain transport's pause_reading
        # alone would be undone by that.
        self.client.hold()
        self._terminate_deadline = time.monotonic() + TERMINATE_WAIT
        self._cancel_backend_query()
        if not self.try_terminate() and self.backend.watch is None:
            # the cancel's ErrorResponse and ReadyForQuery are the boundary: act on them as
            # they pass, not at the next tick
            self.backend.watch = self._boundary_seen
        return True

    def shut_down(self) -> None:
        """The shutdown grace is over: end this session as a termination does (the running
        query cancelled, 57P01 to the client), or just close it while it negotiates."""
        if not self.terminate("shutdown", "the proxy is shutting down "
                              "(listen.shutdown_grace is over)"):
            self.close("shutdown")

    def _boundary_seen(self, data: bytes) -> bool:
        if self.backend is not None and _ends_with_ready_for_query(self.backend.last):
            self.loop.call_soon(self.try_terminate)  # after this chunk reached the client
            return True
        return False

    def try_terminate(self) -> bool:
        """Called at terminate() and then by the server's tick until the session ended."""
        if self.terminating is None or self.client is None or self.backend is None:
            return False
        client = self.client.transport
        at_boundary = _ends_with_ready_for_query(self.backend.last)
        if at_boundary and client is not None and not client.is_closing():
            client.write(self.terminating)
        elif time.monotonic() < self._terminate_deadline:
            return False
        else:
            self.detail += " (closed without the message: the backend was mid-reply)"
        self.backend.close()
        self.client.close()
        return True

    def evict(self, detail: str) -> None:
        """Dropped by the server for a newer connection (the negotiation budget): whatever this
        session waits on sees the client gone, and its end is recorded under that reason."""
        self.evicted = detail
        transport = self.client.transport if self.client is not None else None
        if transport is not None:
            transport.abort()
        else:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # a raw read or peek now sees EOF

    # -- outcome --------------------------------------------------------------------------------
    def _refuse(self, reason: str, sqlstate: str, message: str, hint: str = "", *,
                detail: str = "") -> None:
        """An ErrorResponse to the client, then the rejection recorded."""
        transport = self.client.transport if self.client is not None else None
        if transport is not None and not transport.is_closing():  # uvloop raises once closed
            transport.write(_refusal(reason, sqlstate, message, hint))
        self._reject(reason, detail or message)

    async def _refuse_raw(self, reason: str, sqlstate: str, message: str, hint: str = "", *,
                          detail: str = "") -> None:
        """_refuse() before the socket has a transport."""
        await self._send_raw(_refusal(reason, sqlstate, message, hint))
        self._reject(reason, detail or message)

    def _quiet_close(self) -> None:
        if self.evicted is not None:
            self._reject("negotiation_budget", self.evicted)
        else:
            self.outcome = "empty"  # a bare TCP connect (port probe): not a rejection

    def _reject(self, reason: str, detail: str) -> None:
        violation = self.client.violation if self.client is not None else None
        if self.evicted is not None:  # what a dropped connection ran into is not why it ended
            reason, detail = "negotiation_budget", self.evicted
        elif violation is not None:
            # the relay closed the client for it (a flood): what follows is its consequence
            reason, detail = violation
        metrics.rejected(reason)
        self.outcome = reason
        self.detail = detail

    def _ended_by(self) -> str:
        """How a relayed session ended (dwsproxy_sessions_ended_total{end}): ended by the
        proxy (idle_timeout, shutdown, terminated: a reload, an admin, a flood), else by the
        side whose connection ended first, cleanly (FIN, close_notify) or by a reset."""
        if self.end is not None:
            return self.end
        if any(side is not None and side.violation is not None
               for side in (self.client, self.backend)):
            return "terminated"  # a flood on either hop (relay.py, backend_tls.py)
        client, backend = _side_end(self.client), _side_end(self.backend)
        if backend is not None and (client is None or backend[0] < client[0]):
            if backend[2].endswith(_TERMINATE):
                # The client had said goodbye (Terminate) and the backend closed for it,
                # before the client's own close reached the proxy: the client ended it.
                return "client_closed"
            return f"backend_{backend[1]}"
        if client is not None:
            return f"client_{client[1]}"
        return "client_closed"  # pragma: no cover - a side always ended before _finish

    def _finish(self) -> None:
        if self.client is not None:
            self.client.close()  # graceful: an ErrorResponse still queued is flushed first
        else:
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.backend is not None:
            self.backend.close()
        if (self.client is not None and self.client.violation is not None
                and self.outcome in ("ok", "client_gone", "closed")):
            self._reject(*self.client.violation)  # closed for cause while relaying
        if self.backend is not None and self.backend.violation is not None:
            # backend_tls.py closed the backend hop for a TLS flood: the database's side (or
            # whoever is on its path) misbehaved, not the client
            metrics.backend_tls_failed("flood")
            self.outcome = "backend_tls_flood"
            self.detail = f"backend {self.cfg.backend.address}: {self.backend.violation[1]}"
        self.flush_bytes()
        if self.cancel_key is not None:
            self.state.cancel_keys.pop(self.cancel_key, None)
        self.state.session_ended(self)
        end = self._ended_by() if self.linked else ""
        if end:
            metrics.session_ended(end)
        fields: dict[str, Any] = {
            "peer": self.peer_addr,
            "worker_pid": _PID,
            "encryption": "tls" if self.encrypted else "plain",
            "backend_encryption": "tls" if self.backend_encrypted else "plain",
            "backend": self.backend_host.address if self.backend_host else "",
            "tls_version": self.tls_version,
            "cipher": self.cipher,
            "direct_tls": self.direct,
            "client_cert": self.client_cert.subject if self.client_cert else "",
            "user": self.startup.user if self.startup else "",
            "database": self.startup.database if self.startup else "",
            "application_name": self.startup.application_name if self.startup else "",
            "outcome": self.outcome,
            "end": end,
            "detail": self.detail,
            **({"via": self.via} if self.via else {}),
            **({"backend_pid": self.backend_key.pid} if self.backend_key else {}),
            "bytes_in": self.flushed_c2b,
            "bytes_out": self.flushed_b2c,
            "duration": round(time.monotonic() - self.started, 6),
        }
        level = logging.DEBUG if self.outcome == "empty" else logging.INFO
        log.log(level, "connection closed", extra={"fields": fields})


def _side_end(side: Endpoint | None) -> tuple[int, str, bytes] | None:
    return side.ended if side is not None else None


def _address(side: Endpoint | None, which: str) -> str:
    """host:port of a side's socket ("peername" or "sockname"); "" when unknown (a Unix
    socket's name is a path)."""
    transport = side.transport if side is not None else None
    info = transport.get_extra_info(which) if transport is not None else None
    if not isinstance(info, tuple) or len(info) < 2:
        return ""
    host, port = info[0], info[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _port(side: Endpoint | None, which: str) -> int | None:
    address = _address(side, which)
    return int(address.rpartition(":")[2]) if address else None


def _rfc3339(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


_TERMINATE = b"X\x00\x00\x00\x04"  # the client's Terminate message
_TERMINATE_DETAIL = {"admin": "closed by dwsproxy at an operator's request",
                     "shutdown": "the proxy is shutting down"}
TERMINATE_WAIT = 3.0  # seconds a terminated session may take to reach a message boundary
_READY_FOR_QUERY = b"Z\x00\x00\x00\x05"


def _ends_with_ready_for_query(chunk: bytes) -> bool:
    """Whether the backend's last chunk ended with a ReadyForQuery ('Z', length 5, status):
    the stream is then between messages and the client waits for a query."""
    return len(chunk) >= 6 and chunk[-6:-1] == _READY_FOR_QUERY and chunk[-1:] in b"ITE"


_AUTH_SASL = (10).to_bytes(4, "big")  # AuthenticationSASL
# Authentication requests the client answers with a message: cleartext, MD5, SASL, SASL
# continue; and those it does not: Ok, SASL final.
_AUTH_ANSWERED = frozenset(n.to_bytes(4, "big") for n in (3, 5, 10, 11))
_AUTH_SILENT = frozenset(n.to_bytes(4, "big") for n in (0, 12))
_SCRAM_PLUS = b"SCRAM-SHA-256-PLUS"


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def _refusal(reason: str, sqlstate: str, message: str, hint: str = "") -> bytes:
    """The ErrorResponse of every proxy refusal. libpq does not print a connection error's
    SQLSTATE, so DETAIL carries it, with the reason the metrics use."""
    return wire.error_response(sqlstate, message, hint=hint,
                               detail=f"refused by dwsproxy: SQLSTATE {sqlstate}, reason {reason}")
