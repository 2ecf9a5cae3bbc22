"""Listeners, workers, signals and limits.

Owns: the accept loop, the count of open and admitted connections (max_connections), the
once-a-second tick (byte counters, idle_timeout), the backend health check, SIGHUP reload,
SIGTERM/SIGINT graceful shutdown, and — with `workers > 1` — a supervising parent that serves
the metrics of all workers and restarts a worker that dies. Must not parse the protocol or
decide policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from . import config as config_mod
from . import metrics
from .session import Session

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("dwsproxy.server")

ACCEPT_BATCH = 64
HEALTH_INTERVAL = 5.0


class ServerState:
    """What every session of one process shares: the config in force and the counts."""

    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.open = 0  # client sockets open, negotiating or relaying
        self.admitted = 0  # sessions past the max_connections check, not yet ended
        self.live: set[Session] = set()  # sessions relaying
        self.tasks: set[asyncio.Task[None]] = set()

    def sessions_over_limit(self) -> bool:
        if self.admitted >= self.config.listen.max_connections:
            return True
        self.admitted += 1
        return False

    def session_ended(self, session: Session) -> None:
        self.open -= 1
        if session.startup is not None and session.outcome != "too_many_connections":
            self.admitted = max(0, self.admitted - 1)

    @property
    def hard_limit(self) -> int:
        # Past max_connections a client still gets a proper 53300 after its start-up (as
        # PostgreSQL does); past this many open sockets it is closed at once, so a flood cannot
        # make the proxy spend handshakes without bound.
        return self.config.listen.max_connections * 2 + 100


def make_listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self.accepting = True

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, keep serving the others
                log.error("accept failed: %s", exc)
                return
            state = self.state
            if state.open >= state.hard_limit:
                metrics.rejected("too_many_connections")
                conn.close()
                continue
            state.open += 1
            task = self.loop.create_task(Session(conn, state).run())
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)

    def close(self) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class BackendHealth:
    def __init__(self) -> None:
        self.ok = False
        self.checked = False

    async def run(self, get_config: callable[[], Config]) -> None:  # type: ignore[valid-type]
        while True:
            cfg = get_config()
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(cfg.backend.host, cfg.backend.port),
                    cfg.backend.connect_timeout)
                writer.close()
                self.ok = True
            except (OSError, TimeoutError):
                if self.ok or not self.checked:
                    log.warning("backend %s does not answer a TCP connect", cfg.backend.address)
                self.ok = False
            self.checked = True
            await asyncio.sleep(HEALTH_INTERVAL)


async def _tick(state: ServerState) -> None:
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        idle = state.config.listen.idle_timeout
        for session in list(state.live):
            session.flush_bytes()
            if idle > 0:
                marker = (session.flushed_c2b, session.flushed_b2c)
                if marker != session.idle_marker:
                    session.idle_marker, session.idle_since = marker, now
                elif now - session.idle_since >= idle:
                    session.close("idle_timeout")


def _reload(state: ServerState, *, count: bool) -> bool:
    old = state.config
    try:
        new = config_mod.load(old.path)
    except config_mod.ConfigError as exc:
        log.error("reload refused, the previous configuration stays in force: config error: %s",
                  exc)
        if count:
            metrics.reload_failed()
        return False
    if (new.listen.host, new.listen.port, new.listen.workers, new.metrics) != (
            old.listen.host, old.listen.port, old.listen.workers, old.metrics):
        log.warning("listen.host/port/workers and [metrics] changes take effect on restart only")
    state.config = new
    if count:
        metrics.config_loaded(new.server_tls, reload=True)
    log.info("configuration reloaded from %s", new.path)
    return True


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


TLS_CLOSE_WAIT = 5.0


class Workers:
    """The extra worker processes of `workers > 1`. The main process is worker 0 itself (it
    also serves /metrics for all, validates and counts reloads): one process fewer than a
    pure supervisor, which on a 2-core machine is ~40 MB of RSS and a runnable process less."""

    def __init__(self, count: int, argv: list[str]) -> None:
        self.argv = argv
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for slot in range(1, count):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", *self.argv, "--worker"])
        self.procs[slot] = proc
        log.info("worker %d started (pid %d)", slot, proc.pid)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for slot, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    log.error("worker %d (pid %d) exited with %s: restarting", slot, proc.pid,
                              proc.returncode)
                    metrics.mark_process_dead(proc.pid)
                    self._spawn(slot)

    def signal(self, sig: int) -> None:
        for proc in self.procs.values():
            proc.send_signal(sig)

    async def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        clean = True
        for proc in self.procs.values():
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                clean = False
            metrics.mark_process_dead(proc.pid)
        return clean


async def serve(cfg: Config, *, worker: bool = False,
                worker_argv: list[str] | None = None) -> int:
    """Run one proxy process: listener, sessions, ticks. The main process (not `worker`) also
    serves /metrics and /healthz, checks the backend, counts reloads, and with `workers > 1`
    starts and watches the other workers. Returns the exit status."""
    loop = asyncio.get_running_loop()
    state = ServerState(cfg)
    try:
        sock = make_listen_socket(cfg.listen.host, cfg.listen.port,
                                  reuse_port=cfg.listen.workers > 1)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", cfg.listen.host, cfg.listen.port, exc.strerror)
        return 1
    listener = Listener(sock, state)
    bound = sock.getsockname()
    log.info("listening on %s:%s (pid %d)", bound[0], bound[1], os.getpid())
    background = [loop.create_task(_tick(state))]
    http = None
    workers = None
    watcher = None
    if not worker:
        if cfg.listen.workers > 1:
            workers = Workers(cfg.listen.workers, worker_argv or [])
            watcher = loop.create_task(workers.watch())
        health = BackendHealth()
        background.append(loop.create_task(health.run(lambda: state.config)))
        metrics.config_loaded(cfg.server_tls, reload=False)
        http = await metrics.serve_http(
            cfg.metrics.host, cfg.metrics.port,
            lambda: listener.accepting and health.ok and (workers is None or workers.alive()))

    def on_hup() -> None:
        # The main process validates and counts once; workers reload only after it succeeded.
        if _reload(state, count=not worker) and workers is not None:
            workers.signal(signal.SIGHUP)

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    log.info("shutting down: no new connections; %d open, waiting up to %.0fs",
             len(state.tasks), cfg.listen.shutdown_grace)
    listener.close()
    if workers is not None and watcher is not None:
        watcher.cancel()  # no restarts while stopping
        workers.signal(signal.SIGTERM)
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
