"""Listeners, workers, signals and limits.

Owns: the accept loop, the count of open and admitted connections (max_connections), the
descriptor limits (RLIMIT_NOFILE raised, the socket ceiling derived from it) and the
negotiation budget, the once-a-second tick (byte counters, idle_timeout), the backend health
check, SIGHUP reload, SIGTERM/SIGINT graceful shutdown, and — with `workers > 1` — a supervising
parent that serves the metrics of all workers and restarts a worker that dies. Must not parse
the protocol or decide policy.

Descriptors, per worker process: every client socket may need a second descriptor (its backend,
or the connection its CancelRequest is forwarded on), so the client sockets open at once are
at most half of what RLIMIT_NOFILE leaves after the descriptors open at start and a reserve.
Of those, connections still negotiating (no StartupMessage allowed yet) have their own, smaller
budget, and one source address at most half of it: when it is full the oldest negotiating
connection is dropped for the new one (`negotiation_budget`), so idle sockets, which are old by
the time a real client comes, cannot keep it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import ipaddress
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import admin, loader, metrics, sdnotify
from . import backend as backend_mod
from . import config as config_mod
from . import workers as workers_mod
from .session import Session
from .workers import MAIN_PID_ENV, WORKER_SIGNALS, Workers

if TYPE_CHECKING:
    from .config import Config
    from .snapshot import Snapshot

log = logging.getLogger("dwsproxy.server")

ACCEPT_BATCH = 64
TLS_CLOSE_WAIT = 5.0
HEALTH_INTERVAL = 5.0


# CancelRequests per source address: each one costs the backend a connection (PostgreSQL forks
# for it), so one peer may send CANCEL_BURST at once and CANCEL_RATE a second after that.
CANCEL_RATE = 20.0
CANCEL_BURST = 40.0
CANCEL_SOURCES = 4096  # addresses remembered; the least recently seen is forgotten first


# Descriptors kept free besides the client sockets and their backends: metrics scrapes and
# /healthz, the backend health check, log files, closes still flushing (relay.CLOSE_TIMEOUT).
FD_RESERVE = 32
# Client sockets dropped for the negotiation budget close when their task next runs; accepting
# pauses once this many more than the ceiling are open, so that cannot overrun the descriptors.
EVICT_SLACK = 16
MIN_NEGOTIATING = 16


@dataclass(frozen=True)
class Limits:
    """What one worker holds at once, from its share of max_connections and its descriptors."""

    nofile: int  # the soft RLIMIT_NOFILE in force
    in_use: int  # descriptors open when the limits were taken (listening socket, loop, logs)
    share: int  # this worker's share of listen.max_connections
    relayed: int  # sessions admitted (past their StartupMessage): min(share, descriptors)
    negotiating: int  # connections not yet allowed, the negotiation budget
    per_source: int  # of those, from one source address

    @property
    def sockets(self) -> int:
        """The client-socket ceiling."""
        return self.relayed + self.negotiating

    @property
    def reserve(self) -> int:
        return FD_RESERVE + EVICT_SLACK

    def describe(self) -> str:
        return (f"RLIMIT_NOFILE {self.nofile}, {self.in_use} descriptors in use, "
                f"{self.reserve} reserved: at most {self.sockets} client sockets at once, "
                f"{self.relayed} relayed sessions (2 descriptors each) and "
                f"{self.negotiating} connections negotiating ({self.per_source} per source "
                f"address)")


def compute_limits(share: int, nofile: int, in_use: int) -> Limits:
    """Why these sizes: a relayed session needs 2 descriptors, and so may a negotiating one (a
    backend connect once allowed, or a forwarded CancelRequest). The negotiation budget is a
    quarter of the share (at least 16): a burst of real clients is mid-handshake for a few ms
    each, far fewer at once than the sessions they open, while every idle socket of a flood sits
    in it; it is at most a third of what the descriptors allow, so relayed sessions keep the
    rest. One source address may hold half of it: a flood from one address leaves the other
    half to everyone else, and clients behind one NAT or load balancer still get half."""
    ceiling = max(2, (nofile - in_use - FD_RESERVE - EVICT_SLACK) // 2)
    negotiating = max(1, min(max(MIN_NEGOTIATING, share // 4), ceiling // 3))
    relayed = max(1, min(share, ceiling - negotiating))
    return Limits(nofile=nofile, in_use=in_use, share=share, relayed=relayed,
                  negotiating=negotiating, per_source=max(1, negotiating // 2))


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit: (soft limit before, soft limit now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft == resource.RLIM_INFINITY or soft >= target:
        return (soft, soft) if soft != resource.RLIM_INFINITY else (target, target)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
        return soft, soft
    return soft, target


def _nr_open() -> int:
    # Linux refuses a limit above fs.nr_open even when the hard limit is "unlimited".
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 1 << 20


def descriptors_in_use() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # less the one listdir itself opened
        except OSError:
            continue
    return FD_RESERVE  # cannot tell: assume a reserve's worth


class Evictable(Protocol):
    def evict(self, detail: str) -> None: ...


class NegotiationBudget:
    """Connections still negotiating, oldest first (dicts keep insertion order), in all and by
    source address. A new one that finds the budget or its source's cap full evicts the oldest
    there, never itself: a flood's idle sockets are always older than a real client."""

    def __init__(self) -> None:
        self.negotiating: dict[Evictable, str] = {}
        self.by_source: dict[str, dict[Evictable, None]] = {}
        self.evicted = 0

    def enter(self, session: Evictable, source: str, limits: Limits) -> None:
        peers = self.by_source.get(source)
        if peers is not None and len(peers) >= limits.per_source:
            self._evict(next(iter(peers)),
                        f"dropped for a newer connection from {source}: {len(peers)} "
                        f"connections from that address were negotiating (per-source cap "
                        f"{limits.per_source}), this one the longest")
        if len(self.negotiating) >= limits.negotiating:
            self._evict(next(iter(self.negotiating)),
                        f"dropped for a newer connection: {len(self.negotiating)} connections "
                        f"were negotiating (negotiation budget {limits.negotiating}), this one "
                        f"the longest")
        self.negotiating[session] = source
        peers = self.by_source.get(source)
        if peers is None:
            peers = self.by_source[source] = {}
        peers[session] = None

    def leave(self, session: Evictable) -> None:
        source = self.negotiating.pop(session, None)
        if source is None:
            return
        peers = self.by_source[source]
        del peers[session]
        if not peers:
            del self.by_source[source]

    def _evict(self, victim: Evictable, detail: str) -> None:
        self.leave(victim)
        self.evicted += 1
        victim.evict(detail)


class ServerState:
    """What every session of one process shares: the config in force and the counts."""

    def __init__(self, cfg: Config, processes: int = 1, *, nofile: int | None = None,
                 in_use: int | None = None) -> None:
        self.config = cfg
        # The processes actually serving the port, fixed at start: a reloaded `workers` value
        # only applies after a restart, so it must not change this process's share.
        self.processes = processes
        self.open = 0  # client sockets open, negotiating or relaying
        self.admitted = 0  # sessions past the max_connections check, not yet ended
        self.live: set[Session] = set()  # sessions relaying
        self.tasks: set[asyncio.Task[None]] = set()
        self._cancel_tokens: dict[str, tuple[float, float]] = {}  # host -> (tokens, when)
        self.sessions: dict[str, Session] = {}  # every open client connection, for /sessions
        self._next_id = 0
        self._pid = os.getpid()  # this process's, after any fork: not a system call per id
        self.last_reload: dict[str, object] = {"result": None, "at": None, "error": None}
        self.loaded_at = _now_rfc3339()
        self.budget = NegotiationBudget()
        self.nofile = nofile if nofile is not None else \
            resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.in_use = in_use if in_use is not None else descriptors_in_use()
        self._limits: Limits | None = None
        self._limits_for: Config | None = None
        self.on_capacity: Callable[[], None] | None = None  # a listener paused at the ceiling

    def register(self, session: Session) -> str:
        self._next_id += 1
        sid = f"{self._pid}-{self._next_id}"
        self.sessions[sid] = session
        return sid

    @property
    def limits(self) -> Limits:
        # Taken again when a reload changed the config (max_connections may have changed).
        if self._limits_for is not self.config:
            # Each worker admits its share: workers do not share counters, and SO_REUSEPORT
            # spreads clients evenly, so the proxy as a whole stays within max_connections.
            share = -(-self.config.listen.max_connections // self.processes)
            old, self._limits = self._limits, compute_limits(share, self.nofile, self.in_use)
            self._limits_for = self.config
            if old is not None and old != self._limits:
                log.info("descriptor limits for the new configuration: %s",
                         self._limits.describe())
        assert self._limits is not None
        return self._limits

    @property
    def max_connections(self) -> int:
        return self.limits.relayed

    def too_many_hint(self) -> str:
        limits = self.limits
        if limits.relayed < limits.share:
            return (f"this proxy process allows {limits.relayed} client connections: its "
                    f"descriptor limit (RLIMIT_NOFILE {limits.nofile}) is below what "
                    f"listen.max_connections={self.config.listen.max_connections} needs")
        return (f"the proxy allows listen.max_connections={self.config.listen.max_connections} "
                "client connections")

    cancel_rate_text = f"{CANCEL_BURST:.0f} cancel requests at once or {CANCEL_RATE:.0f}/s"

    def cancel_allowed(self, host: str) -> bool:
        """A token bucket per source address; an IPv6 client owns its whole /64, so that is
        one source. Clients behind one SNAT address share a bucket."""
        if ":" in host:
            with contextlib.suppress(ValueError):
                host = str(ipaddress.ip_network(f"{host}/64", strict=False))
        now = time.monotonic()
        tokens, when = self._cancel_tokens.pop(host, (CANCEL_BURST, now))
        tokens = min(CANCEL_BURST, tokens + (now - when) * CANCEL_RATE)
        allowed = tokens >= 1.0
        self._cancel_tokens[host] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._cancel_tokens) > CANCEL_SOURCES:
            del self._cancel_tokens[next(iter(self._cancel_tokens))]
        return allowed

    def sessions_over_limit(self) -> bool:
        if self.admitted >= self.limits.relayed:
            return True
        self.admitted += 1
        return False

    def negotiated(self, session: Session) -> None:
        self.budget.leave(session)

    def session_ended(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.open -= 1
        self.budget.leave(session)
        if session.startup is not None and session.outcome != "too_many_connections":
            self.admitted = max(0, self.admitted - 1)
        if self.on_capacity is not None and self.open < self.limits.sockets + EVICT_SLACK:
            self.on_capacity()


def make_listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted sockets inherit it (Linux copies the listening socket's options): one
    # setsockopt here instead of one per client.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.bind(addr)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Listener:
    """Accepts in batches from one listening socket and starts a Session per client."""

    def __init__(self, sock: socket.socket, state: ServerState) -> None:
        self.sock = sock
        self.state = state
        self.loop = asyncio.get_running_loop()
        # socket.accept() is a Python function that asks the listening socket for its family
        # and type (each an IntEnum conversion) and the default timeout on every call; these
        # never change, so the accepted descriptor is wrapped with them directly.
        self._accept = sock._accept  # type: ignore[attr-defined]
        self._family, self._type, self._proto = int(sock.family), int(sock.type), sock.proto
        self.accepting = True
        self.watching = False
        self._watch()

    def _watch(self) -> None:
        if self.accepting and not self.watching:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self.watching = True

    def _unwatch(self) -> None:
        if self.watching:
            self.loop.remove_reader(self.sock.fileno())
            self.watching = False

    def _on_readable(self) -> None:
        state = self.state
        limits = state.limits
        budget = state.budget
        for _ in range(ACCEPT_BATCH):
            if state.open >= limits.sockets + EVICT_SLACK:
                # At the descriptor ceiling: new clients wait in the kernel's backlog, not
                # refused, until a session ends (session_ended calls on_capacity).
                self._unwatch()
                state.on_capacity = self._resume_at_capacity
                return
            try:
                fd, addr = self._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the listening socket stays readable, so
                    # stop watching it for a second instead of spinning (as asyncio does).
                    log.error("accept failed: %s; pausing accepts for 1s", exc)
                    self._unwatch()
                    self.loop.call_later(1.0, self._watch)
                else:
                    log.warning("accept failed: %s", exc)
                return
            conn = socket.socket(self._family, self._type, self._proto, fileno=fd)
            state.open += 1
            session = Session(conn, state, addr)
            budget.enter(session, addr[0] if isinstance(addr, tuple) else "", limits)
            task = self.loop.create_task(session.run())
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)

    def _resume_at_capacity(self) -> None:
        self.state.on_capacity = None
        self._watch()

    def close(self) -> None:
        if self.accepting:
            self.accepting = False
            self._unwatch()
            self.sock.close()


class BackendHealth:
    """Connects to the backend every HEALTH_INTERVAL as a session would, TLS included."""

    def __init__(self) -> None:
        self.ok = False
        self.checked = False

    async def run(self, get_config: Callable[[], Config]) -> None:
        while True:
            cfg = get_config()
            try:
                await backend_mod.probe(cfg.backend, cfg.backend_tls)
                self.ok = True
            except backend_mod.BackendError as exc:
                if self.ok or not self.checked:
                    log.warning("backend %s does not answer: %s", cfg.backend.address, exc)
                self.ok = False
            self.checked = True
            await asyncio.sleep(HEALTH_INTERVAL)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return,unused-ignore]  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()
TRIM_AFTER_ENDED = 100  # sessions ended since the last clean-up
TRIM_DELAY = 5.0  # seconds: time for their transports to finish closing


async def _tick(state: ServerState) -> None:
    peak = len(state.tasks)
    clean_up_at: float | None = None
    while True:
        await asyncio.sleep(1.0)
        # After a wave of sessions ends, collect the cycles they leave and give glibc's freed
        # heap pages back: otherwise RSS keeps each wave's high-water mark (benchmarks: 93 ->
        # 116 -> 137 MB over three waves of 1,000 idle TLS sessions; flat at ~95 MB with this).
        open_now = len(state.tasks)
        peak = max(peak, open_now)
        if peak - open_now >= TRIM_AFTER_ENDED:
            clean_up_at, peak = time.monotonic() + TRIM_DELAY, open_now
        if clean_up_at is not None and time.monotonic() >= clean_up_at:
            clean_up_at = None
            gc.collect()
            if _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)
        now = time.monotonic()
        idle = state.config.listen.idle_timeout
        for session in list(state.live):
            session.flush_bytes()
            if session.terminating is not None:
                session.try_terminate()
            if idle > 0:
                marker = (session.flushed_c2b, session.flushed_b2c)
                if marker != session.idle_marker:
                    session.idle_marker, session.idle_since = marker, now
                elif now - session.idle_since >= idle:
                    session.close("idle_timeout")


async def _watch_parent(stop: asyncio.Event) -> None:
    """A worker whose main process died (its parent pid changes) shuts down gracefully
    instead of serving on, unsupervised, with no metrics endpoint."""
    # The main process's pid comes from the environment, not getppid() at start: the main
    # process may already be gone by then, and in a container it may legitimately be pid 1.
    parent = int(os.environ.get(MAIN_PID_ENV, os.getppid()))
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.error("main process %d is gone: shutting down this worker", parent)
    stop.set()


def _reload(state: ServerState) -> Config | None:
    """SIGHUP in the main process: read and validate the file again; None when refused."""
    old = state.config
    try:
        new = loader.load(old.path)
    except config_mod.ConfigError as exc:
        log.error("reload refused, the previous configuration stays in force: config error: %s",
                  exc)
        metrics.reload_failed()
        state.last_reload = {"result": "failure", "at": _now_rfc3339(), "error": str(exc)}
        return None
    state.last_reload = {"result": "success", "at": _now_rfc3339(), "error": None}
    if (new.listen.host, new.listen.port, new.listen.workers, new.metrics) != (
            old.listen.host, old.listen.port, old.listen.workers, old.metrics):
        log.warning("listen.host/port/workers and [metrics] changes take effect on restart only")
    metrics.config_loaded(new, reload=True)
    _apply(state, new)
    return new


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _apply(state: ServerState, new: Config) -> None:
    """Put a validated configuration in force in this process: new sessions get it, and open
    ones are checked against it (revocation and rules reach open sessions)."""
    state.config = new
    state.loaded_at = _now_rfc3339()
    log.info("configuration in force: %s sha256=%s", new.path,
             new.snapshot.sha256 if new.snapshot else "")
    for session in list(state.live):
        verdict = session.recheck(new)
        if verdict is not None:
            session.terminate(*verdict)


def _worker_message(state: ServerState, message: dict[str, Any]) -> dict[str, Any] | None:
    """A configuration the main process validated, pushed after a good reload; or a query
    for the admin views, answered with this process's part."""
    if message.get("type") == "query":
        return {"type": "reply", "id": message.get("id"),
                "status": admin.process_status(state, str(message.get("kind")))}
    if message.get("type") != "config":
        return None
    try:
        new = loader.build(workers_mod.snapshot_of(message))
    except config_mod.ConfigError as exc:  # the same bytes built in the main process
        log.error("configuration from the main process refused: %s", exc)
        return None
    _apply(state, new)
    return None


async def _drain(state: ServerState, grace: float) -> None:
    """Wait for open sessions to end by themselves, up to `grace` seconds, then close them."""
    deadline = time.monotonic() + grace
    while state.tasks and time.monotonic() < deadline:
        await asyncio.wait(list(state.tasks), timeout=max(0.0, deadline - time.monotonic()))
    if state.tasks:
        log.warning("shutdown grace of %.0fs over: closing %d sessions", grace, len(state.tasks))
        for session in list(state.live):
            session.close("shutdown")
        await asyncio.wait(list(state.tasks), timeout=TLS_CLOSE_WAIT)
        for task in list(state.tasks):
            task.cancel()


async def serve(cfg: Config, *, worker: bool = False,
                worker_argv: list[str] | None = None,
                control: socket.socket | None = None) -> int:
    """Run one proxy process: listener, sessions, ticks. The main process (not `worker`) also
    serves /metrics and /healthz, checks the backend, validates reloads, and with
    `workers > 1` starts and watches the other workers, which get their configuration from it
    over `control`. Returns the exit status."""
    loop = asyncio.get_running_loop()
    soft_before, nofile = raise_nofile()
    try:
        sock = make_listen_socket(cfg.listen.host, cfg.listen.port,
                                  reuse_port=cfg.listen.workers > 1)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", cfg.listen.host, cfg.listen.port, exc.strerror)
        return 1
    # The number of processes is the one started with: a reload cannot change it.
    state = ServerState(cfg, processes=cfg.listen.workers, nofile=nofile)
    limits = state.limits
    raised = f" (soft limit raised from {soft_before})" if soft_before != nofile else ""
    log.info("descriptor limits%s: %s", raised, limits.describe())
    if limits.relayed < limits.share:
        log.warning("listen.max_connections=%d cannot be reached: RLIMIT_NOFILE %d leaves "
                    "descriptors for %d sessions in this process, which admits %d; raise the "
                    "hard limit (ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=)",
                    cfg.listen.max_connections, nofile, limits.relayed, limits.share)
    listener = Listener(sock, state)
    bound = sock.getsockname()
    log.info("listening on %s:%s (pid %d)", bound[0], bound[1], os.getpid())
    background = [loop.create_task(_tick(state))]
    stop = asyncio.Event()
    http = None
    workers: Workers | None = None
    if not worker:
        health = BackendHealth()
        try:  # before any worker exists: a busy metrics port fails the start cleanly
            http = await metrics.serve_http(
                cfg.metrics.host, cfg.metrics.port,
                lambda: listener.accepting and health.ok
                and (workers is None or workers.alive()),
                (lambda path: admin.handle(path, state, workers)) if cfg.metrics.admin
                else None)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%s: %s", cfg.metrics.host, cfg.metrics.port,
                      exc.strerror)
            listener.close()
            return 1
        background.append(loop.create_task(health.run(lambda: state.config)))
        metrics.config_loaded(cfg, reload=False)
        if cfg.listen.workers > 1:
            def in_force() -> Snapshot:
                assert state.config.snapshot is not None
                return state.config.snapshot

            workers = Workers(cfg.listen.workers, worker_argv or [], in_force)
    else:
        background.append(loop.create_task(_watch_parent(stop)))
        if control is not None:
            background.append(loop.create_task(workers_mod.read_messages(
                control, lambda message: _worker_message(state, message))))

    def on_hup() -> None:
        # The main process validates once and pushes what it validated; a worker never reads
        # the file (a SIGHUP sent to it directly, e.g. by pkill, changes nothing).
        if worker:
            log.info("SIGHUP ignored by a worker: the main process reloads and informs it")
            return
        sdnotify.notify("RELOADING=1")
        new = _reload(state)
        sdnotify.notify("READY=1")
        if new is not None and new.snapshot is not None and workers is not None:
            workers.push(new.snapshot)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)  # blocked by Workers._spawn
    if not worker:  # listening, serving metrics, and SIGHUP no longer kills: ready
        sdnotify.notify("READY=1")
    await stop.wait()
    if not worker:
        sdnotify.notify("STOPPING=1")
    log.info("shutting down: no new connections; %d open, waiting up to %.0fs",
             len(state.tasks), cfg.listen.shutdown_grace)
    listener.close()
    if workers is not None:
        workers.stop()
    await _drain(state, state.config.listen.shutdown_grace)
    status = 0
    if workers is not None and not await workers.wait(
            state.config.listen.shutdown_grace + TLS_CLOSE_WAIT + 2):
        status = 1
    if http is not None:
        http.close()
    for task in background:
        task.cancel()
    return status
