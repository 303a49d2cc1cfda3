"""The Streamable HTTP front: `https://HOST:PORT/servers/NAME/mcp`, off by default.

aiohttp serves it because it exposes the TLS client certificate of each connection (the
ASGI servers here do not), and the caller's identity is that certificate, exactly as on the
gRPC listeners: TLS is always on and a client certificate from the daemon's CA is required.

Legacy Streamable HTTP (protocol revisions up to 2025-11-25):
- POST one JSON-RPC message. A request is answered in the POST's response
  (`application/json`); a notification or a response gets 202. `initialize` without a
  session opens one and the answer carries `Mcp-Session-Id`.
- GET opens the session's event stream (`text/event-stream`): whatever the server sends
  that is not an answer to a POST. Events are numbered; `Last-Event-ID` replays the rest.
- DELETE ends the session (its sandbox stops).
Checks, each with its status: a bad `Origin` 403, a revoked certificate 403, an unknown
server 404, an unknown session (or one of another identity) 404, a missing session 400,
a bad `Content-Type` 415, an `Accept` without JSON and SSE 406, a body over the limit 413,
an unsupported `MCP-Protocol-Version` 400, malformed JSON-RPC 400 with a JSON-RPC error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.config import Settings
from stockade.http.headers import (
    LEGACY_VERSIONS,
    MODERN_VERSIONS,
    SESSION_HEADER,
    VERSION_HEADER,
    header_mismatch,
    no_modern_stream,
    prefers_json,
)
from stockade.http.sessions import HttpSession, new_session_id
from stockade.logs import get_logger
from stockade.pki.authority import CertificateAuthority
from stockade.pki.identity import IdentityError, peer_from_pem
from stockade.pki.server_cert import server_certificate
from stockade.pki.tokens import TokenError, TokenIssuer
from stockade.registry import Registry, UnknownServer
from stockade.relay import jsonrpc
from stockade.relay.jsonrpc import InvalidMessage, Kind
from stockade.relay.opening import OpenRefused, Refusal, SessionOpener

log = get_logger("stockade.http")

REQUEST_TIMEOUT_SECONDS = 300.0
CREDENTIAL = "stockade.credential"  # request key: "cert:SERIAL" or "token:ID"
HTTP_REFUSAL: dict[Refusal, type[web.HTTPException]] = {
    Refusal.UNKNOWN_SERVER: web.HTTPNotFound,
    Refusal.DENIED: web.HTTPForbidden,
    Refusal.QUOTA: web.HTTPTooManyRequests,
    Refusal.UNAVAILABLE: web.HTTPServiceUnavailable,
}


class HttpFront:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        opener: SessionOpener,
        *,
        audit: AuditLog,
        authority: CertificateAuthority,
        tokens: TokenIssuer,
    ) -> None:
        self._tokens = tokens
        self._settings = settings
        self._registry = registry
        self._opener = opener
        self._audit = audit
        self._authority = authority
        self._sessions: dict[str, HttpSession] = {}
        # 2026-07-28 requests carry no session: one sandbox per caller x server serves them.
        self._stateless: dict[tuple[str, str], HttpSession] = {}
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        key_path, cert_path = server_certificate(self._settings, self._authority)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_path, key_path)
        context.load_verify_locations(cadata=self._authority.ca_pem.decode())
        # A certificate is checked when offered; without one, a Stockade bearer token is
        # required (see _identity): never neither.
        context.verify_mode = ssl.CERT_OPTIONAL
        return context

    async def start(self) -> str:
        assert self._settings.http_address is not None  # noqa: S101 - checked by the caller
        app = web.Application(
            client_max_size=self._settings.max_message_bytes, middlewares=[self._audit_refusals]
        )
        app.router.add_route("POST", "/servers/{name}/mcp", self._post)
        app.router.add_route("GET", "/servers/{name}/mcp", self._get)
        app.router.add_route("DELETE", "/servers/{name}/mcp", self._delete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, _, port = self._settings.http_address.rpartition(":")
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), ssl_context=self._tls())
        await site.start()
        self._reaper = asyncio.create_task(self._reap_idle(), name="http-idle")
        return f"https://{self._settings.http_address}/servers/NAME/mcp"

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for session in [*self._sessions.values(), *self._stateless.values()]:
            await self._end(session, "daemon stopping")
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _audit_refusals(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every refusal of a caller (401, 403) is an audit event, on disk before the answer."""
        try:
            return await handler(request)
        except (web.HTTPUnauthorized, web.HTTPForbidden) as refusal:
            if getattr(refusal, "audited", False):  # the session opener said it already
                raise
            with contextlib.suppress(AuditUnavailable):  # refused either way
                await self._audit.record(
                    "access",
                    durable=True,
                    outcome="deny",
                    action=f"{request.method} {request.path}",
                    reason=refusal.text,
                    transport="http",
                    peer=request.remote,
                )
            raise

    async def _reap_idle(self) -> None:
        idle = self._settings.http_session_idle_seconds
        while True:
            await asyncio.sleep(min(30.0, idle / 2))
            now = time.monotonic()
            for session in [*self._sessions.values(), *self._stateless.values()]:
                if session.streams == 0 and now - session.last_used > idle:
                    await self._end(session, "idle")

    # -- checks -------------------------------------------------------------------------

    def _identity(self, request: web.Request) -> str:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if not der:
            return self._token_identity(request)
        try:
            peer = peer_from_pem(ssl.DER_cert_to_PEM_cert(der).encode())
        except (IdentityError, ValueError) as exc:
            raise web.HTTPUnauthorized(text=f"unusable client certificate: {exc}") from None
        if peer.serial in self._authority.revoked:
            raise web.HTTPForbidden(text=f"certificate {peer.serial} has been revoked")
        request[CREDENTIAL] = f"cert:{peer.serial}"
        return peer.identity.uri

    def _token_identity(self, request: web.Request) -> str:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="stockade"'}
        if scheme.lower() != "bearer" or not token:
            raise web.HTTPUnauthorized(
                text="present a client certificate or a Stockade bearer token "
                "(stockade token issue)",
                headers=challenge,
            )
        try:
            identity, token_id = self._tokens.verify(token.strip(), request.match_info["name"])
            request[CREDENTIAL] = f"token:{token_id}"
            return identity
        except TokenError as exc:
            challenge["WWW-Authenticate"] += ', error="invalid_token"'
            raise web.HTTPUnauthorized(text=str(exc), headers=challenge) from None

    def _common(self, request: web.Request) -> tuple[str, str]:
        """(identity, server) after the checks every method shares."""
        identity = self._identity(request)
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self._settings.http_allowed_origins:
            raise web.HTTPForbidden(text=f"origin {origin!r} is not allowed")
        version = request.headers.get(VERSION_HEADER)
        if version is not None and version not in LEGACY_VERSIONS | MODERN_VERSIONS:
            raise web.HTTPBadRequest(text=f"unsupported {VERSION_HEADER}: {version}")
        name = request.match_info["name"]
        try:
            self._registry.get(name)
        except UnknownServer as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        return identity, name

    def _session(self, request: web.Request, identity: str, server: str) -> HttpSession:
        session_id = request.headers.get(SESSION_HEADER)
        if not session_id:
            raise web.HTTPBadRequest(text=f"missing {SESSION_HEADER}; start with initialize")
        session = self._sessions.get(session_id)
        # Another identity's session id is "not found" too: ids are not credentials.
        if session is None or session.identity != identity or session.server != server:
            raise web.HTTPNotFound(text="no such session (it ended, or never existed)")
        return session

    # -- methods ------------------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        identity, server = self._common(request)
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(text="Content-Type must be application/json")
        accept = request.headers.get("Accept", "")
        if "application/json" not in accept or "text/event-stream" not in accept:
            raise web.HTTPNotAcceptable(
                text="Accept must list application/json and text/event-stream"
            )
        raw = await request.read()
        try:
            message = jsonrpc.parse(raw, self._settings.max_message_bytes)
        except InvalidMessage as exc:
            body = jsonrpc.error_response(exc.request_id, exc.code, str(exc))
            return web.Response(body=body, status=400, content_type="application/json")
        # A request whose POST opens a session answers with events from the start if the
        # host must wait for a sandbox: it is told so at once, not after the wait.
        early = _OpeningStream(request) if message.kind is Kind.REQUEST else None
        try:
            if request.headers.get(VERSION_HEADER) in MODERN_VERSIONS:
                mismatch = header_mismatch(request, message)
                if mismatch is not None:
                    body = jsonrpc.error_response(message.id, jsonrpc.HEADER_MISMATCH, mismatch)
                    return web.Response(body=body, status=400, content_type="application/json")
                session = await self._stateless_seat(request, identity, server, early)
            elif request.headers.get(SESSION_HEADER) is None and message.method == "initialize":
                session = await self._open(request, identity, server, early=early)
            else:
                session = self._session(request, identity, server)
        except web.HTTPException as refused:
            if early is None or early.response is None:
                raise
            # The host was told it waits: its answer is already an event stream.
            code = jsonrpc.POLICY_DENIED if refused.status == 403 else jsonrpc.SERVER_UNAVAILABLE
            await early.send(jsonrpc.error_response(message.id, code, refused.text or ""))
            return early.response
        if message.kind is not Kind.REQUEST:
            await session.send(message)
            return web.Response(status=202)
        headers = {"Cache-Control": "no-store"}
        if message.method == "initialize":
            headers[SESSION_HEADER] = session.id
        if message.id_key in session.waiting:
            raise web.HTTPConflict(text=f"request id {message.id!r} is already in flight")
        started = early.response if early is not None else None
        return await self._answer(request, session, message, headers, started)

    async def _answer(
        self,
        request: web.Request,
        session: HttpSession,
        message: jsonrpc.Message,
        headers: dict[str, str],
        started: web.StreamResponse | None = None,
    ) -> web.StreamResponse:
        """Forward a request and answer the POST with what the server says (in `started`,
        the POST's event stream, if it has begun)."""
        # An answer that comes with nothing before it goes back as plain JSON when the client
        # prefers it (the spec lets the server choose): the connection stays reusable, where
        # a client closing an event stream would cost a new TLS handshake per call.
        # Progress, logs or a server request before the answer make it an event stream.
        response = started
        json_first = prefers_json(request.headers.get("Accept", ""))
        transport = request.transport
        stream = session.request_stream(
            message,
            REQUEST_TIMEOUT_SECONDS,
            gone=lambda: transport is None or transport.is_closing(),
        )
        async with contextlib.aclosing(stream):  # ended here, not by the garbage collector
            async for raw, is_answer in stream:
                if response is None:
                    if is_answer and json_first:
                        return web.Response(
                            body=raw, content_type="application/json", headers=headers
                        )
                    response = web.StreamResponse(
                        headers={**headers, "Content-Type": "text/event-stream"}
                    )
                    await response.prepare(request)
                await response.write(b"event: message\ndata: %s\n\n" % raw)
        assert response is not None  # noqa: S101 - the stream always ends with the answer
        return response

    async def _get(self, request: web.Request) -> web.StreamResponse:
        identity, server = self._common(request)
        no_modern_stream(request)
        if "text/event-stream" not in request.headers.get("Accept", ""):
            raise web.HTTPNotAcceptable(text="Accept must list text/event-stream")
        session = self._session(request, identity, server)
        last = request.headers.get("Last-Event-ID")
        after = int(last) if last and last.isdigit() else None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        async for event in session.events(after):
            if event is None:
                await response.write(b": keep-alive\n\n")
                continue
            number, raw = event
            await response.write(b"id: %d\nevent: message\ndata: %s\n\n" % (number, raw))
        return response

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        identity, server = self._common(request)
        no_modern_stream(request)
        session = self._session(request, identity, server)
        await self._end(session, "host ended it (DELETE)")
        return web.Response(status=200)

    # -- sessions -----------------------------------------------------------------------

    async def _stateless_seat(
        self, request: web.Request, identity: str, server: str, early: _OpeningStream | None
    ) -> HttpSession:
        """The caller's sandbox for session-less (2026-07-28) requests, opened on first use."""
        seat = self._stateless.get((identity, server))
        if seat is not None and seat.server_gone:  # no session to keep: start a fresh sandbox
            await self._end(seat, "its sandbox ended")
            seat = None
        if seat is None or seat.ended.is_set():
            seat = await self._open(request, identity, server, register=False, early=early)
            self._stateless[(identity, server)] = seat
        return seat

    async def _make_room(self, identity: str) -> None:
        """At its HTTP session quota, an identity's least recently used sessions end.

        Clients often never DELETE a session, and keep its event stream open (the
        conformance suite opens one per scenario), so refusing the next one would punish
        honest use; ending the caller's own least recently used session (one with no
        request in flight) keeps the same bound and only ever costs that caller.
        """
        mine = [s for s in self._sessions.values() if s.identity == identity]
        idle = sorted((s for s in mine if not s.waiting), key=lambda s: s.last_used)
        excess = len(mine) - self._settings.quota_http_sessions_per_identity + 1
        for session in idle[: max(0, excess)]:
            await self._end(session, "its identity opened another past its HTTP session quota")

    async def _open(
        self,
        request: web.Request,
        identity: str,
        server: str,
        *,
        register: bool = True,
        early: _OpeningStream | None = None,
    ) -> HttpSession:
        if register:
            await self._make_room(identity)
        session = HttpSession(new_session_id(), identity, server)
        if early is not None:
            early.headers = {SESSION_HEADER: session.id} if register else {}
            session.opening = early.send
        try:
            session.relay = await self._opener.open(
                server,
                identity,
                session.to_host,
                transport="http",
                peer=request.remote,
                credential=request.get(CREDENTIAL, ""),
                session_id=session.id,
            )
            session.relay.revoked.add_done_callback(
                lambda done: self._spawn_end(session, done.result())
            )
        except OpenRefused as exc:
            answer = HTTP_REFUSAL[exc.refusal](text=str(exc))
            answer.audited = True  # type: ignore[attr-defined]  # read by _audit_refusals
            raise answer from None
        finally:
            session.opening = None
        if register:
            self._sessions[session.id] = session
        return session

    def _spawn_end(self, session: HttpSession, why: str) -> None:
        """End a session from a callback (its credential was revoked); kept until done."""
        task = asyncio.create_task(self._end(session, why))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _end(self, session: HttpSession, why: str) -> None:
        stateless = self._stateless.get((session.identity, session.server)) is session
        if self._sessions.pop(session.id, None) is None and not stateless:
            return
        if stateless:
            del self._stateless[(session.identity, session.server)]
        await session.end(why)


class _OpeningStream:
    """The event stream of a POST whose session is still being opened, begun by the first
    thing the relay says meanwhile (the start gate's notice that the host waits for a
    sandbox): the host hears it at once, and the answer follows on the same stream."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.headers: dict[str, str] = {}  # the session's id, once it has one
        self.response: web.StreamResponse | None = None

    async def send(self, raw: bytes) -> None:
        if self.response is None:
            self.response = web.StreamResponse(
                headers={
                    **self.headers,
                    "Cache-Control": "no-store",
                    "Content-Type": "text/event-stream",
                }
            )
            await self.response.prepare(self._request)
        await self.response.write(b"event: message\ndata: %s\n\n" % raw)
