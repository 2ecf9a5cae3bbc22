"""Running a command with a pseudo-terminal as its output, for commands that print a secret
only to a terminal (`dwsproxy certs show-passphrase`)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
from pathlib import Path


def read_from_terminal(argv: list[str], cwd: Path) -> str:
    """Run `argv` with a pseudo-terminal as stdout and stderr; what it printed, stripped."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                            cwd=cwd)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, f"no output within 30 s from {argv}"
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    return out.decode().strip()
