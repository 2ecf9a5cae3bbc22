"""What the reload watcher's stat poll costs, and what an inotify watch would see instead.

    .venv/bin/python benchmarks/watch_cost.py [--files 8] [--looks 20000]

1. Cost: CPU time of one look (runtime/watcher.fingerprint) over N files, as the watcher makes
   it every watch_interval, and the same per day at the default interval of 2 s.
2. Reliability: three updates each of kubelet's `..data` swap (tests/kubelet.py), an editor's
   rename-over, and an in-place write; how many of the nine each approach notices, the poll
   through its fingerprint and an inotify watch set once on each file's path (IN_MODIFY,
   IN_CLOSE_WRITE, IN_ATTRIB, IN_DELETE_SELF, IN_MOVE_SELF), as a watcher that does not re-arm
   would. (inotify through ctypes: it is not in the standard library.)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import select
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import kubelet

from proxy.runtime.watcher import fingerprint

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_DELETE_SELF, IN_MOVE_SELF, IN_NONBLOCK = 0x400, 0x800, 0o4000
MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF


def cost(files: int, looks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(files):
            p = Path(tmp) / f"f{i}.pem"
            p.write_bytes(b"x" * 2048)
            paths.append(str(p))
        fingerprint(paths)
        start = time.process_time()
        for _ in range(looks):
            fingerprint(paths)
        per_look = (time.process_time() - start) / looks
    print(f"stat poll: {per_look * 1e6:.1f} us CPU per look over {files} files "
          f"({per_look * 1e6 / files:.2f} us a file); at watch_interval 2 s "
          f"{per_look * 43200:.3f} s CPU a day")


class Inotify:
    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libc = libc
        self.fd = libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")

    def add(self, path: str) -> None:
        if self.libc.inotify_add_watch(self.fd, path.encode(), MASK) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def events(self) -> int:
        count = 0
        while select.select([self.fd], [], [], 0.05)[0]:
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                _, _, _, name_len = struct.unpack_from("iIII", data, offset)
                offset += 16 + name_len
                count += 1
        return count


def rename_over(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def reliability() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vol, plain = Path(tmp) / "vol", Path(tmp) / "etc"
        vol.mkdir()
        plain.mkdir()
        kubelet.update(vol, {"crl.pem": b"0"}, "t0")
        (plain / "edited.toml").write_text("0")
        (plain / "inplace.pem").write_text("0")
        targets = [str(vol / "crl.pem"), str(plain / "edited.toml"), str(plain / "inplace.pem")]
        ino = Inotify()
        for t in targets:
            ino.add(t)
        seen_poll = seen_inotify = 0
        before = fingerprint(targets)
        ino.events()
        for step in range(1, 4):
            updates = [
                lambda s=step: kubelet.update(vol, {"crl.pem": str(s).encode()}, f"t{s}"),
                lambda s=step: rename_over(plain / "edited.toml", str(s)),
                lambda s=step: (plain / "inplace.pem").write_text(str(s)),
            ]
            for update in updates:
                update()
                now = fingerprint(targets)
                seen_poll += now != before
                before = now
                seen_inotify += ino.events() > 0
        os.close(ino.fd)
    print(f"updates noticed out of 9 (3 kubelet swaps, 3 rename-overs, 3 in-place writes): "
          f"stat poll {seen_poll}, inotify on each file's path without re-arming "
          f"{seen_inotify}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--looks", type=int, default=20000)
    args = parser.parse_args()
    cost(args.files, args.looks)
    reliability()


if __name__ == "__main__":
    main()
