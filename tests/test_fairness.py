"""One noisy server cannot hurt the other sessions (issue 19): its output is read at a paced
rate, the event loop is given to others in between, and its notifications past a rate are
dropped, counted, logged once a second and on record once a window. No timings here
(bench/faults.py measures them): counts, order, and what the logs say."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from stockade.relay.flow import BURST_SECONDS, NotificationValve
from stockade.sandbox import attached
from stockade.sandbox import instance as instance_module
from stockade.sandbox.attached import AttachedStdio
from stockade.sandbox.http_channel import HttpChannel
from stockade.sandbox.instance import Instance
from stockade.sandbox.pace import YIELD_EVERY, OutputLimits, OutputPace
from stockade.sandbox.runtime import Attachment, ExitStatus, SandboxRuntime
from tests.daemon_helper import Daemon, HostSession, running_daemon, wait_until

NOTIFICATIONS_PER_SECOND = 5
FLOOD = 6000  # notifications; at 1000 lines a second, the flood lasts a few seconds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record_sleeps(monkeypatch: pytest.MonkeyPatch, module: Any) -> tuple[list[float], Clock]:
    """`module`'s asyncio.sleep records its waits instead of sleeping them, and moves the
    pace's clock by as much (a turn of the loop is still given)."""
    waits: list[float] = []
    real_sleep = asyncio.sleep
    clock = Clock()

    async def recorded(delay: float) -> None:
        waits.append(delay)
        clock.now += delay
        await real_sleep(0)

    monkeypatch.setattr(module.asyncio, "sleep", recorded)
    return waits, clock


def test_the_pace_owes_a_wait_for_lines_and_bytes_past_one_second_worth() -> None:
    clock = Clock()
    pace = OutputPace(OutputLimits(lines_per_second=100, bytes_per_second=1000), clock)
    assert pace.charge(100, 1000) == 0.0  # one second's worth at once
    assert pace.charge(50, 0) == pytest.approx(0.5)  # 50 lines over: half a second
    clock.now += 0.5
    assert pace.charge(0, 0) == 0.0  # waited off
    assert pace.charge(0, 2000) == pytest.approx(1.5)  # a large line is read whole (500 left)
    clock.now += 10
    assert pace.charge(1, 1) == 0.0  # refilled (never beyond one second's worth)


def test_the_valve_drops_past_its_burst_and_refills() -> None:
    clock = Clock()
    valve = NotificationValve("noisy", rate=10, clock=clock)
    burst = int(10 * BURST_SECONDS)
    assert all(valve.admit() for _ in range(burst))
    assert not valve.admit() and not valve.admit()
    assert valve.dropped == 2
    clock.now += 1
    assert sum(valve.admit() for _ in range(20)) == 10  # one second's rate
    assert valve.dropped == 12


def _frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


async def _read_paced(stream: bytes, on_stderr: Callable[[bytes], None], clock: Clock) -> int:
    """The stdout lines AttachedStdio yields from `stream` (Docker-framed, then EOF), read
    at 500 lines a second on `clock`."""
    ours, theirs = socket.socketpair()
    stdio = await AttachedStdio.open(Attachment(ours, theirs), 4096, on_stderr)
    stdio.pace = OutputPace(OutputLimits(lines_per_second=500, bytes_per_second=10**9), clock)
    theirs.sendall(stream)
    theirs.shutdown(socket.SHUT_WR)
    count = 0
    async for _ in stdio.lines():
        count += 1
    await stdio.close()
    return count


def test_reading_a_flood_waits_what_the_pace_owes_and_yields_to_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2000 stdout and 1000 stderr lines at 500 lines a second: the reader owes ~5 s of
    waits (asked of asyncio.sleep, recorded here instead of slept) and gives the loop a
    turn at least every YIELD_EVERY lines."""
    waits, clock = record_sleeps(monkeypatch, attached)

    async def scenario() -> int:
        stream = b"".join(_frame(1, b'{"jsonrpc":"2.0","method":"n"}\n') for _ in range(2000))
        stream += b"".join(_frame(2, b"chatter\n") for _ in range(1000))
        stderr: list[bytes] = []
        count = await _read_paced(stream, stderr.append, clock)
        assert len(stderr) == 1000
        return count

    assert asyncio.run(scenario()) == 2000
    assert sum(waits) == pytest.approx((3000 - 500) / 500, rel=0.05)
    assert len(waits) >= 3000 // YIELD_EVERY


def _dropped_lines(daemon: Daemon) -> list[dict[str, Any]]:
    found = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        if "server notifications over budget" in line:
            found.append(json.loads(line))
    return found


def _audit_records(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    records = []
    for path in sorted((daemon.state_dir / "audit").glob("audit-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == event:
                records.append(record)
    return records


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(
        tmp_path,
        STOCKADE_SERVER_NOTIFICATIONS_PER_SECOND=str(NOTIFICATIONS_PER_SECOND),
        STOCKADE_SERVER_OUTPUT_LINES_PER_SECOND="1000",
    ) as running:
        running.add_scratch_server("scratch", "--warm", "2")
        yield running


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_a_notification_flood_is_throttled_and_the_others_are_served_meanwhile(
    daemon: Daemon,
) -> None:
    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], int, int]:
        async with (
            HostSession(daemon, "scratch") as noisy,
            HostSession(daemon, "scratch") as calm,
        ):
            flood = await noisy.send("scratch/flood", {"count": FLOOD, "size": 100})
            served_during = 0
            while noisy.answer(flood) is None:  # the other session, while the flood runs
                answer = await calm.request("scratch/echo", {"n": served_during}, timeout=30)
                assert answer["result"]["echo"] == {"n": served_during}
                if noisy.answer(flood) is None:
                    served_during += 1
            answered = noisy.answer(flood)
            assert answered is not None
            relayed = sum(1 for m in noisy.messages if m.get("method"))
            return answered, noisy.messages, relayed, served_during

    began = time.monotonic()
    answer, _, relayed, served_during = asyncio.run(scenario())
    elapsed = time.monotonic() - began
    assert answer["result"] == {"flooded": True}  # the flooding session gets its own answer
    assert served_during >= 10  # the other session was served while the flood ran
    # What a host hears of the flood: the valve's burst and rate, never all of it.
    assert relayed <= NOTIFICATIONS_PER_SECOND * (BURST_SECONDS + elapsed) + 1
    assert relayed < FLOOD
    logged = _dropped_lines(daemon)
    assert logged and len(logged) <= elapsed + 1  # counted, said at most once a second
    assert sum(line["dropped"] for line in logged) <= FLOOD - relayed
    assert max(line["dropped_total"] for line in logged) <= FLOOD - relayed
    daemon.stop()  # the session's repeats not yet on record are recorded at its end
    records = _audit_records(daemon, "server_notification")
    assert 1 <= len(records) <= 3  # one record a window, with the count, not one each
    assert sum(record["count"] for record in records) == FLOOD - relayed
    log = daemon.log_path.read_text(errors="replace")
    assert "never retrieved" not in log and "was never awaited" not in log


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_a_shared_server_flood_is_throttled_for_the_instance(daemon: Daemon) -> None:
    daemon.add_scratch_server("shared", "--shared")
    wait_until(lambda: daemon.status("shared").get("instances") == 1, 60, "the shared instance")

    async def scenario() -> tuple[dict[str, Any] | None, int]:
        async with HostSession(daemon, "shared") as host:
            answer = await host.request("scratch/flood", {"count": 2000, "size": 100}, timeout=60)
            return answer, sum(1 for m in host.messages if m.get("method"))

    began = time.monotonic()
    answer, relayed = asyncio.run(scenario())
    elapsed = time.monotonic() - began
    assert answer is not None and answer["result"] == {"flooded": True}
    assert relayed <= NOTIFICATIONS_PER_SECOND * (BURST_SECONDS + elapsed) + 1
    logged = [line for line in _dropped_lines(daemon) if line.get("server") == "shared"]
    assert logged and sum(line["dropped"] for line in logged) <= 2000 - relayed


class _Messages:
    """A streamable-HTTP channel whose server has 1000 messages ready at once."""

    async def lines(self) -> AsyncIterator[bytes]:
        for n in range(1000):
            yield b'{"jsonrpc":"2.0","method":"n","params":{"n":%d}}' % n

    async def close(self) -> None:
        return None


class _Engine:
    def wait(self, container_id: str, timeout: int) -> ExitStatus:
        return ExitStatus(exit_code=0, oom_killed=False)

    def pids_limit_hits(self, container_id: str) -> int:
        return 0


def test_a_streamable_http_servers_messages_are_paced_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its messages do not come over the attach socket: they are charged to the same pace."""
    waits, clock = record_sleeps(monkeypatch, instance_module)

    async def scenario() -> int:
        received: list[object] = []

        async def sink(line: object) -> None:
            received.append(line)

        pace = OutputPace(OutputLimits(lines_per_second=500, bytes_per_second=10**9), clock)
        instance = Instance(
            id="i",
            server="http-server",
            container_id="c",
            stdio=cast(AttachedStdio, SimpleNamespace(pace=pace)),
            backend=cast(SandboxRuntime, _Engine()),
            http=cast(HttpChannel, _Messages()),
        )
        instance.bind(sink)
        await instance._read()
        return len(received)

    assert asyncio.run(scenario()) == 1000
    assert sum(waits) == pytest.approx((1000 - 500) / 500, rel=0.05)
    assert len(waits) >= 1000 // YIELD_EVERY


def test_blank_lines_and_tiny_frames_are_charged_for_the_work_they_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blank lines (dropped, never yielded) and frames without a newline cost the daemon a
    turn of the splitter each: the pace charges them, so they cannot get past it."""
    waits, clock = record_sleeps(monkeypatch, attached)

    async def scenario() -> int:
        stream = b"".join(_frame(1, b"\n" * 100) for _ in range(50))  # 5000 blank lines
        stream += b"".join(_frame(2, b"x") for _ in range(1000))  # 1000 one-byte writes
        return await _read_paced(stream, lambda _: None, clock)

    assert asyncio.run(scenario()) == 0  # nothing to forward
    assert sum(waits) == pytest.approx((6000 - 500) / 500, rel=0.05)
