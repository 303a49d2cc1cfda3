"""What the canonical path costs per message, next to a plain `json.loads`.

Rows, for a typical ~300-byte `tools/call` and a ~20 KB `tools/list` answer:
  json.loads             the standard parser, nothing checked (the old path)
  strict loads           `wire.strict_json.loads`: duplicate/fold keys, numbers, depth
  strict loads + dumps   the canonical path: parse strictly, serialise again
  jsonrpc.parse          the relay's whole host-side parse (envelope checks, canonical bytes)
Each row: p50 and p99 over many single calls (µs). Prints Markdown; not a test.

Run: PYTHONPATH=daemon .venv/bin/python bench/canonical.py [--rounds 20000]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from stockade.relay import jsonrpc
from stockade.wire import strict_json

CALL = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 42,
        "method": "tools/call",
        "params": {
            "name": "search_files",
            "arguments": {
                "path": "/data/projects/stockade/docs",
                "pattern": "*.md",
                "excludePatterns": ["node_modules", ".git", "build"],
            },
            "_meta": {"progressToken": "c6a1f0d2-5b7e-4c1a-9d3f-2e8b7a6c5d4e"},
        },
    },
    separators=(",", ":"),
).encode()

LIST = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 2,
        "result": {
            "tools": [
                {
                    "name": f"tool_{n}",
                    "description": "Read the complete contents of a file from the file system. "
                    * 2,
                    "inputSchema": {
                        "type": "object",
                        "properties": {
                            "path": {"type": "string"},
                            "head": {"type": "number", "description": "first N lines"},
                            "tail": {"type": "number", "description": "last N lines"},
                        },
                        "required": ["path"],
                        "additionalProperties": False,
                    },
                }
                for n in range(40)
            ]
        },
    },
    separators=(",", ":"),
).encode()


def timed(function: Callable[[bytes], Any], data: bytes, rounds: int) -> tuple[float, float]:
    for _ in range(min(rounds, 2000)):  # warm-up
        function(data)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        began = clock()
        function(data)
        samples.append(clock() - began)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds
    rows: list[tuple[str, Callable[[bytes], Any]]] = [
        ("json.loads", json.loads),
        ("strict loads", strict_json.loads),
        ("strict loads + dumps", strict_json.canonical),
        ("jsonrpc.parse", lambda data: jsonrpc.parse(data, 4 * 1024 * 1024)),
    ]
    for label, data, n in (
        (f"tools/call, {len(CALL)} bytes", CALL, rounds),
        (f"tools/list answer, {len(LIST)} bytes", LIST, max(rounds // 20, 200)),
    ):
        print(f"\n### {label} ({n} rounds)\n")
        print("| path | p50 µs | p99 µs |")
        print("|---|---:|---:|")
        figures = {}
        for name, function in rows:
            p50, p99 = timed(function, data, n)
            figures[name] = p50
            print(f"| {name} | {p50:.1f} | {p99:.1f} |")
        added = figures["jsonrpc.parse"] - figures["json.loads"]
        print(f"\njsonrpc.parse adds {added:.1f} µs at p50 over a plain json.loads.")


if __name__ == "__main__":
    main()
