"""What one host identity may make the audit log spend, across all its sessions.

Every denial is an audit record that is on disk before the host hears of it, and every
notification a host sends is a record too. Without a bound, a host controls how fast the
audit log grows (a denial record is larger than the call that caused it) and so how soon the
disk fills and every caller is refused. Three bounds, per identity:
- identical denials (same server, method, name and reason) are recorded once per window,
  with the count;
- denials beyond `DENIALS_PER_MINUTE` (burst `DENIAL_BURST`) are answered with RATE_LIMITED
  and not recorded one by one; a summary record per window says how many there were;
- notifications beyond `NOTIFICATIONS_PER_MINUTE` (burst `NOTIFICATION_BURST`) are dropped,
  never forwarded, with the same kind of summary.
Strings a caller chose (method, tool name) are cut to `MAX_CALLER_STRING` characters in
records. Repeats not yet recorded when a session ends are recorded then, so no count is lost.
Keys are (kind, identity, ...): the identity is always second.
"""

from __future__ import annotations

from stockade.policy.ratelimit import RateLimiter
from stockade.relay.digest import Digest

# A host that is refused this often is probing, not working: an honest host that hits a
# denial shows it to its user and stops.
DENIALS_PER_MINUTE = 120
DENIAL_BURST = 30
# Well above what progress and cancellations of a busy session need.
NOTIFICATIONS_PER_MINUTE = 6000
NOTIFICATION_BURST = 600
MAX_CALLER_STRING = 256


def capped(value: str | None) -> str | None:
    """A caller-chosen string as it may appear in a record: at most MAX_CALLER_STRING."""
    if value is None or len(value) <= MAX_CALLER_STRING:
        return value
    return value[:MAX_CALLER_STRING] + f"…[{len(value) - MAX_CALLER_STRING} more]"


class HostBudget:
    def __init__(self) -> None:
        self._limiter = RateLimiter()
        self._digest = Digest()

    def denial_allowed(self, identity: str) -> bool:
        """Whether this identity may be refused one more time with its own record."""
        return self._limiter.take(("denials", identity), DENIALS_PER_MINUTE, DENIAL_BURST) == 0

    def notification_allowed(self, identity: str) -> bool:
        return (
            self._limiter.take(
                ("notifications", identity), NOTIFICATIONS_PER_MINUTE, NOTIFICATION_BURST
            )
            == 0
        )

    def due(self, *key: str) -> int | None:
        """How many events a record for `key` stands for now, or None: not due yet."""
        return self._digest.due(key)

    def unsaid(self, identity: str) -> list[tuple[tuple[str, ...], int]]:
        """Repeats not yet recorded for this identity (recorded when its session ends)."""
        return self._digest.drain(identity)
