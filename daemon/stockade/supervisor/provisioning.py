"""What an instance is made from: its container spec, its secrets, its redaction, its egress.

`Provisioner` turns a registry definition into a started, attached `Instance`: it asks the
sandbox policy in force, sets up the egress gateway, delivers granted secrets as files, and
builds the redactor for what the server says. The supervisor decides *when* to start and
stop; this module decides *what* runs.

The combining rule (also in the README): limits take the lower of registry and policy, the
runtime the stronger (runsc beats runc), a policy image pin refuses any other image, and
mounts, capabilities and network come from the policy alone. Mount sources are checked
again here, on the real filesystem (symlinks resolved), so that a link cannot smuggle the
Docker socket or Stockade's own state into a sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.config import Settings
from stockade.logs import get_logger, log_context
from stockade.policy.sandbox import DEFAULT_SANDBOX, DOCKER_SOCKET_PATHS, SandboxPolicy, covers
from stockade.registry import ServerDefinition
from stockade.sandbox.egress import (
    FAST_DNS_FAILURE,
    NO_DNS,
    EgressAttachment,
    EgressError,
    EgressGateways,
    gateway_key,
)
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.http_channel import HttpTarget
from stockade.sandbox.instance import Instance, Redaction
from stockade.sandbox.runtime import SandboxRuntime
from stockade.sandbox.spec import (
    LABEL_DAEMON,
    LABEL_INSTANCE,
    LABEL_SERVER,
    BindMount,
    ContainerSpec,
)
from stockade.secrets.delivery import CONTAINER_TARGET, SecretDelivery
from stockade.secrets.model import SecretError, SecretStore
from stockade.secrets.redact import Redactor
from stockade.supervisor import http_networks

log = get_logger("stockade.supervisor")


class SandboxRefused(SandboxError):
    """The policy does not allow what the registry asks for; the server is not started."""


def _lower(registry: float | None, policy: float | None) -> float | None:
    values = [v for v in (registry, policy) if v is not None]
    return min(values) if values else None


def _checked_mounts(policy: SandboxPolicy, settings: Settings) -> tuple[BindMount, ...]:
    forbidden = [os.path.realpath(p) for p in DOCKER_SOCKET_PATHS]
    private = [os.path.realpath(settings.state_dir)]
    mounts = []
    for mount in policy.mounts:
        real = os.path.realpath(mount.source)
        if not Path(real).exists():
            raise SandboxRefused(f"mount source {mount.source} does not exist on this host")
        if real == "/" or any(covers(real, sock) for sock in forbidden):
            raise SandboxRefused(f"mount source {mount.source} ({real}) exposes the host")
        if any(covers(real, p) or covers(p, real) for p in private):
            raise SandboxRefused(f"mount source {mount.source} overlaps Stockade's state")
        mounts.append(BindMount(source=real, target=mount.target, read_only=not mount.rw))
    return tuple(mounts)


def build_spec(
    settings: Settings,
    definition: ServerDefinition,
    policy: SandboxPolicy,
    labels: dict[str, str],
    egress: EgressAttachment | None,
    *,
    secrets_mount: BindMount | None = None,
    image_digests: tuple[str, ...] = (),
    http_network: str | None = None,
) -> ContainerSpec:
    """The hardened spec for one instance of `definition` under `policy`.

    `image_digests` are what the registry's image resolves to (id and registry digests),
    needed when the policy pins a digest; the container is then made from the pinned digest
    itself, so a tag moved after the check cannot swap the image. `http_network`: the
    internal network a streamable-HTTP server is reached on (its own, when it has no egress
    network).
    """
    problem = pin_problem(definition, policy, image_digests)
    if problem is not None:
        raise SandboxRefused(problem)
    sandbox = definition.sandbox
    runtime = "runsc" if "runsc" in (sandbox.runtime, policy.runtime) else "runc"
    if runtime == "runsc" and definition.transport != "stdio":
        raise SandboxRefused(
            f"server {definition.name!r}: runsc runs here with --network=none, and a "
            "streamable-http server is reached over a network; choose runc for it"
        )
    if runtime == "runsc" and egress is not None:
        raise SandboxRefused(
            f"server {definition.name!r}: runsc runs here with --network=none, so it cannot "
            "use an egress allowlist; choose runc for this server or drop the allowlist"
        )
    fields: dict[str, object] = {
        "image": policy.image_digest or definition.run_image,
        "command": definition.argv,
        "working_dir": definition.working_dir,
        "environment": dict(definition.env),
        "runtime": runtime,
        "labels": labels,
        "cap_add": policy.capabilities,
        "mounts": _checked_mounts(policy, settings) + ((secrets_mount,) if secrets_mount else ()),
    }
    if policy.user is not None:
        fields["user"] = policy.user
    limits = {
        "memory_bytes": (
            sandbox.memory_bytes or settings.container_memory_bytes,
            policy.memory_bytes,
        ),
        "cpus": (sandbox.cpus or settings.container_cpus, policy.cpus),
        "pids_limit": (sandbox.pids_limit or settings.container_pids_limit, policy.pids),
    }
    for name, (asked, cap) in limits.items():
        fields[name] = _lower(asked, cap)
    if http_network is not None and egress is None:
        fields["network"] = http_network
    if egress is not None:
        fields |= {
            "network": egress.network,
            "extra_hosts": egress.extra_hosts,
            "dns": NO_DNS,
            "dns_options": FAST_DNS_FAILURE,
        }
    if policy.capabilities:
        log.warning(
            "starting a container with Linux capabilities",
            server=definition.name,
            capabilities=list(policy.capabilities),
            source=policy.source,
        )
    return ContainerSpec.from_settings(settings, **fields)


def pin_problem(
    definition: ServerDefinition, policy: SandboxPolicy, image_digests: tuple[str, ...] = ()
) -> str | None:
    """Why the registry's server is not what its sandbox policy pins (None: it is).

    The image: exactly the pinned reference, or, for a digest pin, the same repository
    resolving to that digest. The command: exactly, or starting with, the pinned argv.
    """
    where = f"server {definition.name!r}"
    source = policy.source or "the sandbox policy"
    if policy.image is not None and definition.image != policy.image:
        digest, repository = policy.image_digest, policy.image_repository
        if digest is None or image_repository(definition.image) != repository:
            return (
                f"{where} asks for image {definition.image!r}; {source} allows only "
                f"{policy.image!r}"
            )
        if digest not in image_digests:
            return (
                f"{where}: image {definition.image!r} is not the digest {source} pins "
                f"({digest}); secrets are never handed to another image"
            )
    command = policy.command_problem(definition.argv) or policy.working_dir_problem(
        definition.working_dir
    )
    if command is not None:
        return f"{where} {command} ({source}); secrets are never handed to another command"
    return None


def image_repository(image: str) -> str:
    """`name` of `name:tag` or `name@digest` (a registry port's colon is kept)."""
    name = image.partition("@")[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


@dataclass(frozen=True)
class EffectiveSandbox:
    """What an instance of a server would run with now (for `stockade server show`)."""

    runtime: str
    memory_bytes: int
    cpus: float
    pids_limit: int
    user: str
    egress: tuple[str, ...]
    mounts: tuple[str, ...]
    capabilities: tuple[str, ...]
    policy_source: str
    image_pin: str
    secrets: tuple[str, ...]


def effective_sandbox(
    settings: Settings, definition: ServerDefinition, policy: SandboxPolicy
) -> EffectiveSandbox:
    """The combining rule of `build_spec`, without starting anything or checking mounts."""
    sandbox = definition.sandbox
    asked_memory = sandbox.memory_bytes or settings.container_memory_bytes
    asked_cpus = sandbox.cpus or settings.container_cpus
    asked_pids = sandbox.pids_limit or settings.container_pids_limit
    return EffectiveSandbox(
        runtime="runsc" if "runsc" in (sandbox.runtime, policy.runtime) else "runc",
        memory_bytes=int(_lower(asked_memory, policy.memory_bytes) or asked_memory),
        cpus=float(_lower(asked_cpus, policy.cpus) or asked_cpus),
        pids_limit=int(_lower(asked_pids, policy.pids) or asked_pids),
        user=policy.user or settings.container_user,
        egress=tuple(policy.egress.egress) if policy.egress else (),
        mounts=tuple(f"{m.source} -> {m.target} ({'rw' if m.rw else 'ro'})" for m in policy.mounts),
        capabilities=policy.capabilities,
        policy_source=policy.source,
        image_pin=policy.image or "",
        secrets=policy.secrets,
    )


def sandbox_fingerprint(definition: ServerDefinition, policy: SandboxPolicy) -> str:
    """Changes whenever what an instance would be built from changes (pool freshness)."""
    text = definition.model_dump_json() + policy.model_dump_json()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
            self.forget_secrets(instance_id)
            if definition.transport != "stdio":
                await self.forget_network(instance_id)
            if isinstance(exc, SandboxRefused | EgressError):  # a refusal, not a fault
                self._refused(definition.name, str(exc))
            raise
        try:
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
            )
        except BaseException:
            self.forget_secrets(instance_id)
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
        )
        instance.sandbox_fingerprint = fingerprint
        return instance

    def secret_values(self, server: str, names: tuple[str, ...]) -> dict[str, bytes]:
        if not names:
            return {}
        if self._secrets is None or self._delivery is None:
            raise SandboxRefused(f"server {server!r} is granted secrets but no store is set up")
        try:
            return {name: self._secrets.get(name) for name in names}
        except SecretError as exc:
            raise SandboxRefused(f"server {server!r}: {exc}") from None

    def forget_secrets(self, instance_id: str) -> None:
        """Remove an instance's secret files (they go with its container)."""
        if self._delivery is not None:
            self._delivery.remove(instance_id)

    async def forget_network(self, instance_id: str) -> None:
        """Remove an instance's own network (HTTP servers), once its container is gone."""
        with contextlib.suppress(SandboxError):
            await asyncio.to_thread(http_networks.remove, self._backend, instance_id)

    async def prune_networks(self, keep: Iterable[str]) -> None:
        """Remove instance networks of instances not in `keep` (left by a crash)."""
        await asyncio.to_thread(http_networks.prune, self._backend, self._daemon_id, list(keep))

    def forget_secrets_except(self, instance_ids: set[str]) -> None:
        """Remove the secret files of every instance but these (left by a crash)."""
        if self._delivery is not None:
            self._delivery.remove_all_except(instance_ids)

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
