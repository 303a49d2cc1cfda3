"""Deliver granted secrets to one instance: files on a tmpfs, bind-mounted read-only.

For instance I, `RUNTIME_DIR/I/NAME` holds the value (mode 0400, owned by the container
user, in a 0500 folder), and that folder is mounted at `/run/secrets` in the container. The
value is never in the container's environment, labels, command or image, so `docker
inspect` cannot show it. The folder is removed when the instance ends, and folders left by
a crash are removed at the next start. The runtime folder must be on a tmpfs: a secret is
never written to a disk (delivery is refused, with the reason, if it is not).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from stockade.secrets.model import SecretError

TMPFS = "tmpfs"
CONTAINER_TARGET = "/run/secrets"


def filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` is on (from /proc/self/mounts, longest prefix)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


class SecretDelivery:
    """Per daemon: `runtime_dir/DAEMON_ID/INSTANCE_ID/NAME` (daemons never touch each other's)."""

    def __init__(self, runtime_dir: Path, daemon_id: str) -> None:
        self._root = runtime_dir / daemon_id

    def _ensure_root(self) -> None:
        for folder in (self._root.parent, self._root):
            folder.mkdir(mode=0o700, exist_ok=True)
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                raise SecretError(
                    f"the secrets runtime folder {folder} is not a folder owned by this daemon "
                    "(someone else created it?); refusing to write secrets there"
                )
            os.chmod(folder, 0o700)
        kind = filesystem_type(self._root)
        if kind != TMPFS:
            raise SecretError(
                f"the secrets runtime folder {self._root} is on {kind or 'an unknown filesystem'}"
                ", not tmpfs; refusing to write secrets to disk (set secrets_runtime_dir)"
            )

    def write(self, instance_id: str, values: dict[str, bytes], user: str) -> Path:
        """The instance's secrets folder, written; bind it at /run/secrets read-only."""
        self._ensure_root()
        uid, _, gid = user.partition(":")
        folder = self._root / instance_id
        folder.mkdir(mode=0o700)
        try:
            for name, value in values.items():
                fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(value)
                os.chown(folder / name, int(uid), int(gid or uid))
            os.chown(folder, int(uid), int(gid or uid))
            os.chmod(folder, 0o500)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def remove(self, instance_id: str) -> None:
        folder = self._root / instance_id
        with contextlib.suppress(FileNotFoundError):
            os.chmod(folder, 0o700)  # 0500 for the container user; needs CAP_FOWNER only
        shutil.rmtree(folder, ignore_errors=True)

    def remove_all_except(self, keep: set[str]) -> int:
        """Remove folders of instances that no longer exist (left by a crash)."""
        if not self._root.is_dir():
            return 0
        stale = [p for p in self._root.iterdir() if p.name not in keep]
        for path in stale:
            self.remove(path.name)
        return len(stale)
