"""Two-way TLS authentication with pgjdbc through dwsproxy.

Owns: the pgjdbc acceptance test: a small Java program (tests/integration/java/JdbcProbe.java),
compiled here against /usr/share/java/postgresql.jar, connects through the proxy with
sslmode=verify-ca / verify-full, a client certificate (sslcert PEM, sslkey PKCS-8 DER) and
sslrootcert, and runs a query. Also the refusals: no client certificate (the proxy's FATAL 28000)
and a revoked one (FATAL 28000 naming the revocation, after the handshake).

Skipped only where `java`/`javac` are absent. A missing jar is installed with apt-get
(libpostgresql-jdbc-java); if it still cannot be had the tests fail rather than skip.
PostgreSQL, the certificates (`pki`) and the proxies come from conftest.py; one proxy has the
empty CRL of `dwsproxy certs init`, a second one a CRL that revokes a second client cert.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Proxy

from proxy import certs as certs_mod

ROOT = Path(__file__).resolve().parents[2]
PROBE_SOURCE = Path(__file__).resolve().parent / "java" / "JdbcProbe.java"
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
JDBC_PACKAGE = "libpostgresql-jdbc-java"

JAVA = shutil.which("java")
JAVAC = shutil.which("javac")

pytestmark = pytest.mark.skipif(
    not (JAVA and JAVAC),
    reason="pgjdbc test needs a JDK: `java` and `javac` not both on PATH "
           f"(java={JAVA}, javac={JAVAC})")


# -- helpers -----------------------------------------------------------------------------------

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


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jdbc_jar() -> Path:
    if not JDBC_JAR.exists():
        said = _apt_install_jdbc()
        if not JDBC_JAR.exists():
            pytest.fail(f"{JDBC_JAR} is missing and `apt-get install {JDBC_PACKAGE}` did not "
                        f"provide it:\n{said}")
    return JDBC_JAR


@pytest.fixture(scope="module")
def probe_classes(jdbc_jar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    classes = tmp_path_factory.mktemp("jdbc-classes")
    assert JAVAC
    proc = subprocess.run(
        [JAVAC, "-cp", str(jdbc_jar), "-d", str(classes), str(PROBE_SOURCE)],
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"javac failed:\n{proc.stdout}\n{proc.stderr}"
    assert (classes / "JdbcProbe.class").exists()
    return classes


@pytest.fixture(scope="module")
def java_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty user.home for the JVM: pgjdbc falls back to ~/.postgresql/postgresql.crt and
    .pk8 when sslcert/sslkey are not given, and must find nothing there."""
    return tmp_path_factory.mktemp("jdbc-home")


@pytest.fixture(scope="module")
def cert_dir(pki: Path) -> Path:
    return pki  # cacert.pem, server.crt/.key, client.crt + client.pk8 (PKCS-8 DER), crl.pem


@dataclass
class RevokedCert:
    cert: Path
    key: Path
    crl: Path


@pytest.fixture(scope="module")
def revoked(cert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RevokedCert:
    """A second client certificate (CN=postgres) from the same CA, and a CRL revoking it."""
    folder = tmp_path_factory.mktemp("jdbc-revoked")
    ca = certs_mod.load_ca(cert_dir)
    cert, key = certs_mod.issue(ca, "postgres")
    certs_mod.write_certs(folder / "revoked.crt", cert)
    certs_mod.write_key(folder / "revoked.pk8", key, der_pkcs8=True)
    certs_mod.write_crl(folder / "crl.pem", certs_mod.make_crl(ca, [cert.serial_number]))
    return RevokedCert(folder / "revoked.crt", folder / "revoked.pk8", folder / "crl.pem")


def _tls(cert_dir: Path, crl: Path) -> dict[str, object]:
    return {"require_ssl": True, "ssl_ca_file": str(cert_dir / "cacert.pem"),
            "ssl_crl_file": str(crl), "clientcert": "verify-ca"}


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy], cert_dir: Path) -> Proxy:
    return start_proxy(tls=_tls(cert_dir, cert_dir / "crl.pem"))


@pytest.fixture(scope="module")
def proxy_revoking(start_proxy: Callable[..., Proxy], cert_dir: Path,
                   revoked: RevokedCert) -> Proxy:
    return start_proxy(tls=_tls(cert_dir, revoked.crl))


def lines_for(proxy: Proxy, needle: str) -> list[str]:
    return [ln for ln in proxy.wait_log(needle).splitlines() if needle in ln]


ProbeRunner = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="module")
def run_probe(jdbc_jar: Path, probe_classes: Path, java_home: Path) -> ProbeRunner:
    def run(url: str, **props: str) -> subprocess.CompletedProcess[str]:
        assert JAVA
        argv = [JAVA, f"-Duser.home={java_home}", "-cp", f"{jdbc_jar}{os.pathsep}{probe_classes}",
                "JdbcProbe", url, *(f"{k}={v}" for k, v in props.items())]
        # No PG* variables: the probe's connection must be exactly what its arguments say.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["HOME"] = str(java_home)
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env,
                              check=False)
    return run


def _show(proc: subprocess.CompletedProcess[str], proxy: Proxy) -> str:
    return (f"exit {proc.returncode}\n--- probe stdout ---\n{proc.stdout}\n--- probe stderr ---\n"
            f"{proc.stderr}\n--- proxy log ---\n{proxy.log()}")


def _url(host: str, port: int) -> str:
    return f"jdbc:postgresql://{host}:{port}/postgres"


def _common(cert_dir: Path) -> dict[str, str]:
    # pgjdbc puts application_name in the StartupMessage only when it may assume a server
    # >= 9.0 (otherwise it sends `SET application_name` after login, which the proxy never
    # parses): with it, the proxy's one log line per connection names the probe that made it.
    return {"user": "postgres", "sslrootcert": str(cert_dir / "cacert.pem"),
            "connectTimeout": "20", "socketTimeout": "30", "loginTimeout": "30",
            "assumeMinServerVersion": "10", "ApplicationName": "jdbc-probe"}


# -- tests -------------------------------------------------------------------------------------

def test_verify_ca_with_client_certificate(run_probe: ProbeRunner, proxy: Proxy,
                                           cert_dir: Path) -> None:
    proc = run_probe(_url("127.0.0.1", proxy.port), **_common(cert_dir), sslmode="verify-ca",
                     sslcert=str(cert_dir / "client.crt"), sslkey=str(cert_dir / "client.pk8"))
    assert proc.returncode == 0, _show(proc, proxy)
    assert "result: jdbc-ok postgres" in proc.stdout, _show(proc, proxy)
    assert "ssl: true protocol=TLSv1." in proc.stdout, _show(proc, proxy)
    assert "client_cert: CN=postgres" in proc.stdout, _show(proc, proxy)
    # The proxy saw and verified the certificate, and relayed the session.
    lines = [ln for ln in lines_for(proxy, "outcome=ok")
             if "application_name=jdbc-probe" in ln and "CN=postgres" in ln]
    assert lines, _show(proc, proxy)
    assert "encryption=tls" in lines[-1]


def test_verify_ca_without_client_certificate_is_refused(run_probe: ProbeRunner, proxy: Proxy,
                                                         cert_dir: Path,
                                                         java_home: Path) -> None:
    # No sslcert/sslkey: pgjdbc would look in ~/.postgresql/ (user.home is an empty folder), so
    # it offers no certificate at all.
    assert not (java_home / ".postgresql").exists()
    props = _common(cert_dir) | {"ApplicationName": "jdbc-probe-nocert"}
    proc = run_probe(_url("127.0.0.1", proxy.port), **props, sslmode="verify-ca")
    assert proc.returncode == 1, _show(proc, proxy)
    assert "result: jdbc-ok" not in proc.stdout
    assert "error: sqlstate=28000" in proc.stdout, _show(proc, proxy)
    assert "connection requires a valid client certificate" in proc.stdout, _show(proc, proxy)
    # The refusal came from the proxy's policy after a good handshake, with no certificate.
    lines = [ln for ln in lines_for(proxy, "outcome=client_cert_missing")
             if "application_name=jdbc-probe-nocert" in ln]
    assert lines, _show(proc, proxy)
    assert 'client_cert=""' in lines[-1] and "encryption=tls" in lines[-1], lines[-1]


def test_verify_full_against_localhost(run_probe: ProbeRunner, proxy: Proxy,
                                       cert_dir: Path) -> None:
    props = _common(cert_dir) | {"ApplicationName": "jdbc-probe-full"}
    proc = run_probe(_url("localhost", proxy.port), **props, sslmode="verify-full",
                     sslcert=str(cert_dir / "client.crt"), sslkey=str(cert_dir / "client.pk8"))
    assert proc.returncode == 0, _show(proc, proxy)
    assert "result: jdbc-ok postgres" in proc.stdout, _show(proc, proxy)
    assert "ssl: true" in proc.stdout and "server_cert: CN=localhost" in proc.stdout, \
        _show(proc, proxy)
    lines = [ln for ln in lines_for(proxy, "outcome=ok")
             if "application_name=jdbc-probe-full" in ln]
    assert lines, _show(proc, proxy)


def test_revoked_client_certificate_is_refused(run_probe: ProbeRunner, proxy_revoking: Proxy,
                                               cert_dir: Path, revoked: RevokedCert) -> None:
    props = _common(cert_dir) | {"ApplicationName": "jdbc-probe-revoked"}
    proc = run_probe(_url("127.0.0.1", proxy_revoking.port), **props, sslmode="verify-ca",
                     sslcert=str(revoked.cert), sslkey=str(revoked.key))
    assert proc.returncode != 0, _show(proc, proxy_revoking)
    assert "result: jdbc-ok" not in proc.stdout
    # The CRL is checked right after the handshake: pgjdbc reads the proxy's FATAL 28000.
    assert "error: sqlstate=28000 message=FATAL: client certificate revoked" in proc.stdout, \
        _show(proc, proxy_revoking)
    lines = lines_for(proxy_revoking, "outcome=client_cert_revoked")
    assert lines, _show(proc, proxy_revoking)
    assert "client certificate revoked" in lines[-1], lines[-1]


def test_revoking_proxy_still_accepts_the_good_certificate(run_probe: ProbeRunner,
                                                           proxy_revoking: Proxy,
                                                           cert_dir: Path) -> None:
    """The CRL revokes one serial, not the CA: the first client certificate still works."""
    props = _common(cert_dir) | {"ApplicationName": "jdbc-probe-crl-ok"}
    proc = run_probe(_url("127.0.0.1", proxy_revoking.port), **props, sslmode="verify-ca",
                     sslcert=str(cert_dir / "client.crt"), sslkey=str(cert_dir / "client.pk8"))
    assert proc.returncode == 0, _show(proc, proxy_revoking)
    assert "result: jdbc-ok postgres" in proc.stdout, _show(proc, proxy_revoking)
