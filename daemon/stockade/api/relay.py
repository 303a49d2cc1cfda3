"""The Relay servicer: `Relay.Connect` carries one MCP session as opaque JSON-RPC frames.

The first client frame opens the session (`open`: which server). The daemon takes an
instance (warm pool first), answers `opened`, then pumps frames both ways through a
`RelaySession`. The session ends when the host ends its stream (the container is stopped)
or when the server ends (pending requests get errors, then a `closed` frame says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from stockade.api.auth import current_identity
from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.logs import get_logger, log_context
from stockade.metrics import SESSIONS
from stockade.policy.store import PolicyStore
from stockade.registry import Registry, UnknownServer
from stockade.relay.guard import PolicyGuard
from stockade.relay.session import RelaySession
from stockade.sandbox.errors import SandboxError
from stockade.supervisor.supervisor import Supervisor
from stockade.v1 import relay_pb2, relay_pb2_grpc

log = get_logger("stockade.relay")

Context = grpc.aio.ServicerContext[relay_pb2.ClientFrame, relay_pb2.ServerFrame]


@dataclass(frozen=True)
class OpenSessionRecord:
    """What `stockade` shows about a live session."""

    id: str
    server: str
    identity: str
    instance: str
    started_at: float = field(default_factory=time.time)


class RelayServicer(relay_pb2_grpc.RelayServicer):
    def __init__(
        self,
        supervisor: Supervisor,
        registry: Registry,
        policy: PolicyStore,
        *,
        audit: AuditLog,
        max_message_bytes: int,
        drain_seconds: float = 30.0,
    ) -> None:
        self._policy = policy
        self._audit = audit
        self._supervisor = supervisor
        self._registry = registry
        self._max = max_message_bytes
        self._drain_seconds = drain_seconds
        self.sessions: dict[str, OpenSessionRecord] = {}

    # The read/write style (context.read/context.write) lets two tasks share one stream; the
    # stubs only know the generator style, hence the override note.
    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[relay_pb2.ClientFrame],
        context: Context,
    ) -> None:
        # Tell the client it is authenticated before it writes anything: a client write that
        # races a refusal makes grpc.aio report INTERNAL instead of it (grpc/grpc#36066).
        await context.send_initial_metadata(())
        first = await _read(context)
        if first is None or first.WhichOneof("kind") != "open":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be `open` naming a server"
            )
        if first.open.options:
            unknown = ", ".join(sorted(first.open.options))
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown session options: {unknown}"
            )
        name = first.open.server
        session_id = uuid.uuid4().hex[:16]
        identity = _identity()
        where = {"identity": identity, "server": name, "session": session_id}
        try:
            definition = self._registry.get(name)
        except UnknownServer as exc:
            await self._record(context, "session.open", outcome="deny", reason=str(exc), **where)
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        with log_context(session=session_id, server=name):
            if definition.shared:
                await self._run_shared(context, name, session_id, identity)
            else:
                await self._run(context, name, session_id, identity)

    async def _run_shared(
        self, context: Context, name: str, session_id: str, identity: str
    ) -> None:
        """A session on a shared instance: the router rewrites ids; the host ends it."""
        try:
            router = self._supervisor.router(name)
        except SandboxError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        host = _HostStream(context)
        guard = PolicyGuard(
            self._policy,
            name,
            identity,
            self._audit,
            session=session_id,
            instance="shared",
            redactor=router.redactor,
        )
        where = {"identity": identity, "server": name, "session": session_id}
        await self._record(context, "session.open", outcome="ok", instance="shared", **where)
        session = router.join(session_id, host.message, guard)
        self.sessions[session_id] = OpenSessionRecord(session_id, name, identity, "shared")
        log.info("session opened on the shared instance")
        try:
            await host.frame(
                relay_pb2.ServerFrame(
                    opened=relay_pb2.SessionOpened(session_id=session_id, instance="shared")
                )
            )
            async for raw in _host_messages(context):
                await router.from_host(session, raw)
            await router.drain(session, self._drain_seconds)
            log.info("session closed: host ended its stream")
        finally:
            router.leave(session)
            self.sessions.pop(session_id, None)
            self._closed(where, "shared")

    async def _run(self, context: Context, name: str, session_id: str, identity: str) -> None:
        try:
            instance = await self._supervisor.acquire(name, session_id)
        except SandboxError as exc:
            log.error("could not start an instance", error=str(exc))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"could not start {name!r}: {exc}")
        where = {"identity": identity, "server": name, "session": session_id}
        try:
            await self._record(context, "session.open", outcome="ok", instance=instance.id, **where)
        except BaseException:  # refused (audit unavailable) or cancelled: give it back
            self._supervisor.release_later(instance)
            raise
        host = _HostStream(context)
        guard = PolicyGuard(
            self._policy,
            name,
            identity,
            self._audit,
            session=session_id,
            instance=instance.id,
            redactor=lambda: instance.redaction.redactor if instance.redaction else None,
        )
        session = RelaySession(
            session_id, name, instance, host.message, max_message_bytes=self._max, guard=guard
        )
        self.sessions[session_id] = OpenSessionRecord(session_id, name, identity, instance.id)
        log.info("session opened", instance=instance.id)
        host_task: asyncio.Task[None] | None = None
        try:
            await host.frame(
                relay_pb2.ServerFrame(
                    opened=relay_pb2.SessionOpened(session_id=session_id, instance=instance.id)
                )
            )
            instance.bind(session.from_server)
            host_task = asyncio.create_task(_pump_host(context, session))
            waiting: set[asyncio.Future[Any]] = {host_task, instance.exited}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if instance.exited.done():
                report = instance.exited.result()
                await session.server_ended(report)
                log.info("session closed: server ended", exit_code=report.exit_code)
                await host.frame(
                    relay_pb2.ServerFrame(
                        closed=relay_pb2.SessionClosed(
                            reason=f"server {name!r} {report.describe()}",
                            exit_code=report.exit_code,
                        )
                    )
                )
            else:
                host_task.result()  # re-raise a protocol error from the host side
                # The host sent its last message; deliver the answers it still awaits.
                await session.drain(self._drain_seconds)
                log.info("session closed: host ended its stream")
        finally:
            if host_task is not None and not host_task.done():
                host_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await host_task
            self.sessions.pop(session_id, None)
            self._supervisor.release_later(instance)
            self._closed(where, instance.id)

    async def _record(self, context: Context, event: str, **fields: Any) -> None:
        """A durable session record; if it cannot be written, the session is refused."""
        try:
            await self._audit.record(
                event, durable=True, transport="grpc", peer=context.peer(), **fields
            )
        except AuditUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"refused: {exc}")
        if event == "session.open" and fields.get("outcome") == "ok":
            SESSIONS.labels(fields["server"]).inc()

    def _closed(self, where: dict[str, str], instance: str) -> None:
        SESSIONS.labels(where["server"]).dec()
        with contextlib.suppress(AuditUnavailable):  # the failure is already said and shown
            self._audit.write("session.close", outcome="ok", instance=instance, **where)


class _HostStream:
    """Writes to the host's side of the stream; one writer at a time (grpc.aio requires it)."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self._lock = asyncio.Lock()

    async def frame(self, frame: relay_pb2.ServerFrame) -> None:
        async with self._lock:
            await self._context.write(frame)

    async def message(self, raw: bytes) -> None:
        await self.frame(relay_pb2.ServerFrame(message=raw))


async def _host_messages(context: Context) -> AsyncIterator[bytes]:
    """The host's messages after `open`, one at a time, until it ends its stream.

    Pulled, not queued: while the consumer is busy (a slow server), no frame is read and
    gRPC flow control slows the host down.
    """
    while (frame := await _read(context)) is not None:
        if frame.WhichOneof("kind") != "message":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "only `message` frames may follow `open`"
            )
        yield frame.message


async def _pump_host(context: Context, session: RelaySession) -> None:
    async for raw in _host_messages(context):
        await session.from_host(raw)


async def _read(context: Context) -> relay_pb2.ClientFrame | None:
    """The next client frame, or None at the end of the stream (the stubs omit EOF)."""
    frame: object = await context.read()
    if frame is grpc.aio.EOF:
        return None
    if not isinstance(frame, relay_pb2.ClientFrame):
        raise TypeError(f"unexpected frame type {type(frame).__name__}")
    return frame


def _identity() -> str:
    """The caller's certificate identity, verified by the auth interceptor for this call."""
    identity = current_identity.get()
    if identity is None:  # the interceptor always sets it; never serve an unknown caller
        raise RuntimeError("Relay.Connect reached without an authenticated caller")
    return identity.uri
