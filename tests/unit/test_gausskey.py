"""The openGauss key-passphrase pair against the test vectors of the format note."""

import pytest

from proxy.tls import gausskey

R1, S1, I1 = bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48))
VECTORS = [
    (b"Gauss@123", R1, S1, I1,
     "57aac9636a54bf87319393f7e3fbdf82" "00" + S1.hex() + "00" + I1.hex() + "0000" "5bc7e75b",
     R1.hex() + "00000000" "55ce1a75"),
    (b"Abcdef@12345678", b"\x00" * 16, b"\x11" * 16, b"\x22" * 16,
     "a12c2d9676261c623a1976fed2de26f4" "00" + "11" * 16 + "00" + "22" * 16 + "0000" "6a330e29",
     "00" * 16 + "00000000" "a4bafa0b"),
]


@pytest.mark.parametrize("passphrase,secret,salt,iv,cipher_hex,rand_hex", VECTORS)
def test_vectors(passphrase: bytes, secret: bytes, salt: bytes, iv: bytes, cipher_hex: str,
                 rand_hex: str) -> None:
    cipher, rand = gausskey.encode(passphrase, secret=secret, salt=salt, iv=iv)
    assert cipher.hex() == cipher_hex and rand.hex() == rand_hex
    assert gausskey.decode(bytes.fromhex(cipher_hex), bytes.fromhex(rand_hex)) == passphrase


def test_derived_key_of_the_first_vector() -> None:
    assert gausskey._derive(R1, S1).hex() == "f12c2ef3d3c3297ac55f6552be2144e2"


def test_unused_bytes_are_not_required_to_be_zero() -> None:
    cipher, rand = gausskey.encode(b"Gauss@123")
    body = bytearray(cipher[:52])
    body[16] = body[33] = 0xAB  # gs_guc leaves stack garbage there; the CRC covers it
    fixed = bytes(body) + gausskey.legacy_crc32(bytes(body)).to_bytes(4, "little")
    assert gausskey.decode(fixed, rand) == b"Gauss@123"


def test_wrong_rand_and_corruption_name_the_file() -> None:
    # fixed values: a random wrong .rand decrypts to valid-looking padding ~1 time in 256
    cipher, rand = gausskey.encode(b"Gauss@123", secret=R1, salt=S1, iv=I1)
    _, other = gausskey.encode(b"Gauss@123", secret=b"\x01" * 16, salt=S1, iv=I1)
    with pytest.raises(gausskey.PairError, match=r"server\.key\.rand: does not decrypt"):
        gausskey.decode(cipher, other, cipher_name="server.key.cipher",
                        rand_name="server.key.rand")
    with pytest.raises(gausskey.PairError, match="c: bad CRC"):
        gausskey.decode(bytes([cipher[0] ^ 1]) + cipher[1:], rand, cipher_name="c")
    with pytest.raises(gausskey.PairError, match="expected 24"):
        gausskey.decode(cipher, rand[:-1])


def test_zlib_crc_is_not_the_legacy_one() -> None:
    import zlib

    assert gausskey.legacy_crc32(b"123456789") != zlib.crc32(b"123456789")
