"""Speak just enough MCP to a sandboxed server to prove it serves: handshake and tools/list.

Used by the sandbox tests (a raw attach, no daemon). This is a client of the legacy
(initialize) era, which every reference server speaks; it matches responses by id and
skips notifications and server logs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from stockade.sandbox.attached import AttachedStdio

PROBE_PROTOCOL_VERSION = "2025-06-18"


class ProbeError(Exception):
    """The server did not answer as an MCP server should."""


async def _request(
    stdio: AttachedStdio, lines: Any, request_id: int, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    await stdio.send(json.dumps(message, separators=(",", ":")).encode())
    async for line in lines:
        if not isinstance(line, bytes):
            raise ProbeError("the server sent a line longer than the limit")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise ProbeError(f"the server wrote a non-JSON line to stdout: {line[:80]!r}") from None
        if isinstance(reply, dict) and reply.get("id") == request_id and "method" not in reply:
            if "error" in reply:
                raise ProbeError(f"{method} failed: {reply['error']}")
            result: dict[str, Any] = reply.get("result", {})
            return result
    raise ProbeError(f"the server closed its output before answering {method}")


async def list_tools(
    stdio: AttachedStdio, timeout: float = 30.0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """initialize + notifications/initialized + tools/list; returns (server info, tools)."""
    lines = stdio.lines()

    async def run() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        init = await _request(
            stdio,
            lines,
            1,
            "initialize",
            {
                "protocolVersion": PROBE_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "stockade-probe", "version": "1"},
            },
        )
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await stdio.send(json.dumps(note, separators=(",", ":")).encode())
        listed = await _request(stdio, lines, 2, "tools/list", {})
        return init.get("serverInfo", {}), list(listed.get("tools", []))

    try:
        return await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise ProbeError(f"no answer within {timeout:.0f}s") from None
