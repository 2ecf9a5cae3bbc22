"""The real `dwsproxy` under systemd's eyes: this test plays the $NOTIFY_SOCKET end of the
sd_notify protocol (Type=notify), and checks `--version` and what a scrape shows."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tools.demo import free_port

DWSPROXY = Path(sys.executable).with_name("dwsproxy")  # the console script pip installed
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifySocket:
    """An AF_UNIX datagram socket as systemd binds it, reading each message with the sender's
    pid (SO_PASSCRED), so a message from a worker instead of the main process is seen."""

    def __init__(self, address: str, path: str | None) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path if path is not None else "\0" + address[1:])

    def receive(self, timeout: float = 20.0) -> tuple[int, str]:
        self.sock.settimeout(timeout)
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CRED.size))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CRED.unpack(payload[: _CRED.size])[0]
        return pid, data.decode()

    def pending(self) -> list[tuple[int, str]]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.receive(timeout=0))
        except (BlockingIOError, TimeoutError):
            return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    folder = tempfile.mkdtemp(prefix="dwsproxy-notify-", dir="/tmp")  # sun_path is 108 bytes
    if request.param == "path":
        path = os.path.join(folder, "notify")
        sock = NotifySocket(path, path)
    else:
        sock = NotifySocket(f"@dwsproxy-test-{os.getpid()}-{free_port()}", None)
    yield sock
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def _write_config(folder: Path, workers: int) -> tuple[Path, int, int]:
    port, metrics_port = free_port(), free_port()
    path = folder / "dwsproxy.toml"
    # No backend listens on this port: readiness is about the proxy, not the database.
    path.write_text(f"""
[listen]
host = "127.0.0.1"
port = {port}
workers = {workers}
[backend]
port = {free_port()}
[tls]
ssl = false
[metrics]
port = {metrics_port}
""")
    return path, port, metrics_port


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_after_listening_reloading_around_sighup_stopping_at_sigterm(
        notify_socket: NotifySocket, tmp_path: Path, workers: int) -> None:
    config, port, metrics_port = _write_config(tmp_path, workers)
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.address}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen([str(DWSPROXY), "--config", str(config)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        pid, message = notify_socket.receive()
        assert (pid, message) == (proc.pid, "READY=1"), (tmp_path / "log").read_text()
        # READY=1 comes once the proxy serves: both ports accept at that very moment.
        assert _connects(port), "READY=1 before the listener accepts"
        assert _connects(metrics_port), "READY=1 before /metrics is served"

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as resp:
            scrape = resp.read().decode()
        assert 'dwsproxy_connections_rejected_total{reason="rule"} 0.0' in scrape
        assert "_created" not in scrape  # prometheus-client's default would add one per series

        proc.send_signal(signal.SIGHUP)
        pid, message = notify_socket.receive()
        assert pid == proc.pid
        lines = message.split("\n")
        assert lines[0] == "RELOADING=1"
        assert lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=")[1]) > 0
        assert notify_socket.receive() == (proc.pid, "READY=1")

        proc.send_signal(signal.SIGTERM)
        assert notify_socket.receive() == (proc.pid, "STOPPING=1")
        assert proc.wait(30) == 0
        # Workers inherit NOTIFY_SOCKET; only the main process may speak for the service.
        assert notify_socket.pending() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()


def test_without_notify_socket_nothing_is_sent_and_the_proxy_runs(tmp_path: Path) -> None:
    from proxy.ops import sdnotify

    env_before = os.environ.pop("NOTIFY_SOCKET", None)
    try:
        assert sdnotify.notify("READY=1") is False
    finally:
        if env_before is not None:
            os.environ["NOTIFY_SOCKET"] = env_before


def test_version_prints_the_package_version() -> None:
    from importlib import metadata

    done = subprocess.run([str(DWSPROXY), "--version"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dwsproxy {metadata.version('dwsproxy')}"
    assert metadata.version("dwsproxy") != "unknown"
