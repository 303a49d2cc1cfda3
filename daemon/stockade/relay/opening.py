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
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import NoReturn, Protocol

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.logs import get_logger, log_context
from stockade.metrics import SESSIONS
from stockade.policy.store import PolicyStore
from stockade.registry import Registry, UnknownServer
from stockade.relay.admission import Admission, Quotas, Refused
from stockade.relay.budget import HostBudget, capped
from stockade.relay.digest import Digest
from stockade.relay.guard import PolicyGuard
from stockade.relay.session import RelaySession, ToHost
from stockade.relay.shared import SharedRouter, SharedSession
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.instance import ExitReport, Instance
from stockade.secrets.redact import Redactor

log = get_logger("stockade.relay")

SHARED = "shared"  # the instance name sessions on a shared server report


class InstanceSource(Protocol):
    """What opening a session needs from the supervisor."""

    async def acquire(self, name: str, session_id: str) -> Instance: ...

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
        forward: Callable[[bytes], Awaitable[None]],
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
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self._release()
        return True


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
    ) -> None:
        self._admission = Admission(policy, quotas or Quotas())
        self._refusals = Digest()
        self._budget = HostBudget()  # per identity, across every session of it
        self._registry = registry
        self._instances = instances
        self._policy = policy
        self._audit = audit
        self._max = max_message_bytes
        self.live: dict[str, SessionRecord] = {}
        self._open: dict[str, HostSession] = {}

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
        refused = self._admission.check(
            identity, server, transport, definition.shared, self.live.values()
        )
        if refused is not None:
            await self._refused(refused, audit_fields)
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
        try:
            instance = await self._instances.acquire(server, session_id)
        except SandboxError as exc:
            log.error("could not start an instance", error=str(exc))
            raise OpenRefused(Refusal.UNAVAILABLE, f"could not start {server!r}: {exc}") from None
        guard = self._guard(session_id, identity, server, instance.id, instance.redactor)
        relay = RelaySession(
            session_id, server, instance, to_host, max_message_bytes=self._max, guard=guard
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

        async def forward(raw: bytes) -> None:
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
