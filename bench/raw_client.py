"""The least a client can do: raw JSON-RPC lines on a child's stdio, or one POST per request
on a kept-alive HTTP connection. Shows what a path costs without the SDK client's own work,
and drives the pipelined throughput (every request written before any answer is read).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx2

from bench.measure import Meters
from bench.sdk_client import WARMUP, Tool

INIT = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "bench", "version": "1"},
}


class RawClient:
    """One JSON-RPC line out, one line in."""

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

    def _write(self, body: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(body).encode() + b"\n")

    def _read_answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the server closed its output")
            message: dict[str, Any] = json.loads(line)
            if "id" in message and "method" not in message:
                return message

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._next += 1
        self._write({"jsonrpc": "2.0", "id": self._next, "method": method, "params": params})
        return self._read_answer()

    def initialize(self) -> RawClient:
        self.request("initialize", INIT)
        self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return self

    def warm_up(self, tool: Tool, on_timed: Callable[[int], None] | None) -> dict[str, Any]:
        """Untimed calls, then `on_timed(the child's pid)` just before the timed ones."""
        params = {"name": tool.name, "arguments": tool.arguments}
        for _ in range(WARMUP):
            self.request("tools/call", params)
        if on_timed is not None:
            on_timed(self.process.pid)
        return params

    def round_trips(
        self, tool: Tool, calls: int, on_timed: Callable[[int], None] | None = None
    ) -> list[float]:
        params = self.warm_up(tool, on_timed)
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            answer = self.request("tools/call", params)
            times.append(time.perf_counter() - began)
            assert "result" in answer, answer
        return times

    def pipelined(
        self, tool: Tool, calls: int, on_timed: Callable[[int], None] | None = None
    ) -> float:
        """Calls per second with every request written before any answer is read."""
        params = self.warm_up(tool, on_timed)
        began = time.perf_counter()
        for _ in range(calls):
            self._next += 1
            self._write(
                {"jsonrpc": "2.0", "id": self._next, "method": "tools/call", "params": params}
            )
        for _ in range(calls):
            assert "result" in self._read_answer()
        return calls / (time.perf_counter() - began)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


def raw_stdio(
    argv: list[str],
    tool: Tool,
    calls: int,
    *,
    env: dict[str, str] | None = None,
    on_timed: Callable[[int], None] | None = None,
) -> list[float]:
    client = RawClient(argv, env).initialize()
    try:
        return client.round_trips(tool, calls, on_timed)
    finally:
        client.close()


def raw_pipelined(
    argv: list[str],
    tool: Tool,
    calls: int,
    *,
    env: dict[str, str] | None = None,
    on_timed: Callable[[int], None] | None = None,
    meters: Meters | None = None,
) -> float:
    """Calls per second, one session; `meters` see only the pipelined calls."""
    client = RawClient(argv, env).initialize()
    try:
        rate = client.pipelined(tool, calls, on_timed)
        if meters is not None:
            meters.stop()
        return rate
    finally:
        client.close()


def raw_http(
    url: str, tool: Tool, calls: int, on_timed: Callable[[], None] | None = None, **options: Any
) -> list[float]:
    """One POST per request on a kept-alive connection; the answer is JSON or the last event
    of an event stream."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    with httpx2.Client(timeout=60, **options) as client:

        def post(body: dict[str, Any]) -> dict[str, Any] | None:
            answer = client.post(url, content=json.dumps(body), headers=headers)
            if "Mcp-Session-Id" in answer.headers:
                headers["Mcp-Session-Id"] = answer.headers["Mcp-Session-Id"]
            if answer.status_code == 202:
                return None
            if answer.headers.get("Content-Type", "").startswith("text/event-stream"):
                data = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
                return dict(json.loads(data[-1]))
            return dict(answer.json())

        post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})
        post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        params = {"name": tool.name, "arguments": tool.arguments}
        times = []
        for n in range(WARMUP + calls):
            if n == WARMUP and on_timed is not None:
                on_timed()
            began = time.perf_counter()
            answer = post({"jsonrpc": "2.0", "id": n + 1, "method": "tools/call", "params": params})
            if n >= WARMUP:
                times.append(time.perf_counter() - began)
            assert answer is not None and "result" in answer, answer
        return times
