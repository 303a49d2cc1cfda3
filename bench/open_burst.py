"""Opening at scale: N hosts start `stockade connect time` at the same moment, each with the
official MCP SDK stdio client, against mcp-server-time with per-session sandboxes and a
warm pool. A benchmark, not a test; prints Markdown.

Measured in one run:
- open time per host: bridge launch to the SDK's `initialize` handshake done; deciles, and
  the all-served time (the last host's open time);
- calls/s: once every host is open and the pool has refilled, each makes --calls sequential
  `tools/call`s, all hosts at once; total calls / time until the last one answers;
- RSS: stockaded when all are open (and its peak, VmHWM), and each bridge's (mean, max);
- where the CPU went from launch to all served, per process group (bench/burst_cpu.py);
- the CPU floor: N x one cold start's CPU / cores. One cold start's CPU is that of a fresh
  hardened container of the same image (its cgroup's CPU, from the engine's stats), from
  `docker run` to its answer to `initialize`; the median of three, taken before the burst.
  all-served / floor is the ratio issue 18 asks to bring to <= 1.25.
Every wait is bounded (OPEN_SECONDS, REFILL_SECONDS, CALLS_SECONDS): a host that runs a bound
out, or fails, is counted once and reported with its phase and reason; what could not be
measured (the CPU split, the memory) is a note in the table, and the calls are released anyway.
The N hosts are tasks in this one process (one SDK client each), so this process also
competes for the CPU, as hosts on the same machine would. One host identity: the daemon's
per-identity and per-server quotas are raised to fit N (they are not what is measured).

Run: PYTHONPATH=daemon:. python bench/open_burst.py [--hosts 50] [--warm 4] [--calls 20]
     [--starts N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anyio
import docker
from mcp import Client, StdioServerParameters

from bench import peers
from bench.burst_cpu import BurstCpu
from bench.measure import children, machine, percentile, rss_mib
from bench.raw_client import INIT
from bench.sdk_client import TIME
from tests.daemon_helper import Daemon, running_daemon

# Every wait has a bound; a host that runs one out is counted as failed, with the phase.
OPEN_SECONDS = 600.0  # launch to `initialize` answered, per host
REFILL_SECONDS = 180.0  # all in to the warm pool refilled (then the calls go anyway)
CALLS_SECONDS = 300.0  # one host's --calls calls, once released
# Each host's SDK client takes a few seconds at most to stop its bridge (mcp.client.stdio).
SLACK_SECONDS = 30.0
COLD_START_SECONDS = 120.0  # one fresh container's answer to `initialize`


def cold_start_cpu() -> float:
    """CPU seconds one fresh container spends from `docker run` to its `initialize` answer."""
    name = f"stockade-bench-cold-{peers.RUN}"
    argv = peers.container(peers.TIME_SERVER)
    argv[argv.index("-i") + 1 : argv.index("-i") + 1] = ["--name", name]
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdin is not None and process.stdout is not None
    bound = threading.Timer(COLD_START_SECONDS, process.kill)  # readline() then sees EOF
    bound.start()
    try:
        request = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}
        process.stdin.write(json.dumps(request).encode() + b"\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"a cold start did not answer `initialize` in {COLD_START_SECONDS} s"
            )
        answer = json.loads(line)
        assert answer.get("id") == 1 and "result" in answer, answer
        stats = docker.from_env().api.stats(name, stream=False, one_shot=True)
    finally:
        bound.cancel()
        process.stdin.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    return float(stats["cpu_stats"]["cpu_usage"]["total_usage"]) / 1e9


def wait_for_pool(daemon: Daemon, size: int, seconds: float = REFILL_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while daemon.status("time").get("pooled", 0) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm pool did not fill to {size} in {seconds:.0f} s")
        time.sleep(0.2)
    time.sleep(1.0)  # let the pooled servers finish importing: that is what "warm" buys


def printable(text: str) -> str:
    """One Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def said(exc: BaseException) -> str:
    """An exception in one line, an exception group by its leaves."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(said(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"[:200]


@dataclass
class Host:
    """One host's progress: what it waits for now, when it opened, why it failed."""

    phase: str = "opening"  # opening, waiting for the others, calling, done
    open_time: float | None = None
    failure: str | None = None
    counted: bool = False  # in `Burst.arrived`: opened, or failed while opening


class Burst:
    """N SDK sessions opened at once; each records its open time, then waits for the rest.

    Every host is counted once when it is in (opened, or failed while opening); when all
    are, one task (not a host) measures, waits for the pool and releases the calls. Each
    host's failure is kept with the phase it happened in; measuring problems are notes, not
    host failures."""

    def __init__(
        self, daemon: Daemon, credentials: Path, hosts: int, calls: int, warm: int
    ) -> None:
        self.daemon, self.warm = daemon, warm
        argv = daemon.bridge("time", credentials)
        self.params = StdioServerParameters(command=argv[0], args=argv[1:], env=daemon.env)
        self.daemon_pid = daemon.process.pid if daemon.process else 0
        self.hosts, self.calls = hosts, calls
        self.states = [Host() for _ in range(hosts)]
        self.arrived = 0
        self.notes: list[str] = []  # what could not be measured, and bounds that ran out
        self.all_open = anyio.Event()  # released: every host may call
        self.everyone_in = anyio.Event()  # every host is open (or failed to open)
        self.calls_done = 0
        self.calls_seconds = 0.0
        self.daemon_rss = self.daemon_peak = 0.0
        self.bridge_rss: list[float] = []
        self.released = self.began = self.served = 0.0
        self.total = 0.0
        self.cpu = BurstCpu(self.daemon_pid)
        self.cpu_measured = False

    @property
    def opened(self) -> list[float]:
        return [s.open_time for s in self.states if s.open_time is not None]

    def failed(self, opened: bool) -> list[str]:
        return [
            f"{s.phase}: {s.failure}"
            for s in self.states
            if s.failure is not None and (s.open_time is not None) == opened
        ]

    async def host(self, state: Host, began: float) -> None:
        launched = anyio.current_time()
        try:
            with anyio.CancelScope(deadline=launched + OPEN_SECONDS) as scope:
                await self._host(state, began, launched, scope)
            if scope.cancelled_caught:
                raise TimeoutError(f"still {state.phase} when its bound ran out")
            state.phase = "done"
        except Exception as exc:  # a host that failed is counted and reported, with its reason
            state.failure = said(exc)
        finally:
            self._arrive(state)  # a host that failed while opening is in too

    async def _host(
        self, state: Host, began: float, launched: float, scope: anyio.CancelScope
    ) -> None:
        async with Client(self.params, mode="legacy") as client:
            state.open_time = time.perf_counter() - began
            state.phase = "waiting for the others"
            self._arrive(state)
            # The release comes by then (`_release_calls`); this bound is in case it does not.
            scope.deadline = launched + OPEN_SECONDS + REFILL_SECONDS + 2 * SLACK_SECONDS
            await self.all_open.wait()
            state.phase = "calling"
            scope.deadline = anyio.current_time() + CALLS_SECONDS
            for _ in range(self.calls):
                result = await client.call_tool(TIME.name, TIME.arguments)
                if result.is_error:
                    raise RuntimeError(str(result))
                self.calls_done += 1
            self.calls_seconds = max(self.calls_seconds, time.perf_counter() - self.released)

    def _arrive(self, state: Host) -> None:
        """Count `state` in, once; the last one in records the all-served time."""
        if state.counted:
            return
        state.counted = True
        self.arrived += 1
        if self.arrived == self.hosts:
            self.served = time.perf_counter() - self.began
            self.everyone_in.set()

    async def _release_calls(self) -> None:
        """Once all are in, measure; once the pool has refilled (its cold starts are not
        relaying), let every host make its calls at once. The release always comes."""
        try:
            # Each host is in by OPEN_SECONDS (its bound) plus its client's shutdown.
            with anyio.move_on_after(OPEN_SECONDS + SLACK_SECONDS):
                await self.everyone_in.wait()
            if not self.everyone_in.is_set():
                self.notes.append(
                    f"only {self.arrived} of {self.hosts} hosts were in after "
                    f"{OPEN_SECONDS + SLACK_SECONDS:.0f} s; the calls were released anyway"
                )
                self.served = time.perf_counter() - self.began
            self._measure_served()
            await anyio.to_thread.run_sync(wait_for_pool, self.daemon, self.warm)
        except Exception as exc:  # the calls go anyway; the report says why they went early
            self.notes.append(f"before releasing the calls: {said(exc)}")
        finally:
            self.released = time.perf_counter()
            self.all_open.set()

    def _measure_served(self) -> None:
        """The CPU split and the memory when all are served; what fails is a note."""
        try:
            self.cpu.stop(self._container_ids())
            self.cpu_measured = True
        except Exception as exc:
            self.notes.append(f"the CPU split was not measured: {said(exc)}")
        try:
            self._sample_memory()
        except Exception as exc:
            self.notes.append(f"the memory was not measured: {said(exc)}")

    def _sample_memory(self) -> None:
        self.daemon_rss = rss_mib(self.daemon_pid)
        status = Path(f"/proc/{self.daemon_pid}/status").read_text().splitlines()
        peak = next(line for line in status if line.startswith("VmHWM:"))
        self.daemon_peak = int(peak.split()[1]) / 1024
        for pid in children(os.getpid(), "connect"):
            with contextlib.suppress(OSError):  # a bridge that ended since it was listed
                self.bridge_rss.append(rss_mib(pid))

    def _container_ids(self) -> list[str]:
        return [str(summary["Id"]) for summary in self.daemon.containers()]

    async def run(self) -> None:
        self.cpu.start(self._container_ids())
        self.began = began = time.perf_counter()
        # A backstop: each wait below has its own bound; this one says if they all failed.
        whole = OPEN_SECONDS + REFILL_SECONDS + CALLS_SECONDS + 3 * SLACK_SECONDS
        with anyio.move_on_after(whole) as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(self._release_calls)
                for state in self.states:
                    group.start_soon(self.host, state, began)
        if scope.cancelled_caught:
            unfinished = sum(1 for s in self.states if s.phase != "done" and s.failure is None)
            self.notes.append(
                f"the burst was cut off after {whole:.0f} s: {unfinished} hosts unfinished"
            )
        self.total = time.perf_counter() - began


@dataclass
class Floor:
    """The CPU floor: what N cold starts cost on this machine's cores, at the least."""

    hosts: int
    cores: int
    cold: float  # CPU seconds of one cold start

    @property
    def seconds(self) -> float:
        return self.hosts * self.cold / self.cores


def main(hosts: int, warm: int, calls: int, starts: int | None = None) -> None:
    floor = Floor(hosts, os.cpu_count() or 1, statistics.median(cold_start_cpu() for _ in range(3)))
    quotas = {
        "STOCKADE_QUOTA_SESSIONS_PER_IDENTITY": str(hosts + 8),
        "STOCKADE_QUOTA_OPENS_PER_IDENTITY_PER_MINUTE": str(hosts * 4 + 20),
        "STOCKADE_QUOTA_INSTANCES_PER_SERVER": str(hosts + warm + 8),
        "STOCKADE_MAX_RELAY_STREAMS": str(hosts + 64),
    }
    if starts is not None:  # the start gate's width (the daemon's default: twice the cores)
        quotas["STOCKADE_MAX_CONCURRENT_STARTS"] = str(starts)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="stockade-bench-") as root,
            running_daemon(Path(root), **quotas) as daemon,
        ):
            daemon.add_server("time", peers.IMAGE, *peers.TIME_SERVER, warm=warm)
            credentials = daemon.issue_host("bench")
            wait_for_pool(daemon, warm)
            burst = Burst(daemon, credentials, hosts, calls, warm)
            anyio.run(burst.run)
    finally:
        peers.remove_containers()
    report(burst, warm, floor)


def report(burst: Burst, warm: int, floor: Floor) -> None:
    hosts, calls = burst.hosts, burst.calls
    served = max(burst.opened) if burst.opened else float("nan")
    print(f"| {hosts} hosts open at once (per-session sandboxes, --warm {warm}) | value |")
    print("| --- | --- |")
    deciles = " / ".join(
        f"{percentile(burst.opened, d / 10):.1f}" for d in range(1, 10) if burst.opened
    )
    fastest = min(burst.opened) if burst.opened else float("nan")
    print(f"| open time min, then deciles p10 … p90, s | {fastest:.1f}, {deciles} |")
    print(f"| all served (the last host's open time) | {served:.1f} s |")
    print(f"| one cold start's CPU (median of 3) | {floor.cold * 1000:.0f} ms |")
    print(f"| CPU floor = {hosts} x cold start CPU / {floor.cores} cores | {floor.seconds:.1f} s |")
    print(f"| all served / floor | {served / floor.seconds:.2f}x |")
    rate = burst.calls_done / burst.calls_seconds if burst.calls_seconds else 0.0
    print(f"| calls/s, all {hosts} hosts calling at once ({calls} calls each) | {rate:.0f} |")
    print(
        f"| stockaded RSS when all are open (peak) | {burst.daemon_rss:.0f} MiB "
        f"({burst.daemon_peak:.0f} MiB) |"
    )
    if burst.bridge_rss:
        mean, top = statistics.mean(burst.bridge_rss), max(burst.bridge_rss)
        print(
            f"| RSS per bridge (`stockade connect`), mean (max) | {mean:.1f} MiB ({top:.1f} MiB) |"
        )
    print(f"| calls answered / asked | {burst.calls_done} / {hosts * calls} |")
    for title, failures in (
        ("hosts that failed to open", burst.failed(opened=False)),
        ("hosts that failed after opening", burst.failed(opened=True)),
    ):
        print(f"| {title} | {len(failures)} |")
        for reason, count in Counter(failures).most_common(5):
            print(f"|  - {count} x {printable(reason)} | |")
    unfinished = sum(1 for s in burst.states if s.phase != "done" and s.failure is None)
    if unfinished:
        print(f"| hosts neither done nor failed (cut off) | {unfinished} |")
    print(f"| whole burst: opens, pool refill, calls | {burst.total:.1f} s |")
    for note in burst.notes:
        print(f"| note | {printable(note)} |")
    print()
    if burst.cpu_measured:
        print("\n".join(burst.cpu.markdown(burst.served, floor.cores)))
    print(f"\n{machine()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--starts", type=int, help="instances started at once (default: 2 x cores)")
    arguments = parser.parse_args()
    main(arguments.hosts, arguments.warm, arguments.calls, arguments.starts)
