"""Shared servers (`shared: true`): one instance each, kept running, adopted across restarts.

A runner task per shared server starts its instance, lets the `SharedRouter` perform the one
`initialize` handshake, waits for the instance to end, fails what was pending, and starts it
again with backoff. What a restarted daemon needs to take a running instance over (its ids,
definition, sandbox fingerprint and cached `initialize` result; never a secret) is kept in
`STATE_DIR/shared/NAME.json`; an instance is adopted only if nothing it was made from changed.

This is the only code of the supervisor that touches `relay.shared`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

from stockade.config import Settings
from stockade.logs import get_logger, log_context
from stockade.relay.shared import HandshakeFailed, SharedRouter
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.instance import ExitReport, Instance
from stockade.sandbox.runtime import SandboxRuntime
from stockade.sandbox.spec import LABEL_DAEMON, LABEL_INSTANCE, LABEL_SERVER
from stockade.state_seal import StateSeal, StateTampered
from stockade.supervisor.provisioning import Provisioner
from stockade.supervisor.state import ServerState
from stockade.supervisor.trial import describe_exit, describe_start_error

log = get_logger("stockade.supervisor")

SHARED_DIR = "shared"
# Restart backoff for crashed shared instances: 0.5 s doubling to 30 s. The cap bounds how
# long a fixed server waits to come back; the base keeps a crash loop from spinning the
# engine. A run of STABLE_RUN seconds resets the count: that crash is not part of a loop.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
STABLE_RUN = 60.0

Adopted = tuple[Instance, dict[str, Any]]


class InstanceKeeper(Protocol):
    """What the runner needs from the supervisor: its instance bookkeeping."""

    @property
    def closing(self) -> bool: ...

    async def start_instance(self, state: ServerState) -> Instance: ...

    async def stop_instance(self, instance: Instance) -> ExitReport: ...

    def keep_adopted(self, instance: Instance) -> None: ...


class SharedRunner:
    def __init__(
        self,
        settings: Settings,
        backend: SandboxRuntime,
        daemon_id: str,
        provisioner: Provisioner,
        keeper: InstanceKeeper,
        *,
        seal: StateSeal,
    ) -> None:
        self._settings = settings
        self._seal = seal
        self._backend = backend
        self._daemon_id = daemon_id
        self._provisioner = provisioner
        self._keeper = keeper
        self._folder = settings.state_dir / SHARED_DIR

    def start(self, state: ServerState, adopted: Adopted | None) -> None:
        if state.router is None:
            state.router = SharedRouter(
                state.definition.name,
                self._settings.max_message_bytes,
                self._settings.server_notifications_per_second,
            )
        state.runner = asyncio.create_task(
            self._run(state, adopted), name=f"shared-{state.definition.name}"
        )

    async def stop(self, state: ServerState) -> None:
        if state.runner is not None:
            state.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.runner
            state.runner = None
        for instance in list(state.in_use.values()):
            if instance.session_id is None:  # the shared instance has no session of its own
                state.in_use.pop(instance.id, None)
                await self._keeper.stop_instance(instance)

    def forget(self, name: str) -> None:
        """The server was removed: a later run must not adopt its instance."""
        (self._folder / f"{name}.json").unlink(missing_ok=True)

    async def _run(self, state: ServerState, adopted: Adopted | None) -> None:
        """Keep one instance of a shared server running; restart it with backoff."""
        router = state.router
        assert router is not None  # noqa: S101 - set by start
        name = state.definition.name
        failures = 0
        while not self._keeper.closing:
            began = time.monotonic()
            instance: Instance | None = None
            try:
                if adopted is not None:
                    instance, init_result = adopted
                    adopted = None
                    router.adopt(instance, init_result)
                else:
                    instance = await self._keeper.start_instance(state)
                    state.in_use[instance.id] = instance
                    init_result = await router.attach(instance)
                    self._save_record(state, instance, init_result)
                state.in_use[instance.id] = instance
                with log_context(server=name, instance=instance.id):
                    log.info("shared instance serving")
                state.record_healthy()
                report = await asyncio.shield(instance.exited)
                await router.instance_ended(report)
                if not report.stopped_by_daemon:
                    tail = instance.stderr.since(max(0, instance.stderr.total - 5))
                    state.record_failure(describe_exit(state.definition, report, tail))
            except (SandboxError, HandshakeFailed) as exc:
                error = await self._why_it_failed(state, instance, exc)
                state.record_failure(error)
                with log_context(server=name):
                    log.error("shared instance failed to start", error=error)
            finally:
                if instance is not None:
                    state.in_use.pop(instance.id, None)
                    await asyncio.shield(self._keeper.stop_instance(instance))
            if self._keeper.closing or state.definition.restart_policy == "never":
                return
            failures = 0 if time.monotonic() - began >= STABLE_RUN else failures + 1
            delay = min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_CAP) if failures else 0.0
            state.restarts += 1
            if state.last_error:
                state.next_retry_at = time.time() + delay
            with log_context(server=name):
                log.warning(
                    "restarting shared instance", delay_seconds=delay, restarts=state.restarts
                )
            await asyncio.sleep(delay)

    async def _why_it_failed(
        self, state: ServerState, instance: Instance | None, exc: Exception
    ) -> str:
        """One line: the start error, and how the instance ended if it died (learnt just
        after its output ends, so wait for that briefly)."""
        error = describe_start_error(state.definition, exc)
        if instance is None:
            return error
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(instance.exited), 2)
        if not instance.exited.done():
            return error
        tail = instance.stderr.since(max(0, instance.stderr.total - 5))
        return f"{error}: it {describe_exit(state.definition, instance.exited.result(), tail)}"

    def _save_record(
        self, state: ServerState, instance: Instance, init_result: dict[str, Any]
    ) -> None:
        """What a restarted daemon needs to take the instance over: no secret is in it."""
        definition = state.definition
        self._folder.mkdir(mode=0o700, exist_ok=True)
        record = {
            "instance": instance.id,
            "container": instance.container_id,
            "definition": definition.model_dump(mode="json"),
            "sandbox": instance.sandbox_fingerprint,
            "init_result": init_result,
        }
        # Sealed: its cached `initialize` answer goes to every host, and its container id
        # decides what is attached again, so a writer of the state folder must not choose them.
        self._seal.save(
            self._folder / f"{definition.name}.json",
            f"shared/{definition.name}",
            record,
            anchored=False,
        )

    async def adopt_all(self, states: list[ServerState]) -> dict[str, Adopted]:
        """Re-attach shared instances a previous run left running, if still what is defined."""
        adopted: dict[str, Adopted] = {}
        for state in states:
            definition = state.definition
            path = self._folder / f"{definition.name}.json"
            if not definition.shared or definition.transport != "stdio" or not path.exists():
                continue  # (an HTTP server's channel is not kept across restarts)
            try:
                record = self._seal.load(path, f"shared/{definition.name}", anchored=False)
                if record["definition"] != definition.model_dump(mode="json"):
                    continue  # redefined since: start a fresh one
                if record.get("sandbox") != self._provisioner.fingerprint(definition):
                    continue  # its sandbox policy changed since: never keep an older sandbox
                details = await asyncio.to_thread(self._backend.inspect, record["container"])
                labels = details["Config"]["Labels"] or {}
                expected = {
                    LABEL_DAEMON: self._daemon_id,
                    LABEL_SERVER: definition.name,
                    LABEL_INSTANCE: record["instance"],
                }
                if not details["State"]["Running"] or any(
                    labels.get(key) != value for key, value in expected.items()
                ):
                    continue  # not this server's instance of ours, whatever the record says
                instance = await self._provisioner.adopt(
                    definition, record["container"], record["instance"], record["sandbox"]
                )
            except StateTampered as exc:
                with log_context(server=definition.name):
                    log.warning(
                        "shared instance record refused; starting a new one", reason=str(exc)
                    )
                continue
            except Exception as exc:
                with log_context(server=definition.name):
                    log.info("shared instance not adoptable; starting a new one", reason=str(exc))
                continue
            self._keeper.keep_adopted(instance)
            adopted[definition.name] = (instance, record["init_result"])
            with log_context(server=definition.name, instance=instance.id):
                log.info("adopted the shared instance of the previous run")
        return adopted
