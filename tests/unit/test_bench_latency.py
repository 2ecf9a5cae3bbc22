"""The latency figures of benchmarks/run: pgbench's per-transaction log read right."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "benchmarks" /
                                                  "harness.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_harness"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_latencies_come_from_every_thread_file_in_ms(harness, tmp_path: Path) -> None:
    # pgbench --log writes prefix.PID and, per extra thread, prefix.PID.N
    (tmp_path / "lat.123").write_text("0 0 150 0 1700000000 1\n0 1 250 0 1700000000 2\n")
    (tmp_path / "lat.123.1").write_text("1 0 1000 0 1700000000 3\n")
    (tmp_path / "other.123").write_text("0 0 99999 0 1700000000 1\n")
    assert sorted(harness.read_latency_logs(tmp_path, "lat")) == [0.15, 0.25, 1.0]


def test_p99_is_the_nearest_rank(harness) -> None:
    values = [float(v) for v in range(1, 101)]  # 1 .. 100
    assert harness.percentile(values, 99) == 99.0
    assert harness.percentile(values, 100) == 100.0
    assert harness.percentile([5.0], 99) == 5.0
    assert harness.percentile(list(reversed(values)), 50) == 50.0
    assert harness.percentile([], 99) is None
