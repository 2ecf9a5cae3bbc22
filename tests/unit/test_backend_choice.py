"""runtime/backends.py without sockets: libpq's order, the back-off, which role fits
target_session_attrs; and the policy's `local` clients (issues 24, 26)."""

from __future__ import annotations

import random

import pytest

from proxy import policy
from proxy.config.schema import TlsConfig, parse
from proxy.runtime import backends
from proxy.runtime.backend import Role

PRIMARY, STANDBY, READ_ONLY_PRIMARY = Role(False, False), Role(True, True), Role(False, True)


@pytest.mark.parametrize("wanted,role,why", [
    ("read-write", PRIMARY, ""), ("read-write", STANDBY, "session is read-only"),
    ("read-write", READ_ONLY_PRIMARY, "session is read-only"),
    ("read-only", PRIMARY, "session is not read-only"), ("read-only", STANDBY, ""),
    ("primary", PRIMARY, ""), ("primary", STANDBY, "server is in hot standby mode"),
    ("primary", READ_ONLY_PRIMARY, ""),
    ("standby", PRIMARY, "server is not in hot standby mode"), ("standby", STANDBY, ""),
    ("any", STANDBY, ""),
])
def test_which_role_fits_as_libpq_tests_it(wanted: str, role: Role, why: str) -> None:
    assert backends._misfit(wanted, role) == why


def test_order_is_the_configured_one_and_a_failed_host_goes_last_for_its_back_off() -> None:
    cfg = parse('[backend]\nhost = "a,b,c"\n', "/tmp/x.toml").backend
    b = backends.Backends()
    assert [s.host.host for s in b.order(cfg)] == ["a", "b", "c"]
    b._failed(b.states(cfg)[0], "refused")
    assert [s.host.host for s in b.order(cfg)] == ["b", "c", "a"]
    st = b.states(cfg)[0]
    st.retry_at = 0.0  # the back-off is over
    assert [s.host.host for s in b.order(cfg)] == ["a", "b", "c"]
    b._failed(st, "refused")
    assert st.failures == 2 and st.retry_at > 0
    b._succeeded(st)
    assert st.failures == 0 and st.up is True


def test_random_order_shuffles_per_connection() -> None:
    cfg = parse('[backend]\nhost = "a,b,c"\nload_balance_hosts = "random"\n',
                "/tmp/x.toml").backend
    b = backends.Backends(random.Random(7))
    firsts = {b.order(cfg)[0].host.host for _ in range(60)}
    assert firsts == {"a", "b", "c"}


def test_the_refusal_names_every_host_and_why() -> None:
    exc = backends.NoBackend([("a:5432", "Connection refused"),
                              ("b:5432", "server is in hot standby mode")], [])
    assert str(exc) == "a:5432: Connection refused; b:5432: server is in hot standby mode"


def test_a_local_client_is_judged_by_local_rules_only() -> None:
    tls = TlsConfig(ssl=True, require_ssl=True, clientcert="verify-full", ssl_ca_file="x")
    local = policy.Facts(encrypted=False, user="alice", database="db", local=True)
    # require_ssl and the global clientcert are about the network hop: not for a Unix socket
    assert isinstance(policy.decide(tls, (), local), policy.Allow)
    cfg = parse('[[rules]]\ntype = "local"\nuser = "bob"\naction = "reject"\n'
                '[[rules]]\ntype = "local"\naction = "allow"\n'
                '[[rules]]\ntype = "host"\nuser = "alice"\naction = "reject"\n', "/tmp/x.toml")
    assert policy.decide(tls, cfg.rules, local) == policy.Allow(2)
    bob = policy.Facts(encrypted=False, user="bob", database="db", local=True)
    refused = policy.decide(tls, cfg.rules, bob)
    assert isinstance(refused, policy.Reject) and "rule #1" in refused.message
    # a host rule never matches a local client, nor a local rule a TCP one
    only_host = parse('[[rules]]\ntype = "host"\naction = "allow"\n', "/tmp/x.toml")
    refused = policy.decide(tls, only_host.rules, local)
    assert isinstance(refused, policy.Reject) and '"[local]"' in refused.message
    tcp = policy.Facts(encrypted=True, tls_version="TLSv1.3", user="carol", database="db")
    assert isinstance(policy.decide_rules("CN", cfg.rules, tcp), policy.Reject)
