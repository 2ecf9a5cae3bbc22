"""From a config file to a complete `Config`: read a snapshot, parse it, build its TLS objects.

Owns: the order of those steps and which files a configuration reads. The main process calls
`load` (disk → snapshot → Config); a worker calls `build` on the snapshot the main process sent,
so both run the same bytes. Must not do network I/O.
"""

from __future__ import annotations

import dataclasses

from . import config, snapshot, tls
from .config import Config


def read(path: str) -> snapshot.Snapshot:
    """The config file and every file it names, checked and read once from disk."""
    text = snapshot.read_text(path)
    cfg = config.parse(text, path)
    reader = snapshot.Reader(cfg.path, text)
    _read_tls_files(reader, cfg.tls)
    return reader.snapshot()


def _read_tls_files(reader: snapshot.Reader, t: config.TlsConfig) -> None:
    if t.ssl:
        reader.file(t.ssl_cert_file, "tls.ssl_cert_file")
        reader.file(t.ssl_key_file, "tls.ssl_key_file", secret=True)
        if t.ssl_passphrase_file:
            reader.file(t.ssl_passphrase_file, "tls.ssl_passphrase_file", secret=True)
        if t.ssl_ca_file:
            reader.file(t.ssl_ca_file, "tls.ssl_ca_file")
        if t.ssl_crl_file:
            reader.file(t.ssl_crl_file, "tls.ssl_crl_file")
        if t.ssl_crl_dir:
            reader.directory(t.ssl_crl_dir, "tls.ssl_crl_dir")


def build(snap: snapshot.Snapshot) -> Config:
    """Parse a snapshot and build its TLS objects; ConfigError when anything is wrong."""
    cfg = config.parse(snap.text, snap.path)
    server_tls = (tls.build_server_tls(cfg.tls, snap, cert_requested=cfg.cert_requested)
                  if cfg.tls.ssl else None)
    return dataclasses.replace(cfg, server_tls=server_tls, snapshot=snap)


def load(path: str) -> Config:
    return build(read(path))


def server_tls(t: config.TlsConfig, *, cert_requested: bool) -> tls.ServerTls:
    """The client-facing TLS objects of a `[tls]` section, its files read from disk now."""
    reader = snapshot.Reader("", "")
    _read_tls_files(reader, t)
    return tls.build_server_tls(t, reader.snapshot(), cert_requested=cert_requested)
