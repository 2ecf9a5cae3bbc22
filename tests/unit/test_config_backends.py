"""Several backend hosts and Unix sockets in the configuration: libpq's host and port lists,
target_session_attrs, load_balance_hosts, the health-check keys, [listen] unix_socket_*, rules
of type local, and what check-config refuses (issues 24, 26)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config.errors import ConfigError
from proxy.config.schema import BackendHost, parse
from proxy.tls import loader
from proxy.tools import certs

REPO = Path(__file__).resolve().parents[2]
BASE = """
[tls]
ssl_cert_file = "certs/server.crt"
ssl_key_file = "certs/server.key"
"""


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    certs.init(tmp_path / "certs")
    return tmp_path


def check_config(bundle: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = bundle / "dwsproxy.toml"
    path.write_text(BASE + text)
    return subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=30)


@pytest.mark.parametrize("text", [
    'host = "cn1, cn2,cn3"\nport = "8000,8001,8002"',
    'host = ["cn1", "cn2", "cn3"]\nport = [8000, 8001, 8002]',
])
def test_host_and_port_lists_in_libpq_comma_form_and_toml_arrays(text: str) -> None:
    cfg = parse(f"[backend]\n{text}\n", "/tmp/x.toml").backend
    assert cfg.hosts == (BackendHost("cn1", 8000), BackendHost("cn2", 8001),
                         BackendHost("cn3", 8002))
    assert [h.address for h in cfg.hosts] == ["cn1:8000", "cn2:8001", "cn3:8002"]


def test_one_port_serves_every_host() -> None:
    cfg = parse('[backend]\nhost = "a,b"\nport = 6000\n', "/tmp/x.toml").backend
    assert [h.port for h in cfg.hosts] == [6000, 6000]
    assert cfg.target_session_attrs == "any" and cfg.load_balance_hosts == "disable"
    assert cfg.health_check_interval == 5.0


def test_check_config_refuses_a_port_list_of_another_length(bundle: Path) -> None:
    proc = check_config(bundle, '[backend]\nhost = "127.0.0.1,127.0.0.2,127.0.0.3"\n'
                                'port = "5432,5433"\n')
    assert proc.returncode == 2
    assert proc.stderr.startswith("config error: backend.port: 2 ports for 3 hosts"), proc.stderr


def test_check_config_refuses_target_session_attrs_without_health_check_user(
        bundle: Path) -> None:
    proc = check_config(bundle, '[backend]\nhost = "127.0.0.1,127.0.0.2"\n'
                                'target_session_attrs = "read-write"\n')
    assert proc.returncode == 2
    assert proc.stderr.startswith("config error: backend.target_session_attrs:"), proc.stderr
    assert "health_check_user" in proc.stderr
    ok = check_config(bundle, '[backend]\nhost = "127.0.0.1,127.0.0.2"\n'
                              'target_session_attrs = "read-write"\nhealth_check_user = "h"\n')
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("key,value", [
    ("target_session_attrs", "master"), ("load_balance_hosts", "round-robin"),
    ("health_check_interval", -1), ("port", "5432,x"), ("port", [0]), ("host", "a,,b"),
])
def test_bad_values_name_their_key(bundle: Path, key: str, value: object) -> None:
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    with pytest.raises(ConfigError) as info:
        parse(f"[backend]\n{key} = {shown}\n", str(bundle / "x.toml"))
    assert info.value.key == f"backend.{key}"


def test_check_config_refuses_a_socket_directory_that_does_not_exist(bundle: Path) -> None:
    proc = check_config(bundle, f'[backend]\nhost = "{bundle}/nowhere"\n')
    assert proc.returncode == 2
    assert proc.stderr.startswith("config error: backend.host: socket directory"), proc.stderr
    proc = check_config(bundle, f'[listen]\nunix_socket_dir = "{bundle}/nowhere"\n')
    assert proc.returncode == 2
    assert proc.stderr.startswith("config error: listen.unix_socket_dir: socket directory"), \
        proc.stderr
    (bundle / "run").mkdir()
    proc = check_config(bundle, f'[listen]\nunix_socket_dir = "{bundle}/run"\n'
                                'unix_socket_mode = "0770"\n'
                                f'[backend]\nhost = "{bundle}/run,127.0.0.1"\n')
    assert proc.returncode == 0, proc.stderr


def test_a_socket_directory_host_is_its_socket_file(bundle: Path) -> None:
    host = BackendHost("/var/run/postgresql", 5433)
    assert host.unix and host.socket_path == "/var/run/postgresql/.s.PGSQL.5433"
    assert not BackendHost("127.0.0.1", 5433).unix


def test_unix_socket_mode_is_octal(bundle: Path) -> None:
    cfg = parse('[listen]\nunix_socket_mode = "0770"\n', "/tmp/x.toml")
    assert cfg.listen.unix_socket_mode == "0770"
    with pytest.raises(ConfigError) as info:
        parse('[listen]\nunix_socket_mode = "rw"\n', "/tmp/x.toml")
    assert info.value.key == "listen.unix_socket_mode"


def test_a_local_rule_carries_no_tls_or_address() -> None:
    cfg = parse('[[rules]]\ntype = "local"\nuser = "alice"\naction = "allow"\n', "/tmp/x.toml")
    assert cfg.rules[0].type == "local"
    for extra in ('address = "10.0.0.0/8"', 'clientcert = "verify-ca"'):
        with pytest.raises(ConfigError) as info:
            parse(f'[[rules]]\ntype = "local"\n{extra}\naction = "allow"\n', "/tmp/x.toml")
        assert info.value.key == "rules[1]"


def test_health_check_password_is_read_and_never_shown(bundle: Path) -> None:
    secret = bundle / "health.pw"
    secret.write_text("s3cret-pw\n")
    secret.chmod(0o600)
    path = bundle / "dwsproxy.toml"
    path.write_text(BASE + '[backend]\nhealth_check_user = "health"\n'
                           'health_check_password_file = "health.pw"\n')
    loaded = loader.load(str(path))
    assert loaded.health_check_password == "s3cret-pw"
    assert "s3cret-pw" not in repr(loaded)


@pytest.mark.parametrize("sslmode,sslsni,expected", [
    # verify-full: each host's own name is checked (and, with Python's ssl, sent as SNI)
    ("verify-full", True, {"cn1.example": "cn1.example", "cn2.example": "cn2.example",
                           "127.0.0.2": "127.0.0.2"}),
    # require: the name is SNI only; an address is never sent (RFC 6066)
    ("require", True, {"cn1.example": "cn1.example", "127.0.0.2": None}),
    ("require", False, {"cn1.example": None, "127.0.0.2": None}),
])
def test_backend_tls_names_each_host_for_itself(bundle: Path, sslmode: str, sslsni: bool,
                                                expected: dict[str, str | None]) -> None:
    path = bundle / "dwsproxy.toml"
    path.write_text(BASE + f'[backend]\nhost = "{",".join(expected)}"\nsslmode = "{sslmode}"\n'
                    f'sslsni = {"true" if sslsni else "false"}\n'
                    'sslrootcert = "certs/cacert.pem"\n')
    btls = loader.load(str(path)).backend_tls
    assert btls is not None
    assert {h: btls.server_hostname(h) for h in expected} == expected
