"""What kubelet does to a ConfigMap or Secret volume on every update, for reload tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def update(folder: Path, files: dict[str, bytes], stamp: str) -> None:
    """Write a new `..<stamp>` folder, swap the `..data` link to it atomically, delete the
    old folder; the visible names are links `name -> ..data/name`, made once."""
    new = folder / f"..{stamp}"
    new.mkdir()
    for name, data in files.items():
        (new / name).write_bytes(data)
        os.chmod(new / name, 0o600)
    old = os.readlink(folder / "..data") if (folder / "..data").is_symlink() else None
    os.symlink(new.name, folder / "..data_tmp")
    os.replace(folder / "..data_tmp", folder / "..data")
    for name in files:
        if not (folder / name).is_symlink():
            os.symlink(f"..data/{name}", folder / name)
    if old:
        shutil.rmtree(folder / old)
