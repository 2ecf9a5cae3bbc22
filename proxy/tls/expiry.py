"""What in a loaded configuration has expired or is about to: certificates and CRLs.

Owns: the thresholds and the sentences of `check-config`'s expiry errors and warnings and of
the same lines logged at load and reload (`log_findings`; the running proxy may call it daily).
An expired server certificate or CRL is an error: the first fails every handshake a client
checks, the second refuses every client certificate of its issuer (CRL checking fails closed).
A certificate within CERT_WARN_DAYS or a CRL within CRL_WARN_DAYS of its end is a warning.
Must not read files or the clock (the caller passes `now`), nor refuse a reload: a renewed CRL
must always be able to replace an expired one.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Literal

from ..config.schema import TlsConfig
from .contexts import BackendTls, ServerTls

log = logging.getLogger("dwsproxy.tls")

CERT_WARN_DAYS = 14
CRL_WARN_DAYS = 3
DAY = 86400.0


@dataclass(frozen=True)
class Finding:
    level: Literal["error", "warning"]
    key: str  # the config key whose file it is
    message: str


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _left(seconds: float) -> str:
    days = seconds / DAY
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.1f} hours"


def findings(server_tls: ServerTls | None, backend_tls: BackendTls | None, tls: TlsConfig,
             now: float) -> list[Finding]:
    """Errors first, then warnings, each naming its key and what to do. With a `Loaded`:
    `loader.expiry_findings(loaded, now)`."""
    out: list[Finding] = []
    st = server_tls
    if st is not None:
        _cert(out, "tls.ssl_cert_file", "the server certificate", st.server_cert.subject,
              st.server_cert.not_after, now, critical=True)
        for ca in st.ca_certs:
            _cert(out, "tls.ssl_ca_file", "the CA certificate", ca.subject, ca.not_after, now,
                  critical=False)
        key = "tls.ssl_crl_file" if tls.ssl_crl_file else "tls.ssl_crl_dir"
        for crl in st.crls:
            if crl.next_update is None:
                continue
            if crl.next_update <= now:
                out.append(Finding("error", key, f"the CRL of \"{crl.issuer}\" expired at "
                                   f"{_when(crl.next_update)} ({_left(now - crl.next_update)} "
                                   "ago): every client certificate it covers is refused; "
                                   "renew it (dwsproxy certs crl DIR, or fetch the CA's "
                                   "current CRL) and reload"))
            elif crl.next_update - now < CRL_WARN_DAYS * DAY:
                out.append(Finding("warning", key, f"the CRL of \"{crl.issuer}\" expires at "
                                   f"{_when(crl.next_update)} (in "
                                   f"{_left(crl.next_update - now)}); then every client "
                                   "certificate it covers is refused: renew it before"))
    bt = backend_tls
    if bt is not None and bt.client_cert is not None:
        _cert(out, "backend.sslcert", "the proxy's client certificate to the backend",
              bt.client_cert.subject, bt.client_cert.not_after, now, critical=True)
    return sorted(out, key=lambda f: f.level != "error")


def _cert(out: list[Finding], key: str, what: str, subject: str, not_after: float, now: float,
          *, critical: bool) -> None:
    if not_after <= now:
        out.append(Finding("error" if critical else "warning", key,
                           f"{what} \"{subject}\" expired at {_when(not_after)} "
                           f"({_left(now - not_after)} ago)"))
    elif not_after - now < CERT_WARN_DAYS * DAY:
        out.append(Finding("warning", key, f"{what} \"{subject}\" expires at "
                           f"{_when(not_after)} (in {_left(not_after - now)}): replace it "
                           "and reload before"))


def log_findings(found: list[Finding]) -> None:
    """Log each finding at its level. The main process does at every load (tls.loader.load);
    a daily tick may do the same for the configuration in force:
    `expiry.log_findings(loader.expiry_findings(loaded, time.time()))`."""
    for f in found:
        (log.error if f.level == "error" else log.warning)(
            "%s: %s", f.key, f.message, extra={"fields": {"expiry": f.level}})
