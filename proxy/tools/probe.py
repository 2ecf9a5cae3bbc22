"""`dwsproxy probe [CONNINFO]`: what a libpq client gets from any PostgreSQL-protocol server.

Owns: the probe of each host CONNINFO names (read by `conninfo` with libpq's rules): the six
sslmode cells (each one real libpq-like connection, `pgclient`), the judgement whether the
server speaks PostgreSQL at all, the server's TLS facts (versions, TLS 1.2 suites, certificate,
client-certificate demand, direct TLS), the inferred `ssl` / `require_ssl`, the report (table,
`--json`, `--expect`), the `--timeout` deadline and a line per step on a terminal. With
`--expect` (and no `--full`) only the connections its keys need are made, so that a cron probe
stays quiet on the proxy it checks.
Must not: be imported by the proxy's serving path; report a cell it did not try; call a server
that never gave a well-formed PostgreSQL answer anything but "not PostgreSQL" (exit 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import ssl
import struct
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import conninfo
from .channel import Closed, Evidence, NotPostgres, Silent, Unreachable, ssl_text
from .pgclient import SSLMODES, Attempt, Cell, Client, hostname_matches

__all__ = ["SSLMODES", "Cell", "main", "probe_target"]

VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
            "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
EXPIRY_WARNING_DAYS = 30
DEFAULT_TIMEOUT = 60.0
# libpq waits for ever when connect_timeout is unset; a probe for cron may not
DEFAULT_CONNECT_TIMEOUT = 10
EXPECT_KEYS = ("ssl", "require_ssl", "client_cert", "min_tls")


class ProbeFailed(Exception):
    """The one line a probe of this host ends with, exit 2."""


def connect_timeout(params: dict[str, str]) -> int:
    """libpq's connect_timeout: an integer; 0 or unset means for ever (here: the default);
    1 counts as 2 (fe-connect.c: "the minimum allowed timeout is 2 seconds")."""
    text = (params.get("connect_timeout") or "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        value = int(text)
    except ValueError:
        raise conninfo.ConninfoError(f'invalid integer value "{text}" for connection option '
                                     '"connect_timeout"') from None
    if value <= 0:
        return DEFAULT_CONNECT_TIMEOUT
    return max(value, 2)


def printable(text: str) -> str:
    """A server's words (an ErrorResponse, a certificate name) for the terminal: anything
    that is not printable is shown as an escape, never sent to the terminal as is."""
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in text)


def escaped(data: bytes, limit: int = 80) -> str:
    """A server's bytes as one printable line: nothing it sent reaches the terminal raw."""
    text = data[:limit].decode("latin-1")
    out = "".join(c if " " <= c <= "~" and c not in "'\\" else
                  {"\r": "\\r", "\n": "\\n", "\t": "\\t", "'": "\\'", "\\": "\\\\"}.get(
                      c, f"\\x{ord(c):02x}") for c in text)
    return out + ("…" if len(data) > limit else "")
def certificate_requested(handshake: bytes) -> bool | None:
    """Whether the server's plaintext TLS 1.2 flight holds a CertificateRequest (handshake type
    13, RFC 5246 7.4.4); None if the flight was not plaintext (TLS 1.3 encrypts it)."""
    payload = bytearray()
    pos = 0
    while pos + 5 <= len(handshake) and handshake[pos] == 22:
        (length,) = struct.unpack_from("!H", handshake, pos + 3)
        payload += handshake[pos + 5:pos + 5 + length]
        pos += 5 + length
    pos = 0
    seen_hello = False
    while pos + 4 <= len(payload):
        kind = payload[pos]
        length = int.from_bytes(payload[pos + 1:pos + 4], "big")
        if kind == 2:
            seen_hello = True
        if kind == 13:
            return True
        if kind == 14:  # ServerHelloDone: the server's flight is complete
            return False
        pos += 4 + length
    return None if not seen_hello else False



def tls12_suite_names() -> list[str]:
    """Every TLS 1.2-capable suite this OpenSSL can offer with a certificate-based key
    exchange (PSK and SRP need secrets a probe has not got)."""
    ctx = _bare_context()
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    names = []
    for c in ctx.get_ciphers():
        if c["protocol"] == "TLSv1.3" or c.get("kea") not in ("kx-ecdhe", "kx-dhe", "kx-rsa"):
            continue
        if c.get("auth") in ("auth-null", "auth-psk"):
            continue
        names.append(c["name"])
    return names


def _is_cbc(name: str) -> bool:
    ctx = _bare_context()
    try:
        ctx.set_ciphers(f"{name}:@SECLEVEL=0")
    except ssl.SSLError:
        return False
    return any(not c.get("aead") for c in ctx.get_ciphers() if c["name"] == name)





# -- the server's TLS facts -----------------------------------------------------------------

def _bare_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Facts:
    """Connections that learn a TLS fact; each is one handshake (or one session)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def handshake(self, ctx: ssl.SSLContext) -> Any:
        chan = self.client.connect()
        try:
            if chan.ssl_answer() != "S":
                raise ConnectionError("SSLRequest not accepted")
            chan.start_tls(ctx, self.client.sni())
        except BaseException:
            chan.close()
            raise
        return chan

    def tries_tls(self, ctx: ssl.SSLContext, session: bool = False) -> ssl.SSLObject | None:
        """The TLS object of a handshake that worked, else None. `session`: go on to the
        authentication request as a client would, so that the server sees an ordinary
        session rather than a handshake dropped (which a dwsproxy counts as a rejection)."""
        try:
            chan = self.handshake(ctx)
        except (OSError, ssl.SSLError, Unreachable, Silent, NotPostgres):
            return None
        try:
            if session:
                self.client.startup(chan)
        except (OSError, ssl.SSLError, Silent, NotPostgres):
            pass
        finally:
            chan.close()
        return chan.tls  # type: ignore[no-any-return]

    def version_accepted(self, name: str) -> bool:
        ctx = _bare_context()
        ctx.minimum_version = ctx.maximum_version = VERSIONS[name]
        if name in ("TLSv1", "TLSv1.1"):
            # OpenSSL 3 will not even offer 1.0/1.1 at the default security level
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        obj = self.tries_tls(ctx, session=True)
        return obj is not None and obj.version() == name

    def suite_accepted(self, name: str) -> bool:
        ctx = _bare_context()
        ctx.maximum_version = ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.set_ciphers(f"{name}:@SECLEVEL=0")
        except ssl.SSLError:
            return False
        obj = self.tries_tls(ctx)
        cipher = obj.cipher() if obj is not None else None
        return cipher is not None and cipher[0] == name

    def certificate(self, evidence: Evidence) -> dict[str, Any] | None:
        """The leaf the cells saw (one more handshake only when none of them got that far)."""
        der = evidence.peer_der
        if der is None:
            obj = self.tries_tls(_bare_context())
            der = obj.getpeercert(binary_form=True) if obj is not None else None
        if not der:
            return None
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        not_after = cert.not_valid_after_utc
        host = self.client.target.host or self.client.target.address
        return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
                "not_after": not_after.isoformat(),
                "days_left": (not_after - dt.datetime.now(dt.UTC)).days,
                "chain_verified": bool(evidence.chain_verified),
                "hostname_ok": hostname_matches(cert, host)}

    def client_cert(self) -> str:
        """"required" when a session without a certificate is refused (at the handshake or by
        an ErrorResponse that names the certificate), "optional" when a TLS 1.2 server asks for
        one but goes on without, "none" when it never asks."""
        ctx = _bare_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        asked: bool | None = None
        try:
            chan = self.handshake(ctx)
        except ssl.SSLError as exc:
            return "required" if "certificate" in str(exc).lower() or "HANDSHAKE" in str(
                exc) else "unknown"
        except (OSError, Unreachable, Silent, NotPostgres):
            try:  # perhaps TLS 1.3 only: the request is encrypted there
                chan = self.handshake(_bare_context())
            except (OSError, ssl.SSLError, Unreachable, Silent, NotPostgres):
                return "unknown"
        else:
            asked = certificate_requested(bytes(chan.handshake_bytes))
        try:
            outcome = self.client.startup(chan)
        except (OSError, ssl.SSLError, Silent, NotPostgres) as exc:
            outcome = Attempt(False, True, ssl_text(exc))
        finally:
            chan.close()
        if not outcome.ok and "certificate" in outcome.detail.lower():
            return "required"
        if asked is None:
            return "unknown"
        return "optional" if asked else "none"

    def direct_ssl(self) -> bool:
        ctx = _bare_context()
        ctx.set_alpn_protocols(["postgresql"])
        try:
            chan = self.client.connect()
        except (Unreachable, Silent):
            return False
        try:
            chan.start_tls(ctx, self.client.sni())
            assert chan.tls is not None
            return chan.tls.selected_alpn_protocol() == "postgresql"
        except (OSError, ssl.SSLError, Silent, NotPostgres):
            return False
        finally:
            chan.close()


# -- the whole probe of one host --------------------------------------------------------------

Step = Callable[[str], None]


def _judge(target: conninfo.Target, evidence: Evidence, timeout: int, budget: float) -> None:
    """Raise ProbeFailed unless some answer was a well-formed PostgreSQL message."""
    if evidence.foreign is not None:
        raise ProbeFailed(f"{target.server} is not a PostgreSQL server: it answered "
                          f"'{escaped(evidence.foreign)}'")
    if evidence.out_of_time:
        raise ProbeFailed(f"{target.server}: the probe did not finish within "
                          f"{budget:g} s (--timeout)")
    if not evidence.postgres:
        if evidence.silent:
            raise ProbeFailed(f"{target.server} did not answer within {timeout} s")
        raise ProbeFailed(f"{target.server} is not a PostgreSQL server: it closed every "
                          "connection without a PostgreSQL answer")


def probe_target(target: conninfo.Target, *, deadline: float, budget: float = DEFAULT_TIMEOUT,
                 expects: list[str] | None = None, full: bool = False,
                 step: Step = lambda _: None, workers: int = 16) -> dict[str, Any]:
    """The report of one host. `expects` without `full`: only what those keys need."""
    timeout = connect_timeout(target.params)
    evidence = Evidence()
    client = Client(target, deadline, timeout, evidence)
    keys = {e.partition("=")[0] for e in expects or []}
    everything = full or not expects
    step(f"connecting to {target.server}")
    try:
        client.connect().close()
    except Silent:
        raise ProbeFailed(f"{target.server} did not answer within {timeout} s") from None
    except Unreachable as exc:
        raise ProbeFailed(str(exc)) from None
    warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 contexts are deliberate
    step("sslmode=disable")
    cells = [_cell(client, "disable")]
    if evidence.foreign is not None or (evidence.silent and not evidence.postgres):
        _judge(target, evidence, timeout, budget)
    step("sslmode=allow, prefer, require, verify-ca, verify-full")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        cells += list(pool.map(lambda m: _cell(client, m), SSLMODES[1:]))
    _judge(target, evidence, timeout, budget)
    disable = cells[0]
    if disable.result == "plaintext":
        require_ssl = "off"
    elif re.search(r"ssl|encrypt|tls", disable.detail, re.I):
        require_ssl = "on"
    else:
        require_ssl = "unknown"
    ssl_on = "S" in evidence.ssl_answers
    report: dict[str, Any] = {
        "server": target.server,
        "cells": [{"sslmode": c.sslmode, "result": c.result, "detail": c.detail} for c in cells],
        "ssl": "on" if ssl_on else "off",
        "require_ssl": require_ssl,
        "tls_versions": None, "tls12_ciphers": None, "certificate": None,
        "client_cert": None, "direct_ssl": None,
    }
    facts = Facts(client)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if ssl_on and (everything or "min_tls" in keys):
            step("TLS versions")
            versions = {name: pool.submit(facts.version_accepted, name)
                        if name not in evidence.tls_versions else None for name in VERSIONS}
            report["tls_versions"] = {n: True if f is None else f.result()
                                      for n, f in versions.items()}
        elif not ssl_on:
            report["tls_versions"] = dict.fromkeys(VERSIONS, False)
        if ssl_on and (everything or "client_cert" in keys):
            step("client certificate")
            report["client_cert"] = facts.client_cert()
        elif not ssl_on:
            report["client_cert"] = "none"
        if everything:
            step("TLS 1.2 suites, certificate, direct TLS")
            suites = {name: pool.submit(facts.suite_accepted, name)
                      for name in (tls12_suite_names() if ssl_on else [])}
            direct = pool.submit(facts.direct_ssl)
            report["certificate"] = facts.certificate(evidence) if ssl_on else None
            report["tls12_ciphers"] = [name for name, f in suites.items() if f.result()]
            report["direct_ssl"] = direct.result()
    if evidence.out_of_time:
        _judge(target, evidence, timeout, budget)
    report["findings"] = findings(report)
    return report


def _cell(client: Client, sslmode: str) -> Cell:
    try:
        return client.cell(sslmode)
    except NotPostgres as exc:
        client.evidence.saw_foreign(exc.answer)
        return Cell(sslmode, "refused", "not a PostgreSQL answer")
    except Closed as exc:  # pragma: no cover - attempt() turns these into refusals
        return Cell(sslmode, "refused", str(exc))


def findings(report: dict[str, Any]) -> list[str]:
    """One line per weakness seen; a fact not probed (None) says nothing."""
    out = []
    if report["ssl"] == "off":
        out.append("ssl is off: every session travels in plaintext")
    for cell in report["cells"]:
        if cell["result"] == "plaintext":
            out.append(f"plaintext accepted (sslmode={cell['sslmode']})")
            break
    for name in ("TLSv1", "TLSv1.1"):
        if (report.get("tls_versions") or {}).get(name):
            out.append(f"{name} accepted (below TLS 1.2)")
    cbc = [name for name in report.get("tls12_ciphers") or [] if _is_cbc(name)]
    if cbc:
        out.append(f"CBC suites accepted: {', '.join(cbc)}")
    cert = report.get("certificate")
    if cert:
        if cert["days_left"] < 0:
            out.append(f"certificate expired {-cert['days_left']} days ago")
        elif cert["days_left"] < EXPIRY_WARNING_DAYS:
            out.append(f"certificate expires in {cert['days_left']} days")
        if not cert["chain_verified"]:
            out.append("certificate chain not verified against sslrootcert")
        if not cert["hostname_ok"]:
            out.append("certificate does not name the host")
    return out


def min_tls(report: dict[str, Any]) -> str:
    for name in VERSIONS:
        if (report.get("tls_versions") or {}).get(name):
            return name
    return "none"


def check_expectations(report: dict[str, Any], expects: list[str]) -> list[str]:
    """One line per mismatch."""
    actual = {"ssl": report["ssl"], "require_ssl": report["require_ssl"],
              "client_cert": report["client_cert"], "min_tls": min_tls(report)}
    lines = []
    for item in expects:
        key, _, want = item.partition("=")
        want = normalise_expect(key, want)
        if actual[key] != want:
            lines.append(f"expected {key}={want}, got {key}={actual[key]}")
    return lines


def normalise_expect(key: str, want: str) -> str:
    return "TLSv" + want if key == "min_tls" and not want.startswith("TLS") else want


def validate_expects(expects: list[str]) -> None:
    """A bad --expect is a usage error (ValueError), found before any connection."""
    for item in expects:
        key, sep, _ = item.partition("=")
        if not sep or key not in EXPECT_KEYS:
            raise ValueError(f"--expect {item!r}: want KEY=VALUE with KEY one of "
                             f"{', '.join(EXPECT_KEYS)}")


def render(report: dict[str, Any]) -> str:
    rows = [("sslmode", "result", "detail")] + [
        (c["sslmode"], c["result"], printable(c["detail"])) for c in report["cells"]]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"dwsproxy probe {report['server']}", ""]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    skipped = "not probed (--expect without --full)"
    versions = report["tls_versions"]
    facts: list[tuple[str, str]] = [
        ("ssl", report["ssl"]),
        ("TLS versions", skipped if versions is None else
         ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in versions.items())
         + "  (1.0/1.1 offered at @SECLEVEL=0)"),
        ("TLS 1.2 suites", skipped if report["tls12_ciphers"] is None
         else ", ".join(report["tls12_ciphers"]) or "-"),
    ]
    cert = report["certificate"]
    if cert:
        facts.append(("certificate", printable(f"{cert['subject']} (issuer {cert['issuer']})")))
        facts.append(("", f"not after {cert['not_after']}, {cert['days_left']} days left, "
                          f"chain {'verified' if cert['chain_verified'] else 'NOT verified'}, "
                          f"host name {'ok' if cert['hostname_ok'] else 'MISMATCH'}"))
    else:
        facts.append(("certificate", skipped if report["direct_ssl"] is None
                      and report["ssl"] == "on" else "-"))
    direct = report["direct_ssl"]
    facts += [("client cert", report["client_cert"] or skipped),
              ("direct TLS", skipped if direct is None else
               "accepted (ALPN postgresql)" if direct else "not accepted")]
    width = max(len(k) for k, _ in facts)
    lines += ["", "TLS facts:"] + [f"  {k:<{width}}  {v}" for k, v in facts]
    lines += ["", f"Inferred policy: ssl = {report['ssl']}, require_ssl = "
                  f"{report['require_ssl']}"]
    lines += ["", "Findings:"] + ([f"  - {f}" for f in report["findings"]] or ["  none"])
    return "\n".join(lines)


def main(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Exit 0, 1 (an --expect mismatch) or 2 (CONNINFO refused, a host unreachable, silent,
    not PostgreSQL, or out of time); with several hosts, the worst of them."""
    expects: list[str] = args.expect or []
    overall = float(getattr(args, "timeout", None) or DEFAULT_TIMEOUT)
    deadline = time.monotonic() + overall
    try:
        if not overall > 0:
            raise ValueError(f"--timeout {overall:g}: want a number of seconds above 0")
        validate_expects(expects)
        targets = conninfo.resolve(args.conninfo or "")
    except (ValueError, conninfo.ConninfoError) as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()

    def step(text: str) -> None:
        if tty:
            print(f"probe: {text} …", file=sys.stderr, flush=True)

    reports: list[dict[str, Any]] = []
    code = 0
    for target in targets:
        try:
            report = probe_target(target, deadline=deadline, budget=overall, expects=expects,
                                  full=bool(getattr(args, "full", False)), step=step)
        except (ProbeFailed, conninfo.ConninfoError) as exc:
            print(f"probe: {exc}", file=sys.stderr)
            code = 2
            continue
        reports.append(report)
        mismatches = check_expectations(report, expects)
        if not args.json:
            out(render(report))
        for line in mismatches:
            prefix = f"{report['server']}: " if len(targets) > 1 else ""
            print(f"probe: {prefix}{line}", file=sys.stderr)
        code = max(code, 1 if mismatches else 0)
    if args.json and reports:
        out(json.dumps(reports[0] if len(targets) == 1 else {"servers": reports}, indent=2))
    return code
