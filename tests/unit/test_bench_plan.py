"""Which targets benchmarks/run measures in which test, and against which PgBouncer: the
sidecar (Unix-socket backend) and backend-TLS rows each have a like-for-like peer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    # bench.py imports its sibling as `harness`, as `benchmarks/run` starts it from there
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_main", ROOT / "benchmarks" /
                                                      "bench.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_main"] = mod
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_each_pair_runs_the_same_tests(bench) -> None:  # type: ignore[no-untyped-def]
    for ours, theirs in ((bench.UNIX, bench.PGB_UNIX), (bench.BACKEND_TLS, bench.PGB_BTLS)):
        assert bench.peer(ours) == theirs
        assert [t for t in bench.TESTS if bench.runs(ours, t)] == \
            [t for t in bench.TESTS if bench.runs(theirs, t)]
    assert bench.peer("dwsproxy-w1") == bench.peer("baseline") == "pgbouncer"


def test_the_issues_tests_are_in_each_pair(bench) -> None:  # type: ignore[no-untyped-def]
    for test in ("select_8", "select_32", "select_256", "latency_1", "connect_8"):
        assert bench.runs(bench.UNIX, test)
    for test in ("select_8", "select_32", "connect_8", "copy_out"):
        assert bench.runs(bench.BACKEND_TLS, test)
    # the idle-session test has twins only for the targets that run everything
    for name in (bench.UNIX, bench.PGB_UNIX, bench.BACKEND_TLS, bench.PGB_BTLS,
                 bench.PGB_ONCE):
        assert not bench.runs(name, "idle_1000_rss")
    assert all(bench.runs("dwsproxy-w1", t) and bench.runs("direct", t) for t in bench.TESTS)


def test_unix_ab_divides_unix_by_tcp_within_the_run(bench, tmp_path) -> None:  # type: ignore[no-untyped-def]
    b = bench.Bench.__new__(bench.Bench)
    b.args = SimpleNamespace(unix=True, workers=["1"], tests=["select_8", "copy_out"])
    row = {"dwsproxy-w1": (20.0, 30000.0), bench.UNIX: (15.0, 36000.0),
           "pgbouncer": (16.0, 25000.0), bench.PGB_UNIX: (12.0, 27500.0)}
    b.details = {"select_8": {name: [{"value": tps, "proxy_cpu_us_per_txn": cpu}]
                              for name, (cpu, tps) in row.items()}, "copy_out": {}}
    ab = b.unix_ab()
    assert list(ab) == ["select_8"]  # COPY is not a sidecar-pair test
    got = ab["select_8"]
    assert got["dws_cpu_tcp"] == 20.0 and got["dws_cpu_unix"] == 15.0
    assert got["dws_cpu_ratio"] == pytest.approx(0.75)
    assert got["dws_tps_ratio"] == pytest.approx(1.2)
    assert got["pgb_cpu_ratio"] == pytest.approx(0.75)
    assert got["pgb_tps_ratio"] == pytest.approx(1.1)


def test_admin_section_only_for_a_tree_that_has_it(bench, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # this tree has [admin] (default port 9188: each instance needs a port of its own); a
    # --baseline-src tree from before it would refuse the section
    assert bench.h.knows_admin(ROOT)
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "config.py").write_text("class MetricsConfig:\n    port = 9187\n")
    assert not bench.h.knows_admin(tmp_path)
