"""The fuzz targets in `make test`: every stored input (the seed corpus, and any input that once
crashed a target, kept in crashes/) run through its target, then a short coverage-guided run of
each (`make fuzz` runs them longer). Each runs in its own process: atheris instruments the
modules it imports, and libFuzzer exits the process on a finding."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TARGETS = ("negotiation", "tls_records", "proxyproto")
# The three runs together stay within CI's share of two minutes for fuzzing.
SECONDS = int(os.environ.get("DWSPROXY_FUZZ_SECONDS", "25"))


def fuzz(target: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HERE / f"fuzz_{target}.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def stored_inputs(target: str) -> list[Path]:
    return sorted(p for folder in (HERE / "corpus" / target, HERE / "crashes" / target)
                  if folder.is_dir() for p in folder.iterdir() if p.is_file())


@pytest.mark.parametrize("target", TARGETS)
def test_stored_inputs_pass(target: str) -> None:
    files = stored_inputs(target)
    assert files, f"no seed corpus for {target}"
    proc = fuzz(target, *map(str, files), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stderr.count("Executed ") == len(files), proc.stderr[-3000:]


@pytest.mark.parametrize("target", TARGETS)
def test_short_fuzz_run_finds_nothing(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # new inputs go here, not into the repository
    corpus.mkdir()
    words = HERE / f"{target}.dict"  # the protocol's magic numbers, where there is one
    proc = fuzz(target, f"-max_total_time={SECONDS}", "-timeout=10", "-print_final_stats=1",
                f"-artifact_prefix={tmp_path}/", *([f"-dict={words}"] if words.exists() else []),
                str(corpus), str(HERE / "corpus" / target), timeout=SECONDS + 120)
    found = sorted(p.name for p in tmp_path.iterdir() if p.name != "corpus")
    assert proc.returncode == 0 and not found, (
        f"fuzz_{target} found {found} (keep it in tests/fuzz/crashes/{target}/ once fixed):\n"
        + proc.stderr[-6000:])
    done = re.search(r"Done (\d+) runs", proc.stderr)
    assert done and int(done.group(1)) > 0, proc.stderr[-3000:]
    final = re.findall(r"#\d+\s+DONE .*", proc.stderr)
    print(f"fuzz_{target}: {final[-1] if final else done.group(0)}")  # seen with pytest -s


@pytest.mark.parametrize("target", TARGETS)
def test_the_instrumented_modules_exist(target: str) -> None:
    """atheris instruments modules by name: a name that no longer exists (a module moved)
    leaves the target running with no coverage guidance, and nothing else says so."""
    import importlib.util

    text = (HERE / f"fuzz_{target}.py").read_text()
    names = re.findall(r'"(proxy(?:\.\w+)+)"', text.split("instrument_imports", 1)[1]
                       .split(")", 1)[0])
    assert names, f"fuzz_{target}.py instruments no proxy module"
    for name in names:
        assert importlib.util.find_spec(name) is not None, f"{name} is not a module"
