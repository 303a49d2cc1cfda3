"""MCP streamable HTTP to a server inside its container, as the same lines stdio gives.

The relay speaks lines to every instance; a server that speaks HTTP gets this adapter in
place of its stdin/stdout. Each message sent is one POST to the server's endpoint (on an
internal network only the daemon and the container share: never a published port). The
answer is either one JSON body or an SSE stream whose `data` events are messages; each
becomes one line. The session id the server assigns (`Mcp-Session-Id`) and the protocol
version it chose are sent back on every later request, as the transport requires.

Bounds: a body or event over `max_line_bytes` is dropped and reported in-band as an
`OversizedLine` (as for stdio). A server not listening yet (it just started) is retried
for `connect_patience` seconds; an HTTP error answers a request with a JSON-RPC error so
nothing waits forever. Once the session is initialized, a GET stream is opened for what
the server says outside any request (list changes, logs); a server without one (405) is
fine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from stockade.wire.lines import OversizedLine

SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
SERVER_ERROR = -32000
QUEUE_LIMIT = 256
IN_FLIGHT = 16  # POSTs at once per instance; more wait (backpressure on the relay)


@dataclass(frozen=True)
class HttpTarget:
    """Where a server listens inside its container, and the network the daemon reaches it on."""

    network: str
    port: int
    path: str

    def url(self, address: str) -> str:
        return f"http://{address}:{self.port}{self.path}"


class HttpChannel:
    """Lines in (POSTed), lines out (JSON answers and SSE events), for one instance."""

    def __init__(self, url: str, max_line_bytes: int, connect_patience: float = 30.0) -> None:
        self._url = url
        self._max = max_line_bytes
        self._patience = connect_patience
        self._queue: asyncio.Queue[bytes | OversizedLine | None] = asyncio.Queue(QUEUE_LIMIT)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=16),
        )
        self._session_id: str | None = None
        self._protocol: str | None = None
        self._streams: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(IN_FLIGHT)
        self._opened = False  # the first POST (initialize) completes before any other
        self._closed = False

    @property
    def url(self) -> str:
        return self._url

    async def send(self, message: bytes) -> None:
        """POST one message; its answer (if any) arrives through `lines`.

        The first message is delivered before `send` returns (it opens the session, whose
        id every later request carries); later ones run concurrently, so that a slow tool
        call does not hold back a cancellation.
        """
        if not self._opened:
            self._opened = True
            await self._deliver(message)
            return
        await self._slots.acquire()
        task = asyncio.create_task(self._deliver(message))
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)
        task.add_done_callback(lambda _task: self._slots.release())

    async def _deliver(self, message: bytes) -> None:
        try:
            response = await self._post(message)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await self._answer_error(message, f"the server's HTTP endpoint failed: {exc}")
            return
        if response.status in {202, 204}:
            response.release()
            if b'"notifications/initialized"' in message:
                self._spawn(self._listen())
            return
        if response.status >= 400:
            response.release()
            await self._answer_error(message, f"the server answered HTTP {response.status}")
            return
        self._session_id = response.headers.get(SESSION_HEADER, self._session_id)
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            self._spawn(self._read_events(response))
            return
        try:
            body = await response.content.read(self._max + 1)
        finally:
            response.release()
        await self._put(body)

    async def lines(self) -> AsyncIterator[bytes | OversizedLine]:
        while (item := await self._queue.get()) is not None:
            yield item

    async def close(self) -> None:
        """End `lines` and the HTTP session (the container's end calls this)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._streams):
            task.cancel()
        await self._session.close()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    # -- internals --------------------------------------------------------------------

    async def _post(self, message: bytes) -> aiohttp.ClientResponse:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        }
        if self._session_id:
            headers[SESSION_HEADER] = self._session_id
        if self._protocol:
            headers[VERSION_HEADER] = self._protocol
        deadline = time.monotonic() + self._patience
        while True:
            try:
                return await self._session.post(self._url, data=message, headers=headers)
            except aiohttp.ClientConnectorError:
                if time.monotonic() > deadline or self._closed:
                    raise
                await asyncio.sleep(0.2)  # it has just started and is not listening yet

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)

    async def _listen(self) -> None:
        """The server's own stream (GET): messages not tied to a request."""
        headers = {"Accept": "text/event-stream"}
        if self._session_id:
            headers[SESSION_HEADER] = self._session_id
        if self._protocol:
            headers[VERSION_HEADER] = self._protocol
        try:
            response = await self._session.get(self._url, headers=headers)
        except (aiohttp.ClientError, OSError):
            return
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if response.status != 200 or kind != "text/event-stream":
            response.release()  # no such stream (405): the server does not offer one
            return
        await self._read_events(response)

    async def _read_events(self, response: aiohttp.ClientResponse) -> None:
        data: list[bytes] = []
        size = 0
        try:
            async for raw in response.content:
                line = raw.rstrip(b"\r\n")
                if not line:  # an event ends
                    if data:
                        await self._put(b"\n".join(data) if size <= self._max else None, size)
                    data, size = [], 0
                elif line.startswith(b"data:"):
                    piece = line[5:].removeprefix(b" ")
                    size += len(piece)
                    if size <= self._max:
                        data.append(piece)
        except ValueError:  # aiohttp's line limit: one event line beyond any sane size
            await self._put(None, size)
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError):
            pass  # the stream broke: what was complete has been delivered
        finally:
            response.release()

    async def _put(self, body: bytes | None, seen: int = 0) -> None:
        if body is None or len(body) > self._max:
            await self._queue.put(OversizedLine(seen=seen or self._max + 1))
            return
        # JSON allows CR/LF only as whitespace between tokens: removing them keeps the
        # message and makes it one line.
        line = body.replace(b"\r", b"").replace(b"\n", b"").strip()
        if not line:
            return
        self._learn_protocol(line)
        await self._queue.put(line)

    def _learn_protocol(self, line: bytes) -> None:
        if self._protocol is not None or b"protocolVersion" not in line:
            return
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            result = message.get("result") if isinstance(message, dict) else None
            if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
                self._protocol = result["protocolVersion"]

    async def _answer_error(self, message: bytes, why: str) -> None:
        """Answer a request the server could not take, so that its caller does not wait."""
        try:
            request: Any = json.loads(message)
        except ValueError:
            return
        if not isinstance(request, dict) or "method" not in request or "id" not in request:
            return
        error = {"code": SERVER_ERROR, "message": why}
        answer = {"jsonrpc": "2.0", "id": request["id"], "error": error}
        await self._queue.put(json.dumps(answer, separators=(",", ":")).encode())
