"""The openGauss / GaussDB(DWS) key-passphrase pair: `*.key.cipher` + `*.key.rand`.

Owns: reading the passphrase of an encrypted private key out of the pair `gs_guc encrypt`
writes (and GaussDB(DWS) client bundles carry), and writing such a pair (`dwsproxy certs
encrypt-key`), as openGauss lays them out: raw 56- and 24-byte structures, PBKDF2-HMAC-SHA256
(password = the 16 random bytes, 10,000 iterations) to an AES-128-CBC key, ISO/IEC 7816-4
padding done by hand, and PostgreSQL's legacy CRC-32 (reflected table, updated MSB-first, not
zlib's) over each file. There is no MAC: a wrong `.rand` shows as a bad CRC or bad padding.
Must not read files (the snapshot does) nor log what it decodes.
"""

from __future__ import annotations

import os
import struct

CIPHER_SIZE = 56
RAND_SIZE = 24
ITERATIONS = 10000


class PairError(ValueError):
    """The pair is malformed, or does not decode (wrong .rand, corrupt file)."""


def _table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _table()


def legacy_crc32(data: bytes) -> int:
    """PostgreSQL's old CRC-32 (pg_crc.h COMP_LEGACY_CRC32): the reflected polynomial's table,
    but each byte folded in from the top of the register."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[((crc >> 24) ^ byte) & 0xFF] ^ ((crc << 8) & 0xFFFFFFFF)
    return crc ^ 0xFFFFFFFF


def _derive(secret: bytes, salt: bytes) -> bytes:
    import hashlib

    return hashlib.pbkdf2_hmac("sha256", secret, salt, ITERATIONS, 16)


def _aes_cbc(key: bytes, iv: bytes, block: bytes, *, encrypt: bool) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    op = cipher.encryptor() if encrypt else cipher.decryptor()
    return op.update(block) + op.finalize()


def decode(cipher_file: bytes, rand_file: bytes, *, cipher_name: str = ".key.cipher",
           rand_name: str = ".key.rand") -> bytes:
    """The passphrase; PairError naming the file at fault (never the secret)."""
    if len(cipher_file) != CIPHER_SIZE:
        raise PairError(f"{cipher_name}: {len(cipher_file)} bytes, expected {CIPHER_SIZE}")
    if len(rand_file) != RAND_SIZE:
        raise PairError(f"{rand_name}: {len(rand_file)} bytes, expected {RAND_SIZE}")
    if struct.unpack_from("<I", cipher_file, 52)[0] != legacy_crc32(cipher_file[:52]):
        raise PairError(f"{cipher_name}: bad CRC (corrupt file)")
    if struct.unpack_from("<I", rand_file, 20)[0] != legacy_crc32(rand_file[:20]):
        raise PairError(f"{rand_name}: bad CRC (corrupt file)")
    key = _derive(rand_file[:16], cipher_file[17:33])
    plain = _aes_cbc(key, cipher_file[34:50], cipher_file[:16], encrypt=False)
    end = len(plain)
    while end and plain[end - 1] == 0:
        end -= 1
    if end and plain[end - 1] == 0x80:
        return plain[:end - 1]
    if end == 16 and all(32 <= b < 127 for b in plain):
        # gs_guc before 2024 took 16-character passphrases: a full block, no padding byte
        return plain
    raise PairError(f"{rand_name}: does not decrypt {cipher_name} (wrong .rand for this "
                    "cipher file?)")


def encode(passphrase: bytes, *, secret: bytes | None = None, salt: bytes | None = None,
           iv: bytes | None = None) -> tuple[bytes, bytes]:
    """(.key.cipher, .key.rand) for a passphrase of 1..15 bytes, as gs_guc encrypt writes them
    (the unused bytes are zero here)."""
    if not 1 <= len(passphrase) <= 15:
        raise PairError("the passphrase must be 1 to 15 bytes (one AES block with padding)")
    secret = secret if secret is not None else os.urandom(16)
    salt = salt if salt is not None else os.urandom(16)
    iv = iv if iv is not None else os.urandom(16)
    block = passphrase + b"\x80" + b"\x00" * (15 - len(passphrase))
    ciphertext = _aes_cbc(_derive(secret, salt), iv, block, encrypt=True)
    body = ciphertext + b"\x00" + salt + b"\x00" + iv + b"\x00\x00"
    rand_body = secret + b"\x00" * 4
    return (body + struct.pack("<I", legacy_crc32(body)),
            rand_body + struct.pack("<I", legacy_crc32(rand_body)))
