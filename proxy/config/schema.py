"""The configuration: one TOML file parsed once into frozen dataclasses.

Owns: checking every key of the TOML text (unknown keys, types, ranges, impossible
combinations) and resolving relative paths against the config file's folder. Must not read
files or build TLS objects: loader.py reads a snapshot (snapshot.py) and builds them (tls.py),
so that a `Config` is complete or does not exist. The rest of the code never sees a raw dict;
errors are `ConfigError` naming the key path (`tls.ssl_ca_file: no such file '…'`).

Paths are made absolute but never resolved through symlinks: Kubernetes mounts a ConfigMap or
Secret as `dir/file -> ..data/file` with `..data -> ..<timestamp>/`, and swaps `..data` on every
update, deleting the old timestamped folder; a resolved path would point into that folder.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ident as ident_mod
from .errors import ConfigError
from .ident import IdentEntry

TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
CLIENTCERT_LEVELS = ("none", "optional", "verify-ca", "verify-full")
CLIENTNAMES = ("CN", "DN", "SAN")
BACKEND_SSLMODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
RULE_TYPES = ("host", "hostssl", "hostnossl", "local")
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE_HOSTS = ("disable", "random")
RULE_ACTIONS = ("allow", "reject")


@dataclass(frozen=True)
class ListenConfig:
    host: str = "0.0.0.0"
    port: int = 6432
    workers: int = 1
    max_connections: int = 10000
    startup_timeout: float = 10.0
    idle_timeout: float = 0.0
    shutdown_grace: float = 30.0
    # TCP keepalive of accepted sockets, PostgreSQL's names and units (0 = the OS default).
    # Through the proxy the backend's TCP peer is the proxy, so PostgreSQL's own settings no
    # longer see a client that vanished without FIN or RST: these must. 60 + 6 x 10 s: a dead
    # idle client is found in two minutes, not the OS's two hours.
    tcp_keepalives_idle: int = 60
    tcp_keepalives_interval: int = 10
    tcp_keepalives_count: int = 6
    tcp_user_timeout: int = 0  # ms unacknowledged before the kernel drops the connection
    # PgBouncer's: also listen on DIR/.s.PGSQL.PORT; its clients are `local` (pg_hba's word)
    unix_socket_dir: str = ""
    unix_socket_mode: str = "0777"  # octal, as PgBouncer's and PostgreSQL's
    unix_socket_group: str = ""
    # PROXY protocol (HAProxy's v1/v2) from these balancers only; their header names the client
    proxy_protocol: bool = False
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class BackendHost:
    """One host of `[backend] host` with its port. A host starting with "/" is a socket
    directory, as in libpq: the server's socket is DIR/.s.PGSQL.PORT."""

    host: str
    port: int

    @property
    def unix(self) -> bool:
        return self.host.startswith("/")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.host, f".s.PGSQL.{self.port}")

    @property
    def address(self) -> str:
        """`host:port`, the label of dwsproxy_backend_up and /status `backends`."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BackendConfig:
    # libpq's host and port lists: several hosts, one port for all or one per host
    host: tuple[str, ...] = ("127.0.0.1",)
    port: tuple[int, ...] = (5432,)
    connect_timeout: float = 5.0
    target_session_attrs: str = "any"
    load_balance_hosts: str = "disable"
    health_check_user: str = ""
    health_check_dbname: str = "postgres"
    health_check_password_file: str = ""
    health_check_interval: float = 5.0
    # proxy -> backend TLS, with libpq's meanings (verify-ca is what GaussDB(DWS) supports)
    sslmode: str = "disable"
    sslrootcert: str = ""
    sslcrl: str = ""
    sslcert: str = ""
    sslkey: str = ""
    sslpassword_file: str = ""
    sslkey_cipher_file: str = ""
    sslkey_rand_file: str = ""
    sslsni: bool = True
    ssl_min_protocol_version: str = "TLSv1.2"
    sslnegotiation: str = "postgres"
    application_name_add_host: bool = False

    @property
    def hosts(self) -> tuple[BackendHost, ...]:
        ports = self.port * len(self.host) if len(self.port) == 1 else self.port
        return tuple(BackendHost(h, p) for h, p in zip(self.host, ports, strict=True))

    @property
    def address(self) -> str:
        return ",".join(h.address for h in self.hosts)


@dataclass(frozen=True)
class TlsConfig:
    ssl: bool = True
    require_ssl: bool = False
    ssl_cert_file: str = "certs/server.crt"
    ssl_key_file: str = "certs/server.key"
    ssl_passphrase_file: str = ""
    ssl_key_cipher_file: str = ""
    ssl_key_rand_file: str = ""
    ssl_ca_file: str = ""
    ssl_crl_file: str = ""
    ssl_crl_dir: str = ""
    clientcert: str = "none"
    clientname: str = "CN"
    ssl_min_protocol_version: str = "TLSv1.2"
    ssl_max_protocol_version: str = ""
    ssl_ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"
    direct_ssl: bool = True
    ident_map: str = ""  # an [[ident]] map verify-full checks the certificate's name with


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based, as a DBA counts pg_hba.conf lines
    type: str = "host"
    user: str = "*"
    database: str = "*"
    application_name: str = "*"
    address: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    ssl_protocols: tuple[str, ...] = ()
    clientcert: str = ""
    ident_map: str = ""
    action: str = "allow"

    def describe(self) -> str:
        parts = [f"type={self.type}"]
        for key in ("user", "database", "application_name"):
            if getattr(self, key) != "*":
                parts.append(f"{key}={getattr(self, key)}")
        if self.address is not None:
            parts.append(f"address={self.address}")
        return f"rule #{self.index} ({', '.join(parts)})"

    def matches(
        self,
        *,
        encrypted: bool,
        user: str,
        database: str,
        application_name: str,
        peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        replication: bool = False,
        local: bool = False,
    ) -> bool:
        # pg_hba: a `local` line matches Unix-socket clients only, the host* lines TCP only
        if (self.type == "local") != local:
            return False
        if self.type == "hostssl" and not encrypted:
            return False
        if self.type == "hostnossl" and encrypted:
            return False
        if self.address is not None and not address_matches(self.address, peer):
            return False
        # pg_hba: the keyword "replication" matches physical replication only, and no other
        # pattern ("*" included, as "all") matches it.
        db_ok = (self.database == "replication" if replication
                 else self.database != "replication" and fnmatch.fnmatchcase(database,
                                                                             self.database))
        return (
            db_ok
            and fnmatch.fnmatchcase(user, self.user)
            and fnmatch.fnmatchcase(application_name, self.application_name)
        )


def address_matches(net: ipaddress.IPv4Network | ipaddress.IPv6Network,
                    peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    """As PostgreSQL's check_ip: an IPv4 peer is also compared, in its IPv4-mapped form
    (::ffff:a.b.c.d), with an IPv6 rule such as ::/0."""
    if peer is None:
        return False
    if peer.version == net.version:
        return peer in net
    if isinstance(peer, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{peer}") in net
    return False


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9187


@dataclass(frozen=True)
class AdminConfig:
    """The admin views and actions (admin.md), on a listener apart from [metrics]."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9188
    token_file: str = ""


@dataclass(frozen=True)
class ReloadConfig:
    watch: bool = True  # reload when the config or a file it names changes (runtime/watcher.py)
    watch_interval: float = 2.0  # seconds between looks; a change must be this old to count


@dataclass(frozen=True)
class Config:
    path: str
    listen: ListenConfig
    backend: BackendConfig
    tls: TlsConfig
    rules: tuple[Rule, ...]
    metrics: MetricsConfig
    reload: ReloadConfig = ReloadConfig()
    admin: AdminConfig = field(default_factory=AdminConfig)
    ident: tuple[IdentEntry, ...] = ()

    @property
    def cert_requested(self) -> bool:
        """Some level (global or a rule's) asks clients for a certificate."""
        return self.tls.clientcert != "none" or any(r.clientcert for r in self.rules)


# --- parsing -----------------------------------------------------------------------------------


def _as_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false"):
        return value.lower() in ("on", "true")
    raise ConfigError(key, f"expected true/false (or \"on\"/\"off\"), got {value!r}")


def _as_int(lo: int, hi: int) -> Callable[[str, object], int]:
    def conv(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if not lo <= value <= hi:
            raise ConfigError(key, f"{value} is out of range {lo}..{hi}")
        return value

    return conv


def _as_seconds(allow_zero: bool) -> Callable[[str, object], float]:
    def conv(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number of seconds, got {value!r}")
        if value < 0 or (value == 0 and not allow_zero) or value > 86400 * 365:
            raise ConfigError(key, f"{value} is out of range")
        return float(value)

    return conv


def _as_str(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _one_of(choices: tuple[str, ...], allow_empty: bool = False) -> Callable[[str, object], str]:
    def conv(key: str, value: object) -> str:
        text = _as_str(key, value)
        if text in choices or (allow_empty and text == ""):
            return text
        raise ConfigError(key, f"{text!r} is not one of {', '.join(choices)}")

    return conv


def _workers(key: str, value: object) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    return _as_int(1, 256)(key, value)


def _port(key: str, value: object) -> int:
    return _as_int(0, 65535)(key, value)


def _list_items(key: str, value: object) -> list[object]:
    """libpq's comma form ("a,b") or a TOML array: the items, each stripped."""
    if isinstance(value, str):
        items: list[object] = [v.strip() for v in value.split(",")]
    elif isinstance(value, list):
        items = list(value)
    else:
        items = [value]
    if not items:
        raise ConfigError(key, "is an empty list")
    return items


def _hosts(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, (str, list)):
        raise ConfigError(key, f"expected a host or a list of hosts, got {value!r}")
    hosts = tuple(_as_str(key, v) for v in _list_items(key, value))
    if any(not h for h in hosts):
        raise ConfigError(key, f"an empty host in {value!r}")
    return hosts


def _ports(key: str, value: object) -> tuple[int, ...]:
    out = []
    for item in _list_items(key, value):
        if isinstance(item, str):
            if not item.isdigit():
                raise ConfigError(key, f"{item!r} is not a port number")
            item = int(item)
        out.append(_as_int(1, 65535)(key, item))
    return tuple(out)


def _mode(key: str, value: object) -> str:
    text = _as_str(key, value)
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(key, f"{text!r} is not an octal mode such as \"0770\"") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(key, f"{text!r} is out of range 0000..0777")
    return text


_LISTEN = {
    "host": _as_str,
    "port": _port,
    "workers": _workers,
    "max_connections": _as_int(1, 1_000_000),
    "startup_timeout": _as_seconds(False),
    "idle_timeout": _as_seconds(True),
    "shutdown_grace": _as_seconds(True),
    # Linux's ranges: TCP_KEEPIDLE/TCP_KEEPINTVL 1..32767 s, TCP_KEEPCNT 1..127; 0 is
    # PostgreSQL's "the OS default"
    "tcp_keepalives_idle": _as_int(0, 32767),
    "tcp_keepalives_interval": _as_int(0, 32767),
    "tcp_keepalives_count": _as_int(0, 127),
    "tcp_user_timeout": _as_int(0, 2_147_483_647),
    "unix_socket_dir": _as_str,
    "unix_socket_mode": _mode,
    "unix_socket_group": _as_str,
    "proxy_protocol": _as_bool,
    "trusted_proxies": lambda path, value: _cidr_list(path, value),
}
_BACKEND = {
    "host": _hosts,
    "port": _ports,
    "connect_timeout": _as_seconds(False),
    "target_session_attrs": _one_of(TARGET_SESSION_ATTRS),
    "load_balance_hosts": _one_of(LOAD_BALANCE_HOSTS),
    "health_check_user": _as_str,
    "health_check_dbname": _as_str,
    "health_check_password_file": _as_str,
    "health_check_interval": _as_seconds(True),
    "sslmode": _one_of(BACKEND_SSLMODES),
    "sslrootcert": _as_str,
    "sslcrl": _as_str,
    "sslcert": _as_str,
    "sslkey": _as_str,
    "sslpassword_file": _as_str,
    "sslkey_cipher_file": _as_str,
    "sslkey_rand_file": _as_str,
    "sslsni": _as_bool,
    "ssl_min_protocol_version": _one_of(TLS_VERSIONS),
    "sslnegotiation": _one_of(("postgres", "direct")),
    "application_name_add_host": _as_bool,
}
_TLS = {
    "ssl": _as_bool,
    "require_ssl": _as_bool,
    "ssl_cert_file": _as_str,
    "ssl_key_file": _as_str,
    "ssl_passphrase_file": _as_str,
    "ssl_key_cipher_file": _as_str,
    "ssl_key_rand_file": _as_str,
    "ssl_ca_file": _as_str,
    "ssl_crl_file": _as_str,
    "ssl_crl_dir": _as_str,
    "clientcert": _one_of(CLIENTCERT_LEVELS),
    "clientname": _one_of(CLIENTNAMES),
    "ssl_min_protocol_version": _one_of(TLS_VERSIONS),
    "ssl_max_protocol_version": _one_of(TLS_VERSIONS, allow_empty=True),
    "ssl_ciphers": _as_str,
    "direct_ssl": _as_bool,
    "ident_map": _as_str,
}
_METRICS = {"host": _as_str, "port": _port}
_ADMIN = {"enabled": _as_bool, "host": _as_str, "port": _port, "token_file": _as_str}


def _cidr_list(path: str, value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                 ...]:
    if not isinstance(value, list):
        raise ConfigError(path, "expected a list of CIDR addresses such as [\"10.0.0.0/8\"]")
    return tuple(_rule_address(f"{path}[{i}]", _as_str(f"{path}[{i}]", v))
                 for i, v in enumerate(value))


def _convert(prefix: str, table: dict[str, Any],
             schema: Mapping[str, Callable[[str, object], Any]]) -> dict[str, Any]:
    """Every key of a table checked against its schema and converted; an unknown key is a
    ConfigError naming it and the known ones."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(f"{prefix}.{key}", f"unknown key (known: {', '.join(schema)})")
        out[key] = schema[key](f"{prefix}.{key}", value)
    return out


def _ident(index: int, raw: object) -> IdentEntry:
    prefix = f"ident[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(prefix, "expected a table ([[ident]])")
    values = _convert(prefix, raw, _IDENT)
    for key in _IDENT:
        if not values.get(key):
            raise ConfigError(f"{prefix}.{key}", "missing or empty")
    try:
        return ident_mod.entry(values["map"], values["system_user"], values["pg_user"])
    except ValueError as exc:
        part, _, problem = str(exc).partition(": ")
        key = part if part in _IDENT else "system_user"
        raise ConfigError(f"{prefix}.{key}", problem or str(exc)) from None


def _watch_interval(key: str, value: object) -> float:
    # Below 0.1 s the looks themselves would cost; above an hour a renewal would wait too long.
    seconds = _as_seconds(False)(key, value)
    if not 0.1 <= seconds <= 3600:
        raise ConfigError(key, f"{value} is out of range 0.1..3600 seconds")
    return seconds


_RELOAD = {"watch": _as_bool, "watch_interval": _watch_interval}


def _rule_address_key(path: str, value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return _rule_address(path, _as_str(path, value))


def _ssl_protocols(path: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "expected a non-empty list such as [\"TLSv1.2\"]")
    return tuple(_one_of(TLS_VERSIONS)(path, v) for v in value)


# A rule's `index` is its position, not a key.
_RULE = {
    "type": _one_of(RULE_TYPES),
    "user": _as_str,
    "database": _as_str,
    "application_name": _as_str,
    "address": _rule_address_key,
    "ssl_protocols": _ssl_protocols,
    "clientcert": _one_of(CLIENTCERT_LEVELS[1:]),
    "ident_map": _as_str,
    "action": _one_of(RULE_ACTIONS),
}
# One [[ident]] table: one line of pg_ident.conf (ident.py).
_IDENT = {"map": _as_str, "system_user": _as_str, "pg_user": _as_str}
# Every key the parser accepts, by section: docs/configuration.md is tested against this.
SCHEMA: Mapping[str, Mapping[str, Callable[[str, object], Any]]] = {
    "listen": _LISTEN,
    "backend": _BACKEND,
    "tls": _TLS,
    "rules": _RULE,
    "metrics": _METRICS,
    "reload": _RELOAD,
    "admin": _ADMIN,
    "ident": _IDENT,
}
_PATH_KEYS = {
    "listen": ("unix_socket_dir",),
    "backend": ("health_check_password_file", "sslrootcert", "sslcrl", "sslcert", "sslkey",
                "sslpassword_file", "sslkey_cipher_file", "sslkey_rand_file"),
    "admin": ("token_file",),
    "tls": (
        "ssl_cert_file",
        "ssl_key_file",
        "ssl_passphrase_file",
        "ssl_key_cipher_file",
        "ssl_key_rand_file",
        "ssl_ca_file",
        "ssl_crl_file",
        "ssl_crl_dir",
    ),
}


def _section(raw: dict[str, Any], name: str, schema: Mapping[str, Callable[[str, object], Any]],
             base: Path, defaults: object) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(name, "expected a table")
    out = _convert(name, table, schema)
    # Relative paths, defaults included, are relative to the config file's folder (contract).
    for key in _PATH_KEYS.get(name, ()):
        value = out.get(key, getattr(defaults, key))
        if value:
            out[key] = os.path.normpath(base / value)
    return out


def _rule(index: int, raw: object) -> Rule:
    prefix = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(prefix, "expected a table ([[rules]])")
    values = _convert(prefix, raw, _RULE)
    if "action" not in values:
        raise ConfigError(f"{prefix}.action", "missing (allow or reject)")
    if values.get("type") == "hostnossl" and (values.get("ssl_protocols") or
                                               values.get("clientcert")):
        raise ConfigError(prefix, "a hostnossl rule cannot require ssl_protocols or clientcert")
    if values.get("type") == "local" and (values.get("ssl_protocols") or values.get("clientcert")
                                           or values.get("address") is not None):
        # pg_hba: a Unix socket carries no TLS and no address
        raise ConfigError(prefix, "a local rule (Unix-socket clients) cannot have "
                          "ssl_protocols, clientcert or address")
    return Rule(index=index, **values)


def _rule_address(path: str, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(path, f"not a CIDR address: {exc}") from None
    # Peers are compared in IPv4 form (an IPv4 client of a dual-stack listener is seen as
    # ::ffff:a.b.c.d and mapped back), so an IPv4-mapped rule is written back to IPv4 too:
    # otherwise it could never match and a reject rule would silently let everyone through.
    written = text.split("/", 1)[0]
    if isinstance(net, ipaddress.IPv6Network) and (
            ipaddress.IPv6Address(written).ipv4_mapped is not None):
        if net.prefixlen < 96:
            raise ConfigError(path, f"{text} spans more than the IPv4-mapped range "
                              "::ffff:0:0/96; write the IPv4 and IPv6 parts as two rules")
        return ipaddress.ip_network(
            f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}", strict=False)
    return net


def parse(text: str, path: str) -> Config:
    """Parse and validate; builds no TLS objects (see `load`)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: not valid TOML: {exc}") from None
    for key in raw:
        if key not in SCHEMA:
            raise ConfigError(key, f"unknown section (known: {', '.join(SCHEMA)})")
    path = os.path.abspath(path)  # absolute, symlinks kept (see the module docstring)
    base = Path(path).parent
    listen = ListenConfig(**_section(raw, "listen", _LISTEN, base, ListenConfig()))
    backend = BackendConfig(**_section(raw, "backend", _BACKEND, base, BackendConfig()))
    tls = TlsConfig(**_section(raw, "tls", _TLS, base, TlsConfig()))
    metrics_raw = raw.get("metrics", {})
    if isinstance(metrics_raw, dict) and "admin" in metrics_raw:
        raise ConfigError("metrics.admin", "the admin views moved to their own listener: "
                          "remove it and use [admin] enabled = true|false (host, port, "
                          "token_file)")
    metrics = MetricsConfig(**_section(raw, "metrics", _METRICS, base, MetricsConfig()))
    reload = ReloadConfig(**_section(raw, "reload", _RELOAD, base, ReloadConfig()))
    admin = AdminConfig(**_section(raw, "admin", _ADMIN, base, AdminConfig()))
    raw_ident = raw.get("ident", [])
    if not isinstance(raw_ident, list):
        raise ConfigError("ident", "expected an array of tables ([[ident]])")
    ident = tuple(_ident(i, r) for i, r in enumerate(raw_ident, start=1))
    raw_rules = raw.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError("rules", "expected an array of tables ([[rules]])")
    rules = tuple(_rule(i, r) for i, r in enumerate(raw_rules, start=1))

    _check_backend(backend)
    if listen.unix_socket_dir and not os.path.isdir(listen.unix_socket_dir):
        raise ConfigError("listen.unix_socket_dir",
                          f"socket directory '{listen.unix_socket_dir}' does not exist")
    if tls.ssl_max_protocol_version and TLS_VERSIONS.index(
        tls.ssl_max_protocol_version
    ) < TLS_VERSIONS.index(tls.ssl_min_protocol_version):
        raise ConfigError("tls.ssl_max_protocol_version",
                          "is lower than tls.ssl_min_protocol_version")
    for prefix, pair in (("tls.", ("ssl_key_cipher_file", "ssl_key_rand_file")),
                         ("backend.", ("sslkey_cipher_file", "sslkey_rand_file"))):
        section = tls if prefix == "tls." else backend
        given = [k for k in pair if getattr(section, k)]
        if len(given) == 1:
            raise ConfigError(prefix + given[0], f"needs {prefix}{(set(pair) - set(given)).pop()}"
                              " too: the .cipher and .rand files go together")
    if tls.ssl_passphrase_file and tls.ssl_key_cipher_file:
        raise ConfigError("tls.ssl_key_cipher_file", "give either tls.ssl_passphrase_file or "
                          "the .cipher/.rand pair, not both")
    _check_listen(listen)
    if tls.require_ssl and not tls.ssl:
        # The seed gives require_ssl effect only when ssl is on; written together with ssl off
        # it reads as a policy the proxy would not enforce (plaintext would still be served),
        # so it is refused rather than silently ignored (the third round's contract).
        raise ConfigError("tls.require_ssl", "true needs tls.ssl = true: with ssl off every "
                          "SSLRequest is answered N and sessions are plaintext; set "
                          "require_ssl = false, or ssl = true")
    cfg = Config(path=path, listen=listen, backend=backend, tls=tls,
                 rules=rules, metrics=metrics, reload=reload,
                 admin=admin, ident=ident)
    _check_ident_maps(cfg)
    _check_admin(admin, metrics)
    if listen.proxy_protocol and not listen.trusted_proxies:
        raise ConfigError("listen.trusted_proxies", "is required with listen.proxy_protocol = "
                          "true: the load balancers allowed to name the client (a header "
                          "from anyone would let them choose their own address)")
    if cfg.cert_requested and not tls.ssl:
        raise ConfigError("tls.clientcert", "client certificates need tls.ssl = true")
    if cfg.cert_requested and not tls.ssl_ca_file:
        raise ConfigError("tls.ssl_ca_file",
                          "is required when clientcert (global or in a rule) is not \"none\"")
    if listen.workers > 1 and listen.port == 0:
        raise ConfigError("listen.port", "0 (any free port) cannot be shared by several "
                          "workers: name a port")
    for rule in rules:
        for proto in rule.ssl_protocols:
            if proto not in _enabled_versions(tls):
                raise ConfigError(f"rules[{rule.index}].ssl_protocols",
                                  f"{proto} is outside tls.ssl_min/max_protocol_version")
    return cfg


def _check_listen(listen: ListenConfig) -> None:
    """What getaddrinfo would take or refuse only at start: one address or name, no list, no
    socket folder."""
    host = listen.host
    if "," in host or any(c.isspace() for c in host):
        raise ConfigError("listen.host", f"{host!r} is a list: the proxy listens on one address "
                          "(\"::\" takes IPv6 and, where the system allows, IPv4 too)")
    if host.startswith("/"):
        raise ConfigError("listen.host", f"{host!r} is a folder, not an address: a Unix "
                          "socket's folder is listen.unix_socket_dir")


def _check_ident_maps(cfg: Config) -> None:
    maps = {entry.map for entry in cfg.ident}
    uses = [("tls.ident_map", cfg.tls.ident_map, cfg.tls.clientcert)]
    uses += [(f"rules[{r.index}].ident_map", r.ident_map, r.clientcert) for r in cfg.rules]
    for key, name, level in uses:
        if not name:
            continue
        if name not in maps:
            known = ", ".join(sorted(maps)) or "none"
            raise ConfigError(key, f"no [[ident]] map named {name!r} (maps: {known})")
        if level != "verify-full":
            raise ConfigError(key, "is only used by clientcert = \"verify-full\" (a map "
                              "replaces its exact name match)")


def is_loopback_host(host: str) -> bool:
    """A listen host only this machine can reach (the admin token is optional there)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_admin(admin: AdminConfig, metrics: MetricsConfig) -> None:
    if not admin.enabled:
        return
    if not admin.token_file and not is_loopback_host(admin.host):
        raise ConfigError("admin.token_file", f"is required when admin.host ({admin.host!r}) "
                          "is not a loopback address: the views show every session's user, "
                          "address and certificate")
    if (admin.host, admin.port) == (metrics.host, metrics.port) and admin.port:
        raise ConfigError("admin.port", "is the [metrics] listener's port: the admin views "
                          "need their own")


def _check_backend(b: BackendConfig) -> None:
    """libpq's rules for the proxy's own connection to the backend."""
    if len(b.port) not in (1, len(b.host)):
        # libpq: "could not match %d port numbers to %d hosts"
        raise ConfigError("backend.port", f"{len(b.port)} ports for {len(b.host)} hosts: give "
                          "one port for all hosts or one per host, in the same order")
    for h in b.host:
        if h.startswith("/") and not os.path.isdir(h):
            raise ConfigError("backend.host", f"socket directory '{h}' does not exist")
    if b.target_session_attrs != "any" and not b.health_check_user:
        raise ConfigError("backend.target_session_attrs", f"\"{b.target_session_attrs}\" needs "
                          "backend.health_check_user: the proxy learns each host's role on a "
                          "connection of its own, never from a client's session")
    if b.health_check_password_file and not b.health_check_user:
        raise ConfigError("backend.health_check_password_file",
                          "has no effect without backend.health_check_user")
    if b.sslmode == "disable":
        for key in ("sslrootcert", "sslcrl", "sslcert", "sslkey", "sslpassword_file",
                    "sslkey_cipher_file", "sslkey_rand_file"):
            if getattr(b, key):
                raise ConfigError(f"backend.{key}", "has no effect with backend.sslmode = "
                                  "\"disable\": remove it or choose an sslmode")
        if b.sslnegotiation == "direct":
            raise ConfigError("backend.sslnegotiation", "direct needs backend.sslmode require, "
                              "verify-ca or verify-full")
        return
    if b.sslmode in ("verify-ca", "verify-full") and not b.sslrootcert:
        raise ConfigError("backend.sslrootcert", f"is required by backend.sslmode = "
                          f"\"{b.sslmode}\" (the CA that signed the database's certificate)")
    if b.sslnegotiation == "direct" and b.sslmode == "prefer":
        # libpq: a direct TLS connection has no plaintext to fall back to
        raise ConfigError("backend.sslnegotiation", "direct cannot be used with sslmode = "
                          "\"prefer\" (use require, verify-ca or verify-full)")
    if b.sslcrl and not b.sslrootcert:
        raise ConfigError("backend.sslcrl", "needs backend.sslrootcert: a CRL is checked "
                          "against a verified chain")
    if bool(b.sslcert) != bool(b.sslkey):
        raise ConfigError("backend.sslkey" if b.sslcert else "backend.sslcert",
                          "backend.sslcert and backend.sslkey go together")
    if b.sslpassword_file and b.sslkey_cipher_file:
        raise ConfigError("backend.sslkey_cipher_file", "give either backend.sslpassword_file "
                          "or the .cipher/.rand pair, not both")
    if (b.sslpassword_file or b.sslkey_cipher_file) and not b.sslkey:
        raise ConfigError("backend.sslkey", "a key passphrase was given but no backend.sslkey")


def warnings(cfg: Config) -> list[str]:
    """What a configuration allows but an operator should hear about (logged at load, printed
    by check-config)."""
    out = []
    b = cfg.backend
    remote = [h for h in b.host if not _is_loopback(h)]
    if b.sslmode == "prefer" and remote:
        # libpq's prefer: an `N` to the SSLRequest means plaintext, and anyone on the path can
        # send that `N`. Over a network only require/verify-* keep the database's hop encrypted.
        shown = remote[0] if len(remote) == 1 else ",".join(remote)
        out.append(f"backend.sslmode = \"prefer\" with backend.host {shown!r}, which is not a "
                   "loopback address: anyone on the path can answer the SSLRequest with N and "
                   "get the sessions in plaintext; use require, verify-ca or verify-full")
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.startswith("/"):  # (a Unix socket folder: never TLS)
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _enabled_versions(tls: TlsConfig) -> tuple[str, ...]:
    lo = TLS_VERSIONS.index(tls.ssl_min_protocol_version)
    hi = TLS_VERSIONS.index(tls.ssl_max_protocol_version) if tls.ssl_max_protocol_version else -1
    return TLS_VERSIONS[lo:] if hi == -1 else TLS_VERSIONS[lo : hi + 1]
