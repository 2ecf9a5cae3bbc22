"""What one new TLS connection costs dwsproxy (`workers = 1`), under `pgbench -S -C -c 8 -j 2`.

Run by `benchmarks/connprofile`. Starts a throwaway PostgreSQL and dwsproxy from this tree
(and, with --baseline-src, a second dwsproxy from another tree, measured in the same rounds,
alternating), then per target:
1. CPU per connection from /proc/PID/stat, user and system apart, without a tracer (--rounds
   rounds of --duration seconds; medians);
2. --strace: system calls per connection (`strace -c -f` attached for `-t` connections);
3. --perf: native self time by library (`perf record -e cpu-clock`), turned into µs per
   connection with step 1's total: OpenSSL (libcrypto, libssl), kernel, CPython, uvloop, libc;
4. --calls: Python function calls and calls into C per connection, by function (a second
   instance of the target under benchmarks/callcount.py, counting between SIGUSR1 and SIGUSR2);
   calls under metrics (prometheus_client) and logging are summed apart.
Writes results/<--tag>.txt.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness as h

CLIENTS = 8
TXNS = re.compile(r"number of transactions actually processed: (\d+)")


def pgbench_exe() -> str:
    exe = shutil.which("pgbench") or h.find_pg_binary("pgbench")
    assert exe, "pgbench not found"
    return exe


def run_pgbench(port: int, *limit: str) -> tuple[int, float]:
    """pgbench -S -C; (connections made, TPS)."""
    tps, text = h.pgbench(port, "-S", "-C", "-n", "-c", str(CLIENTS), "-j", "2", *limit,
                          timeout=600)
    m = TXNS.search(text)
    assert m, text
    return int(m.group(1)), tps


def times(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def cpu_phase(t: h.Target, duration: int) -> dict[str, float]:
    pid = t.proc.pid  # type: ignore[union-attr]
    u0, s0 = times(pid)
    n, tps = run_pgbench(t.port, "-T", str(duration))
    u1, s1 = times(pid)
    return {"conns": n, "tps": tps, "user_us": (u1 - u0) / n * 1e6,
            "sys_us": (s1 - s0) / n * 1e6, "total_us": (u1 - u0 + s1 - s0) / n * 1e6}


def strace_phase(t: h.Target, per_client: int, work: Path) -> tuple[float, dict[str, float]]:
    out = work / f"strace-{t.name}.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p",
                               str(t.proc.pid)],  # type: ignore[union-attr]
                              stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    n, _ = run_pgbench(t.port, "-t", str(per_client))
    time.sleep(0.5)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    calls: dict[str, float] = {}
    total = 0.0
    for line in out.read_text().splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            count = int(parts[3])
            calls[parts[-1]] = count / n
            total += count / n
    return total, dict(sorted(calls.items(), key=lambda kv: -kv[1]))


def perf_phase(t: h.Target, duration: int, work: Path) -> dict[str, float]:
    data = work / f"perf-{t.name}.data"
    bench = subprocess.Popen(
        [pgbench_exe(), "-h", h.HOST, "-p", str(t.port), "-U", "postgres", "-S", "-C", "-n",
         "-c", str(CLIENTS), "-j", "2", "-T", str(duration + 4), "postgres"],
        env=h.client_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-o", str(data),
                    "-p", str(t.proc.pid), "--", "sleep", str(duration)],  # type: ignore
                   capture_output=True, timeout=duration + 60)
    bench.wait(duration + 60)
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                          "--sort", "dso", "-g", "none"], capture_output=True, text=True,
                         timeout=300)
    shares: dict[str, float] = collections.defaultdict(float)
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\S+)", line)
        if not m:
            continue
        dso, pct = m.group(2), float(m.group(1))
        if "libcrypto" in dso or "libssl" in dso or dso.startswith("_ssl"):
            shares["OpenSSL (libcrypto, libssl, _ssl)"] += pct
        elif "kernel" in dso:
            shares["kernel"] += pct
        elif "libpython" in dso:
            shares["CPython"] += pct
        elif dso.startswith("loop.") or "uvloop" in dso:
            shares["uvloop"] += pct
        elif dso.startswith("libc"):
            shares["libc (malloc, memcpy)"] += pct
        else:
            shares["other"] += pct
    return dict(shares)


METRICS_MARK = ("prometheus_client", "metrics.py")
LOG_MARK = ("logging/__init__", "__init__.py:", "cli.py")


def calls_phase(st: h.Stack, name: str, src: Path | None, per_client: int,
                work: Path) -> tuple[int, int, list[tuple[str, float]], int]:
    out = work / f"calls-{name}.json"
    wrapper = work / f"python-callcount-{name}"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {h.REPO / 'benchmarks' / 'callcount.py'}"
                       ' "$@"\n')
    wrapper.chmod(0o755)
    os.environ["DWSPROXY_CALLCOUNT_OUT"] = str(out)
    try:
        t = st.start_dwsproxy(f"{name}-calls", "1", src=src or h.REPO, python=str(wrapper))
    finally:
        del os.environ["DWSPROXY_CALLCOUNT_OUT"]
    run_pgbench(t.port, "-t", "5")  # warm: first-use imports and caches
    pid = t.proc.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)
    n, _ = run_pgbench(t.port, "-t", str(per_client))
    time.sleep(0.5)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    counts: dict[str, int] = json.loads(out.read_text())
    gcs = {k: v for k, v in counts.items() if k.startswith("gc ")}
    counts = {k: v for k, v in counts.items() if not k.startswith("gc ")}
    py = sum(v for k, v in counts.items() if not k.startswith("C "))
    c = sum(v for k, v in counts.items() if k.startswith("C "))
    top = sorted(((k, v / n) for k, v in counts.items()), key=lambda kv: -kv[1])[:45]
    top = sorted(((k, v / n) for k, v in gcs.items())) + top
    return py, c, top, n


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/connprofile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-src", default="", help="a second tree, measured alongside")
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strace", action="store_true")
    p.add_argument("--perf", action="store_true")
    p.add_argument("--calls", action="store_true")
    p.add_argument("--per-client", type=int, default=100, help="-t for --strace and --calls")
    p.add_argument("--tag", default="connprofile")
    p.add_argument("--env-this", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for this tree's dwsproxy only (an experiment)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dwsproxy-connprofile-"))
    st = h.Stack()
    lines = [f"command: benchmarks/connprofile {' '.join(argv)}",
             f"date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; commit "
             f"{h.machine_info()['git_commit']}", ""]
    try:
        direct = st.start_postgres()
        h.pgbench_init(direct.port, 10)
        saved = dict(os.environ)
        os.environ.update(dict(item.split("=", 1) for item in args.env_this))
        try:
            targets = [st.start_dwsproxy("this", "1")]
        finally:
            os.environ.clear()
            os.environ.update(saved)
        srcs: dict[str, Path | None] = {"this": None}
        if args.baseline_src:
            base = Path(args.baseline_src).resolve()
            targets.append(st.start_dwsproxy("baseline", "1", src=base))
            srcs["baseline"] = base
        for t in targets:
            run_pgbench(t.port, "-T", "2")  # warm
        cpu: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for t in order:
                sample = cpu_phase(t, args.duration)
                cpu[t.name].append(sample)
                h.log(f"round {r + 1} {t.name}: {sample['tps']:.0f} TPS, "
                      f"{sample['total_us']:.0f} us/conn (user {sample['user_us']:.0f}, "
                      f"sys {sample['sys_us']:.0f})")
        totals: dict[str, float] = {}
        for name, samples in cpu.items():
            med = {k: statistics.median(s[k] for s in samples)
                   for k in ("tps", "total_us", "user_us", "sys_us")}
            totals[name] = med["total_us"]
            lines.append(f"{name}: CPU per connection {med['total_us']:.0f} us (user "
                         f"{med['user_us']:.0f}, system {med['sys_us']:.0f}); -C TPS "
                         f"{med['tps']:.0f}; samples "
                         + ", ".join(f"{s['total_us']:.0f}" for s in samples))
        lines.append("")
        for t in targets:
            if args.perf:
                shares = perf_phase(t, args.duration, work)
                lines.append(f"{t.name}: perf self time by library, as us per connection "
                             f"(of {totals[t.name]:.0f}):")
                for k, v in sorted(shares.items(), key=lambda kv: -kv[1]):
                    lines.append(f"  {v:5.1f}%  {v / 100 * totals[t.name]:6.0f} us  {k}")
                lines.append("")
            if args.strace:
                total, calls = strace_phase(t, args.per_client, work)
                lines.append(f"{t.name}: {total:.1f} system calls per connection:")
                lines += [f"  {v:6.2f}  {k}" for k, v in calls.items() if v >= 0.01]
                lines.append("")
            if args.calls:
                py, c, top, n = calls_phase(st, t.name, srcs[t.name], args.per_client, work)
                lines.append(f"{t.name}: {py / n:.0f} Python calls and {c / n:.0f} calls into C "
                             f"per connection ({n} connections); the most frequent:")
                lines += [f"  {v:7.2f}  {k}" for k, v in top]
                lines.append("")
        text = "\n".join(lines) + "\n"
        out = h.REPO / "benchmarks" / "results" / f"{args.tag}.txt"
        out.write_text(text)
        print(text)
        return 0
    finally:
        st.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
