"""runtime/watcher.py: which updates of a configuration's files are seen, and when a change has
settled — kubelet `..data` swaps (tests/kubelet.py), editors' rename-over, in-place writes
caught half way, a CRL folder. Clocks are passed in, so nothing here sleeps."""

from __future__ import annotations

import os
import time
from pathlib import Path

import kubelet
import pytest

from proxy.config.schema import ReloadConfig
from proxy.config.snapshot import Snapshot
from proxy.runtime.watcher import Watcher, watched_paths

INTERVAL = 2.0


class Harness:
    """A watcher over a snapshot naming `files`, whose reload callback counts and rebases as
    the server's request_reload does."""

    def __init__(self, config: Path, *files: Path, listings: tuple[Path, ...] = ()) -> None:
        snap = Snapshot(str(config), "", {str(f): b"" for f in files},
                        {str(d): () for d in listings})
        self.settings = ReloadConfig(watch=True, watch_interval=INTERVAL)
        self.reloads = 0
        self.watcher = Watcher(snap, lambda: self.settings, self._reload)

    def _reload(self) -> None:
        self.watcher.reloading()
        self.reloads += 1

    def look(self, after: float = 0.0) -> float:
        """One look `after` seconds from now on both clocks."""
        return self.watcher.look(time.time() + after, time.monotonic() + after)


def test_watched_paths_are_the_config_its_files_and_its_folders() -> None:
    snap = Snapshot("/etc/d/d.toml", "", {"/etc/d/a.crt": b"", "/etc/d/crls/x": b""},
                    {"/etc/d/crls": ("/etc/d/crls/x",)})
    assert watched_paths(snap) == ("/etc/d/a.crt", "/etc/d/crls", "/etc/d/crls/x",
                                   "/etc/d/d.toml")


def test_nothing_changed_nothing_reloaded(tmp_path: Path) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text("x")
    h = Harness(cfg)
    assert h.look() == INTERVAL and h.look(10) == INTERVAL
    assert h.reloads == 0


def test_every_kubelet_swap_is_seen_once(tmp_path: Path) -> None:
    """Three swaps of `..data` in a row: each one is a reload, none twice. (An inotify watch on
    the file would be left on the deleted folder after the first.)"""
    vol = tmp_path / "vol"
    vol.mkdir()
    kubelet.update(vol, {"d.toml": b"a", "crl.pem": b"1"}, "t1")
    h = Harness(vol / "d.toml", vol / "crl.pem")
    for step in range(2, 5):
        kubelet.update(vol, {"d.toml": b"a", "crl.pem": str(step).encode()}, f"t{step}")
        # Just written: too young to be sure it is whole, so wait until it is one interval old.
        wait = h.look()
        assert 0 < wait <= INTERVAL and h.reloads == step - 2
        h.look(INTERVAL)
        assert h.reloads == step - 1
        h.look(2 * INTERVAL)
        assert h.reloads == step - 1  # the same bytes are not reloaded again


def test_an_atomic_rename_of_an_old_file_is_applied_at_the_first_look(tmp_path: Path) -> None:
    """A file finished long ago and renamed into place (cp -p then mv, a kubelet swap of files
    written earlier) is whole: no need to wait a further interval."""
    crl = tmp_path / "crl.pem"
    crl.write_text("old")
    h = Harness(tmp_path / "d.toml", crl)
    new = tmp_path / ".crl.pem.tmp"
    new.write_text("new")
    os.rename(new, crl)
    h.look(INTERVAL + 0.5)  # its ctime (the rename) is an interval old by then
    assert h.reloads == 1


def test_an_editors_rename_over_is_seen(tmp_path: Path) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text("a = 1\n")
    h = Harness(cfg)
    tmp = tmp_path / "d.toml~"
    tmp.write_text("a = 1\n")  # the same size and, within a tick, the same mtime: a new inode
    os.replace(tmp, cfg)
    h.look()
    h.look(INTERVAL)
    assert h.reloads == 1


def test_a_file_being_written_is_not_applied_until_it_settles(tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_text("-----BEGIN X509 CRL-----\n")
    h = Harness(tmp_path / "d.toml", crl)
    with open(crl, "a") as fh:
        fh.write("half")
        fh.flush()
        h.look(0.5)
        assert h.reloads == 0
        fh.write(" and more")
        fh.flush()
        # One interval since the first sighting, but the file moved on meanwhile: not yet.
        h.look(INTERVAL * 0.9)
        assert h.reloads == 0
    h.look(INTERVAL + 0.1)  # its mtime is now an interval old
    assert h.reloads == 1


def test_a_missing_file_counts_once_it_stays_missing(tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_text("x")
    h = Harness(tmp_path / "d.toml", crl)
    crl.unlink()  # e.g. an rm then a copy: not yet back
    h.look()
    assert h.reloads == 0
    h.look(INTERVAL)  # still missing an interval later: the reload will say so (and refuse)
    assert h.reloads == 1


def test_a_new_file_in_a_crl_folder_is_seen(tmp_path: Path) -> None:
    crls = tmp_path / "crls"
    crls.mkdir()
    h = Harness(tmp_path / "d.toml", listings=(crls,))
    (crls / "inter.crl").write_text("x")
    h.look()
    h.look(INTERVAL)
    assert h.reloads == 1


def test_a_sighup_reload_rebases_so_the_change_is_not_reloaded_twice(tmp_path: Path) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text("a")
    h = Harness(cfg)
    cfg.write_text("bb")
    h.look()  # seen, not yet settled
    h.watcher.reloading()  # SIGHUP arrives: the server's request_reload calls this first
    h.look(INTERVAL)
    assert h.reloads == 0


def test_switched_off_by_a_reload(tmp_path: Path) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text("a")
    h = Harness(cfg)
    h.settings = ReloadConfig(watch=False, watch_interval=INTERVAL)
    cfg.write_text("bb")
    h.look(10)
    assert h.reloads == 0


@pytest.mark.parametrize("interval", [0.5, 2.0, 30.0])
def test_the_next_look_is_at_most_one_interval_away(tmp_path: Path, interval: float) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text("a")
    h = Harness(cfg)
    h.settings = ReloadConfig(watch=True, watch_interval=interval)
    assert h.look() == interval
    cfg.write_text("bb")
    assert 0 < h.look() <= interval
