"""`promtool test rules`: a cron `dwsproxy probe --expect ...` every 5 minutes against a healthy
proxy serving 28 sessions a minute must not fire DwsproxyHighRejectionRate. The same case with
the 77 rejections one probe used to cause does fire: the case can fail.

tests/integration/test_probe.py counts the rejections one --expect probe really causes on a
real proxy and runs this case with that count."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "config" / "prometheus-alerts.yaml"
# What tests/integration/test_probe.py allows one probe with all four --expect keys to cause
# (it measured 4: ssl_required for `disable` and for `allow`'s first try, tls_version for the
# TLS 1.0 and 1.1 tries).
PROBE_EXPECT_REJECTIONS = 4
SESSIONS_PER_MINUTE = 28
PROBE_EVERY_MINUTES = 5
HOURS = 3


def promtool_case(rejections_per_probe: int, folder: Path) -> Path:
    """One proxy, 28 accepted sessions a minute, and a probe every 5 minutes adding
    `rejections_per_probe` rejections (its accepted sessions are left out, which only makes
    the ratio worse); the alert is expected silent at every minute after the first 10."""
    minutes = HOURS * 60
    accepted = " ".join(str(SESSIONS_PER_MINUTE * i) for i in range(minutes + 1))
    rejected = " ".join(str(rejections_per_probe * (i // PROBE_EVERY_MINUTES + 1))
                        for i in range(minutes + 1))
    case = {
        "rule_files": [os.fspath(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'dwsproxy_connections_total{job="dwsproxy",instance="p:9187",'
                           'encryption="tls",tls_version="TLSv1.3",client_cert="none",'
                           'backend_encryption="plain"}',
                 "values": accepted},
                {"series": 'dwsproxy_connections_rejected_total{job="dwsproxy",'
                           'instance="p:9187",reason="ssl_required"}',
                 "values": rejected},
            ],
            "alert_rule_test": [{"eval_time": f"{m}m", "alertname": "DwsproxyHighRejectionRate",
                                 "exp_alerts": []} for m in range(10, minutes + 1)],
        }],
    }
    path = folder / f"probe-every-5m-{rejections_per_probe}.yaml"
    path.write_text(yaml.safe_dump(case, sort_keys=False))
    return path


def run_promtool(case: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: .ci/system-deps installs prometheus"
    return subprocess.run([promtool, "test", "rules", os.fspath(case)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_an_expect_probe_every_5_minutes_does_not_fire(tmp_path: Path) -> None:
    result = run_promtool(promtool_case(PROBE_EXPECT_REJECTIONS, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_old_77_rejections_per_probe_do_fire(tmp_path: Path) -> None:
    result = run_promtool(promtool_case(77, tmp_path))
    assert result.returncode != 0
    assert "DwsproxyHighRejectionRate" in result.stdout + result.stderr
