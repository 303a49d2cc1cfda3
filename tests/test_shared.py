"""Shared servers: one container, many sessions, ids that never cross, restarts, adoption."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.daemon_helper import INIT_PARAMS as INIT
from tests.daemon_helper import Daemon, HostSession, running_daemon, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

SERVER_EXITED = -32000
SERVER_UNAVAILABLE = -32002


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path) as running:
        running.add_scratch_server("shared", "--shared")
        wait_until(
            lambda: running.status("shared").get("instances") == 1, 60, "the shared instance"
        )
        yield running


def test_sessions_share_one_container_and_ids_never_cross(daemon: Daemon) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with HostSession(daemon, "shared") as a, HostSession(daemon, "shared") as b:
            init_a = await a.request("initialize", INIT)
            init_b = await b.request("initialize", INIT)
            assert init_a["result"]["serverInfo"]["name"] == "scratch"
            assert init_a["result"] == init_b["result"]  # one handshake, answered from cache
            for n in range(20):  # interleaved: both sessions use ids 2..21
                await a.send("scratch/echo", {"who": "a", "n": n})
                await b.send("scratch/echo", {"who": "b", "n": n})
            await a.wait_for(lambda: len(a.messages) == 21, 30)
            await b.wait_for(lambda: len(b.messages) == 21, 30)
            return a.messages[1:], b.messages[1:]

    answers_a, answers_b = asyncio.run(scenario())
    for who, answers in (("a", answers_a), ("b", answers_b)):
        assert [m["id"] for m in answers] == list(range(2, 22))
        assert [m["result"]["echo"] for m in answers] == [{"who": who, "n": n} for n in range(20)]
    pids = {m["result"]["pid"] for m in answers_a + answers_b}
    assert len(pids) == 1  # one server process served both
    assert len(daemon.containers()) == 1
    answered = [
        json.loads(line)
        for path in (daemon.state_dir / "audit").glob("audit-*.jsonl")
        for line in path.read_text().splitlines()
        if '"type":"response"' in line
    ]
    shared = [r for r in answered if r["server"] == "shared" and r["action"] == "scratch/echo"]
    assert len(shared) == 40  # each answer on record, with its latency
    assert all(r["outcome"] == "ok" and r["latency_ms"] >= 0 for r in shared)


def test_a_crashed_shared_server_fails_pending_requests_then_comes_back(daemon: Daemon) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with HostSession(daemon, "shared") as host:
            await host.request("initialize", INIT)
            hung = [await host.send("scratch/hang") for _ in range(2)]
            await asyncio.sleep(0.3)
            (container,) = daemon.containers()
            docker.from_env().api.kill(container["Id"])
            await host.wait_for(lambda: all(host.answer(i) for i in hung), timeout=1.0)
            errors = [host.answer(i) for i in hung]
            deadline = time.monotonic() + 30
            while True:  # requests fail fast while it restarts, then succeed
                answer = await host.request("scratch/echo", {"again": True}, timeout=10)
                if "result" in answer or time.monotonic() > deadline:
                    return errors, answer  # type: ignore[return-value]
                assert answer["error"]["code"] in (SERVER_UNAVAILABLE, SERVER_EXITED)
                await asyncio.sleep(0.2)

    errors, answer = asyncio.run(scenario())
    for error in errors:
        assert error["error"]["code"] == SERVER_EXITED
        assert "exited with code 137" in error["error"]["message"]
    assert answer["result"]["echo"] == {"again": True}
    assert daemon.status("shared")["restarts"] >= 1


def test_the_shared_instance_is_adopted_after_kill_9(daemon: Daemon) -> None:
    (before,) = daemon.containers()
    daemon.kill9()
    daemon.start()
    wait_until(lambda: daemon.status("shared").get("instances") == 1, 30, "the adoption")
    (after,) = daemon.containers()
    assert after["Id"] == before["Id"]  # the same container, attached again

    async def scenario() -> dict[str, Any]:
        async with HostSession(daemon, "shared") as host:
            await host.request("initialize", INIT)  # answered from the saved handshake
            return await host.request("scratch/echo", {"adopted": True})

    assert asyncio.run(scenario())["result"]["echo"] == {"adopted": True}
    assert daemon.stop() == 0
    assert daemon.containers() == []
