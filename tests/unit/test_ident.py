"""pg_ident.conf semantics of the [[ident]] maps (PostgreSQL's hba.c check_ident_usermap)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.config import ident as identmap
from proxy.config.ident import entry, maps_to

CORP = [entry("corp", r"/^(.*)@corp\.example$", r"\1"),
        entry("corp", "ops-robot", "monitor"),
        entry("other", r"/^(.*)$", r"\1")]


@pytest.mark.parametrize("names, user, ok", [
    (["alice@corp.example"], "alice", True),
    (["alice@corp.example"], "bob", False),             # the capture names alice, not bob
    (["alice@corp.example.evil"], "alice", False),       # anchored by $, as written
    (["alice@CORP.example"], "alice", False),            # case-sensitive, as PostgreSQL
    (["ops-robot"], "monitor", True),                   # exact line
    (["ops-robot"], "ops-robot", False),
    (["bob"], "bob", False),                             # only map "other" would allow this
    (["x", "carol@corp.example"], "carol", True),        # any of the names (several SANs)
    ([], "alice", False),
])
def test_corp_map(names: list[str], user: str, ok: bool) -> None:
    assert maps_to(CORP, "corp", names, user) is ok


def test_regex_is_searched_not_anchored_like_postgresql() -> None:
    loose = [entry("m", "/corp", "svc")]
    assert maps_to(loose, "m", ["x-corp-y"], "svc")


def test_only_the_first_backreference_is_replaced() -> None:
    line = [entry("m", "/^(a)$", r"\1\1")]
    assert maps_to(line, "m", ["a"], r"a\1")
    assert not maps_to(line, "m", ["a"], "aa")


def test_an_unmatched_optional_group_is_empty() -> None:
    assert maps_to([entry("m", "/^x(y)?$", r"u\1")], "m", ["x"], "u")


@pytest.mark.parametrize("args, problem", [
    (("m", "/(", "u"), "not a regular expression"),
    (("m", "/^abc$", r"\1"), "no capture group"),
    (("m", "alice", r"\1"), "not a regular expression (start it with /)"),
    (("", "a", "b"), "empty map name"),
    (("m", "", "b"), "non-empty"),
])
def test_bad_lines_are_refused_at_load(args: tuple[str, str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        entry(*args)


@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30))
def test_exact_lines_are_plain_equality(name: str, user: str) -> None:
    assume(not name.startswith("/") and identmap.BACKREFERENCE not in user)
    line = [entry("m", name, user)]
    assert maps_to(line, "m", [name], user)
    assert maps_to(line, "m", [name + "x"], user) is False
    assert maps_to(line, "n", [name], user) is False
