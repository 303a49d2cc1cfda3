"""The container a server gets: its registry definition, capped by its sandbox policy.

The combining rule (also in the README): limits take the lower of registry and policy, the
runtime the stronger (runsc beats runc), a policy image pin refuses any other image, and
mounts, capabilities and network come from the policy alone. Mount sources are checked
again here, on the real filesystem (symlinks resolved), so that a link cannot smuggle the
Docker socket or Stockade's own state into a sandbox.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from stockade.config import Settings
from stockade.logs import get_logger
from stockade.policy.sandbox import DOCKER_SOCKET_PATHS, SandboxPolicy, covers
from stockade.registry import ServerDefinition
from stockade.sandbox.egress import FAST_DNS_FAILURE, NO_DNS, EgressAttachment
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.spec import BindMount, ContainerSpec

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
) -> ContainerSpec:
    """The hardened spec for one instance of `definition` under `policy`."""
    if policy.image is not None and policy.image != definition.image:
        raise SandboxRefused(
            f"server {definition.name!r} asks for image {definition.image!r}; its sandbox "
            f"policy ({policy.source}) allows only {policy.image!r}"
        )
    sandbox = definition.sandbox
    runtime = "runsc" if "runsc" in (sandbox.runtime, policy.runtime) else "runc"
    if runtime == "runsc" and egress is not None:
        raise SandboxRefused(
            f"server {definition.name!r}: runsc runs here with --network=none, so it cannot "
            "use an egress allowlist; choose runc for this server or drop the allowlist"
        )
    fields: dict[str, object] = {
        "image": definition.image,
        "command": definition.argv,
        "working_dir": definition.working_dir,
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


def sandbox_fingerprint(definition: ServerDefinition, policy: SandboxPolicy) -> str:
    """Changes whenever what an instance would be built from changes (pool freshness)."""
    text = definition.model_dump_json() + policy.model_dump_json()
    return hashlib.sha256(text.encode()).hexdigest()[:16]
