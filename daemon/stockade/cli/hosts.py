"""MCP host configuration: the entry that runs `stockade connect NAME`, for each host's file.

Each host keeps its MCP servers in a JSON file under its own key. We write one entry per
Stockade server: the absolute path of `stockade`, `connect NAME`, and explicit socket and
certificate paths (hosts start their servers with a minimal environment, so nothing may
depend on variables). Merging keeps every other key and server in the file, replaces only
entries of the same name, keeps a timestamped backup, and refuses a file it cannot parse
(VS Code allows comments: we never rewrite what we could not read).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _home() -> Path:
    return Path.home()


def _claude_desktop_path() -> Path:
    if sys.platform == "darwin":
        return _home() / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
    base = os.environ.get("XDG_CONFIG_HOME") or str(_home() / ".config")
    return Path(base) / "Claude" / "claude_desktop_config.json"


@dataclass(frozen=True)
class HostFormat:
    name: str
    key: str  # the top-level key holding servers
    default_path: Callable[[], Path]
    extra: dict[str, str] = field(default_factory=dict)  # fields every entry carries


HOSTS: dict[str, HostFormat] = {
    "claude-desktop": HostFormat("claude-desktop", "mcpServers", _claude_desktop_path),
    "claude-code": HostFormat(
        "claude-code", "mcpServers", lambda: _home() / ".claude.json", {"type": "stdio"}
    ),
    "cursor": HostFormat("cursor", "mcpServers", lambda: _home() / ".cursor" / "mcp.json"),
    "vscode": HostFormat(
        "vscode", "servers", lambda: Path.cwd() / ".vscode" / "mcp.json", {"type": "stdio"}
    ),
}


class HostConfigError(Exception):
    """The host's file cannot be read or written safely; nothing was changed."""


def server_entries(
    host: HostFormat, servers: list[str], stockade: Path, connect_args: list[str]
) -> dict[str, dict[str, Any]]:
    """One entry per server: `stockade connect NAME` with explicit connection flags."""
    return {
        name: {**host.extra, "command": str(stockade), "args": ["connect", name, *connect_args]}
        for name in servers
    }


def merged(document: dict[str, Any], host: HostFormat, entries: dict[str, Any]) -> dict[str, Any]:
    """`document` with `entries` under the host's key; everything else is kept as it was."""
    existing = document.get(host.key, {})
    if not isinstance(existing, dict):
        raise HostConfigError(f"{host.key!r} in the file is not an object; fix it by hand")
    return {**document, host.key: {**existing, **entries}}


def read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError) as exc:
        raise HostConfigError(
            f"cannot parse {path} ({exc}); it may hold comments. Add the entry printed by "
            "`stockade client config` by hand"
        ) from None
    if not isinstance(document, dict):
        raise HostConfigError(f"{path} is not a JSON object")
    return document


def write_config(path: Path, host: HostFormat, entries: dict[str, Any]) -> Path | None:
    """Merge `entries` into the file (atomically); return the backup made, if any."""
    document = merged(read_config(path), host, entries)
    backup = None
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        backup = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(path, backup)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return backup
