"""dwsproxy against PgBouncer and direct TLS to PostgreSQL: run by `benchmarks/run`.

Starts (all on 127.0.0.1) a throwaway PostgreSQL with `ssl = on`, a PgBouncer (session pooling,
client TLS required) and dwsproxy (require_ssl) with `workers = 1` (the headline: the default)
and with `workers = "auto"`,
then measures, alternating the targets A B C D A B C D … within each test and repeating every
test `--reps` times:

  select_8 / _32 / _256  pgbench -S TPS, 8, 32 and 256 clients (-j 2)
  connect_8              pgbench -S -C TPS (a new TLS connection per transaction), 8 clients;
                         also PgBouncer with server_lifetime = 0 (`pgbouncer-once`: a server
                         connection opened for each client, as dwsproxy does, not one from
                         the pool), for the cost of a connection like for like
  latency_1              pgbench -S, 1 client: average and p99 latency (ms) per transaction
                         from pgbench's per-transaction log
  copy_out               psql COPY (SELECT repeat('x', 1000) FROM generate_series(…)) TO STDOUT
                         (~500 MB) to /dev/null, MB/s (1 MB = 10^6 bytes)
  idle_1000_rss          VmRSS summed over the proxy's processes while 1000 TLS sessions (each
                         authenticated, each on its own PostgreSQL backend) are held idle

Medians, ratios and the project's targets go to stdout and to benchmarks/results/latest.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness as h

TESTS = {
    "select_8": ("pgbench -S, 8 clients", "TPS", True),
    "select_32": ("pgbench -S, 32 clients", "TPS", True),
    "select_256": ("pgbench -S, 256 clients", "TPS", True),
    "latency_1": ("pgbench -S, 1 client, average latency", "ms", False),
    "connect_8": ("pgbench -S -C (new TLS connection per txn), 8 clients", "TPS", True),
    "copy_out": ("COPY ~500 MB TO STDOUT via psql", "MB/s", True),
    "idle_1000_rss": ("proxy RSS, 1000 idle TLS sessions (all processes)", "MB", False),
}


# pgbench tests: clients, threads, extra options
PGBENCH = {
    "select_8": (8, 2, ()),
    "select_32": (32, 2, ()),
    "select_256": (256, 2, ()),
    "connect_8": (8, 2, ("-C",)),
    "latency_1": (1, 1, ()),
}
BACKEND_TLS = "dwsproxy-btls"  # the headline's workers, TLS (verify-full) to the backend too
PGB_BTLS = "pgbouncer-btls"  # its peer: PgBouncer with server_tls_sslmode = verify-full
UNIX = "dwsproxy-unix"  # the sidecar: client TLS over TCP, the backend over the Unix socket
PGB_UNIX = "pgbouncer-unix"  # its peer: PgBouncer's server connections over the Unix socket
PGB_ONCE = "pgbouncer-once"
# The backend-TLS pair runs only where the second hop shows: throughput, the connect rate
# (a backend handshake per session) and COPY; the rest would only lengthen the run.
BACKEND_TLS_TESTS = ("select_8", "select_32", "connect_8", "copy_out")
# The sidecar pair: throughput, the latency a proxy adds and the connect rate, where the
# backend hop's system calls show; COPY and idle memory do not depend on the hop's kind.
UNIX_TESTS = ("select_8", "select_32", "select_256", "latency_1", "connect_8")
# PgBouncer without server reuse runs only there: the other tests keep their sessions open.
PGB_ONCE_TESTS = ("connect_8",)
# Targets that run a subset of the tests; every other target runs them all.
TESTS_OF = {BACKEND_TLS: BACKEND_TLS_TESTS, PGB_BTLS: BACKEND_TLS_TESTS, UNIX: UNIX_TESTS,
            PGB_UNIX: UNIX_TESTS, PGB_ONCE: PGB_ONCE_TESTS}
# Each dwsproxy target is compared with the PgBouncer that reaches PostgreSQL the same way.
PEER = {BACKEND_TLS: PGB_BTLS, UNIX: PGB_UNIX}


def runs(target: str, test: str) -> bool:
    """Whether `target` takes part in `test`."""
    return test in TESTS_OF.get(target, TESTS)


def peer(target: str) -> str:
    """The PgBouncer a dwsproxy target is measured against, like for like."""
    return PEER.get(target, "pgbouncer")
# The same code measured twice on the shared development machine differs by up to this much.
NOISE = 0.05


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # 6 s runs keep the full run (22 pgbench runs a round, 3 rounds) under 12 minutes
    p.add_argument("--duration", type=int, default=6,
                   help="seconds per pgbench run (-T), default 6")
    p.add_argument("--reps", type=int, default=3, help="rounds of every test, default 3")
    p.add_argument("--copy-rows", type=int, default=500_000,
                   help="rows of 1000 bytes (+newline) per COPY, default 500000 (~500 MB)")
    p.add_argument("--copies-per-round", type=int, default=2,
                   help="COPY runs per target per round (all are samples), default 2")
    p.add_argument("--idle", type=int, default=1000, help="idle TLS sessions, default 1000")
    p.add_argument("--workers", default="1,auto",
                   help="dwsproxy `workers` settings to compare; the first is the headline "
                        "(default 1,auto: 1 is the default of `workers` and the one the README "
                        "recommends on 2 cores)")
    p.add_argument("--tests", default=",".join(TESTS),
                   help=f"comma-separated subset of {', '.join(TESTS)}")
    p.add_argument("--out", default=str(h.REPO / "benchmarks" / "results"),
                   help="folder for latest.json / latest.md")
    p.add_argument("--tag", default="latest", help="base name of the result files")
    p.add_argument("--proxy-src", default="",
                   help="run dwsproxy from this source tree (a folder holding proxy/) instead "
                        "of the repo's; to measure a candidate change on a scratch copy")
    p.add_argument("--baseline-src", default="",
                   help="also run a `baseline` dwsproxy (workers = the headline's) from this "
                        "source tree, e.g. a `git worktree` of the previous commit: an A/B "
                        "of a change within one run")
    p.add_argument("--baseline-backend-tls", action="store_true",
                   help="the `baseline` dwsproxy speaks TLS (verify-full) to PostgreSQL, as "
                        "dwsproxy-btls does: an A/B of the second hop")
    p.add_argument("--order", choices=("rotate", "fixed"), default="rotate",
                   help="rotate the targets' order every round (default), or keep it fixed")
    p.add_argument("--baseline-python", default="",
                   help="run the `baseline` dwsproxy with this interpreter (with --baseline-src "
                        "or alone: then the baseline is this tree under that interpreter)")
    p.add_argument("--proxy-python", default="",
                   help="run dwsproxy with this interpreter (it needs uvloop, cryptography and "
                        "prometheus-client) instead of the venv's; to compare interpreters")
    p.add_argument("--backend-tls", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also run `{BACKEND_TLS}`: the headline's workers setting with TLS "
                        f"(verify-full) to PostgreSQL as well, and its peer `{PGB_BTLS}` "
                        "(default on)")
    p.add_argument("--unix", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also run `{UNIX}` and `{PGB_UNIX}`: client TLS over TCP, the backend "
                        "over PostgreSQL's Unix socket (the sidecar layout; default on)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: -T 2, 1 round, 20000-row COPY, 100 idle sessions; "
                        "results are written as quick.{json,md}")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.reps, args.copy_rows, args.copies_per_round = 2, 1, 20_000, 1
        args.idle = 100
        if args.tag == "latest":
            args.tag = "quick"
    args.tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    unknown = [t for t in args.tests if t not in TESTS]
    if unknown:
        p.error(f"unknown tests: {unknown}")
    args.workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    for w in args.workers:
        if w != "auto" and not w.isdigit():
            p.error(f"--workers: {w!r} is neither auto nor a number")
    return args


def dws_name(workers: str) -> str:
    return "dwsproxy-auto" if workers == "auto" else f"dwsproxy-w{workers}"


def idle_twin(name: str) -> str:
    return f"{name}-idle"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "ratio":
        return f"{value:.2f}×"
    if unit == "ms":
        return f"{value:.3f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = h.Stack(proxy_src=Path(args.proxy_src).resolve() if args.proxy_src
                             else None, proxy_python=args.proxy_python)
        self.samples: dict[str, dict[str, list[float]]] = {t: {} for t in args.tests}
        self.details: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in args.tests}
        self.tls: dict[str, str] = {}
        self.order: list[str] = []
        self.after_load: dict[str, dict[str, float | int]] = {}
        self.resumption: dict[str, bool] = {}
        self.logs = Path(tempfile.mkdtemp(prefix="dwsproxy-bench-logs-"))

    def dws_names(self) -> list[str]:
        names = [dws_name(w) for w in self.args.workers]
        names += [UNIX] if self.args.unix else []
        names += [BACKEND_TLS] if self.args.backend_tls else []
        return names + (["baseline"] if self.has_baseline() else [])

    def has_baseline(self) -> bool:
        return bool(self.args.baseline_src or self.args.baseline_python)

    def baseline_src(self) -> Path | None:
        return Path(self.args.baseline_src).resolve() if self.args.baseline_src else None

    # -- set-up --
    def setup(self) -> None:
        st = self.stack
        direct = st.start_postgres()
        h.log(f"PostgreSQL (ssl = on) on {h.HOST}:{direct.port}, max_connections = "
              f"{h.PG_MAX_CONNECTIONS}")
        h.pgbench_init(direct.port, 10)
        h.log("pgbench -i -s 10 done (directly, over TLS)")
        pgb = st.start_pgbouncer()
        h.log(f"PgBouncer on {h.HOST}:{pgb.port} (pid {pgb.proc.pid}, user postgres)")
        self.order = ["direct", "pgbouncer"]
        if any(t in self.args.tests for t in PGB_ONCE_TESTS):
            once = st.start_pgbouncer(PGB_ONCE, once=True)
            self.order.append(once.name)
            h.log(f"{once.name} (server_lifetime = 0) on {h.HOST}:{once.port}")
        if self.args.unix:
            t = st.start_pgbouncer(PGB_UNIX, server="unix")
            self.order.append(t.name)
            h.log(f"{t.name} (servers over {st.pg_socket_dir}/.s.PGSQL.{direct.port}) on "
                  f"{h.HOST}:{t.port}")
        if self.args.backend_tls:
            t = st.start_pgbouncer(PGB_BTLS, server="tls")
            self.order.append(t.name)
            h.log(f"{t.name} (server_tls_sslmode = verify-full) on {h.HOST}:{t.port}")
        for w in self.args.workers:
            t = st.start_dwsproxy(dws_name(w), w)
            self.order.append(t.name)
            h.log(f"{t.name} (workers = {w}) on {h.HOST}:{t.port}: {len(t.pids())} process(es) "
                  f"{t.pids()}")
        if self.args.unix:
            t = st.start_dwsproxy(UNIX, self.args.workers[0], backend_unix=True)
            self.order.append(t.name)
            h.log(f"{t.name} (workers = {self.args.workers[0]}, backend over "
                  f"{st.pg_socket_dir}/.s.PGSQL.{direct.port}) on {h.HOST}:{t.port}")
        if self.args.backend_tls:
            t = st.start_dwsproxy(BACKEND_TLS, self.args.workers[0], backend_tls=True)
            self.order.append(t.name)
            h.log(f"{t.name} (workers = {self.args.workers[0]}, backend sslmode = verify-full)"
                  f" on {h.HOST}:{t.port}")
        if self.has_baseline():
            t = st.start_dwsproxy("baseline", self.args.workers[0], src=self.baseline_src(),
                                  python=self.args.baseline_python,
                                  backend_tls=self.args.baseline_backend_tls)
            self.order.append(t.name)
            h.log(f"baseline from {self.args.baseline_src or 'this tree'} "
                  f"({self.args.baseline_python or 'the same interpreter'}) on "
                  f"{h.HOST}:{t.port}")
        if "idle_1000_rss" in self.args.tests:
            # The idle-session memory test uses instances of their own that carry no other
            # load, so that its figure does not depend on what the throughput tests left in the
            # allocators (that is reported apart, as RSS after the load tests).
            for name in self.order[1:]:
                if not runs(name, "idle_1000_rss"):
                    continue  # not an idle-session target (TESTS_OF)
                twin = idle_twin(name)
                if name == "pgbouncer":
                    t = st.start_pgbouncer(twin)
                else:
                    base = name == "baseline"
                    t = st.start_dwsproxy(twin, st.targets[name].workers,
                                          src=self.baseline_src() if base else None,
                                          python=self.args.baseline_python if base else "",
                                          backend_tls=name == BACKEND_TLS)
                h.log(f"{twin} (idle-session test only) on {h.HOST}:{t.port}: "
                      f"{len(t.pids())} process(es), RSS {t.memory()['rss_mb']} MB")
        for name in self.order:
            self.tls[name] = st.check_tls(st.targets[name])
            h.log(f"{name}: psql sees SSL connection ({self.tls[name]})")
        # What a client-side TLS session cache toward the backend (issue 11) could gain.
        for label, version in (("TLSv1.2", ssl.TLSVersion.TLSv1_2),
                               ("TLSv1.3", ssl.TLSVersion.TLSv1_3)):
            self.resumption[label] = h.tls_resumption(direct.port, version)
        h.log(f"PostgreSQL resumes TLS sessions: {self.resumption}")
        if "copy_out" in self.args.tests:
            got = h.copy_bytes_check(st.targets[self.order[-1]].port)
            if got != 1000 * 1001:
                raise RuntimeError(f"COPY size check: expected 1001000 bytes, got {got}")

    # -- measurements --
    def add(self, test: str, target: str, value: float, **detail: Any) -> None:
        self.samples[test].setdefault(target, []).append(value)
        self.details[test].setdefault(target, []).append({"value": value, **detail})

    def run_test(self, test: str, target: str, rnd: int) -> None:
        st, a = self.stack, self.args
        t = st.targets[target]
        d = str(a.duration)
        if test in PGBENCH:
            clients, threads, extra = PGBENCH[test]
            logged = test == "latency_1"
            prefix = self.logs / f"{test}-{target}-{rnd}"
            log_args = ["--log", f"--log-prefix={prefix}"] if logged else []
            pids = t.pids()
            run = ("-S", *extra, "-c", str(clients), "-j", str(threads), "-T", d, "-n",
                   *log_args)
            us = waited = whole = None
            cpu0 = sum(h.cpu_seconds(pid) for pid in pids)
            if test == "connect_8":
                # each transaction is a connection: the whole run is what is measured
                wait0 = sum(h.run_queue_wait(pid) for pid in pids)
                tps, out = h.pgbench(t.port, *run, timeout=a.duration + 120)
                cpu = sum(h.cpu_seconds(pid) for pid in pids) - cpu0
                wait = sum(h.run_queue_wait(pid) for pid in pids) - wait0
                txns = float(h.transactions(out))
            else:
                # from 2 s in (a third of the run at most) to the end: the clients' connection
                # set-up is not a transaction's cost (h.pgbench_steady)
                tps, out, steady = h.pgbench_steady(t.port, pids, *run,
                                                    skip=min(2.0, a.duration / 3),
                                                    timeout=a.duration + 120)
                cpu, wait, txns = ((steady.cpu_s, steady.wait_s, steady.transactions)
                                   if steady else (0.0, 0.0, 0.0))
                if pids:  # the whole run's figure too, connections included, to compare
                    whole = round((sum(h.cpu_seconds(pid) for pid in pids) - cpu0)
                                  / max(1, h.transactions(out)) * 1e6, 1)
            lat = next((ln.split("=", 1)[1].strip() for ln in out.splitlines()
                        if ln.startswith("latency average")), "")
            setup = h.initial_connection_ms(out)
            if pids and txns:
                # the proxy's own CPU time (user + system, all its processes) per transaction,
                # and how long it was ready to run but waited for one of the cores that
                # pgbench and PostgreSQL share with it
                us = round(cpu / txns * 1e6, 1)
                waited = None if math.isnan(wait) else round(wait / txns * 1e6, 1)
            if logged:
                lats = h.read_latency_logs(self.logs, prefix.name)
                if not lats:
                    raise RuntimeError(f"{test} {target}: pgbench wrote no transaction log")
                avg = statistics.fmean(lats)
                p99 = h.percentile(lats, 99)
                self.add(test, target, avg, p99_ms=p99, tps=tps, transactions=len(lats),
                         proxy_cpu_us_per_txn=us, proxy_wait_us_per_txn=waited,
                         proxy_cpu_us_per_txn_whole_run=whole, initial_connection_ms=setup)
                h.log(f"round {rnd} {test:<13} {target:<12} avg {avg:.3f} ms, p99 {p99:.3f} ms"
                      f" ({tps:,.0f} TPS" + (f", proxy CPU {us} us/txn)" if us is not None
                                            else ")"))
                for f in self.logs.glob(prefix.name + ".*"):
                    f.unlink()
                return
            self.add(test, target, tps, latency=lat, proxy_cpu_us_per_txn=us,
                     proxy_wait_us_per_txn=waited, proxy_cpu_us_per_txn_whole_run=whole,
                     initial_connection_ms=setup)
            h.log(f"round {rnd} {test:<13} {target:<12} {tps:>10,.0f} TPS  (latency {lat}"
                  + (f", proxy CPU {us} us/txn)" if us is not None else ")"))
        elif test == "copy_out":
            for _ in range(a.copies_per_round):
                sec, nbytes = h.copy_out(t.port, a.copy_rows)
                mbps = nbytes / 1e6 / sec
                self.add(test, target, mbps, seconds=round(sec, 3), bytes=nbytes)
                h.log(f"round {rnd} {test:<13} {target:<12} {mbps:>10.1f} MB/s "
                      f"({nbytes / 1e6:.0f} MB in {sec:.2f} s)")
        elif test == "idle_1000_rss":
            if target == "direct":
                return  # no proxy process: reported as n/a
            # PgBouncer keeps server connections for server_idle_timeout (2 s here): wait for the
            # cluster to have room for the next 1000 sessions
            left = st.wait_backends_below(60)
            if left >= 60:
                h.log(f"warning: {left} backends still connected before {target}'s idle test")
            t = st.targets[idle_twin(target)]
            before = t.memory()

            def at_peak(n: int) -> dict[str, Any]:
                return {"memory": t.memory(), "backends_seen": st.backend_count()}

            res = h.hold_idle_sessions(t.port, a.idle, at_peak)
            mem = res["memory"]
            per_session = ((mem["rss_mb"] - before["rss_mb"]) * 1024 / res["opened"]
                           if res["opened"] else None)
            self.add(test, target, mem["rss_mb"], pss_mb=mem["pss_mb"],
                     processes=mem["processes"], idle_rss_mb=before["rss_mb"],
                     idle_pss_mb=before["pss_mb"],
                     kib_per_session=round(per_session, 1) if per_session is not None
                     else None,
                     opened=res["opened"], backend_pids=res["backend_pids"],
                     backends_seen=res["backends_seen"], open_seconds=res["open_seconds"],
                     errors=res["error_count"], first_errors=res["errors"])
            h.log(f"round {rnd} {test:<13} {t.name:<12} RSS {mem['rss_mb']:.1f} MB "
                  f"(PSS {mem['pss_mb']:.1f}, {mem['processes']} proc, idle before "
                  f"{before['rss_mb']:.1f} MB, {per_session or 0:.1f} KiB/session; "
                  f"{res['opened']} opened in {res['open_seconds']} s, "
                  f"{res['backend_pids']} distinct backends, {res['error_count']} errors)")
            if res["opened"] < a.idle:
                raise RuntimeError(f"{target}: only {res['opened']}/{a.idle} idle sessions "
                                   f"opened: {res['errors']}")

    def run(self) -> None:
        for rnd in range(1, self.args.reps + 1):
            # The order rotates every round (A B C D, B C D A, ...), so that no target always
            # runs right after the same one (PgBouncer's -C run, say, which leaves ~10,000
            # connections in TIME_WAIT behind it).
            k = (rnd - 1) % len(self.order) if self.args.order == "rotate" else 0
            for test in self.args.tests:
                for target in self.order[k:] + self.order[:k]:
                    if runs(target, test):
                        self.run_test(test, target, rnd)
        # what the instances that carried the throughput tests hold now, with no sessions
        for name in self.order[1:]:
            self.after_load[name] = self.stack.targets[name].memory()

    # -- report --
    def detail_median(self, test: str, target: str, key: str) -> float | None:
        """The median over rounds of one detail (or of "value") of a test for a target."""
        vals = [d[key] for d in self.details.get(test, {}).get(target, [])
                if d.get(key) is not None]
        return statistics.median(vals) if vals else None

    def summary(self, started: float, command: str) -> dict[str, Any]:
        a = self.args
        med: dict[str, dict[str, float | None]] = {}
        for test in a.tests:
            med[test] = {t: median(self.samples[test].get(t, [])) for t in self.order}
        head = dws_name(a.workers[0])
        ratios: dict[str, dict[str, float | None]] = {}
        for test in a.tests:
            ratios[test] = {}
            for n in self.dws_names():
                ratios[test][f"{n}/pgbouncer"] = ratio(med[test][n], med[test]["pgbouncer"])
                ratios[test][f"{n}/direct"] = ratio(med[test][n], med[test]["direct"])
                if peer(n) != "pgbouncer":
                    ratios[test][f"{n}/{peer(n)}"] = ratio(med[test][n], med[test][peer(n)])
        goals = []

        def goal(test: str, text: str, value: float | None, ok: bool | None,
                 unit: str = "ratio") -> None:
            goals.append({"test": test, "target": text, "value": value, "met": ok,
                          "unit": unit})

        pgb = "pgbouncer"
        for test in ("select_8", "select_32", "select_256"):
            if test not in a.tests:
                continue
            r = ratios[test][f"{head}/pgbouncer"]
            goal(test, f"{TESTS[test][0]}: {head} TPS >= 1.0x PgBouncer", r,
                 None if r is None else r >= 1.0)
            r = ratio(self.detail_median(test, head, "proxy_cpu_us_per_txn"),
                      self.detail_median(test, pgb, "proxy_cpu_us_per_txn"))
            goal(test, f"{TESTS[test][0]}: {head} CPU per transaction <= 1.2x PgBouncer's", r,
                 None if r is None else r <= 1.2)
        if "connect_8" in a.tests:
            r = ratios["connect_8"][f"{head}/direct"]
            goal("connect_8", f"new-connection rate: {head} >= 0.95x direct TLS", r,
                 None if r is None else r >= 0.95)
            r = ratio(self.detail_median("connect_8", head, "proxy_cpu_us_per_txn"),
                      self.detail_median("connect_8", pgb, "proxy_cpu_us_per_txn"))
            goal("connect_8", f"CPU per new TLS connection: {head} <= 1.5x PgBouncer's", r,
                 None if r is None else r <= 1.5)
            r = ratio(self.detail_median("connect_8", head, "proxy_cpu_us_per_txn"),
                      self.detail_median("connect_8", PGB_ONCE, "proxy_cpu_us_per_txn"))
            goal("connect_8", f"(like for like, beside the target) CPU per new TLS connection: "
                 f"{head} <= 1.5x {PGB_ONCE}'s, PgBouncer opening a server connection per "
                 "client as dwsproxy does", r, None if r is None else r <= 1.5)
        if "latency_1" in a.tests:
            for key, what in (("value", "average"), ("p99_ms", "p99")):
                d = self.detail_median("latency_1", "direct", key)
                mine = self.detail_median("latency_1", head, key)
                theirs = self.detail_median("latency_1", pgb, key)
                added = None if d is None or mine is None else mine - d
                pgb_added = None if d is None or theirs is None else theirs - d
                goal("latency_1", f"1 client, {what} latency added over direct TLS: {head} "
                     f"<= PgBouncer's ({fmt(pgb_added, 'ms')} ms)", added,
                     None if added is None or pgb_added is None else added <= pgb_added,
                     "ms")
        if "copy_out" in a.tests:
            r = ratios["copy_out"][f"{head}/direct"]
            goal("copy_out", f"COPY out: {head} >= 1.0x direct TLS throughput", r,
                 None if r is None else r >= 1.0)
        if "idle_1000_rss" in a.tests:
            v = med["idle_1000_rss"][head]
            goal("idle_1000_rss", f"{a.idle} idle TLS sessions: {head} RSS (all processes "
                 "summed) <= 50 MB", v, None if v is None else v <= 50.0, "MB")
            first = self.details["idle_1000_rss"].get(head, [])
            base = (first[0]["idle_rss_mb"] / first[0]["processes"]) if first else None
            goal("idle_1000_rss", f"process baseline: {head} RSS per process before the "
                 "sessions (a fresh process) <= 20 MB", base,
                 None if base is None else base <= 20.0, "MB")
            ours = first[0]["kib_per_session"] if first else None
            pfirst = self.details["idle_1000_rss"].get(pgb, [])
            theirs = pfirst[0]["kib_per_session"] if pfirst else None
            goal("idle_1000_rss", f"per idle TLS session (fresh processes): {head} KiB <= "
                 f"PgBouncer's ({fmt(theirs)} KiB)", ours,
                 None if ours is None or theirs is None else ours <= theirs, "KiB")
        # the like-for-like pairs: each dwsproxy target against the PgBouncer that reaches
        # PostgreSQL the same way (issue 26: the btls pair >= 1.0x at 8 and 32 clients)
        for name in (n for n in (UNIX, BACKEND_TLS) if n in self.dws_names()):
            other = peer(name)
            for test in ("select_8", "select_32", "select_256"):
                if test not in a.tests or not runs(name, test):
                    continue
                r = ratios[test][f"{name}/{other}"]
                goal(test, f"{TESTS[test][0]}: {name} TPS >= 1.0x {other}", r,
                     None if r is None else r >= 1.0)
                r = ratio(self.detail_median(test, name, "proxy_cpu_us_per_txn"),
                          self.detail_median(test, other, "proxy_cpu_us_per_txn"))
                goal(test, f"{TESTS[test][0]}: {name} CPU per transaction <= 1.2x {other}'s",
                     r, None if r is None else r <= 1.2)
            if "latency_1" in a.tests and runs(name, "latency_1"):
                d = self.detail_median("latency_1", "direct", "value")
                mine = self.detail_median("latency_1", name, "value")
                theirs = self.detail_median("latency_1", other, "value")
                added = None if d is None or mine is None else mine - d
                other_added = None if d is None or theirs is None else theirs - d
                goal("latency_1", f"1 client, average latency added over direct TLS: {name} "
                     f"<= {other}'s ({fmt(other_added, 'ms')} ms)", added,
                     None if added is None or other_added is None else added <= other_added,
                     "ms")
            if "connect_8" in a.tests and runs(name, "connect_8"):
                r = ratios["connect_8"][f"{name}/direct"]
                goal("connect_8", f"new-connection rate: {name} >= 0.95x direct TLS", r,
                     None if r is None else r >= 0.95)
        if len(a.workers) > 1:
            for test in a.tests:
                if test not in PGBENCH or test == "latency_1":
                    continue
                others = [med[test][dws_name(w)] for w in a.workers[1:]]
                best = max((v for v in others if v is not None), default=None)
                r = ratio(med[test][head], best)
                goal(test, f"{TESTS[test][0]}: {head} (workers = {a.workers[0]}) not beaten "
                     f"by another workers setting by more than {NOISE:.0%}", r,
                     None if r is None else r >= 1.0 - NOISE)
        # which workers setting did better, test by test
        workers_cmp: dict[str, str] = {}
        if len(a.workers) > 1:
            for test in a.tests:
                _, _, higher = TESTS[test]
                vals = {w: med[test][dws_name(w)] for w in a.workers}
                if any(v is None for v in vals.values()):
                    continue
                best = (max if higher else min)(vals, key=lambda w: vals[w])  # type: ignore
                workers_cmp[test] = best
        return {
            "command": command,
            "machine": h.machine_info(self.args.proxy_python),
            "settings": {
                "duration_s": a.duration, "reps": a.reps, "pgbench_threads": 2,
                "copy_rows": a.copy_rows, "copy_bytes": a.copy_rows * 1001,
                "copies_per_round": a.copies_per_round, "idle_sessions": a.idle,
                "dwsproxy_workers": {dws_name(w): w for w in a.workers},
                "order": (f"per test, every target once a round, {' '.join(self.order)}, "
                          + ("rotated by one each round" if a.order == "rotate" else
                             "the same each round")),
                "pgbouncer": "session pooling, client_tls_sslmode=require, backend plaintext, "
                             f"auth_type=trust, max_client_conn={h.PGBOUNCER_MAX_CLIENTS}, "
                             f"default_pool_size={h.PGBOUNCER_POOL_SIZE}; {PGB_ONCE}: the "
                             "same with server_lifetime=0, in "
                             f"{', '.join(PGB_ONCE_TESTS)} only; {PGB_UNIX}: the same with "
                             "the server connections over PostgreSQL's Unix socket, in "
                             f"{', '.join(UNIX_TESTS)}; {PGB_BTLS}: the same with "
                             "server_tls_sslmode=verify-full (server_tls_ca_file, host "
                             f"127.0.0.1, the certificate's IP SAN), in "
                             f"{', '.join(BACKEND_TLS_TESTS)}",
                "postgresql": f"ssl=on (same ECDSA P-256 cert/key), max_connections="
                              f"{h.PG_MAX_CONNECTIONS}, fsync=off, trust auth",
                "dwsproxy": "require_ssl=true, backend plaintext, default logging (info); "
                            f"{BACKEND_TLS}: the same with backend sslmode=verify-full; "
                            f"{UNIX}: the same with the backend host the cluster's socket "
                            "folder (Unix socket)",
                "dwsproxy_source": a.proxy_src or str(h.REPO / "proxy"),
                "baseline": ({"source": a.baseline_src or a.proxy_src or str(h.REPO / "proxy"),
                              "python": a.baseline_python or a.proxy_python or sys.executable}
                             if self.has_baseline() else None),
                "idle_rss_direct": "n/a: there is no proxy process in front of PostgreSQL",
                "tls_seen_by_psql": self.tls,
                "postgresql_resumes_tls_sessions": self.resumption,
            },
            "tests": {t: {"what": TESTS[t][0], "unit": TESTS[t][1],
                          "higher_is_better": TESTS[t][2]} for t in a.tests},
            "samples": self.samples,
            "details": self.details,
            "medians": med,
            "ratios": ratios,
            "targets": goals,
            "workers_better": workers_cmp,
            "unix_backend_ab": self.unix_ab(),
            "rss_after_load_no_sessions": self.after_load,
            "elapsed_s": round(time.monotonic() - started, 1),
        }

    def unix_ab(self) -> dict[str, dict[str, float | None]]:
        """Per test the sidecar pair has, what moving the backend hop from 127.0.0.1 TCP to
        the Unix socket changed: the proxy's CPU per transaction and the TPS, dwsproxy (the
        headline against dwsproxy-unix) and PgBouncer (pgbouncer against pgbouncer-unix), as
        medians and ratios Unix/TCP of the same run."""
        if not self.args.unix:
            return {}
        head = dws_name(self.args.workers[0])
        out: dict[str, dict[str, float | None]] = {}
        for test in self.args.tests:
            if test not in PGBENCH or not runs(UNIX, test):
                continue
            row: dict[str, float | None] = {}
            for key, tcp, unix in (("dws", head, UNIX), ("pgb", "pgbouncer", PGB_UNIX)):
                cpu_tcp = self.detail_median(test, tcp, "proxy_cpu_us_per_txn")
                cpu_unix = self.detail_median(test, unix, "proxy_cpu_us_per_txn")
                row[f"{key}_cpu_tcp"], row[f"{key}_cpu_unix"] = cpu_tcp, cpu_unix
                row[f"{key}_cpu_ratio"] = ratio(cpu_unix, cpu_tcp)
                row[f"{key}_tps_ratio"] = ratio(
                    median([d["tps"] if "tps" in d else d["value"]
                            for d in self.details[test].get(unix, [])]),
                    median([d["tps"] if "tps" in d else d["value"]
                            for d in self.details[test].get(tcp, [])]))
            out[test] = row
        return out

    def markdown(self, s: dict[str, Any]) -> str:
        a = self.args
        m = s["machine"]
        dws = self.dws_names()
        # direct and the PgBouncers (pgbouncer, -once, -unix, -btls as started), then dwsproxy
        cols = [n for n in self.order if n not in dws] + dws
        ratio_cols = [f"{n}/{b}" for n in dws for b in (peer(n), "direct")]
        lines = [
            "# dwsproxy benchmark",
            "",
            f"Command: `{s['command']}`  ",
            f"Date: {m['date']}; {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, "
            f"kernel {m['kernel']}  ",
            f"Python {m['python']} ({m.get('python_executable', '')}; uvloop {m['uvloop']}, "
            f"{m['openssl_python']}); "
            f"{m['pgbouncer']}; {m['postgresql']}; {m['pgbench']}; commit {m['git_commit']}  ",
            f"Each figure is the median of {a.reps} rounds (COPY: {a.reps * a.copies_per_round}"
            f" runs); within every test each target runs once a round, {' → '.join(self.order)}"
            f"{', rotated by one each round' if a.order == 'rotate' else ''}; pgbench "
            f"-T {a.duration} -j 2, PGSSLMODE=require; everything on 127.0.0.1. Elapsed "
            f"{s['elapsed_s']:.0f} s.",
            "",
            "| test | unit | " + " | ".join(cols) + " | " + " | ".join(ratio_cols) + " |",
            "|---|---|" + "---:|" * (len(cols) + len(ratio_cols)),
        ]
        for test in a.tests:
            what, unit, _ = TESTS[test]
            what = what.replace("1000", str(a.idle))
            num = "ms" if unit == "ms" else ""
            row = [fmt(s["medians"][test].get(c), num) for c in cols]
            rr = [fmt(s["ratios"][test].get(rc), "ratio") for rc in ratio_cols]
            lines.append(f"| {what} | {unit} | " + " | ".join(row) + " | " + " | ".join(rr)
                         + " |")
            if test == "latency_1":
                p99 = {c: self.detail_median(test, c, "p99_ms") for c in cols}
                row = [fmt(p99[c], "ms") for c in cols]
                rr = [fmt(ratio(p99[rc.split("/")[0]], p99[rc.split("/")[1]]), "ratio")
                      for rc in ratio_cols]
                lines.append("| pgbench -S, 1 client, p99 latency | ms | " + " | ".join(row)
                             + " | " + " | ".join(rr) + " |")
        lines += ["", "Targets (headline: `" + dws[0] + "`, workers = " + a.workers[0] + "):",
                  ""]
        for g in s["targets"]:
            mark = {True: "**met**", False: "**not met**", None: "n/a"}[g["met"]]
            val = fmt(g["value"], g["unit"])
            unit = f" {g['unit']}" if g["unit"] != "ratio" and g["value"] is not None else ""
            lines.append(f"- {g['target']}: {val}{unit} — {mark}")
        ab = s.get("unix_backend_ab") or {}
        if ab:
            head = dws[0]
            lines += ["", f"What the Unix-socket backend changes (A/B in this run: `{UNIX}` "
                      f"against `{head}`, the same proxy with its backend over 127.0.0.1 TCP; "
                      f"`{PGB_UNIX}` against `pgbouncer` for comparison). Proxy CPU µs per "
                      "transaction (connect_8: per connection), TCP → Unix (ratio), and the "
                      "TPS ratio Unix/TCP:", ""]
            for test, row in ab.items():
                lines.append(
                    f"- {test}: {head} {fmt(row['dws_cpu_tcp'])} → {fmt(row['dws_cpu_unix'])}"
                    f" ({fmt(row['dws_cpu_ratio'], 'ratio')}), TPS "
                    f"{fmt(row['dws_tps_ratio'], 'ratio')}; pgbouncer "
                    f"{fmt(row['pgb_cpu_tcp'])} → {fmt(row['pgb_cpu_unix'])} "
                    f"({fmt(row['pgb_cpu_ratio'], 'ratio')}), TPS "
                    f"{fmt(row['pgb_tps_ratio'], 'ratio')}")
        if s["workers_better"]:
            lines += ["", "Better `workers` setting per test: " + ", ".join(
                f"{t}: {w}" for t, w in s["workers_better"].items())]
        cpu_rows = []
        for test in PGBENCH:
            if test not in a.tests:
                continue
            vals = []
            for name in cols[1:]:
                if not self.details[test].get(name):
                    continue  # not a target of this test (pgbouncer-once, dwsproxy-btls)
                us = self.detail_median(test, name, "proxy_cpu_us_per_txn")
                waited = self.detail_median(test, name, "proxy_wait_us_per_txn")
                whole = self.detail_median(test, name, "proxy_cpu_us_per_txn_whole_run")
                vals.append(f"{name} {fmt(us)} (waited {fmt(waited)}"
                            + (f"; whole run {fmt(whole)}" if whole is not None else "") + ")")
            cpu_rows.append(f"- {test}: " + ", ".join(vals))
        if cpu_rows:
            lines += ["", "Proxy CPU time per transaction (µs, user + system, all the proxy's "
                      "processes, from /proc/PID/stat; median), and in brackets how long the "
                      "proxy was ready to run but waited for a CPU (µs per transaction, main "
                      "threads, /proc/PID/schedstat); both from 2 s into each run, except "
                      "connect_8; \"whole run\": the CPU of the whole run, the clients' "
                      "connections included, over all its transactions:", "", *cpu_rows]
        if "idle_1000_rss" in a.tests:
            lines += ["", f"Idle sessions ({a.idle}, each authenticated by PostgreSQL, "
                      "one query run, each on its own backend), on separate instances that run "
                      "nothing else, so later rounds show what the allocator kept from the "
                      "earlier ones; direct: n/a (no proxy process):", ""]
            for name in cols[1:]:
                det = sorted(self.details["idle_1000_rss"].get(name, []),  # by RSS
                             key=lambda d: d["value"])
                first = self.details["idle_1000_rss"].get(name, [])
                if first:
                    f0 = first[0]
                    lines.append(f"- {name}, round 1 (a fresh process): RSS {f0['value']:.1f} MB"
                                 f" (PSS {f0['pss_mb']:.1f} MB); {f0['idle_rss_mb']:.1f} MB "
                                 f"before the sessions; {f0['kib_per_session']} KiB per session")
                if det:
                    d = det[len(det) // 2]
                    lines.append(f"- {name}, median round: RSS {d['value']:.1f} MB "
                                 f"(PSS {d['pss_mb']:.1f} MB) "
                                 f"in {d['processes']} process(es); {d['idle_rss_mb']:.1f} MB "
                                 f"before the sessions; {d['kib_per_session']} KiB per session"
                                 f"; {d['opened']} opened in {d['open_seconds']} s")
            if self.after_load:
                lines += ["", "RSS of the instances that ran the throughput tests, at the end, "
                          "no sessions open: " + "; ".join(
                              f"{k}: {v['rss_mb']} MB (PSS {v['pss_mb']} MB, "
                              f"{v['processes']} proc)" for k, v in self.after_load.items())]
        if self.resumption:
            lines += ["", "PostgreSQL resumes a TLS session offered on a second connection "
                      "(what a backend-side session cache could gain): " + ", ".join(
                          f"{k}: {'yes' if v else 'no'}" for k, v in self.resumption.items())]
        lines += ["", "TLS as psql saw it: " + "; ".join(f"{k}: {v}"
                                                          for k, v in self.tls.items()),
                  "", "Samples:", ""]
        for test in a.tests:
            for name in cols:
                vals = s["samples"][test].get(name)
                if vals:
                    digits = 3 if TESTS[test][1] == "ms" else 1
                    lines.append(f"- {test} {name}: " + ", ".join(f"{v:.{digits}f}"
                                                                  for v in vals))
        return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = os.environ.get("DWSPROXY_BENCH_COMMAND") or shlex.join(
        ["benchmarks/run", *argv])

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Ctrl-C, kill, a closed terminal: all end in the `finally` that stops what we started
    # (SIGINT explicitly too: a shell may start a background job with SIGINT ignored)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)
    started = time.monotonic()
    bench = Bench(args)
    try:
        bench.setup()
        bench.run()
    except KeyboardInterrupt:
        h.log("interrupted: stopping everything")
        return 130
    finally:
        h.log("stopping PostgreSQL, PgBouncer and dwsproxy")
        bench.stack.close()
        shutil.rmtree(bench.logs, ignore_errors=True)
    s = bench.summary(started, command)
    md = bench.markdown(s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(s, indent=2) + "\n")
    (out / f"{args.tag}.md").write_text(md)
    print()
    print(md)
    h.log(f"wrote {out / (args.tag + '.json')} and {out / (args.tag + '.md')} "
          f"({s['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
