"""The issuance record of a `dwsproxy certs` CA folder, and atomic file writes.

Owns: `DIR/issued.jsonl`, what the folder's CA issued and revoked: one JSON object per line,
`{"serial": "<hex>", "role": "ca"|"server"|"client", "subject": "<RFC 4514>",
"not_after": "<RFC 3339 UTC>", "file": "<name in DIR or the bundle>",
"revoked": null | "<RFC 3339 UTC>"}`; the lock that serialises commands changing a folder; and
writing any file so that a crash, a full disk or Ctrl-C leaves either the old file or the new
one, never a mix or nothing (temp file beside it, fsync, rename, fsync the folder). Must not
make certificates (certs.py) nor be imported by the proxy's serving path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

RECORD = "issued.jsonl"


class RecordError(ValueError):
    """The record cannot be read (a line that is not one of ours)."""


@dataclass(frozen=True)
class Entry:
    serial: str  # lower-case hex, no leading zeros, as `openssl x509 -serial` minus its zeros
    role: str
    subject: str
    not_after: str
    file: str
    revoked: str | None = None


def stamp(when: dt.datetime) -> str:
    """RFC 3339 in UTC with a Z, to the second."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_serial(text: str) -> int:
    """A serial as people copy it: hex with or without 0x, colons (openssl's 1A:2B:…), any
    case. ValueError with a sentence otherwise."""
    cleaned = text.strip().lower().replace(":", "")
    cleaned = cleaned.removeprefix("0x")
    if not cleaned or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError(f"'{printable(text)}' is not a serial number in hex (as "
                         "`dwsproxy certs list` or `openssl x509 -noout -serial` print it)")
    value = int(cleaned, 16)
    if value == 0:
        raise ValueError("serial 0 is not a certificate serial number")
    return value


def printable(text: str) -> str:
    """`text` safe for a terminal: anything outside printable ASCII escaped (a subject or a
    file name may come from someone else's certificate)."""
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def read(folder: Path) -> list[Entry] | None:
    """The folder's entries in issuance order; None when it has no record."""
    path = folder / RECORD
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            entries.append(Entry(serial=str(doc["serial"]), role=str(doc["role"]),
                                 subject=str(doc["subject"]), not_after=str(doc["not_after"]),
                                 file=str(doc["file"]), revoked=doc.get("revoked")))
        except (ValueError, KeyError, TypeError):
            raise RecordError(f"{path}:{number}: not a record line") from None
    return entries


def write(folder: Path, entries: list[Entry]) -> None:
    text = "".join(json.dumps(asdict(e), ensure_ascii=True) + "\n" for e in entries)
    write_atomic(folder / RECORD, text.encode("ascii"), mode=0o644)


def mark_revoked(entries: list[Entry], serial: int, when: str) -> list[Entry]:
    hexa = f"{serial:x}"
    return [replace(e, revoked=e.revoked or when) if e.serial == hexa else e for e in entries]


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock: two commands changing the record or the CRL at once would
    each write what they read, and one revocation would be lost."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- atomic writes -------------------------------------------------------------------------------
def temp_beside(path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None = None
                ) -> Path:
    """A new file in `path`'s folder holding `data`, created with `mode` (0600 for a secret:
    never readable by others, even for a moment), written and fsynced. The caller renames it
    over `path` or removes it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (a rename lives in the folder's own data)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data`: readers and a crash see the old file or the new one."""
    tmp = temp_beside(path, data, mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
