"""Automatic reload: the config file and every file it names, looked at every `watch_interval`.

Owns: which paths a configuration depends on (its snapshot knows them), their fingerprint on
disk, deciding when a change has settled, and asking for a reload through the callback the
server hands in — the same path SIGHUP takes, so a watched change is validated whole, refused
whole, counted and shown in /status exactly as a signal's. Must not read or parse the files
(the reload does) and must not put anything in force. Runs in the main process only: workers
never read files.

Why a stat poll and not inotify (measured in benchmarks/watch_cost.py, README "Reload"):
- kubelet updates a ConfigMap/Secret volume by swapping the `..data` link; an inotify watch on
  `crl.pem` follows the link once, to a file in the old `..<timestamp>` folder, and sees only
  its deletion: every file's watch must be re-armed after every swap, and its parent folder
  watched to see the swap at all. cert-manager renewals reach the pod the same way. An editor's
  rename-over likewise replaces the inode the watch was on. Each is a race between re-arming
  and the next update; a missed event is a missed revocation.
- `os.stat` follows the links on every look, so each of those updates is simply a new inode
  (or size, mtime, ctime) at the next look, with nothing to re-arm: 9 of 9 such updates seen,
  against 5 of 9 for inotify watches set once on the paths. A configuration names a handful
  of files: 7.3 us of CPU per look over 8 files (0.3 s a day at the default 2 s).
- inotify is not in Python's standard library (ctypes, or another dependency).

When a change counts: a file written in place may be caught half written. A change is acted on
once the newest ctime/mtime of what changed is at least one interval old (an atomic rename or a
kubelet swap brings complete files, so they are usually old enough at once), or when the same
changed fingerprint has been seen for one interval (timestamps in the future, a missing file).
A writer that stalls longer than an interval mid-file can still be caught: the reload then
refuses what does not parse, and rename-over is the way to update a file (docs/configuration.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable

from ..config.schema import ReloadConfig
from ..config.snapshot import Snapshot

log = logging.getLogger("dwsproxy.watcher")

# A path's state: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns), or the errno of a
# failed stat (a file missing in the middle of a rename).
Entry = tuple[int, ...]
Fingerprint = dict[str, Entry]

MIN_WAIT = 0.05  # seconds: never look again sooner than this


def watched_paths(snap: Snapshot) -> tuple[str, ...]:
    """The config file, every file it names that was read, and every folder it lists (a new or
    removed CRL in `ssl_crl_dir` changes the folder)."""
    paths = {snap.path, *snap.files, *snap.listings}
    paths.discard("")
    return tuple(sorted(paths))


def entry(path: str) -> Entry:
    try:
        st = os.stat(path)  # follows links: a kubelet `..data` swap is a new inode here
    except OSError as exc:
        return (-1, exc.errno or 0)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def fingerprint(paths: Iterable[str]) -> Fingerprint:
    return {p: entry(p) for p in paths}


def changed(old: Fingerprint, new: Fingerprint) -> list[str]:
    return sorted(p for p in new.keys() | old.keys() if old.get(p) != new.get(p))


def newest_change(paths: Iterable[str], fp: Fingerprint) -> float | None:
    """The latest mtime/ctime (seconds since the epoch) among `paths`; None when none exists."""
    stamps = [max(e[3], e[4]) / 1e9 for p in paths if len(e := fp.get(p, ())) == 5]
    return max(stamps) if stamps else None


class Watcher:
    """Looks at the files of the configuration in force and calls `request_reload` once a
    change has settled. The server tells it about every reload, whatever asked for it
    (`reloading` before the files are read, `follow` after), so a SIGHUP and a watched change
    never reload the same bytes twice."""

    def __init__(self, snap: Snapshot, settings: Callable[[], ReloadConfig],
                 request_reload: Callable[[], None]) -> None:
        self._settings = settings
        self._request_reload = request_reload
        self.paths = watched_paths(snap)
        self.baseline = fingerprint(self.paths)
        self._pending: Fingerprint | None = None
        self._pending_since = 0.0
        self.looks = 0

    def reloading(self) -> None:
        """A reload is about to read the files: what is on disk now is what it reads, so it is
        the new baseline. A change written after this is seen at a later look."""
        self.baseline = fingerprint(self.paths)
        self._pending = None

    def follow(self, snap: Snapshot) -> None:
        """After a reload: the configuration in force may name other files."""
        paths = watched_paths(snap)
        if paths != self.paths:
            kept = {p: e for p, e in self.baseline.items() if p in paths}
            self.paths = paths
            self.baseline = {**fingerprint(p for p in paths if p not in kept), **kept}

    def look(self, now_wall: float | None = None, now_mono: float | None = None) -> float:
        """One look; returns the seconds until the next one."""
        settings = self._settings()
        interval = settings.watch_interval
        if not settings.watch:  # only a reload can switch it back on, and it rebases first
            return interval
        wall = time.time() if now_wall is None else now_wall
        mono = time.monotonic() if now_mono is None else now_mono
        self.looks += 1
        current = fingerprint(self.paths)
        if current == self.baseline:
            self._pending = None
            return interval
        if current != self._pending:
            self._pending, self._pending_since = current, mono
        what = changed(self.baseline, current)
        newest = newest_change(what, current)
        age = mono - self._pending_since
        if newest is not None:
            age = max(age, wall - newest)
        if age < interval:
            # Not settled: look again when it would be (a file still being written moves its
            # mtime on, and the next look waits again).
            return max(MIN_WAIT, min(interval, interval - age))
        log.info("changed on disk: %s; reloading", ", ".join(what))
        self._request_reload()
        return interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.look())
