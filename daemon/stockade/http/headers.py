"""The Streamable HTTP protocol's headers: versions, content negotiation, routing headers.

Pure functions over a request's headers (and the parsed body, for the 2026-07-28 routing
headers), kept apart from the front's sessions and lifecycle.
"""

from __future__ import annotations

import base64
import functools

from aiohttp import web

from stockade.relay import jsonrpc
from stockade.relay.jsonrpc import Kind

SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
LEGACY_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
MODERN_VERSIONS = frozenset({"2026-07-28"})
METHOD_HEADER, NAME_HEADER = "Mcp-Method", "Mcp-Name"
NAME_BEARING = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"


# A client sends the same Accept on every request. Bounded: 64 values of at most aiohttp's
# 8 KiB header line.
@functools.lru_cache(maxsize=64)
def prefers_json(accept: str) -> bool:
    """Whether the client ranks application/json above text/event-stream (q, then order)."""
    ranks: dict[str, tuple[float, int]] = {}
    for position, part in enumerate(accept.split(",")):
        media, *parameters = (item.strip() for item in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranks.setdefault(media.lower(), (-quality, position))
    json_rank = ranks.get("application/json")
    sse_rank = ranks.get("text/event-stream")
    return json_rank is not None and (sse_rank is None or json_rank < sse_rank)


def no_modern_stream(request: web.Request) -> None:
    if request.headers.get(VERSION_HEADER) in MODERN_VERSIONS:
        raise web.HTTPMethodNotAllowed(
            request.method,
            ["POST"],
            text="2026-07-28 has no GET or DELETE here: every request is a POST",
        )


def header_mismatch(request: web.Request, message: jsonrpc.Message) -> str | None:
    """Why the 2026-07-28 routing headers disagree with the body, or None when they agree."""
    params = message.params or {}
    meta = params.get("_meta") if isinstance(params, dict) else None
    version = meta.get(VERSION_META_KEY) if isinstance(meta, dict) else None
    if request.headers.get(VERSION_HEADER) != version:
        return f"{VERSION_HEADER} does not match the request's _meta protocol version"
    if message.kind is not Kind.RESPONSE and request.headers.get(METHOD_HEADER) != message.method:
        return f"{METHOD_HEADER} does not match the request body's method"
    name_key = NAME_BEARING.get(message.method or "")
    named = params.get(name_key) if name_key and isinstance(params, dict) else None
    if named is not None and decoded(request.headers.get(NAME_HEADER)) != named:
        return f"{NAME_HEADER} does not match the request body's {name_key!r}"
    return None


def decoded(value: str | None) -> str | None:
    """A header value, with MCP's `=?base64?...?=` form for non-ASCII names undone."""
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    try:
        return base64.b64decode(value[9:-2], validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
