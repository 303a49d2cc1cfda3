"""Session start to the first response through the daemon: from the warm pool, and cold.

A real stockaded in a temporary folder; the host side is Relay.Connect (what `stockade
connect` uses). "First response" is the answer to `initialize`. Also the memory of an idle
mcp-server-time instance. Prints a Markdown table; not a test.

Run: PYTHONPATH=. .venv/bin/python bench/session_start.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import docker

from tests.daemon_helper import Daemon, HostSession

INIT = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "bench", "version": "1"},
}


async def first_response_seconds(daemon: Daemon, server: str) -> float:
    began = time.perf_counter()
    async with HostSession(daemon, server) as host:
        await host.request("initialize", INIT, timeout=60)
        return time.perf_counter() - began


def wait_for_pool(daemon: Daemon, server: str, size: int) -> None:
    deadline = time.monotonic() + 60
    while daemon.status(server).get("pooled", 0) < size:
        if time.monotonic() > deadline:
            raise RuntimeError("the warm pool did not refill")
        time.sleep(0.1)
    time.sleep(1.0)  # let the pooled server finish importing: that is what "warm" buys


def idle_memory_mib(daemon: Daemon) -> float:
    client = docker.from_env()
    container = daemon.containers()[0]
    stats = client.api.stats(container["Id"], stream=False, one_shot=True)
    return float(stats["memory_stats"]["usage"]) / 2**20


def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as root:
        daemon = Daemon(Path(root))
        daemon.start()
        try:
            command = ["--", "mcp-server-time", "--local-timezone", "UTC"]
            image = ["--image", "stockade/python:latest"]
            daemon.cli("server", "add", "warm", *image, "--warm", "1", *command)
            daemon.cli("server", "add", "cold", *image, "--warm", "0", *command)
            warm, cold = [], []
            for _ in range(runs):
                wait_for_pool(daemon, "warm", 1)
                warm.append(asyncio.run(first_response_seconds(daemon, "warm")))
            for _ in range(runs):
                cold.append(asyncio.run(first_response_seconds(daemon, "cold")))
            wait_for_pool(daemon, "warm", 1)
            memory = idle_memory_mib(daemon)
        finally:
            daemon.stop()
    print(f"| session start to first response (mcp-server-time, median of {runs}) | value |")
    print("| --- | --- |")
    print(f"| from the warm pool | {statistics.median(warm) * 1000:.0f} ms |")
    print(f"| cold (no pool) | {statistics.median(cold) * 1000:.0f} ms |")
    print(f"| memory of an idle pooled instance | {memory:.1f} MiB |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    main(parser.parse_args().runs)
