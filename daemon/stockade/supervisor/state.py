"""The supervisor's live bookkeeping for one registered server (pool, in use, history)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from stockade.logs import get_logger, log_context
from stockade.registry import ServerDefinition
from stockade.relay.shared import SharedRouter
from stockade.sandbox.instance import ExitReport, Instance

log = get_logger("stockade.supervisor")

# Exit reports kept per server for `stockade server status`.
EXIT_HISTORY = 20
# Warm-pool restart backoff after failed starts: 1 s doubling to 60 s. The cap bounds how
# long a fixed server (an image built meanwhile, a secret set) waits to come back.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0


@dataclass
class ServerState:
    """Live bookkeeping for one registered server."""

    definition: ServerDefinition
    pool: deque[Instance] = field(default_factory=deque)
    in_use: dict[str, Instance] = field(default_factory=dict)  # instance id -> instance
    starting: int = 0
    restarts: int = 0
    exits: deque[tuple[float, str, ExitReport]] = field(
        default_factory=lambda: deque(maxlen=EXIT_HISTORY)
    )
    # Health: consecutive failed starts (or instances that died before use), why the last
    # one failed, and when the next attempt is due (wall clock for operators, monotonic
    # for the pool's backoff). Cleared once an instance comes up and stays up.
    failures: int = 0
    last_error: str = ""
    next_retry_at: float = 0.0
    retry_not_before: float = 0.0
    router: SharedRouter | None = None  # shared servers only
    runner: asyncio.Task[None] | None = None  # keeps the shared instance running

    def record_failure(self, error: str) -> float:
        """Count a failed start; returns the delay before the next attempt."""
        self.failures += 1
        self.last_error = error
        delay = min(BACKOFF_BASE * 2.0 ** (self.failures - 1), BACKOFF_CAP)
        self.retry_not_before = time.monotonic() + delay
        self.next_retry_at = time.time() + delay
        return delay

    def pool_failed(self, error: str) -> None:
        """A pool start failed or a pooled instance died: count it, back off, say why once."""
        delay = self.record_failure(error)
        with log_context(server=self.definition.name):
            log.error(
                "warm pool instance failed",
                error=error,
                failures=self.failures,
                retry_in_seconds=delay,
            )

    def record_healthy(self) -> None:
        """An instance came up and stayed up (or served): the failure streak is over."""
        self.failures = 0
        self.last_error = ""
        self.next_retry_at = 0.0
        self.retry_not_before = 0.0

    def may_retry(self) -> bool:
        return time.monotonic() >= self.retry_not_before
