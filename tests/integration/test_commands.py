"""Commands that say what happened: one exit-status convention for every subcommand (0 ok, 1 a
check found a difference, 2 an error), `dwsproxy reload` waiting for its result,
`check-config` refusing what cannot run, and `demo` stopping on a port it cannot take."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, Proxy, clean_env

from proxy.tools.demo import free_port


def dwsproxy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env=clean_env())


def config(tmp_path: Path, pki: Path, listen: str = "", tls: str = "",
           host: str = "127.0.0.1") -> Path:
    path = tmp_path / "dwsproxy.toml"
    path.write_text(f'[listen]\nhost = "{host}"\n{listen}\n'
                    f'[tls]\nssl_cert_file = "{pki / "server.crt"}"\n'
                    f'ssl_key_file = "{pki / "server.key"}"\n{tls}\n')
    return path


# -- check-config refuses what cannot run ------------------------------------------------------

@pytest.mark.parametrize(("host", "tls", "key", "says"), [
    ("127.0.0.1, ::1", "", "listen.host", "is a list"),
    ("/tmp", "", "listen.host", "listen.unix_socket_dir"),
    ("127.0.0.1", "ssl = false\nrequire_ssl = true", "tls.require_ssl", "needs tls.ssl = true"),
], ids=["host-list", "host-folder", "require-ssl-without-ssl"])
def test_check_config_refuses_what_cannot_run(tmp_path: Path, pki: Path, host: str,
                                              tls: str, key: str, says: str) -> None:
    cfg = config(tmp_path, pki, tls=tls, host=host)
    proc = dwsproxy("check-config", str(cfg))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"config error: {key}:") and says in line, line
    assert "\n" not in line


def test_check_config_ok(tmp_path: Path, pki: Path) -> None:
    proc = dwsproxy("check-config", str(config(tmp_path, pki)))
    assert proc.returncode == 0 and proc.stdout.startswith("config ok:"), proc.stderr


# -- one exit-status convention --------------------------------------------------------------

def test_every_subcommand_exits_2_on_an_error(tmp_path: Path, pki: Path) -> None:
    """0 ok, 1 a check found a difference, 2 an error: the error half, for each subcommand."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    serve_cfg = config(tmp_path, pki, f"port = {port}")
    dead = f"http://127.0.0.1:{free_port()}"
    cases = {
        "usage": dwsproxy("--no-such-option"),
        "serve: config error": dwsproxy("--config", str(tmp_path / "missing.toml")),
        "serve: cannot listen": dwsproxy("--config", str(serve_cfg)),
        "check-config": dwsproxy("check-config", str(tmp_path / "missing.toml")),
        "reload: no pid file": dwsproxy("reload", "--pid-file", str(tmp_path / "none.pid"),
                                        "--url", dead),
        "status: unreachable": dwsproxy("status", "--url", dead),
        "sessions: unreachable": dwsproxy("sessions", "--url", dead),
        "certs: no CA": dwsproxy("certs", "client", str(tmp_path / "no-ca"), "--cn", "x"),
        "probe: unreachable": dwsproxy("probe", f"host=127.0.0.1 port={free_port()} "
                                       "user=postgres connect_timeout=3"),
    }
    busy.close()
    for name, proc in cases.items():
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stderr}"
    assert "Address already in use" in cases["serve: cannot listen"].stderr


def test_a_check_that_finds_a_difference_exits_1(start_proxy: Callable[..., Proxy],
                                                 pki: Path) -> None:
    proxy = start_proxy(tls={"require_ssl": False})
    proc = dwsproxy("probe", f"host=localhost port={proxy.port} user=postgres "
                    f"sslrootcert={pki / 'cacert.pem'}", "--expect", "require_ssl=on")
    assert proc.returncode == 1, proc.stdout + proc.stderr


# -- dwsproxy reload waits for its result ----------------------------------------------------

def test_reload_exits_0_when_applied_and_2_with_the_key_when_refused(
        start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(reload={"watch": False})
    # /status is on the [admin] listener, which wants the proxy's token
    url = f"http://127.0.0.1:{proxy.admin_port}"
    token = ("--token-file", str(proxy.token_file))
    applied = dwsproxy("reload", "--pid-file", str(proxy.pid_file), "--url", url, *token)
    assert applied.returncode == 0 and "applied" in applied.stdout, applied.stderr
    assert proxy.metric("dwsproxy_config_reloads_total", result="success") == 1

    good = proxy.config_path.read_text()
    proxy.config_path.write_text(good.replace("startup_timeout = 5.0",
                                              'startup_timeout = "soon"'))
    refused = dwsproxy("reload", "--pid-file", str(proxy.pid_file), "--url", url, *token)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "config error: listen.startup_timeout: expected a number of seconds" in \
        refused.stderr, refused.stderr
    assert proxy.metric("dwsproxy_config_reloads_total", result="failure") == 1

    # Without --pid-file: the main process's pid comes from /status.
    proxy.config_path.write_text(good)
    again = dwsproxy("reload", "--url", url, *token)
    assert again.returncode == 0, again.stderr
    assert proxy.metric("dwsproxy_config_reloads_total", result="success") == 2
    # Only --pid-file, as before: /status is found from the process's own --config.
    alone = dwsproxy("reload", "--pid-file", str(proxy.pid_file))
    assert alone.returncode == 0, alone.stderr
    assert proxy.metric("dwsproxy_config_reloads_total", result="success") == 3


# -- make demo: a port it cannot take --------------------------------------------------------

def test_demo_stops_with_the_bind_error_and_suggests_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        started = time.monotonic()
        try:
            proc = dwsproxy("demo", "--dir", str(tmp_path / "demo"), "--port", str(port),
                            "--metrics-port", str(free_port()), timeout=120)
        except subprocess.TimeoutExpired as exc:  # the old demo served on until Ctrl-C
            raise AssertionError(f"demo did not stop: {exc.stdout!r}") from None
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "dwsproxy is up" not in proc.stdout
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "--port" in proc.stderr
    assert time.monotonic() - started < 60  # before the Table 3 run, not after it
