#!/usr/bin/env python3
"""How long a reload holds the event loop: a configuration with a 1,000-file `ssl_crl_dir`
(issue 21 item 7), loaded inline on the loop as SIGHUP did before, and through the Reloader,
which builds it in a thread. A ticker task wakes every millisecond; the longest gap between two
of its wakes during the reload is how long every session of the process waited.

    .venv/bin/python benchmarks/reload_stall.py [--files 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402

from proxy.runtime import server  # noqa: E402
from proxy.runtime.state import ServerState  # noqa: E402
from proxy.tls import loader  # noqa: E402
from proxy.tools import certs  # noqa: E402


def make_config(folder: Path, files: int) -> Path:
    certs.init(folder)
    ca = certs.load_ca(folder)
    crls = folder / "crls"
    crls.mkdir()
    for i in range(files):  # one issuer's CRLs, as a folder collected over time holds them
        certs.write_crl(crls / f"{i:04d}.pem", certs.make_crl(ca, [10_000 + i]))
    path = folder / "dwsproxy.toml"
    path.write_text("[backend]\nhost = \"127.0.0.1\"\nport = 1\n[tls]\n"
                    "ssl_cert_file = \"server.crt\"\nssl_key_file = \"server.key\"\n"
                    "ssl_ca_file = \"cacert.pem\"\nssl_crl_dir = \"crls\"\n"
                    "clientcert = \"verify-ca\"\n")
    return path


async def stall(path: Path, inline: bool) -> tuple[float, float]:
    """(longest loop gap, reload duration), in seconds."""
    state: ServerState[Any] = ServerState(loader.load(str(path)))
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    gaps.clear()
    t0 = time.perf_counter()
    if inline:
        loader.load(str(path))  # what SIGHUP's handler did before
    else:
        reloader = server.Reloader(state, lambda: None)
        reloader.request()
        assert reloader.task is not None
        await reloader.task
    took = time.perf_counter() - t0
    await asyncio.sleep(0.005)
    done.set()
    await tick
    return max(gaps), took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_config(Path(tmp), args.files)
        rows: dict[str, list[tuple[float, float]]] = {"inline (before)": [], "thread (after)": []}
        for _ in range(args.rounds):  # alternate, so that load on the machine hits both
            rows["inline (before)"].append(uvloop.run(stall(path, inline=True)))
            rows["thread (after)"].append(uvloop.run(stall(path, inline=False)))
    print(f"reload of a config with a {args.files}-file ssl_crl_dir, {args.rounds} rounds, "
          "medians")
    medians = {}
    for name, samples in rows.items():
        gap = statistics.median(s[0] for s in samples)
        took = statistics.median(s[1] for s in samples)
        medians[name] = gap
        print(f"  {name:16s} longest loop stall {gap * 1000:7.1f} ms"
              f"   reload {took * 1000:7.1f} ms")
    print(f"  stall after / before: {medians['thread (after)'] / medians['inline (before)']:.2f}x")


if __name__ == "__main__":
    main()
