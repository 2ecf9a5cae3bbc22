"""server.py's descriptor limits and negotiation budget, without sockets."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.runtime.state import (
    EVICT_SLACK,
    FD_RESERVE,
    HTTP_RESERVE,
    Limits,
    NegotiationBudget,
    compute_limits,
    raise_nofile,
    source_of,
)


def test_plenty_of_descriptors_admit_the_whole_share() -> None:
    limits = compute_limits(10000, 1 << 20, 20)
    assert (limits.relayed, limits.negotiating, limits.per_source) == (10000, 2500, 1250)


def test_nofile_256_splits_what_is_left_after_the_reserve() -> None:
    limits = compute_limits(10000, 256, 15)
    # the [metrics] and [admin] listeners' descriptors are reserved too (HTTP_RESERVE)
    assert limits.sockets == (256 - 15 - FD_RESERVE - HTTP_RESERVE - EVICT_SLACK) // 2 == 63
    assert (limits.relayed, limits.negotiating, limits.per_source) == (42, 21, 10)


def test_a_small_share_still_gets_a_usable_negotiation_budget() -> None:
    limits = compute_limits(5, 1 << 20, 20)
    assert (limits.relayed, limits.negotiating, limits.per_source) == (5, 16, 8)


@given(share=st.integers(1, 1_000_000), nofile=st.integers(1, 1 << 21),
       in_use=st.integers(3, 200))
def test_limits_never_promise_more_descriptors_than_there_are(share: int, nofile: int,
                                                              in_use: int) -> None:
    limits = compute_limits(share, nofile, in_use)
    assert 1 <= limits.relayed <= share and limits.negotiating >= 1
    assert 1 <= limits.per_source <= limits.negotiating
    if nofile - in_use - limits.reserve >= 6:  # anything workable at all
        # two descriptors per client socket, the slack of evicted ones still closing: in budget
        assert 2 * limits.sockets + EVICT_SLACK + in_use + FD_RESERVE <= nofile
        # relayed sessions keep two thirds of what the descriptors allow
        assert limits.negotiating <= max(1, (nofile - in_use - limits.reserve) // 2 // 3)


@pytest.mark.parametrize("limit,expected", [("100:200", "(100, 200)"), ("300", "(300, 300)")])
def test_raise_nofile_raises_the_soft_limit_to_the_hard_one(limit: str, expected: str) -> None:
    prlimit = shutil.which("prlimit")
    assert prlimit, "prlimit (util-linux) missing: .ci/system-deps installs it"
    code = ("import resource; from proxy.runtime.state import raise_nofile; print(raise_nofile(), "
            "resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([prlimit, f"--nofile={limit}", sys.executable, "-c", code],
                         capture_output=True, text=True, check=True).stdout.split(") (")
    assert out[0] + ")" == expected
    hard = expected.split(", ")[1].rstrip(")")
    assert out[1].strip() == f"{hard}, {hard})"


def test_raise_nofile_in_this_process_reports_what_is_in_force() -> None:
    import resource

    _, now = raise_nofile()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now


class Fake:
    def __init__(self, name: str) -> None:
        self.name = name
        self.evicted: str | None = None

    def evict(self, detail: str) -> None:
        assert self.evicted is None, "evicted twice"
        self.evicted = detail

    def __repr__(self) -> str:
        return self.name


LIMITS = Limits(nofile=1024, in_use=10, share=100, relayed=100, negotiating=4, per_source=2)


def test_a_full_budget_drops_the_oldest_not_the_newest() -> None:
    budget = NegotiationBudget()
    olds = [Fake(f"old{i}") for i in range(4)]
    for i, fake in enumerate(olds):
        budget.enter(fake, f"10.0.0.{i}", LIMITS)
    new = Fake("new")
    budget.enter(new, "10.0.0.9", LIMITS)
    assert olds[0].evicted and "negotiation budget 4" in olds[0].evicted
    assert all(f.evicted is None for f in olds[1:]) and new.evicted is None
    assert list(budget.negotiating) == [*olds[1:], new] and budget.evicted == 1


def test_the_per_source_cap_drops_that_source_s_oldest() -> None:
    budget = NegotiationBudget()
    other = Fake("other")
    budget.enter(other, "10.0.0.1", LIMITS)  # the oldest of all, from elsewhere
    a1, a2, a3 = Fake("a1"), Fake("a2"), Fake("a3")
    for fake in (a1, a2, a3):
        budget.enter(fake, "10.0.0.2", LIMITS)
    assert a1.evicted and "per-source cap 2" in a1.evicted and "10.0.0.2" in a1.evicted
    assert other.evicted is None and a2.evicted is None and a3.evicted is None
    assert list(budget.by_source["10.0.0.2"]) == [a2, a3]


def test_leave_frees_the_place_and_forgets_an_empty_source() -> None:
    budget = NegotiationBudget()
    fake = Fake("x")
    budget.enter(fake, "10.0.0.1", LIMITS)
    budget.leave(fake)
    budget.leave(fake)  # twice (negotiated, then ended): harmless
    assert not budget.negotiating and not budget.by_source


@settings(max_examples=300)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=60))
def test_budget_invariants(steps: list[tuple[bool, int]]) -> None:
    budget = NegotiationBudget()
    inside: list[Fake] = []  # oldest first
    for n, (enter, source) in enumerate(steps):
        if enter or not inside:
            fake = Fake(f"s{n}")
            fake.source = f"10.0.0.{source}"  # type: ignore[attr-defined]
            counts: dict[str, int] = {}
            for f in inside:
                counts[f.source] = counts.get(f.source, 0) + 1  # type: ignore[attr-defined]
            budget.enter(fake, fake.source, LIMITS)  # type: ignore[attr-defined]
            victims = [f for f in inside if f.evicted]
            assert len(victims) <= 1
            own = counts.get(fake.source, 0)  # type: ignore[attr-defined]
            for victim in victims:
                where = victim.source  # type: ignore[attr-defined]
                # the oldest of its source...
                assert victim is next(f for f in inside if f.source == where)  # type: ignore[attr-defined]
                if where == fake.source:  # type: ignore[attr-defined]
                    # ...its own: at the per-source cap, or holding as many as any other
                    assert own >= LIMITS.per_source or own >= max(counts.values())
                else:
                    # ...else of a source holding the most slots, more than the new one's
                    assert counts[where] == max(counts.values()) > own
                inside.remove(victim)
            inside.append(fake)
            assert fake.evicted is None
        else:
            budget.leave(inside.pop(n % len(inside)))
        assert list(budget.negotiating) == inside
        assert len(inside) <= LIMITS.negotiating
        for peers in budget.by_source.values():
            assert 0 < len(peers) <= LIMITS.per_source


def test_a_flood_from_several_addresses_evicts_itself_not_the_real_client() -> None:
    """Issue 21 item 4: three flooding addresses (each under the per-source cap) filled the
    budget and every newer flood connection dropped the oldest of all, the real client."""
    limits = Limits(nofile=1024, in_use=10, share=400, relayed=400, negotiating=100,
                    per_source=50)
    budget = NegotiationBudget()
    flood = [f"127.0.1.{i}" for i in range(3)]
    for n in range(99):
        budget.enter(Fake(f"f{n}"), flood[n % 3], limits)
    real = Fake("real")
    budget.enter(real, "127.0.0.1", limits)
    for n in range(5000):  # the flood goes on while the real client is mid-handshake
        budget.enter(Fake(f"g{n}"), flood[n % 3], limits)
    assert real.evicted is None
    assert len(budget.by_source["127.0.0.1"]) == 1
    assert sum(len(p) for p in budget.by_source.values()) == 100


def test_a_real_client_evicts_from_the_largest_source() -> None:
    budget = NegotiationBudget()
    small, big1, big2 = Fake("small"), Fake("big1"), Fake("big2")
    budget.enter(small, "10.0.0.1", LIMITS)  # the oldest of all
    budget.enter(big1, "10.0.0.2", LIMITS)
    budget.enter(big2, "10.0.0.2", LIMITS)
    budget.enter(Fake("other"), "10.0.0.3", LIMITS)
    new = Fake("new")
    budget.enter(new, "10.0.0.4", LIMITS)
    assert big1.evicted and "from 10.0.0.2, the most of any source" in big1.evicted
    assert small.evicted is None and big2.evicted is None


def test_an_ipv6_64_is_one_source_and_ipv4_mapped_is_its_ipv4_address() -> None:
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:ffff::9") \
        == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:127.0.0.7") == "127.0.0.7"  # not ::/64, every IPv4 client's
    assert source_of("::ffff:127.0.0.7") != source_of("::ffff:127.0.0.8")
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("127.0.0.1") == "127.0.0.1"
    budget = NegotiationBudget()
    fakes = [Fake(f"v6-{i}") for i in range(3)]
    for i, fake in enumerate(fakes):  # three addresses of one /64: the per-source cap holds
        budget.enter(fake, f"2001:db8::{i + 1}", LIMITS)
    assert fakes[0].evicted and "per-source cap 2" in fakes[0].evicted


def test_a_flood_from_more_sources_than_slots_evicts_its_idle_sockets_first() -> None:
    """Hostile review: with more flooding addresses than the budget has slots, every source
    holds one and "the source holding the most" was every source: the oldest went, the real
    client mid-handshake. The flood's sockets have sent nothing; the real client has."""
    limits = Limits(nofile=1024, in_use=10, share=400, relayed=400, negotiating=25,
                    per_source=12)
    budget = NegotiationBudget()
    real = Fake("real")
    budget.enter(real, "192.0.2.1", limits)  # the oldest of all
    budget.spoke(real)  # its ClientHello arrived
    for n in range(2000):  # a flood from 40 addresses, one socket each at a time
        budget.enter(Fake(f"f{n}"), f"127.0.{n % 40}.1", limits)
    assert real.evicted is None
    assert len(budget.negotiating) == 25


def test_with_every_source_talking_the_oldest_still_goes() -> None:
    limits = Limits(nofile=1024, in_use=10, share=400, relayed=400, negotiating=3,
                    per_source=2)
    budget = NegotiationBudget()
    sessions = [Fake(f"s{n}") for n in range(4)]
    for n, session in enumerate(sessions[:3]):
        budget.enter(session, f"10.0.0.{n}", limits)
        budget.spoke(session)
    budget.enter(sessions[3], "10.0.0.9", limits)
    assert sessions[0].evicted and sessions[1].evicted is None


def test_a_unix_socket_gets_its_mode_and_replaces_only_a_stale_socket_of_ours(
        tmp_path: Path) -> None:
    import os
    import stat

    from proxy.runtime.server import make_unix_socket

    sock = make_unix_socket(str(tmp_path), 5999, "0770", "")
    path = tmp_path / ".s.PGSQL.5999"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o770
    sock.close()  # the file stays: a proxy that died
    again = make_unix_socket(str(tmp_path), 5999, "0700", "")
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
    with pytest.raises(OSError) as info:  # a live one is not taken over
        make_unix_socket(str(tmp_path), 5999, "0700", "")
    assert "in use" in str(info.value)
    again.close()


def test_a_planted_symlink_is_neither_replaced_nor_followed(tmp_path: Path) -> None:
    """Hostile review: in a shared folder another local user can plant .s.PGSQL.PORT as a
    symlink; it was unlinked (or, swapped in after bind, chmod'ed through) by path."""
    import os
    import stat

    from proxy.runtime.server import make_unix_socket

    target = tmp_path / "precious.key"
    target.write_text("secret")
    target.chmod(0o600)
    (tmp_path / ".s.PGSQL.5998").symlink_to(target)
    with pytest.raises(OSError) as info:
        make_unix_socket(str(tmp_path), 5998, "0777", "")
    assert "is not a socket of this user" in str(info.value)
    assert (tmp_path / ".s.PGSQL.5998").is_symlink()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
