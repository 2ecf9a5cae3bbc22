"""Operations: exact metrics after a scripted mix, workers summed, hot reload under pgbench,
graceful shutdown, startup_timeout under a flood of silent clients, max_connections, backend
down, /healthz, JSON logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    Proxy,
    clean_env,
    raw_connect,
    read_until_close,
    run_psql,
    ssl_request_handshake,
    tls_client_context,
)
from cryptography import x509

from proxy.protocol import wire
from proxy.tools import certs
from proxy.tools.demo import TempPostgres, find_pg_binary, free_port


def connect(proxy: Proxy, pki: Path, sslmode: str = "require", user: str = "postgres",
            **extra: str):  # type: ignore[no-untyped-def]
    import psycopg

    params = " ".join(f"{k}={v}" for k, v in extra.items())
    return psycopg.connect(f"host=localhost port={proxy.port} user={user} dbname=postgres "
                           f"sslmode={sslmode} sslrootcert={pki / 'cacert.pem'} "
                           f"sslcert={pki / 'none'} {params}")


def refused(proxy: Proxy, pki: Path, **kw: str) -> str:
    import psycopg

    try:
        connect(proxy, pki, **kw).close()
    except psycopg.OperationalError as exc:
        return str(exc)
    raise AssertionError("connection was not refused")


def test_scripted_mix_exact_counts(start_proxy: Callable[..., Proxy], pki: Path) -> None:
    certs.write_crl(pki / "mix.crl", certs.make_crl(certs.load_ca(pki), [
        x509.load_pem_x509_certificate((pki / "alice.crt").read_bytes()).serial_number]))
    proxy = start_proxy(
        tls={"ssl_ca_file": str(pki / "cacert.pem"), "ssl_crl_file": str(pki / "mix.crl"),
             "clientcert": "optional"},
        rules=[{"user": "bob", "action": "reject"}, {"action": "allow"}])
    held = [connect(proxy, pki) for _ in range(2)]  # 2 TLS sessions kept open
    for conn in held:
        conn.execute("SELECT 1")
    proxy.wait_metric("dwsproxy_active_connections", 2, encryption="tls")
    connect(proxy, pki).close()  # a third TLS session
    connect(proxy, pki, sslmode="disable").close()  # plaintext
    connect(proxy, pki, sslmode="disable").close()
    connect(proxy, pki, sslmode="require", ssl_max_protocol_version="TLSv1.2").close()
    connect(proxy, pki, sslcert=str(pki / "client.crt"), sslkey=str(pki / "client.key")).close()
    assert "connection refused by rule #1" in refused(proxy, pki, user="bob")
    assert "client certificate revoked" in refused(
        proxy, pki, sslcert=str(pki / "alice.crt"), sslkey=str(pki / "alice.key"))
    for junk in (b"\x00\x00\x00\x04junk", struct_pack_unknown()):  # 2 × bad_startup
        sock = raw_connect(proxy.port)
        sock.sendall(junk)
        read_until_close(sock)
        sock.close()
    for conn in held:
        conn.close()
    proxy.wait_metric("dwsproxy_active_connections", 0, encryption="tls")
    proxy.wait_metric("dwsproxy_active_connections", 0, encryption="plain")
    time.sleep(1.2)  # byte counters are flushed once a second
    m = proxy.metrics()
    got = {k: v for k, v in m.items() if k[0] in (
        "dwsproxy_connections_total", "dwsproxy_connections_rejected_total",
        "dwsproxy_ssl_requests_total") and v}
    assert got == {
        ("dwsproxy_connections_total",
         (("backend_encryption", "plain"), ("client_cert", "none"), ("encryption", "tls"),
          ("tls_version", "TLSv1.3"))): 3,
        ("dwsproxy_connections_total",
         (("backend_encryption", "plain"), ("client_cert", "verified"), ("encryption", "tls"),
          ("tls_version", "TLSv1.3"))): 1,
        ("dwsproxy_connections_total",
         (("backend_encryption", "plain"), ("client_cert", "none"), ("encryption", "tls"),
          ("tls_version", "TLSv1.2"))): 1,
        ("dwsproxy_connections_total",
         (("backend_encryption", "plain"), ("client_cert", "none"), ("encryption", "plain"),
          ("tls_version", ""))): 2,
        ("dwsproxy_connections_rejected_total", (("reason", "rule"),)): 1,
        ("dwsproxy_connections_rejected_total", (("reason", "client_cert_revoked"),)): 1,
        ("dwsproxy_connections_rejected_total", (("reason", "bad_startup"),)): 2,
        ("dwsproxy_ssl_requests_total", (("response", "S"),)): 7,
    }
    assert m[("dwsproxy_tls_handshake_seconds_count", ())] == 7
    assert m[("dwsproxy_backend_connect_seconds_count", ())] == 7
    assert m[("dwsproxy_bytes_total", (("direction", "client_to_backend"),))] > 0
    assert m[("dwsproxy_bytes_total", (("direction", "backend_to_client"),))] > 0
    server_cert = x509.load_pem_x509_certificate((pki / "server.crt").read_bytes())
    subject = server_cert.subject.rfc4514_string()
    assert m[("dwsproxy_certificate_expiry_timestamp_seconds",
              (("role", "server"), ("subject", subject)))] == \
        server_cert.not_valid_after_utc.timestamp()
    assert m[("dwsproxy_crl_next_update_timestamp_seconds",
              (("issuer", "CN=dwsproxy root CA,O=dwsproxy"),))] > time.time()
    log = proxy.log()
    assert log.count("outcome=ok") == 7 and "outcome=client_cert_revoked" in log


def struct_pack_unknown() -> bytes:
    import struct

    return struct.pack("!iI", 8, (1234 << 16) | 4321)


def test_workers_summed(start_proxy: Callable[..., Proxy], pki: Path) -> None:
    proxy = start_proxy(listen={"workers": 2})
    proxy.wait_log("listening on", 10)
    deadline = time.monotonic() + 10
    while proxy.log().count("listening on") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = set(re.findall(r"\(pid (\d+)\)", proxy.log()))
    assert len(pids) == 2, proxy.log()
    n = 24
    for i in range(n):
        connect(proxy, pki, sslmode="require" if i % 2 else "disable").close()
    proxy.wait_metric("dwsproxy_connections_total", n // 2, encryption="tls",
                      tls_version="TLSv1.3", client_cert="none", backend_encryption="plain")
    proxy.wait_metric("dwsproxy_connections_total", n // 2, encryption="plain", tls_version="",
                      client_cert="none", backend_encryption="plain")
    # SO_REUSEPORT spread the sessions: both workers served some, and the scrape summed them.
    served = set(re.findall(r"worker_pid=(\d+) .*outcome=ok", proxy.log()))
    assert served == pids, proxy.log()
    assert proxy.http("/healthz")[0] == 200


def pgbench_bin() -> str:
    binary = shutil.which("pgbench") or find_pg_binary("pgbench")
    if not binary:
        pytest.skip("pgbench not installed")
    return binary


def served_serial(port: int, pki: Path) -> int:
    with ssl_request_handshake(port, tls_client_context(pki)) as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_reload_under_pgbench(start_proxy: Callable[..., Proxy], pg: TempPostgres,
                              tmp_path: Path, pki: Path) -> None:
    for name in ("server.crt", "server.key"):
        shutil.copy(pki / name, tmp_path / name)
    os.chmod(tmp_path / "server.key", 0o600)
    proxy = start_proxy(tls={"ssl_cert_file": str(tmp_path / "server.crt"),
                             "ssl_key_file": str(tmp_path / "server.key"),
                             "require_ssl": True})
    pg.sql("SELECT 1")
    subprocess.run([pgbench_bin(), "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p",
                    str(pg.port), "-U", "postgres", "postgres"], check=True,
                   capture_output=True, env=clean_env())
    old_serial = served_serial(proxy.port, pki)
    bench = subprocess.Popen(
        [pgbench_bin(), "-c", "4", "-j", "2", "-T", "10", "-C", "-h", "localhost", "-p",
         str(proxy.port), "-U", "postgres", "postgres"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=clean_env(PGSSLMODE="verify-full", PGSSLROOTCERT=str(pki / "cacert.pem")))
    time.sleep(3)
    new_cert, new_key = certs.issue(certs.load_ca(pki), "localhost", server=True)
    certs.write_certs(tmp_path / "new.crt", new_cert)
    certs.write_key(tmp_path / "new.key", new_key)
    os.replace(tmp_path / "new.key", tmp_path / "server.key")
    os.replace(tmp_path / "new.crt", tmp_path / "server.crt")
    proxy.signal(signal.SIGHUP)
    out, _ = bench.communicate(timeout=60)
    assert bench.returncode == 0, out
    assert re.search(r"number of failed transactions: 0 \(0\.000%\)", out), out
    assert int(re.search(r"number of transactions actually processed: (\d+)", out)[1]) > 50
    proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="success")
    assert served_serial(proxy.port, pki) == new_cert.serial_number != old_serial
    # A broken reload (key file gone) is refused whole; the new certificate stays in force.
    os.rename(tmp_path / "server.key", tmp_path / "gone.key")
    proxy.signal(signal.SIGHUP)
    proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="failure")
    assert "refused" in proxy.wait_log("tls.ssl_key_file: no such file")
    assert served_serial(proxy.port, pki) == new_cert.serial_number
    assert connect(proxy, pki).execute("SELECT 1").fetchone() == (1,)
    # `dwsproxy reload` signals through the pid file.
    os.rename(tmp_path / "gone.key", tmp_path / "server.key")
    proc = subprocess.run([sys.executable, "-m", "proxy", "reload", "--pid-file",
                           str(proxy.pid_file)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proxy.wait_metric("dwsproxy_config_reloads_total", 2, result="success")


def test_sigterm_lets_the_open_transaction_commit(start_proxy: Callable[..., Proxy],
                                                  pki: Path, pg: TempPostgres) -> None:
    proxy = start_proxy(listen={"shutdown_grace": 20.0})
    pg.sql("CREATE TABLE IF NOT EXISTS shutdown_probe (v int)")
    conn = connect(proxy, pki)
    conn.execute("INSERT INTO shutdown_probe VALUES (42)")  # psycopg: inside a transaction
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    proxy.wait_log("shutting down")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    assert proxy.proc.poll() is None  # still serving the open session
    conn.execute("INSERT INTO shutdown_probe VALUES (43)")
    conn.commit()
    conn.close()
    assert proxy.proc.wait(15) == 0
    assert time.monotonic() - t0 < 20
    assert pg.sql("SELECT string_agg(v::text, ',' ORDER BY v) FROM shutdown_probe") == "42,43"


def test_sigterm_grace_over_closes_sessions(start_proxy: Callable[..., Proxy],
                                            pki: Path) -> None:
    proxy = start_proxy(listen={"shutdown_grace": 1.0})
    conn = connect(proxy, pki)
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    assert time.monotonic() - t0 < 8
    import psycopg

    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")


def test_silent_flood_closed_after_startup_timeout(start_proxy: Callable[..., Proxy],
                                                   pki: Path) -> None:
    proxy = start_proxy(listen={"startup_timeout": 2.0})
    silent = [raw_connect(proxy.port, timeout=10) for _ in range(200)]
    t0 = time.monotonic()
    with connect(proxy, pki) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert time.monotonic() - t0 < 1.0, "a real client waited behind the silent ones"
    for sock in silent:
        assert read_until_close(sock) == b""
        sock.close()
    assert time.monotonic() - t0 < 6
    proxy.wait_metric("dwsproxy_connections_rejected_total", 200, reason="startup_timeout")


def test_max_connections(start_proxy: Callable[..., Proxy], pki: Path) -> None:
    proxy = start_proxy(listen={"max_connections": 5})
    held = [connect(proxy, pki) for _ in range(5)]
    proc = run_psql(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                    f"sslmode=require", "SELECT 1")
    assert proc.returncode != 0
    assert "FATAL:  sorry, too many clients already" in proc.stderr
    assert "SQLSTATE 53300" in proc.stderr
    assert proxy.metric("dwsproxy_connections_rejected_total", reason="too_many_connections") == 1
    held.pop().close()
    deadline = time.monotonic() + 5
    while True:  # the slot is free again once the proxy saw the close
        proc = run_psql(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                        f"sslmode=require", "SELECT 1")
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert proc.returncode == 0, proc.stderr
    for conn in held:
        conn.close()


def test_backend_down(start_proxy: Callable[..., Proxy], pki: Path) -> None:
    dead_port = free_port()
    proxy = start_proxy(backend={"port": dead_port, "connect_timeout": 2.0})
    t0 = time.monotonic()
    proc = run_psql(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                    f"sslmode=require", "SELECT 1")
    assert time.monotonic() - t0 < 2.0 + 1.0
    assert proc.returncode != 0
    assert (f"could not connect to the database server at 127.0.0.1:{dead_port}"
            in proc.stderr)
    assert "SQLSTATE 08006" in proc.stderr
    assert proxy.metric("dwsproxy_connections_rejected_total", reason="backend_unavailable") == 1
    status, _body = proxy.http("/healthz")
    assert status == 503


def test_backend_connect_timeout(start_proxy: Callable[..., Proxy], pki: Path) -> None:
    # A backend that accepts nothing: a listening socket whose backlog is full.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        proxy = start_proxy(backend={"port": port, "connect_timeout": 1.0})
        t0 = time.monotonic()
        proc = run_psql(f"host=localhost port={proxy.port} user=postgres dbname=postgres "
                        f"sslmode=require", "SELECT 1")
        assert time.monotonic() - t0 < 1.0 + 1.0
        assert proc.returncode != 0 and "timeout" in proc.stderr, proc.stderr
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


def test_healthz_and_metrics_endpoints(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy()
    deadline = time.monotonic() + 10
    while proxy.http("/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.http("/healthz") == (200, "ok\n")
    assert proxy.http("/nope")[0] == 404
    assert "dwsproxy_config_last_reload_success_timestamp_seconds" in proxy.http("/metrics")[1]


def test_idle_timeout(start_proxy: Callable[..., Proxy], pki: Path) -> None:
    import psycopg

    proxy = start_proxy(listen={"idle_timeout": 1.0})
    conn = connect(proxy, pki)
    conn.execute("SELECT 1")
    proxy.wait_log("outcome=idle_timeout", timeout=6)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")


def test_json_log_line_has_no_secret(start_proxy: Callable[..., Proxy], pki: Path) -> None:
    proxy = start_proxy(args=["--log-format", "json"])
    with connect(proxy, pki, password="hunter2-secret") as conn:
        conn.execute("SELECT 1")
    text = proxy.wait_log('"outcome": "ok"')
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    session = next(d for d in lines if d.get("outcome") == "ok")
    for key in ("peer", "encryption", "tls_version", "cipher", "client_cert", "user",
                "database", "outcome", "bytes_in", "bytes_out", "duration"):
        assert key in session
    assert session["encryption"] == "tls" and session["bytes_out"] > 0
    assert "hunter2" not in text


def test_idle_timeout_with_a_client_that_never_reads(start_proxy: Callable[..., Proxy]) -> None:
    import struct

    proxy = start_proxy(tls={"ssl": False}, listen={"idle_timeout": 1.0})
    sock = raw_connect(proxy.port, timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(wire.build_startup_message({"user": "postgres", "database": "postgres"}))
    query = b"SELECT repeat('x', 1000000) FROM generate_series(1, 300)\0"
    sock.sendall(b"Q" + struct.pack("!i", len(query) + 4) + query)
    proxy.wait_metric("dwsproxy_active_connections", 1, encryption="plain")
    # The client never reads: the proxy's graceful close cannot flush, so it must give up.
    proxy.wait_metric("dwsproxy_active_connections", 0, timeout=15, encryption="plain")
    assert "outcome=idle_timeout" in proxy.log()
    sock.close()


def worker_pids(proxy: Proxy) -> set[str]:
    return set(re.findall(r"worker \d+ started \(pid (\d+)\)", proxy.log()))


def test_worker_restart_and_reload_while_starting(start_proxy: Callable[..., Proxy],
                                                 pki: Path) -> None:
    proxy = start_proxy(listen={"workers": 2})
    proxy.wait_log("worker 1 started")  # the metrics port answers before the worker is spawned
    first = worker_pids(proxy)
    assert len(first) == 1
    os.kill(int(next(iter(first))), signal.SIGKILL)
    proxy.wait_log("restarting in")
    deadline = time.monotonic() + 10
    while len(worker_pids(proxy)) < 2 and time.monotonic() < deadline:
        proxy.signal(signal.SIGHUP)  # reloads while the new worker is still importing
        time.sleep(0.05)
    time.sleep(1.0)
    pids = worker_pids(proxy)
    assert len(pids) == 2, proxy.log()
    new = (pids - first).pop()
    assert Path(f"/proc/{new}").exists(), "the restarted worker was killed by a SIGHUP"
    for _ in range(10):
        connect(proxy, pki).close()
    assert proxy.http("/healthz")[0] == 200


def test_worker_exits_when_the_main_process_dies(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(listen={"workers": 2})
    proxy.wait_log("worker 1 started")
    (pid,) = worker_pids(proxy)
    proxy.proc.kill()
    proxy.proc.wait(5)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or \
        "State:\tZ" in Path(f"/proc/{pid}/status").read_text()


def test_certificate_gauge_follows_a_reload_with_workers(start_proxy: Callable[..., Proxy],
                                                         pki: Path, tmp_path: Path) -> None:
    for name in ("server.crt", "server.key"):
        shutil.copy(pki / name, tmp_path / name)
    os.chmod(tmp_path / "server.key", 0o600)
    proxy = start_proxy(listen={"workers": 2},
                        tls={"ssl_cert_file": str(tmp_path / "server.crt"),
                             "ssl_key_file": str(tmp_path / "server.key")})

    def server_subjects() -> set[str]:
        return {dict(labels)["subject"] for (name, labels) in proxy.metrics()
                if name == "dwsproxy_certificate_expiry_timestamp_seconds"
                and dict(labels)["role"] == "server"}

    assert server_subjects() == {"CN=localhost,O=dwsproxy"}
    cert, key = certs.issue(certs.load_ca(pki), "renewed.example", server=True)
    certs.write_certs(tmp_path / "server.crt", cert)
    certs.write_key(tmp_path / "server.key", key)
    proxy.signal(signal.SIGHUP)
    proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="success")
    assert server_subjects() == {"CN=renewed.example,O=dwsproxy"}
