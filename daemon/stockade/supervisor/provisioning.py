"""What an instance is made from: its container spec, its secrets, its redaction, its egress.

`Provisioner` turns a registry definition into a started, attached `Instance`: it asks the
sandbox policy in force, sets up the egress gateway, delivers granted secrets as files, and
builds the redactor for what the server says. The supervisor decides *when* to start and
stop; this module decides *what* runs.

The rules for what a container may be (the registry capped by its sandbox policy, the
pins that bind secrets) are `supervisor/spec_rules.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.config import Settings
from stockade.logs import get_logger, log_context
from stockade.policy.sandbox import DEFAULT_SANDBOX, SandboxPolicy
from stockade.registry import ServerDefinition
from stockade.sandbox.egress import (
    EgressAttachment,
    EgressError,
    EgressGateways,
    gateway_key,
)
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.http_channel import HttpTarget
from stockade.sandbox.instance import Instance, Redaction
from stockade.sandbox.pace import OutputLimits
from stockade.sandbox.runtime import ImageInfo, SandboxRuntime
from stockade.sandbox.spec import (
    LABEL_DAEMON,
    LABEL_INSTANCE,
    LABEL_SERVER,
    BindMount,
    ContainerSpec,
)
from stockade.sandbox.stdio_pipes import PipesError, StdioPipes, piped
from stockade.secrets.delivery import CONTAINER_TARGET, SecretDelivery
from stockade.secrets.model import SecretError, SecretStore
from stockade.secrets.redact import Redactor
from stockade.supervisor import http_networks
from stockade.supervisor.spec_rules import (
    EffectiveSandbox,
    SandboxRefused,
    build_spec,
    effective_sandbox,
    pin_problem,
    sandbox_fingerprint,
)

log = get_logger("stockade.supervisor")

IMAGE_INFOS = 64  # images whose facts are kept (a start does not ask the engine again)


class Provisioner:
    """Builds instances of registered servers under the sandbox policy in force."""

    def __init__(
        self,
        settings: Settings,
        backend: SandboxRuntime,
        daemon_id: str,
        *,
        sandbox_policy: Callable[[str], SandboxPolicy] | None = None,
        audit: AuditLog | None = None,
        secrets: SecretStore | None = None,
        delivery: SecretDelivery | None = None,
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._daemon_id = daemon_id
        # The policy in force for a server's sandbox, asked at every container start.
        self._sandbox_policy = sandbox_policy or (lambda _name: DEFAULT_SANDBOX)
        self._audit = audit  # None only in tests of the supervisor alone
        self._secrets = secrets
        self._delivery = delivery
        self._egress = EgressGateways(backend, settings, daemon_id)
        self._pipes = StdioPipes(settings.stdio_pipes_dir, daemon_id)
        self._image_infos: dict[str, ImageInfo] = {}  # by reference (ids: immutable)
        self._pipes_failed = False  # said once

    def policy(self, server: str) -> SandboxPolicy:
        return self._sandbox_policy(server)

    def effective(self, definition: ServerDefinition) -> EffectiveSandbox:
        return effective_sandbox(self._settings, definition, self._sandbox_policy(definition.name))

    def missing_secrets(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Which of `names` the vault does not hold (all of them when there is no vault)."""
        if not names:
            return ()
        if self._secrets is None:
            return names
        try:
            present = {info.name for info in self._secrets.list()}
        except SecretError:
            return names
        return tuple(name for name in names if name not in present)

    def fingerprint(self, definition: ServerDefinition) -> str:
        return sandbox_fingerprint(definition, self._sandbox_policy(definition.name))

    def grants(self, server: str, secret: str) -> bool:
        """Whether `server`'s sandbox policy hands it the secret `secret`."""
        return secret in self._sandbox_policy(server).secrets

    async def start(self, definition: ServerDefinition, instance_id: str) -> Instance:
        """Create, attach and start a new instance; its secrets go if the start fails."""
        fingerprint = self.fingerprint(definition)
        try:
            spec, values = await self._spec(definition, instance_id)
        except BaseException as exc:
            self.forget_instance_files(instance_id)
            if definition.transport != "stdio":
                await self.forget_network(instance_id)
            if isinstance(exc, SandboxRefused | EgressError):  # a refusal, not a fault
                self._refused(definition.name, str(exc))
            raise
        pipes = None
        try:
            if await self._pipes_fit(definition, spec):
                pipes = await self._make_pipes(instance_id, spec.user)
                if pipes is not None:
                    spec = piped(spec, pipes)
            http = None
            if definition.transport == "streamable-http":
                assert definition.port is not None  # noqa: S101 - the registry requires it
                http = HttpTarget(spec.network, definition.port, definition.path)
            instance = await Instance.start(
                self._backend,
                spec,
                definition.name,
                instance_id,
                self._settings.max_message_bytes,
                redaction=self._redaction(definition.name, instance_id, values) if values else None,
                http=http,
                limits=self._output_limits(),
                pipes=pipes,
            )
        except BaseException:
            self.forget_instance_files(instance_id)
            if definition.transport != "stdio":
                await self.forget_network(instance_id)
            raise
        instance.sandbox_fingerprint = fingerprint
        instance.granted_secrets = tuple(sorted(values))
        return instance

    async def adopt(
        self, definition: ServerDefinition, container_id: str, instance_id: str, fingerprint: str
    ) -> Instance:
        """Attach again to a container a previous daemon run started for `definition`."""
        policy = self._sandbox_policy(definition.name)
        values = self.secret_values(definition.name, policy.secrets)
        instance = await Instance.adopt(
            self._backend,
            container_id,
            definition.name,
            instance_id,
            self._settings.max_message_bytes,
            redaction=self._redaction(definition.name, instance_id, values) if values else None,
            limits=self._output_limits(),
        )
        instance.sandbox_fingerprint = fingerprint
        return instance

    def _output_limits(self) -> OutputLimits:
        """How fast the daemon reads one instance's output (`sandbox/pace.py`)."""
        return OutputLimits(
            lines_per_second=self._settings.server_output_lines_per_second,
            bytes_per_second=self._settings.server_output_bytes_per_second,
        )

    def secret_values(self, server: str, names: tuple[str, ...]) -> dict[str, bytes]:
        if not names:
            return {}
        if self._secrets is None or self._delivery is None:
            raise SandboxRefused(f"server {server!r} is granted secrets but no store is set up")
        try:
            return {name: self._secrets.get(name) for name in names}
        except SecretError as exc:
            raise SandboxRefused(f"server {server!r}: {exc}") from None

    def forget_instance_files(self, instance_id: str) -> None:
        """Remove an instance's secret files and stdio pipes (they go with its container)."""
        if self._delivery is not None:
            self._delivery.remove(instance_id)
        self._pipes.remove(instance_id)

    async def _make_pipes(self, instance_id: str, user: str) -> Path | None:
        """The instance's pipes folder; None (the attach socket, said once) if it cannot be
        made: the same sandbox, only slower, rather than no start at all."""
        try:
            return await asyncio.to_thread(self._pipes.make, instance_id, user)
        except (OSError, PipesError, ValueError) as exc:  # ValueError: a group by name
            if not self._pipes_failed:
                self._pipes_failed = True
                log.warning("stdio pipes unavailable; using the attach socket", error=str(exc))
            return None

    async def _pipes_fit(self, definition: ServerDefinition, spec: ContainerSpec) -> bool:
        """Whether the instance's stdin and stdout can be pipes (`sandbox/stdio_pipes.py`):
        a session's own stdio server on runc, with an explicit command, in an image of our
        recipes (a shell, no ENTRYPOINT). Anything else keeps the attach socket."""
        if (
            not self._settings.stdio_pipes
            or definition.transport != "stdio"
            or definition.shared
            or spec.runtime != "runc"
            or not spec.command
        ):
            return False
        info = self._image_infos.get(spec.image)
        if info is None:
            try:
                info = await asyncio.to_thread(self._backend.image_info, spec.image)
            except SandboxError:
                return False  # its start will say what is wrong with the image
            if len(self._image_infos) >= IMAGE_INFOS:
                self._image_infos.pop(next(iter(self._image_infos)))
            self._image_infos[spec.image] = info
        return info.from_recipe and not info.entrypoint

    async def forget_network(self, instance_id: str) -> None:
        """Remove an instance's own network (HTTP servers), once its container is gone."""
        with contextlib.suppress(SandboxError):
            await asyncio.to_thread(http_networks.remove, self._backend, instance_id)

    async def prune_networks(self, keep: Iterable[str]) -> None:
        """Remove instance networks of instances not in `keep` (left by a crash)."""
        await asyncio.to_thread(http_networks.prune, self._backend, self._daemon_id, list(keep))

    def forget_instance_files_except(self, instance_ids: set[str]) -> None:
        """Remove the secret files of every instance but these (left by a crash)."""
        if self._delivery is not None:
            self._delivery.remove_all_except(instance_ids)
        self._pipes.remove_all_except(instance_ids)

    async def prune_egress(self, servers: Iterable[str]) -> None:
        """Remove egress gateways no server among `servers` needs any more."""
        wanted = set()
        for name in servers:
            egress = self._sandbox_policy(name).egress
            if egress is not None:
                wanted.add(gateway_key(name, egress))
        await asyncio.to_thread(self._egress.prune, wanted)

    async def _spec(
        self, definition: ServerDefinition, instance_id: str
    ) -> tuple[ContainerSpec, dict[str, bytes]]:
        """The container to create, and the secret values it is granted (for redaction)."""
        policy = self._sandbox_policy(definition.name)
        egress: EgressAttachment | None = None
        if policy.egress is not None:
            egress = await asyncio.to_thread(self._egress.ensure, definition.name, policy.egress)
        labels = {
            LABEL_DAEMON: self._daemon_id,
            LABEL_SERVER: definition.name,
            LABEL_INSTANCE: instance_id,
        }
        values = self.secret_values(definition.name, policy.secrets)
        secrets_mount = None
        if values:
            assert self._delivery is not None  # noqa: S101 - checked by secret_values
            user = policy.user or self._settings.container_user
            folder = await asyncio.to_thread(self._delivery.write, instance_id, values, user)
            secrets_mount = BindMount(source=str(folder), target=CONTAINER_TARGET)
        http_network = None
        if definition.transport != "stdio" and egress is None:
            http_network = await asyncio.to_thread(
                http_networks.ensure, self._backend, self._daemon_id, instance_id
            )
        spec = build_spec(
            self._settings,
            definition,
            policy,
            labels,
            egress,
            secrets_mount=secrets_mount,
            image_digests=await self.image_digests(definition, policy),
            http_network=http_network,
        )
        return spec, values

    async def image_digests(
        self, definition: ServerDefinition, policy: SandboxPolicy
    ) -> tuple[str, ...]:
        """What the registry's image resolves to, when the policy pins a digest."""
        if policy.image_digest is None or definition.image == policy.image:
            return ()
        return await asyncio.to_thread(self._backend.image_digests, definition.image)

    async def check_pins(self, definition: ServerDefinition) -> str | None:
        """Why `definition` cannot run under its sandbox policy's pins (registration)."""
        policy = self._sandbox_policy(definition.name)
        try:
            digests = await self.image_digests(definition, policy)
        except SandboxError as exc:
            return str(exc) if policy.image_digest else None
        return pin_problem(definition, policy, digests)

    def _refused(self, server: str, reason: str) -> None:
        """A start the sandbox policy refused: said in the log and on record, never silent."""
        with log_context(server=server):
            log.error("sandbox refused", reason=reason)
        if self._audit is not None:
            with contextlib.suppress(AuditUnavailable):
                self._audit.write("sandbox.refused", outcome="deny", server=server, reason=reason)

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
