"""One host session bound to one sandboxed instance: both directions, and how it ends.

host -> server: parse strictly (`relay/jsonrpc`), decide (policy), remember request ids, and
forward the canonical serialisation of exactly what was checked, never the bytes as they
arrived. server -> host: the same strict parse, note answered ids, forward. Ids are per
direction, so the server's own requests (sampling, elicitation, roots) and the host's
answers to them pass through; a host answer reaches the server only if it answers a server
request still outstanding in this session (anything else is dropped and on record). When
the server ends, every request still pending gets a JSON-RPC error that says how it ended,
so nothing the host waits for hangs. The server's notifications go through a
`NotificationValve` (`relay/flow.py`): past its rate they are dropped, counted, and on
record once a window, never one audit record (or fsync) each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from stockade.logs import get_logger
from stockade.relay import jsonrpc
from stockade.relay.flow import DEFAULT_NOTIFICATIONS_PER_SECOND, NotificationValve
from stockade.relay.guard import PolicyGuard
from stockade.relay.jsonrpc import InvalidMessage, Kind
from stockade.sandbox.instance import ExitReport, Instance
from stockade.wire.lines import OversizedLine

log = get_logger("stockade.relay")

ToHost = Callable[[bytes], Awaitable[None]]
# A server's own requests (sampling, elicitation) waiting for the host: a bound on memory a
# server can make the relay hold; an honest server has a handful at most.
MAX_OUTSTANDING_SERVER_REQUESTS = 256


class RelaySession:
    def __init__(
        self,
        session_id: str,
        server: str,
        instance: Instance,
        to_host: ToHost,
        *,
        max_message_bytes: int,
        guard: PolicyGuard,
        notifications_per_second: float = DEFAULT_NOTIFICATIONS_PER_SECOND,
    ) -> None:
        self.id = session_id
        self.server = server
        self.instance = instance
        self._to_host = to_host
        self._max = max_message_bytes
        self._guard = guard
        self._valve = NotificationValve(server, notifications_per_second)
        # id key -> (host's id, method, when it was forwarded)
        self._pending: dict[str, tuple[Any, str, float]] = {}
        # id keys of the server's own requests the host was asked and has not answered
        self._asked: set[str] = set()
        self._ended = False
        self._end_lock = asyncio.Lock()

    async def drain(self, timeout: float) -> None:
        """After the host's last message: wait (bounded) for the answers it is owed."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._pending and not self.instance.exited.done():
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.01)

    async def from_host(self, raw: bytes | jsonrpc.Message) -> None:
        """One message from the host: refuse it with a JSON-RPC error, or forward it."""
        try:
            message = await jsonrpc.parse_off_loop(raw, self._max)
        except InvalidMessage as exc:
            await self._to_host(await self._guard.malformed(exc.code, str(exc), exc.request_id))
            return
        if self._ended:
            if message.kind is Kind.REQUEST:
                await self._to_host(self._ended_error(message.id))
            return
        if message.kind is Kind.RESPONSE:
            if message.id_key not in self._asked:
                await self._guard.refuse(
                    message, jsonrpc.INVALID_REQUEST, "a response to no outstanding server request"
                )
                return
            self._asked.discard(message.id_key)
        refusal = await self._guard.check_host(message)
        if refusal is not None:  # never forwarded
            if refusal:
                await self._to_host(refusal)
            return
        if message.kind is Kind.REQUEST:
            self._pending[message.id_key] = (message.id, message.method or "", time.monotonic())
        elif message.method == "notifications/cancelled" and message.params is not None:
            # A cancelled request gets no answer (MCP): nothing is owed for it any more.
            self._pending.pop(jsonrpc.id_key(message.params.get("requestId")), None)
        await self.instance.send(message.raw)

    async def from_server(self, line: bytes | OversizedLine) -> None:
        """One stdout line from the server: forward it (not forwarded: garbage, oversized)."""
        message = await jsonrpc.parse_server_line_off_loop(line, self._max, self.instance.redact)
        if isinstance(line, OversizedLine):  # its request, if it can be told, fails at once
            owed = self._pending.pop(jsonrpc.id_key(jsonrpc.id_from_head(line.head)), None)
            if owed is not None:
                await self._to_host(jsonrpc.answer_too_large(owed[0], line.seen, self._max))
            return
        if message is None:
            return
        if message.kind is Kind.NOTIFICATION and not self._valve.admit():
            await self._guard.server_notifications_dropped()
            return
        if message.kind is Kind.REQUEST:  # the server asks the host (sampling, roots, ...)
            refusal = await self._guard.check_server_request(message)
            if refusal is None and len(self._asked) >= MAX_OUTSTANDING_SERVER_REQUESTS:
                refusal = jsonrpc.error_response(
                    message.id, jsonrpc.INVALID_REQUEST, "too many requests awaiting the host"
                )
            if refusal is not None:
                await self.instance.send(refusal)
                return
            self._asked.add(message.id_key)
        elif message.kind is Kind.RESPONSE:
            owed = self._pending.pop(message.id_key, None)
            if owed is None:  # late (timed out, cancelled), repeated, or made up: not forwarded
                jsonrpc.log_unowed_answer(self.server, message.id)
                return
            _, method, started = owed
            # On record before the host has it (a host that stops reading must not hold the
            # record back), as the request was before it was forwarded.
            self._guard.answered(method, started, message.body)
            filtered = self._guard.filter_list(method, message.body)
            if filtered is not None:
                await self._to_host(jsonrpc.encode(filtered))
                return
        await self._to_host(message.raw)

    async def expire(self, timeout: float) -> None:
        """Requests older than `timeout`: the host gets MCP's -32001, the server a cancel."""
        now = time.monotonic()
        overdue = [key for key, (_, _, began) in self._pending.items() if now - began > timeout]
        for key in overdue:
            request_id, _, _ = self._pending.pop(key)
            await self._to_host(jsonrpc.timed_out(request_id, self.server, timeout))
            if not self._ended:
                await self.instance.send(jsonrpc.cancel(request_id, "timed out in Stockade"))

    async def server_ended(self, report: ExitReport) -> None:
        """Fail every pending request with the reason; later requests fail the same way."""
        async with self._end_lock:
            self._ended = True
            self._report = report
            pending, self._pending = [i for i, _, _ in self._pending.values()], {}
        for request_id in pending:
            await self._to_host(self._ended_error(request_id))

    def _ended_error(self, request_id: Any) -> bytes:
        report: ExitReport = self._report
        return jsonrpc.error_response(
            request_id,
            jsonrpc.SERVER_EXITED,
            f"server {self.server!r} {report.describe()}",
            {"exit_code": report.exit_code, "oom_killed": report.oom_killed},
        )
