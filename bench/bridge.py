"""The weight of the stdio bridge: `stockade connect`'s resident memory, and the time from
launching it to the answer to `initialize`, with the server's warm pool full (as a host that
starts its servers sees it). A benchmark, not a test; prints Markdown.

Each run launches the bridge as a host does (its command line and certificate), writes
`initialize` at once, and times launch -> answer line; the RSS is read from /proc when the
answer arrives. Between runs the pool refills and its server finishes importing. For
reference, the same launch-to-exit for the interpreter alone and for importing the bridge.
The default (framed relay) and `--grpc` (Relay.Connect, the bridge before issue 18) are
measured interleaved in the same run.

Run: PYTHONPATH=daemon:. python bench/bridge.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import peers
from bench.measure import machine, rss_mib
from bench.raw_client import INIT
from tests.daemon_helper import Daemon, running_daemon


def wait_for_pool(daemon: Daemon) -> None:
    deadline = time.monotonic() + 120
    while daemon.status("time").get("pooled", 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the warm pool did not refill")
        time.sleep(0.1)
    time.sleep(1.0)  # let the pooled server finish importing: that is what "warm" buys


def launch_to_answer(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds from launch to the `initialize` answer, and the bridge's RSS (MiB) then."""
    request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT})
    began = time.perf_counter()
    bridge = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    assert bridge.stdin is not None and bridge.stdout is not None
    bridge.stdin.write(request.encode() + b"\n")
    bridge.stdin.flush()
    answer = json.loads(bridge.stdout.readline())
    elapsed = time.perf_counter() - began
    assert answer.get("id") == 1 and "result" in answer, answer
    rss = rss_mib(bridge.pid)
    bridge.stdin.close()
    bridge.wait(30)
    return elapsed, rss


def launch_to_exit(code: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def largest_imports(code: str, count: int) -> list[tuple[float, str, int]]:
    """The modules whose import (with what they import) costs most: `python -X importtime`."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    found = []
    for line in result.stderr.splitlines()[1:]:
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            depth = (len(name) - len(name.lstrip()) - 1) // 2  # who imported whom
            found.append((int(parts[1]) / 1000, name.strip(), depth))
    return sorted(found, reverse=True)[:count]


def main(runs: int) -> None:
    kinds = ("framed (default)", "`--grpc`")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    rss: dict[str, list[float]] = {kind: [] for kind in kinds}
    with (
        tempfile.TemporaryDirectory(prefix="stockade-bench-") as root,
        running_daemon(Path(root)) as daemon,
    ):
        daemon.add_server("time", peers.IMAGE, *peers.TIME_SERVER, warm=1)
        argv = daemon.bridge("time", daemon.issue_host("bench"))
        for _ in range(runs):  # interleaved: other work on the machine moves both alike
            for kind, extra in (("framed (default)", []), ("`--grpc`", ["--grpc"])):
                wait_for_pool(daemon)
                elapsed, memory = launch_to_answer([*argv, *extra], daemon.env)
                times[kind].append(elapsed)
                rss[kind].append(memory)
    interpreter = launch_to_exit("pass", runs)
    light = "import stockade.cli.main, stockade.cli.bridge"
    heavy = "import stockade.cli.commands, stockade.cli.connect"
    light_import = launch_to_exit(light, runs)
    heavy_import = launch_to_exit(heavy, runs)
    print(f"| `stockade connect`, warm pool, {runs} runs | median | min | max |")
    print("| --- | --- | --- | --- |")
    for kind in kinds:
        ms = [t * 1000 for t in times[kind]]
        print(
            f"| {kind}: launch to the `initialize` answer | {statistics.median(ms):.0f} ms "
            f"| {min(ms):.0f} ms | {max(ms):.0f} ms |"
        )
        print(
            f"| {kind}: bridge RSS at the answer | {statistics.median(rss[kind]):.1f} MiB "
            f"| {min(rss[kind]):.1f} MiB | {max(rss[kind]):.1f} MiB |"
        )
    print(f"| reference: `python -c pass`, launch to exit | {interpreter * 1000:.0f} ms | | |")
    print(f"| reference: import the bridge, launch to exit | {light_import * 1000:.0f} ms | | |")
    print(
        f"| reference: import the gRPC bridge and the CLI, launch to exit "
        f"| {heavy_import * 1000:.0f} ms | | |"
    )
    print(
        "\n| largest imports of the bridge (`python -X importtime`, one run) | cumulative | depth |"
    )
    print("| --- | --- | --- |")
    for milliseconds, name, depth in largest_imports(light, 12):
        print(f"| `{name}` | {milliseconds:.0f} ms | {depth} |")
    print(f"\n{machine()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    main(parser.parse_args().runs)
