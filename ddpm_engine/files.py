"""Writing files so that a reader never sees half of one: a temp file beside the target, then
a rename. One place, so every writer of results, checkpoints and caches behaves the same."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

# Below this many free bytes a failed write is put down to a full disk: torch.save says only
# "unexpected pos" when its zip writer runs out of space, naming neither cause nor file.
FULL_BELOW_BYTES = 1 << 20
DISK_FULL = "no space left on device writing"  # how a DiskFull reads, in a run's recorded reason too


class DiskFull(OSError):
    """A write that failed because its file system is full, naming the file it was writing."""

    def __init__(self, path: str | Path):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"{DISK_FULL} {self.filename}"


def write_error_message(error: OSError) -> str:
    """A failed write in one line: the file and the system's reason."""
    if isinstance(error, DiskFull):
        return str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{DISK_FULL} {error.filename or 'a file'}"
    reason = error.strerror or str(error)
    return f"cannot write {error.filename}: {reason}" if error.filename else f"cannot write: {reason}"


def out_of_space(error: BaseException, folder: str | Path) -> bool:
    """Whether a failed write into ``folder`` failed for lack of space: an ENOSPC or EDQUOT
    error (an OSError's errno decides), or an error without one (torch's) on a file system
    left with (almost) no space."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < FULL_BELOW_BYTES


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` fills a temp file in the target's folder, which then replaces
    ``path`` in one rename: a kill mid-write leaves the previous file whole. The file gets
    the process umask's permissions (mkstemp's 0600 would hide a shared results folder from
    the group); on failure the temp file is removed and the error raised, as ``DiskFull``
    when the disk is full."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as error:
        if out_of_space(error, path.parent):
            raise DiskFull(path) from error
        raise
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as error:
        # checked before the temp file goes: it holds the space the write used up
        if not isinstance(error, DiskFull) and out_of_space(error, path.parent):
            raise DiskFull(path) from error
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
