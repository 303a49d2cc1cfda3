"""Many host sessions over one shared instance (servers registered with `shared: true`).

An MCP stdio server expects one client. So the router is that client: it performs the
`initialize` handshake with the server once, caches the result, and answers each session's
`initialize` from the cache (each session's `notifications/initialized` is dropped).

Request ids are rewritten to ids unique on the instance (`stk-N`) and restored on the way
back, so answers never cross between sessions. Progress tokens and cancellations are
rewritten the same way. A shared server's own requests to a host (sampling, elicitation,
roots) cannot be attributed to one session, so they are refused with a JSON-RPC error to
the server, and host responses are never forwarded (dropped, on record).

Server notifications never broadcast what one host caused to another:
- progress goes to the session that owns the token;
- `notifications/resources/updated` goes to the sessions that subscribed to that URI and
  that the policy lets read it;
- `notifications/*/list_changed` goes to every session (it says nothing of any host);
- anything else (`notifications/message` logs above all) goes to the one session with
  requests in flight, and is dropped when that is not exactly one session: a log line the
  server wrote while serving two hosts cannot be told apart, and one written while serving
  none belongs to no host.
`logging/setLevel` is refused on a shared server: one level serves every host, so one
host must not set it for the others (per-session levels would need the server to log per
request, which stdio servers do not).

Notifications go through one `NotificationValve` for the instance (`relay/flow.py`): past
its rate they are dropped and counted in the daemon's log (no audit record: a shared
server's notification belongs to no one host).

While the instance is down (crashed, restarting), pending requests fail with an error that
says how it ended, and new requests fail at once with SERVER_UNAVAILABLE: no hangs.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from stockade.logs import get_logger
from stockade.relay import jsonrpc
from stockade.relay.flow import DEFAULT_NOTIFICATIONS_PER_SECOND, NotificationValve
from stockade.relay.guard import PolicyGuard
from stockade.relay.jsonrpc import InvalidMessage, Kind, Message
from stockade.relay.outbox import Outbox
from stockade.relay.session import ToHost
from stockade.sandbox.instance import ExitReport, Instance
from stockade.secrets.redact import Redactor
from stockade.wire.lines import OversizedLine

log = get_logger("stockade.shared")

HANDSHAKE_PROTOCOL_VERSION = "2025-06-18"
# What one session may make the router hold: progress tokens live as long as their request,
# and subscriptions are bounded in number and size.
MAX_TOKEN_CHARS = 256
MAX_SUBSCRIPTIONS = 256
MAX_URI_CHARS = 2048
HANDSHAKE_TIMEOUT = 60.0
# What may wait for one host of a shared server, in messages of the largest size: past it,
# a host that does not read loses what comes next, and nobody else waits for it.
OUTBOX_MESSAGES = 2


class HandshakeFailed(Exception):
    """The shared server did not complete `initialize`."""


@dataclass(eq=False)
class SharedSession:
    id: str
    to_host: ToHost
    guard: PolicyGuard
    # original id key -> rewritten id, to translate this session's cancellations
    outstanding: dict[str, str] = field(default_factory=dict)
    subscriptions: set[str] = field(default_factory=set)  # resource URIs it subscribed to
    active_at: float = 0.0  # when a request of it last started or ended (for attribution)
    outbox: Outbox | None = None  # what goes to this host, queued for it alone


class SharedRouter:
    def __init__(
        self,
        server: str,
        max_message_bytes: int,
        notifications_per_second: float = DEFAULT_NOTIFICATIONS_PER_SECOND,
    ) -> None:
        self.server = server
        self._max = max_message_bytes
        self._valve = NotificationValve(server, notifications_per_second)
        self._instance: Instance | None = None
        self._last_exit: ExitReport | None = None
        self.init_result: dict[str, Any] | None = None
        self._sessions: set[SharedSession] = set()
        # rewritten id -> (session, the host's id, method, when it was forwarded)
        self._routes: dict[str, tuple[SharedSession, Any, str, float]] = {}
        self._tokens: dict[str, tuple[SharedSession, Any]] = {}  # rewritten token -> owner
        self._route_tokens: dict[str, str] = {}  # rewritten id -> its rewritten token
        self._handshake: asyncio.Future[dict[str, Any]] | None = None
        self._seq = itertools.count(1)
        self.unattributed = 0  # notifications dropped: no single session they belong to

    # -- the instance ----------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._instance is not None and self._instance.alive and self.init_result is not None

    async def attach(self, instance: Instance) -> dict[str, Any]:
        """Bind a freshly started instance and perform the one `initialize` handshake."""
        self._instance = instance
        instance.bind(self._from_server)
        loop = asyncio.get_running_loop()
        self._handshake = loop.create_future()
        request = {
            "jsonrpc": "2.0",
            "id": "stk-handshake",
            "method": "initialize",
            "params": {
                "protocolVersion": HANDSHAKE_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "stockade-shared", "version": "1"},
            },
        }
        await instance.send(jsonrpc.encode(request))
        waiting: set[asyncio.Future[Any]] = {self._handshake, instance.exited}
        await asyncio.wait(waiting, timeout=HANDSHAKE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if not self._handshake.done():
            raise HandshakeFailed(f"shared server {self.server!r} did not answer initialize")
        result = self._handshake.result()
        await instance.send(
            jsonrpc.encode({"jsonrpc": "2.0", "method": "notifications/initialized"})
        )
        self.init_result = result
        return result

    def adopt(self, instance: Instance, init_result: dict[str, Any]) -> None:
        """Take over an instance a previous daemon run initialised (daemon restart)."""
        self._instance = instance
        self.init_result = init_result
        instance.bind(self._from_server)

    def redactor(self) -> Redactor | None:
        """The granted secrets of the instance serving now (for audit records)."""
        instance = self._instance
        return instance.redaction.redactor if instance and instance.redaction else None

    async def instance_ended(self, report: ExitReport) -> None:
        """Fail every pending request of every session with how the server ended."""
        self._last_exit = report
        self._instance = None
        routes, self._routes = self._routes, {}
        self._tokens.clear()
        self._route_tokens.clear()
        for session, original_id, _, _ in routes.values():
            session.outstanding.clear()
            await session.to_host(
                jsonrpc.error_response(
                    original_id,
                    jsonrpc.SERVER_EXITED,
                    f"server {self.server!r} {report.describe()}; it is being restarted",
                    {"exit_code": report.exit_code, "oom_killed": report.oom_killed},
                )
            )

    # -- sessions --------------------------------------------------------------------

    def join(self, session_id: str, to_host: ToHost, guard: PolicyGuard) -> SharedSession:
        # The instance's one reader never waits for one host: each has its own queue.
        outbox = Outbox(session_id, to_host, OUTBOX_MESSAGES * self._max)
        session = SharedSession(session_id, outbox.put, guard, outbox=outbox)
        self._sessions.add(session)
        return session

    async def drain(self, session: SharedSession, timeout: float) -> None:
        """After a host's last message: wait (bounded) for the answers it is owed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while session.outstanding and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if session.outbox is not None:
            await session.outbox.flushed(max(0.0, deadline - loop.time()))

    def leave(self, session: SharedSession) -> None:
        if session.outbox is not None:
            session.outbox.close()
        self._sessions.discard(session)
        for key in [k for k, (owner, *_) in self._routes.items() if owner is session]:
            self._end_route(key)
        for key in [k for k, (owner, _) in self._tokens.items() if owner is session]:
            del self._tokens[key]

    async def from_host(self, session: SharedSession, raw: bytes | Message) -> None:
        message = await self._screen(session, raw)
        if message is None:
            return  # refused and answered
        if message.method == "notifications/initialized":
            if message.kind is Kind.REQUEST:
                await session.to_host(
                    jsonrpc.error_response(
                        message.id,
                        jsonrpc.INVALID_REQUEST,
                        "notifications/initialized is a notification: it takes no id",
                    )
                )
            return  # the host's half of a handshake done once already
        if message.kind is Kind.REQUEST and not self.up:
            await session.to_host(self._unavailable(message.id))
        elif message.method == "initialize":
            body = {"jsonrpc": "2.0", "id": message.id, "result": self.init_result}
            await session.to_host(
                jsonrpc.encode(session.guard.filter_list("initialize", body) or body)
            )
        elif message.kind is Kind.REQUEST and (too_much := self._too_much(session, message)):
            await session.to_host(
                jsonrpc.error_response(message.id, jsonrpc.INVALID_REQUEST, too_much)
            )
        elif self._instance is not None:  # (a notification while down has nowhere to go)
            payload = self._rewrite_from_host(session, message)
            if payload:
                await self._instance.send(payload)

    async def _screen(self, session: SharedSession, raw: bytes | Message) -> Message | None:
        """The message if it may go on; None when it was refused (and answered) or is moot."""
        try:
            message = await jsonrpc.parse_off_loop(raw, self._max)
        except InvalidMessage as exc:
            await session.to_host(await session.guard.malformed(exc.code, str(exc), exc.request_id))
            return None
        if message.kind is Kind.RESPONSE:  # shared servers never get to ask a host anything
            await session.guard.refuse(
                message, jsonrpc.INVALID_REQUEST, "a response to no outstanding server request"
            )
            return None
        if message.method == "logging/setLevel":
            answer = await session.guard.refuse(
                message,
                jsonrpc.METHOD_NOT_FOUND,
                "logging/setLevel is not available on a shared server: one level serves every host",
            )
            if answer:
                await session.to_host(answer)
            return None
        refusal = await session.guard.check_host(message)
        if refusal is not None:  # never forwarded
            if refusal:
                await session.to_host(refusal)
            return None
        return message

    def _end_route(self, key: str) -> tuple[SharedSession, Any, str, float] | None:
        """A request is over (answered, cancelled, timed out): forget it and its token."""
        route = self._routes.pop(key, None)
        token = self._route_tokens.pop(key, None)
        if token is not None:
            self._tokens.pop(token, None)
        if route is not None:
            route[0].active_at = time.monotonic()
        return route

    def _too_much(self, session: SharedSession, message: Message) -> str | None:
        """Why a request would make the router hold too much for this session, if it would."""
        params = message.params or {}
        meta = params.get("_meta")
        if (
            isinstance(meta, dict)
            and len(jsonrpc.id_key(meta.get("progressToken"))) > MAX_TOKEN_CHARS
        ):
            return f"progressToken is over {MAX_TOKEN_CHARS} characters"
        uri = params.get("uri")
        if message.method == "resources/subscribe" and isinstance(uri, str):
            if len(uri) > MAX_URI_CHARS:
                return f"uri is over {MAX_URI_CHARS} characters"
            if uri not in session.subscriptions and len(session.subscriptions) >= MAX_SUBSCRIPTIONS:
                return f"this session has {MAX_SUBSCRIPTIONS} subscriptions, the most it may"
        return None

    def _rewrite_from_host(self, session: SharedSession, message: Message) -> bytes:
        body = dict(message.body)
        if message.kind is Kind.REQUEST:
            rewritten = f"stk-{next(self._seq)}"
            self._routes[jsonrpc.id_key(rewritten)] = (
                session,
                message.id,
                message.method or "",
                time.monotonic(),
            )
            session.outstanding[message.id_key] = rewritten
            session.active_at = time.monotonic()
            body["id"] = rewritten
            params = body.get("params")
            meta = params.get("_meta") if isinstance(params, dict) else None
            if isinstance(meta, dict) and "progressToken" in meta:
                token = f"stk-progress-{next(self._seq)}"
                self._tokens[jsonrpc.id_key(token)] = (session, meta["progressToken"])
                self._route_tokens[jsonrpc.id_key(rewritten)] = jsonrpc.id_key(token)
                assert isinstance(params, dict)  # noqa: S101 - meta was found inside it
                body["params"] = {**params, "_meta": {**meta, "progressToken": token}}
            uri = params.get("uri") if isinstance(params, dict) else None
            if message.method == "resources/subscribe" and isinstance(uri, str):
                session.subscriptions.add(uri)
            elif message.method == "resources/unsubscribe" and isinstance(uri, str):
                session.subscriptions.discard(uri)
        elif message.method == "notifications/cancelled" and message.params is not None:
            original = jsonrpc.id_key(message.params.get("requestId"))
            rewritten_id = session.outstanding.pop(original, None)
            if rewritten_id is None:
                return b""  # not one of this session's requests: never cancel another's
            self._end_route(jsonrpc.id_key(rewritten_id))  # no answer is owed now
            body["params"] = {**message.params, "requestId": rewritten_id}
        return jsonrpc.encode(body)

    # -- the server's output ---------------------------------------------------------

    async def _from_server(self, line: bytes | OversizedLine) -> None:
        redact = self._instance.redact if self._instance is not None else None
        message = await jsonrpc.parse_server_line_off_loop(line, self._max, redact)
        if isinstance(line, OversizedLine):  # its request, if it can be told, fails at once
            route = self._end_route(jsonrpc.id_key(jsonrpc.id_from_head(line.head)))
            if route is not None:
                session, original_id, _, _ = route
                session.outstanding.pop(jsonrpc.id_key(original_id), None)
                await session.to_host(jsonrpc.answer_too_large(original_id, line.seen, self._max))
            return
        if message is None:
            return
        if message.kind is Kind.RESPONSE:
            await self._route_response(message)
        elif message.kind is Kind.REQUEST:
            await self._refuse_server_request(message)
        else:
            await self._route_notification(message)

    async def _route_response(self, message: Message) -> None:
        if message.id == "stk-handshake" and self._handshake and not self._handshake.done():
            if "result" in message.body:
                self._handshake.set_result(message.body["result"])
            else:
                self._handshake.set_exception(HandshakeFailed(str(message.body.get("error"))))
            return
        route = self._end_route(message.id_key)
        if route is None:  # its session has left, it timed out, or the id is made up
            jsonrpc.log_unowed_answer(self.server, message.id)
            return
        session, original_id, method, started = route
        session.outstanding.pop(jsonrpc.id_key(original_id), None)
        session.guard.answered(method, started, message.body)
        body = {**message.body, "id": original_id}
        await session.to_host(jsonrpc.encode(session.guard.filter_list(method, body) or body))

    async def _refuse_server_request(self, message: Message) -> None:
        if self._instance is None:
            return
        error = jsonrpc.error_response(
            message.id,
            jsonrpc.METHOD_NOT_FOUND,
            f"{message.method} is not available to a shared server (it serves many hosts)",
        )
        await self._instance.send(error)

    async def _route_notification(self, message: Message) -> None:
        if not self._valve.admit():
            return  # counted and logged by the valve
        params = message.params or {}
        if message.method == "notifications/progress" and "progressToken" in params:
            owner = self._tokens.get(jsonrpc.id_key(params["progressToken"]))
            if owner is not None:
                session, token = owner
                body = {**message.body, "params": {**params, "progressToken": token}}
                await session.to_host(jsonrpc.encode(body))
            return
        if message.method == "notifications/cancelled":
            return  # the server cancelling its own requests: none reached a host
        for session in self._recipients(message.method or "", params):
            await session.to_host(message.raw)

    def _recipients(self, method: str, params: dict[str, Any]) -> list[SharedSession]:
        """Who may hear a server notification (see the module docstring)."""
        if method.startswith("notifications/") and method.endswith("/list_changed"):
            return list(self._sessions)
        if method == "notifications/resources/updated":
            uri = params.get("uri")
            return [
                s
                for s in self._sessions
                if isinstance(uri, str) and uri in s.subscriptions and s.guard.may_read(uri)
            ]
        busy = [s for s in self._sessions if s.outstanding]
        if len(busy) != 1 or self._others_active_since(busy[0]):
            self.unattributed += 1
            return []
        return busy

    def _others_active_since(self, session: SharedSession) -> bool:
        """Whether another session had a request start or end while this one's oldest was
        in flight: then a log line of that time may be about the other one."""
        began = min(
            (started for owner, _, _, started in self._routes.values() if owner is session),
            default=0.0,
        )
        return any(s.active_at >= began for s in self._sessions if s is not session)

    async def expire(self, session: SharedSession, timeout: float) -> None:
        """This session's requests older than `timeout`: -32001 to it, a cancel to the server."""
        now = time.monotonic()
        overdue = [
            key
            for key, (owner, _, _, began) in self._routes.items()
            if owner is session and now - began > timeout
        ]
        for key in overdue:
            route = self._end_route(key)
            assert route is not None  # noqa: S101 - listed just above
            _, original_id, _, _ = route
            rewritten = session.outstanding.pop(jsonrpc.id_key(original_id), None)
            await session.to_host(jsonrpc.timed_out(original_id, self.server, timeout))
            if self._instance is not None and rewritten is not None:
                await self._instance.send(jsonrpc.cancel(rewritten, "timed out in Stockade"))

    def _unavailable(self, request_id: Any) -> bytes:
        why = f" (last {self._last_exit.describe()})" if self._last_exit else ""
        return jsonrpc.error_response(
            request_id,
            jsonrpc.SERVER_UNAVAILABLE,
            f"shared server {self.server!r} is restarting{why}; try again shortly",
        )
