"""One stdio round trip to a hardened container: Docker's attach path against two FIFOs.

What `sandbox/stdio_pipes.py` is for, without Stockade in between: the same echo MCP server
(bench/peers.py) in the same hardened container, sent N sequential `tools/call` lines
- through `docker run -i` (the CLI, dockerd and containerd's shim each copy every line: the
  path the daemon's attach socket takes, less the CLI);
- through two named pipes in a folder mounted read-only at /run/stockade-io, opened by
  `sh -c 'exec "$@" <in >out'` in the container, as Stockade does.
A benchmark, not a test; prints Markdown. Rounds alternate, so both see the same machine.

Run: PYTHONPATH=daemon:. python bench/stdio_paths.py [--calls 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from bench import peers
from bench.measure import machine, percentile
from stockade.sandbox.stdio_pipes import CONTAINER_DIR

CALL = (
    json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "x" * 100}},
        }
    ).encode()
    + b"\n"
)


def timed(write: Callable[[bytes], object], read: BinaryIO, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        write(CALL)
        line = read.readline()
        times.append(time.perf_counter() - began)
        if b'"result"' not in line:
            raise RuntimeError(f"unexpected answer: {line[:200]!r}")
    return times


def through_attach(calls: int) -> list[float]:
    process = subprocess.Popen(
        peers.container(peers.ECHO_SERVER), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None

    def write(data: bytes) -> None:
        assert process.stdin is not None
        process.stdin.write(data)
        process.stdin.flush()

    try:
        return timed(write, process.stdout, calls)
    finally:
        process.stdin.close()
        process.wait(30)


@contextlib.contextmanager
def pipes_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="stockade-bench-io-") as root:
        folder = Path(root) / "io"
        folder.mkdir(mode=0o711)
        for name in ("in", "out"):
            os.mkfifo(folder / name, 0o600)
            os.chown(folder / name, 10001, 10001)
        yield folder


def through_pipes(calls: int) -> list[float]:
    with pipes_folder() as folder:
        script = f'exec "$@" <{CONTAINER_DIR}/in >{CONTAINER_DIR}/out'
        run = peers.container(["/bin/sh", "-c", script, "sh", *peers.ECHO_SERVER])
        run[run.index("-i")] = "-d"
        run[run.index(peers.IMAGE) : run.index(peers.IMAGE)] = [
            "-v",
            f"{folder}:{CONTAINER_DIR}:ro",
        ]
        out = os.open(folder / "out", os.O_RDONLY | os.O_NONBLOCK)
        keeper = os.open(folder / "in", os.O_RDONLY | os.O_NONBLOCK)
        stdin = os.open(folder / "in", os.O_WRONLY)
        container = subprocess.run(run, capture_output=True, text=True, check=True).stdout
        os.set_blocking(out, True)
        try:
            with os.fdopen(out, "rb") as reader:
                return timed(lambda data: os.write(stdin, data), reader, calls)
        finally:
            os.close(stdin)
            os.close(keeper)
            subprocess.run(
                ["docker", "rm", "-f", container.strip()], capture_output=True, check=False
            )


def main(calls: int, rounds: int) -> None:
    results: dict[str, list[float]] = {"attach": [], "pipes": []}
    try:
        for _ in range(rounds):
            results["attach"] += through_attach(calls)
            results["pipes"] += through_pipes(calls)
    finally:
        peers.remove_containers()
    attach = percentile(results["attach"], 0.5)
    print(f"| one `tools/call` round trip, echo server ({calls} x {rounds}) | p50 ms | p99 ms |")
    print("| --- | --- | --- |")
    names = {
        "attach": "`docker run -i` (CLI, dockerd, shim)",
        "pipes": "two FIFOs, mounted as Stockade mounts them",
    }
    for key, name in names.items():
        times = results[key]
        p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
        print(f"| {name} | {p50 * 1000:.3f} ({p50 / attach:.2f}x) | {p99 * 1000:.3f} |")
    print()
    print(machine())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    main(arguments.calls, arguments.rounds)
