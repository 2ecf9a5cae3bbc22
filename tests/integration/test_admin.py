"""The admin views on the [admin] listener: /sessions and /status across two workers,
`dwsproxy sessions|status`, the status page (under its Content-Security-Policy) in a real
headless Chromium, and `[admin] enabled = false`."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Proxy

SESSION_FIELDS = {"id", "worker", "peer", "state", "user", "database", "application_name",
                  "encryption", "tls", "tls_version", "cipher", "direct", "client_cert",
                  "backend_tls", "started", "bytes_in", "bytes_out", "backend",
                  "backend_local_port", "backend_pid", "backend_secret_known"}
ARTIFACTS = Path("/tmp/dwsproxy-artifacts")


@pytest.fixture(scope="module")
def admin_proxy(start_proxy: Callable[..., Proxy], pki: Path) -> Proxy:
    proxy = start_proxy(tls={"ssl_ca_file": str(pki / "cacert.pem"),
                             "ssl_crl_file": str(pki / "crl.pem"), "clientcert": "optional"},
                        listen={"workers": 2},
                        admin={"token_file": ""})  # loopback: the browser has no token
    deadline = time.monotonic() + 20
    while proxy.log().count("listening on") < 2:
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)
    return proxy


@pytest.fixture()
def open_sessions(admin_proxy: Proxy, pki: Path) -> Iterator[dict[str, str]]:
    """Eight sessions held open: TLS with and without a client certificate, and plaintext;
    application_name says which."""
    import psycopg

    base = (f"host=localhost port={admin_proxy.port} user=postgres dbname=postgres "
            f"sslrootcert={pki / 'cacert.pem'}")
    kinds = {"tls": "sslmode=verify-full", "plain": "sslmode=disable",
             "cert": f"sslmode=verify-full sslcert={pki / 'client.crt'} "
                     f"sslkey={pki / 'client.key'}"}
    conns, names = [], {}
    try:
        for i in range(8):
            kind = ("tls", "plain", "cert")[i % 3]
            name = f"adm-{kind}-{i}"
            conns.append(psycopg.connect(f"{base} {kinds[kind]} application_name={name}"))
            conns[-1].execute("SELECT 1")
            names[name] = kind
        yield names
    finally:
        for conn in conns:
            conn.close()


def get_json(proxy: Proxy, path: str) -> dict[str, Any]:
    return dict(proxy.admin_json(path))


def ours(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in doc["sessions"] if (s["application_name"] or "").startswith("adm-")]


def test_sessions_lists_exactly_the_open_sessions(admin_proxy: Proxy,
                                                  open_sessions: dict[str, str]) -> None:
    listed = ours(get_json(admin_proxy, "/sessions"))
    assert {s["application_name"] for s in listed} == set(open_sessions)
    main_pid = admin_proxy.proc.pid
    workers = {s["worker"] for s in listed}
    assert workers <= {main_pid} | set(all_pids(admin_proxy))
    for s in listed:
        assert set(s) == SESSION_FIELDS
        kind = open_sessions[s["application_name"]]
        assert s["state"] == "relaying" and s["user"] == "postgres"
        assert s["encryption"] == ("plain" if kind == "plain" else "tls")
        if kind == "plain":
            assert s["tls"] == "" and s["client_cert"] is None
        else:
            assert s["tls"] == f"{s['tls_version']}/{s['cipher']}" and s["tls_version"]
        if kind == "cert":
            assert s["client_cert"]["subject"] == "CN=postgres,O=dwsproxy"
            assert set(s["client_cert"]) == {"subject", "issuer", "serial", "not_after"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", s["started"])
        assert s["bytes_in"] > 0 and s["bytes_out"] > 0
    assert [s["started"] for s in listed] == sorted(s["started"] for s in listed)
    out = subprocess.run([sys.executable, "-m", "proxy", "sessions", "--url",
                          f"http://127.0.0.1:{admin_proxy.admin_port}"],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 0, out.stderr
    for name in open_sessions:
        assert name in out.stdout
    assert "plaintext" in out.stdout and "CN=postgres,O=dwsproxy" in out.stdout


def all_pids(proxy: Proxy) -> list[int]:
    return [int(p) for p in re.findall(r"\(pid (\d+)\)", proxy.log())]


def test_status_shows_synchronization_and_reloads(admin_proxy: Proxy) -> None:
    doc = get_json(admin_proxy, "/status")
    sha = doc["config"]["sha256"]
    assert doc["synchronized"] is True and len(doc["workers"]) == 2
    assert all(w["config_sha256"] == sha for w in doc["workers"])
    assert {"role", "subject", "not_after"} <= set(doc["certificates"][0])
    assert doc["policy"]["clientcert"] == "optional" and doc["crls"]
    for forbidden in ("PRIVATE KEY", "passphrase", "password"):
        assert forbidden not in json.dumps(doc)
    original = admin_proxy.config_path.read_text()
    try:
        admin_proxy.config_path.write_text("[tls\nbroken")
        admin_proxy.signal(signal.SIGHUP)
        admin_proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="failure")
        doc = get_json(admin_proxy, "/status")
        assert doc["reload"]["result"] == "failure" and "not valid TOML" in doc["reload"]["error"]
        assert doc["config"]["sha256"] == sha and doc["synchronized"] is True
        admin_proxy.config_path.write_text(original.replace("startup_timeout = 5.0",
                                                            "startup_timeout = 6.0"))
        admin_proxy.signal(signal.SIGHUP)
        admin_proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="success")
        deadline = time.monotonic() + 10
        while True:
            doc = get_json(admin_proxy, "/status")
            if doc["synchronized"]:
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        new = doc["config"]["sha256"]
        assert new != sha and doc["reload"]["result"] == "success"
        assert all(w["config_sha256"] == new for w in doc["workers"])
    finally:
        admin_proxy.config_path.write_text(original)
    out = subprocess.run([sys.executable, "-m", "proxy", "status", "--url",
                          f"http://127.0.0.1:{admin_proxy.admin_port}"],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 0 and "synchronized:  yes" in out.stdout, out.stdout


def test_status_page_in_a_real_browser(admin_proxy: Proxy,
                                       open_sessions: dict[str, str]) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium missing: .ci/system-deps installs it")
    ARTIFACTS.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{admin_proxy.admin_port}/"
    common = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
              "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0",
              "--virtual-time-budget=4000", f"--user-data-dir={ARTIFACTS / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                         timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "synchronized" in html and "require_ssl" in html and "clientcert" in html
    assert "CN=localhost" in html  # the server certificate row
    for name in open_sessions:
        assert name in html
    assert html.count('class="plain"') == sum(k == "plain" for k in open_sessions.values())
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    subprocess.run([*common, "--window-size=1400,900", f"--screenshot={shot}", url],
                   capture_output=True, timeout=90)
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"status page screenshot: {shot}")


def test_admin_off_and_unreachable(start_proxy: Callable[..., Proxy]) -> None:
    from proxy.tools.demo import free_port

    off = start_proxy(admin={"enabled": False})
    for path in ("/sessions", "/status", "/"):
        assert off.http(path)[0] == 404  # never on the [metrics] listener
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", off.admin_port), timeout=2).close()
    assert off.http("/metrics")[0] == 200 and off.http("/healthz")[0] == 200
    out = subprocess.run([sys.executable, "-m", "proxy", "sessions", "--url",
                          f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                         cwd=REPO, timeout=30)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "cannot read" in out.stderr
