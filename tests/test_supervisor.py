"""The supervisor with a real daemon, real engine and real sandboxed servers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.daemon_helper import Daemon, HostSession, running_daemon, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

SERVER_EXITED = -32000


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path) as running:
        yield running


def test_each_session_gets_its_own_container_and_tmpfs(daemon: Daemon) -> None:
    daemon.add_scratch_server("scratch", "--warm", "2")

    async def scenario() -> tuple[str, str, dict[str, object], dict[str, object]]:
        async with (
            HostSession(daemon, "scratch") as first,
            HostSession(daemon, "scratch") as second,
        ):
            assert first.opened and second.opened
            await first.request("scratch/write", {"text": "first session's secret"})
            seen_by_second = await second.request("scratch/read")
            seen_by_first = await first.request("scratch/read")
            return first.opened.instance, second.opened.instance, seen_by_first, seen_by_second

    first_instance, second_instance, by_first, by_second = asyncio.run(scenario())
    assert first_instance != second_instance
    assert by_first["result"] == {"text": "first session's secret"}
    assert by_second["result"] == {"text": None}


def test_registry_survives_a_restart_and_validates_fields(daemon: Daemon) -> None:
    daemon.add_scratch_server("scratch", "--warm", "0", "--memory", "64m", "--pids", "32")
    bad = daemon.cli(
        "server",
        "add",
        "tiny",
        "--image",
        "stockade/python:latest",
        "--memory",
        "1k",
        "--",
        "true",
        check=False,
    )
    assert bad.returncode == 1
    assert "sandbox.memory_bytes" in bad.stderr
    unknown = daemon.cli("server", "inspect", "nope", check=False)
    assert unknown.returncode == 2
    assert "no server named 'nope'" in unknown.stderr
    daemon.stop()
    daemon.start()
    listed = daemon.cli("server", "inspect", "scratch", "--json").stdout
    assert '"memory_bytes": "67108864"' in listed.replace(":", ": ").replace(":  ", ": ")
    assert '"pids_limit": 32' in listed.replace(":", ": ").replace(":  ", ": ")
    daemon.cli("server", "rm", "scratch")
    assert "no servers registered" in daemon.cli("server", "ls").stdout


def test_a_crash_fails_every_pending_request_within_a_second(daemon: Daemon) -> None:
    daemon.add_scratch_server("scratch", "--warm", "1")

    async def scenario() -> tuple[float, HostSession]:
        async with HostSession(daemon, "scratch") as host:
            assert host.opened
            await host.request("scratch/read")  # the server is up and answering
            pending = [await host.send("scratch/hang") for _ in range(3)]
            await asyncio.sleep(0.3)  # the requests are with the server now
            container = next(
                c
                for c in daemon.containers()
                if c["Labels"]["io.stockade.instance"] == host.opened.instance
            )
            killed_at = time.monotonic()
            docker.from_env().api.kill(container["Id"])
            await host.wait_for(lambda: all(host.answer(i) for i in pending), timeout=1.0)
            elapsed = time.monotonic() - killed_at
            await host.wait_for(lambda: host.closed is not None, timeout=5)
            return elapsed, host

    elapsed, host = asyncio.run(scenario())
    assert elapsed < 1.0
    for message in host.messages[-3:]:
        assert message["error"]["code"] == SERVER_EXITED
        assert "exited with code 137" in message["error"]["message"]
    assert host.closed is not None and host.closed.exit_code == 137
    wait_until(
        lambda: any(
            not e.get("stopped_by_daemon") for e in daemon.status("scratch").get("recent_exits", [])
        ),
        10,
        "the crash in server status",
    )
    logged = [json.loads(line) for line in daemon.log_path.read_text().splitlines()]
    crash = [r for r in logged if r.get("event") == "server exited"]
    assert crash and crash[-1]["exit_code"] == 137 and crash[-1]["server"] == "scratch"


def test_kill_9_of_the_daemon_leaves_nothing_unaccounted(daemon: Daemon) -> None:
    daemon.add_scratch_server("scratch", "--warm", "2")
    wait_until(lambda: daemon.status("scratch").get("pooled", 0) == 2, 60, "a warm pool of 2")
    before = {c["Id"] for c in daemon.containers()}
    assert len(before) == 2
    daemon.kill9()
    assert {c["Id"] for c in daemon.containers()} == before  # orphans, for now
    daemon.start()
    wait_until(
        lambda: not before & {c["Id"] for c in daemon.containers()}, 30, "the orphans to be removed"
    )
    wait_until(lambda: daemon.status("scratch").get("pooled", 0) == 2, 60, "the pool refilled")
    status = daemon.status("scratch")
    assert len(daemon.containers()) == status.get("pooled", 0) + status.get("instances", 0)
    assert daemon.stop() == 0
    assert daemon.containers() == []  # a clean shutdown leaves no container behind


def test_memory_bomb_is_oom_killed_and_reported(daemon: Daemon) -> None:
    daemon.add_scratch_server("bomb", "--warm", "0", "--memory", "64m")

    async def scenario() -> HostSession:
        async with HostSession(daemon, "bomb") as host:
            request_id = await host.send("scratch/eat-memory")
            await host.wait_for(lambda: host.answer(request_id) is not None, 30)
            await host.wait_for(lambda: host.closed is not None, 10)
            return host

    host = asyncio.run(scenario())
    assert host.closed is not None and "out of memory" in host.closed.reason
    exits = daemon.status("bomb")["recent_exits"]
    assert exits[-1]["oom_killed"] is True
    assert "OOM-killed" in daemon.cli("server", "status", "bomb").stdout


def test_fork_bomb_hits_the_pids_limit_and_is_reported(daemon: Daemon) -> None:
    daemon.add_scratch_server("forker", "--warm", "0", "--pids", "16")

    async def scenario() -> dict[str, object]:
        async with HostSession(daemon, "forker") as host:
            return await host.request("scratch/fork-bomb", timeout=60)

    answer = asyncio.run(scenario())  # the session ends here: the daemon stops the instance
    forks = answer["result"]["forks"]  # type: ignore[index]
    assert 0 < forks < 16
    wait_until(lambda: daemon.status("forker").get("recent_exits"), 30, "the instance's exit")
    exit_record = daemon.status("forker")["recent_exits"][-1]
    assert exit_record["pids_limit_hits"] >= 1
    assert "pids limit hit" in daemon.cli("server", "status", "forker").stdout


def test_stderr_reaches_server_logs(daemon: Daemon) -> None:
    daemon.add_scratch_server("talker", "--warm", "0")

    async def scenario() -> str:
        async with HostSession(daemon, "talker") as host:
            assert host.opened
            await host.request("scratch/stderr", {"text": "hello from inside the sandbox"})
            return daemon.cli("server", "logs", "talker").stdout

    logs = asyncio.run(scenario())
    assert "hello from inside the sandbox" in logs


def test_a_cancellation_reaches_the_server(daemon: Daemon) -> None:
    daemon.add_scratch_server("scratch", "--warm", "0")

    async def scenario() -> str:
        async with HostSession(daemon, "scratch") as host:
            hung = await host.send("scratch/hang")
            cancel = {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": hung, "reason": "user pressed stop"},
            }
            await host.send_raw(json.dumps(cancel).encode())
            await host.request("scratch/read")  # processed after the cancellation
            return daemon.cli("server", "logs", "scratch").stdout

    assert f"cancelled {1}" in asyncio.run(scenario())


def test_gvisor_server_answers_tools_list(daemon: Daemon) -> None:
    daemon.cli(
        "server",
        "add",
        "time-gvisor",
        "--image",
        "stockade/python:latest",
        "--runtime",
        "runsc",
        "--warm",
        "0",
        "--",
        "mcp-server-time",
    )

    async def scenario() -> dict[str, object]:
        async with HostSession(daemon, "time-gvisor") as host:
            assert host.opened
            init = {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            }
            await host.request("initialize", init, timeout=120)
            await host.send_raw(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
            runtime = next(
                docker.from_env().api.inspect_container(c["Id"])["HostConfig"]["Runtime"]
                for c in daemon.containers()
                if c["Labels"]["io.stockade.instance"] == host.opened.instance
            )
            assert runtime == "runsc"
            return await host.request("tools/list")

    listed = asyncio.run(scenario())
    names = {tool["name"] for tool in listed["result"]["tools"]}  # type: ignore[index]
    assert names == {"get_current_time", "convert_time"}


def test_unknown_server_is_refused_clearly(daemon: Daemon) -> None:
    async def scenario() -> str:
        import grpc

        try:
            async with HostSession(daemon, "missing"):
                pass
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return "accepted"

    assert asyncio.run(scenario()) == (
        "NOT_FOUND: no server named 'missing' is registered (see `stockade server ls`)"
    )


def test_old_pooled_containers_are_recycled(tmp_path: Path) -> None:
    with running_daemon(tmp_path, STOCKADE_POOL_MAX_AGE_SECONDS="3") as daemon:
        daemon.add_scratch_server("scratch", "--warm", "1")
        wait_until(lambda: daemon.status("scratch").get("pooled") == 1, 60, "a warm pool")
        (first,) = [c["Id"] for c in daemon.containers()]
        wait_until(
            lambda: (
                [c["Id"] for c in daemon.containers() if c["State"] == "running"]
                not in ([], [first])
            ),
            30,
            "the pooled container to be replaced",
        )
        wait_until(
            lambda: first not in {c["Id"] for c in daemon.containers()},
            30,
            "the old container to be removed",
        )
        assert daemon.status("scratch").get("pooled") == 1
