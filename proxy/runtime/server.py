"""Listeners, signals and the life of one proxy process.

Owns: the accept loop, the once-a-second tick (byte counters, idle_timeout), the backend health
check, SIGHUP reload, SIGTERM/SIGINT graceful shutdown, and — with `workers > 1` — a supervising
parent that serves the metrics of all workers and restarts a worker that dies. The counts,
limits and budgets it enforces are state.py's. Must not parse the protocol or decide policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config.errors import ConfigError
from ..ops import admin, httpd, metrics, sdnotify
from ..tls import expiry, loader
from ..tls.loader import Loaded
from . import tcp
from . import workers as workers_mod
from .session import Session
from .state import EVICT_SLACK, ServerState, now_rfc3339, raise_nofile
from .watcher import Watcher
from .workers import MAIN_PID_ENV, WORKER_SIGNALS, Workers

if TYPE_CHECKING:
    from ..config.snapshot import Snapshot

log = logging.getLogger("dwsproxy.server")

ACCEPT_BATCH = 64
TLS_CLOSE_WAIT = 5.0
# With backend.health_check_interval = 0, a /readyz check is answered from the last one for
# this long, so a probe storm cannot turn into a connection storm on the database.
READY_CACHE_MIN = 1.0


def make_listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted sockets inherit it (Linux copies the listening socket's options); the timings
    # are [listen]'s, set by the Listener (tcp.py) and again after a reload.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.bind(addr)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def make_unix_socket(directory: str, port: int, mode: str, group: str) -> socket.socket:
    """DIR/.s.PGSQL.PORT, PostgreSQL's and PgBouncer's name, with the given mode and group.
    A socket file left by a proxy of this user that died is replaced; one that a live process
    answers on is not (OSError EADDRINUSE), nor anything that is not a socket of this user (a
    symlink or a file another local user planted in a shared folder). The mode is set by the
    umask at bind, never by a chmod of the path afterwards, which would follow a symlink
    swapped in meanwhile."""
    path = os.path.join(directory, f".s.PGSQL.{port}")
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket of this user: "
                          "remove it, or choose another listen.unix_socket_dir")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: stale
        else:
            raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~int(mode, 8))  # at start, before any other thread runs
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if group:
            import grp  # only where a group is named

            os.chown(path, -1, grp.getgrnam(group).gr_gid, follow_symlinks=False)
        sock.listen(1024)
    except (OSError, KeyError) as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, KeyError):
            raise OSError(errno.EINVAL, f"no group {group!r} (listen.unix_socket_group)") \
                from None
        raise
    sock.setblocking(False)
    return sock


class Listener:
    """Accepts in batches from one listening socket and starts a Session per client."""

    def __init__(self, sock: socket.socket, state: ServerState[Session]) -> None:
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
        self._tcp_for: object = None
        self._keepalive()  # before the first client: its socket is cloned at the handshake
        self._watch()

    def _watch(self) -> None:
        if self.accepting and not self.watching:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self.watching = True

    def _unwatch(self) -> None:
        if self.watching:
            self.loop.remove_reader(self.sock.fileno())
            self.watching = False

    def _keepalive(self) -> None:
        """[listen]'s keepalive and user timeout on the listening socket, which accepted sockets
        inherit (Linux copies its TCP options: four setsockopt calls per configuration, not per
        client); taken again when a reload brought another [listen]."""
        listen = self.state.config.listen
        if listen is not self._tcp_for:
            tcp.apply(self.sock, listen)
            self._tcp_for = listen

    def _on_readable(self) -> None:
        state = self.state
        self._keepalive()
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
    """The backend health check of the main process: every host of `[backend] host`, every
    `health_check_interval` seconds, quietly (backend.probe, backend.check_role); with an
    interval of 0, only when /readyz asks."""

    def __init__(self, state: ServerState[Session]) -> None:
        self.state = state
        self.ok = False
        self._checked_at = -1e9
        self._running: asyncio.Task[bool] | None = None

    async def check(self) -> bool:
        """One round over every host; rounds asked for together share one."""
        if self._running is None or self._running.done():
            loaded = self.state.loaded
            self._running = asyncio.get_running_loop().create_task(
                self.state.backends.check(loaded, loaded.health_check_password))
        self.ok = await asyncio.shield(self._running)
        self._checked_at = time.monotonic()
        return self.ok

    async def ready(self) -> bool:
        """/readyz: the periodic check's result, or with an interval of 0 a check of its own
        (kept READY_CACHE_MIN seconds)."""
        interval = self.state.config.backend.health_check_interval
        if interval == 0 and time.monotonic() - self._checked_at >= READY_CACHE_MIN:
            return await self.check()
        return self.ok

    async def run(self) -> None:
        while True:
            interval = self.state.config.backend.health_check_interval
            if interval > 0:
                await self.check()
            await asyncio.sleep(interval if interval > 0 else 1.0)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return,unused-ignore]  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()
TRIM_AFTER_ENDED = 100  # sessions ended since the last clean-up
TRIM_DELAY = 5.0  # seconds: time for their transports to finish closing


async def _tick(state: ServerState[Session]) -> None:
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


EXPIRY_WARNING_INTERVAL = 86400.0  # seconds: the expiry warnings of a load, repeated daily


async def _warn_expiry_daily(state: ServerState[Session],
                             interval: float = EXPIRY_WARNING_INTERVAL) -> None:
    """The load's warnings of certificates and CRLs near or past their end, once a day in the
    main process: a proxy that runs for months without a reload still says, every day, that
    its CRL ends in 2 days, before clients are refused for it."""
    while True:
        await asyncio.sleep(interval)
        expiry.log_findings(loader.expiry_findings(state.loaded, time.time()))


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


async def _reload(state: ServerState[Session], trigger: str = "SIGHUP") -> Loaded | None:
    """Read and validate the file again, off the event loop; None when refused. Any failure
    is a refusal, counted and shown in /status: a ConfigError names its key, anything else
    (EMFILE from memfd_create, MemoryError, a bug) is named as what it is. `trigger` (SIGHUP
    or watch) and `seq`, which numbers the attempts, go to /status too: `dwsproxy reload`
    waits for the first SIGHUP result after the one it saw."""
    old = state.config
    seq = int(str(state.last_reload.get("seq") or 0)) + 1
    try:
        # Reading every named file (a large ssl_crl_dir), PBKDF2 for a key pair and building
        # X509 stores take long enough to stall every session of this process on the loop.
        loaded = await asyncio.to_thread(loader.load, old.path)
    except Exception as exc:
        why = (f"config error: {exc}" if isinstance(exc, ConfigError)
               else f"{type(exc).__name__}: {exc}")
        log.error("reload (%s) refused, the previous configuration stays in force: %s",
                  trigger, why)
        metrics.reload_failed()
        state.last_reload = {"result": "failure", "at": now_rfc3339(), "error": why,
                             "trigger": trigger, "seq": seq}
        return None
    state.last_reload = {"result": "success", "at": now_rfc3339(), "error": None,
                         "trigger": trigger, "seq": seq}
    new = loaded.config
    restart_only = ("host", "port", "workers", "unix_socket_dir", "unix_socket_mode",
                    "unix_socket_group")
    admin_at = ("enabled", "host", "port")
    if ([getattr(new.listen, k) for k in restart_only], new.metrics,
            [getattr(new.admin, k) for k in admin_at]) != (
            [getattr(old.listen, k) for k in restart_only], old.metrics,
            [getattr(old.admin, k) for k in admin_at]):
        log.warning("listen.host/port/workers/unix_socket_*, [metrics] and [admin] "
                    "enabled/host/port changes take effect on restart only")
    metrics.config_loaded(loaded, reload=True)
    _apply(state, loaded)
    return loaded


def _apply(state: ServerState[Session], new: Loaded) -> None:
    """Put a validated configuration in force in this process: new sessions get it, and open
    ones are checked against it (revocation and rules reach open sessions)."""
    state.loaded = new
    state.loaded_at = now_rfc3339()
    log.info("configuration in force: %s sha256=%s", new.config.path, new.snapshot.sha256)
    for session in list(state.live):
        try:
            verdict = session.recheck(new)
        except Exception as exc:  # one session's chain must not stop the reload for the rest
            log.exception("cannot check session %s against the new configuration", session.id)
            verdict = ("client_cert_invalid", "client certificate cannot be checked against "
                       f"the configuration in force ({type(exc).__name__})")
        if verdict is not None:
            session.terminate(*verdict)


class Reloader:
    """SIGHUP (and anything else that asks for a reload) in the main process: one reload at a
    time, built off the loop; requests that arrive meanwhile (a SIGHUP storm, a watcher)
    coalesce into one more reload after it, which then reads the newest files."""

    def __init__(self, state: ServerState[Session],
                 workers: Callable[[], Workers | None]) -> None:
        self.state = state
        self.workers = workers
        self.task: asyncio.Task[None] | None = None
        self.again = False
        self.stopped = False
        self.trigger = self.pending = "SIGHUP"
        # The file watcher (main process): told before the files are read and after, so a
        # change it saw is not reloaded twice and it follows the files the new config names.
        self.watcher: Watcher | None = None

    def stop(self) -> None:
        """Shutdown began: no reload is started or pushed any more."""
        self.stopped = True
        if self.task is not None:
            self.task.cancel()

    def request(self, trigger: str = "SIGHUP") -> None:
        if self.stopped:
            return
        if self.task is not None and not self.task.done():
            # Coalesced requests keep a SIGHUP among them: `dwsproxy reload` waits for one.
            if not self.again or trigger == "SIGHUP":
                self.pending = trigger
            self.again = True
            return
        self.again = False
        self.trigger = trigger
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            sdnotify.notify("RELOADING=1")
            if self.watcher is not None:
                self.watcher.reloading()
            try:
                new = await _reload(self.state, self.trigger)
            finally:
                sdnotify.notify("READY=1")  # systemd must never be left in RELOADING
            if self.watcher is not None:
                self.watcher.follow(self.state.loaded.snapshot)
            workers = self.workers()
            if new is not None and workers is not None:
                try:
                    data = await asyncio.to_thread(workers_mod.config_message, new.snapshot)
                    workers.push_message(data)
                except Exception as exc:
                    # In force here, not in the workers: visible as not synchronized in
                    # /status, and counted; the next reload pushes again.
                    log.exception("reload applied in the main process but not sent to the "
                                  "workers")
                    metrics.reload_failed()
                    self.state.last_reload = {
                        "result": "failure", "at": now_rfc3339(),
                        "error": f"not sent to the workers: {type(exc).__name__}: {exc}",
                        "trigger": self.trigger, "seq": self.state.last_reload.get("seq")}
            if not self.again:
                return
            self.again, self.trigger = False, self.pending


async def _worker_message(state: ServerState[Session],
                          message: dict[str, Any]) -> dict[str, Any] | None:
    """A configuration the main process validated, pushed after a good reload; or a query
    for the admin views, answered with this process's part. A configuration this worker
    cannot put in force (the same bytes the main process built, so only EMFILE, memory or a
    bug) must not leave it serving the old policy for good: it exits, and the main process
    restarts it with the configuration in force."""
    if message.get("type") == "query":
        if message.get("kind") == "terminate":
            result = admin.terminate_here(state, str(message.get("session", "")))
            return {"type": "reply", "id": message.get("id"),
                    "status": {"pid": os.getpid(), "terminate": result}}
        return {"type": "reply", "id": message.get("id"),
                "status": admin.process_status(state, str(message.get("kind")))}
    if message.get("type") != "config":
        return None
    try:
        new = await asyncio.to_thread(loader.build, workers_mod.snapshot_of(message))
    except Exception as exc:
        log.critical("configuration from the main process cannot be put in force (%s: %s): "
                     "exiting so that the main process restarts this worker with it",
                     type(exc).__name__, exc)
        os._exit(3)
    _apply(state, new)
    return None


async def _drain(state: ServerState[Session], grace: float) -> None:
    """Wait for open sessions to end by themselves, up to `grace` seconds, then close them."""
    deadline = time.monotonic() + grace
    while state.tasks and time.monotonic() < deadline:
        await asyncio.wait(list(state.tasks), timeout=max(0.0, deadline - time.monotonic()))
    if state.tasks:
        log.warning("shutdown grace of %.0fs over: closing %d sessions", grace, len(state.tasks))
        for session in list(state.live):
            session.shut_down()  # the running query cancelled, 57P01 to the client
        await asyncio.wait(list(state.tasks), timeout=TLS_CLOSE_WAIT)
        for task in list(state.tasks):
            task.cancel()


async def serve(loaded: Loaded, *, worker: bool = False,
                worker_argv: list[str] | None = None,
                control: socket.socket | None = None) -> int:
    """Run one proxy process: listener, sessions, ticks. The main process (not `worker`) also
    serves /metrics and /healthz, checks the backend, validates reloads, and with
    `workers > 1` starts and watches the other workers, which get their configuration from it
    over `control`. Returns the exit status."""
    loop = asyncio.get_running_loop()
    cfg = loaded.config
    soft_before, nofile = raise_nofile()
    try:
        sock = make_listen_socket(cfg.listen.host, cfg.listen.port,
                                  reuse_port=cfg.listen.workers > 1)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", cfg.listen.host, cfg.listen.port, exc.strerror)
        return 1
    # The number of processes is the one started with: a reload cannot change it.
    state: ServerState[Session] = ServerState(loaded, processes=cfg.listen.workers,
                                                nofile=nofile)
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
    unix_listener: Listener | None = None
    unix_path = ""
    if cfg.listen.unix_socket_dir and not worker:
        # served by the main process alone: a Unix socket's path cannot be shared by several
        # processes as SO_REUSEPORT shares a TCP port
        try:
            usock = make_unix_socket(cfg.listen.unix_socket_dir, cfg.listen.port or bound[1],
                                     cfg.listen.unix_socket_mode, cfg.listen.unix_socket_group)
        except OSError as exc:
            log.error("cannot listen on the Unix socket in %s: %s", cfg.listen.unix_socket_dir,
                      exc.strerror or exc)
            listener.close()
            return 1
        unix_path = usock.getsockname()
        unix_listener = Listener(usock, state)
        log.info("listening on %s", unix_path)
    background = [loop.create_task(_tick(state))]
    stop = asyncio.Event()
    http: list[httpd.HttpListener] = []
    workers: Workers | None = None
    if not worker:
        health = BackendHealth(state)
        metrics.BACKEND_UP.hosts = lambda: state.backends.up_by_address(state.config.backend)

        def live() -> bool:
            return listener.accepting and (workers is None or workers.alive())

        try:  # before any worker exists: a busy metrics port fails the start cleanly
            http.append(await metrics.serve_http(
                cfg.metrics.host, cfg.metrics.port,
                lambda: live() and health.ok, live=live, ready=health.ready))
        except OSError as exc:
            log.error("cannot serve metrics on %s:%s: %s", cfg.metrics.host, cfg.metrics.port,
                      exc.strerror)
            listener.close()
            if unix_listener is not None:
                unix_listener.close()
            return 1
        if cfg.admin.enabled:
            try:
                http.append(httpd.HttpListener(
                    httpd.listen_socket(cfg.admin.host, cfg.admin.port),
                    admin.handler(state, lambda: workers, metrics.admin_request), name="admin",
                    max_connections=httpd.MAX_CONNECTIONS))
            except OSError as exc:
                log.error("cannot serve the admin views on %s:%s: %s", cfg.admin.host,
                          cfg.admin.port, exc.strerror)
                for one in http:
                    one.close()
                listener.close()
                if unix_listener is not None:
                    unix_listener.close()
                return 1
            where = http[-1].address
            log.info("admin views on %s:%s%s", where[0], where[1],
                     "" if loaded.admin_token else " (no token: loopback only)")
        background.append(loop.create_task(health.run()))
        background.append(loop.create_task(_warn_expiry_daily(state)))
        metrics.config_loaded(loaded, reload=False)
        if cfg.listen.workers > 1:
            def in_force() -> Snapshot:
                return state.loaded.snapshot

            workers = Workers(cfg.listen.workers, worker_argv or [], in_force)
    else:
        background.append(loop.create_task(_watch_parent(stop)))
        if control is not None:
            background.append(loop.create_task(workers_mod.read_messages(
                control, lambda message: _worker_message(state, message))))

    reloader = Reloader(state, lambda: workers)

    def on_hup() -> None:
        # The main process validates once and pushes what it validated; a worker never reads
        # the file (a SIGHUP sent to it directly, e.g. by pkill, changes nothing).
        if worker:
            log.info("SIGHUP ignored by a worker: the main process reloads and informs it")
            return
        reloader.request("SIGHUP")

    if not worker:  # [reload] watch and watch_interval follow the configuration in force
        reloader.watcher = Watcher(loaded.snapshot, lambda: state.config.reload,
                                   lambda: reloader.request("watch"))
        background.append(loop.create_task(reloader.watcher.run()))

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)  # blocked by Workers._spawn
    if not worker:  # listening, serving metrics, and SIGHUP no longer kills: ready
        sdnotify.notify("READY=1")
    await stop.wait()
    reloader.stop()
    if not worker:
        sdnotify.notify("STOPPING=1")
    log.info("shutting down: no new connections; %d open, waiting up to %.0fs",
             len(state.tasks), cfg.listen.shutdown_grace)
    listener.close()
    if unix_listener is not None:
        unix_listener.close()
        with contextlib.suppress(OSError):
            os.unlink(unix_path)
    if workers is not None:
        workers.stop()
    await _drain(state, state.config.listen.shutdown_grace)
    status = 0
    if workers is not None and not await workers.wait(
            state.config.listen.shutdown_grace + TLS_CLOSE_WAIT + 2):
        status = 1
    for one in http:
        one.close()
    for task in background:
        task.cancel()
    return status
