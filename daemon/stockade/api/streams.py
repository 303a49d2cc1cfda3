"""The daemon's relay streams, counted once across transports (`max_relay_streams`).

`Relay.Connect` (gRPC) and the framed relay (api/frames.py) both carry host sessions; one
count for both keeps `max_relay_streams` the daemon's limit, whichever door hosts use.
"""

from __future__ import annotations


class StreamBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        """Take a stream slot; False when every slot is in use."""
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give_back(self) -> None:
        self.used -= 1

    def refusal(self) -> str:
        return f"the daemon carries {self.used} sessions, its limit (max_relay_streams)"
