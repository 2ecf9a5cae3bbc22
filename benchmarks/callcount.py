"""Run `python -m proxy.cli ...` with a call counter that SIGUSR1 starts and SIGUSR2 stops.

Used by `connprofile.py --calls`: between the two signals every Python function call and every
call into C from Python (`sys.setprofile` events "call" and "c_call") is counted, by function;
SIGUSR2 writes the counts as JSON to $DWSPROXY_CALLCOUNT_OUT. Counting slows the proxy down a
lot: only the counts mean anything, never the time.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import runpy
import signal
import sys
import time
from types import FrameType
from typing import Any

_counts: collections.Counter[str] = collections.Counter()
_gc_started = [0.0]


def _gc(phase: str, info: dict[str, int]) -> None:
    # garbage collections and their time, by generation: "gc gen N" and "gc gen N ns"
    if phase == "start":
        _gc_started[0] = time.perf_counter_ns()
    else:
        gen = info["generation"]
        _counts[f"gc gen {gen}"] += 1
        _counts[f"gc gen {gen} ns"] += time.perf_counter_ns() - int(_gc_started[0])


def _where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_qualname} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"


def _profile(frame: FrameType, event: str, arg: Any) -> None:
    if event == "call":
        _counts[_where(frame)] += 1
    elif event == "c_call":
        _counts[f"C {getattr(arg, '__qualname__', repr(arg))}"] += 1


def _start(_signum: int, _frame: FrameType | None) -> None:
    _counts.clear()
    gc.callbacks.append(_gc)
    sys.setprofile(_profile)


def _stop(_signum: int, _frame: FrameType | None) -> None:
    sys.setprofile(None)
    gc.callbacks.remove(_gc)
    with open(os.environ["DWSPROXY_CALLCOUNT_OUT"], "w") as fh:
        json.dump(dict(_counts), fh)


signal.signal(signal.SIGUSR1, _start)
signal.signal(signal.SIGUSR2, _stop)
if __name__ == "__main__":
    # argv: callcount.py -m proxy.cli --config X
    assert sys.argv[1] == "-m"
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
