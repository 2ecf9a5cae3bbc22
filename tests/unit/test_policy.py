"""policy.decide: Table 3 of the seed, client certificates and [[rules]], as pure data."""

import ipaddress

import pytest

from proxy import policy
from proxy.config.ident import IdentEntry, entry
from proxy.config.schema import Rule, TlsConfig
from proxy.tls.contexts import CertFacts
from proxy.tls.verify import CertVerdict

ALICE = CertFacts(subject="CN=alice,O=dwsproxy", common_name="alice", sans=("alice.example",),
                  issuer="CN=root", serial=1, not_after=0.0)

# The seed's Table 3, written out cell by cell: (ssl, require_ssl, sslmode) -> result.
TABLE3 = {
    (True, True, "disable"): "refused", (True, False, "disable"): "plaintext",
    (True, True, "allow"): "TLS", (True, False, "allow"): "plaintext",
    (True, True, "prefer"): "TLS", (True, False, "prefer"): "TLS",
    (True, True, "require"): "TLS", (True, False, "require"): "TLS",
    (True, True, "verify-ca"): "TLS", (True, False, "verify-ca"): "TLS",
    (True, True, "verify-full"): "TLS", (True, False, "verify-full"): "TLS",
    **{(False, r, m): "plaintext" for r in (True, False) for m in ("disable", "allow", "prefer")},
    **{(False, r, m): "refused" for r in (True, False)
       for m in ("require", "verify-ca", "verify-full")},
}


def attempt(tls: TlsConfig, encrypted: bool) -> policy.Decision:
    facts = policy.Facts(encrypted=encrypted, tls_version="TLSv1.3" if encrypted else "",
                         user="u", database="d")
    return policy.decide(tls, (), facts)


def libpq(tls: TlsConfig, sslmode: str) -> str:
    """What libpq does with the server's answers (fe-connect.c): the server side is policy's
    decision, the SSLRequest answer is `ssl`."""
    if sslmode == "disable":
        return "plaintext" if isinstance(attempt(tls, False), policy.Allow) else "refused"
    if sslmode == "allow":
        if isinstance(attempt(tls, False), policy.Allow):
            return "plaintext"
        if not tls.ssl:
            return "refused"
        return "TLS" if isinstance(attempt(tls, True), policy.Allow) else "refused"
    if not tls.ssl:  # SSLRequest answered N
        if sslmode != "prefer":
            return "refused"
        return "plaintext" if isinstance(attempt(tls, False), policy.Allow) else "refused"
    return "TLS" if isinstance(attempt(tls, True), policy.Allow) else "refused"


@pytest.mark.parametrize("cell", sorted(TABLE3), ids=lambda c: f"ssl={c[0]}-req={c[1]}-{c[2]}")
def test_table3(cell: tuple[bool, bool, str]) -> None:
    ssl, require_ssl, sslmode = cell
    assert libpq(TlsConfig(ssl=ssl, require_ssl=require_ssl), sslmode) == TABLE3[cell]


def test_ssl_required_refusal_is_28000_with_a_hint() -> None:
    decision = attempt(TlsConfig(ssl=True, require_ssl=True), False)
    assert isinstance(decision, policy.Reject)
    assert (decision.reason, decision.sqlstate) == ("ssl_required", "28000")
    assert "SSL" in decision.message and "sslmode=require" in decision.hint


def test_direct_tls_without_alpn_is_refused() -> None:
    facts = policy.Facts(encrypted=True, tls_version="TLSv1.3", direct_tls=True, alpn=None,
                         user="u")
    decision = policy.decide(TlsConfig(), (), facts)
    assert isinstance(decision, policy.Reject) and decision.sqlstate == "08P01"
    ok = policy.Facts(encrypted=True, tls_version="TLSv1.3", direct_tls=True, alpn="postgresql",
                      user="u")
    assert isinstance(policy.decide(TlsConfig(), (), ok), policy.Allow)


@pytest.mark.parametrize("level,cert,user,reason", [
    ("verify-ca", None, "alice", "client_cert_missing"),
    ("verify-ca", ALICE, "postgres", None),
    ("verify-full", ALICE, "alice", None),
    # a SAN (often a host name) is not a role name unless clientname = "SAN"
    ("verify-full", ALICE, "alice.example", "client_cert_invalid"),
    ("verify-full", ALICE, "postgres", "client_cert_invalid"),
    ("optional", None, "alice", None),
    ("none", None, "alice", None),
])
def test_clientcert_levels(level: str, cert: CertFacts | None, user: str,
                           reason: str | None) -> None:
    facts = policy.Facts(encrypted=True, tls_version="TLSv1.3", client_cert=cert, user=user)
    decision = policy.decide(TlsConfig(clientcert=level), (), facts)
    if reason is None:
        assert isinstance(decision, policy.Allow)
    else:
        assert isinstance(decision, policy.Reject) and decision.reason == reason
        assert decision.sqlstate == "28000"


def test_plaintext_session_cannot_satisfy_clientcert() -> None:
    decision = policy.decide(TlsConfig(clientcert="verify-ca"), (),
                             policy.Facts(encrypted=False, user="u"))
    assert isinstance(decision, policy.Reject) and decision.reason == "client_cert_missing"


GSQL_RULES = (
    Rule(index=1, application_name="gsql", ssl_protocols=("TLSv1.2",), action="allow"),
    Rule(index=2, type="hostssl", action="allow"),
    Rule(index=3, type="hostnossl", address=ipaddress.ip_network("10.0.0.0/8"), action="allow"),
)


def facts(**kw: object) -> policy.Facts:
    base: dict[str, object] = {"encrypted": True, "tls_version": "TLSv1.3", "user": "u",
                                   "database": "d", "peer": ipaddress.ip_address("127.0.0.1")}
    base.update(kw)
    return policy.Facts(**base)


def test_rule_gsql_on_tls13_is_refused_naming_the_rule() -> None:
    decision = policy.decide(TlsConfig(), GSQL_RULES, facts(application_name="gsql"))
    assert isinstance(decision, policy.Reject) and decision.reason == "tls_version"
    assert "rule #1" in decision.message and "TLSv1.2" in decision.message
    assert "PGSSLMAXPROTOCOLVERSION=TLSv1.2" in decision.hint


def test_rule_gsql_on_tls12_allowed_by_rule_1() -> None:
    decision = policy.decide(TlsConfig(), GSQL_RULES,
                             facts(application_name="gsql", tls_version="TLSv1.2"))
    assert decision == policy.Allow(1)


def test_first_match_wins_and_hostssl() -> None:
    assert policy.decide(TlsConfig(), GSQL_RULES, facts(application_name="psql")) == \
        policy.Allow(2)


def test_hostnossl_with_cidr() -> None:
    inside = facts(encrypted=False, tls_version="", peer=ipaddress.ip_address("10.1.2.3"))
    outside = facts(encrypted=False, tls_version="", peer=ipaddress.ip_address("192.0.2.1"))
    assert policy.decide(TlsConfig(), GSQL_RULES, inside) == policy.Allow(3)
    decision = policy.decide(TlsConfig(), GSQL_RULES, outside)
    assert isinstance(decision, policy.Reject) and decision.reason == "rule"
    assert "no rule matches" in decision.message and "no encryption" in decision.message


def test_reject_action_and_globs() -> None:
    rules = (Rule(index=1, user="app_*", database="prod", action="reject"),
             Rule(index=2, action="allow"))
    refused = policy.decide(TlsConfig(), rules, facts(user="app_web", database="prod"))
    assert isinstance(refused, policy.Reject) and "rule #1" in refused.message
    assert policy.decide(TlsConfig(), rules, facts(user="app_web", database="dev")) == \
        policy.Allow(2)


def test_rule_clientcert_tightens() -> None:
    rules = (Rule(index=1, user="alice", clientcert="verify-full", action="allow"),)
    assert policy.decide(TlsConfig(), rules, facts(user="alice", client_cert=ALICE)) == \
        policy.Allow(1)
    no_cert = policy.decide(TlsConfig(), rules, facts(user="alice"))
    assert isinstance(no_cert, policy.Reject) and no_cert.reason == "client_cert_missing"
    assert "rule #1" in no_cert.message


def test_ipv6_peer_never_matches_ipv4_rule() -> None:
    rules = (Rule(index=1, address=ipaddress.ip_network("127.0.0.0/8"), action="allow"),)
    decision = policy.decide(TlsConfig(), rules, facts(peer=ipaddress.ip_address("::1")))
    assert isinstance(decision, policy.Reject)


# -- clientname (PostgreSQL's hba option): CN by default, DN, SAN only when asked ------------
# CN=alice with a SAN naming another role: the SAN must not log in as that role by default.
MALLORY = CertFacts(subject="CN=alice,O=dwsproxy", common_name="alice", sans=("postgres",),
                    issuer="CN=root", serial=2, not_after=0.0)


@pytest.mark.parametrize("clientname,user,allowed", [
    ("CN", "postgres", False), ("CN", "alice", True),
    ("DN", "CN=alice,O=dwsproxy", True), ("DN", "alice", False),
    ("SAN", "postgres", True), ("SAN", "alice", False),
])
def test_verify_full_matches_the_name_clientname_chooses(clientname: str, user: str,
                                                         allowed: bool) -> None:
    facts = policy.Facts(encrypted=True, tls_version="TLSv1.3", client_cert=MALLORY, user=user)
    decision = policy.decide(TlsConfig(clientcert="verify-full", clientname=clientname), (),
                             facts)
    assert isinstance(decision, policy.Allow) is allowed
    if not allowed:
        assert f"clientname={clientname}" in decision.message


# -- physical replication is the pseudo-database "replication", as in pg_hba ---------------
APP_ONLY = (Rule(index=1, database="app", action="allow"),)
WITH_REPLICATION = (*APP_ONLY, Rule(index=2, database="replication", action="allow"))


def test_physical_replication_does_not_match_a_database_rule() -> None:
    decision = policy.decide(TlsConfig(), APP_ONLY, facts(database="app", replication=True))
    assert isinstance(decision, policy.Reject) and decision.reason == "rule"
    assert "replication connection" in decision.message


def test_physical_replication_matches_only_the_replication_keyword() -> None:
    decision = policy.decide(TlsConfig(), WITH_REPLICATION,
                             facts(database="app", replication=True))
    assert decision == policy.Allow(2)
    star = (Rule(index=1, database="*", action="allow"),)  # pg_hba's "all" excludes it too
    assert isinstance(policy.decide(TlsConfig(), star, facts(replication=True)), policy.Reject)
    # a normal session to a database named "replication" is not a replication connection
    assert isinstance(policy.decide(TlsConfig(), WITH_REPLICATION[1:],
                                    facts(database="replication")), policy.Reject)


# -- CancelRequest: address rules, ALPN and a refused certificate --------------------------
def test_cancel_follows_address_rules() -> None:
    rules = (Rule(index=1, address=ipaddress.ip_network("10.0.0.0/8"), action="reject"),
             Rule(index=2, user="bob", action="reject"),  # cannot judge a cancel: skipped
             Rule(index=3, address=ipaddress.ip_network("127.0.0.0/8"), action="allow"))
    at = ipaddress.ip_address
    assert isinstance(policy.decide_cancel(rules, facts(peer=at("10.1.2.3"))), policy.Reject)
    assert policy.decide_cancel(rules, facts(peer=at("127.0.0.1"))) == policy.Allow(3)
    nothing = policy.decide_cancel(rules, facts(peer=at("192.0.2.1")))
    assert isinstance(nothing, policy.Reject) and "no rule allows" in nothing.message
    assert policy.decide_cancel((), facts(peer=at("192.0.2.1"))) == policy.Allow()


def test_cancel_over_direct_tls_needs_alpn_and_a_good_certificate() -> None:
    assert isinstance(policy.decide_cancel((), facts(direct_tls=True, alpn=None)), policy.Reject)
    assert policy.decide_cancel((), facts(direct_tls=True, alpn="postgresql")) == policy.Allow()
    revoked = facts(client_cert_error=CertVerdict("client_cert_revoked", "revoked"))
    assert policy.decide_cancel((), revoked) == policy.Reject(
        "client_cert_revoked", "28000", "revoked")


def test_ipv4_peer_matches_an_ipv6_rule_in_mapped_form() -> None:
    """PostgreSQL's check_ip: ::/0 covers IPv4 peers of a dual-stack listener too."""
    rules = (Rule(index=1, address=ipaddress.ip_network("::/0"), action="reject"),
             Rule(index=2, action="allow"))
    decision = policy.decide(TlsConfig(), rules, facts(peer=ipaddress.ip_address("10.1.2.3")))
    assert isinstance(decision, policy.Reject) and "rule #1" in decision.message


def test_cancel_under_no_plaintext_rules_still_passes() -> None:
    """hostnossl reject + hostssl allow: a libpq 15 (plaintext) cancel is not refused, an
    unconditional reject of its address is."""
    rules = (Rule(index=1, type="hostnossl", action="reject"),
             Rule(index=2, type="hostssl", action="allow"))
    plain = facts(encrypted=False, tls_version="", peer=ipaddress.ip_address("127.0.0.1"))
    assert policy.decide_cancel(rules, plain) == policy.Allow(2)
    blocked = (Rule(index=1, address=ipaddress.ip_network("127.0.0.0/8"), action="reject"),
               *rules)
    assert isinstance(policy.decide_cancel(blocked, plain), policy.Reject)


# --- [[ident]] maps for verify-full (pg_ident.conf) ----------------------------------------------
def _corp_maps() -> tuple[IdentEntry, ...]:
    return (entry("corp", r"/^(.*)@corp\.example$", r"\1"),
            entry("spiffe", r"/^spiffe://corp\.example/ns/[^/]+/sa/([a-z]+)$", r"\1"))


@pytest.mark.parametrize("user, cn, sans, clientname, ident_map, allowed", [
    ("alice", "alice@corp.example", (), "CN", "corp", True),
    ("bob", "alice@corp.example", (), "CN", "corp", False),
    ("alice@corp.example", "alice@corp.example", (), "CN", "corp", False),  # the map decides
    ("alice@corp.example", "alice@corp.example", (), "CN", "", True),       # no map: exact
    ("alice", "w7", ("spiffe://corp.example/ns/prod/sa/alice",), "SAN", "spiffe", True),
    ("alice", "w7", ("spiffe://corp.example/ns/prod/sa/alice",), "CN", "spiffe", False),
    ("alice", "w7", ("spiffe://corp.example/ns/prod/sa/alice",), "SAN", "", False),
])
def test_verify_full_through_an_ident_map(user: str, cn: str, sans: tuple[str, ...],
                                          clientname: str, ident_map: str,
                                          allowed: bool) -> None:
    cert = CertFacts(subject=f"CN={cn}", common_name=cn, sans=sans, issuer="CN=root",
                     serial=1, not_after=0.0)
    facts = policy.Facts(encrypted=True, tls_version="TLSv1.3", client_cert=cert, user=user,
                         database="d")
    tls = TlsConfig(clientcert="verify-full", clientname=clientname, ident_map=ident_map)
    decision = policy.decide(tls, (), facts, _corp_maps())
    assert isinstance(decision, policy.Allow) is allowed, decision
    if not allowed and ident_map:
        assert isinstance(decision, policy.Reject)
        assert f"ident_map={ident_map}" in decision.message


def test_a_rules_own_map() -> None:
    cert = CertFacts(subject="CN=alice@corp.example", common_name="alice@corp.example", sans=(),
                     issuer="CN=root", serial=1, not_after=0.0)
    rules = (Rule(1, clientcert="verify-full", ident_map="corp", action="allow"),)
    for user, allowed in (("alice", True), ("bob", False)):
        facts = policy.Facts(encrypted=True, tls_version="TLSv1.3", client_cert=cert,
                             user=user, database="d")
        decision = policy.decide(TlsConfig(clientcert="optional"), rules, facts,
                                 _corp_maps())
        assert isinstance(decision, policy.Allow) is allowed
