"""Fixtures for integration tests: a real PostgreSQL, throwaway certificates, and the real
`dwsproxy` command run as a subprocess in front of it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.protocol import wire
from proxy.tools import certs
from proxy.tools.demo import TempPostgres, find_pg_binary, free_port, wait_port

REPO = Path(__file__).resolve().parents[2]
PSQL = shutil.which("psql") or find_pg_binary("psql")
JAVA = shutil.which("java")
JAVAC = shutil.which("javac")
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
JDBC_PACKAGE = "libpostgresql-jdbc-java"
JDBC_PROBE_SOURCE = Path(__file__).resolve().parent / "java" / "JdbcProbe.java"


@pytest.fixture(scope="session")
def pg() -> Iterator[TempPostgres]:
    missing = [b for b in ("initdb", "pg_ctl", "postgres") if not find_pg_binary(b)]
    if missing:
        pytest.skip(f"PostgreSQL server binaries missing: {missing} (make test installs them)")
    server = TempPostgres(max_connections=300).start()
    server.sql("CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN")
    server.sql("CREATE DATABASE app")
    yield server
    server.stop()


class StandbyPostgres(TempPostgres):
    """A streaming standby of `primary`, made as an operator would: pg_basebackup -R (the
    standby.signal and primary_conninfo it writes), then started on a port of its own."""

    def __init__(self, primary: TempPostgres) -> None:
        super().__init__()
        self.primary = primary

    def start(self) -> StandbyPostgres:
        if self.as_postgres:
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, "postgres", "postgres")
        basebackup = find_pg_binary("pg_basebackup")
        assert basebackup, "pg_basebackup not found"
        subprocess.run(self._cmd(basebackup, "-h", "127.0.0.1", "-p", str(self.primary.port),
                                 "-U", "postgres", "-D", str(self.data), "-R",
                                 "--wal-method=stream", "--checkpoint=fast", "--no-sync"),
                       check=True, capture_output=True)
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(f"port = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                     "hot_standby = on\n")
        pg_ctl = find_pg_binary("pg_ctl")
        assert pg_ctl
        subprocess.run(self._cmd(pg_ctl, "-D", str(self.data), "-l", str(self.dir / "log"),
                                 "-w", "-t", "60", "start"), check=True, capture_output=True)
        wait_port(self.port)
        return self


@pytest.fixture(scope="session")
def primary_standby() -> Iterator[tuple[TempPostgres, StandbyPostgres]]:
    """A primary and its streaming standby (pg_basebackup -R), with roles `alice` and
    `health` (the proxy's own checks) created on the primary and replicated."""
    missing = [b for b in ("initdb", "pg_ctl", "postgres", "pg_basebackup")
               if not find_pg_binary(b)]
    if missing:
        pytest.skip(f"PostgreSQL server binaries missing: {missing} (make test installs them)")
    primary = TempPostgres(extra_conf="wal_level = replica\nmax_wal_senders = 5\n").start()
    primary.sql("CREATE ROLE alice LOGIN; CREATE ROLE health LOGIN")
    standby = StandbyPostgres(primary)
    try:
        standby.start()
        deadline = time.monotonic() + 30
        while standby.sql("SELECT pg_is_in_recovery()") != "t" or \
                standby.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'health'") != "1":
            assert time.monotonic() < deadline, "the standby did not catch up"
            time.sleep(0.1)
        yield primary, standby
    finally:
        standby.stop()
        primary.stop()


@pytest.fixture(scope="session")
def pki() -> Iterator[Path]:
    """cacert.pem, server.crt/.key, client.crt/.key (CN=postgres), crl.pem, in a dir that
    only we can read."""
    folder = Path(tempfile.mkdtemp(prefix="dwsproxy-pki-"))
    certs.init(folder)
    certs.write_client(folder, certs.load_ca(folder), "alice")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class RevokedCert:
    cert: Path
    key: Path  # PEM (PKCS-8)
    pk8: Path  # DER PKCS-8, for pgjdbc
    crl: Path  # a CRL of the `pki` CA revoking this certificate, and nothing else
    serial: int


@pytest.fixture(scope="session")
def revoked_cert(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> RevokedCert:
    """A second client certificate (CN=postgres) from the `pki` CA, and a CRL revoking it: a
    proxy with that CRL refuses this one and still accepts pki/client.crt."""
    folder = tmp_path_factory.mktemp("revoked")
    ca = certs.load_ca(pki)
    cert, key = certs.issue(ca, "postgres")
    certs.write_certs(folder / "revoked.crt", cert)
    certs.write_key(folder / "revoked.key", key)
    certs.write_key(folder / "revoked.pk8", key, der_pkcs8=True)
    certs.write_crl(folder / "crl.pem", certs.make_crl(ca, [cert.serial_number]))
    return RevokedCert(folder / "revoked.crt", folder / "revoked.key", folder / "revoked.pk8",
                       folder / "crl.pem", cert.serial_number)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Proxy:
    """A running `dwsproxy --config FILE` subprocess."""

    def __init__(self, folder: Path, pg_port: int, pki: Path, *, tls: dict[str, Any] | None = None,
                 listen: dict[str, Any] | None = None, backend: dict[str, Any] | None = None,
                 rules: list[dict[str, Any]] | None = None, args: list[str] | None = None,
                 metrics: dict[str, Any] | None = None,
                 reload: dict[str, Any] | None = None,
                 admin: dict[str, Any] | None = None, extra: str = "",
                 wrap: list[str] | None = None) -> None:
        """`wrap`: a command that runs the proxy, e.g. ["prlimit", "--nofile=256"]. The
        [admin] listener has a token (`token`) unless `admin` sets token_file = "". `extra`:
        TOML appended as is ([[ident]] tables)."""
        self.folder = folder
        self.port = int((listen or {}).get("port") or free_port())
        self.metrics_port = free_port()
        self.admin_port = free_port()
        self.token = f"test-token-{self.port}-0123456789abcdef"
        self.token_file = folder / f"proxy-{self.port}.token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        sections: dict[str, dict[str, Any]] = {
            "listen": {"host": "127.0.0.1", "port": self.port, "startup_timeout": 5.0,
                       **(listen or {})},
            "backend": {"host": "127.0.0.1", "port": pg_port, "connect_timeout": 3.0,
                        **(backend or {})},
            "tls": {"ssl_cert_file": str(pki / "server.crt"),
                    "ssl_key_file": str(pki / "server.key"), **(tls or {})},
            "metrics": {"host": "127.0.0.1", "port": self.metrics_port, **(metrics or {})},
            **({"reload": reload} if reload else {}),
            "admin": {"host": "127.0.0.1", "port": self.admin_port,
                      "token_file": str(self.token_file), **(admin or {})},
        }
        self.admin_enabled = sections["admin"].get("enabled", True)
        if not sections["admin"]["token_file"]:
            self.token = ""
        text = ""
        for name, values in sections.items():
            text += f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
        for rule in rules or []:
            text += "[[rules]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in rule.items())
        text += extra
        self.config_path = folder / f"proxy-{self.port}.toml"
        self.config_path.write_text(text)
        self.log_path = folder / f"proxy-{self.port}.log"
        self.pid_file = folder / f"proxy-{self.port}.pid"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*(wrap or []), sys.executable, "-m", "proxy", "--config", str(self.config_path),
             "--pid-file", str(self.pid_file), *(args or [])],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            wait_port(self.port, 20)
            wait_port(self.metrics_port, 20)
            if self.admin_enabled:
                wait_port(self.admin_port, 20)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"proxy did not start:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in proxy log:\n{self.log()[-3000:]}")

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}",
                                        timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def admin_http(self, path: str, *, method: str = "GET", token: bool | str = True,
                   host: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """A request to the [admin] listener: (status, headers in lower case, body). `token`:
        True sends the proxy's own, a string sends that one, False none."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}",
                                         method=method,
                                         data=b"" if method == "POST" else None)
        bearer = self.token if token is True else (token or "")
        if bearer:
            request.add_header("Authorization", f"Bearer {bearer}")
        if host is not None:
            request.add_header("Host", host)
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return (resp.status, {k.lower(): v for k, v in resp.headers.items()},
                        resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def admin_json(self, path: str) -> Any:
        status, _, body = self.admin_http(path)
        assert status == 200, (status, body)
        return json.loads(body)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """{(sample name, sorted labels): value} from one scrape."""
        status, text = self.http("/metrics")
        assert status == 200
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_metric(self, name: str, value: float, timeout: float = 10.0, **labels: str) -> None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.metric(name, **labels)
            if got == value:
                return
            time.sleep(0.05)
        raise AssertionError(f"{name}{labels} = {got}, expected {value}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="dwsproxy-it-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def start_proxy(pg: TempPostgres, pki: Path, workdir: Path) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(**kw: Any) -> Proxy:
        proxy = Proxy(workdir, kw.pop("pg_port", pg.port), kw.pop("pki", pki), **kw)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def run_psql(conninfo: str, command: str = "\\conninfo", env: dict[str, str] | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
    if PSQL is None:
        pytest.skip("psql not installed")
    return subprocess.run([PSQL, conninfo, "-X", "-At", "-c", command], capture_output=True,
                          text=True, env=env or clean_env(), timeout=timeout)


def raw_connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_close(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def read_message(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One backend message: (type byte, body)."""
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            raise ConnectionError(f"closed after {head!r}")
        head += chunk
    (length,) = struct.unpack("!i", head[1:5])
    body = b""
    while len(body) < length - 4:
        chunk = sock.recv(length - 4 - len(body))
        if not chunk:
            raise ConnectionError("closed mid-message")
        body += chunk
    return head[:1], body


def error_fields(kind: bytes, body: bytes) -> dict[str, str]:
    assert kind == b"E", f"expected ErrorResponse, got {kind!r}"
    return wire.parse_error_response(kind + struct.pack("!i", len(body) + 4) + body)


def tls_client_context(pki: Path, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "cacert.pem"))
    ctx.check_hostname = False
    for key, value in kw.items():
        setattr(ctx, key, value)
    return ctx


def ssl_request_handshake(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = raw_connect(port)
    sock.sendall(wire.build_request(wire.SSL_REQUEST_CODE))
    assert sock.recv(1) == b"S"
    return ctx.wrap_socket(sock, server_hostname="localhost")


# -- pgjdbc: tests/integration/java/JdbcProbe.java, for test_jdbc.py and test_clients.py --------

def _apt_install_jdbc() -> str:
    """Install pgjdbc from the distribution; returns what apt said (for the failure message)."""
    if not shutil.which("apt-get"):
        return "apt-get not found"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    said = []
    install = ["apt-get", "install", "-y", "--no-install-recommends", JDBC_PACKAGE]
    for argv in (install, ["apt-get", "update"], install):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600,
                              check=False)
        said.append(f"$ {' '.join(argv)} -> {proc.returncode}\n{proc.stdout[-1500:]}"
                    f"{proc.stderr[-1500:]}")
        if argv is install and proc.returncode == 0 and JDBC_JAR.exists():
            break
    return "\n".join(said)


@pytest.fixture(scope="session")
def jdbc_jar() -> Path:
    if not JDBC_JAR.exists():
        said = _apt_install_jdbc()
        if not JDBC_JAR.exists():
            pytest.fail(f"{JDBC_JAR} is missing and `apt-get install {JDBC_PACKAGE}` did not "
                        f"provide it:\n{said}")
    return JDBC_JAR


@pytest.fixture(scope="session")
def probe_classes(jdbc_jar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not JAVAC:
        pytest.fail("javac is not on PATH (make setup installs default-jdk-headless)")
    classes = tmp_path_factory.mktemp("jdbc-classes")
    proc = subprocess.run(
        [JAVAC, "-cp", str(jdbc_jar), "-d", str(classes), str(JDBC_PROBE_SOURCE)],
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"javac failed:\n{proc.stdout}\n{proc.stderr}"
    assert (classes / "JdbcProbe.class").exists()
    return classes


@pytest.fixture(scope="session")
def java_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty user.home for the JVM: pgjdbc falls back to ~/.postgresql/postgresql.crt and
    .pk8 when sslcert/sslkey are not given, and must find nothing there."""
    return tmp_path_factory.mktemp("jdbc-home")


ProbeRunner = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="session")
def run_probe(jdbc_jar: Path, probe_classes: Path, java_home: Path) -> ProbeRunner:
    """run(url, *args, timeout=120, **props): JdbcProbe with `args` (e.g. --query=SQL) and each
    prop as key=value."""
    def run(url: str, *args: str, timeout: float = 120,
            **props: str) -> subprocess.CompletedProcess[str]:
        if not JAVA:
            pytest.fail("java is not on PATH (make setup installs default-jdk-headless)")
        argv = [JAVA, f"-Duser.home={java_home}", "-cp", f"{jdbc_jar}{os.pathsep}{probe_classes}",
                "JdbcProbe", url, *args, *(f"{k}={v}" for k, v in props.items())]
        # No PG* variables: the probe's connection must be exactly what its arguments say.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["HOME"] = str(java_home)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
    return run
