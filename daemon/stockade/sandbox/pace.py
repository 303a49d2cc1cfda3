"""How fast the daemon reads one instance's output: a token bucket of lines and bytes.

Every session shares the daemon's one event loop, so a server that writes as fast as it can
(garbage, stderr, valid notifications) would otherwise take as much of it as it likes, and
every other session would wait behind its lines. Past its budget, the instance's attach
socket is simply not read for a while: the kernel buffer fills, dockerd stops reading the
container's stdout, and the server blocks in its own `write`. The flooding party waits;
nobody else does. Nothing is lost (answers arrive later, in order).

I/O-free: `OutputPace.charge` says how long to wait; the reader sleeps that long.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

MiB = 1024 * 1024
# Above the ~1,800 answers a second one pipelined session gets through the relay at best
# (bench/relay.py), so pacing never slows an honest server; a flood of small lines costs
# the daemon about 30 µs of strict parsing each, so the pace bounds it to ~15% of a core.
DEFAULT_LINES_PER_SECOND = 5000
DEFAULT_BYTES_PER_SECOND = 16 * MiB
# Lines handled between two turns of the event loop given to everyone else.
YIELD_EVERY = 32


@dataclass(frozen=True)
class OutputLimits:
    """Lines (stdout and stderr) and bytes a second one instance may make the daemon read;
    each allows one second's worth at once."""

    lines_per_second: float = DEFAULT_LINES_PER_SECOND
    bytes_per_second: float = DEFAULT_BYTES_PER_SECOND


class OutputPace:
    """Two token buckets (lines, bytes). A charge may overdraw them: one large line is read
    whole, and the debt is waited off before the next read."""

    def __init__(self, limits: OutputLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._lines = float(limits.lines_per_second)
        self._bytes = float(limits.bytes_per_second)
        self._updated = clock()
        self.waited = 0.0  # seconds this instance's output was held back, in all

    def charge(self, lines: int, size: int) -> float:
        """Take `lines` and `size` bytes; the seconds to wait before reading on (0: none)."""
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        limits = self._limits
        self._lines = min(
            float(limits.lines_per_second), self._lines + elapsed * limits.lines_per_second
        )
        self._bytes = min(
            float(limits.bytes_per_second), self._bytes + elapsed * limits.bytes_per_second
        )
        self._lines -= lines
        self._bytes -= size
        wait = max(
            -self._lines / limits.lines_per_second if self._lines < 0 else 0.0,
            -self._bytes / limits.bytes_per_second if self._bytes < 0 else 0.0,
        )
        self.waited += wait
        return wait
