"""One open host session, whatever transport carries it, and what `session ls` shows of it.

Made by `relay.opening.SessionOpener`; the transports (api/relay.py, http/) only call
`from_host`, `drain`, `expire`, `close`, and wait on `ended` and `revoked`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from stockade.relay.guard import PolicyGuard
from stockade.relay.jsonrpc import Message
from stockade.relay.session import RelaySession
from stockade.sandbox.instance import ExitReport, Instance

SHARED = "shared"  # the instance name sessions on a shared server report


@dataclass(frozen=True)
class SessionRecord:
    """What `stockade session ls` shows about a live session."""

    id: str
    server: str
    identity: str
    instance: str
    transport: str
    credential: str = ""  # "cert:SERIAL" or "token:ID": what revoking ends it
    started_at: float = field(default_factory=time.time)

    @property
    def shared(self) -> bool:
        return self.instance == SHARED


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


class HostSession:
    """One open host session, whatever carries it; made by `SessionOpener.open`."""

    def __init__(
        self,
        record: SessionRecord,
        *,
        guard: PolicyGuard,
        forward: Callable[[bytes | Message], Awaitable[None]],
        drain: Callable[[float], Awaitable[None]],
        expire: Callable[[float], Awaitable[None]],
        release: Callable[[], None],
        on_close: Callable[[HostSession, str], None],
    ) -> None:
        self.record = record
        self._guard = guard
        self.from_host = forward
        self.drain = drain
        self.expire = expire  # requests older than the timeout get -32001
        self._release = release
        self._on_close = on_close
        self._closed = False
        # Resolves when the session's own instance ended (never for a shared instance,
        # which the supervisor restarts while its sessions go on).
        self.ended: asyncio.Future[ExitReport] = asyncio.get_running_loop().create_future()
        # Resolves (with the reason) when the caller's credential was revoked: the transport
        # ends the session at once.
        self.revoked: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def instance(self) -> str:
        return self.record.instance

    def _watch(self, instance: Instance, relay: RelaySession) -> None:
        async def watch() -> None:
            report = await asyncio.shield(instance.exited)
            await relay.server_ended(report)  # pending requests get errors first
            if not self.ended.done():
                self.ended.set_result(report)

        self._watcher = asyncio.create_task(watch(), name=f"session-{self.id}")

    async def close(self, reason: str) -> None:
        """Give the instance back and record the end. Idempotent."""
        if await self._give_back():
            await self._guard.summarise()  # repeats of denials not yet on record
            self._on_close(self, reason)

    async def abandon(self) -> None:
        """Give the instance back from a session that never opened: nothing to record."""
        await self._give_back()

    async def _give_back(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            # Taken even when it already failed (telling a host that went away how its
            # server ended): never an "exception never retrieved" later.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        self._release()
        return True
