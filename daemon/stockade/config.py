"""Daemon settings: `STOCKADE_*` environment variables over an optional TOML file.

Validated once at start. A bad value stops the daemon with one line that names the setting
(`SettingsError`), never a traceback and never a silent fallback to a default.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from stockade.paths import (
    ENV_PREFIX,
    SYSTEM_CONFIG_FILE,
    default_socket_path,
    default_state_dir,
    is_root,
)


def check_loopback(address: str) -> str:
    """HOST:PORT with a loopback HOST (the endpoint is unauthenticated)."""
    host, _, port = address.rpartition(":")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback or not port.isdigit():
        raise ValueError("metrics listen on a loopback address only, e.g. 127.0.0.1:9464")
    return address


MiB = 1024 * 1024

# The TOML file chosen for the settings being loaded now (pydantic-settings builds sources
# from the class, so the path travels in a context variable rather than a global).
_config_file: ContextVar[Path | None] = ContextVar("stockade_config_file", default=None)


class SettingsError(Exception):
    """A setting is missing, malformed or out of range; the message is one line."""


def default_policy_dir() -> Path:
    """`/etc/stockade/policies` for root, `$XDG_CONFIG_HOME/stockade/policies` otherwise."""
    if is_root():
        return Path("/etc/stockade/policies")
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "stockade" / "policies"


def default_secrets_runtime_dir() -> Path:
    """A tmpfs folder: /run/stockade/secrets where /run is a tmpfs, else under /dev/shm."""
    run = Path("/run")
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if fields[1] == str(run) and fields[2] == "tmpfs":
                return run / "stockade" / "secrets"
    # /dev/shm is shared: SecretDelivery refuses the folder unless we own it, mode 0700.
    return Path("/dev/shm/stockade-secrets")  # noqa: S108


def default_stdio_pipes_dir() -> Path:
    """Next to the secrets folder: /run/stockade/stdio, else /dev/shm/stockade-stdio."""
    secrets = default_secrets_runtime_dir()
    if secrets.name == "secrets":
        return secrets.parent / "stdio"
    return Path("/dev/shm/stockade-stdio")  # noqa: S108


class Settings(BaseSettings):
    """Everything the daemon can be told. Field names map to `STOCKADE_<NAME>` and TOML keys."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",  # a misspelt key in the TOML file is an error, not ignored
        validate_default=True,
    )

    state_dir: Path = Field(default_factory=default_state_dir)
    socket_path: Path = Field(default_factory=default_socket_path)
    policy_dir: Path = Field(default_factory=default_policy_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    # Listeners. The Unix socket is always on; TCP is optional. Both require mTLS: there is
    # no setting that turns TLS off.
    tcp_address: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.\-]+:\d{1,5}$")
    tls_names: list[str] = Field(default_factory=list)  # extra DNS names / IPs for TCP clients
    # The framed relay (api/frames.py) that `stockade connect` uses: always on the Unix socket
    # next to `socket_path` (paths.relay_socket_path); on TCP as well when this is set.
    relay_tcp_address: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.\-]+:\d{1,5}$")

    # Relay limits.
    max_message_bytes: int = Field(default=4 * MiB, ge=1024, le=256 * MiB)
    # After a host's last message, how long its session waits for the answers it is owed.
    session_drain_seconds: float = Field(default=30.0, ge=0, le=600)
    # A request with no answer after this long gets MCP's -32001 (and the server a cancel).
    request_timeout_seconds: float = Field(default=300.0, ge=0.1, le=86400)
    # Quotas: what one caller can make the daemon spend. Past one, a session is refused
    # with a clear error (gRPC RESOURCE_EXHAUSTED, HTTP 429) naming the quota.
    quota_sessions_per_identity: int = Field(default=32, ge=1, le=100_000)
    quota_http_sessions_per_identity: int = Field(default=16, ge=1, le=100_000)
    quota_opens_per_identity_per_minute: int = Field(default=120, ge=1, le=1_000_000)
    quota_instances_per_server: int = Field(default=64, ge=1, le=100_000)
    # Fairness: what one server's output may cost the event loop every session shares.
    # Lines (stdout and stderr) and bytes a second read from one instance; past them its
    # output is not read for a while (the container waits in its own write, nothing is lost).
    server_output_lines_per_second: int = Field(default=5000, ge=100, le=1_000_000)
    server_output_bytes_per_second: int = Field(default=16 * MiB, ge=64 * 1024, le=1024 * MiB)
    # Server notifications relayed to hosts a second per instance (burst: 10 seconds' worth);
    # past them they are dropped, counted in one log line a second and one audit record a
    # minute. Answers are never dropped.
    server_notifications_per_second: int = Field(default=100, ge=1, le=100_000)
    # Concurrent Relay.Connect streams for the whole daemon; the Control API has its own
    # budget on top, so that hosts holding every stream never lock an admin out.
    max_relay_streams: int = Field(default=256, ge=1, le=100_000)

    # Hardened container defaults; a server may ask for less, never silently for more.
    container_memory_bytes: int = Field(default=256 * MiB, ge=16 * MiB)
    container_cpus: float = Field(default=1.0, gt=0, le=64)
    container_pids_limit: int = Field(default=64, ge=8, le=65536)
    container_tmpfs_bytes: int = Field(default=64 * MiB, ge=MiB, le=1024 * MiB)
    container_user: str = "10001:10001"
    stop_grace_seconds: float = Field(default=5.0, ge=0, le=300)
    # Audit log (state_dir/audit): group commit for allowed traffic (denials are fsynced
    # before the caller hears), a signed checkpoint every N records or T seconds, and
    # rotation by size (the chain continues across files).
    audit_fsync_interval_ms: float = Field(default=10.0, ge=0, le=1000)
    audit_checkpoint_records: int = Field(default=1000, ge=1, le=1_000_000)
    audit_checkpoint_seconds: float = Field(default=10.0, gt=0, le=3600)
    audit_max_file_bytes: int = Field(default=64 * MiB, ge=4096)
    # Disk headroom: below audit_reserve_bytes free, records are refused (and requests with
    # them) until space returns, when the log resumes by itself; below audit_warn_free_bytes,
    # `stockade status` warns first.
    audit_reserve_bytes: int = Field(default=32 * MiB, ge=0)
    audit_warn_free_bytes: int = Field(default=256 * MiB, ge=0)
    # The daemon's copy of its last signed head and its witnesses' acknowledgements: kept
    # outside the audit folder (best on another filesystem). Default: STATE_DIR/audit-anchor
    audit_anchor_dir: Path | None = None
    # Witnesses: every signed checkpoint also leaves the host. A witness that cannot be
    # reached is retried with backoff (shown in `stockade status`); traffic never waits.
    # An append-only file, on another filesystem (opened O_APPEND, fsynced per checkpoint).
    audit_witness_file: Path | None = None
    # A syslog collector: RFC 5424 over TLS (RFC 5425 octet-counted framing), HOST:PORT.
    audit_witness_syslog: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$"
    )
    audit_witness_syslog_ca: Path | None = None  # the collector's CA (default: the system's)
    # An HTTPS endpoint the checkpoint is POSTed to (application/json); 2xx acknowledges.
    audit_witness_https: str | None = Field(default=None, pattern=r"^https://")
    audit_witness_https_ca: Path | None = None  # its CA (default: the system's)

    # Secrets: where they are kept, and where instances get them (a tmpfs folder).
    secrets_backend: Literal["local", "vault"] = "local"
    # The local store's master key file (0600); a systemd credential named
    # stockade-master-key ($CREDENTIALS_DIRECTORY) takes precedence. Default: STATE_DIR/master.key
    secrets_key_file: Path | None = None
    secrets_runtime_dir: Path = Field(default_factory=default_secrets_runtime_dir)
    # A session's own stdio server speaks over two named pipes in this folder instead of
    # the engine's attach socket (sandbox/stdio_pipes.py: two fewer copies each way).
    stdio_pipes: bool = True
    stdio_pipes_dir: Path = Field(default_factory=default_stdio_pipes_dir)
    # OpenBao / HashiCorp Vault, KV version 2 (secrets_backend = "vault"). TLS is verified;
    # plain http is accepted for a loopback address only.
    vault_address: str | None = None
    vault_mount: str = "secret"
    vault_prefix: str = "stockade"
    vault_token_file: Path | None = None
    vault_role_id: str | None = None  # AppRole, with vault_secret_id_file
    vault_secret_id_file: Path | None = None
    vault_ca_bundle: Path | None = None

    # The Streamable HTTP front (https://HOST:PORT/servers/NAME/mcp), off when unset. TLS
    # always; callers present a client certificate (mTLS), as on the gRPC listeners.
    http_address: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
    # Browser origins allowed to call it; a request with any other Origin header gets 403.
    http_allowed_origins: list[str] = Field(default_factory=list)
    # An HTTP session unused this long is ended and its sandbox stopped.
    http_session_idle_seconds: float = Field(default=1800.0, ge=10, le=86400)

    # Prometheus /metrics on a loopback HOST:PORT (e.g. 127.0.0.1:9464); off when unset.
    metrics_address: str | None = None

    # The routed network egress forwarders reach destinations through ("bridge": Docker's
    # default). Servers themselves never join it.
    egress_network: str = Field(default="bridge", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
    # Pooled containers older than this are replaced: a long-idle server gets a fresh start.
    pool_max_age_seconds: float = Field(default=3600.0, ge=1, le=7 * 86400)
    # Instances starting at once (0: twice the cores): a start is CPU-bound, and a burst of
    # hosts is served sooner, first come first served, than if all start together.
    max_concurrent_starts: int = Field(default=0, ge=0, le=1024)
    # A start holds its slot until its server first answers, or this long at most.
    start_settle_seconds: float = Field(default=2.0, ge=0, le=60)

    @field_validator("state_dir", "socket_path", "policy_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @field_validator("metrics_address")
    @classmethod
    def _loopback_metrics(cls, value: str | None) -> str | None:
        return None if value is None else check_loopback(value)

    @field_validator("container_user")
    @classmethod
    def _non_root_user(cls, value: str) -> str:
        uid = value.split(":", 1)[0]
        if not uid.isdigit() or int(uid) == 0:
            raise ValueError("must be a numeric non-root uid[:gid], e.g. 10001:10001")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, then environment, then the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def _describe(error: ValidationError) -> str:
    """One line naming the first bad setting, its environment variable and what is wrong."""
    first = error.errors()[0]
    name = ".".join(str(part) for part in first["loc"]) or "(settings)"
    if first["type"] == "extra_forbidden":
        return f"unknown setting {name!r} (check the spelling; see `stockaded --help-settings`)"
    env_name = ENV_PREFIX + name.upper()
    return f"bad setting {name} (env {env_name}): {first['msg']}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load and validate settings once.

    `config_file` is the `--config` path (must exist); without it the system file is read if
    present. Raises `SettingsError` with a one-line message on any problem.
    """
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"config file {config_file} does not exist")
    chosen = config_file or (SYSTEM_CONFIG_FILE if SYSTEM_CONFIG_FILE.is_file() else None)
    if chosen is not None:
        try:  # tomllib's message carries line and column; pydantic-settings would hide it
            tomllib.loads(chosen.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {chosen}: {exc}") from None
        except OSError as exc:
            raise SettingsError(f"config file {chosen}: {exc.strerror}") from None
    token = _config_file.set(chosen)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        where = f" in {chosen}" if chosen else ""
        raise SettingsError(_describe(exc) + where) from None
    finally:
        _config_file.reset(token)


def setting_names() -> list[str]:
    """Every setting with its environment variable, for `--help-settings`."""
    return [f"{name} (env {ENV_PREFIX}{name.upper()})" for name in Settings.model_fields]
