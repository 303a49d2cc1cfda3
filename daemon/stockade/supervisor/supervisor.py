"""The supervisor: reconcile what should run (registry, sessions) with what does (containers).

- Per-session servers (the default): every session gets its own container, taken from the
  server's warm pool when one is ready (else started cold), and stopped when the session ends.
- The warm pool keeps `warm_pool` containers per server started and attached, refilled in
  the background; pooled containers older than `pool_max_age` are recycled.
- Shared servers are kept running by `shared_runner`; what an instance is made from
  (spec, secrets, redaction, egress) is `provisioning`'s job.
- A reconcile loop runs every `RECONCILE_INTERVAL` seconds: it refills pools, recycles old
  pooled instances, samples pids-limit hits, and removes any container that carries this
  daemon's id but is not one of its instances (orphans of an earlier run, or leaks).
- On start, every container of this daemon's id left from a previous run is removed; on
  clean shutdown, every instance is stopped and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from stockade.atomic import write_atomically
from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.config import Settings
from stockade.logs import get_logger, log_context
from stockade.metrics import CONTAINERS
from stockade.policy.sandbox import SandboxPolicy
from stockade.registry import Registry, ServerDefinition
from stockade.relay.shared import SharedRouter
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.instance import ExitReport, Instance, new_instance_id
from stockade.sandbox.runtime import SandboxRuntime
from stockade.sandbox.spec import LABEL_DAEMON, LABEL_INSTANCE
from stockade.secrets.delivery import SecretDelivery
from stockade.secrets.model import SecretStore
from stockade.state_seal import StateSeal, read_regular
from stockade.supervisor.provisioning import Provisioner
from stockade.supervisor.shared_runner import SharedRunner
from stockade.supervisor.spec_rules import EffectiveSandbox
from stockade.supervisor.start_gate import StartGate, Told
from stockade.supervisor.state import ServerState
from stockade.supervisor.trial import describe_exit, describe_start_error, vet

log = get_logger("stockade.supervisor")

# Often enough that a leaked container or an empty pool is noticed within seconds, rarely
# enough that listing containers costs the engine nothing measurable.
RECONCILE_INTERVAL = 2.0
# A pooled instance alive this long counts as healthy: a failure streak ends there.
HEALTHY_AFTER = 5.0
DAEMON_ID_FILE = "daemon-id"


def load_daemon_id(state_dir: Path) -> str:
    """This daemon's identity on the engine, stable across restarts (labels carry it)."""
    path = state_dir / DAEMON_ID_FILE
    data = read_regular(path)  # not a link, FIFO or folder (StateTampered)
    if data is not None:
        value = data.decode("utf-8", errors="replace").strip()
        if value:
            return value
    value = uuid.uuid4().hex[:16]
    write_atomically(path, (value + "\n").encode())
    return value


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        backend: SandboxRuntime,
        registry: Registry,
        daemon_id: str,
        *,
        seal: StateSeal,
        sandbox_policy: Callable[[str], SandboxPolicy] | None = None,
        audit: AuditLog | None = None,
        secrets: SecretStore | None = None,
        delivery: SecretDelivery | None = None,
    ) -> None:
        self._audit = audit  # None only in tests of the supervisor alone
        self._settings = settings
        self._provisioner = Provisioner(
            settings,
            backend,
            daemon_id,
            sandbox_policy=sandbox_policy,
            audit=audit,
            secrets=secrets,
            delivery=delivery,
        )
        self._gate = StartGate(
            settings.max_concurrent_starts or 2 * (os.cpu_count() or 1),
            settings.start_settle_seconds,
        )
        self._shared = SharedRunner(
            settings, backend, daemon_id, self._provisioner, self, seal=seal
        )
        self._backend = backend
        self._registry = registry
        self.daemon_id = daemon_id
        self._pool_max_age = settings.pool_max_age_seconds
        self._servers: dict[str, ServerState] = {}
        self._known_containers: set[str] = set()  # instance ids this run owns (incl. starting)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        for definition in self._registry.all():
            self._servers[definition.name] = ServerState(definition)
        adopted = await self._shared.adopt_all(list(self._servers.values()))
        # secrets of instances a crash left behind
        self._provisioner.forget_instance_files_except(self._known_containers)
        removed = await self._reap_unaccounted()
        if removed:
            log.info("removed containers left by an earlier run", count=removed)
        for state in self._servers.values():
            if state.definition.shared:
                self._shared.start(state, adopted.get(state.definition.name))
        self._loop_task = asyncio.create_task(self._reconcile_forever(), name="reconcile")

    async def shutdown(self) -> None:
        """Stop every instance (pooled and in use) and wait for all of them to be removed."""
        self._closing = True
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        runners = [s.runner for s in self._servers.values() if s.runner]
        for task in [*self._tasks, *runners]:
            task.cancel()
        await asyncio.gather(*self._tasks, *runners, return_exceptions=True)
        instances = [i for s in self._servers.values() for i in (*s.pool, *s.in_use.values())]
        await asyncio.gather(*(self.stop_instance(i) for i in instances), return_exceptions=True)
        await self._reap_unaccounted()
        await self._provisioner.prune_egress(())
        await self._provisioner.prune_networks(())

    # -- registry changes ------------------------------------------------------------

    async def server_added(self, definition: ServerDefinition) -> None:
        state = self._servers.get(definition.name)
        if state is None:
            state = self._servers[definition.name] = ServerState(definition)
        else:
            state.definition = definition
            state.record_healthy()  # a new definition starts with a clean record
            # Instances were made from the old definition: recycle pooled and shared ones
            # (sessions in progress keep theirs until they end).
            await self._shared.stop(state)
            while state.pool:
                self._spawn(self.stop_instance(state.pool.popleft()))
        if definition.shared:
            self._shared.start(state, None)

    async def server_removed(self, name: str) -> None:
        state = self._servers.pop(name, None)
        if state is None:
            return
        await self._shared.stop(state)
        self._shared.forget(name)
        instances = [*state.pool, *state.in_use.values()]
        await asyncio.gather(*(self.stop_instance(i) for i in instances), return_exceptions=True)

    async def vet(
        self, definition: ServerDefinition, *, trial: bool, timeout: float = 0.0
    ) -> ServerDefinition:
        """Pin, check secrets and (with `trial`) prove the server answers: see `trial.vet`."""

        async def start(pinned: ServerDefinition) -> Instance:
            instance_id = new_instance_id()
            self._known_containers.add(instance_id)  # the reaper leaves it alone
            try:
                return await self._provisioner.start(pinned, instance_id)
            except BaseException:
                self._known_containers.discard(instance_id)
                raise

        return await vet(
            self._provisioner,
            self._backend,
            definition,
            start=start if trial else None,
            stop=self.stop_instance,
            timeout=timeout,
        )

    # -- sessions --------------------------------------------------------------------

    async def acquire(self, name: str, session_id: str, told: Told | None = None) -> Instance:
        """An instance for a new session: from the warm pool if one is ready, else cold,
        through the start gate (`told` how many sessions are ahead, if it must wait)."""
        state = self._state(name)
        if state.definition.shared:
            raise SandboxError(f"server {name!r} is shared: sessions join its router")
        instance = None
        wanted = self._provisioner.fingerprint(state.definition)
        while state.pool:
            candidate = state.pool.popleft()
            if candidate.alive and candidate.sandbox_fingerprint == wanted:
                instance = candidate
                break
            self._spawn(self.stop_instance(candidate))  # dead, or made under an older policy
        if instance is None:
            instance = await self.start_instance(state, told=told, session=True)
        else:
            state.record_healthy()
        instance.session_id = session_id
        state.in_use[instance.id] = instance
        self._spawn(self._refill(state))
        return instance

    async def release(self, instance: Instance) -> ExitReport:
        """The session ended: stop its container (per-session instances are never reused)."""
        state = self._servers.get(instance.server)
        report = await self.stop_instance(instance)
        if state is not None:
            state.in_use.pop(instance.id, None)
        return report

    def release_later(self, instance: Instance) -> None:
        """`release` in the background (the caller may be a cancelled RPC); shutdown waits."""
        self._spawn(self.release(instance))

    def _record(self, event: str, outcome: str, instance: Instance, **fields: object) -> None:
        CONTAINERS.labels(instance.server, event.removeprefix("container.")).inc()
        if self._audit is None:
            return
        with contextlib.suppress(AuditUnavailable):  # said once by the log; traffic stops
            self._audit.write(
                event, outcome=outcome, server=instance.server, instance=instance.id, **fields
            )

    def record_exit(self, instance: Instance, report: ExitReport) -> None:
        if report.oom_killed:
            event, outcome = "container.oom", "error"
        elif report.stopped_by_daemon:
            event, outcome = "container.stop", "ok"
        else:
            event, outcome = "container.crash", "error"
        self._record(
            event,
            outcome,
            instance,
            detail={"exit_code": report.exit_code, "pids_limit_hits": report.pids_limit_hits},
        )
        state = self._servers.get(instance.server)
        if state is None:
            return
        state.exits.append((time.time(), instance.id, report))
        if not report.stopped_by_daemon:
            with log_context(server=instance.server, instance=instance.id):
                log.warning(
                    "server exited",
                    exit_code=report.exit_code,
                    oom_killed=report.oom_killed,
                    pids_limit_hits=report.pids_limit_hits,
                )

    def secret_changed(self, secret: str) -> None:
        """A secret was rotated or removed: pooled instances holding it are replaced.

        Instances serving a session keep the value they started with until they end.
        """
        for name, state in self._servers.items():
            if self._provisioner.grants(name, secret):
                while state.pool:
                    self._spawn(self.stop_instance(state.pool.popleft()))
                self._spawn(self._refill(state))

    async def check_pins(self, definition: ServerDefinition) -> str | None:
        """Why `definition` cannot run under what its sandbox policy pins (None: it can)."""
        return await self._provisioner.check_pins(definition)

    def router(self, name: str) -> SharedRouter:
        state = self._state(name)
        if state.router is None:
            raise SandboxError(f"server {name!r} is not shared")
        return state.router

    # -- status ----------------------------------------------------------------------

    def pool_levels(self) -> list[tuple[str, int, int, int]]:
        """(server, pooled, pool size asked, in use) for every server, for metrics."""
        return [
            (name, len(s.pool), s.definition.warm_pool, len(s.in_use))
            for name, s in list(self._servers.items())
        ]

    async def details(
        self, definition: ServerDefinition
    ) -> tuple[EffectiveSandbox, tuple[str, ...], ServerState | None]:
        """The sandbox in force for `definition`, its granted secrets missing from the
        vault, and its live state (None if not loaded)."""
        effective = self._provisioner.effective(definition)
        missing = await asyncio.to_thread(self._provisioner.missing_secrets, effective.secrets)
        return effective, missing, self._servers.get(definition.name)

    def servers(self) -> dict[str, ServerState]:
        return dict(self._servers)

    def instances_of(self, name: str, session_id: str | None = None) -> list[Instance]:
        """Live instances of a server (in use, then pooled), optionally one session's."""
        state = self._state(name)
        return [
            instance
            for instance in [*state.in_use.values(), *state.pool]
            if session_id is None or instance.session_id == session_id
        ]

    # -- internals -------------------------------------------------------------------

    def _state(self, name: str) -> ServerState:
        state = self._servers.get(name)
        if state is None:
            self._registry.get(name)  # raises UnknownServer with the operator-facing message
            raise SandboxError(f"server {name!r} is not loaded")
        return state

    async def start_instance(
        self, state: ServerState, *, session: bool = False, told: Told | None = None
    ) -> Instance:
        """Start a new instance of `state`'s server, known to this run from the first moment."""
        state.starting += 1
        return await self._start_counted(state, session=session, told=told)

    async def _start_counted(
        self, state: ServerState, *, session: bool = False, told: Told | None = None
    ) -> Instance:
        """`start_instance` for a start already counted in `state.starting`."""
        instance_id = new_instance_id()
        try:
            await self._gate.enter(session=session, told=told)
        except BaseException:
            state.starting -= 1
            raise
        self._known_containers.add(instance_id)
        try:
            instance = await self._provisioner.start(state.definition, instance_id)
        except BaseException:
            self._known_containers.discard(instance_id)
            self._gate.leave()
            raise
        finally:
            state.starting -= 1
        self._spawn(self._gate.hold_until_settled(instance.answered))
        self._record(
            "container.start",
            "ok",
            instance,
            detail={
                "container": instance.container_id[:12],
                "secrets": list(instance.granted_secrets),
            },
        )
        self._spawn(self._watch_exit(instance))
        return instance

    def keep_adopted(self, instance: Instance) -> None:
        """An instance of an earlier run, taken over: this run owns and watches it now."""
        self._known_containers.add(instance.id)
        self._spawn(self._watch_exit(instance))

    async def _watch_exit(self, instance: Instance) -> None:
        report = await asyncio.shield(instance.exited)
        self.record_exit(instance, report)
        state = self._servers.get(instance.server)
        if state is not None and instance in state.pool:
            state.pool.remove(instance)  # a pooled instance died before use: drop it
            self._spawn(self.stop_instance(instance))
            if not report.stopped_by_daemon:
                tail = instance.stderr.since(max(0, instance.stderr.total - 5))
                state.pool_failed(describe_exit(state.definition, report, tail))

    async def stop_instance(self, instance: Instance) -> ExitReport:
        try:
            return await instance.stop(self._settings.stop_grace_seconds)
        finally:
            self._known_containers.discard(instance.id)
            self._provisioner.forget_instance_files(instance.id)  # the files go with the container
            if instance.http is not None:
                await self._provisioner.forget_network(instance.id)

    async def _refill(self, state: ServerState) -> None:
        """Start what the pool lacks, all at once (the start gate bounds them by CPU)."""
        while not self._closing and state.definition.name in self._servers and state.may_retry():
            wanted = state.definition.warm_pool - len(state.pool) - state.starting
            if wanted <= 0:
                return
            state.starting += wanted  # counted now: a refill racing this one sees them
            outcomes = await asyncio.gather(
                *(self._start_counted(state) for _ in range(wanted)), return_exceptions=True
            )
            failed: BaseException | None = None
            for outcome in outcomes:
                if isinstance(outcome, Instance):
                    if self._closing or state.definition.name not in self._servers:
                        await self.stop_instance(outcome)
                    else:
                        state.pool.append(outcome)
                elif isinstance(outcome, SandboxError):
                    state.pool_failed(describe_start_error(state.definition, outcome))
                    failed = failed or outcome
                else:
                    failed = outcome
            if failed is not None:
                if not isinstance(failed, SandboxError):
                    raise failed
                return

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception as exc:  # the loop must survive an engine hiccup; it says so
                log.error("reconcile failed", error=str(exc))
            await asyncio.sleep(RECONCILE_INTERVAL)

    async def reconcile_once(self) -> None:
        for state in list(self._servers.values()):
            for instance in list(state.pool):
                if state.failures and instance.alive and instance.age > HEALTHY_AFTER:
                    state.record_healthy()
                if instance.age > self._pool_max_age:
                    state.pool.remove(instance)
                    self._spawn(self.stop_instance(instance))
            if (
                not state.definition.shared
                and len(state.pool) + state.starting < state.definition.warm_pool
            ):
                self._spawn(self._refill(state))
            for instance in [*state.pool, *state.in_use.values()]:
                await instance.sample_pids()
        await self._reap_unaccounted()
        await self._provisioner.prune_egress(list(self._servers))
        await self._provisioner.prune_networks(set(self._known_containers))

    async def _reap_unaccounted(self) -> int:
        """Remove containers with this daemon's id that are not instances of this run."""
        summaries = await asyncio.to_thread(
            self._backend.list_by_label, {LABEL_DAEMON: self.daemon_id}
        )
        stray = [
            s["Id"]
            for s in summaries
            if (s.get("Labels") or {}).get(LABEL_INSTANCE) not in self._known_containers
        ]
        await asyncio.gather(
            *(asyncio.to_thread(self._backend.stop, cid, 0) for cid in stray),
            return_exceptions=True,
        )
        return len(stray)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
