"""Several backend hosts: which one serves a session, and what the proxy knows of each.

Owns: libpq's host-list semantics for `[backend] host`/`port` (fe-connect.c): hosts tried in
order, or shuffled per connection with `load_balance_hosts = "random"` (libpq 16); each within
`connect_timeout`; the first that connects and meets `target_session_attrs` takes the session;
`prefer-standby` looks for a standby first and, when none fits, takes any host in a second pass
from the start of the list (libpq's SERVER_TYPE_PREFER_STANDBY_PASS2). Besides libpq: a host
that failed is put last for a back-off (it is tried again when all others failed, and after the
back-off like any other), and each host's role is learnt on a connection of the proxy's own
(backend.check_role), cached for the health-check interval, so a client's StartupMessage goes
once, to the host that serves it. Also the periodic health check of every host, the per-host
rows of /status and of dwsproxy_backend_up. Must not relay bytes or decide policy.

One `Backends` per process: the state of a host (up, role, back-off) is what this process saw.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..ops import metrics
from . import backend as backend_mod
from .relay import Endpoint
from .timeouts import within

if TYPE_CHECKING:
    from ..config.schema import BackendConfig, BackendHost
    from ..tls.loader import Loaded

log = logging.getLogger("dwsproxy.backends")

BACKOFF_FIRST = 1.0  # seconds a host is put last after its first failure, doubled per failure
BACKOFF_MAX = 30.0
# With health_check_interval = 0 a host's role is still kept this long: a burst of new sessions
# must not each cost the database one more login.
ROLE_CACHE_MIN = 1.0

# libpq's words for a host that does not fit (fe-connect.c, CONNECTION_CHECK_TARGET)
_MISFIT = {
    ("read-write", True): "session is read-only",
    ("read-only", False): "session is not read-only",
    ("primary", True): "server is in hot standby mode",
    ("standby", False): "server is not in hot standby mode",
}


@dataclass
class HostState:
    host: BackendHost
    up: bool | None = None  # None: not checked yet
    role: backend_mod.Role | None = None
    role_at: float = -1e9  # monotonic time the role was learnt
    checked_at: float | None = None  # wall time of the last check or connect
    failures: int = 0
    retry_at: float = 0.0  # monotonic: put last until then
    error: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # the last role check's failure, given to every session that waited on it and to those
    # that ask while the host is in back-off: one hanging host costs one connect_timeout per
    # back-off, not one per waiting session in turn
    role_failure: backend_mod.BackendError | None = None

    @property
    def address(self) -> str:
        return self.host.address

    def view(self) -> dict[str, Any]:
        role = "unknown" if self.role is None else (
            "standby" if self.role.in_hot_standby else "primary")
        return {"address": self.address, "up": bool(self.up), "role": role,
                "checked_at": _rfc3339(self.checked_at) if self.checked_at else None,
                **({"error": self.error} if self.error and not self.up else {})}


class NoBackend(Exception):
    """No host connected and fitted: str() names every host tried and why, as libpq's error
    lists each host's failure. `tls_reasons` are the backend TLS failures met on the way."""

    def __init__(self, tried: list[tuple[str, str]], tls_reasons: list[str]) -> None:
        self.tried = tried
        self.tls_reasons = tls_reasons
        super().__init__("; ".join(f"{address}: {why}" for address, why in tried))


@dataclass(frozen=True)
class Chosen:
    state: HostState
    connected: backend_mod.Connected


class Backends:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._hosts: dict[str, HostState] = {}
        self._rng = rng or random.Random()

    def states(self, cfg: BackendConfig) -> list[HostState]:
        """The state of each configured host, in the configured order (a reload that changes
        the list keeps what is known of the hosts that stay)."""
        out = []
        for host in cfg.hosts:
            st = self._hosts.get(host.address)
            if st is None:
                st = self._hosts[host.address] = HostState(host)
            out.append(st)
        if len(self._hosts) != len(out):
            self._hosts = {s.address: s for s in out}
        return out

    def view(self, cfg: BackendConfig) -> list[dict[str, Any]]:
        return [s.view() for s in self.states(cfg)]

    def up_by_address(self, cfg: BackendConfig) -> list[tuple[str, bool]]:
        return [(s.address, bool(s.up)) for s in self.states(cfg)]

    def order(self, cfg: BackendConfig) -> list[HostState]:
        """The order of one connection's attempts: libpq's, with hosts in back-off last."""
        states = self.states(cfg)
        if cfg.load_balance_hosts == "random":
            states = states[:]
            self._rng.shuffle(states)
        now = time.monotonic()
        return [s for s in states if s.retry_at <= now] + [s for s in states if s.retry_at > now]

    # -- what a connection attempt teaches ------------------------------------------------------
    def _failed(self, st: HostState, why: str) -> None:
        if st.up or st.up is None:
            log.warning("backend %s does not answer: %s", st.address, why)
        st.up, st.error = False, why
        st.failures += 1
        st.retry_at = time.monotonic() + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (st.failures - 1))
        st.checked_at = time.time()

    def _succeeded(self, st: HostState) -> None:
        if st.up is False:
            log.info("backend %s answers again", st.address)
        st.up, st.error, st.failures, st.retry_at = True, "", 0, 0.0
        st.checked_at = time.time()

    # -- roles ----------------------------------------------------------------------------------
    async def role(self, st: HostState, loaded: Loaded, password: str) -> backend_mod.Role:
        """The host's role, from the cache when younger than the health-check interval."""
        cfg = loaded.config.backend
        ttl = max(cfg.health_check_interval, ROLE_CACHE_MIN)
        async with st.lock:  # sessions arriving together share one check
            now = time.monotonic()
            if st.role is not None and now - st.role_at < ttl:
                return st.role
            if st.role_failure is not None and st.retry_at > now:
                raise st.role_failure
            try:
                role = await backend_mod.check_role(st.host, cfg, loaded.backend_tls, password)
            except backend_mod.BackendError as exc:
                self._failed(st, f"health check: {exc}")
                st.role_failure = exc
                raise
            st.role, st.role_at, st.role_failure = role, time.monotonic(), None
            return role

    # -- a session's backend --------------------------------------------------------------------
    async def connect(self, loaded: Loaded, endpoint_factory: Callable[[], Endpoint],
                      password: str = "") -> tuple[Chosen, Endpoint]:
        """Connect a session's backend: the first host, in this connection's order, that
        connects and fits target_session_attrs. NoBackend when none does."""
        cfg = loaded.config.backend
        target = cfg.target_session_attrs
        order = self.order(cfg)
        tried: list[tuple[str, str]] = []
        tls_reasons: list[str] = []
        passes = ["standby", "any"] if target == "prefer-standby" else [target]
        for wanted in passes:
            for st in order:
                if wanted != "any":
                    try:
                        role = await self.role(st, loaded, password)
                    except backend_mod.BackendError as exc:  # counted once, by role()
                        tried.append((st.address, f"role unknown: {exc}"))
                        continue
                    misfit = _misfit(wanted, role)
                    if misfit:
                        tried.append((st.address, misfit))
                        continue
                endpoint = endpoint_factory()
                try:
                    connected = await within(cfg.connect_timeout, backend_mod.connect(
                        st.host, loaded.backend_tls, endpoint))
                except (backend_mod.BackendError, TimeoutError) as exc:
                    if endpoint.transport is not None:
                        endpoint.transport.abort()
                    why = str(exc) if isinstance(exc, backend_mod.BackendError) else "timeout"
                    if isinstance(exc, backend_mod.BackendError) and exc.tls_reason:
                        tls_reasons.append(exc.tls_reason)
                        metrics.backend_tls_failed(exc.tls_reason)  # each host's, counted
                    self._failed(st, why)
                    tried.append((st.address, why))
                    continue
                self._succeeded(st)
                return Chosen(st, connected), endpoint
        raise NoBackend(tried, tls_reasons)

    def host_of(self, cfg: BackendConfig, address: str) -> BackendHost | None:
        for host in cfg.hosts:
            if host.address == address:
                return host
        return None

    # -- the health check -----------------------------------------------------------------------
    async def check(self, loaded: Loaded, password: str) -> bool:
        """Check every host once, together: a quiet connect, or with health_check_user a
        login that also learns the role. True when some host answered."""
        cfg = loaded.config.backend
        states = self.states(cfg)
        await asyncio.gather(*(self._check_one(st, loaded, password) for st in states))
        return any(s.up for s in states)

    async def _check_one(self, st: HostState, loaded: Loaded, password: str) -> None:
        cfg = loaded.config.backend
        try:
            await self._check_host(st, loaded, cfg, password)
        except backend_mod.BackendError as exc:
            # not counted in dwsproxy_backend_tls_failures_total: that counts connections
            # made for clients; the check's verdict is dwsproxy_backend_up and /status
            self._failed(st, str(exc))
            return
        except Exception:  # the checker must outlive a bug: it is the only one
            log.exception("health check of %s failed unexpectedly", st.address)
            self._failed(st, "internal error")
            return
        self._succeeded(st)

    async def _check_host(self, st: HostState, loaded: Loaded, cfg: BackendConfig,
                          password: str) -> None:
        if cfg.health_check_user:
            async with st.lock:
                try:
                    st.role = await backend_mod.check_role(st.host, cfg, loaded.backend_tls,
                                                           password)
                except backend_mod.BackendError as exc:
                    st.role_failure = exc  # sessions in the back-off get it at once
                    raise
                st.role_at, st.role_failure = time.monotonic(), None
        else:
            await backend_mod.probe(st.host, cfg, loaded.backend_tls)


def _misfit(wanted: str, role: backend_mod.Role) -> str:
    """Why a host of `role` does not fit `wanted` ("" when it does), as libpq tests it."""
    if wanted in ("read-write", "read-only"):
        return _MISFIT.get((wanted, role.read_only), "")
    if wanted in ("primary", "standby"):
        return _MISFIT.get((wanted, role.in_hot_standby), "")
    return ""


def _rfc3339(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"
