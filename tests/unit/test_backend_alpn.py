"""backend._alpn_refusal: what a direct-TLS server's ALPN answer is refused for (libpq 17)."""

from __future__ import annotations

from proxy.runtime.backend import _alpn_refusal


def test_postgresql_is_accepted() -> None:
    assert _alpn_refusal("postgresql") == ""


def test_no_alpn_is_refused() -> None:
    assert "without ALPN" in _alpn_refusal(None)


def test_another_protocol_is_refused_and_named_safely() -> None:
    assert "unexpected ALPN protocol 'http/1.1'" in _alpn_refusal("http/1.1")
    hostile = _alpn_refusal("\x1b[2Jpostgresql\n" + "x" * 500)
    assert "\x1b" not in hostile and "\n" not in hostile and len(hostile) < 200
