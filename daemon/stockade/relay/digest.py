"""Say a repeated event once per window, with a count: bounded audit volume.

A caller that repeats what is refused (a denied call, a session past its quota) must not be
able to grow the audit log, or fill its disk, at the rate it sends. So repeats of the same
event by the same caller are recorded once per window, and the record carries how many
it stands for. Keys are bounded in number; the oldest windows are forgotten first.
"""

from __future__ import annotations

import time

WINDOW_SECONDS = 60.0


class Digest:
    """Say a repeated event once per window, with how many were not said since."""

    def __init__(self, window_seconds: float = WINDOW_SECONDS, max_keys: int = 10_000) -> None:
        self._window = window_seconds
        self._max_keys = max_keys
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}  # key -> (said at, unsaid)

    def due(self, key: tuple[str, ...]) -> int | None:
        """How many events a record now stands for, or None when none is due yet."""
        now = time.monotonic()
        said = self._seen.get(key)
        if said is not None and now - said[0] < self._window:
            self._seen[key] = (said[0], said[1] + 1)
            return None
        if said is None and len(self._seen) >= self._max_keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._window}
        self._seen[key] = (now, 0)
        return 1 + (said[1] if said is not None else 0)

    def drain(self, owner: str) -> list[tuple[tuple[str, ...], int]]:
        """Events not yet said for keys whose second part is `owner`; they are said now."""
        unsaid = [(k, n) for k, (_, n) in self._seen.items() if n and len(k) > 1 and k[1] == owner]
        for key, _ in unsaid:
            self._seen[key] = (self._seen[key][0], 0)
        return unsaid
