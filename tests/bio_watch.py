"""A MemoryBIO seen through the methods the relay and tlsclient.py call, noting the most it held
after any write: OpenSSL keeps a memory BIO's buffer at that size for the session's life, so the
tests bound it."""

from __future__ import annotations

import ssl
from typing import Any


class WatchedBio:
    def __init__(self, bio: ssl.MemoryBIO) -> None:
        self.bio, self.most = bio, 0

    def write(self, data: Any) -> int:
        written = self.bio.write(data)
        self.most = max(self.most, self.bio.pending)
        return written

    def read(self, n: int = -1) -> bytes:
        return self.bio.read(n)

    @property
    def pending(self) -> int:
        return self.bio.pending
