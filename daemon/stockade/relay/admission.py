"""Who may open a session now: the policy first, then the quotas. Decided before any sandbox.

A container costs CPU, memory, the server's secrets and its egress, so none is started for
a caller the policy would refuse anyway: a session is admitted only when some allow rule
lets that identity use that server at all. Then the quotas (settings, safe defaults) bound
what one identity can make the daemon spend:
- concurrent sessions per identity, over every transport;
- HTTP sessions per identity;
- session opens per identity per minute (a sliding window);
- concurrent per-session instances per server.
A policy's `quotas:` entries override the settings per identity or server.

Refusals of one kind by one caller are audited once per window with a count
(`relay.digest.Digest`), so a caller hammering a closed door cannot grow the audit log.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from stockade.policy.store import PolicyStore

OPEN_WINDOW_SECONDS = 60.0
# Identities whose open history is kept; identities are certificates this daemon issued,
# so this is a bound on memory, not a limit anyone meets in practice.
MAX_TRACKED_IDENTITIES = 10_000


@dataclass(frozen=True)
class Quotas:
    sessions_per_identity: int = 32
    http_sessions_per_identity: int = 16
    opens_per_identity_per_minute: int = 120
    instances_per_server: int = 64


class LiveSession(Protocol):
    """What admission needs to know of a session that is open."""

    @property
    def identity(self) -> str: ...

    @property
    def server(self) -> str: ...

    @property
    def transport(self) -> str: ...

    @property
    def shared(self) -> bool: ...


@dataclass(frozen=True)
class Refused:
    quota: str | None  # the quota's name, or None for a policy refusal
    reason: str


class Admission:
    def __init__(self, policy: PolicyStore, quotas: Quotas) -> None:
        self._policy = policy
        self.quotas = quotas
        self._opens: dict[str, deque[float]] = {}

    def check(
        self,
        identity: str,
        server: str,
        transport: str,
        shared: bool,
        live: Iterable[LiveSession],
    ) -> Refused | None:
        """None if the session may open (and it is counted as an open); else why not."""
        quotas = self.quotas_for(identity, server)
        if not self._policy.evaluator.may_use_server(identity, server):
            return Refused(
                None, f"no policy rule lets {identity} use server {server!r}; no sandbox started"
            )
        mine = per_transport = instances = 0
        for session in live:
            if session.identity == identity:
                mine += 1
                per_transport += session.transport == transport
            instances += session.server == server and not session.shared
        if mine >= quotas.sessions_per_identity:
            return _over("sessions_per_identity", quotas.sessions_per_identity, identity)
        if transport == "http" and per_transport >= quotas.http_sessions_per_identity:
            return _over("http_sessions_per_identity", quotas.http_sessions_per_identity, identity)
        if not shared and instances >= quotas.instances_per_server:
            return Refused(
                "instances_per_server",
                f"server {server!r} has {instances} instances in use, its quota "
                f"(instances_per_server = {quotas.instances_per_server}); try again later",
            )
        now = time.monotonic()
        opens = self._opens.get(identity)
        if opens is None:
            if len(self._opens) >= MAX_TRACKED_IDENTITIES:
                self._forget_idle(now)
            opens = self._opens[identity] = deque()
        while opens and now - opens[0] > OPEN_WINDOW_SECONDS:
            opens.popleft()
        if len(opens) >= quotas.opens_per_identity_per_minute:
            return _over(
                "opens_per_identity_per_minute", quotas.opens_per_identity_per_minute, identity
            )
        opens.append(now)
        return None

    def quotas_for(self, identity: str, server: str) -> Quotas:
        """The settings' quotas, overridden by the policy's `quotas:` entries that cover this
        identity and server (the lowest value of each wins)."""
        overrides = [
            q
            for q in self._policy.evaluator.policy.quotas
            if any(fnmatch.fnmatchcase(identity, g) for g in q.identities)
            and any(fnmatch.fnmatchcase(server, g) for g in q.servers)
        ]
        if not overrides:
            return self.quotas
        values = {}
        for name in (f.name for f in dataclasses.fields(Quotas)):
            said = [v for q in overrides if (v := getattr(q, name)) is not None]
            values[name] = min(said) if said else getattr(self.quotas, name)
        return Quotas(**values)

    def _forget_idle(self, now: float) -> None:
        for identity in [i for i, d in self._opens.items() if not d or now - d[-1] > 60]:
            del self._opens[identity]


def _over(quota: str, limit: int, identity: str) -> Refused:
    return Refused(quota, f"{identity} is at its quota {quota} = {limit}; try again later")
