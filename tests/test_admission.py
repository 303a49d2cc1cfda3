"""Admission: quotas bound what one identity can make the daemon spend; admins stay in.

A real daemon, real sandboxes. The quotas are set low through settings so that a test
can reach them with a few sessions.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest

from tests.daemon_helper import Daemon, HostSession, free_port, running_daemon

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    address = f"127.0.0.1:{free_port()}"
    with running_daemon(
        tmp_path_factory.mktemp("admission"),
        STOCKADE_QUOTA_SESSIONS_PER_IDENTITY="2",
        STOCKADE_QUOTA_HTTP_SESSIONS_PER_IDENTITY="2",
        STOCKADE_MAX_RELAY_STREAMS="3",
        STOCKADE_HTTP_ADDRESS=address,
    ) as running:
        running.add_scratch_server("scratch", "--warm", "0")
        running.issue_host("greedy")
        running.issue_host("polite")
        running.issue_host("web")
        running.http_base = f"https://{address}/servers"
        yield running


def audit_records(daemon: Daemon) -> list[dict[str, Any]]:
    folder = daemon.state_dir / "audit"
    return [
        json.loads(line)
        for path in sorted(folder.glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


async def refused(daemon: Daemon, credentials: Path) -> grpc.aio.AioRpcError:
    try:
        async with HostSession(daemon, "scratch", credentials):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the session was opened")


def test_an_identity_past_its_session_quota_is_refused_and_others_are_not(
    daemon: Daemon,
) -> None:
    greedy, polite = daemon.hosts["greedy"], daemon.hosts["polite"]

    async def scenario() -> tuple[list[grpc.aio.AioRpcError], str]:
        async with AsyncExitStack() as stack:
            for _ in range(2):  # its quota
                await stack.enter_async_context(HostSession(daemon, "scratch", greedy))
            over = [await refused(daemon, greedy) for _ in range(5)]
            async with HostSession(daemon, "scratch", polite) as other:
                answer = await other.request("scratch/echo", {"who": "polite"})
            return over, json.dumps(answer["result"])

    over, answer = asyncio.run(scenario())
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in over)
    assert "sessions_per_identity = 2" in (over[0].details() or "")
    assert '"polite"' in answer  # another identity still gets a working session
    denials = [
        r
        for r in audit_records(daemon)
        if r.get("type") == "session.open"
        and r.get("outcome") == "deny"
        and r.get("identity") == "spiffe://stockade.local/host/greedy"
    ]
    # Five refusals in one window: one record, not five (a caller cannot grow the log).
    assert len(denials) == 1
    assert denials[0]["detail"]["quota"] == "sessions_per_identity"


def test_hosts_holding_every_relay_stream_do_not_lock_an_admin_out(daemon: Daemon) -> None:
    greedy, polite = daemon.hosts["greedy"], daemon.hosts["polite"]

    async def scenario() -> tuple[grpc.aio.AioRpcError, str]:
        async with AsyncExitStack() as stack:
            for who in (greedy, greedy, polite):  # max_relay_streams = 3
                await stack.enter_async_context(HostSession(daemon, "scratch", who))
            beyond = await refused(daemon, polite)
            status = await asyncio.to_thread(daemon.cli, "status", "--json")
            return beyond, status.stdout

    beyond, status = asyncio.run(scenario())
    assert beyond.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_relay_streams" in (beyond.details() or "")
    assert json.loads(status)["version"]  # the Control API answered meanwhile


def test_an_http_session_past_the_quota_ends_the_callers_least_recently_used(
    daemon: Daemon,
) -> None:
    creds = daemon.hosts["web"]
    context = ssl.create_default_context(cafile=str(creds / "ca.crt"))
    context.load_cert_chain(creds / "client.crt", creds / "client.key")
    url = f"{daemon.http_base}/scratch/mcp"
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}},
    }
    ping = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "scratch/echo"})

    async def scenario() -> list[int]:
        async with httpx2.AsyncClient(verify=context, timeout=60) as client:
            ids = []
            for _ in range(3):  # the quota is 2: the third open ends the first session
                opened = await client.post(url, content=json.dumps(init), headers=headers)
                assert opened.status_code == 200
                ids.append(opened.headers["Mcp-Session-Id"])
            return [
                (
                    await client.post(
                        url, content=ping, headers={**headers, "Mcp-Session-Id": session}
                    )
                ).status_code
                for session in ids
            ]

    assert asyncio.run(scenario()) == [404, 200, 200]


def test_opens_on_made_up_server_names_cannot_grow_the_audit_log(daemon: Daemon) -> None:
    audit = daemon.state_dir / "audit"
    before = sum(p.stat().st_size for p in audit.glob("audit-*.jsonl"))
    name = "n" * 1_000_000

    async def scenario() -> list[grpc.aio.AioRpcError]:
        errors = []
        for _ in range(10):
            try:
                async with HostSession(daemon, name, daemon.hosts["polite"]):
                    pass
            except grpc.aio.AioRpcError as exc:
                errors.append(exc)
        return errors

    errors = asyncio.run(scenario())
    grown = sum(p.stat().st_size for p in audit.glob("audit-*.jsonl")) - before
    assert len(errors) == 10 and all(e.code() == grpc.StatusCode.NOT_FOUND for e in errors)
    assert len(errors[0].details() or "") < 1000  # the name is cut in what is said
    assert grown < 10_000, grown  # 10 MB of names sent: one short record


def test_opens_racing_each_other_cannot_pass_the_quota_together(daemon: Daemon) -> None:
    greedy = daemon.hosts["greedy"]

    async def scenario() -> tuple[int, int]:
        async def try_open(stack: AsyncExitStack) -> bool:
            try:
                await stack.enter_async_context(HostSession(daemon, "scratch", greedy))
            except grpc.aio.AioRpcError:
                return False
            return True

        async with AsyncExitStack() as stack:
            results = await asyncio.gather(*(try_open(stack) for _ in range(6)))
            return sum(results), len(daemon.containers())

    opened, _ = asyncio.run(scenario())
    assert opened <= 2  # sessions_per_identity = 2, however many open at the same moment
