"""The supervisor: reconcile what should run (registry, sessions) with what does (containers).

- Per-session servers (the default): every session gets its own container, taken from the
  server's warm pool when one is ready (else started cold), and stopped when the session ends.
- The warm pool keeps `warm_pool` containers per server started and attached, refilled in
  the background; pooled containers older than `pool_max_age` are recycled.
- A reconcile loop runs every `RECONCILE_INTERVAL` seconds: it refills pools, recycles old
  pooled instances, samples pids-limit hits, and removes any container that carries this
  daemon's id but is not one of its instances (orphans of an earlier run, or leaks).
- On start, every container of this daemon's id left from a previous run is removed; on
  clean shutdown, every instance is stopped and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.config import Settings
from stockade.logs import get_logger, log_context
from stockade.metrics import CONTAINERS
from stockade.policy.sandbox import DEFAULT_SANDBOX, SandboxPolicy
from stockade.registry import Registry, ServerDefinition
from stockade.relay.shared import HandshakeFailed, SharedRouter
from stockade.sandbox.egress import EgressAttachment, EgressGateways, gateway_key
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.runtime import SandboxRuntime
from stockade.sandbox.spec import (
    LABEL_DAEMON,
    LABEL_INSTANCE,
    LABEL_SERVER,
    LABEL_SESSION,
    BindMount,
    ContainerSpec,
)
from stockade.secrets.delivery import CONTAINER_TARGET, SecretDelivery
from stockade.secrets.model import SecretError, SecretStore
from stockade.secrets.redact import Redactor
from stockade.supervisor.instance import ExitReport, Instance, Redaction, new_instance_id
from stockade.supervisor.sandboxing import SandboxRefused, build_spec, sandbox_fingerprint

log = get_logger("stockade.supervisor")

# Often enough that a leaked container or an empty pool is noticed within seconds, rarely
# enough that listing containers costs the engine nothing measurable.
RECONCILE_INTERVAL = 2.0
# Exit reports kept per server for `stockade server status`.
EXIT_HISTORY = 20
DAEMON_ID_FILE = "daemon-id"
SHARED_DIR = "shared"
# Restart backoff for crashed shared instances: 0.5 s doubling to 30 s. The cap bounds how
# long a fixed server waits to come back; the base keeps a crash loop from spinning the
# engine. A run of STABLE_RUN seconds resets the count: that crash is not part of a loop.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
STABLE_RUN = 60.0


def load_daemon_id(state_dir: Path) -> str:
    """This daemon's identity on the engine, stable across restarts (labels carry it)."""
    path = state_dir / DAEMON_ID_FILE
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = uuid.uuid4().hex[:16]
    path.write_text(value + "\n")
    return value


@dataclass
class ServerState:
    """Live bookkeeping for one registered server."""

    definition: ServerDefinition
    pool: deque[Instance] = field(default_factory=deque)
    in_use: dict[str, Instance] = field(default_factory=dict)  # instance id -> instance
    starting: int = 0
    restarts: int = 0
    exits: deque[tuple[float, str, ExitReport]] = field(
        default_factory=lambda: deque(maxlen=EXIT_HISTORY)
    )
    router: SharedRouter | None = None  # shared servers only
    runner: asyncio.Task[None] | None = None  # keeps the shared instance running


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        backend: SandboxRuntime,
        registry: Registry,
        daemon_id: str,
        *,
        sandbox_policy: Callable[[str], SandboxPolicy] | None = None,
        audit: AuditLog | None = None,
        secrets: SecretStore | None = None,
        delivery: SecretDelivery | None = None,
    ) -> None:
        self._secrets = secrets
        self._delivery = delivery
        self._audit = audit  # None only in tests of the supervisor alone
        self._settings = settings
        # The policy in force for a server's sandbox, asked at every container start.
        self._sandbox_policy = sandbox_policy or (lambda _name: DEFAULT_SANDBOX)
        self._egress = EgressGateways(backend, settings, daemon_id)
        self._backend = backend
        self._registry = registry
        self.daemon_id = daemon_id
        self._pool_max_age = settings.pool_max_age_seconds
        self._servers: dict[str, ServerState] = {}
        self._known_containers: set[str] = set()  # instance ids this run owns (incl. starting)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        for definition in self._registry.all():
            self._servers[definition.name] = ServerState(definition)
        adopted = await self._adopt_shared_instances()
        if self._delivery is not None:  # secrets of instances a crash left behind
            self._delivery.remove_all_except(self._known_containers)
        removed = await self._reap_unaccounted()
        if removed:
            log.info("removed containers left by an earlier run", count=removed)
        for state in self._servers.values():
            if state.definition.shared:
                self._start_shared(state, adopted.get(state.definition.name))
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
        await asyncio.gather(*(self._stop(i) for i in instances), return_exceptions=True)
        await self._reap_unaccounted()
        await asyncio.to_thread(self._egress.prune, set())

    # -- registry changes ------------------------------------------------------------

    async def server_added(self, definition: ServerDefinition) -> None:
        state = self._servers.get(definition.name)
        if state is None:
            state = self._servers[definition.name] = ServerState(definition)
        else:
            state.definition = definition
            # Instances were made from the old definition: recycle pooled and shared ones
            # (sessions in progress keep theirs until they end).
            await self._stop_shared(state)
            while state.pool:
                self._spawn(self._stop(state.pool.popleft()))
        if definition.shared:
            self._start_shared(state, None)

    async def server_removed(self, name: str) -> None:
        state = self._servers.pop(name, None)
        if state is None:
            return
        await self._stop_shared(state)
        (self._settings.state_dir / SHARED_DIR / f"{name}.json").unlink(missing_ok=True)
        instances = [*state.pool, *state.in_use.values()]
        await asyncio.gather(*(self._stop(i) for i in instances), return_exceptions=True)

    # -- sessions --------------------------------------------------------------------

    async def acquire(self, name: str, session_id: str) -> Instance:
        """An instance for a new session: from the warm pool if one is ready, else cold."""
        state = self._state(name)
        if state.definition.shared:
            raise SandboxError(f"server {name!r} is shared: sessions join its router")
        instance = None
        wanted = self._fingerprint(state.definition)
        while state.pool:
            candidate = state.pool.popleft()
            if candidate.alive and candidate.sandbox_fingerprint == wanted:
                instance = candidate
                break
            self._spawn(self._stop(candidate))  # dead, or made under an older policy
        if instance is None:
            instance = await self._start_instance(state)
        instance.session_id = session_id
        state.in_use[instance.id] = instance
        self._spawn(self._refill(state))
        return instance

    async def release(self, instance: Instance) -> ExitReport:
        """The session ended: stop its container (per-session instances are never reused)."""
        state = self._servers.get(instance.server)
        report = await self._stop(instance)
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
            if secret in self._sandbox_policy(name).secrets:
                while state.pool:
                    self._spawn(self._stop(state.pool.popleft()))
                self._spawn(self._refill(state))

    def router(self, name: str) -> SharedRouter:
        state = self._state(name)
        if state.router is None:
            raise SandboxError(f"server {name!r} is not shared")
        return state.router

    # -- shared instances ------------------------------------------------------------

    def _start_shared(
        self, state: ServerState, adopted: tuple[Instance, dict[str, Any]] | None
    ) -> None:
        if state.router is None:
            state.router = SharedRouter(state.definition.name, self._settings.max_message_bytes)
        state.runner = asyncio.create_task(
            self._run_shared(state, adopted), name=f"shared-{state.definition.name}"
        )

    async def _stop_shared(self, state: ServerState) -> None:
        if state.runner is not None:
            state.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.runner
            state.runner = None
        for instance in list(state.in_use.values()):
            if instance.session_id is None:  # the shared instance has no session of its own
                state.in_use.pop(instance.id, None)
                await self._stop(instance)

    async def _run_shared(
        self, state: ServerState, adopted: tuple[Instance, dict[str, Any]] | None
    ) -> None:
        """Keep one instance of a shared server running; restart it with backoff."""
        router = state.router
        assert router is not None  # noqa: S101 - set by _start_shared
        name = state.definition.name
        failures = 0
        while not self._closing:
            began = time.monotonic()
            instance: Instance | None = None
            try:
                if adopted is not None:
                    instance, init_result = adopted
                    adopted = None
                    router.adopt(instance, init_result)
                else:
                    instance = await self._start_instance(state)
                    state.in_use[instance.id] = instance
                    init_result = await router.attach(instance)
                    self._save_shared_record(state.definition, instance, init_result)
                state.in_use[instance.id] = instance
                with log_context(server=name, instance=instance.id):
                    log.info("shared instance serving")
                report = await asyncio.shield(instance.exited)
                await router.instance_ended(report)
            except (SandboxError, HandshakeFailed) as exc:
                with log_context(server=name):
                    log.error("shared instance failed to start", error=str(exc))
            finally:
                if instance is not None:
                    state.in_use.pop(instance.id, None)
                    await asyncio.shield(self._stop(instance))
            if self._closing or state.definition.restart_policy == "never":
                return
            failures = 0 if time.monotonic() - began >= STABLE_RUN else failures + 1
            delay = min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_CAP) if failures else 0.0
            state.restarts += 1
            with log_context(server=name):
                log.warning(
                    "restarting shared instance", delay_seconds=delay, restarts=state.restarts
                )
            await asyncio.sleep(delay)

    def _save_shared_record(
        self, definition: ServerDefinition, instance: Instance, init_result: dict[str, Any]
    ) -> None:
        """What a restarted daemon needs to take the instance over: no secret is in it."""
        folder = self._settings.state_dir / SHARED_DIR
        folder.mkdir(mode=0o700, exist_ok=True)
        record = {
            "instance": instance.id,
            "container": instance.container_id,
            "definition": definition.model_dump(mode="json"),
            "sandbox": instance.sandbox_fingerprint,
            "init_result": init_result,
        }
        temp = folder / f".{definition.name}.json.tmp"
        temp.write_text(json.dumps(record))
        temp.replace(folder / f"{definition.name}.json")

    async def _adopt_shared_instances(self) -> dict[str, tuple[Instance, dict[str, Any]]]:
        """Re-attach shared instances a previous run left running, if still what is defined."""
        adopted: dict[str, tuple[Instance, dict[str, Any]]] = {}
        folder = self._settings.state_dir / SHARED_DIR
        for state in self._servers.values():
            definition = state.definition
            path = folder / f"{definition.name}.json"
            if not definition.shared or not path.exists():
                continue
            try:
                record = json.loads(path.read_text())
                if record["definition"] != definition.model_dump(mode="json"):
                    continue  # redefined since: start a fresh one
                if record.get("sandbox") != self._fingerprint(definition):
                    continue  # its sandbox policy changed since: never keep an older sandbox
                policy = self._sandbox_policy(definition.name)
                values = self._secret_values(definition.name, policy.secrets)
                details = await asyncio.to_thread(self._backend.inspect, record["container"])
                labels = details["Config"]["Labels"] or {}
                if not details["State"]["Running"] or labels.get(LABEL_DAEMON) != self.daemon_id:
                    continue
                instance = await Instance.adopt(
                    self._backend,
                    record["container"],
                    definition.name,
                    record["instance"],
                    self._settings.max_message_bytes,
                    redaction=(
                        self._redaction(definition.name, record["instance"], values)
                        if values
                        else None
                    ),
                )
                instance.sandbox_fingerprint = record["sandbox"]
            except (SandboxError, KeyError, ValueError, OSError) as exc:
                with log_context(server=definition.name):
                    log.info("shared instance not adoptable; starting a new one", reason=str(exc))
                continue
            self._known_containers.add(instance.id)
            self._spawn(self._watch_exit(instance))
            adopted[definition.name] = (instance, record["init_result"])
            with log_context(server=definition.name, instance=instance.id):
                log.info("adopted the shared instance of the previous run")
        return adopted

    # -- status ----------------------------------------------------------------------

    def pool_levels(self) -> list[tuple[str, int, int, int]]:
        """(server, pooled, pool size asked, in use) for every server, for metrics."""
        return [
            (name, len(s.pool), s.definition.warm_pool, len(s.in_use))
            for name, s in list(self._servers.items())
        ]

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

    def _fingerprint(self, definition: ServerDefinition) -> str:
        return sandbox_fingerprint(definition, self._sandbox_policy(definition.name))

    async def _spec(
        self, definition: ServerDefinition, instance_id: str
    ) -> tuple[ContainerSpec, dict[str, bytes]]:
        """The container to create, and the secret values it is granted (for redaction)."""
        policy = self._sandbox_policy(definition.name)
        egress: EgressAttachment | None = None
        if policy.egress is not None:
            egress = await asyncio.to_thread(self._egress.ensure, definition.name, policy.egress)
        labels = {
            LABEL_DAEMON: self.daemon_id,
            LABEL_SERVER: definition.name,
            LABEL_INSTANCE: instance_id,
        }
        values = self._secret_values(definition.name, policy.secrets)
        secrets_mount = None
        if values:
            assert self._delivery is not None  # noqa: S101 - checked by _secret_values
            user = policy.user or self._settings.container_user
            folder = await asyncio.to_thread(self._delivery.write, instance_id, values, user)
            secrets_mount = BindMount(source=str(folder), target=CONTAINER_TARGET)
        try:
            spec = build_spec(
                self._settings, definition, policy, labels, egress, secrets_mount=secrets_mount
            )
        except BaseException:
            self._forget_secrets(instance_id)
            raise
        return spec, values

    def _secret_values(self, server: str, names: tuple[str, ...]) -> dict[str, bytes]:
        if not names:
            return {}
        if self._secrets is None or self._delivery is None:
            raise SandboxRefused(f"server {server!r} is granted secrets but no store is set up")
        try:
            return {name: self._secrets.get(name) for name in names}
        except SecretError as exc:
            raise SandboxRefused(f"server {server!r}: {exc}") from None

    def _forget_secrets(self, instance_id: str) -> None:
        if self._delivery is not None:
            self._delivery.remove(instance_id)

    def _redaction(self, server: str, instance_id: str, values: dict[str, bytes]) -> Redaction:
        def on_redacted(names: list[str]) -> None:
            with log_context(server=server, instance=instance_id):
                log.warning("redacted a granted secret in server output", secrets=names)
            if self._audit is not None:
                with contextlib.suppress(AuditUnavailable):
                    self._audit.write(
                        "secret.redacted",
                        outcome="ok",
                        server=server,
                        instance=instance_id,
                        detail={"secrets": names},
                    )

        return Redaction(Redactor(values), on_redacted)

    def _wanted_gateways(self) -> set[str]:
        wanted = set()
        for name in self._servers:
            egress = self._sandbox_policy(name).egress
            if egress is not None:
                wanted.add(gateway_key(name, egress))
        return wanted

    async def _start_instance(self, state: ServerState) -> Instance:
        instance_id = new_instance_id()
        self._known_containers.add(instance_id)
        state.starting += 1
        fingerprint = self._fingerprint(state.definition)
        name = state.definition.name
        try:
            spec, values = await self._spec(state.definition, instance_id)
            instance = await Instance.start(
                self._backend,
                spec,
                name,
                instance_id,
                self._settings.max_message_bytes,
                redaction=self._redaction(name, instance_id, values) if values else None,
            )
            instance.sandbox_fingerprint = fingerprint
            self._record(
                "container.start",
                "ok",
                instance,
                detail={"container": instance.container_id[:12], "secrets": sorted(values)},
            )
        except BaseException:
            self._known_containers.discard(instance_id)
            self._forget_secrets(instance_id)
            raise
        finally:
            state.starting -= 1
        self._spawn(self._watch_exit(instance))
        return instance

    async def _watch_exit(self, instance: Instance) -> None:
        report = await asyncio.shield(instance.exited)
        self.record_exit(instance, report)
        state = self._servers.get(instance.server)
        if state is not None and instance in state.pool:
            state.pool.remove(instance)  # a pooled instance died before use: drop it
            self._spawn(self._stop(instance))

    async def _stop(self, instance: Instance) -> ExitReport:
        try:
            return await instance.stop(self._settings.stop_grace_seconds)
        finally:
            self._known_containers.discard(instance.id)
            self._forget_secrets(instance.id)  # the files go with the container

    async def _refill(self, state: ServerState) -> None:
        while (
            not self._closing
            and state.definition.name in self._servers
            and len(state.pool) + state.starting < state.definition.warm_pool
        ):
            try:
                instance = await self._start_instance(state)
            except SandboxError as exc:
                with log_context(server=state.definition.name):
                    log.error("warm pool could not start an instance", error=str(exc))
                return
            if self._closing or state.definition.name not in self._servers:
                await self._stop(instance)
                return
            state.pool.append(instance)

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
                if instance.age > self._pool_max_age:
                    state.pool.remove(instance)
                    self._spawn(self._stop(instance))
            if (
                not state.definition.shared
                and len(state.pool) + state.starting < state.definition.warm_pool
            ):
                self._spawn(self._refill(state))
            for instance in [*state.pool, *state.in_use.values()]:
                await instance.sample_pids()
        await self._reap_unaccounted()
        await asyncio.to_thread(self._egress.prune, self._wanted_gateways())

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


__all__ = ["LABEL_SESSION", "Supervisor", "load_daemon_id"]
