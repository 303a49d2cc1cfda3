"""Servers that speak streamable HTTP inside their sandbox (issue 17).

The MCP SDK's own server runs in streamable-http mode in a container; the SDK client uses it
through `stockade connect`, exactly as it would a stdio server. The daemon reaches the
container on an internal network of that instance alone: no published port, no route out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client, StdioServerParameters

from stockade.sandbox.images import ImageBuilder
from stockade.supervisor.http_networks import LABEL_OWNER
from tests.daemon_helper import BIN, Daemon, HostSession, running_daemon
from tests.daemon_helper import INIT_PARAMS as INIT

pytestmark = [pytest.mark.docker]

SERVER = """
import asyncio
from mcp.server.mcpserver import Context, MCPServer
server = MCPServer("http-in-a-box")
@server.tool()
def add(a: int, b: int) -> int:
    return a + b
@server.tool()
async def later(ctx: Context) -> str:
    async def poke():
        await asyncio.sleep(0.5)
        await ctx.session.send_log_message("info", "said later", logger="later")
    asyncio.get_running_loop().create_task(poke())
    return "scheduled"
server.run(transport="streamable-http", host="0.0.0.0", port=8000)
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, images: ImageBuilder) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("http-transport")) as running:
        running.issue_host("web-host")
        yield running


def networks(daemon: Daemon) -> list[dict[str, Any]]:
    client = docker.from_env()
    found: list[dict[str, Any]] = client.api.networks(
        filters={"label": f"{LABEL_OWNER}={daemon.daemon_id}"}
    )
    return found


def test_the_sdk_client_uses_an_http_server_in_its_sandbox(daemon: Daemon) -> None:
    added = daemon.cli(
        "server",
        "add",
        "web",
        "--image",
        "stockade/python:latest",
        "--warm",
        "0",
        "--transport",
        "streamable-http",
        "--port",
        "8000",
        "--",
        "python3",
        "-c",
        SERVER,
    )
    assert "answered: http-in-a-box" in added.stdout
    assert "2 tools" in added.stdout
    assert networks(daemon) == []  # the trial's network went with its container
    params = StdioServerParameters(
        command=str(BIN / "stockade"), args=daemon.bridge("web", daemon.hosts["web-host"])[1:]
    )
    client_api = docker.from_env().api

    async def scenario() -> tuple[list[str], str, list[dict[str, Any]], dict[str, Any]]:
        async with Client(params) as client:
            tools = await client.list_tools()
            result = await client.call_tool("add", {"a": 2, "b": 3})
            container = client_api.inspect_container(daemon.containers()[0]["Id"])
            return (
                [t.name for t in tools.tools],
                result.content[0].text,
                networks(daemon),
                container,
            )

    names, total, during, container = anyio.run(scenario)
    assert sorted(names) == ["add", "later"]
    assert json.loads(total) == 5
    # One network, the instance's own, internal; nothing published on the host.
    assert [n["Name"] for n in during] == list(container["NetworkSettings"]["Networks"])
    assert all(n["Internal"] for n in during)
    assert not container["HostConfig"]["PortBindings"]
    assert container["Config"]["User"] == "10001:10001"


def test_an_http_server_that_does_not_listen_is_refused(daemon: Daemon) -> None:
    result = daemon.cli(
        "server",
        "add",
        "deaf",
        "--image",
        "stockade/python:latest",
        "--check-timeout",
        "5",
        "--transport",
        "streamable-http",
        "--port",
        "8000",
        "--",
        "python3",
        "-c",
        "import time; time.sleep(60)",
        check=False,
    )
    assert result.returncode != 0
    line = result.stderr.strip()
    assert "\n" not in line
    assert "no answer to initialize within 5s" in line or "HTTP endpoint failed" in line
    assert daemon.containers() == []
    assert networks(daemon) == []


def test_a_streamable_http_server_needs_a_port(daemon: Daemon, tmp_path: Path) -> None:
    result = daemon.cli(
        "server",
        "add",
        "noport",
        "--image",
        "stockade/python:latest",
        "--transport",
        "streamable-http",
        "--",
        "python3",
        check=False,
    )
    assert result.returncode != 0
    assert "needs its port" in result.stderr


def test_what_the_server_says_outside_a_request_reaches_the_host(daemon: Daemon) -> None:
    """A notification sent after its request ended travels on the server's GET stream."""

    async def scenario() -> dict[str, Any] | None:
        async with HostSession(daemon, "web") as host:
            await host.request("initialize", INIT)
            await host.send_raw(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
            await host.request("tools/call", {"name": "later", "arguments": {}})

            def changed() -> dict[str, Any] | None:
                wanted = "notifications/message"
                return next((m for m in host.messages if m.get("method") == wanted), None)

            await host.wait_for(lambda: changed() is not None, 15)
            return changed()

    assert asyncio.run(scenario()) is not None
