"""Speak just enough MCP to a sandboxed server to prove it serves: handshake and tools/list.

Used by the sandbox tests (a raw attach, no daemon) and by registration's trial sandbox
(`survey`: initialize, then the lists the server advertises, counted). This is a client of
the legacy (initialize) era, which every reference server speaks; it matches responses by id and
skips notifications and server logs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from stockade.sandbox.attached import AttachedStdio

PROBE_PROTOCOL_VERSION = "2025-06-18"


class ProbeError(Exception):
    """The server did not answer as an MCP server should."""


Send = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class Survey:
    """What a server said about itself: who it is, and how much it offers."""

    server_name: str
    server_version: str
    protocol_version: str
    tools: int
    prompts: int
    resources: int


async def _request(
    send: Send, lines: Any, request_id: int, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    await send(json.dumps(message, separators=(",", ":")).encode())
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
            stdio.send,
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
        listed = await _request(stdio.send, lines, 2, "tools/list", {})
        return init.get("serverInfo", {}), list(listed.get("tools", []))

    try:
        return await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise ProbeError(f"no answer within {timeout:.0f}s") from None


async def survey(send: Send, lines: AsyncIterator[bytes | object]) -> Survey:
    """initialize, then tools/prompts/resources list for each capability it declares.

    No timeout here: the caller bounds the whole survey (and watches the container).
    """
    init = await _request(
        send,
        lines,
        1,
        "initialize",
        {
            "protocolVersion": PROBE_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "stockade-trial", "version": "1"},
        },
    )
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    await send(json.dumps(note, separators=(",", ":")).encode())
    capabilities = init.get("capabilities")
    capabilities = capabilities if isinstance(capabilities, dict) else {}
    counts: dict[str, int] = {}
    for request_id, kind in enumerate(("tools", "prompts", "resources"), start=2):
        if kind not in capabilities:
            counts[kind] = 0
            continue
        listed = await _request(send, lines, request_id, f"{kind}/list", {})
        items = listed.get(kind)
        counts[kind] = len(items) if isinstance(items, list) else 0
    info = init.get("serverInfo")
    info = info if isinstance(info, dict) else {}
    return Survey(
        server_name=str(info.get("name", "")),
        server_version=str(info.get("version", "")),
        protocol_version=str(init.get("protocolVersion", "")),
        tools=counts["tools"],
        prompts=counts["prompts"],
        resources=counts["resources"],
    )
