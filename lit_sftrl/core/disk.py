"""Writes that fail for want of space fail in one line: what was written, the space left, what to do."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DiskFull(OSError):
    """A checkpoint could not be written for want of space; the message says so and names the file."""



@contextmanager
def space_checked(folder: Path, doing: str, advice: str) -> Iterator[None]:
    """Run a write into ``folder``; if it fails for want of space, raise one line instead (:class:`DiskFull`):
    what was being written, the space left, and what to do. Other failures pass through unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not _out_of_space(error, folder):
            raise
        free = shutil.disk_usage(folder).free
        message = f"no space left on device {doing} ({free / 2**20:.0f} MiB free on its filesystem): {advice}"
        raise DiskFull(message) from error


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for want of space. torch's zip writer turns ENOSPC into a RuntimeError
    ("file write failed") that carries no errno: then the filesystem's free space (with the partial file still on
    it) decides."""
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    try:
        return isinstance(error, RuntimeError) and shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


