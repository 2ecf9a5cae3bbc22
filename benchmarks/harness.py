"""Shared set-up for the benchmarks: a throwaway PostgreSQL with TLS on, a PgBouncer and one or
more dwsproxy instances in front of it, all on 127.0.0.1, and the clients that measure them.

Used by `bench.py` (the comparison table) and `profile.py` (py-spy under pgbench). Everything
started here is owned by a `Stack` and stopped by `Stack.close()`, which the callers run in a
`finally`. No traffic ever leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `proxy` is installed editable, but do not depend on it
    sys.path.insert(0, str(REPO))

from proxy.tools import certs as certs_mod  # noqa: E402
from proxy.tools.demo import TempPostgres, find_pg_binary, free_port  # noqa: E402

HOST = "127.0.0.1"  # the only address any benchmark traffic goes to
PG_MAX_CONNECTIONS = 1200
PGBOUNCER_MAX_CLIENTS = 1200
PGBOUNCER_POOL_SIZE = 1150


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None)


def client_env() -> dict[str, str]:
    """The environment for libpq clients: no inherited PG* settings, TLS required."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGSSLMODE="require", PGUSER="postgres", PGDATABASE="postgres",
               PGCONNECT_TIMEOUT="15", PGAPPNAME="dwsproxy-bench")
    return env


def conninfo(port: int, **extra: str) -> str:
    parts = {"host": HOST, "port": str(port), "user": "postgres", "dbname": "postgres",
             "sslmode": "require", **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())


# --- processes ---------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """All descendants of `pid`, from /proc (no psutil needed)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of one process in KiB; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except OSError:
        pass
    return rss, pss


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_queue_wait(pid: int) -> float:
    """Seconds the process's main thread (where the proxies do their work) has spent runnable
    but waiting for a CPU (/proc/PID/schedstat, second field); NaN if it cannot be read (the
    process is gone, or the kernel keeps no schedstats), so that the figure says n/a."""
    try:
        with open(f"/proc/{pid}/schedstat") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return math.nan


def stop_process(proc: subprocess.Popen, name: str, timeout: float = 15.0,
                 extra_pids: list[int] | None = None) -> None:
    """SIGTERM, wait, then SIGKILL the process and any descendants we recorded."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{name} did not stop within {timeout}s: killing it")
            proc.kill()
            proc.wait(5)
        except ProcessLookupError:
            pass
    for pid in extra_pids or []:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# --- targets -----------------------------------------------------------------------------------


def knows_admin(tree: Path) -> bool:
    """Whether the proxy in this source tree has the `[admin]` listener (default port 9188)."""
    return any("class AdminConfig" in f.read_text(errors="replace")
               for f in (tree / "proxy").rglob("*.py"))


@dataclass
class Target:
    name: str  # "direct", "pgbouncer", "dwsproxy", "dwsproxy-w1", ...
    port: int
    proc: subprocess.Popen | None = None  # what serves it (None for direct: the postmaster)
    workers: str = ""
    log_path: Path | None = None
    known_children: list[int] = field(default_factory=list)

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *children_of(self.proc.pid)]

    def memory(self) -> dict[str, float | int]:
        pids = self.pids()
        rss = pss = 0
        for pid in pids:
            r, p = memory_kib(pid)
            rss += r
            pss += p
        return {"processes": len(pids), "rss_mb": round(rss / 1024, 1),
                "pss_mb": round(pss / 1024, 1)}


class Stack:
    """PostgreSQL (TLS on), optionally a PgBouncer, and dwsproxy instances, on 127.0.0.1."""

    def __init__(self, work: Path | None = None, proxy_src: Path | None = None,
                 proxy_python: str = "") -> None:
        self.proxy_src = proxy_src  # None: the repo's own proxy/ (the venv's dwsproxy)
        self.proxy_python = proxy_python  # "": the venv's interpreter
        self._compiled: set[tuple[str, str]] = set()
        self.work = work or Path(tempfile.mkdtemp(prefix="dwsproxy-bench-"))
        os.chmod(self.work, 0o755)  # PgBouncer runs as `postgres` and reads its files here
        self.certs = self.work / "certs"
        self.pg: TempPostgres | None = None
        self.targets: dict[str, Target] = {}
        self._procs: list[tuple[str, subprocess.Popen, Target | None]] = []

    # -- PostgreSQL --
    def start_postgres(self) -> Target:
        certs_mod.init(self.certs)
        pg = TempPostgres(max_connections=PG_MAX_CONNECTIONS, extra_conf="")
        self.pg = pg
        # PostgreSQL refuses a key that is group/world readable or not its own: copy the pair
        # next to the cluster, owned by the account that runs it, 0600.
        crt, key = pg.dir / "server.crt", pg.dir / "server.key"
        shutil.copyfile(self.certs / "server.crt", crt)
        shutil.copyfile(self.certs / "server.key", key)
        os.chmod(key, 0o600)
        os.chmod(crt, 0o644)
        if pg.as_postgres:
            for p in (crt, key):
                shutil.chown(p, "postgres", "postgres")
        pg.extra_conf = (
            f"ssl = on\nssl_cert_file = '{crt}'\nssl_key_file = '{key}'\n"
            # the benchmark opens and closes thousands of sessions: do not log each one
            "log_connections = off\nlog_disconnections = off\n")
        pg.start()
        target = Target("direct", pg.port)
        self.targets["direct"] = target
        return target

    def pg_sql(self, query: str) -> str:
        assert self.pg is not None
        return self.pg.sql(query)

    def postmaster_pid(self) -> int:
        assert self.pg is not None
        return int((self.pg.data / "postmaster.pid").read_text().split()[0])

    @property
    def pg_socket_dir(self) -> Path:
        """The folder of the cluster's Unix socket (`.s.PGSQL.PORT`): libpq's and PgBouncer's
        `host=/folder`, dwsproxy's `[backend] host = "/folder"`. The cluster runs as
        `postgres`; the folder is 0755 and the socket 0777 (PostgreSQL's default), so the
        proxies reach it as root (dwsproxy) and as `postgres` (PgBouncer)."""
        assert self.pg is not None
        return self.pg.dir

    def backend_count(self) -> int:
        """Client backends connected to the cluster now, over TCP and over the Unix socket
        (the sidecar targets' servers connect there), our own psql excluded."""
        return int(self.pg_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()"))

    def wait_backends_below(self, limit: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        count = self.backend_count()
        while count >= limit and time.monotonic() < deadline:
            time.sleep(0.5)
            count = self.backend_count()
        return count

    # -- PgBouncer --
    def start_pgbouncer(self, name: str = "pgbouncer", once: bool = False,
                        server: str = "tcp") -> Target:
        """PgBouncer in session pooling; `once`: with `server_lifetime = 0`, so that every
        client gets a server connection of its own, opened for it and closed after it (what
        dwsproxy does), instead of one that earlier clients left in the pool. `server`: how it
        reaches PostgreSQL: "tcp" (plaintext over 127.0.0.1), "unix" (the cluster's Unix
        socket: the sidecar layout) or "tls" (127.0.0.1 with `server_tls_sslmode =
        verify-full`, the certificate checked against the CA for the name 127.0.0.1, which its
        IP SAN carries: what dwsproxy-btls does)."""
        assert self.pg is not None
        if server not in ("tcp", "unix", "tls"):
            raise ValueError(f"server: {server!r}")
        binary = pgbouncer_binary()
        if binary is None:
            raise FileNotFoundError("pgbouncer not installed (apt-get install -y pgbouncer)")
        pdir = self.work / name
        pdir.mkdir()
        port = free_port()
        # PgBouncer refuses to run as root: it runs as `postgres`, and reads its own copy of the
        # certificate and key (the cluster's copy, already 0600 and owned by postgres).
        crt, key = self.pg.dir / "server.crt", self.pg.dir / "server.key"
        (pdir / "userlist.txt").write_text('"postgres" ""\n')
        server_host = str(self.pg_socket_dir) if server == "unix" else HOST
        if server == "tls":
            # its own copy of the CA certificate, in a folder it owns
            shutil.copyfile(self.certs / "cacert.pem", pdir / "cacert.pem")
            server_tls = (f"server_tls_sslmode = verify-full\n"
                          f"server_tls_ca_file = {pdir / 'cacert.pem'}")
        else:
            server_tls = "server_tls_sslmode = disable"
        (pdir / "pgbouncer.ini").write_text(f"""[databases]
* = host={server_host} port={self.pg.port}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {pdir / 'userlist.txt'}
admin_users = postgres
pool_mode = session
max_client_conn = {PGBOUNCER_MAX_CLIENTS}
default_pool_size = {PGBOUNCER_POOL_SIZE}
max_db_connections = 0
; give server connections back quickly so that PostgreSQL has room for the next target's
; 1000 idle sessions (session pooling keeps them otherwise for 600 s)
server_idle_timeout = 2
server_check_delay = 30
{"server_lifetime = 0" if once else ""}
ignore_startup_parameters = extra_float_digits,options
client_tls_sslmode = require
client_tls_cert_file = {crt}
client_tls_key_file = {key}
{server_tls}
log_connections = 0
log_disconnections = 0
logfile = {pdir / 'pgbouncer.log'}
pidfile = {pdir / 'pgbouncer.pid'}
""")
        if os.geteuid() == 0:
            shutil.chown(pdir, "postgres", "postgres")
            for p in pdir.iterdir():
                shutil.chown(p, "postgres", "postgres")
            user: str | None = "postgres"
        else:
            user = None
        proc = subprocess.Popen([binary, str(pdir / "pgbouncer.ini")], user=user,
                                group=user, stdout=subprocess.DEVNULL,
                                stderr=open(pdir / "stderr.log", "wb"))
        target = Target(name, port, proc=proc, log_path=pdir / "stderr.log")
        self._procs.append((name, proc, target))
        self._wait_up(target)
        self.targets[name] = target
        return target

    # -- dwsproxy --
    def start_dwsproxy(self, name: str, workers: str, src: Path | None = None,
                       python: str = "", backend_tls: bool = False,
                       backend_unix: bool = False) -> Target:
        """`backend_tls`: verify-full TLS to PostgreSQL over 127.0.0.1; `backend_unix`: the
        cluster's Unix socket (`[backend] host` a socket folder: the sidecar layout)."""
        assert self.pg is not None
        if backend_tls and backend_unix:
            raise ValueError("TLS over a Unix socket: PostgreSQL does not offer it")
        port, mport, aport = free_port(), free_port(), free_port()
        workers_toml = '"auto"' if workers == "auto" else str(int(workers))
        cfg = self.work / f"{name}.toml"
        # [admin] stays on (the default), each instance on a port of its own: the default 9188
        # would be taken by the first instance and refuse the next. A tree from before [admin]
        # (a --baseline-src) would refuse the section: it gets none.
        admin_toml = (f'\n[admin]\nhost = "{HOST}"\nport = {aport}\n'
                      if knows_admin(src or self.proxy_src or REPO) else "")
        # the second hop over TLS to the same PostgreSQL, its certificate checked (IP SAN)
        backend_tls_toml = (f'sslmode = "verify-full"\n'
                            f'sslrootcert = "{self.certs / "cacert.pem"}"')
        cfg.write_text(f"""# written by benchmarks/harness.py
[listen]
host = "{HOST}"
port = {port}
workers = {workers_toml}
max_connections = 10000
startup_timeout = 10.0
shutdown_grace = 1.0

[backend]
host = "{self.pg_socket_dir if backend_unix else HOST}"
port = {self.pg.port}
{backend_tls_toml if backend_tls else 'sslmode = "disable"'}

[tls]
ssl = true
require_ssl = true
ssl_cert_file = "{self.certs / 'server.crt'}"
ssl_key_file = "{self.certs / 'server.key'}"

[metrics]
host = "{HOST}"
port = {mport}

{admin_toml}""")
        exe = REPO / ".venv" / "bin" / "dwsproxy"
        env = dict(os.environ)
        src = src or self.proxy_src
        python = python or self.proxy_python
        if src is not None or python:
            # a candidate tree (e.g. a scratch copy with a change to try) or another
            # interpreter: `python -m proxy.cli` from the tree; workers inherit PYTHONPATH
            src = src or REPO
            argv = [python or sys.executable, "-m", "proxy.cli"]
            env["PYTHONPATH"] = str(src)
            cwd = str(src)
        else:
            argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "proxy.cli"]
            cwd = str(REPO)
        # with the interpreter that runs it (the console script's is the venv's)
        self._compile(src or REPO, str(REPO / ".venv" / "bin" / "python")
                      if argv[0] == str(exe) else argv[0])
        logp = self.work / f"{name}.log"
        proc = subprocess.Popen([*argv, "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=open(logp, "wb"), cwd=cwd, env=env)
        target = Target(name, port, proc=proc, workers=workers, log_path=logp)
        self._procs.append((name, proc, target))
        self._wait_up(target)
        if workers != "1":
            # The other workers start (and bind with SO_REUSEPORT) after the main process
            # listens: wait until `workers` processes exist (the main one may itself be a
            # worker, or only supervise) and the process tree has stopped changing for 1 s.
            want = (os.cpu_count() or 1) if workers == "auto" else int(workers)
            deadline = time.monotonic() + 20
            last, stable_since = -1, time.monotonic()
            while time.monotonic() < deadline:
                n = 1 + len(children_of(proc.pid))
                if n != last:
                    last, stable_since = n, time.monotonic()
                elif n >= want and time.monotonic() - stable_since >= 1.0:
                    break
                time.sleep(0.1)
        target.known_children = children_of(proc.pid)
        self.targets[name] = target
        return target

    def _compile(self, tree: Path, python: str) -> None:
        """Bytecode for the tree's proxy package, as `pip install` writes it for an installed
        proxy. A source tree under PYTHONDONTWRITEBYTECODE=1 (set on these machines) has none,
        and then every start compiles every module, which costs time and leaves ~1.2 MB of
        the compiler's garbage in the process's baseline RSS."""
        key = (str(tree), python)
        if key not in self._compiled:
            subprocess.run([python, "-m", "compileall", "-q", str(tree / "proxy")], check=True,
                           stdout=subprocess.DEVNULL)
            self._compiled.add(key)

    def _wait_up(self, target: Target) -> None:
        assert target.proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if target.proc.poll() is not None:
                tail = target.log_path.read_text()[-2000:] if target.log_path and \
                    target.log_path.exists() else ""
                raise RuntimeError(f"{target.name} exited with {target.proc.returncode}\n{tail}")
            try:
                with socket.create_connection((HOST, target.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{target.name} does not listen on {HOST}:{target.port}")

    def check_tls(self, target: Target) -> str:
        """One psql session over sslmode=require; returns what libpq says about TLS."""
        psql = shutil.which("psql") or find_pg_binary("psql")
        assert psql
        out = subprocess.run([psql, conninfo(target.port), "-X", "-At", "-c", "\\conninfo"],
                             env=client_env(), capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{target.name}: psql failed: {out.stderr.strip()}")
        m = re.search(r"SSL connection \((.*?)\)", out.stdout)
        if not m:
            raise RuntimeError(f"{target.name}: psql connected without TLS: {out.stdout!r}")
        return m.group(1)

    def close(self) -> None:
        for name, proc, target in reversed(self._procs):
            extra = list(target.known_children) if target else []
            try:
                stop_process(proc, name, extra_pids=extra)
            except Exception as exc:  # keep stopping the others
                log(f"stopping {name}: {exc!r}")
        self._procs.clear()
        if self.pg is not None:
            self.pg.stop()
            self.pg = None
        shutil.rmtree(self.work, ignore_errors=True)


# --- clients -----------------------------------------------------------------------------------

def tls_resumption(port: int, version: ssl.TLSVersion) -> bool:
    """Whether a PostgreSQL-protocol server on 127.0.0.1:port resumes a TLS session of this
    version: two connections (SSLRequest, handshake, a start-up packet and its answer, which
    also carries any TLS 1.3 tickets), the second offering the first one's session. What a
    client-side session cache toward that server could gain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only resumption is asked
    ctx.minimum_version = ctx.maximum_version = version
    session: ssl.SSLSession | None = None
    reused = False
    for _ in range(2):
        with socket.create_connection((HOST, port), timeout=10) as raw:
            raw.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))
            if raw.recv(1) != b"S":
                raise RuntimeError(f"port {port} does not offer TLS")
            with ctx.wrap_socket(raw, session=session) as tls:
                body = (196608).to_bytes(4, "big") + b"user\0postgres\0\0"
                tls.sendall((len(body) + 4).to_bytes(4, "big") + body)
                tls.recv(65536)  # the authentication answer, after any tickets
                reused = tls.session_reused
                session = tls.session
    return reused



PGBENCH_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)


def pgbench_argv(port: int, *args: str) -> list[str]:
    """pgbench against 127.0.0.1:port as `postgres`, database `postgres`."""
    exe = shutil.which("pgbench") or find_pg_binary("pgbench")
    assert exe, "pgbench not found"
    return [exe, "-h", HOST, "-p", str(port), "-U", "postgres", *args, "postgres"]


def pgbench(port: int, *args: str, timeout: float = 120.0) -> tuple[float, str]:
    """Run pgbench against 127.0.0.1:port over TLS; returns (tps, output)."""
    out = subprocess.run(pgbench_argv(port, *args), env=client_env(), capture_output=True,
                         text=True, timeout=timeout)
    text = out.stdout + out.stderr
    m = PGBENCH_TPS.search(out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"pgbench {' '.join(args)} on port {port} failed "
                           f"(exit {out.returncode}):\n{text[-2000:]}")
    return float(m.group(1)), text


PGBENCH_PROGRESS = re.compile(r"^progress: ([0-9.]+) s, ([0-9.]+) tps")
PGBENCH_TXNS = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


class Progress:
    """Transactions so far, from pgbench's `-P 1` lines. Each line gives the time since the
    run began and the rate over the interval since the line before, whose length is not always
    one second: pgbench's clock starts before its clients connect, and its first line comes
    when they are (at 1.3 s, say, for [0, 1.3]); the next is still due at 2.0 s, and covers
    [1.3, 2.0]."""

    def __init__(self) -> None:
        self.seconds = 0.0  # of the last line
        self.transactions = 0.0  # up to it

    def feed(self, line: str) -> bool:
        """Take one line of pgbench's stderr; False when it is not a progress line."""
        m = PGBENCH_PROGRESS.match(line)
        if m is None:
            return False
        at, tps = float(m.group(1)), float(m.group(2))
        self.transactions += tps * max(0.0, at - self.seconds)
        self.seconds = at
        return True


@dataclass
class Steady:
    """What the proxy spent while pgbench ran, from `skip` seconds into the run to its end,
    and the transactions pgbench made in that time: its clients are all connected by then."""
    cpu_s: float
    wait_s: float
    transactions: float


def pgbench_steady(port: int, pids: list[int], *args: str, skip: float = 2.0,
                   timeout: float = 120.0) -> tuple[float, str, Steady | None]:
    """pgbench as `pgbench()` does, with -P 1; the CPU time (and run-queue wait) of `pids`
    is read when pgbench reports the first second at or past `skip`, and again when it ends.
    pgbench's clock starts before its clients connect (threadRun), so a run's first seconds
    carry the connection set-up, which a whole-run figure spreads over the transactions (at
    256 clients they took 1.2-1.4 s here: see "whole_run" beside each figure in
    results/latest.json). None if no progress line came past `skip`."""
    argv = pgbench_argv(port, "-P", "1", *args)

    def spent() -> tuple[float, float]:
        return (sum(cpu_seconds(pid) for pid in pids), sum(run_queue_wait(pid) for pid in pids))

    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(argv, env=client_env(), stdout=stdout, stderr=subprocess.PIPE,
                                text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        at: tuple[float, float] | None = None
        progress, before = Progress(), 0.0  # transactions reported up to `at`
        errors: list[str] = []
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if not progress.feed(line):
                    errors.append(line)
                elif at is None and progress.seconds >= skip:
                    at, before = spent(), progress.transactions
            proc.wait()
            end = spent()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stdout.seek(0)
        out = stdout.read()
    text = out + "".join(errors)
    m = PGBENCH_TPS.search(out)
    n = PGBENCH_TXNS.search(out)
    if proc.returncode != 0 or not m or not n:
        raise RuntimeError(f"pgbench {' '.join(args)} on port {port} failed "
                           f"(exit {proc.returncode}):\n{text[-2000:]}")
    steady = None
    if at is not None and int(n.group(1)) > before:
        steady = Steady(end[0] - at[0], end[1] - at[1], int(n.group(1)) - before)
    return float(m.group(1)), text, steady


def transactions(out: str) -> int:
    """"number of transactions actually processed" from pgbench's summary; 0 if absent."""
    m = PGBENCH_TXNS.search(out)
    return int(m.group(1)) if m else 0


PGBENCH_SETUP = re.compile(r"^initial connection time = ([0-9.]+) ms", re.M)


def initial_connection_ms(out: str) -> float | None:
    """How long pgbench's clients took to connect (pgbench's summary; not with -C)."""
    m = PGBENCH_SETUP.search(out)
    return float(m.group(1)) if m else None


def read_latency_logs(folder: Path, prefix: str) -> list[float]:
    """Per-transaction latencies (ms) from the files `pgbench --log --log-prefix` wrote: one
    line per transaction, `client_id transaction_no time_us script_no epoch epoch_us`."""
    out: list[float] = []
    for f in sorted(folder.glob(prefix + ".*")):
        for line in f.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                out.append(int(fields[2]) / 1000.0)
    return out


def percentile(values: list[float], pct: float) -> float | None:
    """The nearest-rank percentile (pct in 0..100) of values, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


def pgbench_init(port: int, scale: int = 10) -> str:
    """pgbench -i -s SCALE over TLS (run once, directly against PostgreSQL)."""
    out = subprocess.run(pgbench_argv(port, "-i", "-s", str(scale), "-q"), env=client_env(),
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {out.stderr[-2000:]}")
    return out.stderr


def copy_out(port: int, rows: int, width: int = 1000, timeout: float = 300.0) -> tuple[float,
                                                                                       int]:
    """COPY ~rows*(width+1) bytes TO STDOUT through psql (TLS), output to /dev/null.
    Returns (seconds, bytes)."""
    psql = shutil.which("psql") or find_pg_binary("psql")
    assert psql
    query = (f"COPY (SELECT repeat('x', {width}) FROM generate_series(1, {rows})) TO STDOUT")
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        out = subprocess.run([psql, conninfo(port), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                              "-c", query], env=client_env(), stdout=devnull,
                             stderr=subprocess.PIPE, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"COPY through port {port} failed: {out.stderr.decode()[-2000:]}")
    return elapsed, rows * (width + 1)


def copy_bytes_check(port: int, rows: int = 1000, width: int = 1000) -> int:
    """Count the bytes a small COPY really produces (to check the size formula once)."""
    psql = shutil.which("psql") or find_pg_binary("psql")
    assert psql
    query = (f"COPY (SELECT repeat('x', {width}) FROM generate_series(1, {rows})) TO STDOUT")
    out = subprocess.run([psql, conninfo(port), "-X", "-q", "-c", query], env=client_env(),
                         capture_output=True, timeout=60, check=True)
    return len(out.stdout)


async def _hold_sessions(port: int, count: int, concurrency: int, on_open) -> dict:
    import psycopg

    sem = asyncio.Semaphore(concurrency)
    conns: list = []
    pids: set[int] = set()
    errors: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    conninfo(port, application_name="dwsproxy-bench-idle"), autocommit=True)
            except Exception as exc:  # counted and reported
                errors.append(repr(exc))
                return
            conns.append(conn)
            cur = await conn.execute("SELECT pg_backend_pid(), ssl FROM pg_stat_ssl "
                                     "WHERE pid = pg_backend_pid()")
            row = await cur.fetchone()
            pids.add(row[0])
            if conn.pgconn.ssl_in_use != 1:
                errors.append("session without TLS")

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one() for _ in range(count)))
        opened = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # let the proxy settle (buffers freed, GC)
        measured = on_open(len(conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return {"opened": len(conns), "backend_pids": len(pids), "open_seconds": round(opened, 2),
            "errors": errors[:5], "error_count": len(errors), **measured}


def hold_idle_sessions(port: int, count: int, on_open, concurrency: int = 32) -> dict:
    """Open `count` TLS sessions (startup + auth + one query each, each on its own
    PostgreSQL backend), call on_open(n) while they are all held idle, close them."""
    return asyncio.run(_hold_sessions(port, count, concurrency, on_open))


# --- machine -----------------------------------------------------------------------------------


def machine_info(proxy_python: str = "") -> dict[str, str | int]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    pgb = pgbouncer_binary()
    # the versions of the interpreter that runs the proxy, which may not be this one
    probe = ("import sys, ssl\ntry:\n import uvloop; uv = uvloop.__version__\n"
             "except ImportError:\n uv = 'not installed'\n"
             "print(sys.version.split()[0], sys.executable, uv, ssl.OPENSSL_VERSION, sep='|')")
    try:
        out = subprocess.run([proxy_python or sys.executable, "-c", probe], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        py, py_exe, uv, openssl = out.split("|")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        py, py_exe, uv, openssl = "unknown", proxy_python, "unknown", "unknown"
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    try:
        git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "proxy"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            git += " (proxy/ modified)"
    except OSError:
        git = "unknown"
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nproc": os.cpu_count() or 0,
        "cpu_model": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": py,
        "python_executable": py_exe,
        "uvloop": uv,
        "openssl_python": openssl,
        "pgbouncer": version([pgb, "--version"]) if pgb else "not installed",
        "postgresql": version([find_pg_binary("postgres") or "postgres", "--version"]),
        "pgbench": version([shutil.which("pgbench") or "pgbench", "--version"]),
        "git_commit": git,
    }
