"""TCP options of the proxy's own sockets: keepalive and the user timeout.

Owns: turning `[listen]`'s tcp_keepalives_idle/interval/count and tcp_user_timeout (PostgreSQL's
names and units) into setsockopt calls, on the listening socket (Linux copies a listening
socket's TCP options to the sockets it accepts) and on a session's backend socket. Must not
decide when a connection is dead: the kernel does, these only say how soon.

Why the proxy needs them: behind it, PostgreSQL's own tcp_keepalives_* and tcp_user_timeout
watch the proxy, which stays healthy, never the client. A client that vanished without FIN or
RST (a laptop asleep, a NAT that dropped its state) kept its backend session, its transaction
and its locks for the OS default of two hours (tcp_keepalive_time 7200 s). 0 keeps the OS
default for that option, as in PostgreSQL.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config.schema import ListenConfig


def options(listen: ListenConfig) -> list[tuple[int, int, int]]:
    """(level, option, value) for each setting that is not 0, SO_KEEPALIVE first."""
    out = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", listen.tcp_keepalives_idle),
                        ("TCP_KEEPINTVL", listen.tcp_keepalives_interval),
                        ("TCP_KEEPCNT", listen.tcp_keepalives_count),
                        ("TCP_USER_TIMEOUT", listen.tcp_user_timeout)):
        option = getattr(socket, name, None)
        if value and option is not None:
            out.append((socket.IPPROTO_TCP, option, value))
    return out


def apply(sock: Any, listen: ListenConfig) -> None:
    """Set them on `sock` (a socket, or uvloop's pseudo-socket of a transport). A socket that
    is not TCP (a Unix socket) or already closed is left as it is."""
    if sock is None:
        return
    for level, option, value in options(listen):
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)
