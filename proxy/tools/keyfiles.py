"""`dwsproxy certs encrypt-key` and `certs show-passphrase`: a private key and its openGauss
`.key.cipher` + `.key.rand` pair.

Owns: encrypting a key in place so that no failure can lose it, and reading the passphrase
back out of a pair. The order is the guarantee: everything is first written to temp files
beside the key and fsynced; then the pair is renamed into place, then the encrypted key over
the plain one. Until that last rename the plain key is on disk; after it the pair that opens
it is. A failure at any step (a directory in the way, a full disk, a read-only folder,
Ctrl-C) removes the temp files and leaves the key as it was. Must not print or log a
passphrase (the CLI prints it, to a terminal only).
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path

from ..tls import gausskey
from . import carecord


class KeyFileError(ValueError):
    """A refusal with a sentence for the operator (nothing was changed)."""


def pair_paths(folder: Path, stem: str) -> tuple[Path, Path]:
    return folder / f"{stem}.key.cipher", folder / f"{stem}.key.rand"


def random_passphrase() -> bytes:
    # 15 characters: gs_guc's limit (one AES block with its padding byte)
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(15)).encode()


def encrypt_key(key_path: Path, stem: str, passphrase: bytes | None = None, *,
                force: bool = False) -> tuple[Path, Path]:
    """Encrypt the PEM key at `key_path` (RSA, EC, any kind OpenSSL reads) in place; its
    passphrase goes to `<stem>.key.cipher` + `<stem>.key.rand` beside it, as gs_guc encrypt
    writes them. An existing pair is kept unless `force`: it may hold the passphrase of
    another key of the folder."""
    from cryptography.hazmat.primitives import serialization

    try:
        data = key_path.read_bytes()
        st = os.stat(key_path)
    except OSError as exc:
        raise KeyFileError(f"cannot read '{key_path}': {exc.strerror}") from None
    if b"ENCRYPTED" in data:
        raise KeyFileError(f"'{key_path}' is encrypted already")
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"'{key_path}' is not a PEM private key: {exc}") from None
    cipher_path, rand_path = pair_paths(key_path.parent, stem)
    existing = [p for p in (cipher_path, rand_path) if os.path.lexists(p)]
    if existing and not force:
        raise KeyFileError(f"'{existing[0]}' exists (it may hold the passphrase of another "
                           "key); move it away, or replace it with --force")
    passphrase = passphrase or random_passphrase()
    encrypted = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(passphrase))
    cipher, rand = gausskey.encode(passphrase)
    # Proof before anything is written: the pair gives the passphrase and it opens the key.
    if gausskey.decode(cipher, rand) != passphrase:  # pragma: no cover - a gausskey bug
        raise KeyFileError("the pair does not decode to its passphrase (nothing changed)")
    serialization.load_pem_private_key(encrypted, passphrase)
    # The files keep the key's owner: root encrypting the service account's key must not
    # leave it a key it can no longer read.
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    temps: list[Path] = []
    try:
        for content in (cipher, rand, encrypted):
            temps.append(carecord.temp_beside(key_path, content, mode=0o600, owner=owner))
        tmp_cipher, tmp_rand, tmp_key = temps
        os.replace(tmp_cipher, cipher_path)
        os.replace(tmp_rand, rand_path)
        # The pair must be durable before the key that needs it replaces the plain one.
        carecord.fsync_dir(key_path.parent)
        os.replace(tmp_key, key_path)
        carecord.fsync_dir(key_path.parent)
    except OSError as exc:
        raise KeyFileError(f"cannot write beside '{key_path}': {exc.strerror or exc}; the "
                           "key is unchanged (still unencrypted)") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return cipher_path, rand_path


def pair_of(path: Path) -> tuple[Path, Path]:
    """The pair a user means by `path`: the .cipher file, the .rand file, or their common
    prefix (`sslcert/client.key`)."""
    name = path.name
    for suffix in (".cipher", ".rand"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return path.with_name(name + ".cipher"), path.with_name(name + ".rand")


def read_passphrase(path: Path) -> bytes:
    """The passphrase held by the pair `path` names; KeyFileError naming the file at fault."""
    cipher_path, rand_path = pair_of(path)
    try:
        cipher = cipher_path.read_bytes()
        rand = rand_path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read '{exc.filename}': {exc.strerror}") from None
    try:
        return gausskey.decode(cipher, rand, cipher_name=f"'{cipher_path}'",
                               rand_name=f"'{rand_path}'")
    except gausskey.PairError as exc:
        raise KeyFileError(str(exc)) from None
