"""`dwsproxy certs`: the CA folder's life (init/client refuse to overwrite, the issuance record,
revoke, crl, list), `encrypt-key` that never loses the key, `show-passphrase`, and
check-config's expiry errors and warnings. Commands run as the real CLI in a subprocess."""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from terminal import read_from_terminal

from proxy.tls import gausskey, loader
from proxy.tools import carecord, certs, keyfiles

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


def one_clear_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    """Exit 2 with one line on stderr naming the command, no traceback, no raw errno."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"certs {command}: "), lines[0]
    assert "Traceback" not in proc.stderr and "Errno" not in proc.stderr
    return lines[0]


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ca"
    assert run("certs", "init", str(folder)).returncode == 0
    return folder


def crl_ending(ca: tuple, end: dt.datetime, *, keep: tuple = (),  # type: ignore[type-arg]
               number: int = 1) -> x509.CertificateRevocationList:
    """A CRL of `ca` whose nextUpdate is `end` (in the past for an expired one)."""
    from cryptography.hazmat.primitives import hashes

    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca[0].subject)
               .last_update(min(end, now()) - dt.timedelta(days=7)).next_update(end)
               .add_extension(x509.CRLNumber(number), critical=False))
    for entry in keep:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca[1], hashes.SHA256())


def expired_copy(ca: tuple, crl: x509.CertificateRevocationList  # type: ignore[type-arg]
                 ) -> x509.CertificateRevocationList:
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return crl_ending(ca, now() - dt.timedelta(days=1), keep=tuple(crl), number=number)


def crl_of(folder: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((folder / "crl.pem").read_bytes())


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


# -- init and client refuse to overwrite --------------------------------------------------------
def test_init_twice_keeps_the_ca_and_its_revocations(ca_dir: Path) -> None:
    assert run("certs", "client", str(ca_dir), "--cn", "alice").returncode == 0
    assert run("certs", "revoke", str(ca_dir), str(ca_dir / "alice.crt")).returncode == 0
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    line = one_clear_line(run("certs", "init", str(ca_dir)), "init")
    assert "cakey.pem" in line and "--force" in line and "un-revoked" in line
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before
    # --force is the way to a new CA, said plainly
    assert run("certs", "init", str(ca_dir), "--force").returncode == 0
    assert (ca_dir / "cakey.pem").read_bytes() != before["cakey.pem"]
    assert (ca_dir / "cakey.pem").stat().st_mode & 0o777 == 0o600


def test_client_twice_keeps_the_first_key(ca_dir: Path) -> None:
    assert run("certs", "client", str(ca_dir), "--cn", "alice").returncode == 0
    key = (ca_dir / "alice.key").read_bytes()
    first = serial_of(ca_dir / "alice.crt")
    line = one_clear_line(run("certs", "client", str(ca_dir), "--cn", "alice"), "client")
    assert "alice.crt" in line and "--force" in line
    assert (ca_dir / "alice.key").read_bytes() == key
    forced = run("certs", "client", str(ca_dir), "--cn", "alice", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (ca_dir / "alice.key").read_bytes() != key
    # the replaced certificate is still valid: the command says how to revoke it
    assert f"--serial {first:x}" in forced.stdout
    for name in ("alice.key", "alice.pk8"):
        assert (ca_dir / name).stat().st_mode & 0o777 == 0o600
    # a CN is a file name: no way out of the folder
    one_clear_line(run("certs", "client", str(ca_dir), "--cn", "../evil"), "client")
    assert not (ca_dir.parent / "evil.crt").exists()


# -- the issuance record, list, revoke --------------------------------------------------------
def test_record_lists_what_was_issued_and_revoked(ca_dir: Path, tmp_path: Path) -> None:
    assert run("certs", "client", str(ca_dir), "--cn", "alice").returncode == 0
    assert run("certs", "bundle", str(ca_dir), "--cn", "bob", "--out",
               str(tmp_path / "bob.zip")).returncode == 0
    alice = serial_of(ca_dir / "alice.crt")
    assert run("certs", "revoke", str(ca_dir), "--serial", f"{alice:X}").returncode == 0
    entries = carecord.read(ca_dir)
    assert entries is not None
    assert [(e.role, e.file) for e in entries] == [
        ("ca", "cacert.pem"), ("server", "server.crt"), ("client", "client.crt"),
        ("client", "alice.crt"), ("client", "bob.zip")]
    by_file = {e.file: e for e in entries}
    assert by_file["alice.crt"].serial == f"{alice:x}" and by_file["alice.crt"].revoked
    assert by_file["alice.crt"].subject == "CN=alice,O=dwsproxy"
    assert by_file["bob.zip"].revoked is None
    # every line is one JSON object; the file is not group/world writable
    assert (ca_dir / carecord.RECORD).stat().st_mode & 0o022 == 0
    listing = run("certs", "list", str(ca_dir))
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:-1]}
    assert rows[f"{alice:x}"][1:3] == ["client", "revoked"]
    assert rows[by_file["bob.zip"].serial][1:3] == ["client", "valid"]
    assert listing.stdout.splitlines()[-1].startswith("crl: 1 revoked, next update ")


def test_revoke_by_serial_in_the_forms_people_copy(ca_dir: Path) -> None:
    for cn in ("a", "b", "c"):
        assert run("certs", "client", str(ca_dir), "--cn", cn).returncode == 0
    a, b, c = (serial_of(ca_dir / f"{cn}.crt") for cn in ("a", "b", "c"))
    colons = ":".join(f"{b:X}"[i:i + 2] for i in range(0, len(f"{b:X}"), 2))
    for form in (f"0x{a:x}", colons, f"{c:X}"):
        proc = run("certs", "revoke", str(ca_dir), "--serial", form)
        assert proc.returncode == 0, proc.stderr
    assert {r.serial_number for r in crl_of(ca_dir)} == {a, b, c}
    again = run("certs", "revoke", str(ca_dir), "--serial", f"{a:x}")
    assert again.returncode == 0 and "revoked already" in again.stdout


def test_revoke_bad_arguments_give_one_clear_line(ca_dir: Path, tmp_path: Path) -> None:
    assert run("certs", "client", str(ca_dir), "--cn", "alice").returncode == 0
    serial = serial_of(ca_dir / "alice.crt")
    crl = (ca_dir / "crl.pem").read_bytes()
    # the issue's case: a serial where the certificate file goes
    line = one_clear_line(run("certs", "revoke", str(ca_dir), f"{serial:x}"), "revoke")
    assert f"--serial {serial:x}" in line
    one_clear_line(run("certs", "revoke", str(ca_dir), "--serial", "not-hex"), "revoke")
    one_clear_line(run("certs", "revoke", str(ca_dir), "--serial", "0"), "revoke")
    one_clear_line(run("certs", "revoke", str(ca_dir)), "revoke")
    one_clear_line(run("certs", "revoke", str(ca_dir), str(tmp_path)), "revoke")  # a folder
    (tmp_path / "junk.crt").write_text("junk")
    one_clear_line(run("certs", "revoke", str(ca_dir), str(tmp_path / "junk.crt")), "revoke")
    other = tmp_path / "other"
    assert run("certs", "init", str(other)).returncode == 0
    line = one_clear_line(run("certs", "revoke", str(ca_dir), str(other / "client.crt")),
                          "revoke")
    assert "not issued by this folder's CA" in line
    line = one_clear_line(run("certs", "revoke", str(tmp_path / "nowhere"), "--serial", "1f"),
                          "revoke")
    assert "certs init" in line
    assert (ca_dir / "crl.pem").read_bytes() == crl


def test_revoking_the_ca_or_the_server_certificate_needs_force(ca_dir: Path) -> None:
    crl = (ca_dir / "crl.pem").read_bytes()
    line = one_clear_line(run("certs", "revoke", str(ca_dir), str(ca_dir / "server.crt")),
                          "revoke")
    assert "server certificate" in line and "--force" in line
    ca_serial = serial_of(ca_dir / "cacert.pem")
    line = one_clear_line(run("certs", "revoke", str(ca_dir), "--serial", f"{ca_serial:x}"),
                          "revoke")
    assert "the CA's own certificate" in line
    assert (ca_dir / "crl.pem").read_bytes() == crl
    forced = run("certs", "revoke", str(ca_dir), str(ca_dir / "server.crt"), "--force")
    assert forced.returncode == 0, forced.stderr
    assert {r.serial_number for r in crl_of(ca_dir)} == {serial_of(ca_dir / "server.crt")}


# -- certs crl -----------------------------------------------------------------------------------
def test_crl_renewal_keeps_every_revoked_entry(ca_dir: Path) -> None:
    for cn in ("a", "b"):
        assert run("certs", "client", str(ca_dir), "--cn", cn).returncode == 0
        assert run("certs", "revoke", str(ca_dir), str(ca_dir / f"{cn}.crt")).returncode == 0
    old = crl_of(ca_dir)
    # the CRL lapsed: re-sign it as expired, with the same entries and dates
    ca = certs.load_ca(ca_dir)
    certs.write_crl(ca_dir / "crl.pem", expired_copy(ca, old))
    proc = run("certs", "crl", str(ca_dir))
    assert proc.returncode == 0, proc.stderr
    assert "2 revoked serials" in proc.stdout
    new = crl_of(ca_dir)
    assert new.is_signature_valid(ca[1].public_key())
    assert {(r.serial_number, r.revocation_date_utc) for r in new} == {
        (r.serial_number, r.revocation_date_utc) for r in old}
    assert new.next_update_utc == ca[0].not_valid_after_utc  # the default: the CA's own end
    number = new.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    proc = run("certs", "crl", str(ca_dir), "--days", "2")
    assert proc.returncode == 0
    end = crl_of(ca_dir).next_update_utc
    assert end is not None
    assert dt.timedelta(days=2) - (end - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    one_clear_line(run("certs", "crl", str(ca_dir), "--days", "0"), "crl")


def test_crl_renewal_adds_revocations_the_record_has(ca_dir: Path) -> None:
    """A crl.pem lost or restored from an old backup: the record's revocations come back."""
    assert run("certs", "client", str(ca_dir), "--cn", "a").returncode == 0
    assert run("certs", "revoke", str(ca_dir), str(ca_dir / "a.crt")).returncode == 0
    (ca_dir / "crl.pem").unlink()
    assert run("certs", "crl", str(ca_dir)).returncode == 0
    assert {r.serial_number for r in crl_of(ca_dir)} == {serial_of(ca_dir / "a.crt")}


def test_crl_of_another_ca_is_not_replaced(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run("certs", "init", str(other)).returncode == 0
    shutil.copy(other / "crl.pem", ca_dir / "crl.pem")
    line = one_clear_line(run("certs", "crl", str(ca_dir)), "crl")
    assert "not signed by this folder's CA" in line
    assert (ca_dir / "crl.pem").read_bytes() == (other / "crl.pem").read_bytes()


def test_default_crl_lasts_as_long_as_the_ca(ca_dir: Path) -> None:
    """No time bomb: init's CRL (and revoke's) ends with the CA, not 30 days later."""
    ca_end = x509.load_pem_x509_certificate((ca_dir / "cacert.pem").read_bytes()) \
        .not_valid_after_utc
    assert crl_of(ca_dir).next_update_utc == ca_end
    assert run("certs", "client", str(ca_dir), "--cn", "a").returncode == 0
    assert run("certs", "revoke", str(ca_dir), str(ca_dir / "a.crt")).returncode == 0
    assert crl_of(ca_dir).next_update_utc == ca_end


def test_folder_without_a_record_is_read_from_its_files(ca_dir: Path) -> None:
    """A folder made before the record existed: list and revoke still know the server
    certificate and the revoked ones."""
    assert run("certs", "client", str(ca_dir), "--cn", "a").returncode == 0
    assert run("certs", "revoke", str(ca_dir), str(ca_dir / "a.crt")).returncode == 0
    (ca_dir / carecord.RECORD).unlink()
    listing = run("certs", "list", str(ca_dir))
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split()[1:3] for line in listing.stdout.splitlines()[1:-1]}
    assert rows[f"{serial_of(ca_dir / 'a.crt'):x}"] == ["client", "revoked"]
    assert rows[f"{serial_of(ca_dir / 'server.crt'):x}"] == ["server", "valid"]
    one_clear_line(run("certs", "revoke", str(ca_dir), str(ca_dir / "server.crt")), "revoke")


# -- encrypt-key never loses the key ----------------------------------------------------------
def write_plain_key(path: Path, kind: str) -> bytes:
    key = (rsa.generate_private_key(65537, 2048) if kind == "rsa"
           else ec.generate_private_key(ec.SECP256R1()))
    data = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL if kind == "rsa"
                             else serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.write_bytes(data)
    path.chmod(0o600)
    return data


def opens(key_path: Path, stem: str) -> bool:
    """The key can be opened with what is on disk: plain, or with the pair beside it."""
    data = key_path.read_bytes()
    if b"ENCRYPTED" not in data:
        serialization.load_pem_private_key(data, None)
        return True
    cipher, rand = keyfiles.pair_paths(key_path.parent, stem)
    serialization.load_pem_private_key(data, gausskey.decode(cipher.read_bytes(),
                                                             rand.read_bytes()))
    return True


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_encrypt_key_rsa_and_ec(tmp_path: Path, kind: str) -> None:
    key = tmp_path / "server.key"
    plain = write_plain_key(key, kind)
    proc = run("certs", "encrypt-key", str(key), "--stem", "server")
    assert proc.returncode == 0, proc.stderr
    assert b"ENCRYPTED" in key.read_bytes()
    original = serialization.load_pem_private_key(plain, None)
    passphrase = keyfiles.read_passphrase(tmp_path / "server.key.cipher")
    reopened = serialization.load_pem_private_key(key.read_bytes(), passphrase)
    assert reopened.public_key() == original.public_key()
    for name in ("server.key", "server.key.cipher", "server.key.rand"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # again: refused (encrypted already), nothing changed
    before = key.read_bytes()
    one_clear_line(run("certs", "encrypt-key", str(key), "--stem", "server"), "encrypt-key")
    assert key.read_bytes() == before


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_encrypt_key_with_a_directory_in_the_way_of_the_pair(tmp_path: Path, kind: str) -> None:
    key = tmp_path / "client.key"
    plain = write_plain_key(key, kind)
    (tmp_path / "client.key.rand").mkdir()
    proc = run("certs", "encrypt-key", str(key))
    assert key.read_bytes() == plain, "the key was lost: " + proc.stdout + proc.stderr
    assert "client.key.rand" in one_clear_line(proc, "encrypt-key")
    # even told to replace it: the rename onto the folder fails, the key is kept
    proc = run("certs", "encrypt-key", str(key), "--force")
    line = one_clear_line(proc, "encrypt-key")
    assert "unchanged" in line
    assert key.read_bytes() == plain and opens(key, "client")
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_encrypt_key_keeps_another_keys_pair(tmp_path: Path) -> None:
    """Two keys in one folder with one stem: the second must not overwrite the pair that
    opens the first."""
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    write_plain_key(first, "ec")
    plain = write_plain_key(second, "ec")
    assert run("certs", "encrypt-key", str(first)).returncode == 0
    one_clear_line(run("certs", "encrypt-key", str(second)), "encrypt-key")
    assert second.read_bytes() == plain and opens(first, "client")


@pytest.mark.parametrize("fail", ["write", "fsync", "replace-1", "replace-2", "replace-3",
                                  "interrupt-3"])
def test_encrypt_key_survives_a_failure_at_every_step(tmp_path: Path, fail: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC on a write, EIO on an fsync, a failed rename, Ctrl-C before the last rename:
    the key opens with what is on disk afterwards, and no temp file is left."""
    key = tmp_path / "client.key"
    plain = write_plain_key(key, "rsa")
    calls = {"write": 0, "fsync": 0, "replace": 0}
    real = {"write": os.write, "fsync": os.fsync, "replace": os.replace}

    def failing(name: str, nth: int, exc: BaseException):  # type: ignore[no-untyped-def]
        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            calls[name] += 1
            if calls[name] == nth:
                raise exc
            return real[name](*a, **kw)
        return wrapper

    kind, _, nth = fail.partition("-")
    if kind == "write":
        monkeypatch.setattr(os, "write", failing("write", 2, OSError(errno.ENOSPC, "full")))
    elif kind == "fsync":
        monkeypatch.setattr(os, "fsync", failing("fsync", 3, OSError(errno.EIO, "EIO")))
    elif kind == "replace":
        monkeypatch.setattr(os, "replace", failing("replace", int(nth),
                                                   OSError(errno.EXDEV, "rename")))
    else:
        monkeypatch.setattr(os, "replace", failing("replace", int(nth), KeyboardInterrupt()))
    with pytest.raises((keyfiles.KeyFileError, KeyboardInterrupt)):
        keyfiles.encrypt_key(key, "client")
    monkeypatch.undo()
    assert key.read_bytes() == plain and opens(key, "client")
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


UNSHARE = shutil.which("unshare")


def in_own_mount_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in a user + mount namespace of its own: a small or read-only tmpfs for
    real ENOSPC / EROFS, without root and without touching the host's mounts."""
    assert UNSHARE, "unshare (util-linux) is needed for the ENOSPC / read-only tests"
    return subprocess.run([UNSHARE, "-rm", "sh", "-euc", script], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("case", ["read-only", "disk-full"])
def test_encrypt_key_on_a_read_only_or_full_filesystem(tmp_path: Path, case: str) -> None:
    src = tmp_path / "src.key"
    plain = write_plain_key(src, "ec")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if case == "read-only":
        prepare = (f"mount -t tmpfs -o size=1m tmpfs {mnt}; cp {src} {mnt}/client.key; "
                   f"mount -o remount,ro {mnt}")
    else:  # two pages: the key takes one, a filler the other
        prepare = (f"mount -t tmpfs -o size=8k tmpfs {mnt}; cp {src} {mnt}/client.key; "
                   f"head -c 4096 /dev/zero > {mnt}/filler || true")
    script = (f"{prepare}\n"
              f"set +e; {sys.executable} -m proxy certs encrypt-key {mnt}/client.key "
              f"2> {tmp_path}/stderr; echo $? > {tmp_path}/rc; set -e\n"
              f"cp {mnt}/client.key {tmp_path}/after.key; ls -a {mnt} > {tmp_path}/listing\n")
    proc = in_own_mount_namespace(script)
    assert proc.returncode == 0, proc.stderr
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "after.key").read_bytes() == plain, "the key was lost: " + stderr
    assert (tmp_path / "rc").read_text().strip() == "2", stderr
    assert stderr.startswith("certs encrypt-key: ") and "Traceback" not in stderr
    assert "unchanged" in stderr
    assert ".tmp" not in (tmp_path / "listing").read_text()


# -- show-passphrase -----------------------------------------------------------------------------
def test_show_passphrase_prints_to_a_terminal_only(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    write_plain_key(key, "ec")
    assert run("certs", "encrypt-key", str(key)).returncode == 0
    passphrase = keyfiles.read_passphrase(tmp_path / "client.key")
    piped = run("certs", "show-passphrase", str(tmp_path / "client.key"))
    assert piped.returncode == 2 and passphrase.decode() not in piped.stdout + piped.stderr
    assert "terminal" in piped.stderr
    for name in ("client.key", "client.key.cipher", "client.key.rand"):
        assert read_from_terminal([sys.executable, "-m", "proxy", "certs", "show-passphrase",
                                   str(tmp_path / name)], REPO) == passphrase.decode()
    # a wrong .rand: one line naming it, no secret
    other = tmp_path / "other"
    other.mkdir()
    write_plain_key(other / "client.key", "ec")
    assert run("certs", "encrypt-key", str(other / "client.key")).returncode == 0
    shutil.copy(other / "client.key.rand", tmp_path / "client.key.rand")
    out = read_from_terminal([sys.executable, "-m", "proxy", "certs", "show-passphrase",
                              str(tmp_path / "client.key")], REPO)
    assert "client.key.rand" in out and passphrase.decode() not in out


def test_bundle_readme_names_no_pgsslpassword(ca_dir: Path, tmp_path: Path) -> None:
    import zipfile

    out = tmp_path / "b.zip"
    assert run("certs", "bundle", str(ca_dir), "--cn", "alice", "--out", str(out),
               "--encrypt").returncode == 0
    readme = zipfile.ZipFile(out).read("README.txt").decode()
    assert "PGSSLPASSWORD" not in readme
    assert "certs show-passphrase sslcert/client.key" in readme and "sslpassword=" in readme
    # an existing bundle is not overwritten (it may be the only copy of a key handed out)
    before = out.read_bytes()
    one_clear_line(run("certs", "bundle", str(ca_dir), "--cn", "x", "--out", str(out)),
                   "bundle")
    assert out.read_bytes() == before


# -- check-config: expired and expiring certificates and CRLs ---------------------------------
def proxy_config(folder: Path, ca_dir: Path, *, server: tuple[x509.Certificate, object] | None
                 = None, crl: x509.CertificateRevocationList | None = None) -> Path:
    ca = certs.load_ca(ca_dir)
    if server is not None:
        certs.write_certs(folder / "server.crt", server[0])
        certs.write_key(folder / "server.key", server[1])  # type: ignore[arg-type]
    else:
        shutil.copy(ca_dir / "server.crt", folder / "server.crt")
        shutil.copy(ca_dir / "server.key", folder / "server.key")
    certs.write_crl(folder / "crl.pem", crl if crl is not None else certs.make_crl(ca))
    path = folder / "proxy.toml"
    path.write_text(f"[tls]\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                    f"ssl_ca_file = '{ca_dir / 'cacert.pem'}'\nssl_crl_file = 'crl.pem'\n"
                    "clientcert = 'verify-ca'\n")
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return run("check-config", str(path))


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_check_config_refuses_an_expired_server_certificate(ca_dir: Path,
                                                            tmp_path: Path) -> None:
    ca = certs.load_ca(ca_dir)
    old = certs.issue(ca, "localhost", server=True, not_before=now() - dt.timedelta(days=30),
                      not_after=now() - dt.timedelta(days=1))
    proc = check_config(proxy_config(tmp_path, ca_dir, server=old))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("config error: tls.ssl_cert_file: the server certificate")
    assert "expired at" in proc.stderr and "config ok" not in proc.stdout


def test_check_config_warns_of_a_certificate_within_14_days(ca_dir: Path,
                                                            tmp_path: Path) -> None:
    ca = certs.load_ca(ca_dir)
    soon = certs.issue(ca, "localhost", server=True, not_after=now() + dt.timedelta(days=10))
    proc = check_config(proxy_config(tmp_path, ca_dir, server=soon))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning: tls.ssl_cert_file: the server certificate")
    assert "(in 9.9 days)" in proc.stderr or "(in 10.0 days)" in proc.stderr
    assert "config ok" in proc.stdout
    fine = certs.issue(ca, "localhost", server=True, not_after=now() + dt.timedelta(days=15))
    proc = check_config(proxy_config(tmp_path, ca_dir, server=fine))
    assert proc.returncode == 0 and proc.stderr == ""


def test_check_config_refuses_an_expired_crl_and_warns_of_one_within_3_days(
        ca_dir: Path, tmp_path: Path) -> None:
    ca = certs.load_ca(ca_dir)
    proc = check_config(proxy_config(tmp_path, ca_dir, crl=crl_ending(ca, now()
                                                                      - dt.timedelta(hours=2))))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith('config error: tls.ssl_crl_file: the CRL of "CN=dwsproxy '
                                  'root CA,O=dwsproxy" expired at ')
    assert "certs crl" in proc.stderr
    proc = check_config(proxy_config(tmp_path, ca_dir, crl=crl_ending(ca, now()
                                                                      + dt.timedelta(days=2))))
    assert proc.returncode == 0 and proc.stderr.startswith("warning: tls.ssl_crl_file: the CRL")
    proc = check_config(proxy_config(tmp_path, ca_dir, crl=crl_ending(ca, now()
                                                                      + dt.timedelta(days=4))))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_findings_thresholds_and_load_logs_them(ca_dir: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """loader.expiry_findings is what a daily tick calls; loader.load logs the same."""
    ca = certs.load_ca(ca_dir)
    soon = certs.issue(ca, "localhost", server=True, not_after=now() + dt.timedelta(days=3))
    path = proxy_config(tmp_path, ca_dir, server=soon,
                        crl=crl_ending(ca, now() + dt.timedelta(days=1)))
    with caplog.at_level("WARNING", logger="dwsproxy.tls"):
        cfg = loader.load(str(path))
    levels = [(f.level, f.key) for f in loader.expiry_findings(cfg, now().timestamp())]
    assert levels == [("warning", "tls.ssl_cert_file"), ("warning", "tls.ssl_crl_file")]
    logged = [r.getMessage() for r in caplog.records if getattr(r, "fields", {}).get("expiry")]
    assert len(logged) == 2 and logged[0].startswith("tls.ssl_cert_file: the server")
    # two days on, both have expired: errors, and the CRL's first
    later = (now() + dt.timedelta(days=4)).timestamp()
    assert [f.level for f in loader.expiry_findings(cfg, later)] == ["error", "error"]
