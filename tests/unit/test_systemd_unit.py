"""config/dwsproxy.service: what it promises (Type=notify, reload by SIGHUP, no privileges) and
that systemd itself accepts it. tests/integration/test_systemd.py plays its notify socket."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import cli

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "config" / "dwsproxy.service"


def directives() -> dict[str, list[str]]:
    """(section.key) -> every value given, in order (systemd allows repeats)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def one(key: str) -> str:
    values = directives()[key]
    assert len(values) == 1, key
    return values[0]


def test_readiness_reload_and_stop() -> None:
    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert one("Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    # The main process stops its workers; systemd must not signal them all at once.
    assert one("Service.KillMode") == "mixed"
    # Longer than the default listen.shutdown_grace (30 s) plus the TLS close wait (5 s).
    assert int(one("Service.TimeoutStopSec")) >= 30 + 5
    assert one("Service.RestartPreventExitStatus") == "2"  # config error: exit 2 (cli.py)
    assert one("Install.WantedBy") == "multi-user.target"


def test_hardening() -> None:
    d = directives()
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
        "AmbientCapabilities": "", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes", "SystemCallArchitectures": "native", "UMask": "0077",
    }.items():
        assert d.get(f"Service.{key}") == [value], key
    assert set(one("Service.RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET",
                                                                   "AF_INET6"}
    assert one("Service.User") != "root"


def test_command_lines_are_ones_dwsproxy_accepts() -> None:
    parser = cli.build_parser()
    start = shlex.split(one("Service.ExecStart"))
    assert start[0].endswith("/dwsproxy")
    args = parser.parse_args(start[1:])
    assert args.command is None and args.config
    # check-config exits 2 for an expired CRL, which the proxy itself only logs: as a
    # start-up gate it would keep the proxy down for every client after a reboot
    assert "Service.ExecStartPre" not in directives()


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a dwsproxy that exists on this machine."""
    here = shutil.which("dwsproxy") or str(Path(sys.executable).with_name("dwsproxy"))
    path = tmp_path / "dwsproxy.service"
    path.write_text(re.sub(r"/usr/local/bin/dwsproxy", here, UNIT.read_text()))
    return path


def test_systemd_accepts_the_unit_and_rates_it_hardened(unit_copy: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing (.ci/system-deps installs systemd)"
    verify = subprocess.run([analyze, "verify", unit_copy.name], cwd=unit_copy.parent,
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", "--no-pager",
                               unit_copy.name], cwd=unit_copy.parent, capture_output=True,
                              text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert score, security.stdout + security.stderr
    # systemd rates 0 (fully confined) to 10 (unprotected); below 2 is its "OK" band.
    assert float(score.group(1)) < 2.0, security.stdout
