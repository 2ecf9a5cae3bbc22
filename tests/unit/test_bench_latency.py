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


def test_progress_counts_each_interval_by_its_own_length(harness) -> None:
    # pgbench 15 -P 1 at 256 clients: the clients take 1.3 s to connect, the first line covers
    # [0, 1.3] and the next, still due at 2.0 s, only [1.3, 2.0]
    progress = harness.Progress()
    assert not progress.feed("starting vacuum...end.\n")
    lines = ["progress: 1.3 s, 0.0 tps, lat 0.000 ms stddev 0.000, 0 failed\n",
             "progress: 2.0 s, 6400.0 tps, lat 39.712 ms stddev 5.100, 0 failed\n",
             "progress: 3.0 s, 6500.0 tps, lat 39.001 ms stddev 5.000, 0 failed\n"]
    assert [progress.feed(line) for line in lines] == [True, True, True]
    assert progress.seconds == 3.0
    assert progress.transactions == pytest.approx(6400.0 * 0.7 + 6500.0)


def test_pgbench_summary_fields(harness) -> None:
    out = ("number of transactions actually processed: 38400\n"
           "initial connection time = 1315.402 ms\n"
           "tps = 6400.000000 (without initial connection time)\n")
    assert harness.transactions(out) == 38400
    assert harness.initial_connection_ms(out) == 1315.402
    assert harness.transactions("") == 0 and harness.initial_connection_ms("") is None
