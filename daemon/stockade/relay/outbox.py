"""What a shared server sends one host, queued for that host alone.

A shared instance's output is read by one reader for every session: if it awaited each
host's transport inline, one host that stops reading would stall the answers of all the
others. So each session of a shared instance gets its own bounded queue and writer task.
A host that lets its queue grow past the bound loses what comes after (counted, said once
a window in the daemon's log); no other host waits for it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from stockade.logs import get_logger
from stockade.relay.digest import Digest

log = get_logger("stockade.relay")

_said = Digest()


class Outbox:
    def __init__(self, session: str, deliver: Callable[[bytes], Awaitable[None]], limit: int):
        self._session = session
        self._deliver = deliver
        self._limit = limit
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes
        self.dropped = 0
        self._ready = asyncio.Event()
        self._writer = asyncio.create_task(self._write(), name=f"outbox-{session}")
        # Its outcome is always taken (a host gone mid-write ends it with an error).
        self._writer.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def put(self, raw: bytes) -> None:
        """Queue one message for the host; never waits for it (the ToHost signature)."""
        if self._queued + len(raw) > self._limit:
            self.dropped += 1
            count = _said.due(("outbox-full", self._session))
            if count is not None:
                log.warning(
                    "a host of a shared server does not read its messages; dropped",
                    session=self._session,
                    dropped=count,
                    queued_bytes=self._queued,
                )
            return
        self._queue.append(raw)
        self._queued += len(raw)
        self._ready.set()

    async def flushed(self, timeout: float) -> None:
        """Wait (bounded) until the queue has gone to the host."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._queue and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self._writer.cancel()

    async def _write(self) -> None:
        while True:
            await self._ready.wait()
            while self._queue:
                raw = self._queue[0]
                await self._deliver(raw)
                self._queue.popleft()
                self._queued -= len(raw)
            self._ready.clear()
