"""Opening a host session: one way in for every transport (gRPC, HTTP).

The steps, in order, in one place:
1. look the server up (an unknown one is refused, and that is audited);
2. take an instance: a per-session one (warm pool first) or a seat on the shared router;
3. bind a `PolicyGuard` to the audit log and to the instance's redactor;
4. record `session.open` durably (if the audit log cannot be written, the session is
   refused and its instance given back), count it, list it for `stockade session ls`.
The transport then only maps its frames or requests onto the returned `HostSession`
(`from_host`, `ended`, `drain`, `close`). Closing releases the instance, audits
`session.close` and uncounts it, whatever the transport.

The supervisor is reached through `InstanceSource`, an interface declared here, so that the
relay never imports the supervisor: the supervisor sits above the relay and provides it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from enum import Enum
from typing import NoReturn, Protocol

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.logs import get_logger, log_context
from stockade.metrics import SESSIONS
from stockade.policy.store import PolicyStore
from stockade.registry import Registry, UnknownServer
from stockade.relay import jsonrpc
from stockade.relay.admission import Admission, Quotas, Refused
from stockade.relay.budget import HostBudget, capped
from stockade.relay.digest import Digest
from stockade.relay.flow import DEFAULT_NOTIFICATIONS_PER_SECOND
from stockade.relay.guard import PolicyGuard
from stockade.relay.host_session import (
    SHARED,
    HostSession,
    SessionRecord,
    new_session_id,
)
from stockade.relay.session import RelaySession, ToHost
from stockade.relay.shared import SharedRouter, SharedSession
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.instance import Instance
from stockade.secrets.redact import Redactor

log = get_logger("stockade.relay")


class InstanceSource(Protocol):
    """What opening a session needs from the supervisor."""

    async def acquire(
        self,
        name: str,
        session_id: str,
        told: Callable[[int], Awaitable[None]] | None = None,
    ) -> Instance: ...

    def release_later(self, instance: Instance) -> None: ...

    def router(self, name: str) -> SharedRouter: ...


class Refusal(Enum):
    """Why a session was not opened; each transport maps it to its own status."""

    UNKNOWN_SERVER = "unknown server"
    DENIED = "denied"  # no policy rule lets the caller use the server
    QUOTA = "quota"  # a quota of the caller (or of the server) is reached
    UNAVAILABLE = "unavailable"  # the server could not be started, or the audit log is down


class OpenRefused(Exception):
    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class SessionOpener:
    def __init__(
        self,
        registry: Registry,
        instances: InstanceSource,
        policy: PolicyStore,
        audit: AuditLog,
        *,
        max_message_bytes: int,
        quotas: Quotas | None = None,
        notifications_per_second: float = DEFAULT_NOTIFICATIONS_PER_SECOND,
    ) -> None:
        self._admission = Admission(policy, quotas or Quotas())
        self._refusals = Digest()
        self._budget = HostBudget()  # per identity, across every session of it
        self._registry = registry
        self._instances = instances
        self._policy = policy
        self._audit = audit
        self._max = max_message_bytes
        self._notifications_per_second = notifications_per_second
        self.live: dict[str, SessionRecord] = {}
        self._open: dict[str, HostSession] = {}
        self._opening: dict[str, SessionRecord] = {}  # admitted, not yet open

    async def expire_forever(self, timeout: float) -> None:
        """Every second: requests older than `timeout`, in every open session, time out."""
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            for session in list(self._open.values()):
                try:
                    await session.expire(timeout)
                except Exception as exc:  # one broken session must not stop the others' timeouts
                    log.warning("could not time out a session's requests", error=str(exc))

    async def revoke(self, reason: str, *, credentials: set[str], identity: str = "") -> int:
        """End every open session that used one of `credentials` (or of `identity`)."""
        ending = [
            s
            for s in self._open.values()
            if s.record.credential in credentials or (identity and s.record.identity == identity)
        ]
        for session in ending:
            if not session.revoked.done():
                session.revoked.set_result(reason)
        if ending:
            with contextlib.suppress(AuditUnavailable):
                await self._audit.record(
                    "session.revoked",
                    durable=True,
                    outcome="ok",
                    reason=reason,
                    detail={"sessions": sorted(s.id for s in ending)},
                )
            log.warning("ended sessions of a revoked credential", sessions=len(ending))
        return len(ending)

    async def open(
        self,
        server: str,
        identity: str,
        to_host: ToHost,
        *,
        transport: str,
        peer: str | None,
        credential: str = "",
        session_id: str | None = None,
    ) -> HostSession:
        """Open a session of `identity` on `server`; raises `OpenRefused` with the reason."""
        session_id = session_id or new_session_id()
        where = {"identity": identity, "server": server, "session": session_id}
        audit_fields = {"transport": transport, "peer": peer, **where}
        try:
            definition = self._registry.get(server)
        except UnknownServer:
            # The name is the caller's: cut in what is said, and one record per window.
            reason = f"no server named {capped(server)!r} is registered (see `stockade server ls`)"
            audit_fields["server"] = capped(server)
            count = self._refusals.due((identity, "unknown-server"))
            if count is not None:
                with contextlib.suppress(AuditUnavailable):  # refused either way
                    await self._audit.record(
                        "session.open",
                        durable=True,
                        outcome="deny",
                        reason=reason,
                        detail={"refusals": count},
                        **audit_fields,
                    )
            raise OpenRefused(Refusal.UNKNOWN_SERVER, reason) from None
        # Checked and counted with no await in between: opens racing each other all see the
        # sessions still being opened (a slot is held until the open succeeds or fails).
        refused = self._admission.check(
            identity,
            server,
            transport,
            definition.shared,
            [*self.live.values(), *self._opening.values()],
        )
        if refused is not None:
            await self._refused(refused, audit_fields)
        instance = SHARED if definition.shared else "(starting)"
        held = SessionRecord(session_id, server, identity, instance, transport, credential)
        self._opening[session_id] = held
        try:
            return await self._open_admitted(held, to_host, audit_fields)
        finally:
            del self._opening[session_id]

    async def _open_admitted(
        self, held: SessionRecord, to_host: ToHost, audit_fields: dict[str, str | None]
    ) -> HostSession:
        session_id, server, identity = held.id, held.server, held.identity
        transport, credential = held.transport, held.credential
        definition = self._registry.get(server)
        with log_context(session=session_id, server=server):
            if definition.shared:
                session = self._join_shared(session_id, identity, server, to_host, transport)
            else:
                session = await self._start_own(session_id, identity, server, to_host, transport)
            session.record = replace(session.record, credential=credential)
            try:
                await self._audit.record(
                    "session.open",
                    durable=True,
                    outcome="ok",
                    instance=session.instance,
                    **audit_fields,
                )
            except BaseException as exc:  # refused (audit unavailable) or cancelled
                await session.abandon()
                if isinstance(exc, AuditUnavailable):
                    raise OpenRefused(Refusal.UNAVAILABLE, f"refused: {exc}") from None
                raise
            SESSIONS.labels(server).inc()
            self.live[session_id] = session.record
            self._open[session_id] = session
            log.info("session opened", instance=session.instance, transport=transport)
        return session

    async def _refused(self, refused: Refused, audit_fields: dict[str, str | None]) -> NoReturn:
        """Audit a refusal (once per window for repeats, with the count) and raise it."""
        kind = Refusal.DENIED if refused.quota is None else Refusal.QUOTA
        key = (str(audit_fields["identity"]), str(audit_fields["server"]), refused.quota or "")
        count = self._refusals.due(key)
        if count is not None:
            with contextlib.suppress(AuditUnavailable):  # refused either way
                await self._audit.record(
                    "session.open",
                    durable=True,
                    outcome="deny",
                    reason=refused.reason,
                    detail={"quota": refused.quota, "refusals": count},
                    **audit_fields,
                )
            with log_context(server=audit_fields["server"]):  # the log, as sparingly
                log.info("session refused", reason=refused.reason, refusals=count)
        raise OpenRefused(kind, refused.reason)

    def _guard(
        self,
        session_id: str,
        identity: str,
        server: str,
        instance: str,
        redactor: Callable[[], Redactor | None],
    ) -> PolicyGuard:
        return PolicyGuard(
            self._policy,
            server,
            identity,
            self._audit,
            session=session_id,
            instance=instance,
            redactor=redactor,
            budget=self._budget,
        )

    async def _start_own(
        self, session_id: str, identity: str, server: str, to_host: ToHost, transport: str
    ) -> HostSession:
        async def told(ahead: int) -> None:
            """A burst beyond the warm pool waits in line: the host hears so, not silence."""
            log.info("session waits for a start slot", ahead=ahead)
            await to_host(waiting_notice(server, ahead))

        try:
            instance = await self._instances.acquire(server, session_id, told)
        except SandboxError as exc:
            log.error("could not start an instance", error=str(exc))
            raise OpenRefused(Refusal.UNAVAILABLE, f"could not start {server!r}: {exc}") from None
        guard = self._guard(session_id, identity, server, instance.id, instance.redactor)
        relay = RelaySession(
            session_id,
            server,
            instance,
            to_host,
            max_message_bytes=self._max,
            guard=guard,
            notifications_per_second=self._notifications_per_second,
        )
        session = HostSession(
            SessionRecord(session_id, server, identity, instance.id, transport),
            guard=guard,
            forward=relay.from_host,
            drain=relay.drain,
            expire=relay.expire,
            release=lambda: self._instances.release_later(instance),
            on_close=self._closed,
        )
        instance.bind(relay.from_server)
        session._watch(instance, relay)
        return session

    def _join_shared(
        self, session_id: str, identity: str, server: str, to_host: ToHost, transport: str
    ) -> HostSession:
        try:
            router = self._instances.router(server)
        except SandboxError as exc:
            raise OpenRefused(Refusal.UNAVAILABLE, str(exc)) from None
        guard = self._guard(session_id, identity, server, SHARED, router.redactor)
        seat: SharedSession = router.join(session_id, to_host, guard)

        async def forward(raw: bytes | jsonrpc.Message) -> None:
            await router.from_host(seat, raw)

        async def drain(timeout: float) -> None:
            await router.drain(seat, timeout)

        async def expire(timeout: float) -> None:
            await router.expire(seat, timeout)

        return HostSession(
            SessionRecord(session_id, server, identity, SHARED, transport),
            guard=guard,
            forward=forward,
            drain=drain,
            expire=expire,
            release=lambda: router.leave(seat),
            on_close=self._closed,
        )

    def _closed(self, session: HostSession, reason: str) -> None:
        record = session.record
        self.live.pop(record.id, None)
        self._open.pop(record.id, None)
        SESSIONS.labels(record.server).dec()
        with contextlib.suppress(AuditUnavailable):  # the failure is already said and shown
            self._audit.write(
                "session.close",
                outcome="ok",
                reason=reason,
                identity=record.identity,
                server=record.server,
                session=record.id,
                instance=record.instance,
            )
        with log_context(session=record.id, server=record.server):
            log.info("session closed", reason=reason, transport=record.transport)


def waiting_notice(server: str, ahead: int) -> bytes:
    """An MCP log message (allowed before `initialize` is answered) saying why it waits."""
    text = (
        f"Stockade: waiting for a sandbox of {server!r} to start; {ahead} session(s) ahead. "
        "Starts run a few at a time so that each is served sooner."
    )
    params = {"level": "info", "logger": "stockade", "data": text}
    return jsonrpc.encode({"jsonrpc": "2.0", "method": "notifications/message", "params": params})
