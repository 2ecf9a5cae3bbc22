"""Two-way TLS authentication with pgjdbc through dwsproxy.

Owns: the pgjdbc acceptance test: a small Java program (tests/integration/java/JdbcProbe.java),
compiled here against /usr/share/java/postgresql.jar, connects through the proxy with
sslmode=verify-ca / verify-full, a client certificate (sslcert PEM, sslkey PKCS-8 DER) and
sslrootcert, and runs a query. Also the refusals: no client certificate (the proxy's FATAL 28000)
and a revoked one (FATAL 28000 naming the revocation, after the handshake).

Skipped only where `java`/`javac` are absent. A missing jar is installed with apt-get
(libpostgresql-jdbc-java); if it still cannot be had the tests fail rather than skip.
PostgreSQL, the certificates (`pki`, `revoked_cert`), the compiled probe (`run_probe`) and the
proxies come from conftest.py; one proxy has the empty CRL of `dwsproxy certs init`, a second one
a CRL that revokes a second client cert. test_clients.py runs the same probe in the client matrix.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import JAVA, JAVAC, ProbeRunner, Proxy, RevokedCert

pytestmark = pytest.mark.skipif(
    not (JAVA and JAVAC),
    reason="pgjdbc test needs a JDK: `java` and `javac` not both on PATH "
           f"(java={JAVA}, javac={JAVAC})")


# -- fixtures ----------------------------------------------------------------------------------
# jdbc_jar, probe_classes, java_home, run_probe and revoked_cert come from conftest.py (shared
# with test_clients.py).

@pytest.fixture(scope="module")
def cert_dir(pki: Path) -> Path:
    return pki  # cacert.pem, server.crt/.key, client.crt + client.pk8 (PKCS-8 DER), crl.pem


def _tls(cert_dir: Path, crl: Path) -> dict[str, object]:
    return {"require_ssl": True, "ssl_ca_file": str(cert_dir / "cacert.pem"),
            "ssl_crl_file": str(crl), "clientcert": "verify-ca"}


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy], cert_dir: Path) -> Proxy:
    return start_proxy(tls=_tls(cert_dir, cert_dir / "crl.pem"))


@pytest.fixture(scope="module")
def proxy_revoking(start_proxy: Callable[..., Proxy], cert_dir: Path,
                   revoked_cert: RevokedCert) -> Proxy:
    return start_proxy(tls=_tls(cert_dir, revoked_cert.crl))


def lines_for(proxy: Proxy, needle: str) -> list[str]:
    return [ln for ln in proxy.wait_log(needle).splitlines() if needle in ln]


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
                                               cert_dir: Path, revoked_cert: RevokedCert,
                                               ) -> None:
    props = _common(cert_dir) | {"ApplicationName": "jdbc-probe-revoked"}
    proc = run_probe(_url("127.0.0.1", proxy_revoking.port), **props, sslmode="verify-ca",
                     sslcert=str(revoked_cert.cert), sslkey=str(revoked_cert.pk8))
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
