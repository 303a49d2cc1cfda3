"""Rate limits: a token bucket per limit x identity x server x name.

A bucket holds up to `burst` tokens and refills at `per_minute / 60` tokens a second; a call
takes one. Buckets live in the policy store, not in the evaluator, so a policy reload does
not hand everyone a fresh burst. Their number is bounded: past the cap the least recently
used bucket is forgotten (which can only ever give its owner a fresh burst, never less).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_BUCKETS = 10_000
Clock = Callable[[], float]


@dataclass
class TokenBucket:
    capacity: float
    rate_per_second: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate_per_second)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_second


class RateLimiter:
    def __init__(self, clock: Clock = time.monotonic, max_buckets: int = MAX_BUCKETS) -> None:
        self._clock = clock
        self._max = max_buckets
        self._buckets: OrderedDict[tuple[str, ...], TokenBucket] = OrderedDict()

    def take(self, key: tuple[str, ...], per_minute: int, burst: int) -> float:
        """0.0 if the call may go ahead, else how many seconds until it could."""
        now = self._clock()
        bucket = self._buckets.get(key)
        rate = per_minute / 60.0
        if bucket is None or bucket.capacity != burst or bucket.rate_per_second != rate:
            bucket = TokenBucket(float(burst), rate, float(burst), now)  # new, or limit changed
            self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return bucket.take(now)
