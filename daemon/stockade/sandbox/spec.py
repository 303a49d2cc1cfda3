"""What a sandboxed container is allowed to be: the hardened defaults in one place.

A `ContainerSpec` can only be built with the hardened flags on (read-only root, no
capabilities, no-new-privileges, a non-root user, bounded memory/cpu/pids, a noexec tmpfs,
Docker's default seccomp profile). There is no field that turns any of them off.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stockade.config import MiB, Settings

LABEL_PREFIX = "io.stockade"
LABEL_MANAGED = f"{LABEL_PREFIX}.managed"
LABEL_DAEMON = f"{LABEL_PREFIX}.daemon-id"
LABEL_SERVER = f"{LABEL_PREFIX}.server"
LABEL_INSTANCE = f"{LABEL_PREFIX}.instance"
LABEL_SESSION = f"{LABEL_PREFIX}.session"

Runtime = Literal["runc", "runsc"]
NETWORK_NAME = r"^(none|[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127})$"


class BindMount(BaseModel):
    """A host path in the container. The policy layer decides which paths are allowed;
    this only guarantees the shape (absolute paths, read-only unless said otherwise)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(pattern=r"^/.+")
    target: str = Field(pattern=r"^/.+")
    read_only: bool = True


class ContainerSpec(BaseModel):
    """One container to create. Immutable; hardened flags are not fields and cannot be unset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(min_length=1)
    command: tuple[str, ...] = ()
    working_dir: str | None = None
    user: str = "10001:10001"
    runtime: Runtime = "runc"
    # "none", or the server's internal egress network (no route out but the gateway)
    network: str = Field(default="none", pattern=NETWORK_NAME)
    extra_hosts: dict[str, str] = Field(default_factory=dict)  # allowed name -> gateway IP
    dns: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()  # only what a sandbox policy granted, by name
    mounts: tuple[BindMount, ...] = ()
    bind_low_ports: bool = False  # egress forwarders listen on 443 etc. without a capability
    memory_bytes: int = Field(default=256 * MiB, ge=16 * MiB)
    cpus: float = Field(default=1.0, gt=0, le=64)
    pids_limit: int = Field(default=64, ge=8, le=65536)
    tmpfs_bytes: int = Field(default=64 * MiB, ge=MiB)
    labels: dict[str, str] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)  # never secrets: inspectable

    @field_validator("user")
    @classmethod
    def _never_root(cls, value: str) -> str:
        uid = value.split(":", 1)[0]
        if not uid.isdigit() or int(uid) == 0:
            raise ValueError("containers run as a numeric non-root uid")
        return value

    @field_validator("labels")
    @classmethod
    def _no_reserved_override(cls, value: dict[str, str]) -> dict[str, str]:
        # Labels are visible to anyone who can `docker inspect`: they must never carry
        # secrets, and only the supervisor sets Stockade's own labels.
        for key in value:
            if not key.startswith(f"{LABEL_PREFIX}."):
                raise ValueError(f"label {key!r} is outside the {LABEL_PREFIX}.* namespace")
        return value

    @classmethod
    def from_settings(cls, settings: Settings, **fields: object) -> ContainerSpec:
        """A spec with the daemon's configured limits, overridden by `fields`."""
        defaults: dict[str, object] = {
            "user": settings.container_user,
            "memory_bytes": settings.container_memory_bytes,
            "cpus": settings.container_cpus,
            "pids_limit": settings.container_pids_limit,
            "tmpfs_bytes": settings.container_tmpfs_bytes,
        }
        return cls.model_validate(defaults | fields)

    @property
    def tmpfs_options(self) -> str:
        return f"rw,noexec,nosuid,nodev,size={self.tmpfs_bytes}"
