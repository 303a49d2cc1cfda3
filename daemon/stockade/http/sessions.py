"""One Streamable HTTP session: a host's `Mcp-Session-Id` bound to a sandboxed instance.

The relay side is the gRPC one, unchanged: a `HostSession` opened by `relay.opening` (a
per-session instance or a seat on a shared one, with the same `PolicyGuard` and audit).
This class only turns its single outgoing stream into HTTP shapes:
- the answer to a POSTed request goes back as that POST's response;
- everything else the server sends (notifications, its own requests) goes to the session's
  GET event stream, numbered, with a bounded replay buffer for `Last-Event-ID`.

A session id is random (128 bits), bound to the caller's identity, and never taken as
authentication: every request is authenticated by its own client certificate first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from stockade.relay import jsonrpc
from stockade.relay.host_session import HostSession
from stockade.relay.jsonrpc import Message
from stockade.wire.rpc import peek_head

REPLAY_EVENTS = 1000  # server->host messages kept for Last-Event-ID resumption
# How often a waiting POST looks whether its client is still there (aiohttp does not cancel
# a handler whose client left: its request id would stay taken until the timeout).
CLIENT_CHECK_SECONDS = 1.0
# What the server says while a POST waits, held for that POST until its client reads it:
# past this many bytes it goes to the session's GET stream instead (bounded there too),
# so a client that does not read its POST cannot make the daemon hold a server's output.
POST_BACKLOG_BYTES = 8 * 1024 * 1024


class RequestInFlight(Exception):
    """The host reused the id of a request that is still waiting for its answer."""


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


class _Post:
    """One POSTed request awaiting its answer: what the server says meanwhile, in order,
    then the answer; `wait` sleeps until either comes (or the session ends)."""

    __slots__ = ("_wake", "answer", "cancelled", "said", "said_bytes")

    def __init__(self) -> None:
        self.said: deque[bytes] = deque()
        self.said_bytes = 0
        self.answer: bytes | None = None
        self.cancelled = False
        self._wake: asyncio.Future[None] | None = None

    def takes(self, raw: bytes) -> bool:
        """Whether this POST still waits for its answer and has room for `raw`."""
        return (
            self.answer is None
            and not self.cancelled
            and self.said_bytes + len(raw) <= POST_BACKLOG_BYTES
        )

    def put(self, raw: bytes) -> None:
        self.said.append(raw)
        self.said_bytes += len(raw)
        self._notify()

    def take(self) -> bytes:
        raw = self.said.popleft()
        self.said_bytes -= len(raw)
        return raw

    def answered(self, raw: bytes) -> None:
        self.answer = raw
        self._notify()

    def cancel(self) -> None:
        self.cancelled = True
        self._notify()

    def _notify(self) -> None:
        _wake_up(self._wake)

    async def wait(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._wake = wake = loop.create_future()
        timer = loop.call_later(seconds, _wake_up, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None


def _wake_up(wake: asyncio.Future[None] | None) -> None:
    if wake is not None and not wake.done():
        wake.set_result(None)


_NOT_AN_ANSWER = object()


def _answer_id(raw: bytes) -> Any:
    """The id a message from the relay answers, or _NOT_AN_ANSWER (a notification, a
    server request). The relay's canonical bytes: usually read from their head."""
    head = peek_head(raw)
    if head is not None:
        return _NOT_AN_ANSWER if head[0] == b"method" else head[1]
    try:
        body = json.loads(raw)
    except ValueError:
        return _NOT_AN_ANSWER
    if isinstance(body, dict) and "method" not in body and ("result" in body or "error" in body):
        return body.get("id")
    return _NOT_AN_ANSWER


class HttpSession:
    def __init__(self, session_id: str, identity: str, server: str) -> None:
        self.id = session_id
        self.identity = identity
        self.server = server
        self.last_used = time.monotonic()
        # The relay side, set by the front as soon as the session is opened.
        self.relay: HostSession | None = None
        # While it is being opened: where what the relay says goes (the start gate's notice
        # that the host waits), the event stream of the POST that opens it. A GET stream
        # cannot be there yet: the host learns the session's id from that POST.
        self.opening: Callable[[bytes], Awaitable[None]] | None = None
        self._waiting: dict[str, _Post] = {}
        # Open POST streams, newest last: what the server says while a request is pending
        # (progress, logging, its own requests) goes to the newest one, as the spec prefers.
        self._posts: list[_Post] = []
        self._events: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_EVENTS)
        self._next_event = 1
        self._changed = asyncio.Condition()
        self._streams = 0
        self.ended = asyncio.Event()

    @property
    def server_gone(self) -> bool:
        """Its sandbox ended: a legacy session reports it, a stateless seat is replaced."""
        return self.relay is not None and self.relay.ended.done()

    def _forward(self) -> Callable[[bytes | Message], Awaitable[None]]:
        if self.relay is None:
            raise RuntimeError("HTTP session used before it was opened")
        return self.relay.from_host

    @property
    def waiting(self) -> set[str]:
        """Ids (as keys) of requests still waiting for their answer."""
        return set(self._waiting)

    @property
    def streams(self) -> int:
        """Open GET event streams (a session with one is in use, however quiet)."""
        return self._streams

    # -- the relay's side ------------------------------------------------------------------

    async def to_host(self, raw: bytes) -> None:
        """Everything the relay sends to this host arrives here."""
        self.last_used = time.monotonic()
        if self.opening is not None:
            await self.opening(raw)
            return
        answers = _answer_id(raw)
        if answers is not _NOT_AN_ANSWER:
            waiting = self._waiting.pop(jsonrpc.id_key(answers), None)
            if waiting is not None and waiting.answer is None and not waiting.cancelled:
                waiting.answered(raw)
                return
        waiting = next((p for p in reversed(self._posts) if p.answer is None), None)
        if waiting is not None and waiting.takes(raw):  # the newest POST still waiting
            waiting.put(raw)
            return
        async with self._changed:
            self._events.append((self._next_event, raw))
            self._next_event += 1
            self._changed.notify_all()

    # -- the host's side -------------------------------------------------------------------

    async def request_stream(
        self, message: Message, timeout: float, gone: Callable[[], bool] | None = None
    ) -> Any:
        """Forward a request; yield (bytes, False) for what the server says meanwhile, then
        (its answer, True): an error answer if none comes within `timeout`. Raises
        CancelledError when the session ends first, or when `gone()` says the client left
        (checked every CLIENT_CHECK_SECONDS: its id is free again, what the server says
        goes to GET). Close it (`aclose`) when done early.

        One future per wait and no task: a call costs a few event-loop turns, not a dozen.
        """
        key = message.id_key
        if key in self._waiting:
            raise RequestInFlight(f"request id {message.id!r} is already waiting for an answer")
        post = _Post()
        self._waiting[key] = post
        self._posts.append(post)
        loop = asyncio.get_running_loop()
        try:
            await self._forward()(message)  # parsed by the front: not parsed again
            deadline = loop.time() + timeout
            while True:
                while post.said:
                    yield post.take(), False
                if post.answer is not None:
                    yield post.answer, True
                    return
                if post.cancelled or (gone is not None and gone()):
                    raise asyncio.CancelledError
                left = deadline - loop.time()
                if left <= 0:
                    late = f"no answer within {timeout:.0f} s"
                    yield jsonrpc.error_response(message.id, jsonrpc.REQUEST_TIMEOUT, late), True
                    return
                await post.wait(min(left, CLIENT_CHECK_SECONDS))
        finally:
            if self._waiting.get(key) is post:
                del self._waiting[key]
            self._posts.remove(post)
            self.last_used = time.monotonic()
            while post.said:  # the stream went away: hand the rest to GET
                await self._to_events(post.take())

    async def _to_events(self, raw: bytes) -> None:
        async with self._changed:
            self._events.append((self._next_event, raw))
            self._next_event += 1
            self._changed.notify_all()

    async def send(self, message: Message) -> None:
        """Forward a notification, or the host's answer to a server request."""
        self.last_used = time.monotonic()
        await self._forward()(message)

    async def events(self, after: int | None) -> Any:
        """Server->host messages as (event id, bytes), replaying those after `after`."""
        self._streams += 1
        cursor = after if after is not None else self._next_event - 1
        try:
            while not self.ended.is_set():
                async with self._changed:
                    pending = [(n, raw) for n, raw in self._events if n > cursor]
                    if not pending:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), 15)
                        yield None  # a keep-alive opportunity
                        continue
                for number, raw in pending:
                    cursor = number
                    yield number, raw
        finally:
            self._streams -= 1

    async def end(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        async with self._changed:
            self._changed.notify_all()
        for waiting in self._waiting.values():
            waiting.cancel()
        if self.relay is not None:
            await self.relay.close(reason)
