"""schema.warnings and their place at load (issue 21 item 9): backend.sslmode = "prefer" toward a
host that is not loopback is allowed (libpq's meaning) but warned about, at load and by
check-config; toward loopback it is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import schema

ROOT = Path(__file__).resolve().parents[2]


def _cfg(host: str, sslmode: str = "prefer") -> schema.Config:
    return schema.parse(f'[tls]\nssl = false\n[backend]\nhost = "{host}"\nsslmode = "{sslmode}"\n',
                        "/nonexistent/x.toml")


@pytest.mark.parametrize("host", ["db.example.com", "10.1.2.3", "2001:db8::1", "h1,h2"])
def test_prefer_toward_a_host_that_is_not_loopback_is_warned(host: str) -> None:
    (text,) = schema.warnings(_cfg(host))
    assert "backend.sslmode = \"prefer\"" in text and repr(host) in text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "::1", "localhost"])
def test_prefer_toward_loopback_is_not(host: str) -> None:
    assert schema.warnings(_cfg(host)) == []


def test_require_is_not_warned() -> None:
    assert schema.warnings(_cfg("db.example.com", "require")) == []


def test_check_config_prints_the_warning(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[tls]\nssl = false\n[backend]\nhost = "10.1.2.3"\nsslmode = "prefer"\n')
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "anyone on the path can answer the SSLRequest with N" in out.stderr
