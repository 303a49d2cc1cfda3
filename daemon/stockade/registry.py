"""Server definitions: what MCP servers the operator registered, persisted in the state dir.

One JSON file, sealed by the daemon and anchored in the audit trail (`state_seal.py`), and
replaced atomically, so a crash leaves either the old registry or the new one. Definitions are
validated with pydantic; errors name the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stockade.config import MiB
from stockade.state_seal import StateSeal

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
MAX_ENV_VALUE = 4096
SHIM_COMMAND = "stockade-secret-env"  # in stockade/base, see sandbox-images/base
REGISTRY_FILE = "servers.json"
SEAL_NAME = "servers"
SCHEMA_VERSION = 1


class RegistryError(Exception):
    """A definition is invalid, or the registry file cannot be read or written."""


class UnknownServer(RegistryError):
    pass


class ServerExists(RegistryError):
    pass


class SandboxSettings(BaseModel):
    """Per-server sandbox choices; None means the daemon's hardened default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: Literal["runc", "runsc"] = "runc"
    memory_bytes: int | None = Field(default=None, ge=16 * MiB)
    cpus: float | None = Field(default=None, gt=0, le=64)
    pids_limit: int | None = Field(default=None, ge=8, le=65536)
    network: Literal["none"] = "none"


class ServerSource(BaseModel):
    """Where a server's image came from, pinned at registration (see `stockade server show`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["image", "pypi", "npm"] = "image"
    package: str | None = None
    version: str | None = None
    digest: str | None = None  # image: the repository digest, when the image has one
    lock_hash: str | None = None
    recipe_hash: str | None = None
    index: str | None = None
    image_user: str | None = None  # the image's own USER; instances run as the daemon's
    system_packages: tuple[str, ...] = ()  # Debian packages added to a package's image


class TrialReport(BaseModel):
    """What answered in the trial sandbox when the server was registered."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server_name: str = ""
    server_version: str = ""
    protocol_version: str = ""
    tools: int = 0
    prompts: int = 0
    resources: int = 0
    at: float = 0.0
    seconds: float = 0.0


class ServerDefinition(BaseModel):
    """A registered MCP server: the image, the command, and how it is sandboxed and shared."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    image: str = Field(min_length=1)
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    working_dir: str | None = None
    sandbox: SandboxSettings = SandboxSettings()
    shared: bool = False
    warm_pool: int = Field(default=1, ge=0, le=16)
    restart_policy: Literal["on-failure", "never"] = "on-failure"
    # The image pinned at registration (an image id, sha256:...): instances run exactly it,
    # so a re-tagged or rebuilt `image` never changes a registered server silently.
    image_id: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    source: ServerSource | None = None
    checked: TrialReport | None = None
    # Environment: plain values (visible to `docker inspect`: never secrets), and variables
    # filled from vault secrets by the `stockade-secret-env` shim (VAR -> secret name).
    # How the host's messages reach the server: its stdin/stdout, or streamable HTTP on
    # `port` + `path` inside the container (reached over an internal network, never a
    # published port).
    transport: Literal["stdio", "streamable-http"] = "stdio"
    port: int | None = Field(default=None, ge=1, le=65535)
    path: str = Field(default="/mcp", pattern=r"^/[A-Za-z0-9/_.~-]{0,200}$")
    env: dict[str, str] = Field(default_factory=dict, max_length=64)
    secret_env: dict[str, str] = Field(default_factory=dict, max_length=32)

    @field_validator("env", "secret_env")
    @classmethod
    def _variables(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not re.fullmatch(ENV_NAME, name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if len(item) > MAX_ENV_VALUE or "\0" in item:
                raise ValueError(f"the value of {name} is too long or holds a NUL")
        return value

    @model_validator(mode="after")
    def _http_needs_a_port(self) -> ServerDefinition:
        if self.transport == "streamable-http" and self.port is None:
            raise ValueError("a streamable-http server needs its port (--port N)")
        return self

    @property
    def run_image(self) -> str:
        """What instances are created from: the pinned id, else the reference as given."""
        return self.image_id or self.image

    @property
    def argv(self) -> tuple[str, ...]:
        """The command line; through the secret shim when variables come from secrets."""
        if not self.secret_env:
            return self.command + self.args
        pairs = tuple(f"{var}={secret}" for var, secret in sorted(self.secret_env.items()))
        return (SHIM_COMMAND, *pairs, "--", *self.command, *self.args)


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line naming the first bad field, e.g. `sandbox.memory_bytes: Input should be ...`."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(definition)"
    return f"{prefix}{field}: {first['msg']}"


def parse_definition(data: dict[str, object]) -> ServerDefinition:
    try:
        return ServerDefinition.model_validate(data)
    except ValidationError as exc:
        raise RegistryError(describe_validation_error(exc)) from None


class Registry:
    """The registered servers, loaded at start and saved on every change."""

    def __init__(self, state_dir: Path, seal: StateSeal) -> None:
        self._path = state_dir / REGISTRY_FILE
        self._seal = seal
        self._servers: dict[str, ServerDefinition] = {}
        self._load()

    @property
    def path(self) -> Path:
        return self._path

    def _load(self) -> None:
        try:
            # Sealed: a writer of the state folder cannot add, edit or roll back a server.
            document = self._seal.load(self._path, SEAL_NAME)
        except OSError as exc:
            raise RegistryError(f"cannot read {self._path}: {exc}") from None
        if document is None:
            return
        if not isinstance(document, dict) or document.get("version") != SCHEMA_VERSION:
            raise RegistryError(f"{self._path}: unknown format (expected version {SCHEMA_VERSION})")
        for index, item in enumerate(document.get("servers", [])):
            try:
                definition = ServerDefinition.model_validate(item)
            except ValidationError as exc:
                raise RegistryError(
                    describe_validation_error(exc, f"{self._path}: servers[{index}].")
                ) from None
            self._servers[definition.name] = definition

    def _save(self) -> None:
        document = {
            "version": SCHEMA_VERSION,
            "servers": [d.model_dump(mode="json") for d in self._servers.values()],
        }
        self._seal.save(self._path, SEAL_NAME, document)

    def all(self) -> list[ServerDefinition]:
        return sorted(self._servers.values(), key=lambda d: d.name)

    def get(self, name: str) -> ServerDefinition:
        try:
            return self._servers[name]
        except KeyError:
            raise UnknownServer(
                f"no server named {name!r} is registered (see `stockade server ls`)"
            ) from None

    def add(self, definition: ServerDefinition, replace: bool = False) -> ServerDefinition:
        if definition.name in self._servers and not replace:
            raise ServerExists(
                f"server {definition.name!r} is already registered (use --replace to redefine it)"
            )
        previous = self._servers.get(definition.name)
        self._servers[definition.name] = definition
        try:
            self._save()
        except OSError as exc:
            if previous is None:
                del self._servers[definition.name]
            else:
                self._servers[definition.name] = previous
            raise RegistryError(f"cannot save {self._path}: {exc.strerror}") from None
        return definition

    def remove(self, name: str) -> ServerDefinition:
        definition = self.get(name)
        del self._servers[name]
        try:
            self._save()
        except OSError as exc:
            self._servers[name] = definition
            raise RegistryError(f"cannot save {self._path}: {exc.strerror}") from None
        return definition
