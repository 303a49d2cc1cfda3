"""Disk headroom for the audit log: warn before the disk fills, refuse before it is full.

A full disk used to fail the audit log for every caller until a restart. Instead:
- below `warn_bytes` free, `status` says so, while everything still works;
- below `reserve_bytes` free, the log refuses new records (requests are refused, as for any
  audit failure: nothing is relayed that cannot be recorded) and the reserve stays free
  for what must still be written (the resume record, a checkpoint);
- once the free space is back above the reserve, the log resumes by itself and records
  that it did, with how long it was refusing.
Free space is read with fstatvfs at most every `CHECK_SECONDS`: cheap next to a record.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

CHECK_SECONDS = 0.5
MiB = 1024 * 1024


@dataclass
class Headroom:
    reserve_bytes: int = 0
    warn_bytes: int = 0
    free: int | None = None  # the last reading
    _checked: float = field(default=0.0)

    def read(self, fd: int) -> int:
        stats = os.fstatvfs(fd)
        self.free = stats.f_bavail * stats.f_frsize
        self._checked = time.monotonic()
        return self.free

    def shortfall(self, fd: int) -> str | None:
        """Why the log must refuse records now (below the reserve), else None. Rate-limited."""
        if not self.reserve_bytes or time.monotonic() - self._checked < CHECK_SECONDS:
            return None
        free = self.read(fd)
        if free >= self.reserve_bytes:
            return None
        return (
            f"the audit disk is nearly full: {free / MiB:.1f} MiB free, below the "
            f"{self.reserve_bytes / MiB:.1f} MiB reserve (audit_reserve_bytes)"
        )

    def warning(self) -> str | None:
        """What `status` should say while space is short but the log still works."""
        if self.free is None or not self.warn_bytes or self.free >= self.warn_bytes:
            return None
        return (
            f"only {self.free / MiB:.1f} MiB free on the audit disk; records are refused "
            f"below {self.reserve_bytes / MiB:.1f} MiB"
        )
