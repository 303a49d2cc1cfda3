"""Faults a misbehaving party causes end cleanly: nothing gets stuck, the daemon's log stays
small, and every request ends with an answer (a real daemon, real sandboxes)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.v1 import relay_pb2, relay_pb2_grpc
from tests.daemon_helper import Daemon, HostSession, running_daemon, secure_channel, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

REQUEST_TIMEOUT = -32001
DAEMON_GONE = -32004


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path, STOCKADE_REQUEST_TIMEOUT_SECONDS="2") as running:
        running.add_scratch_server("scratch", "--warm", "1")
        yield running


def test_a_host_that_stops_reading_a_flood_and_vanishes_leaves_nothing_stuck(
    daemon: Daemon,
) -> None:
    async def vanish() -> str:
        channel = secure_channel(f"unix:{daemon.socket}", daemon.admin_credentials)
        call = relay_pb2_grpc.RelayStub(channel).Connect()
        await call.write(relay_pb2.ClientFrame(open=relay_pb2.OpenSession(server="scratch")))
        opened = await call.read()
        assert opened.WhichOneof("kind") == "opened"
        flood = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "scratch/flood",
            "params": {"count": 200000, "size": 1000},
        }
        await call.write(relay_pb2.ClientFrame(message=json.dumps(flood).encode()))
        await asyncio.sleep(3)  # the server floods; this host reads nothing
        call.cancel()  # and is gone
        await channel.close()
        return opened.opened.instance

    instance = asyncio.run(vanish())
    began = time.monotonic()
    wait_until(
        lambda: (
            not any(
                c["Labels"].get("io.stockade.instance") == instance for c in daemon.containers()
            )
        ),
        60,
        "the vanished host's container to be removed",
    )
    print(f"container removed {time.monotonic() - began:.1f} s after the host vanished")
    wait_until(lambda: daemon.status("scratch").get("in_use", 0) == 0, 30, "nothing in use")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=60) == 0  # and SIGTERM still stops the daemon


def test_a_flooding_server_does_not_flood_the_daemon_log(daemon: Daemon) -> None:
    before = daemon.log_path.stat().st_size

    async def scenario() -> str:
        async with HostSession(daemon, "scratch") as host:
            assert host.opened is not None
            lines = "\n".join(["noise " * 20] * 2000)
            await host.request("scratch/stderr", {"text": lines})
            await asyncio.sleep(1)
            logs = await asyncio.to_thread(
                daemon.cli, "server", "logs", "scratch", "--session", host.opened.session_id
            )
            return logs.stdout

    logs = asyncio.run(scenario())
    grown = daemon.log_path.stat().st_size - before
    assert grown < 100_000, grown  # 2000 stderr lines of 120 bytes: a sample, not all of them
    assert logs.count("noise noise") >= 900  # the ring keeps them for `server logs`


def test_a_request_the_server_never_answers_times_out(daemon: Daemon) -> None:
    async def scenario() -> dict[str, object]:
        async with HostSession(daemon, "scratch") as host:
            return await host.request("scratch/hang", {}, timeout=30)

    answer = asyncio.run(scenario())
    error = answer["error"]
    assert isinstance(error, dict) and error["code"] == REQUEST_TIMEOUT


def _bridge(daemon: Daemon) -> subprocess.Popen[bytes]:
    if "bridge-host" not in daemon.hosts:
        daemon.issue_host("bridge-host")
    return subprocess.Popen(
        daemon.bridge("scratch", daemon.hosts["bridge-host"]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=daemon.env,
    )


HANG = b'{"jsonrpc":"2.0","id":7,"method":"scratch/hang","params":{}}\n'


def test_the_bridge_ends_soon_after_stdin_closes_with_a_request_pending(daemon: Daemon) -> None:
    bridge = _bridge(daemon)
    assert bridge.stdin is not None
    bridge.stdin.write(HANG)
    bridge.stdin.flush()
    time.sleep(1)
    bridge.stdin.close()
    # The daemon would wait 30 s (session_drain_seconds) for the answer; the host that
    # closed stdin wants the process gone, so the bridge ends after its 1 s grace.
    assert bridge.wait(timeout=15) == 0


def test_a_daemon_that_goes_away_leaves_no_request_unanswered(daemon: Daemon) -> None:
    bridge = _bridge(daemon)
    assert bridge.stdin is not None and bridge.stdout is not None
    bridge.stdin.write(HANG)
    bridge.stdin.flush()
    time.sleep(1)  # the request is with the server
    daemon.kill9()
    out, err = bridge.communicate(timeout=30)
    answers = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(7, DAEMON_GONE)]
    assert "went away" in answers[0]["error"]["message"]
    assert bridge.returncode != 0 and err.strip()  # and says why on stderr
