"""What every session of one process shares: the configuration in force, the counts, the
limits and the budgets.

Owns: the count of open and admitted connections (max_connections), the descriptor limits
(RLIMIT_NOFILE raised, the socket ceiling derived from it), the negotiation budget, and the
per-source cancel rate. Must not do network I/O, parse the protocol or decide policy; it knows a
session only as a `Member` (the few things it reads of one), so it never imports session.py.

Descriptors, per worker process: every client socket may need a second descriptor (its backend,
or the connection its CancelRequest is forwarded on), so the client sockets open at once are
at most half of what RLIMIT_NOFILE leaves after the descriptors open at start and a reserve.
Of those, connections still negotiating (no StartupMessage allowed yet) have their own, smaller
budget, and one source (an IPv4 address, an IPv6 /64) at most half of it: when it is full the
oldest negotiating connection of the source holding the most slots is dropped for the new one
(`NegotiationBudget`), so neither idle sockets nor a flood from several addresses can keep a
real client out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ..ops import httpd
from .backends import Backends

if TYPE_CHECKING:
    from ..config.schema import Config
    from ..tls.loader import Loaded

log = logging.getLogger("dwsproxy.server")


class Member(Hashable, Protocol):
    """What the state reads of a session."""

    @property
    def id(self) -> str: ...

    @property
    def startup(self) -> object | None: ...

    @property
    def outcome(self) -> str | None: ...

    def evict(self, detail: str) -> None: ...


S = TypeVar("S", bound=Member)


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# CancelRequests per source address: each one costs the backend a connection (PostgreSQL forks
# for it), so one peer may send CANCEL_BURST at once and CANCEL_RATE a second after that.
CANCEL_RATE = 20.0
CANCEL_BURST = 40.0
CANCEL_SOURCES = 4096  # addresses remembered; the least recently seen is forgotten first


# Descriptors kept free besides the client sockets and their backends: the backend health
# check, log files, a reload's file reads, closes still flushing (relay.CLOSE_TIMEOUT).
FD_RESERVE = 32
# The [metrics] and [admin] listeners: each holds at most twice its cap (httpd.descriptors)
# and its listening socket; a flood of them waits there, never in the sessions' share.
HTTP_RESERVE = 2 * (2 * httpd.MAX_CONNECTIONS) + 2
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
        return FD_RESERVE + HTTP_RESERVE + EVICT_SLACK

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
    ceiling = max(2, (nofile - in_use - FD_RESERVE - HTTP_RESERVE - EVICT_SLACK) // 2)
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


def source_of(host: str) -> str:
    """The source a connection counts against in the budgets: an IPv4 address, or an IPv6
    client's /64 (the least a site or a host is given: one host may use any address in it). An
    IPv4 client of a dual-stack listener (::ffff:a.b.c.d) is its IPv4 address, not the /64 that
    every such client shares."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


class NegotiationBudget:
    """Connections still negotiating, by source (`source_of`), oldest first (dicts keep
    insertion order). A new connection always gets a slot; when the budget is full it is taken
    from the source holding the most slots, that source's oldest connection: a flood, from one
    address or from many, pays for its own connections, and a source with few slots (a real
    client mid-handshake) is evicted only when every source holds as few. The new connection's
    own source gives up a slot when it holds as many as any other (a tie never goes against
    the others), and one source holds at most `per_source` slots. When every source holds
    one slot (a flood from more addresses than the budget has slots), the oldest connection
    that has not sent a byte goes first: a flood's sockets are idle, a real client is talking."""

    def __init__(self) -> None:
        self.negotiating: dict[Member, str] = {}
        self.by_source: dict[str, dict[Member, None]] = {}
        self.quiet: dict[Member, None] = {}  # not a byte from them yet, oldest first
        # sources by how many slots they hold, each tier in the order its sources reached it:
        # the source to evict from is the first of the top tier, found without a scan
        self._tiers: dict[int, dict[str, None]] = {}
        self._top = 0
        self.evicted = 0

    def enter(self, session: Member, host: str, limits: Limits) -> None:
        source = source_of(host)
        peers = self.by_source.get(source)
        if peers is not None and len(peers) >= limits.per_source:
            self._evict(next(iter(peers)),
                        f"dropped for a newer connection from {source}: {len(peers)} "
                        f"connections from that source were negotiating (per-source cap "
                        f"{limits.per_source}), this one the longest")
        if len(self.negotiating) >= limits.negotiating:
            self._make_room(source, limits)
        self.negotiating[session] = source
        self.quiet[session] = None
        peers = self.by_source.get(source)
        if peers is None:
            peers = self.by_source[source] = {}
        peers[session] = None
        self._move(source, len(peers) - 1, len(peers))

    def _make_room(self, source: str, limits: Limits) -> None:
        full = (f"dropped for a newer connection: {len(self.negotiating)} connections were "
                f"negotiating (negotiation budget {limits.negotiating})")
        own = len(self.by_source.get(source, ()))
        if self._top == 1 and own == 0 and self.quiet:
            self._evict(next(iter(self.quiet)), f"{full}, each from a source of its own; this "
                        "one the longest without sending a byte")
            return
        victim_source = source if own >= self._top else next(iter(self._tiers[self._top]))
        victims = self.by_source[victim_source]
        self._evict(next(iter(victims)), f"{full}, {len(victims)} of them from "
                    f"{victim_source}, the most of any source; this one its longest")

    def spoke(self, session: Member) -> None:
        """The connection's first bytes arrived."""
        self.quiet.pop(session, None)

    def leave(self, session: Member) -> None:
        self.quiet.pop(session, None)
        source = self.negotiating.pop(session, None)
        if source is None:
            return
        peers = self.by_source[source]
        del peers[session]
        if not peers:
            del self.by_source[source]
        self._move(source, len(peers) + 1, len(peers))

    def _move(self, source: str, old: int, new: int) -> None:
        if old:
            tier = self._tiers[old]
            del tier[source]
            if not tier:
                del self._tiers[old]
                if self._top == old:
                    self._top = new  # (a source leaving the top tier moves one down)
        if new:
            self._tiers.setdefault(new, {})[source] = None
            if new > self._top:
                self._top = new

    def _evict(self, victim: Member, detail: str) -> None:
        self.leave(victim)
        self.evicted += 1
        victim.evict(detail)


class ServerState(Generic[S]):
    """What every session of one process shares: the configuration in force and the counts."""

    def __init__(self, loaded: Loaded, processes: int = 1, *, nofile: int | None = None,
                 in_use: int | None = None) -> None:
        self.loaded = loaded  # swapped whole by a reload: sessions keep the one they hold
        # The processes actually serving the port, fixed at start: a reloaded `workers` value
        # only applies after a restart, so it must not change this process's share.
        self.processes = processes
        self.open = 0  # client sockets open, negotiating or relaying
        self.admitted = 0  # sessions past the max_connections check, not yet ended
        self.live: set[S] = set()  # sessions relaying
        self.tasks: set[asyncio.Task[None]] = set()
        self._cancel_tokens: dict[str, tuple[float, float]] = {}  # host -> (tokens, when)
        self.sessions: dict[str, S] = {}  # every open client connection, for /sessions
        self._next_id = 0
        self._pid = os.getpid()  # this process's, after any fork: not a system call per id
        self.last_reload: dict[str, object] = {"result": None, "at": None, "error": None}
        self.loaded_at = now_rfc3339()
        self.budget = NegotiationBudget()
        self.nofile = nofile if nofile is not None else \
            resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.in_use = in_use if in_use is not None else descriptors_in_use()
        self._limits: Limits | None = None
        self._limits_for: Config | None = None
        self.on_capacity: Callable[[], None] | None = None  # a listener paused at the ceiling
        # what this process knows of each backend host (up, role, back-off): backends.py
        self.backends = Backends()
        # a session's BackendKeyData (pid and secret, 8 bytes) -> the backend host that holds
        # it, so that a CancelRequest goes to that host (kept with several hosts only)
        self.cancel_keys: dict[bytes, str] = {}

    def backends_view(self) -> list[dict[str, Any]]:
        """/status `backends`: each configured host as this process last saw it."""
        return self.backends.view(self.config.backend)

    def register(self, session: S) -> str:
        self._next_id += 1
        sid = f"{self._pid}-{self._next_id}"
        self.sessions[sid] = session
        return sid

    @property
    def config(self) -> Config:
        """The parsed configuration in force."""
        return self.loaded.config

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
        host = source_of(host)
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

    def negotiated(self, session: S) -> None:
        self.budget.leave(session)

    def session_ended(self, session: S) -> None:
        self.sessions.pop(session.id, None)
        self.open -= 1
        self.budget.leave(session)
        if session.startup is not None and session.outcome != "too_many_connections":
            self.admitted = max(0, self.admitted - 1)
        if self.on_capacity is not None and self.open < self.limits.sockets + EVICT_SLACK:
            self.on_capacity()


