"""Profile dwsproxy under `pgbench -S -c 32` with py-spy: run by `benchmarks/profile`.

Starts a throwaway PostgreSQL (TLS on) and one dwsproxy (require_ssl, `--workers`, default 1 so
that one process carries all the load), drives it with pgbench -S -c 32 -j 2 over TLS, and:
1. measures TPS and the proxy's CPU time per transaction without a profiler attached;
2. samples it with `py-spy record --nonblocking --format raw` (Python frames) and sums the
   samples by function — self time (leaf) and inclusive — and by area;
3. if `perf` is installed, samples it with `perf record -e cpu-clock` (native: kernel, OpenSSL,
   uvloop, CPython) and reports self time by library and by symbol.
Writes the summary and the raw py-spy stacks under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness as h

FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")


def split_frame(frame: str) -> tuple[str, str]:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("func"), m.group("where")


def is_proxy(where: str) -> bool:
    return where.startswith("proxy/") or "/proxy/" in where


def area(func: str, where: str) -> str:
    w = where.lower()
    if func == "Runner.run" and "runners.py" in w:
        # uvloop's run_forever is C: without --native its own work (epoll, socket reads, the
        # SSLProtocol's decrypting, calling callbacks) is charged to the line that started it
        return "uvloop event loop (C, under Runner.run)"
    if is_proxy(w):
        return "proxy code"
    if "uvloop" in w:
        return "uvloop"
    if "asyncio" in w:
        return "asyncio (stdlib)"
    if w.startswith("ssl.py") or "/ssl.py" in w or "libssl" in w or "libcrypto" in w \
            or "_ssl" in w:
        return "ssl / OpenSSL"
    if "prometheus" in w:
        return "prometheus_client"
    if "epoll" in func or "epoll" in w:
        return "idle (epoll_wait)"
    if "libc" in w or func.startswith("__") or "syscall" in func:
        return "libc / syscalls"
    if "python" in w or "libpython" in w:
        return "CPython interpreter"
    return "other"


def summarize(raw: Path, top: int = 25) -> tuple[str, dict[str, object]]:
    self_time: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    areas_self: collections.Counter[str] = collections.Counter()
    proxy_incl: collections.Counter[str] = collections.Counter()
    total = 0
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        # the first frame names the thread ("process 123:\"...\"" or "thread (0x...)")
        if frames and (frames[0].startswith("process ") or frames[0].startswith("thread ")):
            frames = frames[1:]
        while frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        total += count
        leaf_func, leaf_where = split_frame(frames[-1])
        leaf_area = area(leaf_func, leaf_where)
        if leaf_area == "idle (epoll_wait)":
            idle += count
        self_time[f"{leaf_func} ({leaf_where})"] += count
        areas_self[leaf_area] += count
        seen: set[str] = set()
        seen_proxy: set[str] = set()
        for fr in frames:
            func, where = split_frame(fr)
            key = f"{func} ({re.sub(r':[0-9]+$', '', where)})"
            if key not in seen:
                seen.add(key)
                incl[key] += count
            if is_proxy(where) and key not in seen_proxy:
                seen_proxy.add(key)
                proxy_incl[key] += count
    busy = max(1, total)  # percentages: of all samples (idle included)

    def pct(n: int, of: int) -> str:
        return f"{100.0 * n / of:5.1f}%"

    out = [f"samples: {total} (idle in epoll_wait: {idle}, busy: {total - idle}); "
           "percentages are of all samples", "", "By area (self time):"]
    for name, n in areas_self.most_common():
        out.append(f"  {pct(n, busy)}  {n:7d}  {name}")
    out += ["", f"Top {top} functions by self time (leaf frame):"]
    for name, n in self_time.most_common(top + 1):
        if "epoll_wait" in name:
            continue
        out.append(f"  {pct(n, busy)}  {n:7d}  {name}")
    out += ["", f"Top {top} functions by inclusive time (anywhere on the stack):"]
    for name, n in incl.most_common(top):
        out.append(f"  {pct(n, busy)}  {n:7d}  {name}")
    out += ["", "The proxy's own functions, inclusive:"]
    for name, n in proxy_incl.most_common(top):
        out.append(f"  {pct(n, busy)}  {n:7d}  {name}")
    data = {"total": total, "idle": idle, "areas_self": dict(areas_self),
            "self_top": self_time.most_common(top), "inclusive_top": incl.most_common(top),
            "proxy_inclusive": proxy_incl.most_common(top)}
    return "\n".join(out) + "\n", data


def find_pyspy() -> str | None:
    local = h.REPO / ".venv" / "bin" / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def perf_summary(data: Path, top: int = 40) -> str:
    """Flat native profile from `perf record`: by library, then by symbol (self time)."""
    out = []
    for sort, n in (("dso", 15), ("dso,sym", top)):
        rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                              "--sort", sort, "-g", "none"], capture_output=True, text=True,
                             timeout=300)
        rows = [ln.rstrip() for ln in rep.stdout.splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")][:n]
        out += [f"perf, self time by {'library' if sort == 'dso' else 'library and symbol'}:",
                *rows, ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1", help="dwsproxy workers (default 1)")
    p.add_argument("--clients", type=int, default=0,
                   help="pgbench clients (default 32; 8 with --connect)")
    p.add_argument("--connect", action="store_true",
                   help="profile new connections instead: pgbench -S -C")
    p.add_argument("--duration", type=int, default=15, help="seconds of each sampling phase")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--native", action="store_true",
                   help="py-spy --native (C frames); py-spy must then stop the process for "
                        "each sample, which biases the samples towards system calls")
    p.add_argument("--no-perf", action="store_true", help="skip the perf phase")
    p.add_argument("--out", default=str(h.REPO / "benchmarks" / "results"))
    p.add_argument("--tag", default="profile-latest")
    p.add_argument("--proxy-src", default="", help="run dwsproxy from this source tree")
    args = p.parse_args(argv)
    if not args.clients:
        args.clients = 8 if args.connect else 32
    mode = ["-S", "-C"] if args.connect else ["-S"]
    pyspy = find_pyspy()
    if pyspy is None:
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    use_perf = not args.no_perf and shutil.which("perf") is not None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{args.tag}.collapsed"
    perf_data = Path(tempfile.mkdtemp(prefix="dwsproxy-perf-")) / "perf.data"
    st = h.Stack(proxy_src=Path(args.proxy_src).resolve() if args.proxy_src else None)
    bench = None
    try:
        direct = st.start_postgres()
        h.pgbench_init(direct.port, 10)
        t = st.start_dwsproxy("dwsproxy", args.workers)
        pids = t.pids()
        h.log(f"dwsproxy (workers = {args.workers}) pids {pids} on port {t.port}")
        exe = shutil.which("pgbench") or h.find_pg_binary("pgbench")
        assert exe
        # 1) unprofiled: TPS and the proxy's CPU time per transaction (from /proc/PID/stat)
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        tps0, _ = h.pgbench(t.port, *mode, "-n", "-c", str(args.clients), "-j", "2", "-T",
                            str(args.duration), timeout=args.duration + 60)
        cpu_s, wall = cpu_seconds(pids) - cpu0, time.monotonic() - t0
        us_per_txn = cpu_s / (tps0 * args.duration) * 1e6
        h.log(f"unprofiled: {tps0:,.0f} TPS; proxy CPU {cpu_s:.2f} s in {wall:.1f} s = "
              f"{us_per_txn:.1f} us per transaction")
        # 2) py-spy, 3) perf, while one longer pgbench runs
        total = args.duration * (2 if use_perf else 1) + 8
        bench = subprocess.Popen(
            [exe, "-h", h.HOST, "-p", str(t.port), "-U", "postgres", *mode, "-n", "-c",
             str(args.clients), "-j", "2", "-T", str(total), "postgres"],
            env=h.client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(3)  # past the connection ramp
        cmd = [pyspy, "record", "--pid", str(t.proc.pid), "--rate", str(args.rate),
               "--duration", str(args.duration), "--format", "raw", "--output", str(raw)]
        if args.workers != "1":
            cmd.append("--subprocesses")
        cmd.append("--native" if args.native else "--nonblocking")
        h.log("sampling: " + " ".join(cmd))
        spy = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
        if spy.returncode != 0 or not raw.exists():
            print(spy.stdout, spy.stderr, file=sys.stderr)
            return 1
        perf_text = ""
        if use_perf:
            pcmd = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-o", str(perf_data),
                    "-p", ",".join(map(str, t.pids())), "--", "sleep", str(args.duration)]
            h.log("sampling: " + " ".join(pcmd))
            rec = subprocess.run(pcmd, capture_output=True, text=True,
                                 timeout=args.duration + 60)
            if rec.returncode == 0 and perf_data.exists():
                perf_text = perf_summary(perf_data)
            else:
                perf_text = f"perf record failed: {rec.stderr.strip()[-300:]}\n"
        text, _ = bench.communicate(timeout=total + 60)
        tps = h.PGBENCH_TPS.search(text)
        h.log(f"pgbench {' '.join(mode)} -c {args.clients} under sampling: "
              f"{tps.group(1) if tps else '?'} TPS")
        summary, _ = summarize(raw)
        header = (f"dwsproxy profile under pgbench {' '.join(mode)} -c {args.clients} -j 2 "
                  "over TLS, "
                  f"workers = {args.workers}\n"
                  f"command: benchmarks/profile {' '.join(argv)}\n"
                  f"date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; commit "
                  f"{h.machine_info()['git_commit']}\n\n"
                  f"unprofiled run (-T {args.duration}): {tps0:,.0f} TPS; proxy CPU "
                  f"{us_per_txn:.1f} us per transaction ({100 * cpu_s / wall:.0f}% of one core)\n"
                  f"sampled run: {tps.group(1) if tps else '?'} TPS\n\n"
                  f"py-spy record {'--native' if args.native else '--nonblocking'} --rate "
                  f"{args.rate} for {args.duration} s (Python frames; time in C under a "
                  "Python line is charged to that line):\n")
        report = header + summary + ("\n" + perf_text if perf_text else "")
        (out_dir / f"{args.tag}.txt").write_text(report)
        print(report)
        h.log(f"wrote {out_dir / (args.tag + '.txt')} and {raw}")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.wait()
        st.close()
        shutil.rmtree(perf_data.parent, ignore_errors=True)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds (from /proc/PID/stat)."""
    return sum(h.cpu_seconds(pid) for pid in pids)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
