"""Config loading: every error names its key; the CLI exits 2 with one line."""

import os
import subprocess
import sys
from pathlib import Path

import kubelet
import pytest

from proxy.config.errors import ConfigError
from proxy.tls import loader
from proxy.tools import certs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    certs.init(tmp_path / "certs")
    return tmp_path


def write(tmp: Path, text: str) -> Path:
    path = tmp / "dwsproxy.toml"
    path.write_text(text)
    return path


BASE = """
[tls]
ssl_cert_file = "certs/server.crt"
ssl_key_file = "certs/server.key"
"""


def load_error(tmp: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loader.load(str(write(tmp, text)))
    return info.value


def test_minimal_config_loads_with_relative_paths(bundle: Path) -> None:
    cfg = loader.load(str(write(bundle, BASE)))
    assert cfg.config.tls.ssl_cert_file == str(bundle / "certs" / "server.crt")
    assert cfg.server_tls is not None
    assert cfg.config.listen.port == 6432 and cfg.config.rules == ()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        loader.load(str(tmp_path / "nope.toml"))


def test_unknown_key(bundle: Path) -> None:
    err = load_error(bundle, BASE + "sslmode = 'require'\n")
    assert err.key == "tls.sslmode" and "unknown key" in str(err)


def test_unknown_section(bundle: Path) -> None:
    assert load_error(bundle, BASE + "[pool]\nsize = 1\n").key == "pool"


def test_bad_version_name(bundle: Path) -> None:
    err = load_error(bundle, BASE + "ssl_min_protocol_version = 'TLSv1.1'\n")
    assert err.key == "tls.ssl_min_protocol_version" and "TLSv1.1" in str(err)


def test_max_below_min(bundle: Path) -> None:
    err = load_error(bundle, BASE + "ssl_min_protocol_version = 'TLSv1.3'\n"
                     "ssl_max_protocol_version = 'TLSv1.2'\n")
    assert err.key == "tls.ssl_max_protocol_version"


def test_missing_ca_file(bundle: Path) -> None:
    err = load_error(bundle, BASE + "ssl_ca_file = 'certs/nope.pem'\nclientcert = 'verify-ca'\n")
    assert err.key == "tls.ssl_ca_file" and "no such file" in str(err)


def test_clientcert_needs_ca(bundle: Path) -> None:
    assert load_error(bundle, BASE + "clientcert = 'verify-ca'\n").key == "tls.ssl_ca_file"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_group_or_world_readable_key_refused(bundle: Path, mode: int) -> None:
    os.chmod(bundle / "certs" / "server.key", mode)
    err = load_error(bundle, BASE)
    assert err.key == "tls.ssl_key_file" and "chmod 600" in str(err)


def test_wrong_types(bundle: Path) -> None:
    assert load_error(bundle, "[listen]\nport = 'x'\n" + BASE).key == "listen.port"
    assert load_error(bundle, "[listen]\nmax_connections = 0\n" + BASE).key == \
        "listen.max_connections"
    assert load_error(bundle, BASE + "ssl = 3\n").key == "tls.ssl"


@pytest.mark.parametrize("backend,key,says", [
    ("sslmode = 'verify-ca'", "backend.sslrootcert", "is required"),
    ("sslmode = 'disable'\nsslrootcert = 'certs/cacert.pem'", "backend.sslrootcert",
     "no effect"),
    ("sslmode = 'prefer'\nsslnegotiation = 'direct'", "backend.sslnegotiation", "prefer"),
    ("sslmode = 'require'\nsslcrl = 'certs/crl.pem'", "backend.sslcrl", "sslrootcert"),
    ("sslmode = 'require'\nsslcert = 'certs/client.crt'", "backend.sslkey", "go together"),
    ("sslmode = 'require'\nssl_min_protocol_version = 'TLSv1.1'",
     "backend.ssl_min_protocol_version", "not one of"),
    ("sslmode = 'require'\nsslcert = 'certs/client.crt'\nsslkey = 'certs/client.key'\n"
     "sslkey_cipher_file = 'x.cipher'", "backend.sslkey_cipher_file", "go together"),
])
def test_backend_tls_settings_are_checked(bundle: Path, backend: str, key: str,
                                          says: str) -> None:
    err = load_error(bundle, f"[backend]\n{backend}\n" + BASE)
    assert err.key == key and says in str(err), str(err)


def test_rules_validation(bundle: Path) -> None:
    assert load_error(bundle, BASE + "[[rules]]\nuser = 'x'\n").key == "rules[1].action"
    assert load_error(bundle, BASE + "[[rules]]\naddress = '10.0.0.0/33'\naction = 'allow'\n"
                      ).key == "rules[1].address"
    assert load_error(bundle, BASE + "[[rules]]\nfoo = 1\naction = 'allow'\n").key == \
        "rules[1].foo"
    err = load_error(bundle, BASE + "ssl_min_protocol_version = 'TLSv1.3'\n[[rules]]\n"
                     "ssl_protocols = ['TLSv1.2']\naction = 'allow'\n")
    assert err.key == "rules[1].ssl_protocols"


def test_bad_ciphers(bundle: Path) -> None:
    assert load_error(bundle, BASE + "ssl_ciphers = 'NOPE-CIPHER'\n").key == "tls.ssl_ciphers"


def test_encrypted_key_with_passphrase_file(bundle: Path) -> None:
    ca = certs.make_ca("root")
    cert, key = certs.issue(ca, "localhost", server=True)
    certs.write_certs(bundle / "enc.crt", cert)
    certs.write_key(bundle / "enc.key", key, passphrase=b"s3cret pass")
    (bundle / "pass").write_text("s3cret pass\n")
    os.chmod(bundle / "pass", 0o600)
    base = ("[tls]\nssl_cert_file = 'enc.crt'\nssl_key_file = 'enc.key'\n")
    assert loader.load(str(write(bundle, base + "ssl_passphrase_file = 'pass'\n"))).server_tls
    (bundle / "wrong").write_text("nope\n")
    os.chmod(bundle / "wrong", 0o600)
    err = load_error(bundle, base + "ssl_passphrase_file = 'wrong'\n")
    assert err.key == "tls.ssl_passphrase_file" and "wrong passphrase" in str(err)
    err = load_error(bundle, base)
    assert err.key == "tls.ssl_key_file" and "encrypted" in str(err)


def test_crl_dir_reads_pem_and_der(bundle: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    ca = certs.load_ca(bundle / "certs")
    crl_dir = bundle / "crls"
    crl_dir.mkdir()
    certs.write_crl(crl_dir / "a.pem", certs.make_crl(ca))
    other = certs.make_ca("other root")
    (crl_dir / "b.crl").write_bytes(
        certs.make_crl(other).public_bytes(serialization.Encoding.DER))
    (crl_dir / "README").write_text("ignored")
    cfg = loader.load(str(write(bundle, BASE + "ssl_ca_file = 'certs/cacert.pem'\n"
                                "ssl_crl_dir = 'crls'\nclientcert = 'verify-ca'\n")))
    assert sorted(c.issuer for c in cfg.server_tls.crls) == [
        "CN=dwsproxy root CA,O=dwsproxy", "CN=other root,O=dwsproxy"]


def test_shipped_example_config_is_valid(tmp_path: Path) -> None:
    text = (REPO / "config" / "dwsproxy.toml").read_text()
    certs.init(tmp_path / "certs")
    cfg = loader.load(str(write(tmp_path, text))).config
    assert cfg.rules[0].application_name == "gsql" and cfg.rules[0].ssl_protocols == ("TLSv1.2",)


@pytest.mark.parametrize("text,key", [
    (BASE + "bogus = 1\n", "tls.bogus"),
    (BASE + "ssl_max_protocol_version = 'SSLv3'\n", "tls.ssl_max_protocol_version"),
])
def test_cli_exits_2_with_one_line(bundle: Path, text: str, key: str) -> None:
    path = write(bundle, text)
    for argv in (["--config", str(path)], ["check-config", str(path)]):
        proc = subprocess.run([sys.executable, "-m", "proxy", *argv], capture_output=True,
                              text=True, cwd=REPO, timeout=30)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"config error: {key}:")


def test_cli_missing_file_and_group_readable_key(bundle: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "proxy", "--config", str(bundle / "no.toml")],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    os.chmod(bundle / "certs" / "server.key", 0o640)
    proc = subprocess.run([sys.executable, "-m", "proxy", "check-config",
                           str(write(bundle, BASE))], capture_output=True, text=True, cwd=REPO,
                          timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("config error: tls.ssl_key_file:")


def test_certs_cli_writes_private_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    run = lambda *a: subprocess.run([sys.executable, "-m", "proxy", "certs", *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run("init", str(out)).returncode == 0
    assert run("client", str(out), "--cn", "alice").returncode == 0
    for key in ("cakey.pem", "server.key", "client.key", "client.pk8", "alice.key"):
        assert (out / key).stat().st_mode & 0o777 == 0o600
    assert run("revoke", str(out), str(out / "alice.crt")).returncode == 0
    from cryptography import x509

    crl = x509.load_pem_x509_crl((out / "crl.pem").read_bytes())
    alice = x509.load_pem_x509_certificate((out / "alice.crt").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(alice.serial_number) is not None


def test_default_paths_are_relative_to_the_config_file(bundle: Path, monkeypatch) -> None:
    monkeypatch.chdir("/")
    cfg = loader.load(str(write(bundle, "[listen]\nport = 7000\n")))  # default certs/server.*
    assert cfg.config.tls.ssl_key_file == str(bundle / "certs" / "server.key")


def test_impossible_combinations(bundle: Path) -> None:
    err = load_error(bundle, BASE + "ssl = false\nclientcert = 'verify-ca'\n"
                     "ssl_ca_file = 'certs/cacert.pem'\n")
    assert err.key == "tls.clientcert"
    assert load_error(bundle, "[listen]\nworkers = 2\nport = 0\n" + BASE).key == "listen.port"
    assert load_error(bundle, "[backend]\nsslcert = 'x.crt'\n" + BASE).key == "backend.sslcert"


def test_passphrase_file_must_be_private(bundle: Path) -> None:
    (bundle / "pass").write_text("x\n")
    os.chmod(bundle / "pass", 0o644)
    err = load_error(bundle, BASE + "ssl_passphrase_file = 'pass'\n")
    assert err.key == "tls.ssl_passphrase_file" and "chmod 600" in str(err)


def test_log_values_cannot_forge_lines() -> None:
    from proxy.cli import _kv

    assert _kv("alice") == "alice"
    assert _kv("evil\r\noutcome=ok") == '"evil\\r\\noutcome=ok"'
    assert _kv("\x1b[31mred") == '"\\u001b[31mred"'
    assert _kv("a b") == '"a b"' and _kv("") == '""'


def test_a_connection_line_writes_every_field_as_kv_would() -> None:
    """KeyValueFormatter's loop without a call per field says exactly what _kv says."""
    import enum
    import logging
    from datetime import UTC, datetime

    from proxy.cli import KeyValueFormatter, _kv

    class Kind(enum.StrEnum):
        TLS = "tls"

    fields = {"peer": "127.0.0.1:5", "worker_pid": 7, "direct_tls": False, "cipher": "",
              "user": "evil user\r\noutcome=ok", "database": "x" * 300, "app": "ünï",
              "duration": 0.25, "kind": Kind.TLS, "none": None, "big": 10 ** 20}
    record = logging.LogRecord("dwsproxy.session", logging.INFO, "", 0, "connection closed",
                               (), None)
    record.fields = fields

    def rfc3339(created: float) -> str:
        return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")

    stamp = rfc3339(record.created)
    expected = (f"{stamp} info dwsproxy.session connection closed "
                + " ".join(f"{k}={_kv(v)}" for k, v in fields.items()))
    formatter = KeyValueFormatter()
    assert formatter.format(record) == expected
    assert formatter.format(record) == expected  # the cached timestamp
    later = logging.LogRecord("dwsproxy", logging.WARNING, "", 0, "m", (), None)
    later.created = record.created + 1
    assert formatter.format(later) == rfc3339(later.created) + " warning dwsproxy m"


def test_two_crls_of_one_issuer_give_one_gauge_fact(bundle: Path) -> None:
    ca = certs.load_ca(bundle / "certs")
    older, newer = certs.make_crl(ca, next_update_days=1), certs.make_crl(ca, [7])
    from cryptography.hazmat.primitives.serialization import Encoding

    (bundle / "crls.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM)
                                               for c in (newer, older)))
    cfg = loader.load(str(write(bundle, BASE + "ssl_ca_file = 'certs/cacert.pem'\n"
                                "ssl_crl_file = 'crls.pem'\nclientcert = 'verify-ca'\n")))
    assert len(cfg.server_tls.crls) == 1  # one series per issuer label
    assert cfg.server_tls.crls[0].next_update == newer.next_update_utc.timestamp()


def test_ipv4_mapped_rule_address_is_written_back_to_ipv4(bundle: Path) -> None:
    import ipaddress

    cfg = loader.load(str(write(bundle, BASE + "[[rules]]\naddress = '::ffff:10.1.0.0/112'\n"
                                "action = 'reject'\n")))
    assert cfg.config.rules[0].address == ipaddress.ip_network("10.1.0.0/16")
    assert cfg.config.rules[0].matches(encrypted=True, user="u", database="d", application_name="",
                                peer=ipaddress.ip_address("10.1.2.3"))
    err = load_error(bundle, BASE + "[[rules]]\naddress = '::ffff:0:0/80'\naction = 'allow'\n")
    assert err.key == "rules[1].address" and "IPv4-mapped" in str(err)


def test_clientname_is_checked(bundle: Path) -> None:
    err = load_error(bundle, BASE + "clientname = 'SAN-DNS'\n")
    assert err.key == "tls.clientname"


def test_paths_keep_the_kubelet_symlinks(bundle: Path) -> None:
    """Nothing is resolved through `..data`: after the swap deletes the old folder, the same
    configuration still loads and reads the new files."""
    vol = bundle / "vol"
    vol.mkdir()
    certs_dir = bundle / "certs"
    text = (BASE.replace("certs/", str(certs_dir) + "/")
            + "ssl_ca_file = '" + str(certs_dir / "cacert.pem") + "'\n"
            "ssl_crl_file = 'crl.pem'\nclientcert = 'verify-ca'\n")
    crl = (certs_dir / "crl.pem").read_bytes()
    kubelet.update(vol, {"dwsproxy.toml": text.encode(), "crl.pem": crl}, "2026_12_02_1")
    cfg = loader.load(str(vol / "dwsproxy.toml")).config
    assert cfg.path == str(vol / "dwsproxy.toml") and cfg.tls.ssl_crl_file == str(vol / "crl.pem")
    kubelet.update(vol, {"dwsproxy.toml": text.replace("verify-ca", "optional").encode(),
                         "crl.pem": crl}, "2026_12_02_2")
    again = loader.load(cfg.path).config
    assert again.tls.clientcert == "optional"


# --- the third round's keys (issue 23) -----------------------------------------------------------
@pytest.mark.parametrize("extra, key, problem", [
    ("[metrics]\nadmin = false\n", "metrics.admin", "own listener"),
    ("[admin]\nhost = \"0.0.0.0\"\n", "admin.token_file", "is required"),
    ("[admin]\nport = 9187\n", "admin.port", "[metrics] listener's port"),
    ("[listen]\nproxy_protocol = true\n", "listen.trusted_proxies", "is required"),
    ("[listen]\ntrusted_proxies = [\"10.0.0.300/32\"]\n", "listen.trusted_proxies[0]",
     "not a CIDR"),
    ("[listen]\ntrusted_proxies = \"10.0.0.1/32\"\n", "listen.trusted_proxies", "a list"),
    ("ident_map = \"corp\"\nclientcert = \"verify-full\"\nssl_ca_file = \"certs/cacert.pem\"\n",
     "tls.ident_map", "no [[ident]] map named 'corp'"),
    ("ident_map = \"corp\"\n[[ident]]\nmap = \"corp\"\nsystem_user = \"a\"\npg_user = \"b\"\n",
     "tls.ident_map", "only used by clientcert"),
    ("[[ident]]\nmap = \"corp\"\nsystem_user = \"/(\"\npg_user = \"b\"\n",
     "ident[1].system_user", "not a regular expression"),
    ("[[ident]]\nmap = \"corp\"\nsystem_user = \"/^x$\"\npg_user = '\\1'\n",
     "ident[1].pg_user", "no capture group"),
    ("[[ident]]\nmap = \"corp\"\nsystem_user = \"a\"\n", "ident[1].pg_user", "missing"),
    ("[[ident]]\nmap = \"corp\"\nsystem_user = \"a\"\npg_user = \"b\"\nuser = \"c\"\n",
     "ident[1].user", "unknown key"),
    ("[[rules]]\naction = \"allow\"\nident_map = \"m\"\nclientcert = \"verify-ca\"\n"
     "[[ident]]\nmap = \"m\"\nsystem_user = \"a\"\npg_user = \"b\"\n",
     "rules[1].ident_map", "only used by clientcert"),
])
def test_third_round_keys_are_checked(bundle: Path, extra: str, key: str, problem: str) -> None:
    err = load_error(bundle, BASE + extra)
    assert err.key == key and problem in str(err), str(err)


@pytest.mark.parametrize("mode, token, problem", [
    (0o644, "a" * 32, "group or world"),
    (0o600, "short", "at least 16"),
    (0o600, "has a space in it 0123456789", "at least 16"),
])
def test_admin_token_file_is_a_secret(bundle: Path, mode: int, token: str, problem: str) -> None:
    path = bundle / "admin.token"
    path.write_text(token + "\n")
    path.chmod(mode)
    err = load_error(bundle, BASE + f"[admin]\ntoken_file = \"{path}\"\n")
    assert err.key == "admin.token_file" and problem in str(err), str(err)


def test_admin_token_is_read_and_never_shown(bundle: Path) -> None:
    path = bundle / "admin.token"
    path.write_text("0123456789abcdef0123\n")
    path.chmod(0o600)
    loaded = loader.load(str(write(bundle, BASE + f"[admin]\nhost = \"10.0.0.1\"\n"
                                   f"token_file = \"{path}\"\n")))
    assert loaded.admin_token == "0123456789abcdef0123"
    assert "0123456789abcdef0123" not in repr(loaded)
