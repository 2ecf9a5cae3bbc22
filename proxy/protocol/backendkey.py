"""What the proxy learns from the backend's first messages, sans-IO: its BackendKeyData.

Owns: following the backend's message stream from the StartupMessage's answer up to the first
ReadyForQuery (or an ErrorResponse, or a broken length), keeping only the process ID and secret
key of the BackendKeyData ('K') that passes by, and building the CancelRequest that key allows.
Must not change or hold back any byte: the relay passes every chunk on as it comes and only
shows it to a `KeyScan` too, until the scan is done. Must not touch sockets or the loop.

Protocol 3.0 sends a 4-byte key; 3.2 (PostgreSQL 18) up to 256 bytes: a 'K' message's body is
the Int32 process ID and the rest is the key. Messages are a type byte and an Int32 length that
includes itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .wire import CANCEL_REQUEST_CODE

MAX_KEY = 256  # protocol 3.2's limit on the secret key
_DONE_AT = frozenset(b"ZE")  # ReadyForQuery: start-up is over; ErrorResponse: it failed


@dataclass(frozen=True)
class BackendKey:
    pid: int
    secret: bytes  # never shown or logged: anyone holding it can cancel the session's queries

    def cancel_request(self) -> bytes:
        return struct.pack("!iIi", 12 + len(self.secret), CANCEL_REQUEST_CODE,
                           self.pid) + self.secret


class KeyScan:
    """Feed it the backend's bytes in order; `feed` returns True once there is nothing more to
    learn (the key was seen, start-up ended, or the stream is not what we expect)."""

    __slots__ = ("_body", "_head", "_kind", "_skip", "key")

    def __init__(self) -> None:
        self.key: BackendKey | None = None
        self._head = b""  # a message header not yet whole
        self._skip = 0  # bytes of the current message's body still to pass over
        self._kind = 0
        self._body = b""  # the 'K' body being gathered

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        view = memoryview(data)
        while view:
            if self._skip:
                take = min(self._skip, len(view))
                if self._kind == ord("K"):
                    self._body += bytes(view[:take])
                self._skip -= take
                view = view[take:]
                if not self._skip and self._kind == ord("K"):
                    return self._key_done()
                continue
            need = 5 - len(self._head)
            self._head += bytes(view[:need])
            view = view[need:]
            if len(self._head) < 5:
                return False
            kind, length = self._head[0], struct.unpack_from("!i", self._head, 1)[0]
            self._head = b""
            if kind in _DONE_AT:
                return True
            if kind == ord("K"):
                if not 4 + 4 + 4 <= length <= 4 + 4 + MAX_KEY:
                    return True  # not a BackendKeyData we can use
                self._kind, self._skip, self._body = kind, length - 4, b""
                continue
            if length < 4:
                return True  # the stream is broken; the client will see it
            self._kind, self._skip = kind, length - 4
            if not self._skip:
                continue
        return False

    def _key_done(self) -> bool:
        pid = struct.unpack_from("!i", self._body)[0]
        self.key = BackendKey(pid, self._body[4:])
        self._body = b""
        return True
