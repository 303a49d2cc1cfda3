"""Admission: quotas bound what one identity can make the daemon spend; admins stay in.

A real daemon, real sandboxes. The quotas are set low through settings so that a test
can reach them with a few sessions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.daemon_helper import Daemon, HostSession, running_daemon

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(
        tmp_path_factory.mktemp("admission"),
        STOCKADE_QUOTA_SESSIONS_PER_IDENTITY="2",
        STOCKADE_MAX_RELAY_STREAMS="3",
    ) as running:
        running.add_scratch_server("scratch", "--warm", "0")
        running.issue_host("greedy")
        running.issue_host("polite")
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
