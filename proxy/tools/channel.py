"""One socket of `dwsproxy probe` to a server: read strictly, within a deadline.

Owns: the socket and its optional TLS layer (an `ssl.SSLObject` on memory BIOs, so the server's
TLS 1.2 flight can be read), reads bounded by the try's deadline and the probe's `--timeout`,
the strict reading that tells a PostgreSQL answer from anything else (SSLRequest answers alone,
message types allowed at that point, sane lengths, NUL-terminated error fields), and `Evidence`:
what all the connections to one host showed.
Must not: decide what a cell is (pgclient does), or accept bytes a PostgreSQL server would not
send there: those raise `NotPostgres` with the bytes, for the probe's one-line verdict.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import NoReturn

from ..protocol import wire

# libpq: ErrorResponse bodies up to 30000 bytes, authentication requests up to 2000; a length
# beyond what any server sends at start-up is read as "not PostgreSQL", not as a refusal.
MAX_STARTUP_MESSAGE = 1 << 16
_TLS_RECORD_TYPES = range(20, 25)  # change_cipher_spec .. heartbeat (RFC 8446 5.1)


class NotPostgres(Exception):
    """The server answered with bytes no PostgreSQL server sends there."""

    def __init__(self, answer: bytes) -> None:
        super().__init__(answer)
        self.answer = answer


class Silent(Exception):
    """Nothing arrived before the deadline."""


class Closed(ConnectionError):
    pass


class Unreachable(Exception):
    """Not even a TCP connection."""


@dataclass
class Evidence:
    """What the server's answers showed, across every connection to one host (thread-safe)."""

    postgres: bool = False  # a well-formed PostgreSQL message arrived
    foreign: bytes | None = None  # the first answer that was not PostgreSQL
    silent: bool = False  # a try met its connect timeout before any answer
    out_of_time: bool = False  # the probe's own --timeout cut a try short
    ssl_answers: set[str] = field(default_factory=set)
    tls_versions: set[str] = field(default_factory=set)  # negotiated by a cell
    peer_der: bytes | None = None
    chain_verified: bool | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def saw_foreign(self, answer: bytes) -> None:
        with self.lock:
            if self.foreign is None:
                self.foreign = answer


def expired(evidence: Evidence, overall: float) -> NoReturn:
    """A try met its deadline: the probe's own (--timeout) or the host's connect_timeout."""
    with evidence.lock:
        if time.monotonic() >= overall:
            evidence.out_of_time = True
        else:
            evidence.silent = True
    raise Silent("timeout expired")


class Channel:
    """A socket, optionally upgraded to TLS with an `ssl.SSLObject` (memory BIOs, so that the
    server's TLS 1.2 handshake records can be read: they say whether a CertificateRequest
    came). Every read waits at most until `deadline` (time.monotonic())."""

    def __init__(self, sock: socket.socket, deadline: float, overall: float,
                 evidence: Evidence) -> None:
        self.sock = sock
        self.deadline = min(deadline, overall)
        self.overall = overall
        self.evidence = evidence
        self.tls: ssl.SSLObject | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.handshake_bytes = bytearray()
        self.buffer = bytearray()

    def _recv(self) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self._expired()
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            self._expired()
        if not data:
            raise Closed("server closed the connection unexpectedly")
        return data

    def _expired(self) -> NoReturn:
        expired(self.evidence, self.overall)

    def ssl_answer(self, code: int = wire.SSL_REQUEST_CODE) -> str:
        """'S' or 'N' (alone: CVE-2021-23222, nothing may follow before the handshake), or an
        ErrorResponse (a server that cannot fork); anything else is not PostgreSQL."""
        self.send(wire.build_request(code))
        data = self._recv()
        if data[:1] in (b"S", b"N") and len(data) == 1:
            answer = data.decode()
            with self.evidence.lock:
                self.evidence.ssl_answers.add(answer)
            return answer
        if data[:1] == b"E":
            self.buffer += data
            return "E"
        raise NotPostgres(data)

    def start_tls(self, ctx: ssl.SSLContext, server_hostname: str | None) -> None:
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self._recv()
                if not self.handshake_bytes and data[0] not in _TLS_RECORD_TYPES:
                    raise NotPostgres(data) from None
                self.handshake_bytes += data
                self._in.write(data)
        self._flush()

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(data)
            return
        self.tls.write(data)
        self._flush()

    def _fill(self) -> None:
        if self.tls is None:
            self.buffer += self._recv()
            return
        while True:
            try:
                self.buffer += self.tls.read(65536)
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._in.write(self._recv())

    def _exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def message(self, allowed: frozenset[int]) -> tuple[bytes, bytes]:
        """One message of a type PostgreSQL may send here, well formed, or NotPostgres."""
        while len(self.buffer) < 5:
            try:
                self._fill()
            except Closed:
                if self.buffer:
                    raise NotPostgres(bytes(self.buffer)) from None
                raise
        head = bytes(self.buffer[:5])
        (length,) = struct.unpack("!i", head[1:])
        if head[0] not in allowed or not 4 <= length <= MAX_STARTUP_MESSAGE or (
                head[:1] == b"R" and length < 8):
            raise NotPostgres(bytes(self.buffer[:81]))
        del self.buffer[:5]
        body = self._exact(length - 4)
        if head[:1] in (b"E", b"N") and not body.endswith(b"\0"):
            raise NotPostgres(head + body[:76])
        with self.evidence.lock:
            self.evidence.postgres = True
        return head[:1], body

    def close(self) -> None:
        self.sock.close()


def error_text(body: bytes) -> str:
    fields = wire.parse_error_response(b"E" + struct.pack("!i", len(body) + 4) + body)
    return f"{fields.get('S', 'FATAL')}:  {fields.get('M', '')}"


def ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None):
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__
