"""pg_ident.conf-style user name maps for client certificates, as data and one pure check.

Owns: the `[[ident]]` entries once parsed (map name, system_user as an exact name or a regex,
pg_user with PostgreSQL's `\\1`), and `maps_to(entries, map, names, user)`: may a certificate
naming any of `names` log in as `user` through `map`. It lives with the config because a bad
line is refused when the configuration is loaded (schema.py checks each), not at a client's
login; policy.py asks `maps_to`. Must not do I/O or know where the names come from (the policy
picks them by `clientname`).

PostgreSQL's semantics (hba.c, check_usermap / check_ident_usermap): the lines of one map are
read in order and the first whose system_user matches and whose pg_user (after `\\1` is
replaced) equals the requested user allows the login; no line matching means refused. A
system_user starting with `/` is a regular expression, searched (not anchored: write ^ and $
as in pg_ident.conf); `\\1` in pg_user is its first capture group, and only the first `\\1` is
replaced, as PostgreSQL does. The comparison is case-sensitive. Python's `re` stands in for
PostgreSQL's ARE syntax; the usual patterns (`^(.*)@corp\\.example$`) read the same in both.
Not taken over: pg_user `all`, `+group` and `/regex` (PostgreSQL 16), which need the
database's role catalogue or would let one line admit every role.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

BACKREFERENCE = "\\1"


@dataclass(frozen=True)
class IdentEntry:
    map: str
    system_user: str  # as written: an exact name, or "/" and a regular expression
    pg_user: str
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def maps(self, name: str, user: str) -> bool:
        if self.regex is None:
            return name == self.system_user and self.pg_user == user
        found = self.regex.search(name)
        if found is None:
            return False
        wanted = self.pg_user
        if BACKREFERENCE in wanted:
            wanted = wanted.replace(BACKREFERENCE, found.group(1) or "", 1)
        return wanted == user


def entry(map_name: str, system_user: str, pg_user: str) -> IdentEntry:
    """One line, checked now rather than at a client's login: ValueError says which part is
    wrong (the config names the key)."""
    if not map_name:
        raise ValueError("map: an empty map name")
    if not system_user or not pg_user:
        raise ValueError("system_user and pg_user must both be non-empty")
    regex = None
    if system_user.startswith("/"):
        try:
            regex = re.compile(system_user[1:])
        except re.error as exc:
            raise ValueError(f"system_user: not a regular expression: {exc}") from None
        if BACKREFERENCE in pg_user and regex.groups < 1:
            # PostgreSQL refuses the login at this point; we refuse the configuration.
            raise ValueError(f"pg_user: {pg_user!r} uses \\1 but the regular expression "
                             "has no capture group")
    elif BACKREFERENCE in pg_user:
        raise ValueError(f"pg_user: {pg_user!r} uses \\1 but system_user is not a regular "
                         "expression (start it with /)")
    return IdentEntry(map_name, system_user, pg_user, regex)


def maps_to(entries: Iterable[IdentEntry], map_name: str, names: Iterable[str],
            user: str) -> bool:
    """Does some line of `map_name` take one of the certificate's `names` to `user`."""
    lines = [e for e in entries if e.map == map_name]
    return any(line.maps(name, user) for line in lines for name in names)
