"""tls.py without sockets: handshakes between two SSLObjects over memory BIOs."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import certs, tls
from proxy.config import TlsConfig


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              session: ssl.SSLSession | None = None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server verifies the client's certificate on its last flight.
            return server, client
    raise AssertionError("handshake did not finish")


@pytest.fixture()
def setup(tmp_path: Path) -> dict:
    root = certs.make_ca("Root")
    inter = certs.make_ca("Inter", parent=root)
    server = certs.issue(root, "localhost", server=True)
    certs.write_certs(tmp_path / "server.crt", server[0])
    certs.write_key(tmp_path / "server.key", server[1])
    certs.write_certs(tmp_path / "root.pem", root[0])
    return {"dir": tmp_path, "root": root, "inter": inter}


def server_tls(setup: dict, crls: list) -> tls.ServerTls:
    d = setup["dir"]
    (d / "crl.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in crls))
    cfg = TlsConfig(ssl_cert_file=str(d / "server.crt"), ssl_key_file=str(d / "server.key"),
                    ssl_ca_file=str(d / "root.pem"), ssl_crl_file=str(d / "crl.pem"),
                    clientcert="verify-ca")
    return tls.build_server_tls(cfg, cert_requested=True)


def client_ctx(setup: dict, ca: tuple, cn: str = "postgres") -> tuple[ssl.SSLContext, int]:
    d = setup["dir"]
    cert, key = certs.issue(ca, cn)
    chain = [cert] + ([setup["inter"][0]] if ca is setup["inter"] else [])
    certs.write_certs(d / "c.crt", *chain)
    certs.write_key(d / "c.key", key)
    ctx = ssl.create_default_context(cafile=str(d / "root.pem"))
    ctx.load_cert_chain(d / "c.crt", d / "c.key")
    return ctx, cert.serial_number


def test_good_chain_passes(setup: dict) -> None:
    st = server_tls(setup, [certs.make_crl(setup["root"]), certs.make_crl(setup["inter"])])
    ctx, _ = client_ctx(setup, setup["inter"])
    server, _ = handshake(st.context, ctx)
    assert [c.subject.rfc4514_string() for c in tls.verified_chain(server)] == [
        "CN=postgres,O=dwsproxy", "CN=Inter,O=dwsproxy", "CN=Root,O=dwsproxy"]
    assert tls.check_revocation(st, server, time.time()) is None
    assert tls.peer_cert_facts(server).common_name == "postgres"


def test_revoked_by_intermediate(setup: dict) -> None:
    ctx, serial = client_ctx(setup, setup["inter"])
    st = server_tls(setup, [certs.make_crl(setup["root"]),
                            certs.make_crl(setup["inter"], [serial])])
    server, _ = handshake(st.context, ctx)
    reason, message = tls.check_revocation(st, server, time.time())
    assert reason == "client_cert_revoked" and f"serial {serial:x}" in message


def test_missing_crl_fails_closed(setup: dict) -> None:
    st = server_tls(setup, [certs.make_crl(setup["root"])])
    ctx, _ = client_ctx(setup, setup["inter"])
    server, _ = handshake(st.context, ctx)
    reason, message = tls.check_revocation(st, server, time.time())
    assert reason == "client_cert_invalid" and '"CN=Inter,O=dwsproxy"' in message


def test_expired_crl_fails_closed(setup: dict) -> None:
    st = server_tls(setup, [certs.make_crl(setup["root"], next_update_days=1)])
    ctx, _ = client_ctx(setup, setup["root"])
    server, _ = handshake(st.context, ctx)
    assert tls.check_revocation(st, server, time.time()) is None
    reason, message = tls.check_revocation(st, server, time.time() + 2 * 86400)
    assert reason == "client_cert_invalid" and "expired" in message


def test_forged_crl_signature(setup: dict) -> None:
    # A CRL with the root's name, signed by another key: it must not be trusted.
    impostor = (setup["root"][0], certs.make_ca("Root")[1])
    st = server_tls(setup, [certs.make_crl(impostor)])
    ctx, _ = client_ctx(setup, setup["root"])
    server, _ = handshake(st.context, ctx)
    reason, message = tls.check_revocation(st, server, time.time())
    assert reason == "client_cert_invalid" and "bad signature" in message


def test_server_context_security_defaults(setup: dict) -> None:
    st = server_tls(setup, [certs.make_crl(setup["root"])])
    ctx = st.context
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    names = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert names and all("GCM" in n or "CHACHA20" in n for n in names)
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_TICKET


@pytest.mark.parametrize("cn", ["localhost", 'odd, "quoted"+name', "#hash ", "ünïcode"])
def test_stdlib_server_cert_facts_match_cryptography(tmp_path: Path, cn: str) -> None:
    ca = certs.make_ca(f"CA {cn}")
    cert, _ = certs.issue(ca, cn, server=True, sans=["db.example"])
    certs.write_certs(tmp_path / "s.crt", cert, ca[0])  # chain: the leaf is the first
    assert tls.server_cert_facts(str(tmp_path / "s.crt")) == tls.cert_facts(cert)


def test_server_cert_facts_errors(tmp_path: Path) -> None:
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        tls.server_cert_facts(str(tmp_path / "none.crt"))
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="no readable PEM certificate"):
        tls.server_cert_facts(str(tmp_path / "junk.crt"))


def test_plain_tls_config_does_not_load_cryptography(tmp_path: Path) -> None:
    import subprocess
    import sys

    certs.init(tmp_path)
    (tmp_path / "c.toml").write_text("[tls]\nssl_cert_file = 'server.crt'\n"
                                     "ssl_key_file = 'server.key'\n")
    code = ("import sys; from proxy import config, server; "
            f"config.load({str(tmp_path / 'c.toml')!r}); "
            "print(any(m.startswith('cryptography') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("cache_off", [True, False])
def test_tls12_resumption_cannot_skip_the_crl_check(setup: dict, monkeypatch: pytest.MonkeyPatch,
                                                    cache_off: bool) -> None:
    if not cache_off:  # as if the session cache could not be switched off
        monkeypatch.setattr(tls, "disable_session_cache", lambda ctx: False)
    ctx, serial = client_ctx(setup, setup["root"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    st = server_tls(setup, [certs.make_crl(setup["root"], [serial])])
    first, client = handshake(st.context, ctx)
    assert tls.check_revocation(st, first, time.time())[0] == "client_cert_revoked"
    second, _ = handshake(st.context, ctx, client.session)
    assert second.session_reused is (not cache_off)
    reason, _ = tls.check_revocation(st, second, time.time())
    assert reason in ("client_cert_revoked", "client_cert_invalid")
