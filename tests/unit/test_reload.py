"""A reload in the main process (runtime/server.py Reloader, _reload) and in a worker
(_worker_message): every failure is a counted, visible refusal, systemd is never left in
RELOADING, the configuration is built off the event loop, and a worker that cannot apply what
the main process validated exits to be restarted instead of keeping its old policy."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.ops import metrics
from proxy.runtime import server, workers
from proxy.runtime.state import ServerState
from proxy.tls import loader
from proxy.tools import certs


@pytest.fixture()
def config_path(tmp_path: Path) -> Path:
    certs.init(tmp_path)
    path = tmp_path / "dwsproxy.toml"
    path.write_text("[backend]\nhost = \"127.0.0.1\"\nport = 1\n[tls]\n"
                    "ssl_cert_file = \"server.crt\"\nssl_key_file = \"server.key\"\n")
    return path


def failures() -> float:
    return metrics.RELOADS.labels("failure")._value.get()  # type: ignore[no-any-return]


def run(coro: Any) -> Any:
    return uvloop.run(coro)


def reload_once(loaded: Any) -> ServerState[Any]:
    """A process state holding `loaded`, after one reload through the Reloader."""
    async def main() -> ServerState[Any]:
        state: ServerState[Any] = ServerState(loaded)
        reloader = server.Reloader(state, lambda: None)
        reloader.request()
        assert reloader.task is not None
        await reloader.task
        return state

    return run(main())  # type: ignore[no-any-return]


@pytest.mark.parametrize("exc", [OSError(24, "Too many open files"), MemoryError()])
def test_a_reload_failing_with_anything_is_a_counted_refusal(
        config_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        exc: BaseException) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    loaded = loader.load(str(config_path))

    def broken(path: str) -> Any:
        raise exc

    monkeypatch.setattr(loader, "load", broken)
    before = failures()

    state = reload_once(loaded)
    assert state.loaded is loaded  # the previous configuration stays in force
    assert state.last_reload["result"] == "failure"
    assert type(exc).__name__ in str(state.last_reload["error"])
    assert failures() == before + 1
    got = [notify.recv(200).split(b"\n")[0], notify.recv(200).split(b"\n")[0]]
    assert got == [b"RELOADING=1", b"READY=1"]  # never left reloading
    notify.close()


def test_the_configuration_is_built_off_the_event_loop(config_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = loader.load(str(config_path))
    threads: list[threading.Thread] = []
    real = loader.load

    def load(path: str) -> Any:
        threads.append(threading.current_thread())
        return real(path)

    monkeypatch.setattr(loader, "load", load)

    state = reload_once(loaded)
    assert state.last_reload["result"] == "success" and state.loaded is not loaded
    assert threads and threads[0] is not threading.main_thread()


def test_requests_during_a_reload_coalesce_into_one_more(config_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = loader.load(str(config_path))
    calls: list[str] = []
    gate = threading.Event()
    real = loader.load

    def load(path: str) -> Any:
        calls.append(path)
        gate.wait(5)
        return real(path)

    monkeypatch.setattr(loader, "load", load)

    async def main() -> None:
        state: ServerState[Any] = ServerState(loaded)
        reloader = server.Reloader(state, lambda: None)
        for _ in range(20):  # a SIGHUP storm
            reloader.request()
        await asyncio.sleep(0.05)
        gate.set()
        assert reloader.task is not None
        await reloader.task

    run(main())
    assert len(calls) == 2  # the one running, then one for everything asked meanwhile


@pytest.mark.parametrize("exc", [OSError(24, "Too many open files"), MemoryError()])
def test_a_worker_that_cannot_apply_the_configuration_exits_to_be_restarted(
        config_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    loaded = loader.load(str(config_path))

    def broken(snap: Any) -> Any:
        raise exc

    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(loader, "build", broken)
    monkeypatch.setattr(server.os, "_exit", exit_)
    message = {"type": "config", "snapshot": loaded.snapshot.to_json().decode()}
    monkeypatch.setattr(workers, "snapshot_of", lambda m: loaded.snapshot)

    async def main() -> None:
        state: ServerState[Any] = ServerState(loaded)
        await server._worker_message(state, message)

    with pytest.raises(SystemExit) as info:
        run(main())
    assert info.value.code == 3


def test_expiry_warnings_repeat_daily_for_the_configuration_in_force(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not only at load: a proxy that runs for months without a reload keeps saying that its
    server certificate ends soon (the interval shortened here from a day)."""
    import datetime as dt

    ca = certs.make_ca("Expiry CA")
    cert, key = certs.issue(ca, "localhost", server=True,
                            not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=5))
    certs.write_certs(tmp_path / "server.crt", cert)
    certs.write_key(tmp_path / "server.key", key)
    path = tmp_path / "dwsproxy.toml"
    path.write_text("[backend]\nhost = \"127.0.0.1\"\nport = 1\n[tls]\n"
                    "ssl_cert_file = \"server.crt\"\nssl_key_file = \"server.key\"\n")
    loaded = loader.load(str(path), warn=False)

    async def main() -> None:
        state: ServerState[Any] = ServerState(loaded)
        task = asyncio.get_running_loop().create_task(server._warn_expiry_daily(state, 0.05))
        await asyncio.sleep(0.18)
        task.cancel()

    with caplog.at_level("WARNING"):
        run(main())
    daily = [r for r in caplog.records if "tls.ssl_cert_file" in r.getMessage()]
    assert len(daily) >= 2, caplog.text
