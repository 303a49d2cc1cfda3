"""One hostile identity opens sessions as fast as it can; does anyone else notice?

A real daemon with a scratch server (per-session sandboxes, a warm pool). First the
well-behaved identity measures `scratch/echo` round trips on an idle daemon. Then the
hostile identity runs `--attackers` tasks that each open Relay.Connect sessions in a loop,
holding what they get, and sending denied calls meanwhile; while that goes on the
well-behaved identity opens a new session, measures the same round trips, and an admin
revokes a certificate. Prints: idle and under-attack p50/p99 (and the ratio), whether the
other identity's session opened and how long it took, how long `cert revoke` took, how many
of the hostile opens were refused and why, and the audit log's growth.
A benchmark, not a test: numbers on a shared 2-core machine move by tens of percent.

Run: PYTHONPATH=daemon:. python bench/hostile_load.py [--seconds 20 --attackers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from tests.daemon_helper import Daemon, HostSession, running_daemon

DENY_ALL_BUT_ECHO = """\
version: 1
rules:
  - name: everyone-echoes
    effect: allow
    identities: ["*"]
    servers: ["scratch"]
    methods: ["scratch/echo"]
"""


async def round_trips(daemon: Daemon, who: Path, calls: int) -> tuple[float, list[float]]:
    """(seconds to open the session, per-call milliseconds)."""
    began = time.perf_counter()
    async with HostSession(daemon, "scratch", who) as host:
        opened = time.perf_counter() - began
        times = []
        for n in range(calls):
            start = time.perf_counter()
            await host.request("scratch/echo", {"n": n})
            times.append((time.perf_counter() - start) * 1000)
    return opened, times


async def attacker(daemon: Daemon, who: Path, until: float, refusals: Counter[str]) -> None:
    held: list[HostSession] = []
    try:
        while time.monotonic() < until:
            session = HostSession(daemon, "scratch", who)
            try:
                await session.__aenter__()
            except grpc.aio.AioRpcError as exc:
                refusals[exc.code().name] += 1
                await asyncio.sleep(0.01)
                continue
            held.append(session)
            refusals["opened"] += 1
            for n in range(5):  # denied calls: each one a would-be audit record
                await session.send("scratch/write", {"text": f"x{n}"})
    finally:
        for session in held:
            await session.__aexit__(None, None, None)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(daemon: Daemon, seconds: float, attackers: int, calls: int) -> None:
    calm, hostile = daemon.hosts["calm"], daemon.hosts["hostile"]
    audit = daemon.state_dir / "audit"
    _, idle = await round_trips(daemon, calm, calls)
    size_before = sum(p.stat().st_size for p in audit.glob("audit-*.jsonl"))
    refusals: Counter[str] = Counter()
    until = time.monotonic() + seconds
    tasks = [
        asyncio.create_task(attacker(daemon, hostile, until, refusals)) for _ in range(attackers)
    ]
    await asyncio.sleep(min(3.0, seconds / 4))  # the attack is in full swing
    opened, loaded = await round_trips(daemon, calm, calls)
    began = time.perf_counter()
    revoked = await asyncio.to_thread(daemon.cli, "cert", "revoke", "--identity", "host/victim")
    revoke_seconds = time.perf_counter() - began
    await asyncio.gather(*tasks)
    grown = sum(p.stat().st_size for p in audit.glob("audit-*.jsonl")) - size_before
    print(f"| scratch/echo, {calls} calls; {attackers} attackers for {seconds:.0f} s | value |")
    print("| --- | --- |")
    print(f"| idle p50 / p99 | {statistics.median(idle):.2f} / {percentile(idle, 0.99):.2f} ms |")
    print(
        f"| under attack p50 / p99 | {statistics.median(loaded):.2f} / "
        f"{percentile(loaded, 0.99):.2f} ms |"
    )
    print(f"| p99 under attack / idle | {percentile(loaded, 0.99) / percentile(idle, 0.99):.2f}x |")
    print(f"| the other identity's session opened in | {opened * 1000:.0f} ms |")
    print(
        f"| admin `cert revoke` answered in | {revoke_seconds * 1000:.0f} ms "
        f"(exit {revoked.returncode}) |"
    )
    print(
        f"| hostile opens: accepted / refused | {refusals['opened']} / "
        f"{sum(n for k, n in refusals.items() if k != 'opened')} ({dict(refusals)}) |"
    )
    print(f"| audit log growth during the attack | {grown / 1024:.0f} KiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--attackers", type=int, default=8)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as root,
        running_daemon(Path(root), policy=DENY_ALL_BUT_ECHO) as daemon,
    ):
        daemon.add_scratch_server("scratch", "--warm", "4")
        for name in ("calm", "hostile", "victim"):
            daemon.issue_host(name)
        print(
            f"machine: {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        )
        asyncio.run(run(daemon, args.seconds, args.attackers, args.calls))


if __name__ == "__main__":
    main()
