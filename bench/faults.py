"""Soak and faults: one session misbehaves (or its server does); does another session notice?

A real daemon with the scratch server (tests/scratch_server.py; per-session sandboxes, a warm
pool). A probe session measures sequential `scratch/echo` round trips on the idle daemon,
then again while each misbehaviour runs in another session: the server writes garbage
lines, stderr lines or valid notifications by the hundred thousand; its host stops reading
while it floods; it never answers (the request timeout fires); oversized requests and
answers, one after another for 20 s. The misbehaving host is a separate process (as a real
host is), so that its own reading does not share the probe's event loop. Prints, per
misbehaviour, what the misbehaving session got, the probe's p50/p99 next to idle (measured
just before it), and how much the daemon's log grew (the probe's own lines left out); then
how many daemon log lines say "never retrieved" or "never awaited".
A benchmark, not a test: nothing here asserts a timing, and a shared 2-core machine moves
the numbers by tens of percent.

Run: PYTHONPATH=daemon:. python bench/faults.py [--lines 200000 --stderr-lines 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade.v1 import relay_pb2, relay_pb2_grpc
from tests.daemon_helper import Daemon, HostSession, running_daemon, secure_channel

MAX_MESSAGE = 1024 * 1024  # the daemon's max_message_bytes in this run (oversized: above it)
REQUEST_TIMEOUT = 60.0  # the daemon's request_timeout_seconds in this run
IDLE_CALLS = 300
PROBE_MIN_CALLS = 100  # the probe goes on while the misbehaviour does, at least this many
PROBE_INTERVAL = 0.005  # between probe calls: a steady caller, not a second flood
FAULT_SECONDS = 120.0  # no misbehaviour runs longer than this
PROBE_INSTANCES: set[str] = set()  # the probe's own server's log lines are not the fault's


@dataclass(frozen=True)
class Fault:
    label: str
    method: str
    params: dict[str, Any]
    # "answer": read until answered; "repeat": ask again after each answer, as long as a
    # stall lasts; "stall": never read, then vanish
    mode: str = "answer"
    junk_lines: int = 0  # lines the daemon must not log one by one


async def _misbehave(socket: str, credentials: str, fault: dict[str, Any]) -> dict[str, Any]:
    """The misbehaving host (run in its own process): send, then read or stall."""
    channel = secure_channel(f"unix:{socket}", Path(credentials))
    call = relay_pb2_grpc.RelayStub(channel).Connect()
    await call.write(relay_pb2.ClientFrame(open=relay_pb2.OpenSession(server="scratch")))
    opened = await call.read()
    assert opened.WhichOneof("kind") == "opened"
    began = time.monotonic()

    def request(request_id: int) -> bytes:
        if fault["method"] == "oversized-request":
            pad = {"pad": "p" * (MAX_MESSAGE + 1024)}
            body = {"jsonrpc": "2.0", "id": request_id, "method": "scratch/echo", "params": pad}
        else:
            body = {"jsonrpc": "2.0", "id": request_id, "method": fault["method"]}
            body["params"] = fault["params"]
        return json.dumps(body).encode()

    await call.write(relay_pb2.ClientFrame(message=request(1)))
    print("sent", flush=True)  # the probe starts now
    result: dict[str, Any] = {"notifications": 0, "answer": None, "answers": 0}
    if fault["mode"] == "stall":
        await asyncio.sleep(fault["seconds"])  # the server floods; this host reads nothing
        call.cancel()
        await channel.close()
        result["seconds"] = time.monotonic() - began
        return result
    deadline = began + FAULT_SECONDS
    waiting = 1
    while time.monotonic() < deadline:
        frame = await asyncio.wait_for(call.read(), deadline - time.monotonic())
        if frame is None or frame.WhichOneof("kind") != "message":
            result["closed"] = str(frame)
            break
        message = json.loads(frame.message)
        if "method" in message:
            result["notifications"] += 1
        elif message.get("id") == waiting:
            error = message.get("error")
            result["answer"] = f"error {error['code']}" if error else "result"
            result["answers"] += 1
            if fault["mode"] != "repeat" or time.monotonic() - began >= fault["seconds"]:
                break
            waiting += 1  # "repeat": the same again, for as long as a stall lasts
            await call.write(relay_pb2.ClientFrame(message=request(waiting)))
    result["seconds"] = time.monotonic() - began
    await call.done_writing()
    await channel.close()
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def probe(
    daemon: Daemon, calls: int, until_done: subprocess.Popen[str] | None
) -> list[float]:
    """Echo round trips (ms), one every PROBE_INTERVAL: `calls` of them, or with
    `until_done`, for as long as that process runs (at least PROBE_MIN_CALLS)."""
    times: list[float] = []
    deadline = time.monotonic() + FAULT_SECONDS
    async with HostSession(daemon, "scratch", daemon.hosts["probe"]) as host:
        assert host.opened is not None
        PROBE_INSTANCES.add(host.opened.instance)
        for n in range(10**9):
            start = time.perf_counter()
            await host.request("scratch/echo", {"n": n}, timeout=60)
            times.append((time.perf_counter() - start) * 1000)
            if until_done is None:
                if len(times) >= calls:
                    break
            elif len(times) >= calls and (
                until_done.poll() is not None or time.monotonic() > deadline
            ):
                break
            await asyncio.sleep(PROBE_INTERVAL)
    return times


def wait_pool(daemon: Daemon, seconds: float = 60) -> None:
    """Every pooled instance started and the in-use ones gone: the next fault starts calm."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = daemon.status("scratch")
        if state.get("pooled", 0) >= 2 and state.get("in_use", 0) == 0:
            break
        time.sleep(0.5)
    time.sleep(1.5)  # a fresh instance's interpreter finishes starting


def run_fault(daemon: Daemon, fault: Fault) -> tuple[dict[str, Any], list[float], list[float], int]:
    """(the misbehaving host's report, the probe's round trips just before and during,
    daemon log growth). Idle is measured right before each fault: other work on a shared
    machine moves it by more than some faults do."""
    idle = asyncio.run(probe(daemon, IDLE_CALLS, None))
    log_before = daemon.log_path.stat().st_size
    spec = {"method": fault.method, "params": fault.params, "mode": fault.mode, "seconds": 20.0}
    host = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--misbehave",
            json.dumps(spec),
            str(daemon.socket),
            str(daemon.hosts["noisy"]),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=daemon.env | {"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    assert host.stdout is not None
    assert host.stdout.readline().strip() == "sent"
    time.sleep(0.5)  # the misbehaviour is under way
    times = asyncio.run(probe(daemon, PROBE_MIN_CALLS, host))
    out, _ = host.communicate(timeout=FAULT_SECONDS + 30)
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    with daemon.log_path.open("rb") as log:
        log.seek(log_before)
        grown = sum(
            len(line)
            for line in log
            if not any(instance.encode() in line for instance in PROBE_INSTANCES)
        )
    wait_pool(daemon)
    return report, idle, times, grown


def outcome(fault: Fault, report: dict[str, Any]) -> str:
    if fault.mode == "stall":
        return f"stalled {report['seconds']:.0f} s, then vanished"
    text = str(report["answer"] or report.get("closed") or "no answer")
    if report["answers"] > 1:
        text = f"{report['answers']:,} x {text}"
    if report["notifications"]:
        text += f"; {report['notifications']:,} notifications forwarded"
    return f"{text} after {report['seconds']:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--stderr-lines", type=int, default=100_000)
    parser.add_argument("--only", default="", help="run only the faults whose label has this")
    parser.add_argument("--keep-log", type=Path, help="copy the daemon's log here at the end")
    parser.add_argument("--misbehave", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.misbehave:
        spec, socket, credentials = args.misbehave
        print(json.dumps(asyncio.run(_misbehave(socket, credentials, json.loads(spec)))))
        return
    n, e = args.lines, args.stderr_lines
    faults = [
        Fault("none (control: a host holds an idle session 20 s)", "scratch/echo", {}, "stall"),
        Fault(
            f"server writes {n:,} garbage stdout lines",
            "scratch/garbage",
            {"count": n},
            "answer",
            n,
        ),
        Fault(
            f"server writes {e:,} stderr lines", "scratch/stderr-lines", {"count": e}, "answer", e
        ),
        Fault(
            f"server sends {n:,} valid notifications", "scratch/flood", {"count": n, "size": 200}
        ),
        Fault(
            f"host stops reading while its server floods ({n:,})",
            "scratch/flood",
            {"count": n, "size": 200},
            "stall",
        ),
        Fault("server never answers (timeout fires)", "scratch/hang", {}),
        Fault(
            "oversized requests (1 MiB + 1 KiB), one after another",
            "oversized-request",
            {},
            "repeat",
        ),
        Fault(
            "oversized answers (2 MiB), one after another",
            "scratch/big",
            {"size": 2 * MAX_MESSAGE},
            "repeat",
        ),
    ]
    faults = [f for f in faults if args.only in f.label]
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory() as root,
        running_daemon(
            Path(root),
            STOCKADE_REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT),
            STOCKADE_MAX_MESSAGE_BYTES=str(MAX_MESSAGE),
        ) as daemon,
    ):
        daemon.add_scratch_server("scratch", "--warm", "2")
        for name in ("probe", "noisy"):
            daemon.issue_host(name)
        wait_pool(daemon, 120)
        asyncio.run(probe(daemon, 50, None))  # warm up the probe's path
        rows = []
        for fault in faults:
            report, idle, times, grown = run_fault(daemon, fault)
            per_100k = grown / max(1, fault.junk_lines) * 100_000 / 1024
            idle_p99, p99 = percentile(idle, 0.99), percentile(times, 0.99)
            rows.append(
                f"| {fault.label} | {outcome(fault, report)} | "
                f"{statistics.median(idle):.2f} / {idle_p99:.2f} | "
                f"{statistics.median(times):.2f} / {p99:.2f} (n={len(times)}) | "
                f"{p99 / idle_p99:.2f}x | {grown / 1024:.1f} KiB"
                + (f" ({per_100k:.1f} KiB per 100k lines)" if fault.junk_lines else "")
                + " |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
        log_text = daemon.log_path.read_text(errors="replace")
        if args.keep_log:
            args.keep_log.write_text(log_text)
    print(
        "| misbehaviour (in one session) | what that session got | other session p50 / p99 ms, "
        "idle just before | the same, during | p99 x idle | daemon log growth |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(row)
    unretrieved = log_text.count("never retrieved") + log_text.count("never awaited")
    print()
    print(f'Daemon log lines saying "never retrieved" or "never awaited": {unretrieved}.')
    print()
    print(
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), Linux "
        f"{platform.release()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average {os.getloadavg()[0]:.2f} (1 min) at the end; "
        f"the whole run took {time.monotonic() - began:.0f} s."
    )


if __name__ == "__main__":
    main()
