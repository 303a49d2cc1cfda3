"""The container a server gets: its registry definition, capped by its sandbox policy.

The combining rule (also in the README): limits take the lower of registry and policy, the
runtime the stronger (runsc beats runc), a policy image pin refuses any other image, and
mounts, capabilities and network come from the policy alone. Mount sources are checked
again here, on the real filesystem (symlinks resolved), so that a link cannot smuggle the
Docker socket or Stockade's own state into a sandbox. A sandbox granted secrets pins its
image by digest and its command (`pin_problem`). Pure rules: nothing here starts anything.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from stockade.config import Settings
from stockade.logs import get_logger
from stockade.policy.sandbox import DOCKER_SOCKET_PATHS, SandboxPolicy, covers
from stockade.registry import ServerDefinition
from stockade.sandbox.egress import (
    FAST_DNS_FAILURE,
    NO_DNS,
    EgressAttachment,
)
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.spec import (
    BindMount,
    ContainerSpec,
)

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
