"""SCRAM-SHA-256 (RFC 5802, RFC 7677), the client side, without channel binding.

Owns: the three messages of the proxy's own login (the health check's role, backend.py's
`check_role`) and the check of the server's signature. Sans-IO: strings and bytes in and out.
Must not touch a socket or a clock. Used for the proxy's own connections only: a client's
authentication always passes through the relay untouched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets


class ScramError(Exception):
    """The server's SCRAM messages are malformed or its signature is wrong."""


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


class ScramClient:
    """One exchange: first() -> final(server_first) -> verify(server_final)."""

    def __init__(self, password: str, nonce: str | None = None, user: str = "") -> None:
        self.password = password.encode()  # SASLprep of ASCII is the identity
        self.nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        # PostgreSQL ignores the SCRAM user name (it is the StartupMessage's), so none is
        # sent; "n,," = no channel binding, right for a check that never crosses the proxy.
        self.first_bare = f"n={user},r={self.nonce}"
        self._auth = ""
        self._server_key = b""

    def first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode("ascii", "replace")
        fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        nonce, salt, iterations = fields.get("r", ""), fields.get("s", ""), fields.get("i", "")
        if not nonce.startswith(self.nonce) or not salt or not iterations.isdigit():
            raise ScramError("malformed SCRAM server-first-message")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(salt),
                                     int(iterations))
        client_key = _hmac(salted, b"Client Key")
        self._server_key = _hmac(salted, b"Server Key")
        without_proof = f"c=biws,r={nonce}"
        self._auth = f"{self.first_bare},{text},{without_proof}"
        signature = _hmac(_h(client_key), self._auth.encode())
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        text = server_final.decode("ascii", "replace")
        if not text.startswith("v="):
            raise ScramError(f"SCRAM failed: {text[:80]}")
        expected = _hmac(self._server_key, self._auth.encode())
        if not hmac.compare_digest(base64.b64decode(text[2:]), expected):
            raise ScramError("the server's SCRAM signature is wrong")
