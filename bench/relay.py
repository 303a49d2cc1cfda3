"""What Stockade adds to a tools/call round trip, next to the paths without it.

Rows (mcp-server-time, `get_current_time`, sequential, n calls each after a warm-up):
  direct stdio        the server as a local process, no container
  docker run -i       the same server in the hardened container, straight over the docker CLI
  stockade (unix)     stockade connect -> gRPC over the Unix socket (mTLS) -> daemon -> attach
  stockade (tcp)      the same over TCP on loopback (mTLS)
and the pipelined throughput of one Stockade session (all requests written, then read).
Every path is driven the same way: a raw JSON-RPC client on a child process's stdio.
Prints a Markdown table; not a test.

Run: PYTHONPATH=. .venv/bin/python bench/relay.py [--calls 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.daemon_helper import running_daemon

CALL = {"name": "get_current_time", "arguments": {"timezone": "UTC"}}
HARDENED = [
    "--read-only",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges:true",
    "--user",
    "10001:10001",
    "--network",
    "none",
    "--memory",
    "256m",
    "--pids-limit",
    "64",
    "--tmpfs",
    "/tmp:rw,noexec,nosuid,nodev,size=64m",
    "--init",
]


class RawClient:
    """One JSON-RPC line out, one line in: the least a client can do."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        self._next = 0

    def _write(self, body: dict[str, object]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(body).encode() + b"\n")

    def _read_answer(self) -> dict[str, object]:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the server closed its output")
            message: dict[str, object] = json.loads(line)
            if "id" in message and "method" not in message:
                return message

    def request(self, method: str, params: dict[str, object]) -> dict[str, object]:
        self._next += 1
        self._write({"jsonrpc": "2.0", "id": self._next, "method": method, "params": params})
        return self._read_answer()

    def initialize(self) -> None:
        self.request(
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        )
        self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def round_trips(self, calls: int) -> list[float]:
        for _ in range(20):  # warm-up
            self.request("tools/call", CALL)
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            answer = self.request("tools/call", CALL)
            times.append(time.perf_counter() - began)
            assert "result" in answer, answer
        return times

    def pipelined(self, calls: int) -> float:
        """Messages per second with every request written before any answer is read."""
        began = time.perf_counter()
        for _ in range(calls):
            self._next += 1
            self._write(
                {"jsonrpc": "2.0", "id": self._next, "method": "tools/call", "params": CALL}
            )
        for _ in range(calls):
            self._read_answer()
        return calls / (time.perf_counter() - began)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure(argv: list[str], calls: int, env: dict[str, str] | None = None) -> list[float]:
    client = RawClient(argv, env)
    try:
        client.initialize()
        return client.round_trips(calls)
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def row(name: str, times: list[float], base: float | None) -> str:
    ordered = sorted(times)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000
    added = f"+{p50 - base:.2f} ms" if base is not None else "—"
    return f"| {name} | {p50:.2f} ms | {p99:.2f} ms | {added} |"


def main(calls: int) -> None:
    server = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]
    direct = measure(server, calls)
    docker_cli = shutil.which("docker") or "docker"
    container = [
        docker_cli,
        "run",
        "--rm",
        "-i",
        *HARDENED,
        "stockade/python:latest",
        "mcp-server-time",
        "--local-timezone",
        "UTC",
    ]
    in_docker = measure(container, calls)

    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as root:
        tcp = f"127.0.0.1:{free_port()}"
        with running_daemon(Path(root), STOCKADE_TCP_ADDRESS=tcp) as daemon:
            daemon.add_server(
                "time",
                "stockade/python:latest",
                "mcp-server-time",
                "--local-timezone",
                "UTC",
                warm=2,
            )
            over_unix = daemon.bridge("time", daemon.issue_host("bench"))
            over_tcp = list(over_unix)
            at = over_tcp.index("--socket")
            over_tcp[at : at + 2] = ["--address", tcp]
            via_unix = measure(over_unix, calls, daemon.env)
            via_tcp = measure(over_tcp, calls, daemon.env)
            pipe = RawClient(over_unix, daemon.env)
            pipe.initialize()
            throughput = pipe.pipelined(max(calls, 1000))
            pipe.close()

    docker_p50 = statistics.median(in_docker) * 1000
    print(f"| path (mcp-server-time, tools/call, n={calls}) | p50 | p99 | vs docker run -i |")
    print("| --- | --- | --- | --- |")
    print(row("direct stdio, no container", direct, None))
    print(row("`docker run -i`, hardened", in_docker, None))
    print(row("Stockade, Unix socket + mTLS", via_unix, docker_p50))
    print(row("Stockade, TCP + mTLS", via_tcp, docker_p50))
    print(f"| Stockade pipelined, one session | {throughput:,.0f} msg/s | | |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=500)
    main(parser.parse_args().calls)
