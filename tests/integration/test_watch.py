"""Automatic reload ([reload] watch), end to end with real psql and no signal: a CRL replaced
by rename revokes within 2 x watch_interval, and a broken file written the same way changes
nothing but is counted as a refused reload."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Proxy, RevokedCert, run_psql

from proxy.tools import certs

INTERVAL = 1.0


def conninfo(proxy: Proxy, pki: Path, cert: Path, key: Path) -> str:
    return (f"host=localhost port={proxy.port} user=postgres dbname=postgres "
            f"sslmode=verify-ca sslrootcert={pki / 'cacert.pem'} sslcert={cert} sslkey={key} "
            "connect_timeout=10")


def replace_by_rename(target: Path, data: bytes) -> float:
    """Write beside, then rename over (what cert-manager's and most tools' writers do);
    returns the moment of the rename."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return time.monotonic()


def status(proxy: Proxy) -> dict[str, object]:
    doc: dict[str, object] = proxy.admin_json("/status")
    return doc


def test_a_crl_replaced_by_rename_revokes_within_two_intervals(
        start_proxy: Callable[..., Proxy], pki: Path, revoked_cert: RevokedCert,
        tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes((pki / "crl.pem").read_bytes())  # the CA's empty CRL
    proxy = start_proxy(tls={"ssl_ca_file": str(pki / "cacert.pem"), "ssl_crl_file": str(crl),
                             "clientcert": "verify-ca", "require_ssl": True},
                        reload={"watch": True, "watch_interval": INTERVAL})
    revoked = conninfo(proxy, pki, revoked_cert.cert, revoked_cert.key)
    good = conninfo(proxy, pki, pki / "client.crt", pki / "client.key")
    assert run_psql(revoked, "SELECT 1").returncode == 0

    renamed_at = replace_by_rename(crl, revoked_cert.crl.read_bytes())
    while True:
        proc = run_psql(revoked, "SELECT 1")
        took = time.monotonic() - renamed_at
        if proc.returncode != 0:
            break
        assert took < 2 * INTERVAL, f"still accepted {took:.2f}s after the rename"
    assert took <= 2 * INTERVAL, took
    assert "revoked" in proc.stderr, proc.stderr
    assert run_psql(good, "SELECT 1").returncode == 0
    assert proxy.metric("dwsproxy_config_reloads_total", result="success") == 1
    reload = status(proxy)["reload"]
    assert isinstance(reload, dict) and reload["trigger"] == "watch"
    assert reload["result"] == "success"
    in_force = status(proxy)["config"]

    # A broken CRL, written the same way: refused whole, counted, and nothing changes.
    broken_at = replace_by_rename(crl, b"-----BEGIN X509 CRL-----\nnot a crl\n")
    proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="failure",
                      timeout=2 * INTERVAL + 5)
    assert time.monotonic() - broken_at <= 2 * INTERVAL + 1.0
    reload = status(proxy)["reload"]
    assert isinstance(reload, dict) and reload["result"] == "failure"
    assert "tls.ssl_crl_file" in str(reload["error"]) and reload["trigger"] == "watch"
    assert status(proxy)["config"] == in_force
    assert "revoked" in run_psql(revoked, "SELECT 1").stderr
    assert run_psql(good, "SELECT 1").returncode == 0
    proxy.wait_log("reload (watch) refused")

    # Renewed (cert-manager's way: the same revocations, signed again) and in force again.
    renewed = tmp_path / "renewed.pem"
    certs.write_crl(renewed, certs.make_crl(certs.load_ca(pki), [revoked_cert.serial]))
    replace_by_rename(crl, renewed.read_bytes())
    proxy.wait_metric("dwsproxy_config_reloads_total", 2, result="success",
                      timeout=2 * INTERVAL + 5)
    assert proxy.metric("dwsproxy_config_reloads_total", result="failure") == 1
    assert run_psql(good, "SELECT 1").returncode == 0
    assert run_psql(revoked, "SELECT 1").returncode != 0


def test_a_broken_config_file_written_in_place_changes_nothing(
        start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(reload={"watch": True, "watch_interval": INTERVAL})
    plain = f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres sslmode=disable"
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text + "[tls\n")
    proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="failure",
                      timeout=2 * INTERVAL + 5)
    assert run_psql(plain, "SELECT 1").returncode == 0
    assert proxy.metric("dwsproxy_config_reloads_total", result="success") == 0
    proxy.config_path.write_text(text.replace("startup_timeout = 5.0", "startup_timeout = 6.0"))
    proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="success",
                      timeout=2 * INTERVAL + 5)
