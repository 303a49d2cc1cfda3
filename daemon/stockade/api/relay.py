"""The Relay servicer: `Relay.Connect` carries one MCP session as opaque JSON-RPC frames.

The first client frame opens the session (`open`: which server) through the transport-neutral
`relay.opening.SessionOpener`; the daemon answers `opened`, then maps frames onto that
session both ways. The session ends when the host ends its stream (the container is stopped)
or when the server ends (pending requests get errors, then a `closed` frame says why).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from stockade.api.auth import current_credential, current_identity
from stockade.api.streams import StreamBudget
from stockade.logs import get_logger, log_context
from stockade.relay.host_session import HostSession
from stockade.relay.opening import OpenRefused, Refusal, SessionOpener
from stockade.v1 import relay_pb2, relay_pb2_grpc

log = get_logger("stockade.relay")

Context = grpc.aio.ServicerContext[relay_pb2.ClientFrame, relay_pb2.ServerFrame]

GRPC_STATUS = {
    Refusal.UNKNOWN_SERVER: grpc.StatusCode.NOT_FOUND,
    Refusal.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.QUOTA: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class RelayServicer(relay_pb2_grpc.RelayServicer):
    def __init__(
        self,
        opener: SessionOpener,
        *,
        drain_seconds: float = 30.0,
        streams: StreamBudget | None = None,
        max_message_bytes: int = 0,
    ) -> None:
        self._opener = opener
        self._max_message_bytes = max_message_bytes
        self._drain_seconds = drain_seconds
        self._streams = streams or StreamBudget(256)

    # The read/write style (context.read/context.write) lets two tasks share one stream; the
    # stubs only know the generator style, hence the override note.
    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[relay_pb2.ClientFrame],
        context: Context,
    ) -> None:
        if not self._streams.take():
            await _refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, self._streams.refusal(), "quota"
            )
        try:
            await self._connect(context)
        finally:
            self._streams.give_back()

    async def _connect(self, context: Context) -> None:
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
        host = _HostStream(context)
        try:
            session = await self._opener.open(
                first.open.server,
                _identity(),
                host.message,
                transport="grpc",
                peer=context.peer(),
                credential=current_credential.get() or "",
            )
        except OpenRefused as exc:
            await _refuse(context, GRPC_STATUS[exc.refusal], str(exc), exc.refusal.name.lower())
        with log_context(session=session.id, server=first.open.server):
            await self._serve(context, host, session)

    async def _serve(self, context: Context, host: _HostStream, session: HostSession) -> None:
        """Pump the host's frames until it ends its stream or the server ends."""
        host_task: asyncio.Task[None] | None = None
        reason = "the stream broke"
        try:
            await host.frame(
                relay_pb2.ServerFrame(
                    opened=relay_pb2.SessionOpened(session_id=session.id, instance=session.instance)
                )
            )
            host_task = asyncio.create_task(_pump_host(context, session))
            waiting: set[asyncio.Future[Any]] = {host_task, session.ended, session.revoked}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if session.revoked.done():
                reason = session.revoked.result()
                await _refuse(context, grpc.StatusCode.UNAUTHENTICATED, reason, "revoked")
            if session.ended.done():
                report = session.ended.result()
                reason = f"server {session.record.server!r} {report.describe()}"
                await host.frame(
                    relay_pb2.ServerFrame(
                        closed=relay_pb2.SessionClosed(reason=reason, exit_code=report.exit_code)
                    )
                )
            else:
                host_task.result()  # re-raise a protocol error from the host side
                # The host sent its last message; deliver the answers it still awaits.
                await session.drain(self._drain_seconds)
                reason = "host ended its stream"
        finally:
            if host_task is not None and not host_task.done():
                host_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await host_task
            await session.close(reason)


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


async def _pump_host(context: Context, session: HostSession) -> None:
    async for raw in _host_messages(context):
        await session.from_host(raw)


# Trailing metadata on every refusal the daemon itself makes: a client can then tell the
# daemon's reason (quota, audit unavailable, unknown server, ...) from a transport failure,
# which gRPC reports with the same status codes.
REFUSAL_KEY = "stockade-refusal"


async def _refuse(context: Context, code: grpc.StatusCode, message: str, kind: str) -> None:
    await context.abort(code, message, trailing_metadata=((REFUSAL_KEY, kind),))


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
