"""The official MCP SDK client (PyPI `mcp`) as hosts use it: sequential `tools/call`s over
stdio or Streamable HTTP, each one timed from the call to its result.

A session initialises (legacy handshake, what today's hosts do), makes `WARMUP` calls that
are not timed, then `calls` timed ones. `on_timed` runs after the warm-up, just before the
first timed call (to find the processes and start the meters), and `meters` are stopped
right after the last one, so they see exactly the timed calls.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from bench.measure import Meters

WARMUP = 20


class Tool:
    """The call every row makes: a tool name and its arguments."""

    def __init__(self, name: str, arguments: dict[str, Any]) -> None:
        self.name = name
        self.arguments = arguments


TIME = Tool("get_current_time", {"timezone": "UTC"})
ECHO = Tool("echo", {"text": "hello"})


async def _timed(
    client: Client,
    tool: Tool,
    calls: int,
    meters: Meters | None,
    on_timed: Callable[[], None] | None,
) -> list[float]:
    for _ in range(WARMUP):
        await client.call_tool(tool.name, tool.arguments)
    if on_timed is not None:
        on_timed()
    if meters is not None:
        meters.start()
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        result = await client.call_tool(tool.name, tool.arguments)
        times.append(time.perf_counter() - began)
        if result.is_error:
            raise RuntimeError(f"{tool.name} failed: {result}")
    if meters is not None:
        meters.stop()
    return times


def over_stdio(
    argv: list[str],
    tool: Tool,
    calls: int,
    *,
    env: dict[str, str] | None = None,
    meters: Meters | None = None,
    on_timed: Callable[[], None] | None = None,
) -> list[float]:
    """The SDK's stdio client launching `argv` as its server."""
    params = StdioServerParameters(command=argv[0], args=argv[1:], env=env)

    async def run() -> list[float]:
        async with Client(params, mode="legacy") as client:
            return await _timed(client, tool, calls, meters, on_timed)

    return anyio.run(run)


def client_tls(credentials: Path) -> ssl.SSLContext:
    """Trust the daemon's CA and present the host certificate in `credentials`."""
    context = ssl.create_default_context(cafile=str(credentials / "ca.crt"))
    context.load_cert_chain(credentials / "client.crt", credentials / "client.key")
    return context


def over_http(
    url: str,
    tool: Tool,
    calls: int,
    *,
    tls: ssl.SSLContext | None = None,
    meters: Meters | None = None,
    on_timed: Callable[[], None] | None = None,
) -> list[float]:
    """The SDK's Streamable HTTP client, given an httpx client (with the cert, for HTTPS)."""

    async def run() -> list[float]:
        http = httpx2.AsyncClient(verify=tls, timeout=60) if tls else httpx2.AsyncClient(timeout=60)
        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as c:
            return await _timed(c, tool, calls, meters, on_timed)

    return anyio.run(run)
