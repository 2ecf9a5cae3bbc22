"""Hand-made TLS records for hostile-client tests: TLS 1.3 KeyUpdate floods and TLS 1.2
renegotiation attempts, which no Python TLS API sends.

How: an ordinary `ssl.SSLObject` client over MemoryBIOs does the handshake (so the server sees a
genuine client), with `keylog_filename` on a context of its own, which gives this one
connection's secrets (the NSS key log format). From then on the client's direction is written
here, record by record, with `cryptography`'s AEADs: RFC 8446 §5.2 and §7 for TLS 1.3 (the key
schedule from CLIENT_TRAFFIC_SECRET_0, "traffic upd" after each KeyUpdate we send), RFC 5246
§6.3 and RFC 5288 for TLS 1.2 AES-GCM (the key block from the master secret and both randoms).
The `SSLObject` must not write again after the hand-over: its sequence numbers are ours now.

Why not ctypes on libssl's SSL_key_update (the stdlib has no KeyUpdate or renegotiation call;
pyOpenSSL has renegotiate() but no key update): it needs the `SSL*` inside CPython's `_ssl`
object, whose layout is private, and the very libssl the interpreter loaded, and each KeyUpdate
then costs a ctypes round trip. Records made here depend only on the RFCs and `cryptography`,
can be made ahead in any number and sent in one write, and a mistake in them shows as the
server's bad_record_mac alert, never as a silent pass.
"""

from __future__ import annotations

import hmac
import os
import socket
import ssl
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

# TLS 1.3 inner content: KeyUpdate(update_requested), RFC 8446 §4.6.3
KEY_UPDATE_REQUESTED = b"\x18\x00\x00\x01\x01"
# A TLS 1.2 ClientHello header: all a server looks at before it refuses (or starts) a
# renegotiation; the body does not matter to a server that refuses (OpenSSL's rec_layer_s3.c)
CLIENT_HELLO_HEADER = b"\x01\x00\x00\x00"

_SUITES = {  # TLS 1.3 suite -> (hash, key length, AEAD)
    "TLS_AES_128_GCM_SHA256": (hashes.SHA256(), 16, AESGCM),
    "TLS_AES_256_GCM_SHA384": (hashes.SHA384(), 32, AESGCM),
    "TLS_CHACHA20_POLY1305_SHA256": (hashes.SHA256(), 32, ChaCha20Poly1305),
}


def _expand_label(algorithm: hashes.HashAlgorithm, secret: bytes, label: str,
                  length: int) -> bytes:
    full = b"tls13 " + label.encode()
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(algorithm, length, info).derive(secret)


def _keylog(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[0]] = bytes.fromhex(parts[2])
    return out


@dataclass
class Tls13Writer:
    """The client's sending direction of a TLS 1.3 connection after the handshake."""

    suite: str
    secret: bytes
    seq: int = 0
    _key: bytes = field(init=False, repr=False)
    _iv: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._derive()

    def _derive(self) -> None:
        algorithm, key_len, _ = _SUITES[self.suite]
        self._key = _expand_label(algorithm, self.secret, "key", key_len)
        self._iv = _expand_label(algorithm, self.secret, "iv", 12)

    def record(self, content: bytes, content_type: int) -> bytes:
        _, _, aead = _SUITES[self.suite]
        inner = content + bytes([content_type])
        header = struct.pack("!BHH", 23, 0x0303, len(inner) + 16)
        nonce = bytes(a ^ b for a, b in zip(self._iv, self.seq.to_bytes(12, "big"),
                                            strict=True))
        self.seq += 1
        return header + aead(self._key).encrypt(nonce, inner, header)

    def application_data(self, data: bytes) -> bytes:
        return self.record(data, 23)

    def key_update(self) -> bytes:
        """A KeyUpdate(update_requested) record; our sending key moves on after it."""
        out = self.record(KEY_UPDATE_REQUESTED, 22)
        algorithm = _SUITES[self.suite][0]
        self.secret = _expand_label(algorithm, self.secret, "traffic upd",
                                    algorithm.digest_size)
        self.seq = 0
        self._derive()
        return out


def _p_hash(algorithm: str, secret: bytes, seed: bytes, length: int) -> bytes:
    out, a = b"", seed
    while len(out) < length:
        a = hmac.new(secret, a, algorithm).digest()
        out += hmac.new(secret, a + seed, algorithm).digest()
    return out[:length]


@dataclass
class Tls12Writer:
    """The client's sending direction of a TLS 1.2 AES-GCM connection after the handshake."""

    key: bytes
    salt: bytes
    seq: int = 1  # the client's Finished was record 0 under these keys

    def record(self, content: bytes, content_type: int) -> bytes:
        explicit = self.seq.to_bytes(8, "big")
        aad = explicit + struct.pack("!BHH", content_type, 0x0303, len(content))
        self.seq += 1
        body = explicit + AESGCM(self.key).encrypt(self.salt + explicit, content, aad)
        return struct.pack("!BHH", content_type, 0x0303, len(body)) + body

    def application_data(self, data: bytes) -> bytes:
        return self.record(data, 23)

    def renegotiation(self) -> bytes:
        """A handshake record that starts a ClientHello: a renegotiation attempt."""
        return self.record(CLIENT_HELLO_HEADER, 22)


class HandmadeClient:
    """A TLS client whose handshake is OpenSSL's (an SSLObject on MemoryBIOs) and whose records
    after it are made here. Drive it with `feed()`/`outgoing()` (memory) or `connect()`
    (a socket that already got its `S`)."""

    def __init__(self, *, tls12: bool = False) -> None:
        self._dir = tempfile.mkdtemp(prefix="tls-records-")
        self._keylog = Path(self._dir) / "keys.log"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.keylog_filename = str(self._keylog)  # a context per connection: one set of keys
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("ECDHE+AESGCM")
        self.tls12 = tls12
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.sslobj = ctx.wrap_bio(self._in, self._out, server_hostname="localhost")
        self._server_flight = bytearray()  # for the ServerHello's random (TLS 1.2)

    def feed(self, data: bytes) -> None:
        if self.tls12 and len(self._server_flight) < 1 << 16:
            self._server_flight += data
        self._in.write(data)

    def outgoing(self) -> bytes:
        return self._out.read()

    def handshake_step(self) -> bool:
        """True once the handshake is done."""
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def connect(self, sock: socket.socket) -> None:
        """The handshake over a blocking socket."""
        while not self.handshake_step():
            sock.sendall(self.outgoing())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed during the handshake")
            self.feed(data)
        sock.sendall(self.outgoing())

    def read(self, sock: socket.socket | None = None) -> bytes:
        """Application data the server sent (through the SSLObject, which still reads)."""
        while True:
            try:
                return self.sslobj.read(1 << 20)
            except ssl.SSLWantReadError:
                if sock is None:
                    return b""
                data = sock.recv(65536)
                if not data:
                    return b""
                self.feed(data)

    def writer(self, records_sent: int = 0) -> Tls13Writer | Tls12Writer:
        """Take over the sending direction: `records_sent` application records went through
        the SSLObject since the handshake."""
        keys = _keylog(self._keylog)
        if not self.tls12:
            suite = self.sslobj.cipher()
            assert suite is not None and self.sslobj.version() == "TLSv1.3", suite
            return Tls13Writer(suite[0], keys["CLIENT_TRAFFIC_SECRET_0"], seq=records_sent)
        suite = self.sslobj.cipher()
        assert suite is not None and self.sslobj.version() == "TLSv1.2", suite
        digest = "sha384" if suite[0].endswith("SHA384") else "sha256"
        key_len = 32 if "AES256" in suite[0] else 16
        master = keys["CLIENT_RANDOM"]
        client_random, server_random = self._randoms()
        block = _p_hash(digest, master, b"key expansion" + server_random + client_random,
                        2 * key_len + 8)
        return Tls12Writer(block[:key_len], block[2 * key_len:2 * key_len + 4],
                           seq=1 + records_sent)

    def _randoms(self) -> tuple[bytes, bytes]:
        line = next(raw for raw in self._keylog.read_text().splitlines()
                    if raw.startswith("CLIENT_RANDOM "))
        client_random = bytes.fromhex(line.split()[1])
        flight = bytes(self._server_flight)
        # first record: handshake (22); first message: ServerHello (2); random after
        # type(1) length(3) version(2)
        assert flight[0] == 22 and flight[5] == 2, flight[:10]
        return client_random, flight[11:43]

    def close(self) -> None:
        for path in Path(self._dir).iterdir():
            path.unlink()
        os.rmdir(self._dir)


def ssl_request(sock: socket.socket) -> None:
    sock.sendall(struct.pack("!ii", 8, 80877103))
    if sock.recv(1) != b"S":
        raise AssertionError("the proxy did not answer S")


class HandmadeServer:
    """The server side of HandmadeClient: OpenSSL's handshake (an SSLObject on MemoryBIOs
    over a blocking socket), then `writer()` makes the server's records, for hostile-backend
    tests (KeyUpdate and HelloRequest floods toward the proxy's backend hop)."""

    def __init__(self, cert: Path, key: Path, *, tls12: bool = False,
                 alpn: list[str] | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="tls-records-")
        self._keylog = Path(self._dir) / "keys.log"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.keylog_filename = str(self._keylog)
        ctx.num_tickets = 0  # no NewSessionTicket: the records after the handshake are ours
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("ECDHE+AESGCM")
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        self.tls12 = tls12
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.sslobj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._own_flight = bytearray()  # the ServerHello's random (TLS 1.2)

    def accept(self, sock: socket.socket) -> None:
        """The handshake over a blocking socket that already sent its `S` (or, direct TLS,
        nothing)."""
        while True:
            try:
                self.sslobj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = self._out.read()
            if len(self._own_flight) < 1 << 16:
                self._own_flight += out
            if out:
                sock.sendall(out)
            if done:
                return
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("client closed during the handshake")
            self._in.write(data)

    def read(self, sock: socket.socket) -> bytes:
        while True:
            try:
                return self.sslobj.read(1 << 20)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    return b""
                self._in.write(data)

    def feed(self, data: bytes) -> None:
        self._in.write(data)

    def write(self, data: bytes) -> bytes:
        """Records of `data` (through the SSLObject: only before `writer()`)."""
        self.sslobj.write(data)
        return self._out.read()

    def writer(self, records_sent: int = 0) -> Tls13Writer | Tls12Writer:
        """Take over the server's sending direction after `records_sent` application records
        went through the SSLObject."""
        keys = _keylog(self._keylog)
        suite = self.sslobj.cipher()
        assert suite is not None
        if not self.tls12:
            assert self.sslobj.version() == "TLSv1.3", suite
            return Tls13Writer(suite[0], keys["SERVER_TRAFFIC_SECRET_0"], seq=records_sent)
        assert self.sslobj.version() == "TLSv1.2", suite
        digest = "sha384" if suite[0].endswith("SHA384") else "sha256"
        key_len = 32 if "AES256" in suite[0] else 16
        line = next(raw for raw in self._keylog.read_text().splitlines()
                    if raw.startswith("CLIENT_RANDOM "))
        client_random = bytes.fromhex(line.split()[1])
        flight = bytes(self._own_flight)
        assert flight[0] == 22 and flight[5] == 2, flight[:10]
        server_random = flight[11:43]
        block = _p_hash(digest, keys["CLIENT_RANDOM"],
                        b"key expansion" + server_random + client_random, 2 * key_len + 8)
        # client key, server key, client IV, server IV (RFC 5246 6.3; no MAC keys for GCM)
        return Tls12Writer(block[key_len:2 * key_len], block[2 * key_len + 4:2 * key_len + 8],
                           seq=1 + records_sent)

    def close(self) -> None:
        for path in Path(self._dir).iterdir():
            path.unlink()
        os.rmdir(self._dir)


# TLS 1.2 HelloRequest, RFC 5246 7.4.1.1: a server asking the client to renegotiate
HELLO_REQUEST = b"\x00\x00\x00\x00"


def hello_request(writer: Tls12Writer) -> bytes:
    return writer.record(HELLO_REQUEST, 22)
