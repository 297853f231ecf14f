"""Writing files so that a reader never sees half of one: a temp file beside the target, then
a rename. One place, so every writer of results, checkpoints and caches behaves the same."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` fills a temp file in the target's folder, which then replaces
    ``path`` in one rename: a kill mid-write leaves the previous file whole. The file gets
    the process umask's permissions (mkstemp's 0600 would hide a shared results folder from
    the group); on failure the temp file is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
