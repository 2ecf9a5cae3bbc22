"""The worker processes of `workers > 1` and the control channel to each of them.

Owns: starting, watching and restarting workers, and the channel (a socketpair inherited by the
worker) over which the main process sends every worker the configuration it validated: at
start, after each good reload, and to a restarted worker. A worker never reads the config file:
an edit made on disk without SIGHUP, or a broken file, cannot reach one process and not the
others, nor crash-loop a restarted worker. Must not parse the protocol or decide policy.

Messages are a 4-byte big-endian length and a JSON object `{"type": "config", "snapshot": …}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..config.snapshot import Snapshot
from ..ops import metrics

log = logging.getLogger("dwsproxy.server")

WORKER_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
MAIN_PID_ENV = "DWSPROXY_MAIN_PID"
CONTROL_FD_ENV = "DWSPROXY_CONTROL_FD"
MAX_MESSAGE = 256 * 1024 * 1024  # a snapshot holds CRLs, which can be large, but not this


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack("!I", len(body)) + body


def config_message(snap: Snapshot) -> bytes:
    return encode({"type": "config", "snapshot": json.loads(snap.to_json())})


def snapshot_of(message: dict[str, Any]) -> Snapshot:
    return Snapshot.from_json(json.dumps(message["snapshot"]).encode())


def read_message_blocking(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, before the worker's loop runs; None at EOF."""
    head = _recv_exactly(sock, 4)
    if head is None:
        return None
    (size,) = struct.unpack("!I", head)
    if size > MAX_MESSAGE:
        raise ValueError(f"control message of {size} bytes")
    body = _recv_exactly(sock, size)
    return None if body is None else dict(json.loads(body))


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


async def read_messages(
        sock: socket.socket,
        on_message: Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]) -> None:
    """Messages from the main process until it closes the channel (it exited: the parent
    watch shuts this worker down). A message that does not parse, or any other failure of
    this channel, means this worker can no longer know which configuration is in force: it
    exits at once (status 3), so that the main process restarts it with the current one,
    rather than serve on an old policy while /healthz says 200."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    try:
        while True:
            head = await reader.readexactly(4)
            (size,) = struct.unpack("!I", head)
            if size > MAX_MESSAGE:
                raise ValueError(f"control message of {size} bytes")
            reply = await on_message(json.loads(await reader.readexactly(size)))
            if reply is not None:  # an answer to the main process's query (admin views)
                writer.write(encode(reply))
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    except Exception as exc:
        log.critical("control channel from the main process failed (%s: %s): exiting so "
                     "that the main process restarts this worker", type(exc).__name__, exc)
        os._exit(3)
    finally:
        writer.close()


def control_socket() -> socket.socket | None:
    """The worker's end of the channel, from the fd number the main process passed."""
    fd = os.environ.get(CONTROL_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None


class Workers:
    """The extra worker processes of `workers > 1`. The main process is worker 0 itself (it
    also serves /metrics for all, validates and counts reloads): one process fewer than a
    pure supervisor, which on a 2-core machine is ~40 MB of RSS and a runnable process less."""

    def __init__(self, count: int, argv: list[str], current: Callable[[], Snapshot]) -> None:
        self.argv = argv
        self.current = current  # the snapshot in force, for a worker (re)started now
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.channels: dict[int, socket.socket] = {}
        self.backoff: dict[int, float] = {}
        self.started: dict[int, float] = {}
        self.loop = asyncio.get_running_loop()
        # One writer per worker: a message is never written while another is half sent
        # (two interleaved snapshots corrupt the channel); a newer snapshot replaces one not
        # yet sent, since only the latest matters.
        self.pending: dict[int, bytes] = {}
        self.queries: dict[int, list[bytes]] = {}  # never coalesced, sent after the config
        self.wakeups: dict[int, asyncio.Event] = {}
        self.writers: dict[int, asyncio.Task[None]] = {}
        self.readers: dict[int, asyncio.Task[None]] = {}
        self.answers: dict[tuple[int, int], asyncio.Future[dict[str, Any]]] = {}
        self._query_id = 0
        for slot in range(1, count):
            self._spawn(slot)
        self.watcher = self.loop.create_task(self.watch())

    def _spawn(self, slot: int) -> None:
        ours, theirs = socket.socketpair()
        # The child inherits a blocked SIGHUP/SIGTERM/SIGINT through exec and unblocks them once
        # its handlers are installed: a signal sent while it imports must not kill it.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", *self.argv, "--worker"],
                pass_fds=[theirs.fileno()],
                env={**os.environ, MAIN_PID_ENV: str(os.getpid()),
                     CONTROL_FD_ENV: str(theirs.fileno())})
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            theirs.close()
        ours.setblocking(False)
        old_channel = self.channels.pop(slot, None)
        if old_channel is not None:
            old_channel.close()
        self.procs[slot] = proc
        self.channels[slot] = ours
        self.started[slot] = time.monotonic()
        for tasks in (self.writers, self.readers):
            old_task = tasks.pop(slot, None)
            if old_task is not None:
                old_task.cancel()
        self.queries.pop(slot, None)
        self._send(slot, config_message(self.current()))
        self.readers[slot] = self.loop.create_task(self._reader(slot, ours))
        log.info("worker %d started (pid %d)", slot, proc.pid)

    def _send(self, slot: int, data: bytes, *, query: bool = False) -> None:
        if query:
            self.queries.setdefault(slot, []).append(data)
        else:
            self.pending[slot] = data
        if slot not in self.writers or self.writers[slot].done():
            self.wakeups[slot] = asyncio.Event()
            self.writers[slot] = self.loop.create_task(self._writer(slot, self.channels[slot],
                                                                    self.procs[slot]))
        self.wakeups[slot].set()

    async def _writer(self, slot: int, channel: socket.socket,
                      proc: subprocess.Popen[bytes]) -> None:
        while self.channels.get(slot) is channel:
            await self.wakeups[slot].wait()
            self.wakeups[slot].clear()
            data = self.pending.pop(slot, b"") + b"".join(self.queries.pop(slot, []))
            if not data:
                continue
            try:
                await self.loop.sock_sendall(channel, data)
            except OSError as exc:
                # A worker that cannot be told the configuration must not serve on an old
                # one: stop it; watch() starts it again with the one in force.
                log.error("worker %d did not take the configuration (%s): restarting it",
                          slot, exc)
                proc.kill()
                return

    async def _reader(self, slot: int, channel: socket.socket) -> None:
        """Answers from a worker to queries (admin views)."""
        buf = bytearray()
        while True:
            try:
                chunk = await self.loop.sock_recv(channel, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 4:
                size = struct.unpack_from("!I", buf)[0]
                if size > MAX_MESSAGE:
                    return
                if len(buf) < 4 + size:
                    break
                try:
                    message = json.loads(bytes(buf[4:4 + size]))
                except ValueError:
                    return
                del buf[:4 + size]
                future = self.answers.pop((slot, message.get("id", -1)), None)
                if future is not None and not future.done():
                    future.set_result(message)

    async def query(self, kind: str, timeout: float, **extra: str) -> list[dict[str, Any]]:
        """Ask every worker for its status (kind "status") or its sessions too ("sessions"),
        or to end one session ("terminate", with `session`); a worker that does not answer
        within `timeout` is listed as such, never waited for longer."""
        self._query_id += 1
        qid = self._query_id
        waits: dict[int, asyncio.Future[dict[str, Any]]] = {}
        for slot in self.procs:
            future = self.answers[(slot, qid)] = self.loop.create_future()
            waits[slot] = future
            self._send(slot, encode({"type": "query", "id": qid, "kind": kind, **extra}),
                       query=True)
        if waits:
            await asyncio.wait(list(waits.values()), timeout=timeout)
        out = []
        for slot, future in waits.items():
            self.answers.pop((slot, qid), None)
            if future.done():
                out.append(dict(future.result().get("status", {})))
            else:
                future.cancel()
                out.append({"pid": self.procs[slot].pid, "error": "no answer within "
                            f"{timeout:g}s"})
        return out

    def push_message(self, data: bytes) -> None:
        """A reload the main process validated (its `config_message`, serialised off the
        loop): every worker applies the same snapshot."""
        for slot in self.procs:
            self._send(slot, data)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    async def watch(self) -> None:
        """Restart a worker that died, after a backoff (0.5 s doubling to 30 s, reset once a
        worker has lived a minute), so that one that cannot start does not spin. A restarted
        worker gets the configuration in force from the main process, never the file."""
        restart_at: dict[int, float] = {}
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for slot, proc in list(self.procs.items()):
                if proc.poll() is None:
                    continue
                if slot not in restart_at:
                    if now - self.started[slot] > 60:
                        self.backoff.pop(slot, None)
                    delay = self.backoff[slot] = min(self.backoff.get(slot, 0.25) * 2, 30.0)
                    restart_at[slot] = now + delay
                    log.error("worker %d (pid %d) exited with %s: restarting in %.1fs", slot,
                              proc.pid, proc.returncode, delay)
                    metrics.mark_process_dead(proc.pid)
                elif now >= restart_at[slot]:
                    del restart_at[slot]
                    self._spawn(slot)

    def signal(self, sig: int) -> None:
        for proc in self.procs.values():
            proc.send_signal(sig)

    def stop(self) -> None:
        self.watcher.cancel()  # no restarts while stopping
        for task in (*self.writers.values(), *self.readers.values()):
            task.cancel()
        self.signal(signal.SIGTERM)

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
        for channel in self.channels.values():
            channel.close()
        return clean
