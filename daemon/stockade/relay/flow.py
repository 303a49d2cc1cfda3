"""How many server notifications one instance may have relayed to hosts.

Relaying a message costs the daemon (and the host's bridge) far more than reading it: a
gRPC write, a frame, a line in the host. A server sending valid notifications as fast as it
can (logs, progress) would turn that cost onto everyone who shares the daemon's event loop,
and onto its own host. So notifications past `rate` a second (burst: `BURST_SECONDS` worth)
are dropped: counted, and said in the daemon's log at most once a second with the count
(the caller records them in the audit log at most once a window). Answers and the server's
own requests are never dropped here; they are bounded by the read pace (`sandbox/pace.py`)
and by the requests a host has outstanding.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from stockade.logs import get_logger
from stockade.metrics import NOTIFICATIONS_DROPPED

log = get_logger("stockade.relay")

DEFAULT_NOTIFICATIONS_PER_SECOND = 100
BURST_SECONDS = 10.0  # an honest server's burst of progress or logs passes whole
LOG_INTERVAL = 1.0  # at most one "dropped" line a second per instance


class NotificationValve:
    """A token bucket over one instance's notifications to hosts, and the drop count."""

    def __init__(
        self,
        server: str,
        rate: float = DEFAULT_NOTIFICATIONS_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._server = server
        self._rate = float(rate)
        self._capacity = self._rate * BURST_SECONDS
        self._tokens = self._capacity
        self._clock = clock
        self._updated = clock()
        self._logged_at = -LOG_INTERVAL
        self._unlogged = 0
        self.dropped = 0  # in all, for this instance

    def admit(self) -> bool:
        """Whether one more notification may go to a host now; False: drop it (counted)."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.dropped += 1
        self._unlogged += 1
        NOTIFICATIONS_DROPPED.labels(self._server).inc()
        if now - self._logged_at >= LOG_INTERVAL:
            log.warning(
                "server notifications over budget; dropped",
                server=self._server,
                dropped=self._unlogged,
                dropped_total=self.dropped,
                per_second=self._rate,
            )
            self._logged_at, self._unlogged = now, 0
        return False
