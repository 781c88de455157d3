"""Atomic file writes: a temp file in the target's folder, flushed to disk, renamed over the target.

A crash at any moment leaves the old file or the new one, never a half-written one; the temp file a
crash may leave behind starts with a dot and ends in ``.tmp`` (run directories sweep them on resume).
The result gets the permissions a plain ``open(path, "w")`` would give (0666 less the umask), not the
owner-only 0600 of ``mkstemp``: run folders are often shared by a group on a cluster.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any worker thread exists
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(temp_path)`` (its return value is ignored) and move the result onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
