"""From a config file to a configuration in force: read a snapshot, parse it, build its TLS
objects, and hand them on together as one `Loaded`.

Owns: the order of those steps, which files a configuration reads, and `Loaded`. The main
process calls `load` (disk → snapshot → Loaded); a worker calls `build` on the snapshot the main
process sent, so both run the same bytes. Must not do network I/O.

Why a `Loaded` beside `Config`: the config layer is data only and never imports TLS; what a
process runs with is the parsed `Config` together with the SSLContexts and verifier built from
the same snapshot, complete or not at all, swapped as one reference on a reload.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from ..config import schema as config
from ..config import snapshot
from ..config.errors import ConfigError
from ..config.schema import Config
from ..config.snapshot import Snapshot
from . import contexts as tls
from . import expiry
from .contexts import BackendTls, ServerTls

log = logging.getLogger("dwsproxy.config")


@dataclass(frozen=True)
class Loaded:
    """A configuration ready to be put in force."""

    config: Config
    # The text and files it was built from: its digests are what /status and workers compare.
    snapshot: Snapshot = field(repr=False)
    server_tls: ServerTls | None = None  # None when ssl is off
    backend_tls: BackendTls | None = None  # None when backend.sslmode is disable
    # backend.health_check_password_file's first line: the proxy's own login, never shown
    health_check_password: str = field(default="", repr=False)
    # [admin] token_file's token: never shown, never compared, never logged
    admin_token: str = field(default="", compare=False, repr=False)


def read(path: str) -> snapshot.Snapshot:
    """The config file and every file it names, checked and read once from disk."""
    text = snapshot.read_text(path)
    cfg = config.parse(text, path)
    reader = snapshot.Reader(cfg.path, text)
    _read_tls_files(reader, cfg.tls)
    _read_backend_files(reader, cfg.backend)
    if cfg.admin.enabled and cfg.admin.token_file:
        reader.file(cfg.admin.token_file, "admin.token_file", secret=True)
    return reader.snapshot()


def _read_pair(reader: snapshot.Reader, pair: tuple[str, str], keys: tuple[str, str],
               explicit: bool) -> None:
    if explicit:
        reader.file(pair[0], keys[0], secret=True)
        reader.file(pair[1], keys[1], secret=True)
    elif os.path.lexists(pair[0]) and os.path.lexists(pair[1]):  # both, or not used
        reader.optional(pair[0], keys[0], secret=True)
        reader.optional(pair[1], keys[1], secret=True)


def _read_backend_files(reader: snapshot.Reader, b: config.BackendConfig) -> None:
    if b.health_check_password_file:
        reader.file(b.health_check_password_file, "backend.health_check_password_file",
                    secret=True)
    if b.sslmode == "disable":
        return
    for key in ("sslrootcert", "sslcrl", "sslcert"):
        if getattr(b, key):
            reader.file(getattr(b, key), f"backend.{key}")
    if b.sslkey:
        reader.file(b.sslkey, "backend.sslkey", secret=True)
    if b.sslpassword_file:
        reader.file(b.sslpassword_file, "backend.sslpassword_file", secret=True)
    if b.sslcert and not b.sslpassword_file:
        _read_pair(reader, tls.key_pair(b.sslkey_cipher_file, b.sslkey_rand_file, b.sslcert,
                                    "client"),
                   ("backend.sslkey_cipher_file", "backend.sslkey_rand_file"),
                   explicit=bool(b.sslkey_cipher_file))


def _read_tls_files(reader: snapshot.Reader, t: config.TlsConfig) -> None:
    if t.ssl:
        reader.file(t.ssl_cert_file, "tls.ssl_cert_file")
        reader.file(t.ssl_key_file, "tls.ssl_key_file", secret=True)
        if t.ssl_passphrase_file:
            reader.file(t.ssl_passphrase_file, "tls.ssl_passphrase_file", secret=True)
        else:
            _read_pair(reader, tls.key_pair(t.ssl_key_cipher_file, t.ssl_key_rand_file,
                                        t.ssl_key_file, "server"),
                       ("tls.ssl_key_cipher_file", "tls.ssl_key_rand_file"),
                       explicit=bool(t.ssl_key_cipher_file))
        if t.ssl_ca_file:
            reader.file(t.ssl_ca_file, "tls.ssl_ca_file")
        if t.ssl_crl_file:
            reader.file(t.ssl_crl_file, "tls.ssl_crl_file")
        if t.ssl_crl_dir:
            reader.directory(t.ssl_crl_dir, "tls.ssl_crl_dir")


def build(snap: snapshot.Snapshot) -> Loaded:
    """Parse a snapshot and build its TLS objects; ConfigError when anything is wrong."""
    cfg = config.parse(snap.text, snap.path)
    server_tls = (tls.build_server_tls(cfg.tls, snap, cert_requested=cfg.cert_requested)
                  if cfg.tls.ssl else None)
    backend_tls = (tls.build_backend_tls(cfg.backend, snap)
                   if cfg.backend.sslmode != "disable" else None)
    password = ""
    if cfg.backend.health_check_password_file:
        raw = snap.read(cfg.backend.health_check_password_file,
                        "backend.health_check_password_file")
        password = raw.decode("utf-8", "replace").splitlines()[0] if raw.strip() else ""
    return Loaded(cfg, snap, server_tls, backend_tls, password,
                  admin_token=_admin_token(cfg, snap))


def _admin_token(cfg: Config, snap: snapshot.Snapshot) -> str:
    if not (cfg.admin.enabled and cfg.admin.token_file):
        return ""
    try:
        token = snap.read(cfg.admin.token_file, "admin.token_file").decode().strip()
    except UnicodeDecodeError:
        raise ConfigError("admin.token_file", "is not UTF-8 text") from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError("admin.token_file", "must hold one token of at least 16 printable "
                          "characters without spaces (e.g. openssl rand -hex 32)")
    return token


def load(path: str, *, warn: bool = True) -> Loaded:
    """The main process's load, at start-up and on reload: with `warn`, expired and expiring
    certificates and CRLs are logged (expiry.py), never refused, and so is what the
    configuration allows but an operator should hear about (schema.warnings): here once, not
    by every worker that builds it."""
    loaded = build(read(path))
    if warn:
        expiry.log_findings(expiry_findings(loaded, time.time()))
        for text in config.warnings(loaded.config):
            log.warning("%s: %s", loaded.config.path, text)
    return loaded


def expiry_findings(loaded: Loaded, now: float) -> list[expiry.Finding]:
    """What in `loaded` has expired or is near its end (expiry.py), as of `now`."""
    return expiry.findings(loaded.server_tls, loaded.backend_tls, loaded.config.tls, now)


def server_tls(t: config.TlsConfig, *, cert_requested: bool) -> tls.ServerTls:
    """The client-facing TLS objects of a `[tls]` section, its files read from disk now."""
    reader = snapshot.Reader("", "")
    _read_tls_files(reader, t)
    return tls.build_server_tls(t, reader.snapshot(), cert_requested=cert_requested)
