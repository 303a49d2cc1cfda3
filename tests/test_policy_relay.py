"""The access policy enforced by the relay, with real servers and the real SDK client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from mcp import Client, StdioServerParameters, types

from tests.daemon_helper import Daemon, HostSession, running_daemon, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

POLICY_DENIED = -32010
POLICY = """\
version: 1
rules:
  - name: alice-asks-european-time
    effect: allow
    identities: ["spiffe://stockade.local/host/alice"]
    servers: ["time"]
    methods: ["tools/call"]
    names: ["get_current_time"]
    arguments:
      timezone: {pattern: "Europe/.*"}
    audit_arguments: true
  - name: alice-echoes
    effect: allow
    identities: ["spiffe://stockade.local/host/alice"]
    servers: ["scratch"]
    methods: ["scratch/echo"]
  - name: alice-uses-everything
    effect: allow
    identities: ["spiffe://stockade.local/host/alice"]
    servers: ["everything"]
    methods: ["tools/call"]
    names: ["trigger-sampling-request", "get-sum"]
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("policy"), policy=POLICY) as running:
        running.add_server("time", "stockade/python:latest", "mcp-server-time", warm=1)
        running.add_server("everything", "stockade/node:latest", "mcp-server-everything")
        running.add_scratch_server("scratch", "--warm", "0")
        running.issue_host("alice")
        running.issue_host("bob")
        yield running


def client(daemon: Daemon, server: str, who: Path, **callbacks: Any) -> Client:
    command, *args = daemon.bridge(server, who)
    return Client(StdioServerParameters(command=command, args=args), mode="legacy", **callbacks)


def test_a_denied_tool_is_hidden_and_refused(daemon: Daemon) -> None:
    async def scenario() -> tuple[list[str], str]:
        async with client(daemon, "time", daemon.hosts["alice"]) as alice:
            names = [t.name for t in (await alice.list_tools()).tools]
            allowed = await alice.call_tool("get_current_time", {"timezone": "Europe/Oslo"})
            text = "".join(c.text for c in allowed.content if isinstance(c, types.TextContent))
            return names, text

    names, allowed = anyio.run(scenario)
    assert names == ["get_current_time"]
    assert json.loads(allowed)["timezone"] == "Europe/Oslo"

    async def refused() -> tuple[dict[str, Any], dict[str, Any]]:
        init = {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        }
        async with HostSession(daemon, "time", daemon.hosts["alice"]) as host:
            await host.request("initialize", init)
            hidden = await host.request(
                "tools/call",
                {
                    "name": "convert_time",
                    "arguments": {
                        "source_timezone": "UTC",
                        "time": "12:00",
                        "target_timezone": "UTC",
                    },
                },
            )
            outside = await host.request(
                "tools/call", {"name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}}
            )
            return hidden, outside

    hidden, outside = asyncio.run(refused())
    assert hidden["error"]["code"] == POLICY_DENIED
    assert "no rule allows" in hidden["error"]["message"]
    assert outside["error"]["code"] == POLICY_DENIED
    assert "'timezone' does not match" in outside["error"]["message"]
    assert outside["error"]["data"]["rule"] == "alice-asks-european-time"
    assert "Asia/Tokyo" not in outside["error"]["message"]  # reasons never echo values


def test_a_refused_request_never_reaches_the_server(daemon: Daemon) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], str]:
        async with HostSession(daemon, "scratch", daemon.hosts["alice"]) as host:
            echoed = await host.request("scratch/echo", {"x": 1})
            written = await host.request("scratch/write", {"text": "not allowed"})
            return echoed, written, daemon.cli("server", "logs", "scratch").stdout

    echoed, written, logs = asyncio.run(scenario())
    assert echoed["result"]["echo"] == {"x": 1}
    assert written["error"]["code"] == POLICY_DENIED
    assert "got scratch/echo" in logs
    assert "got scratch/write" not in logs


def test_an_identity_without_rules_gets_no_session_and_no_sandbox(daemon: Daemon) -> None:
    started_before = len(daemon.containers())

    async def scenario() -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with HostSession(daemon, "scratch", daemon.hosts["bob"]):
                pass
        return refused.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://stockade.local/host/bob" in (error.details() or "")
    assert "no sandbox started" in (error.details() or "")
    assert len(daemon.containers()) == started_before  # scratch has no warm pool: none made


def test_sampling_is_refused_unless_the_policy_lists_it(daemon: Daemon) -> None:
    asked: list[str] = []

    async def sampling(context: Any, params: types.CreateMessageRequestParams) -> Any:
        asked.append("sampling")
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="x"),
            model="m",
            stopReason="endTurn",
        )

    async def scenario() -> types.CallToolResult:
        async with client(
            daemon,
            "everything",
            daemon.hosts["alice"],
            sampling_callback=sampling,
        ) as alice:
            return await alice.call_tool("trigger-sampling-request", {"prompt": "hi"})

    result = anyio.run(scenario)
    assert asked == []  # the host never saw the request
    text = " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
    assert result.is_error or "denied by policy" in text
    logged = daemon.log_path.read_text()
    assert "policy denied a server request" in logged


def test_a_broken_policy_is_refused_and_the_old_one_applies(daemon: Daemon) -> None:
    good = (daemon.policy_dir / "test.yaml").read_text()
    broken = daemon.write_policy(good.replace("effect: allow", "effect: perhaps", 1))
    assert daemon.process is not None
    os.kill(daemon.process.pid, signal.SIGHUP)
    wait_until(lambda: "policy refused" in daemon.log_path.read_text(), 10, "the refusal")
    refusal = next(
        json.loads(line)
        for line in daemon.log_path.read_text().splitlines()
        if '"policy refused' in line
    )
    assert f"{broken}:4: rules.0.effect" in refusal["error"]

    async def still_allowed() -> dict[str, Any]:
        async with HostSession(daemon, "scratch", daemon.hosts["alice"]) as host:
            return await host.request("scratch/echo", {"old": "policy"})

    assert asyncio.run(still_allowed())["result"]["echo"] == {"old": "policy"}
    # A fixed file is picked up without a signal (the folder is watched): here the fix
    # takes echo away, and the next echo is refused.
    daemon.write_policy(good.replace('methods: ["scratch/echo"]', 'methods: ["scratch/read"]'))
    wait_until(lambda: daemon.log_path.read_text().count('"policy loaded"') >= 2, 10, "the reload")
    answer = asyncio.run(still_allowed())
    assert answer["error"]["code"] == POLICY_DENIED
    daemon.write_policy(good)


def test_capabilities_the_caller_cannot_use_are_not_advertised(daemon: Daemon) -> None:
    async def scenario() -> dict[str, Any]:
        init = {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        }
        async with HostSession(daemon, "everything", daemon.hosts["alice"]) as host:
            return await host.request("initialize", init)

    capabilities = asyncio.run(scenario())["result"]["capabilities"]
    assert "tools" in capabilities  # alice may call two tools
    assert "prompts" not in capabilities  # server-everything has prompts; no rule lets her
    assert "resources" not in capabilities


def test_every_decision_above_is_in_the_audit_log(daemon: Daemon) -> None:
    """Runs after the tests above (same daemon): their decisions are all on record."""
    audit_dir = daemon.state_dir / "audit"

    def records() -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for path in sorted(audit_dir.glob("audit-*.jsonl"))
            for line in path.read_text().splitlines()
        ]

    def found(**fields: Any) -> bool:
        return any(all(r.get(k) == v for k, v in fields.items()) for r in records())

    alice = "spiffe://stockade.local/host/alice"
    expected = [
        {
            "type": "request",
            "outcome": "allow",
            "identity": alice,
            "server": "time",
            "action": "tools/call",
            "target": "get_current_time",
            "rule": "alice-asks-european-time",
            "arguments": {"timezone": "Europe/Oslo"},  # the rule asks for them on record
        },
        {
            "type": "request",
            "outcome": "deny",
            "identity": alice,
            "target": "convert_time",
            "rule": None,
        },
        {
            "type": "request",
            "outcome": "deny",
            "identity": alice,
            "target": "get_current_time",
            "rule": "alice-asks-european-time",
        },
        {
            "type": "request",
            "outcome": "allow",
            "server": "scratch",
            "action": "scratch/echo",
            "rule": "alice-echoes",
        },
        {"type": "request", "outcome": "deny", "server": "scratch", "action": "scratch/write"},
        {
            "type": "session.open",
            "outcome": "deny",
            "identity": "spiffe://stockade.local/host/bob",
            "server": "scratch",
        },
        {
            "type": "server_request",
            "outcome": "deny",
            "server": "everything",
            "action": "sampling/createMessage",
        },
        {"type": "response", "outcome": "ok", "server": "scratch", "action": "scratch/echo"},
        {"type": "session.open", "outcome": "ok", "server": "time", "identity": alice},
        {"type": "policy.refused", "outcome": "error"},
    ]
    for fields in expected:
        wanted = {k: v for k, v in fields.items() if v is not None}
        if "rule" in fields and fields["rule"] is None:
            assert found(**wanted) and not any(
                all(r.get(k) == v for k, v in wanted.items()) and "rule" in r for r in records()
            ), fields
        else:
            assert found(**wanted), f"no audit record like {fields}"
    text = "".join(p.read_text() for p in audit_dir.glob("audit-*.jsonl"))
    convert = next(r for r in records() if r.get("target") == "convert_time")
    assert "arguments" not in convert and len(convert["args_sha256"]) == 64  # a digest only
    assert '"source_timezone"' not in text  # no rule asked for convert_time's arguments
    key = str(daemon.state_dir / "pki" / "audit-key.pub")
    verified = daemon.cli("audit", "verify", "--dir", str(audit_dir), "--key", key)
    assert verified.stdout.startswith("OK:"), verified.stdout
