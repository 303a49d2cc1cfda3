"""How many instances start at once, and in what order.

A start is CPU-bound: the engine creates the container, then the server imports its code
(about 0.5 s of CPU for `mcp-server-time`). Two hundred hosts arriving at once on two cores
each wait for all the others when every start runs at once; through the gate, the first in
are served first and the last no later. So a start holds one of `slots` until its server
first answers (the host's `initialize`), it ends, or `settle` seconds pass (a pooled instance
is not asked anything). Sessions waiting for a cold instance go first, in arrival order;
pool refills go after them. A session that has to wait is told how many are ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

Told = Callable[[int], Awaitable[None]]  # told(sessions ahead) when a session must wait


class StartGate:
    def __init__(self, slots: int, settle: float) -> None:
        self.slots = slots
        self.settle = settle
        self._free = slots
        self._sessions: deque[asyncio.Future[None]] = deque()
        self._refills: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._sessions) + len(self._refills)

    async def enter(self, *, session: bool, told: Told | None = None) -> None:
        """Wait for a slot (sessions before refills, each in arrival order)."""
        ahead = len(self._sessions) if session else self.waiting
        if self._free > 0 and ahead == 0:
            self._free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._sessions if session else self._refills).append(turn)
        try:
            if told is not None:
                with contextlib.suppress(Exception):  # telling is a courtesy; waiting is not
                    await told(ahead)
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave()  # granted as we were cancelled: pass it on
            else:
                turn.cancel()
                with contextlib.suppress(ValueError):
                    (self._sessions if session else self._refills).remove(turn)
            raise

    def leave(self) -> None:
        """Give the slot to the next waiting session, else the next refill."""
        for queue in (self._sessions, self._refills):
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self._free += 1

    async def hold_until_settled(self, answered: asyncio.Event) -> None:
        """Keep the slot until the new instance's server answers (or `settle` passes)."""
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), self.settle)
        finally:
            self.leave()
