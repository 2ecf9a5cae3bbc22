"""What ends a connection's start-up: the StartupMessage goes on (`Allow`) or the client gets an
ErrorResponse (`Reject`).

Owns: the two decision types. The policy (policy.py) makes them and the negotiation
(negotiation.py) carries them, so they live here, below both. Must not decide anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Allow:
    rule: int | None = None  # index of the rule that allowed it, None without rules


@dataclass(frozen=True)
class Reject:
    reason: str  # a dwsproxy_connections_rejected_total reason
    sqlstate: str
    message: str
    hint: str = ""


Decision = Allow | Reject
