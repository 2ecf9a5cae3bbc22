"""The configuration as bytes: the TOML text and every file it names, read once.

Owns: reading the config file and the files its keys name (certificates, keys, passphrases, CA,
CRLs, a CRL directory's listing) into one `Snapshot`, with PostgreSQL's permission rules for
private keys and passphrases; serialising a snapshot for a worker process; and handing file
contents to OpenSSL calls that only take a path (`as_path`, an anonymous memory file).

Why: the main process validates a configuration and every worker must run exactly that one,
never a file that changed on disk since (an edit without SIGHUP, a kubelet volume swap, a
broken file when a worker restarts). So TLS objects are built from a snapshot in every process,
the main one included, and workers get the main process's snapshot over their control channel.
Must not parse TOML semantics (config.py) nor build TLS objects (tls.py, verify.py).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class Snapshot:
    path: str  # the config file as the user named it (absolute, symlinks kept)
    text: str
    files: dict[str, bytes] = field(default_factory=dict)
    listings: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def read(self, path: str, key: str) -> bytes:
        try:
            return self.files[path]
        except KeyError:
            raise ConfigError(key, f"'{path}' is not part of the configuration read") from None

    def has(self, path: str) -> bool:
        return path in self.files

    def listdir(self, path: str, key: str) -> tuple[str, ...]:
        try:
            return self.listings[path]
        except KeyError:
            raise ConfigError(key, f"'{path}' is not part of the configuration read") from None

    @property
    def file_sha256(self) -> str:
        """sha256 of the config file's bytes, as `sha256sum` prints it."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def sha256(self) -> str:
        """One digest of the text and every file: equal digests mean the same configuration."""
        digest = hashlib.sha256(self.text.encode())
        for path in sorted(self.files):
            digest.update(b"\0" + path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        for path in sorted(self.listings):
            digest.update(b"\1" + path.encode() + b"\0" + "\0".join(self.listings[path]).encode())
        return digest.hexdigest()

    def to_json(self) -> bytes:
        return json.dumps({
            "path": self.path, "text": self.text,
            "files": {p: base64.b64encode(d).decode() for p, d in self.files.items()},
            "listings": {p: list(names) for p, names in self.listings.items()},
        }).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Snapshot:
        doc = json.loads(data)
        return cls(path=doc["path"], text=doc["text"],
                   files={p: base64.b64decode(d) for p, d in doc["files"].items()},
                   listings={p: tuple(names) for p, names in doc["listings"].items()})


MAX_FILE = 64 * 1024 * 1024  # a certificate bundle or CRL is never this large


def read_regular(path: str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE: a FIFO, a device (/dev/zero) or a huge
    file named by mistake must not block or exhaust the process that reloads. OSError (with
    its strerror) otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        if st.st_size > MAX_FILE:
            raise OSError(0, f"larger than {MAX_FILE // (1024 * 1024)} MiB")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_FILE:
                raise OSError(0, f"larger than {MAX_FILE // (1024 * 1024)} MiB")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str) -> str:
    try:
        return read_regular(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: '{path}'") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError("", f"cannot read config file '{path}': {why}") from None


class Reader:
    """Reads files from disk into a snapshot under construction (main process only)."""

    def __init__(self, path: str, text: str) -> None:
        self.path, self.text = path, text
        self.files: dict[str, bytes] = {}
        self.listings: dict[str, tuple[str, ...]] = {}

    def file(self, path: str, key: str, *, secret: bool = False) -> None:
        if secret:
            check_private(path, key)
        try:
            self.files[path] = read_regular(path)
        except FileNotFoundError:
            raise ConfigError(key, f"no such file '{path}'") from None
        except OSError as exc:
            raise ConfigError(key, f"cannot read '{path}': {exc.strerror}") from None

    def optional(self, path: str, key: str, *, secret: bool = False) -> bool:
        """Read a file looked up by convention (e.g. a key's .cipher/.rand pair beside it)
        when it exists; False when it does not."""
        if not os.path.lexists(path):
            return False
        self.file(path, key, secret=secret)
        return True

    def directory(self, path: str, key: str) -> None:
        """Every regular file of a folder, by name; hidden entries are skipped: a kubelet volume
        holds `..data` and `..<timestamp>` beside the links to its files."""
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(key, f"no such directory '{path}'")
        try:
            entries = sorted(e for e in folder.iterdir() if not e.name.startswith("."))
        except OSError as exc:
            raise ConfigError(key, f"cannot list '{path}': {exc.strerror}") from None
        names = []
        for entry in entries:
            try:  # follows links, as the kubelet layout needs; FIFOs, devices, loops skipped
                regular = stat.S_ISREG(entry.stat().st_mode)
            except OSError:
                regular = False
            if regular:
                self.file(str(entry), key)
                names.append(str(entry))
        self.listings[path] = tuple(names)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.path, self.text, dict(self.files), dict(self.listings))


def check_private(path: str, key: str) -> None:
    """PostgreSQL's rule for key files (be-secure-common.c): a regular file owned by us with no
    group/other access, or owned by root with at most group read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(key, f"no such file '{path}'") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(key, f"'{path}' is not a regular file")
    if st.st_uid != os.geteuid() and st.st_uid != 0:
        raise ConfigError(key, f"'{path}' must be owned by the proxy's user or root")
    if (st.st_uid == os.geteuid() and st.st_mode & 0o077) or (
        st.st_uid == 0 and st.st_mode & 0o037
    ):
        raise ConfigError(
            key,
            f"'{path}' has group or world access (mode {stat.S_IMODE(st.st_mode):04o}); "
            "chmod 600 it (or 640 if owned by root)",
        )


@contextlib.contextmanager
def as_path(data: bytes, name: str = "dwsproxy") -> Iterator[str]:
    """A path OpenSSL can open that reads `data`: an anonymous memory file, so a key from a
    snapshot never touches a disk. Linux only (memfd_create); the proxy targets Linux."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as fh:
            fh.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
