"""`dwsproxy demo` (`make demo`): throwaway certificates, a throwaway PostgreSQL, the proxy in
front, and Table 3 of the seed observed live with the real `psql`.

Owns: `TempPostgres` (also used by the integration tests), the demo's configs, and the printed
table. Must not be imported by the proxy's serving path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def find_pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class TempPostgres:
    """A PostgreSQL cluster in a temp dir, run as the `postgres` account when we are root
    (PostgreSQL refuses to run as root), trust auth on 127.0.0.1 only."""

    def __init__(self, port: int | None = None, max_connections: int = 100,
                 extra_conf: str = "", hba: str = "",
                 files: dict[str, bytes] | None = None) -> None:
        self.port = port or free_port()
        self.max_connections = max_connections
        self.extra_conf = extra_conf
        self.hba = hba  # replaces pg_hba.conf when given
        self.files = files or {}  # written into the data directory (certificates, keys), 0600
        self.dir = Path(tempfile.mkdtemp(prefix="dwsproxy-pg-"))
        self.data = self.dir / "data"
        self.as_postgres = os.geteuid() == 0
        missing = [b for b in ("initdb", "pg_ctl", "postgres") if not find_pg_binary(b)]
        if missing:
            raise FileNotFoundError(f"PostgreSQL server binaries not found: {missing}")

    def _cmd(self, *argv: str) -> list[str]:
        return (["runuser", "-u", "postgres", "--", *argv] if self.as_postgres else list(argv))

    def start(self) -> TempPostgres:
        if self.as_postgres:
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, "postgres", "postgres")
        initdb = find_pg_binary("initdb")
        assert initdb
        subprocess.run(self._cmd(initdb, "-D", str(self.data), "-U", "postgres",
                                 "--auth=trust", "-E", "UTF8", "--no-sync"),
                       check=True, capture_output=True)
        conf = (f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nmax_connections = "
                f"{self.max_connections}\nfsync = off\nsynchronous_commit = off\n"
                f"full_page_writes = off\nshared_buffers = 64MB\nlog_connections = on\n"
                f"log_disconnections = on\n{self.extra_conf}\n")
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(conf)
        if self.hba:
            (self.data / "pg_hba.conf").write_text(self.hba)
        for name, data in self.files.items():
            path = self.data / name
            path.write_bytes(data)
            os.chmod(path, 0o600)
            if self.as_postgres:
                shutil.chown(path, "postgres", "postgres")
        pg_ctl = find_pg_binary("pg_ctl")
        assert pg_ctl
        subprocess.run(self._cmd(pg_ctl, "-D", str(self.data), "-l", str(self.dir / "log"),
                                 "-w", "-t", "60", "start"), check=True, capture_output=True)
        wait_port(self.port)
        return self

    @property
    def log_path(self) -> Path:
        return self.dir / "log"

    def sql(self, query: str, user: str = "postgres") -> str:
        """Run SQL over the unix socket (never through the proxy)."""
        psql = shutil.which("psql") or find_pg_binary("psql")
        assert psql
        out = subprocess.run(
            self._cmd(psql, "-h", str(self.dir), "-p", str(self.port), "-U", user, "-d",
                      "postgres", "-At", "-v", "ON_ERROR_STOP=1", "-c", query),
            check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self) -> None:
        pg_ctl = find_pg_binary("pg_ctl")
        if pg_ctl and self.data.exists():
            subprocess.run(self._cmd(pg_ctl, "-D", str(self.data), "-m", "immediate", "-w",
                                     "stop"), capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def write_config(path: Path, *, port: int, backend_port: int, certs: Path, ssl: bool,
                 require_ssl: bool, metrics_port: int = 0, extra: str = "",
                 backend_host: str = "127.0.0.1", backend: str = "") -> Path:
    path.write_text(f"""# written by `dwsproxy demo`
[listen]
host = "127.0.0.1"
port = {port}
startup_timeout = 10.0

[backend]
host = "{backend_host}"
port = {backend_port}
{backend}
[tls]
ssl = {str(ssl).lower()}
require_ssl = {str(require_ssl).lower()}
ssl_cert_file = "{certs / 'server.crt'}"
ssl_key_file = "{certs / 'server.key'}"

[metrics]
host = "127.0.0.1"
port = {metrics_port}

[admin]
host = "127.0.0.1"
port = 0  # any free port: a demo must not take a real proxy's 9188
{extra}
""")
    return path


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


def port_taken(port: int) -> str | None:
    """Why 127.0.0.1:`port` cannot be listened on, or None when it can. A port another program
    listens on would answer the demo's own connect test, so it is bound here first."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _last_error(log: Path | None) -> str:
    if log is None or not log.exists():
        return "see its output"
    lines = [ln for ln in log.read_text(errors="replace").splitlines()
             if " error " in ln or "config error" in ln]
    return lines[-1] if lines else f"see {log}"


@contextlib.contextmanager
def running_proxy(config: Path, port: int, log: Path | None = None) -> Iterator[
        subprocess.Popen[bytes]]:
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--config", str(config)],
                            stdout=out, stderr=out)
    try:
        # Up means this process listens: a proxy that exited (cannot bind, bad config) is an
        # error, whatever else may answer on the port.
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise DemoError(f"the proxy on 127.0.0.1:{port} exited with status "
                                f"{proc.returncode}: {_last_error(log)}")
            if log is None or f"(pid {proc.pid})" in log.read_text(errors="replace"):
                try:
                    wait_port(port, 0.5)
                    break
                except TimeoutError:
                    pass
            if time.monotonic() > deadline:
                raise DemoError(f"the proxy did not listen on 127.0.0.1:{port} in 15s: "
                                f"{_last_error(log)}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()  # type: ignore[union-attr]


def psql_try(port: int, sslmode: str, rootcert: Path) -> tuple[str, str]:
    """Connect with the real psql; returns (result, text): result is TLS, plaintext or
    refused, as the client saw it (psql's \\conninfo names the SSL protocol when in use)."""
    psql = shutil.which("psql") or find_pg_binary("psql")
    assert psql
    conninfo = (f"host=localhost port={port} user=postgres dbname=postgres sslmode={sslmode} "
                f"sslrootcert={rootcert} connect_timeout=10")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.run([psql, conninfo, "-X", "-c", "\\conninfo"], capture_output=True,
                          text=True, env=env, timeout=30)
    if proc.returncode != 0:
        # "psql: error: connection to server at … failed: FATAL:  …": keep what follows.
        first = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else ""
        return "refused", first.rsplit("failed: ", 1)[-1]
    if "SSL connection (protocol:" in proc.stdout:
        line = next(ln for ln in proc.stdout.splitlines() if "SSL connection" in ln)
        return "TLS", line.strip()
    return "plaintext", ""


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from . import certs as certs_mod

    if not args.no_wait:  # the fixed ports of the proxy left up: say so now, not at the end
        for port, option in ((args.port, "--port"), (args.metrics_port, "--metrics-port")):
            why = port_taken(port)
            if why is not None:
                raise DemoError(
                    f"cannot listen on 127.0.0.1:{port}: {why}. Another dwsproxy or demo may "
                    f"be running; choose another port with {option} "
                    f"(make demo DEMO_ARGS='{option} {port + 1}')")
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    certs = work / "certs"
    if not (certs / "server.crt").exists():
        certs_mod.init(certs)
    print(f"demo: certificates in {certs}")
    pg = TempPostgres()
    try:
        pg.start()
        print(f"demo: throwaway PostgreSQL on 127.0.0.1:{pg.port} ({pg.dir})")
        rows = []
        failures = 0
        print("\nTable 3, observed live with psql (libpq) through dwsproxy:\n")
        print(f"{'ssl':<4} {'require_ssl':<12} {'sslmode':<12} {'observed':<10} details")
        print("-" * 100)
        # ssl off with require_ssl on is refused by check-config (the seed's "off | any" rows
        # are the same with either value): three proxies, 18 cells.
        for ssl_on, require in ((True, True), (True, False), (False, False)):
            port = free_port()
            cfg = write_config(work / "table3.toml", port=port, backend_port=pg.port,
                               certs=certs, ssl=ssl_on, require_ssl=require)
            with running_proxy(cfg, port, work / "proxy.log"):
                for mode in SSLMODES:
                    result, text = psql_try(port, mode, certs / "cacert.pem")
                    want = expected(ssl_on, require, mode)
                    mark = "ok" if result == want else f"MISMATCH (want {want})"
                    failures += result != want
                    rows.append((ssl_on, require, mode, result))
                    print(f"{'on' if ssl_on else 'off':<4} "
                          f"{('on' if require else 'off') if ssl_on else 'any':<12} "
                          f"{mode:<12} {result:<10} {mark}  {text[:90]}")
        print("-" * 100)
        print(f"{len(rows) - failures}/{len(rows)} cells as the seed's Table 3 says")
        failures += not second_hop(work, certs)
        # --no-wait (tests, CI) must not take the fixed ports a person's demo would
        port, metrics_port = ((free_port(), free_port()) if args.no_wait
                              else (args.port, args.metrics_port))
        cfg = write_config(work / "dwsproxy.toml", port=port, backend_port=pg.port,
                           certs=certs, ssl=True, require_ssl=True, metrics_port=metrics_port)
        with running_proxy(cfg, port, work / "proxy.log") as proc:
            failures += not probe_demo(port, certs)
            if args.no_wait:
                return 1 if failures else 0
            print(f"\ndwsproxy is up with require_ssl = true on 127.0.0.1:{args.port} "
                  f"(metrics: http://127.0.0.1:{metrics_port}/metrics). Try:\n"
                  f"  psql \"host=localhost port={args.port} user=postgres dbname=postgres "
                  f"sslmode=verify-full sslrootcert={certs / 'cacert.pem'}\"\n"
                  f"Ctrl-C stops the proxy and the throwaway PostgreSQL.")
            try:
                proc.wait()
            except KeyboardInterrupt:
                print("\ndemo: stopping")
        return 1 if failures else 0
    finally:
        pg.stop()


SECOND_HOP_HBA = """local all all trust
hostssl all all 127.0.0.1/32 trust clientcert=verify-full
hostnossl all all 127.0.0.1/32 reject
"""


def second_hop(work: Path, certs: Path) -> bool:
    """A throwaway PostgreSQL that accepts only `hostssl … clientcert=verify-full`, the proxy
    in front with backend verify-full and the client certificate CN=postgres; the database's
    own pg_stat_ssl row is the evidence."""
    files = {"server.crt": (certs / "server.crt").read_bytes(),
             "server.key": (certs / "server.key").read_bytes(),
             "root.crt": (certs / "cacert.pem").read_bytes()}
    db = TempPostgres(hba=SECOND_HOP_HBA, files=files, extra_conf=(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
        "ssl_ca_file = 'root.crt'\n"))
    print("\nThe second hop: a PostgreSQL that only takes TLS with a client certificate "
          "(hostssl ... clientcert=verify-full),\nthe proxy in front with [backend] sslmode = "
          "\"verify-full\" and sslcert = client.crt (CN=postgres):\n")
    try:
        db.start()
        port = free_port()
        backend = (f'sslmode = "verify-full"\nsslrootcert = "{certs / "cacert.pem"}"\n'
                   f'sslcert = "{certs / "client.crt"}"\nsslkey = "{certs / "client.key"}"\n')
        cfg = write_config(work / "second-hop.toml", port=port, backend_port=db.port,
                           certs=certs, ssl=True, require_ssl=True, backend_host="localhost",
                           backend=backend)
        psql = shutil.which("psql") or find_pg_binary("psql")
        assert psql
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        with running_proxy(cfg, port, work / "proxy.log"):
            query = ("SELECT 'pg_stat_ssl on the database: ssl=' || ssl || ', ' || version "
                     "|| ', client_dn=' || client_dn FROM pg_stat_ssl "
                     "WHERE pid = pg_backend_pid()")
            proc = subprocess.run(
                [psql, f"host=localhost port={port} user=postgres dbname=postgres "
                 f"sslmode=verify-full sslrootcert={certs / 'cacert.pem'}", "-XAtc", query],
                capture_output=True, text=True, env=env, timeout=30)
        direct = subprocess.run(
            [psql, f"host=127.0.0.1 port={db.port} user=postgres dbname=postgres "
             "sslmode=disable", "-XAtc", "SELECT 1"], capture_output=True, text=True, env=env,
            timeout=30)
    finally:
        db.stop()
    ok = proc.returncode == 0 and "ssl=true" in proc.stdout and direct.returncode != 0
    print(f"  through dwsproxy: {proc.stdout.strip() or proc.stderr.strip()}")
    print(f"  straight to the database in plaintext: "
          f"{'refused' if direct.returncode else 'ACCEPTED (unexpected)'}")
    print(f"  second hop: {'ok' if ok else 'FAILED'}")
    return ok


def probe_demo(port: int, certs: Path) -> bool:
    """`dwsproxy probe` of the proxy just started: the same Table 3 row, seen from outside."""
    conninfo = (f"host=localhost port={port} user=postgres dbname=postgres "
                f"sslrootcert={certs / 'cacert.pem'}")
    print(f"\n$ dwsproxy probe \"{conninfo}\" --expect require_ssl=on --expect min_tls=TLSv1.2\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.run([sys.executable, "-m", "proxy", "probe", conninfo, "--expect",
                           "require_ssl=on", "--expect", "min_tls=TLSv1.2"], env=env,
                          capture_output=True, text=True, timeout=60)
    print(proc.stdout + proc.stderr, end="")
    print(f"  probe: {'ok' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}")
    return proc.returncode == 0


def expected(ssl_on: bool, require_ssl: bool, sslmode: str) -> str:
    """Table 3 of the seed, as the demo prints it."""
    if not ssl_on:
        return "plaintext" if sslmode in ("disable", "allow", "prefer") else "refused"
    if sslmode == "disable":
        return "refused" if require_ssl else "plaintext"
    if sslmode == "allow":
        return "TLS" if require_ssl else "plaintext"
    return "TLS"
