"""Cold start of a hardened sandbox: create + attach + start until `initialize` is answered.

Also the memory of an idle mcp-server-time instance. Prints a Markdown table; not a test.
Run: .venv/bin/python bench/sandbox_start.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from stockade.logs import configure_logging
from stockade.sandbox.attached import AttachedStdio
from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.spec import LABEL_DAEMON, ContainerSpec

IMAGE = "stockade/python:latest"
COMMAND = ("mcp-server-time", "--local-timezone", "UTC")
INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        },
    }
).encode()


async def one_cold_start(backend: DockerBackend, spec: ContainerSpec) -> tuple[float, float, int]:
    """Return (seconds to running, seconds to first answer, idle memory bytes)."""
    began = time.perf_counter()
    container_id = await asyncio.to_thread(backend.create, spec)
    attachment = await asyncio.to_thread(backend.attach, container_id)
    stdio = await AttachedStdio.open(attachment, 1 << 20, on_stderr=lambda _line: None)
    try:
        await asyncio.to_thread(backend.start, container_id)
        running = time.perf_counter() - began
        await stdio.send(INITIALIZE)
        async for line in stdio.lines():
            if isinstance(line, bytes) and b'"id":1' in line.replace(b" ", b""):
                break
        answered = time.perf_counter() - began
        stats = await asyncio.to_thread(
            backend.client.api.stats, container_id, stream=False, one_shot=True
        )
        memory = int(stats.get("memory_stats", {}).get("usage", 0))
    finally:
        await stdio.close()
        await asyncio.to_thread(backend.stop, container_id, 0)
    return running, answered, memory


async def main(runs: int) -> None:
    configure_logging("warning")
    backend = DockerBackend()
    spec = ContainerSpec(image=IMAGE, command=COMMAND, labels={LABEL_DAEMON: "bench"})
    results = [await one_cold_start(backend, spec) for _ in range(runs)]
    running = statistics.median(r[0] for r in results) * 1000
    answered = statistics.median(r[1] for r in results) * 1000
    memory = statistics.median(r[2] for r in results) / 2**20
    print(f"| measurement (mcp-server-time, hardened, median of {runs}) | value |")
    print("| --- | --- |")
    print(f"| create + attach + start | {running:.0f} ms |")
    print(f"| cold start to first `initialize` answer | {answered:.0f} ms |")
    print(f"| memory of the instance just after `initialize` | {memory:.1f} MiB |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
