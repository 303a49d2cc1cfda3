"""Sandbox policy: how a server's container may run, written by the security team.

```yaml
sandboxes:
  filesystem:                    # a registered server's name
    runtime: runsc               # at least this isolation: runsc is never lowered to runc
    memory_mb: 256               # caps: the registry may ask for less, never for more
    cpus: 0.5
    pids: 64
    user: "10001:10001"          # numeric, never root
    image: stockade/node@sha256:…  # pin: any other image in the registry is refused at start
    command: [mcp-server-filesystem, /data]   # pin the argv (or command_prefix: [...])
    capabilities: []             # none unless listed; each one listed is logged as a warning
    mounts:
      - {source: /srv/data, target: /data}          # read-only unless `rw: true`
    secrets: [github-token]      # names; delivered as files (see the Secrets section)
    network:                     # `none` (the default), or an egress allowlist:
      egress: ["api.github.com:443"]
      allow_addresses: []        # CIDRs the SSRF guard lets through (private ranges)
```

The policy **caps** what the registry asks for: limits take the lower value, the runtime
the stronger one, and mounts, capabilities, secrets and network come from the policy only.
An operator who registers a server therefore cannot widen its sandbox; only a policy can.

Secrets are bound to what may read them: a sandbox that is granted secrets must pin the
image by digest (`NAME@sha256:…`) and the command (`command` exactly, or `command_prefix`),
so that no registration (`server add --replace … -- sh -c 'base64 /run/secrets/…'`) can run
something else with them. Only a policy change can.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stockade.config import MiB

Runtime = Literal["runc", "runsc"]
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

# Capabilities that break the container boundary outright; no policy may grant them.
FORBIDDEN_CAPABILITIES = frozenset(
    {
        "ALL",
        "SYS_ADMIN",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_PTRACE",
        "SYS_BOOT",
        "DAC_READ_SEARCH",
        "MAC_ADMIN",
        "MAC_OVERRIDE",
        "BPF",
        "PERFMON",
        "NET_ADMIN",
        "SYSLOG",
    }
)
KNOWN_CAPABILITIES = frozenset(
    {
        "AUDIT_CONTROL",
        "AUDIT_READ",
        "AUDIT_WRITE",
        "BLOCK_SUSPEND",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "IPC_LOCK",
        "IPC_OWNER",
        "KILL",
        "LEASE",
        "LINUX_IMMUTABLE",
        "MKNOD",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_RAW",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
        "SYS_NICE",
        "SYS_PACCT",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "WAKE_ALARM",
        "CHECKPOINT_RESTORE",
    }
)
# Host paths whose exposure hands over the host: the engine's socket and what holds it.
DOCKER_SOCKET_PATHS = ("/var/run/docker.sock", "/run/docker.sock")
# Container paths a mount may not cover: the kernel's views and Stockade's own.
RESERVED_TARGETS = ("/", "/proc", "/sys", "/dev", "/run/secrets", "/tmp")  # noqa: S108
HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9]([A-Za-z0-9.-]{0,252}))" r":(?P<port>[0-9]{1,5})$")


def _absolute_normal(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{what} {path!r} must be an absolute path")
    if posixpath.normpath(path) != path.rstrip("/") and path != "/":
        raise ValueError(f"{what} {path!r} must be written without '.', '..' or '//'")
    return path.rstrip("/") or "/"


def covers(parent: str, child: str) -> bool:
    """True when `child` is `parent` or lies under it."""
    return parent in ("/", child) or child.startswith(parent + "/")


class MountPolicy(BaseModel):
    """A host path bound into the container; read-only unless `rw: true`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    target: str
    rw: bool = False

    @field_validator("source")
    @classmethod
    def _safe_source(cls, value: str) -> str:
        value = _absolute_normal(value, "source")
        if value == "/":
            raise ValueError("the host's root directory is never mounted")
        for socket_path in DOCKER_SOCKET_PATHS:
            if covers(value, socket_path):
                raise ValueError(f"{value!r} exposes the Docker socket; it is never mounted")
        return value

    @field_validator("target")
    @classmethod
    def _safe_target(cls, value: str) -> str:
        value = _absolute_normal(value, "target")
        for reserved in RESERVED_TARGETS:
            if value == reserved or (reserved != "/" and covers(reserved, value)):
                raise ValueError(f"target {value!r} is reserved ({reserved})")
        return value


class Destination(BaseModel):
    """One allowed `host:port`."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class EgressPolicy(BaseModel):
    """The only destinations a server can reach, through the daemon's egress gateway."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    egress: tuple[str, ...] = Field(min_length=1)
    allow_addresses: tuple[str, ...] = ()

    @field_validator("egress")
    @classmethod
    def _host_ports(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            match = HOST_PORT.match(entry)
            if not match or not 0 < int(match["port"]) < 65536:
                raise ValueError(f"{entry!r} is not host:port (e.g. api.github.com:443)")
            try:
                ipaddress.ip_address(match["host"])
            except ValueError:
                continue
            raise ValueError(
                f"{entry!r}: give a name, not an address (list the address in allow_addresses)"
            )
        return tuple(sorted(set(value), key=value.index))

    @field_validator("allow_addresses")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an address or CIDR") from None
        return value

    @property
    def destinations(self) -> tuple[Destination, ...]:
        result = []
        for entry in self.egress:
            host, _, port = entry.rpartition(":")
            result.append(Destination(host=host.lower(), port=int(port)))
        return tuple(result)


class SandboxPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str | None = Field(default=None, min_length=1)
    command: tuple[str, ...] | None = Field(default=None, min_length=1)
    command_prefix: tuple[str, ...] | None = Field(default=None, min_length=1)
    # With a pinned command, the working directory is pinned too (the image's own when
    # unset): `node dist/index.js` runs different code in another directory.
    working_dir: str | None = None
    user: str | None = None
    runtime: Runtime | None = None
    memory_mb: int | None = Field(default=None, ge=16)
    cpus: float | None = Field(default=None, gt=0, le=64)
    pids: int | None = Field(default=None, ge=8, le=65536)
    capabilities: tuple[str, ...] = ()
    mounts: tuple[MountPolicy, ...] = ()
    secrets: tuple[str, ...] = ()
    network: EgressPolicy | None = None  # written `none` (or left out) for no network
    # Where it was written: filled by the loader, for explanations.
    source: str = Field(default="", exclude=True)

    @field_validator("network", mode="before")
    @classmethod
    def _none_or_allowlist(cls, value: object) -> object:
        if value is None or value == "none":
            return None
        if not isinstance(value, dict | EgressPolicy):
            raise ValueError("write `none`, or an allowlist: {egress: [host:port, ...]}")
        return value

    @field_validator("user")
    @classmethod
    def _never_root(cls, value: str | None) -> str | None:
        if value is not None:
            uid = value.split(":", 1)[0]
            if not uid.isdigit() or int(uid) == 0:
                raise ValueError("containers run as a numeric non-root uid (e.g. 10001:10001)")
        return value

    @field_validator("capabilities")
    @classmethod
    def _capabilities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        normal = tuple(cap.upper().removeprefix("CAP_") for cap in value)
        for cap in normal:
            if cap in FORBIDDEN_CAPABILITIES:
                raise ValueError(f"capability {cap} breaks the sandbox; it is never granted")
            if cap not in KNOWN_CAPABILITIES:
                raise ValueError(f"{cap!r} is not a Linux capability")
        return normal

    @field_validator("mounts")
    @classmethod
    def _distinct_targets(cls, value: tuple[MountPolicy, ...]) -> tuple[MountPolicy, ...]:
        targets = [mount.target for mount in value]
        for target in targets:
            if targets.count(target) > 1:
                raise ValueError(f"two mounts share the target {target!r}")
        return value

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
                raise ValueError(f"{name!r} is not a secret name (letters, digits, _ . -)")
        return value

    @model_validator(mode="after")
    def _secrets_are_pinned(self) -> SandboxPolicy:
        if self.command is not None and self.command_prefix is not None:
            raise ValueError("give command or command_prefix, not both")
        if self.secrets and not (
            self.image_digest is not None
            and (self.command is not None or self.command_prefix is not None)
        ):
            raise ValueError(
                "a sandbox granted secrets must pin its image by digest "
                "(image: NAME@sha256:...) and its command (command: [...] or "
                "command_prefix: [...]): otherwise a registration could run anything with them"
            )
        return self

    @property
    def image_digest(self) -> str | None:
        """The sha256 digest the image is pinned to (`NAME@sha256:HEX`), if it is."""
        if self.image is None:
            return None
        _, at, digest = self.image.partition("@")
        return digest if at and DIGEST.fullmatch(digest) else None

    @property
    def image_repository(self) -> str | None:
        return None if self.image is None else self.image.partition("@")[0]

    def command_problem(self, argv: tuple[str, ...]) -> str | None:
        """Why `argv` is not the pinned command (None: it is, or none is pinned)."""
        if self.command is not None and argv != self.command:
            return f"runs {list(argv)}; the policy pins the command to {list(self.command)}"
        prefix = self.command_prefix
        if prefix is not None and argv[: len(prefix)] != prefix:
            return f"runs {list(argv)}; the policy pins the command prefix {list(prefix)}"
        return None

    def working_dir_problem(self, working_dir: str | None) -> str | None:
        """Why `working_dir` is not the pinned one, when the command is pinned."""
        if self.command is None and self.command_prefix is None:
            return None
        if working_dir != self.working_dir:
            pinned = self.working_dir or "the image's own"
            return f"runs in {working_dir!r}; the policy pins the working directory ({pinned})"
        return None

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory_mb is None else self.memory_mb * MiB

    @property
    def egress(self) -> EgressPolicy | None:
        return self.network


DEFAULT_SANDBOX = SandboxPolicy()
