"""Where the daemon's sockets and state are, read without the settings machinery.

`config.py` validates every setting with pydantic when the daemon starts. The bridge a host
launches once per session (`stockade connect`) needs only where the daemon listens and where
credentials are, and must start fast, so these few are read here from the same sources (a
`STOCKADE_*` variable over the system TOML file over the default) with the standard library
only. `config.py` takes its defaults from here, so both always agree.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_PREFIX = "STOCKADE_"
SYSTEM_CONFIG_FILE = Path("/etc/stockade/stockaded.toml")
RELAY_SOCKET_INFIX = "-relay"


class PathSettingError(Exception):
    """A path setting the bridge reads is malformed; the message is one line."""


def is_root() -> bool:
    return os.geteuid() == 0


def default_state_dir() -> Path:
    """`/var/lib/stockade` for root, `$XDG_STATE_HOME/stockade` (or ~/.local/state) otherwise."""
    if is_root():
        return Path("/var/lib/stockade")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "stockade"


def default_socket_path() -> Path:
    """`/run/stockade/stockaded.sock` for root, `$XDG_RUNTIME_DIR/stockade/` otherwise."""
    if is_root():
        return Path("/run/stockade/stockaded.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/stockade-{os.geteuid()}"  # noqa: S108
    return Path(runtime) / "stockade" / "stockaded.sock"


def relay_socket_path(socket_path: Path) -> Path:
    """The framed relay's Unix socket: next to the gRPC one, `-relay` before its suffix
    (`stockaded.sock` -> `stockaded-relay.sock`). Derived, not a setting of its own, so that
    a bridge told `--socket` always finds the relay that belongs to it."""
    return socket_path.with_name(socket_path.stem + RELAY_SOCKET_INFIX + socket_path.suffix)


def read_path_setting(name: str, default: Path) -> Path:
    """A path setting as the daemon reads it: environment, then the system TOML file."""
    value: object = os.environ.get(ENV_PREFIX + name.upper())
    if value is None and SYSTEM_CONFIG_FILE.is_file():
        import tomllib  # noqa: PLC0415 - only when the file exists

        try:
            value = tomllib.loads(SYSTEM_CONFIG_FILE.read_text(encoding="utf-8")).get(name)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PathSettingError(f"config file {SYSTEM_CONFIG_FILE}: {exc}") from None
    if value is None:
        return default
    if not isinstance(value, str) or not Path(value).is_absolute():
        raise PathSettingError(
            f"bad setting {name} (env {ENV_PREFIX}{name.upper()}): must be an absolute path"
        )
    return Path(value)
