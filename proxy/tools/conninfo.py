"""CONNINFO read with libpq's own rules, for `dwsproxy probe`: the hosts psql would try.

Owns: resolving CONNINFO with libpq itself, through ctypes: `PQconnectStartParams` with
psql's expand_dbname, stopped by one deliberately invalid option in libpq's last check, then
`PQconninfo`. So unknown keys, quoting, URIs, the service file (`service=`, `PGSERVICE`,
`PGSERVICEFILE`, `PGSYSCONFDIR`), every `PG*` variable and the compiled-in defaults are
libpq's by construction. Then the host list (`host`/`hostaddr`/`port` split on commas as
fe-connect.c connectOptions2 does) and the password from the password file (`passfile`,
`PGPASSFILE`, `~/.pgpass`, matched as fe-connect.c passwordFromFile does).
Must not: connect to anything, or print; errors are `ConninfoError` with libpq's wording.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import ipaddress
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = "5432"


class ConninfoError(Exception):
    """CONNINFO libpq would refuse, or a host the probe cannot reach the way libpq does."""


class _Option(ctypes.Structure):
    # PQconninfoOption (libpq-fe.h)
    _fields_ = [("keyword", ctypes.c_char_p), ("envvar", ctypes.c_char_p),
                ("compiled", ctypes.c_char_p), ("val", ctypes.c_char_p),
                ("label", ctypes.c_char_p), ("dispchar", ctypes.c_char_p),
                ("dispsize", ctypes.c_int)]


_LIB: ctypes.CDLL | None = None


def libpq_candidates() -> list[str]:
    """The distribution's libpq (the one psql links), then the copy psycopg's wheel bundles."""
    found = ctypes.util.find_library("pq")
    names = [found] if found else []
    names += ["libpq.so.5"]
    names += sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"],
                                           "psycopg_binary.libs", "libpq*.so*")))
    return names


def load_libpq() -> ctypes.CDLL:
    global _LIB
    if _LIB is not None:
        return _LIB
    for name in libpq_candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.PQconninfoFree.argtypes = [ctypes.POINTER(_Option)]
        lib.PQconninfoFree.restype = None
        lib.PQlibVersion.restype = ctypes.c_int
        lib.PQconnectStartParams.argtypes = [ctypes.POINTER(ctypes.c_char_p),
                                             ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
        lib.PQconnectStartParams.restype = ctypes.c_void_p
        lib.PQerrorMessage.argtypes = [ctypes.c_void_p]
        lib.PQerrorMessage.restype = ctypes.c_char_p
        lib.PQconninfo.argtypes = [ctypes.c_void_p]
        lib.PQconninfo.restype = ctypes.POINTER(_Option)
        lib.PQfinish.argtypes = [ctypes.c_void_p]
        lib.PQfinish.restype = None
        _LIB = lib
        return lib
    raise ConninfoError("libpq not found (libpq.so.5): the probe reads CONNINFO with libpq's "
                        "own parser; install the libpq5 package")


def libpq_version() -> int:
    return int(load_libpq().PQlibVersion())


def _collect(options: ctypes._Pointer[_Option]) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while options[i].keyword is not None:
        opt = options[i]
        if opt.val is not None:
            out[opt.keyword.decode()] = opt.val.decode("utf-8", "surrogateescape")
        i += 1
    return out


# A value libpq refuses in its last check of the options (connectOptions2 validates
# target_session_attrs after everything else, then starts connecting): seeing that refusal
# and no other means every earlier rule passed, and that libpq stopped before any socket.
_STOP_KEY = "target_session_attrs"
_STOP_VALUE = "dwsproxy-probe-stop"


def libpq_params(text: str) -> dict[str, str]:
    """Every connection option as libpq resolves CONNINFO, without connecting: CONNINFO (a
    string, a URI, or as psql does, a bare database name) over the service file's entries
    (`service=`/`PGSERVICE`) over the `PG*` variables over compiled-in defaults. libpq's own
    message (`invalid connection option "hots"`, `definition of service "x" not found`, ...)
    when it would refuse."""
    lib = load_libpq()
    keys = (ctypes.c_char_p * 3)(b"dbname", _STOP_KEY.encode(), None)
    values = (ctypes.c_char_p * 3)(text.encode("utf-8", "surrogateescape"),
                                   _STOP_VALUE.encode(), None)
    conn = lib.PQconnectStartParams(keys, values, 1)
    if not conn:
        raise ConninfoError("out of memory")
    try:
        message = (lib.PQerrorMessage(conn) or b"").decode("utf-8", "replace").strip()
        options = lib.PQconninfo(conn)
        params = _collect(options) if options else {}
        if options:
            lib.PQconninfoFree(options)
    finally:
        lib.PQfinish(conn)
    if f'"{_STOP_VALUE}"' not in message:
        raise ConninfoError(message.removeprefix("error: ") or "libpq refused CONNINFO")
    params.pop(_STOP_KEY, None)
    return params


@dataclass(frozen=True)
class Target:
    """One host of the list, as libpq would try it."""

    host: str  # the name checked by verify-full and matched in the password file
    address: str  # what is connected to: hostaddr when given, else host
    port: int
    params: dict[str, str]  # every key, CONNINFO over service over PG* over defaults
    password: str | None

    @property
    def server(self) -> str:
        shown = self.host or self.address
        return f"[{shown}]:{self.port}" if ":" in shown else f"{shown}:{self.port}"


def _split(value: str) -> list[str]:
    return value.split(",")


def resolve(text: str) -> list[Target]:
    """Every host CONNINFO names, with the parameters and password libpq would use for it."""
    params = libpq_params(text)
    hosts = _split(params.get("host", ""))
    addrs = _split(params.get("hostaddr", "")) if params.get("hostaddr") else []
    ports = _split(params.get("port", "") or DEFAULT_PORT)
    if addrs and params.get("host") and len(addrs) != len(hosts):
        raise ConninfoError(f"could not match {len(hosts)} host names to {len(addrs)} "
                            "hostaddr values")
    count = len(addrs) if addrs else len(hosts)
    if len(ports) not in (1, count):
        raise ConninfoError(f"could not match {len(ports)} port numbers to {count} hosts")
    if not params.get("user"):
        raise ConninfoError("no user name: set user= or PGUSER")
    if not params.get("dbname"):
        params["dbname"] = params["user"]  # connectOptions2: the database defaults to the user
    targets = []
    for i in range(count):
        host = hosts[i] if i < len(hosts) and params.get("host") else ""
        addr = addrs[i] if addrs else ""
        port_text = (ports[i] if len(ports) > 1 else ports[0]) or DEFAULT_PORT
        if not addr and (not host or host.startswith(("/", "@"))):
            raise ConninfoError(
                f"host {host or '(none: the Unix-domain socket)'!r} is a Unix-domain socket: "
                "libpq sends no SSLRequest there, so there is nothing to probe; give host= "
                "a name or an address")
        try:
            port = int(port_text)
            if not 1 <= port <= 65535:
                raise ValueError
        except ValueError:
            raise ConninfoError(f'invalid port number: "{port_text}"') from None
        if addr:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ConninfoError(f'could not parse network address "{addr}"') from None
        password = params.get("password") or None
        if password is None:
            password = pgpass_password(_passfile(params), host or addr, port_text,
                                       params["dbname"], params["user"])
        targets.append(Target(host=host, address=addr or host, port=port, params=params,
                              password=password))
    return targets


def _passfile(params: dict[str, str]) -> Path:
    return Path(params.get("passfile") or Path.home() / ".pgpass")


def _field(line: str, pos: int, token: str) -> int | None:
    """fe-connect.c pwdfMatchesString: a field that is `*`, or equals token once backslash
    escapes are undone; the position after its ':' when it matches."""
    if line.startswith("*:", pos):
        return pos + 2
    i, j = pos, 0
    while i < len(line):
        escaped = False
        if line[i] == "\\" and i + 1 < len(line):
            i += 1
            escaped = True
        if line[i] == ":" and not escaped and j == len(token):
            return i + 1
        if j == len(token) or line[i] != token[j]:
            return None
        i += 1
        j += 1
    return None


def pgpass_password(path: Path, host: str, port: str, dbname: str, user: str) -> str | None:
    """The password of the first matching line, or None. Like libpq: a file that is not a
    regular file, or that the group or others may read, is ignored; `localhost` also stands
    for the default socket directory."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            return None
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return None
    for raw in text.split("\n"):
        line = raw.rstrip("\r")
        if not line or line.startswith("#"):
            continue
        pos: int | None = 0
        for token in (host or "localhost", port, dbname, user):
            assert pos is not None
            pos = _field(line, pos, token)
            if pos is None:
                break
        if pos is None:
            continue
        out = []
        i = pos
        while i < len(line) and line[i] != ":":
            if line[i] == "\\" and i + 1 < len(line):
                i += 1
            out.append(line[i])
            i += 1
        return "".join(out)
    return None


def default_file(params: dict[str, str], key: str, name: str) -> str | None:
    """sslrootcert/sslcert/sslkey/sslcrl: the key's value, else ~/.postgresql/NAME; None when
    that file does not exist (libpq then goes on without it)."""
    value = params.get(key) or str(Path.home() / ".postgresql" / name)
    return value if Path(value).is_file() else None
