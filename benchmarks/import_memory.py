"""What a dwsproxy process's baseline RSS is made of, import by import, per interpreter.

`.venv/bin/python benchmarks/import_memory.py [PYTHON ...]` starts, for each interpreter (default:
this one), one fresh process per step and prints its VmRSS after the imports of that step:
bare interpreter, + asyncio and ssl, + uvloop, + the standard library's HTTP stack (what
prometheus-client's package imports on import), + prometheus-client, + the proxy's server and
CLI modules. Every step is a fresh process, so each figure is that step's whole RSS. An
interpreter without uvloop or prometheus-client (a bare pyenv one) stops at the first step it
cannot import.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = [
    ("bare interpreter", ""),
    ("+ asyncio, ssl", "import asyncio, ssl"),
    ("+ uvloop", "import asyncio, ssl, uvloop"),
    ("+ http.server, urllib.request, wsgiref, gzip",
     "import asyncio, ssl, uvloop, http.server, urllib.request, wsgiref.simple_server, gzip"),
    ("+ prometheus_client (instead)", "import asyncio, ssl, uvloop, prometheus_client"),
    ("+ proxy.server, proxy.cli", "import asyncio, ssl, uvloop, prometheus_client, "
                                  "proxy.server, proxy.cli"),
]
PROBE = ("{imports}\nimport gc, re\ngc.collect()\n"
         "s = open('/proc/self/status').read()\n"
         "print(re.search(r'VmRSS:\\s+(\\d+)', s).group(1))\n")


def rss_kib(python: str, imports: str) -> int | None:
    out = subprocess.run([python, "-c", PROBE.format(imports=imports)], capture_output=True,
                         text=True, cwd=REPO, env={"PATH": "/usr/bin:/bin",
                                                   "PYTHONPATH": str(REPO)})
    return int(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout else None


def main(pythons: list[str]) -> None:
    for python in pythons:
        version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                                 capture_output=True, text=True).stdout.strip()
        print(f"{python} (Python {version}), VmRSS of a fresh process after:")
        for label, imports in STEPS:
            kib = rss_kib(python, imports)
            if kib is None:
                print(f"  {label:<48} (cannot import)")
                break
            print(f"  {label:<48} {kib / 1024:6.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1:] or [sys.executable])
