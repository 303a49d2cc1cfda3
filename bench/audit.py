"""Audit cost per call (µs) with the default fsync policy (group commit every 10 ms).

An allowed call costs one record written before it is forwarded (its fsync comes later, in
a group); a denial costs a record fsynced before the caller hears; denials that arrive
together (many hosts refused at once, a burst of sessions opening) share fsyncs. All are measured
through `AuditLog.record`, as the relay calls it, with the background group-commit task
running, on a real file in a temporary folder on this machine's disk. Not a test.

Run: .venv/bin/python bench/audit.py [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from stockade.audit.chain import load_or_create_key
from stockade.audit.log import AuditLog


def _fields(n: int) -> dict[str, object]:
    return {
        "identity": "spiffe://stockade.local/host/laptop",
        "server": "time",
        "session": "0123456789abcdef",
        "instance": "fedcba9876543210",
        "action": "tools/call",
        "target": "get_current_time",
        "args_sha256": f"{n:064x}",
        "rule": "hosts-use-time",
        "rule_source": "policies/time.yaml:5",
    }


async def measure(folder: Path, calls: int) -> tuple[list[float], list[float], float]:
    log = AuditLog(folder / "audit", load_or_create_key(folder / "key.pem"), daemon_id="bench")
    log.open()
    runner = asyncio.create_task(log.run())
    allowed, denied = [], []
    began_all = time.perf_counter()
    for n in range(calls):
        began = time.perf_counter_ns()
        await log.record("request", durable=False, outcome="allow", **_fields(n))
        allowed.append((time.perf_counter_ns() - began) / 1000)
    wall_allowed = (time.perf_counter() - began_all) / calls * 1e6
    for n in range(max(calls // 20, 50)):
        began = time.perf_counter_ns()
        await log.record("request", durable=True, outcome="deny", **_fields(n))
        denied.append((time.perf_counter_ns() - began) / 1000)
    runner.cancel()
    await log.close()
    return allowed, denied, wall_allowed


async def together(folder: Path, count: int) -> tuple[float, int]:
    """`count` denials written at once, each awaiting its fsync: (ms until all are on disk,
    fsyncs made)."""
    log = AuditLog(folder / "audit", load_or_create_key(folder / "key.pem"), daemon_id="bench")
    log.open()
    began, before = time.perf_counter(), log.fsyncs
    await asyncio.gather(
        *(log.record("request", durable=True, outcome="deny", **_fields(n)) for n in range(count))
    )
    elapsed, fsyncs = (time.perf_counter() - began) * 1000, log.fsyncs - before
    await log.close()
    return elapsed, fsyncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as folder:
        allowed, denied, wall = asyncio.run(measure(Path(folder), args.calls))
    bursts = []
    for count in (50, 200):
        with tempfile.TemporaryDirectory(dir=Path.home()) as folder:
            bursts.append((count, *asyncio.run(together(Path(folder), count))))
    q = statistics.quantiles
    print(f"| audit cost per call (n={args.calls}, default fsync policy) | p50 | p99 |")
    print("| --- | --- | --- |")
    print(
        f"| allowed call (group commit) | {statistics.median(allowed):.1f} µs "
        f"| {q(allowed, n=100)[98]:.1f} µs |"
    )
    print(f"| allowed call, wall time per call incl. background fsyncs | {wall:.1f} µs | |")
    print(
        f"| denied call (fsync before the answer, n={len(denied)}) "
        f"| {statistics.median(denied):.0f} µs | {q(denied, n=100)[98]:.0f} µs |"
    )
    for count, elapsed, fsyncs in bursts:
        print(
            f"| {count} denials at once: all on disk after | {elapsed:.1f} ms, {fsyncs} fsyncs | |"
        )


if __name__ == "__main__":
    main()
