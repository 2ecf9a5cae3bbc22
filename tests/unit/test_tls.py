"""tls.py without sockets: handshakes between two SSLObjects over memory BIOs."""

from __future__ import annotations

import contextlib
import datetime as dt
import ssl
from pathlib import Path

import crlkit
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.config.errors import ConfigError
from proxy.config.schema import TlsConfig
from proxy.tls import contexts as tls
from proxy.tls import loader
from proxy.tools import certs


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
    (d / "crl.pem").write_bytes(b"".join(
        c if isinstance(c, bytes) else c.public_bytes(Encoding.PEM) for c in crls))
    cfg = TlsConfig(ssl_cert_file=str(d / "server.crt"), ssl_key_file=str(d / "server.key"),
                    ssl_ca_file=str(d / "root.pem"), ssl_crl_file=str(d / "crl.pem"),
                    clientcert="verify-ca")
    return loader.server_tls(cfg, cert_requested=True)


def check(st: tls.ServerTls, server: ssl.SSLObject) -> tuple[str, str] | None:
    """What the session does after the handshake: OpenSSL's verdict on the presented chain."""
    chain = tls.peer_chain(server)
    assert chain is not None and st.verifier is not None
    verdict = st.verifier.check(*chain)
    return None if verdict is None else (verdict.reason, verdict.message)


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
    assert check(st, server) is None
    leaf, sent = tls.peer_chain(server)
    assert tls.peer_cert_facts(leaf).common_name == "postgres" and len(sent) == 1


def test_revoked_by_intermediate(setup: dict) -> None:
    ctx, serial = client_ctx(setup, setup["inter"])
    st = server_tls(setup, [certs.make_crl(setup["root"]),
                            certs.make_crl(setup["inter"], [serial])])
    server, _ = handshake(st.context, ctx)
    reason, message = check(st, server)
    assert reason == "client_cert_revoked" and f"serial {serial:x}" in message


def test_missing_crl_fails_closed(setup: dict) -> None:
    st = server_tls(setup, [certs.make_crl(setup["root"])])
    ctx, _ = client_ctx(setup, setup["inter"])
    server, _ = handshake(st.context, ctx)
    reason, message = check(st, server)
    assert reason == "client_cert_invalid" and '"CN=Inter,O=dwsproxy"' in message


def test_forged_crl_signature(setup: dict) -> None:
    # A CRL with the root's name, signed by another key: it must not be trusted.
    impostor = (setup["root"][0], certs.make_ca("Root")[1])
    st = server_tls(setup, [certs.make_crl(impostor)])
    ctx, _ = client_ctx(setup, setup["root"])
    server, _ = handshake(st.context, ctx)
    reason, _ = check(st, server)
    assert reason == "client_cert_invalid"


def test_forged_crl_beside_the_genuine_one_cannot_unrevoke(setup: dict) -> None:
    """Issuer name AND key: an empty CRL under the root's name but another key, newer than
    the genuine one, must not hide a revocation."""
    ctx, serial = client_ctx(setup, setup["root"])
    impostor = (setup["root"][0], certs.make_ca("Root")[1])
    genuine = crlkit.make_crl(setup["root"], [serial], number=1)
    forged = crlkit.make_crl(impostor, [], number=9, this_update=crlkit.now())
    for order in ([genuine, forged], [forged, genuine]):
        st = server_tls(setup, order)
        server, _ = handshake(st.context, ctx)
        assert check(st, server)[0] in ("client_cert_revoked", "client_cert_invalid")


# Each CRL set that once let a revoked certificate in (one CRL kept per issuer name, its
# extensions ignored): the revoked certificate is refused, and the good one is let in only where
# a complete, valid CRL of its issuer covers it.
def _revocation_cases(root: tuple, serial: int) -> dict[str, tuple[list, bool]]:
    later = crlkit.now()
    base = crlkit.make_crl(root, [serial], number=1)
    return {
        "base+delta": ([base, crlkit.make_crl(root, [], number=2, delta_of=1,
                                              this_update=later)], True),
        "base+ARL": ([base, crlkit.make_crl(root, [], number=3, scope=crlkit.ARL_SCOPE,
                                            this_update=later)], True),
        "base+critical": ([base, crlkit.make_crl(root, [], number=4, critical_unknown=True,
                                                 this_update=later)], True),
        "critical only": ([crlkit.make_crl(root, [], critical_unknown=True)], False),
        "ARL only": ([crlkit.make_crl(root, [], scope=crlkit.ARL_SCOPE)], False),
        "future thisUpdate": ([crlkit.make_crl(root, [], this_update=later
                                               + dt.timedelta(days=1))], False),
        "expired": ([crlkit.make_crl(root, [], this_update=later - dt.timedelta(days=9),
                                     next_update=later - dt.timedelta(days=2))], False),
        "no nextUpdate + base": ([crlkit.without_next_update(root, []),
                                  crlkit.make_crl(root, [serial])], True),
    }


@pytest.mark.parametrize("case", ["base+delta", "base+ARL", "base+critical", "critical only",
                                  "ARL only", "future thisUpdate", "expired",
                                  "no nextUpdate + base"])
def test_revocation_matrix(setup: dict, case: str) -> None:
    revoked_ctx, serial = client_ctx(setup, setup["root"])
    good_ctx, _ = client_ctx(setup, setup["root"], cn="alice")
    crls, good_allowed = _revocation_cases(setup["root"], serial)[case]
    st = server_tls(setup, crls)
    server, _ = handshake(st.context, revoked_ctx)
    verdict = check(st, server)
    assert verdict is not None, case
    assert "CN=" in verdict[1]  # names the certificate or its issuer
    server, _ = handshake(st.context, good_ctx)
    assert (check(st, server) is None) is good_allowed, (case, check(st, server))


def test_crl_without_next_update_alone_is_a_config_error(setup: dict) -> None:
    with pytest.raises(ConfigError) as info:
        server_tls(setup, [crlkit.without_next_update(setup["root"], [])])
    assert info.value.key == "tls.ssl_crl_file" and "no usable CRL" in str(info.value)


def test_crl_without_next_update_beside_nothing_else_names_why(setup: dict) -> None:
    """A CRL without nextUpdate is left out; the refusal says so for its issuer."""
    other = certs.make_ca("Other")
    st = server_tls(setup, [crlkit.without_next_update(setup["root"], []),
                            certs.make_crl(other)])
    ctx, _ = client_ctx(setup, setup["root"])
    server, _ = handshake(st.context, ctx)
    reason, message = check(st, server)
    assert reason == "client_cert_invalid" and "no nextUpdate" in message


@pytest.mark.parametrize("names,expect", [({}, "yields no usable CRL"),
                                          ({"README": b"junk"}, "yields no usable CRL"),
                                          ({"a.der": b"junk", "b.r1": b"junk"},
                                           "a.der' is not a CRL")])
def test_crl_dir_without_a_usable_crl_is_a_config_error(setup: dict, names: dict,
                                                        expect: str) -> None:
    d = setup["dir"] / "crls"
    d.mkdir()
    for name, data in names.items():
        (d / name).write_bytes(data)
    cfg = TlsConfig(ssl_cert_file=str(setup["dir"] / "server.crt"),
                    ssl_key_file=str(setup["dir"] / "server.key"),
                    ssl_ca_file=str(setup["dir"] / "root.pem"), ssl_crl_dir=str(d),
                    clientcert="verify-ca")
    with pytest.raises(ConfigError) as info:
        loader.server_tls(cfg, cert_requested=True)
    assert info.value.key == "tls.ssl_crl_dir" and expect in str(info.value)
    assert str(d) in str(info.value)


def test_crl_dir_reads_any_file_name(setup: dict) -> None:
    """.der and .r1 files are read too (c_rehash names them .r0, .r1, ...)."""
    ctx, serial = client_ctx(setup, setup["root"])
    d = setup["dir"] / "crls"
    d.mkdir()
    (d / "root.der").write_bytes(certs.make_crl(setup["root"], [serial]).public_bytes(
        Encoding.DER))
    cfg = TlsConfig(ssl_cert_file=str(setup["dir"] / "server.crt"),
                    ssl_key_file=str(setup["dir"] / "server.key"),
                    ssl_ca_file=str(setup["dir"] / "root.pem"), ssl_crl_dir=str(d),
                    clientcert="verify-ca")
    st = loader.server_tls(cfg, cert_requested=True)
    server, _ = handshake(st.context, ctx)
    assert check(st, server)[0] == "client_cert_revoked"


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
    pem = (tmp_path / "s.crt").read_bytes()
    assert tls.server_cert_facts(pem, str(tmp_path / "s.crt")) == tls.cert_facts(cert)


def test_server_cert_facts_errors(tmp_path: Path) -> None:
    from proxy.config.errors import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        loader.server_tls(TlsConfig(ssl_cert_file=str(tmp_path / "none.crt")),
                          cert_requested=False)
    with pytest.raises(ConfigError, match="no readable PEM certificate"):
        tls.server_cert_facts(b"not a certificate", str(tmp_path / "junk.crt"))


def test_plain_tls_config_loads_no_module_it_does_not_need(tmp_path: Path) -> None:
    import subprocess
    import sys

    certs.init(tmp_path)
    (tmp_path / "c.toml").write_text("[tls]\nssl_cert_file = 'server.crt'\n"
                                     "ssl_key_file = 'server.key'\n")
    # what `dwsproxy --config` loads before serving: the parser, the server, the config
    code = ("import sys; from proxy import cli; from proxy.tls import loader; "
            "from proxy.runtime import server; cli.build_parser(); "
            f"loader.load({str(tmp_path / 'c.toml')!r}); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'cryptography', 'OpenSSL'})"
            " + sorted(m for m in sys.modules if m in ('importlib.metadata', 'proxy.tools.probe', "
            "'proxy.tools.certs', 'proxy.tools.demo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    # cryptography + pyOpenSSL ~10 MB, importlib.metadata ~0.8 MB of RSS a process
    assert out.stdout.strip() == "[]"


def test_tls12_resumption_cannot_skip_the_crl_check(setup: dict) -> None:
    """OpenSSL's server session cache stays on (Python cannot switch it off without poking at
    memory): a resumed TLS 1.2 session is checked again like any other."""
    ctx, serial = client_ctx(setup, setup["root"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    st = server_tls(setup, [certs.make_crl(setup["root"], [serial])])
    first, client = handshake(st.context, ctx)
    assert check(st, first)[0] == "client_cert_revoked"
    second, _ = handshake(st.context, ctx, client.session)
    assert second.session_reused
    assert check(st, second)[0] == "client_cert_revoked"


def test_no_ctypes_in_the_tls_layer() -> None:
    import inspect

    assert "ctypes" not in inspect.getsource(tls)


def test_a_delta_openssl_would_ignore_cannot_hide_a_revocation(setup: dict) -> None:
    """An empty base without Freshest CRL plus a delta revoking the leaf: OpenSSL never looks
    at the delta, so the set is refused at load instead of letting the certificate in."""
    _, serial = client_ctx(setup, setup["root"])
    base = crlkit.make_crl(setup["root"], [], number=1)
    delta = crlkit.make_crl(setup["root"], [serial], number=2, delta_of=1)
    with pytest.raises(ConfigError) as info:
        server_tls(setup, [base, delta])
    assert "delta CRL" in str(info.value) and f"{serial:x}" in str(info.value)


def test_a_corrupt_crl_in_the_folder_is_a_config_error(setup: dict) -> None:
    d = setup["dir"] / "crls"
    d.mkdir()
    certs.write_crl(d / "old.pem", certs.make_crl(setup["root"]))
    (d / "new.pem").write_bytes(b"-----BEGIN X509 CRL-----\nMIIB half written\n")
    (d / "README").write_text("not a CRL: skipped")
    cfg = TlsConfig(ssl_cert_file=str(setup["dir"] / "server.crt"),
                    ssl_key_file=str(setup["dir"] / "server.key"),
                    ssl_ca_file=str(setup["dir"] / "root.pem"), ssl_crl_dir=str(d),
                    clientcert="verify-ca")
    with pytest.raises(ConfigError) as info:
        loader.server_tls(cfg, cert_requested=True)
    assert "new.pem" in str(info.value)


@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_a_fifo_or_device_as_a_file_key_is_a_config_error(setup: dict, target: str) -> None:
    import os

    path = str(setup["dir"] / "ca.fifo")
    if target == "fifo":
        os.mkfifo(path)
    else:
        path = target
    cfg = TlsConfig(ssl_cert_file=str(setup["dir"] / "server.crt"),
                    ssl_key_file=str(setup["dir"] / "server.key"), ssl_ca_file=path,
                    clientcert="verify-ca")
    with pytest.raises(ConfigError, match="not a regular file"):
        loader.server_tls(cfg, cert_requested=True)



def _ticket_sent(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bool:
    """A TLS 1.3 handshake, then one byte of application data from the server: whether the
    client holds a session ticket once it read that byte (tickets come before it)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):
        for obj in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    server.write(b"x")
    c_in.write(s_out.read())
    assert client.version() == "TLSv1.3" and client.read(1) == b"x"
    return client.session is not None and client.session.has_ticket


def test_no_tls13_session_ticket_is_sent(setup: dict) -> None:
    """As PostgreSQL (SSL_OP_NO_TICKET, no session cache): libpq never resumes, and a ticket
    costs the server ~55 us per handshake here (two of them, OpenSSL's default)."""
    client = ssl.create_default_context(cafile=str(setup["dir"] / "root.pem"))
    st = server_tls(setup, [certs.make_crl(setup["root"])])
    assert st.context.num_tickets == 0
    assert not _ticket_sent(st.context, client)
    control = server_tls(setup, [certs.make_crl(setup["root"])]).context
    control.options &= ~ssl.OP_NO_TICKET
    control.num_tickets = 2
    assert _ticket_sent(control, client)  # the check can see a ticket


def test_a_wrong_passphrase_names_the_file_it_came_from(tmp_path: Path) -> None:
    """check-config's one line must say which file to fix: a wrong .rand that gausskey's
    checks let through (it has no MAC) reached here as a bare 'wrong passphrase'."""
    from cryptography.hazmat.primitives.serialization import (
        BestAvailableEncryption,
        PrivateFormat,
    )

    ca = certs.make_ca("Passphrase CA")
    cert, key = certs.issue(ca, "localhost", server=True)
    certs.write_certs(tmp_path / "server.crt", cert)
    (tmp_path / "server.key").write_bytes(key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"right")))
    (tmp_path / "server.key").chmod(0o600)
    (tmp_path / "pass").write_text("wrong\n")
    (tmp_path / "pass").chmod(0o600)
    cfg = TlsConfig(ssl_cert_file=str(tmp_path / "server.crt"),
                    ssl_key_file=str(tmp_path / "server.key"),
                    ssl_passphrase_file=str(tmp_path / "pass"))
    with pytest.raises(ConfigError) as info:
        loader.server_tls(cfg, cert_requested=False)
    assert info.value.key == "tls.ssl_passphrase_file"
    assert str(tmp_path / "pass") in str(info.value)
