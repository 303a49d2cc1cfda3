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
The N hosts are tasks in this one process (one SDK client each), so this process also
competes for the CPU, as hosts on the same machine would. One host identity: the daemon's
per-identity and per-server quotas are raised to fit N (they are not what is measured).

Run: PYTHONPATH=daemon:. python bench/open_burst.py [--hosts 50] [--warm 4] [--calls 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
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

TIMEOUT = 600  # seconds a host may take to open and make its calls


def cold_start_cpu() -> float:
    """CPU seconds one fresh container spends from `docker run` to its `initialize` answer."""
    name = f"stockade-bench-cold-{peers.RUN}"
    argv = peers.container(peers.TIME_SERVER)
    argv[argv.index("-i") + 1 : argv.index("-i") + 1] = ["--name", name]
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdin is not None and process.stdout is not None
    request = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}
    process.stdin.write(json.dumps(request).encode() + b"\n")
    process.stdin.flush()
    answer = json.loads(process.stdout.readline())
    assert answer.get("id") == 1 and "result" in answer, answer
    stats = docker.from_env().api.stats(name, stream=False, one_shot=True)
    process.stdin.close()
    process.wait(30)
    return float(stats["cpu_stats"]["cpu_usage"]["total_usage"]) / 1e9


def wait_for_pool(daemon: Daemon, size: int) -> None:
    deadline = time.monotonic() + 180
    while daemon.status("time").get("pooled", 0) < size:
        if time.monotonic() > deadline:
            raise RuntimeError("the warm pool did not fill")
        time.sleep(0.2)
    time.sleep(1.0)  # let the pooled servers finish importing: that is what "warm" buys


class Burst:
    """N SDK sessions opened at once; each records its open time, then waits for the rest."""

    def __init__(
        self, daemon: Daemon, credentials: Path, hosts: int, calls: int, warm: int
    ) -> None:
        self.daemon, self.warm = daemon, warm
        argv = daemon.bridge("time", credentials)
        self.params = StdioServerParameters(command=argv[0], args=argv[1:], env=daemon.env)
        self.daemon_pid = daemon.process.pid if daemon.process else 0
        self.hosts, self.calls = hosts, calls
        self.opened: list[float] = []
        self.failed: list[str] = []
        self.all_open = anyio.Event()  # released: every host may call
        self.everyone_in = anyio.Event()  # every host is open (or failed)
        self.memory_sampled = False
        self.calls_done = 0
        self.calls_seconds = 0.0
        self.daemon_rss = self.daemon_peak = 0.0
        self.bridge_rss: list[float] = []
        self.released = self.began = self.served = 0.0
        self.total = 0.0
        self.cpu = BurstCpu(self.daemon_pid)

    async def host(self, began: float) -> None:
        try:
            with anyio.fail_after(TIMEOUT):
                await self._host(began)
        except Exception as exc:  # a host that failed is counted and reported
            self.failed.append(f"{type(exc).__name__}: {exc}"[:200])
            self._maybe_all_open()

    async def _host(self, began: float) -> None:
        async with Client(self.params, mode="legacy") as client:
            self.opened.append(time.perf_counter() - began)
            self._maybe_all_open()
            await self.all_open.wait()
            for _ in range(self.calls):
                result = await client.call_tool(TIME.name, TIME.arguments)
                if result.is_error:
                    raise RuntimeError(str(result))
                self.calls_done += 1
            self.calls_seconds = max(self.calls_seconds, time.perf_counter() - self.released)

    def _maybe_all_open(self) -> None:
        if len(self.opened) + len(self.failed) == self.hosts and not self.memory_sampled:
            self.memory_sampled = True
            self.served = time.perf_counter() - self.began
            self.cpu.stop(self._container_ids())
            self._sample_memory()
            self.everyone_in.set()

    async def _release_calls(self) -> None:
        """Once all are open and the pool has refilled (its cold starts are not relaying),
        let every host make its calls at once."""
        await self.everyone_in.wait()
        await anyio.to_thread.run_sync(wait_for_pool, self.daemon, self.warm)
        self.released = time.perf_counter()
        self.all_open.set()

    def _sample_memory(self) -> None:
        self.daemon_rss = rss_mib(self.daemon_pid)
        status = Path(f"/proc/{self.daemon_pid}/status").read_text().splitlines()
        peak = next(line for line in status if line.startswith("VmHWM:"))
        self.daemon_peak = int(peak.split()[1]) / 1024
        self.bridge_rss = [rss_mib(pid) for pid in children(os.getpid(), "connect")]

    def _container_ids(self) -> list[str]:
        return [str(summary["Id"]) for summary in self.daemon.containers()]

    async def run(self) -> None:
        self.cpu.start(self._container_ids())
        self.began = began = time.perf_counter()
        async with anyio.create_task_group() as group:
            group.start_soon(self._release_calls)
            for _ in range(self.hosts):
                group.start_soon(self.host, began)
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


def main(hosts: int, warm: int, calls: int) -> None:
    floor = Floor(hosts, os.cpu_count() or 1, statistics.median(cold_start_cpu() for _ in range(3)))
    quotas = {
        "STOCKADE_QUOTA_SESSIONS_PER_IDENTITY": str(hosts + 8),
        "STOCKADE_QUOTA_OPENS_PER_IDENTITY_PER_MINUTE": str(hosts * 4 + 20),
        "STOCKADE_QUOTA_INSTANCES_PER_SERVER": str(hosts + warm + 8),
        "STOCKADE_MAX_RELAY_STREAMS": str(hosts + 64),
    }
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
    print(f"| hosts that failed to open | {len(burst.failed)} |")
    for reason in sorted(set(burst.failed))[:5]:
        print(f"|  - {reason} | |")
    print(f"| whole burst: opens, pool refill, calls | {burst.total:.1f} s |")
    print()
    print("\n".join(burst.cpu.markdown(burst.served, floor.cores)))
    print(f"\n{machine()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--calls", type=int, default=20)
    arguments = parser.parse_args()
    main(arguments.hosts, arguments.warm, arguments.calls)
