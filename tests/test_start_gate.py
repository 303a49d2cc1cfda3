"""Issue 18: a burst beyond the warm pool starts a few instances at a time, first come first
served, sessions before pool refills, and a host that has to wait is told so."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx2
import pytest

from stockade.supervisor.start_gate import StartGate
from stockade.wire import frames
from tests.daemon_helper import INIT_REQUEST, HostSession, free_port, running_daemon
from tests.test_frames import Raw
from tests.test_http import JSON_AND_SSE, sse_messages


def test_the_gate_serves_sessions_first_in_arrival_order_and_bounds_starts() -> None:
    async def scenario() -> tuple[list[str], list[tuple[str, int]], int]:
        gate = StartGate(slots=2, settle=5)
        order: list[str] = []
        told: list[tuple[str, int]] = []
        running = 0
        most = 0

        async def start(name: str, session: bool) -> None:
            nonlocal running, most

            async def tell(ahead: int) -> None:
                told.append((name, ahead))

            await gate.enter(session=session, told=tell)
            running += 1
            most = max(most, running)
            order.append(name)
            await asyncio.sleep(0.01)
            running -= 1
            gate.leave()

        tasks = [asyncio.create_task(start("refill-1", False))]
        tasks.append(asyncio.create_task(start("refill-2", False)))
        await asyncio.sleep(0)  # both refills hold the two slots
        for name, session in (("refill-3", False), ("s1", True), ("s2", True), ("s3", True)):
            tasks.append(asyncio.create_task(start(name, session)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order, told, most

    order, told, most = asyncio.run(scenario())
    assert most == 2
    assert order[:2] == ["refill-1", "refill-2"]
    assert order[2:] == ["s1", "s2", "s3", "refill-3"]  # waiting sessions overtake a refill
    assert told == [("refill-3", 0), ("s1", 0), ("s2", 1), ("s3", 2)]


def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    async def scenario() -> list[str]:
        gate = StartGate(slots=1, settle=5)
        await gate.enter(session=True)
        served: list[str] = []

        async def wait(name: str) -> None:
            await gate.enter(session=True)
            served.append(name)
            gate.leave()

        gone = asyncio.create_task(wait("gone"))
        stays = asyncio.create_task(wait("stays"))
        await asyncio.sleep(0)
        gone.cancel()
        gate.leave()
        await stays
        assert gone.cancelled()
        await gate.enter(session=False)  # the slot came back: nothing leaked
        return served

    assert asyncio.run(scenario()) == ["stays"]


def test_a_slot_is_held_until_the_server_answers_or_settle_passes() -> None:
    async def scenario() -> tuple[bool, bool]:
        gate = StartGate(slots=1, settle=0.2)
        await gate.enter(session=True)
        answered = asyncio.Event()
        holder = asyncio.create_task(gate.hold_until_settled(answered))
        await asyncio.sleep(0.05)
        blocked = gate._free == 0
        answered.set()
        await holder
        await gate.enter(session=True)  # free again once it answered
        gate.leave()
        await gate.enter(session=True)
        quiet = asyncio.create_task(gate.hold_until_settled(asyncio.Event()))
        await asyncio.wait_for(quiet, 2)  # never answers: released at `settle`
        return blocked, gate._free == 1

    assert asyncio.run(scenario()) == (True, True)


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_hosts_beyond_the_pool_are_told_they_wait_and_all_are_served(tmp_path: Path) -> None:
    with running_daemon(
        tmp_path, STOCKADE_MAX_CONCURRENT_STARTS="1", STOCKADE_START_SETTLE_SECONDS="30"
    ) as daemon:
        daemon.add_scratch_server("scratch", "--warm", "0")

        async def host(n: int) -> list[dict[str, Any]]:
            async with HostSession(daemon, "scratch") as session:
                answer = await session.request("scratch/echo", {"n": n}, timeout=60)
                assert answer["result"]["echo"] == {"n": n}
                return list(session.messages)

        async def burst() -> list[list[dict[str, Any]]]:
            return await asyncio.gather(*(host(n) for n in range(3)))

        seen = asyncio.run(burst())
    notices = [
        m
        for messages in seen
        for m in messages
        if m.get("method") == "notifications/message"
        and "waiting for a sandbox of 'scratch'" in m["params"]["data"]
    ]
    # One slot: the first host starts at once, the two others wait (each told once).
    assert len(notices) == 2
    assert sorted(m["params"]["data"].split("; ")[1][0] for m in notices) == ["0", "1"]


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_bridges_beyond_the_pool_print_the_notice_and_are_served(tmp_path: Path) -> None:
    """The same through `stockade connect` (the framed relay): the notice arrives before
    the session is open, and the bridge passes it on as a line instead of failing."""
    with running_daemon(
        tmp_path, STOCKADE_MAX_CONCURRENT_STARTS="1", STOCKADE_START_SETTLE_SECONDS="30"
    ) as daemon:
        daemon.add_scratch_server("scratch", "--warm", "0")
        lines = (
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "scratch/echo", "params": {"n": 1}})
            + "\n"
        )
        bridges = [
            subprocess.Popen(
                [*daemon.bridge("scratch", daemon.admin_credentials), "--drain", "60"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=daemon.env,
                text=True,
            )
            for _ in range(3)
        ]
        outputs = [bridge.communicate(lines, timeout=120) for bridge in bridges]
    codes = [bridge.returncode for bridge in bridges]
    assert codes == [0, 0, 0], outputs
    printed = [[json.loads(line) for line in out.splitlines()] for out, _ in outputs]
    answers = [m for messages in printed for m in messages if m.get("id") == 1]
    assert [a["result"]["echo"] for a in answers] == [{"n": 1}] * 3
    notices = [m for messages in printed for m in messages if m.get("method")]
    assert len(notices) == 2
    assert all("waiting for a sandbox" in m["params"]["data"] for m in notices)


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_opens_abandoned_while_waiting_start_no_sandbox(tmp_path: Path) -> None:
    """Red-team finding: hosts that send `open` and leave at once each had a sandbox
    started later, for nobody, holding start places others waited for."""
    with running_daemon(
        tmp_path, STOCKADE_MAX_CONCURRENT_STARTS="1", STOCKADE_START_SETTLE_SECONDS="3"
    ) as daemon:
        daemon.add_scratch_server("scratch", "--warm", "0")

        async def scenario() -> None:
            holder = await Raw.connect(daemon, daemon.admin_credentials)
            await holder.open()  # holds the one place until its settle time (3 s)
            for _ in range(5):
                leaver = await Raw.connect(daemon, daemon.admin_credentials)
                await leaver.send(frames.control(frames.OPEN, server="scratch", options={}))
                await leaver.close()
            await asyncio.sleep(6)  # past the settle time: the place is free again
            await holder.close()

        asyncio.run(scenario())
        records = [
            json.loads(line)
            for path in (daemon.state_dir / "audit").glob("audit-*.jsonl")
            for line in path.read_text().splitlines()
        ]
    assert len([r for r in records if r["type"] == "container.start"]) == 1
    assert daemon.log_path.read_text().count("host left before its session opened") == 5


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_http_hosts_beyond_the_pool_are_told_on_the_post_that_opens_their_session(
    tmp_path: Path,
) -> None:
    """Over HTTP the notice went to the session's GET stream, which a host cannot open
    before the `initialize` POST gives it the session's id: it waited silently. Now that
    POST's answer is an event stream from the notice on, the answer after it."""
    address = f"127.0.0.1:{free_port()}"
    with running_daemon(
        tmp_path,
        STOCKADE_MAX_CONCURRENT_STARTS="1",
        STOCKADE_START_SETTLE_SECONDS="30",
        STOCKADE_HTTP_ADDRESS=address,
    ) as daemon:
        daemon.add_scratch_server("scratch", "--warm", "0")
        url = f"https://{address}/servers/scratch/mcp"
        creds = daemon.issue_host("web")
        client_tls = ssl.create_default_context(cafile=str(creds / "ca.crt"))
        client_tls.load_cert_chain(creds / "client.crt", creds / "client.key")
        headers = {"Content-Type": "application/json", **JSON_AND_SSE}

        async def host(client: httpx2.AsyncClient, n: int) -> tuple[list[dict[str, Any]], Any]:
            opened = await client.post(url, content=json.dumps(INIT_REQUEST), headers=headers)
            assert opened.status_code == 200, opened.text
            said = sse_messages(opened)
            call = {"jsonrpc": "2.0", "id": 2, "method": "scratch/echo", "params": {"n": n}}
            session = {**headers, "Mcp-Session-Id": opened.headers["Mcp-Session-Id"]}
            echoed = await client.post(url, content=json.dumps(call), headers=session)
            return said, sse_messages(echoed)[-1]["result"]["echo"]

        async def burst() -> list[tuple[list[dict[str, Any]], Any]]:
            async with httpx2.AsyncClient(verify=client_tls, timeout=120) as client:
                return await asyncio.gather(*(host(client, n) for n in range(3)))

        seen = asyncio.run(burst())
    assert [echo for _, echo in seen] == [{"n": 0}, {"n": 1}, {"n": 2}]
    told = [said for said, _ in seen if len(said) > 1]
    assert len(told) == 2  # one start at a time: the first is not told, the two others are
    for said in told:
        notice, answer = said
        assert notice["method"] == "notifications/message"
        assert "waiting for a sandbox of 'scratch'" in notice["params"]["data"]
        assert answer["id"] == INIT_REQUEST["id"] and "result" in answer
