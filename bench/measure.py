"""What the benchmarks read off the machine: process CPU and RSS from /proc, TCP connections
from `ss`, and percentiles. Linux only; nothing here changes what it measures.

CPU is utime + stime of every thread of a process (/proc/PID/stat, in clock ticks, so it is
only as fine as 1/CLK_TCK: 10 ms on this kernel; measure over enough calls).
Connections to a port are counted from the kernel's socket table (`ss -tan`): a closed TCP
connection leaves exactly one socket in TIME-WAIT for 60 s, on whichever side closed first,
and on loopback both sides are in the table, so TIME-WAIT sockets with the port at either end
count the connections closed; client-side sockets (destination port = the port) in any
other state count the ones still open. Opened during a window = closed + change in open.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of proc(5)


def rss_mib(pid: int) -> float:
    """Resident memory now (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(parent: int, word: str) -> list[int]:
    """Child processes of `parent` whose command line contains `word`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and word in cmdline:
            found.append(int(entry.name))
    return found


def pid_of(name: str) -> int | None:
    result = subprocess.run(["pidof", "-s", name], capture_output=True, text=True, check=False)
    return int(result.stdout) if result.returncode == 0 else None


class CpuMeter:
    """CPU seconds that named processes spend between start() and stop()."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self._began: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def watch(self, name: str, pid: int | None) -> None:
        if pid is not None:
            self.pids[name] = pid

    def start(self) -> None:
        self._began = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.spent = {name: cpu_seconds(pid) - self._began[name] for name, pid in self.pids.items()}


@dataclass
class TcpCount:
    closed: int  # sockets in TIME-WAIT with the port at either end
    open: int  # client-side sockets to the port in any other state


def tcp_count(port: int) -> TcpCount:
    table = subprocess.run(
        ["ss", "-Htan"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    closed = opened = 0
    suffix = f":{port}"
    for line in table:
        parts = line.split()
        if len(parts) < 5:
            continue
        state, local, peer = parts[0], parts[3], parts[4]
        if state == "TIME-WAIT" and (local.endswith(suffix) or peer.endswith(suffix)):
            closed += 1
        elif state not in ("LISTEN", "TIME-WAIT") and peer.endswith(suffix):
            opened += 1
    return TcpCount(closed, opened)


class ConnectionMeter:
    """TCP connections to one port opened and closed between start() and stop()."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._before = TcpCount(0, 0)
        self.closed = self.opened = 0

    def start(self) -> None:
        self._before = tcp_count(self.port)

    def stop(self) -> None:
        time.sleep(0.3)  # let the last close reach TIME-WAIT
        after = tcp_count(self.port)
        self.closed = after.closed - self._before.closed
        self.opened = self.closed + after.open - self._before.open


class Meters:
    """Several meters started and stopped together around the timed loop."""

    def __init__(self, *meters: CpuMeter | ConnectionMeter) -> None:
        self.meters = meters

    def start(self) -> None:
        for meter in self.meters:
            meter.start()

    def stop(self) -> None:
        for meter in self.meters:
            meter.stop()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def p50(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    return (
        f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, {when}; "
        f"load average {load:.2f} (1 min) at the end"
    )
