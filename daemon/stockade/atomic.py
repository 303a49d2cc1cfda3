"""Replace a file so that a crash leaves the old content or the new, never a torn mix."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, payload: bytes, mode: int = 0o600) -> None:
    """Write `payload` to a new temp file beside `path` (0600 until written, then `mode`),
    fsync it, rename it over `path`, then fsync the folder so that the rename itself
    survives a power cut.

    The one way the daemon writes a file: the temp file is made with O_EXCL under a random
    name, so whoever can write the folder cannot have the data land in a file of theirs (a
    planted temp file or symlink), and the rename replaces a link at `path`, never its
    target."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode != 0o600:
                os.fchmod(handle.fileno(), mode)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
