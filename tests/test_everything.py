"""A real MCP host (the official Python SDK) using server-everything through Stockade.

Exercises both directions of the relay: tools, progress notifications, the server's own
requests to the host (sampling, elicitation, roots/list) answered by the SDK's callbacks,
and a cancelled call after which the session carries on.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters, types

from tests.daemon_helper import BIN, Daemon, running_daemon

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("everything")) as running:
        running.add_server("everything", "stockade/node:latest", "mcp-server-everything", warm=2)
        running.issue_host("sdk-host")
        yield running


def server_params(daemon: Daemon, server: str = "everything") -> StdioServerParameters:
    command, *args = daemon.bridge(server, daemon.hosts["sdk-host"])
    return StdioServerParameters(command=command, args=args)


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def test_tools_and_progress(daemon: Daemon) -> None:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async def scenario() -> tuple[set[str], str, str]:
        async with Client(server_params(daemon), mode="legacy") as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            total = await client.call_tool("get-sum", {"a": 2, "b": 40})
            long = await client.call_tool(
                "trigger-long-running-operation",
                {"duration": 1, "steps": 3},
                progress_callback=on_progress,
            )
            return names, text_of(total), text_of(long)

    names, total, long = anyio.run(scenario)
    assert {"echo", "get-sum", "trigger-long-running-operation"} <= names
    assert "42" in total
    assert "completed" in long.lower()
    assert progress == [1, 2, 3]


def test_server_requests_reach_the_host_callbacks(daemon: Daemon) -> None:
    asked: dict[str, Any] = {}

    async def sampling(context: Any, params: types.CreateMessageRequestParams) -> Any:
        asked["sampling"] = params.messages[0].content
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="sampled through stockade"),
            model="test-model",
            stopReason="endTurn",
        )

    async def elicitation(context: Any, params: types.ElicitRequestParams) -> Any:
        asked["elicitation"] = params.message
        return types.ElicitResult(action="accept", content={"name": "Ada Lovelace"})

    async def roots(context: Any) -> Any:
        asked["roots"] = True
        return types.ListRootsResult(roots=[types.Root(uri="file:///data", name="data")])

    async def scenario() -> tuple[str, str, str]:
        async with Client(
            server_params(daemon),
            mode="legacy",
            sampling_callback=sampling,
            elicitation_callback=elicitation,
            list_roots_callback=roots,
        ) as client:
            sampled = await client.call_tool("trigger-sampling-request", {"prompt": "hello"})
            elicited = await client.call_tool("trigger-elicitation-request", {})
            listed = await client.call_tool("get-roots-list", {})
            return text_of(sampled), text_of(elicited), text_of(listed)

    sampled, elicited, listed = anyio.run(scenario)
    assert "sampled through stockade" in sampled
    assert "Ada Lovelace" in elicited
    assert "file:///data" in listed
    assert set(asked) == {"sampling", "elicitation", "roots"}


def test_a_cancelled_call_leaves_the_session_working(daemon: Daemon) -> None:
    started = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        started.set()

    async def scenario() -> tuple[bool, str]:
        async with Client(server_params(daemon), mode="legacy") as client:
            cancelled = False
            async with anyio.create_task_group() as group:

                async def long_call() -> None:
                    await client.call_tool(
                        "trigger-long-running-operation",
                        {"duration": 30, "steps": 30},
                        progress_callback=on_progress,
                    )

                group.start_soon(long_call)
                with anyio.fail_after(20):
                    await started.wait()
                group.cancel_scope.cancel()
                cancelled = True
            after = await client.call_tool("get-sum", {"a": 1, "b": 1})
            return cancelled, text_of(after)

    cancelled, after = anyio.run(scenario)
    assert cancelled
    assert "2" in after


def test_a_2026_07_28_exchange_through_stockade(daemon: Daemon) -> None:
    """No initialize handshake: the SDK client pins the modern protocol version."""
    daemon.cli(
        "server",
        "add",
        "modern",
        "--image",
        "stockade/python:latest",
        "--warm",
        "0",
        "--",
        "python",
        "/opt/mcp/servers/modern_server.py",
    )
    params = server_params(daemon, "modern")

    async def scenario() -> tuple[list[str], Any]:
        async with Client(params, mode="2026-07-28") as client:
            tools = await client.list_tools()
            result = await client.call_tool("add", {"a": 20, "b": 22})
            return [t.name for t in tools.tools], result.structured_content

    names, result = anyio.run(scenario)
    assert sorted(names) == ["add", "shout"]
    assert result == {"result": 42}


def test_server_discover_passes_through_untouched(daemon: Daemon) -> None:
    daemon.cli(
        "server",
        "add",
        "modern2",
        "--image",
        "stockade/python:latest",
        "--warm",
        "0",
        "--",
        "python",
        "/opt/mcp/servers/modern_server.py",
    )
    args = server_params(daemon, "modern2").args
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    discover = {
        "jsonrpc": "2.0",
        "id": "d-1",
        "method": "server/discover",
        "params": {"_meta": meta, "x-unknown-field": {"kept": True}},
    }
    result = subprocess.run(
        [str(BIN / "stockade"), *args],
        input=json.dumps(discover) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=daemon.env,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["id"] == "d-1"
    assert answer["result"]["supportedVersions"] == ["2026-07-28"]
    assert answer["result"]["resultType"] == "complete"
