"""The SSL policy: one pure function from (settings, facts about a connection) to a decision.

Owns: Table 3 of the seed (ssl × require_ssl × what the client did), the client-certificate
levels, and the `[[rules]]`. Must not do I/O, read the clock or touch metrics: the session
gathers the facts, this module decides, the session acts.

A refusal is data (`Reject`) carrying the metrics reason, the SQLSTATE and a message that says
what to change; libpq's sslmode=allow depends on the plaintext refusal being an ErrorResponse.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .config.ident import IdentEntry, maps_to
from .config.schema import CLIENTCERT_LEVELS, Rule, TlsConfig, address_matches
from .protocol.decision import Allow as Allow
from .protocol.decision import Decision as Decision
from .protocol.decision import Reject as Reject
from .protocol.wire import INVALID_AUTHORIZATION, PROTOCOL_VIOLATION
from .tls.contexts import ALPN_POSTGRESQL, CertFacts
from .tls.verify import CertVerdict


@dataclass(frozen=True)
class Facts:
    encrypted: bool
    tls_version: str = ""
    cipher: str = ""
    direct_tls: bool = False
    alpn: str | None = None
    client_cert: CertFacts | None = None
    # why a presented certificate failed the CRL check after the handshake
    client_cert_error: CertVerdict | None = None
    user: str = ""
    database: str = ""
    application_name: str = ""
    # physical replication opens a walsender for the whole cluster: rules see the pseudo
    # database "replication", as pg_hba does, never the `database` the client named
    replication: bool = False
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    # a client of the Unix-socket listener ([listen] unix_socket_dir): pg_hba's `local`
    local: bool = False


_SSL_HINT = ("connect with SSL: set sslmode=require (or prefer, verify-ca, verify-full) in the "
             "connection string or PGSSLMODE")


def decide(tls: TlsConfig, rules: tuple[Rule, ...], facts: Facts,
           ident: tuple[IdentEntry, ...] = ()) -> Decision:
    if facts.direct_tls and facts.alpn != ALPN_POSTGRESQL:
        # PostgreSQL 17 requires ALPN on direct TLS, so that a TLS connection meant for another
        # protocol can never be taken for a PostgreSQL one (ALPACA-style cross-protocol attacks).
        return Reject("tls_handshake", PROTOCOL_VIOLATION,
                      "received direct SSL connection request without ALPN protocol "
                      "negotiation extension",
                      hint="use a client that sends ALPN \"postgresql\" (libpq 17 or later)")
    if facts.local:
        # A Unix socket never leaves the host and cannot carry TLS (PostgreSQL answers 'N' to
        # an SSLRequest there): require_ssl and the global clientcert, which are about the
        # network hop, do not apply, as pg_hba's hostssl lines never match a `local`
        # connection. Only `type = "local"` rules match it: with no [[rules]] it is allowed,
        # with rules but none of type local it is refused, as pg_hba.
        return decide_rules(tls.clientname, rules, facts)
    if not facts.encrypted and tls.ssl and tls.require_ssl:
        return Reject("ssl_required", INVALID_AUTHORIZATION,
                      "SSL connection is required by the server (require_ssl is on)",
                      hint=_SSL_HINT)
    if facts.client_cert_error is not None:
        # A certificate that was presented must be good, whatever clientcert says.
        error = facts.client_cert_error
        return Reject(error.reason, INVALID_AUTHORIZATION, error.message,
                      hint=error.hint
                      or "use a valid, unrevoked client certificate (PGSSLCERT, PGSSLKEY)")
    problem = _check_clientcert(tls.clientcert, tls.clientname, facts, "the server",
                                tls.ident_map, ident)
    if problem is not None:
        return problem
    return decide_rules(tls.clientname, rules, facts, ident)


def decide_rules(clientname: str, rules: tuple[Rule, ...], facts: Facts,
                 ident: tuple[IdentEntry, ...] = ()) -> Decision:
    """The `[[rules]]` part of `decide`; also asked again of open sessions after a reload."""
    if not rules:
        return Allow()
    for rule in rules:
        if not rule.matches(encrypted=facts.encrypted, user=facts.user, database=facts.database,
                            application_name=facts.application_name, peer=facts.peer,
                            replication=facts.replication, local=facts.local):
            continue
        if rule.action == "reject":
            return Reject("rule", INVALID_AUTHORIZATION,
                          f"connection refused by {rule.describe()}")
        if rule.ssl_protocols and facts.tls_version not in rule.ssl_protocols:
            got = facts.tls_version or "no SSL"
            return Reject(
                "tls_version", INVALID_AUTHORIZATION,
                f"{rule.describe()} requires {' or '.join(rule.ssl_protocols)}, "
                f"this connection negotiated {got}",
                hint=("limit the client's TLS version, e.g. "
                      f"PGSSLMAXPROTOCOLVERSION={rule.ssl_protocols[-1]}")
                if facts.encrypted else _SSL_HINT,
            )
        if rule.clientcert:
            problem = _check_clientcert(rule.clientcert, clientname, facts, rule.describe(),
                                        rule.ident_map, ident)
            if problem is not None:
                return problem
        return Allow(rule.index)
    where = "SSL encryption" if facts.encrypted else "no encryption"
    database = ("replication connection" if facts.replication
                else f"database \"{facts.database}\"")
    host = "[local]" if facts.local else facts.peer
    return Reject("rule", INVALID_AUTHORIZATION,
                  f"no rule matches host \"{host}\", user \"{facts.user}\", {database}, "
                  f"application_name \"{facts.application_name}\", {where}")


def decide_cancel(rules: tuple[Rule, ...], facts: Facts) -> Decision:
    """A CancelRequest carries no user or database, and libpq before 17 sends it in plaintext
    whatever sslmode the session used; so it is judged by what it does carry: the direct-TLS
    ALPN rule, a presented certificate, and the peer address. Rules are read in order: the
    first one whose address covers the peer decides if it is an `allow` of any type (some
    session from there may be allowed, over TLS or not: the cancel is authenticated by the
    session's secret key) or an unconditional `reject` (type host; user, database and
    application_name all "*"). A reject narrowed by type, user, database or application_name
    cannot judge a cancel and is skipped, so the usual "hostnossl reject, hostssl allow" still
    lets a libpq 15 client's plaintext cancel through. No rule covering the peer: refused."""
    if facts.direct_tls and facts.alpn != ALPN_POSTGRESQL:
        return Reject("tls_handshake", PROTOCOL_VIOLATION, "direct TLS cancel without ALPN")
    if facts.client_cert_error is not None:
        return Reject(facts.client_cert_error[0], INVALID_AUTHORIZATION,
                      facts.client_cert_error[1])
    if not rules:
        return Allow()
    for rule in rules:
        if rule.address is not None and not address_matches(rule.address, facts.peer):
            continue
        if rule.action == "allow":
            return Allow(rule.index)
        if rule.type == "host" and rule.user == rule.database == rule.application_name == "*":
            return Reject("rule", INVALID_AUTHORIZATION,
                          f"cancel request refused by {rule.describe()}")
    return Reject("rule", INVALID_AUTHORIZATION,
                  f"cancel request refused: no rule allows host \"{facts.peer}\"")


def _check_clientcert(level: str, clientname: str, facts: Facts, who: str,
                      ident_map: str = "", ident: tuple[IdentEntry, ...] = ()) -> Reject | None:
    """The certificate was already verified (CA, CRL, validity) in the handshake when presented;
    here: is one required, and for verify-full does it name the user: exactly, or through the
    [[ident]] map `ident_map` (pg_ident.conf's semantics, config/ident.py)."""
    if CLIENTCERT_LEVELS.index(level) < CLIENTCERT_LEVELS.index("verify-ca"):
        return None
    cert = facts.client_cert
    if cert is None:
        return Reject("client_cert_missing", INVALID_AUTHORIZATION,
                      f"connection requires a valid client certificate ({who}: clientcert="
                      f"{level})",
                      hint="connect with SSL and set sslcert and sslkey (PGSSLCERT, PGSSLKEY)")
    if level != "verify-full":
        return None
    names = _names(cert, clientname)
    if ident_map:
        if maps_to(ident, ident_map, names, facts.user):
            return None
    elif facts.user in names:
        return None
    shown = {"CN": f"CN \"{cert.common_name}\"", "DN": f"DN \"{cert.subject}\"",
             "SAN": f"SANs {list(cert.sans)}"}[clientname]
    if ident_map:
        return Reject("client_cert_invalid", INVALID_AUTHORIZATION,
                      f"certificate authentication failed for user \"{facts.user}\": client "
                      f"certificate {shown} is not mapped to this user by [[ident]] map "
                      f"\"{ident_map}\" ({who}: clientcert=verify-full, clientname="
                      f"{clientname}, ident_map={ident_map})",
                      hint="connect as a user the map gives this certificate")
    return Reject("client_cert_invalid", INVALID_AUTHORIZATION,
                  f"certificate authentication failed for user \"{facts.user}\": client "
                  f"certificate {shown} does not match the user name "
                  f"({who}: clientcert=verify-full, clientname={clientname})",
                  hint="connect as the user named in the certificate, or use a certificate "
                       f"whose {clientname} is the user name")


def _names(cert: CertFacts, clientname: str) -> tuple[str, ...]:
    """What verify-full compares with the user name: the CN (PostgreSQL's default), the whole
    subject DN in RFC 4514 form (clientname=DN), or — opt-in, not PostgreSQL — the DNS,
    e-mail and URI SANs (a SPIFFE ID is a URI SAN; a SAN is often a host name, which must not
    pass for a role by default)."""
    if clientname == "DN":
        return (cert.subject,)
    if clientname == "SAN":
        return cert.sans
    return (cert.common_name,) if cert.common_name else ()
