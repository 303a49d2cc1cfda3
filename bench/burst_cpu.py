"""Where the CPU goes while a burst of sessions opens: per process group, against what the
machine's cores could give over the same window. Linux, cgroup v1 or v2.

Groups: the server containers (their cgroups' CPU, this daemon's containers only), the
bridges (`stockade connect` children of this process), stockaded, this process (the hosts'
SDK clients), dockerd, containerd, and the containerd shims (with the runc runs they waited
for: cutime/cstime). "machine busy" is every CPU's non-idle time from /proc/stat, so it also
holds other work on a shared machine; busy well below cores x window means the opening is
not CPU-bound: something waits or is serialised.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.measure import TICK


def machine_busy() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all cores)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def container_cpu(container_id: str) -> float | None:
    """CPU seconds of one container's cgroup; None if it has none (created and not started
    yet, e.g. a pool refill under way, or already gone)."""
    v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage")
    v2 = [
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat"),  # systemd
        Path(f"/sys/fs/cgroup/docker/{container_id}/cpu.stat"),  # cgroupfs
    ]
    try:
        if v1.exists():
            return int(v1.read_text()) / 1e9
        for path in v2:
            if path.exists():
                for line in path.read_text().splitlines():
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) / 1e6
    except OSError:  # it ended between the check and the read
        return None
    return None


def _group(pid: int, stat: list[str], comm: str, me: int, daemon: int) -> str | None:
    if pid == daemon:
        return "stockaded"
    if comm == "dockerd":
        return "dockerd"
    if comm == "containerd":
        return "containerd"
    if comm.startswith("containerd-shim"):
        return "containerd shims (+ runc)"
    if int(stat[1]) == me:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"connect" in cmdline:
            return "bridges (`stockade connect`)"
    return None


def process_cpu(me: int, daemon: int) -> dict[int, tuple[str, float]]:
    """pid -> (group, CPU seconds) for the processes of every group."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            raw = (entry / "stat").read_text()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            stat = raw.rsplit(")", 1)[1].split()
            group = _group(pid, stat, comm, me, daemon)
        except (OSError, ValueError):
            continue
        if group is None:
            continue
        ticks = int(stat[11]) + int(stat[12])
        if group.startswith("containerd shims"):
            ticks += int(stat[13]) + int(stat[14])  # the runc runs it waited for
        found[pid] = (group, ticks / TICK)
    return found


class BurstCpu:
    """CPU per group between start() and stop(), and the machine's busy time."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.me = os.getpid()
        self.groups: dict[str, float] = {}
        self.busy = 0.0
        self.unseen = 0  # containers with no cgroup at stop(): being created, or gone

    def start(self, containers: list[str]) -> None:
        self._machine = machine_busy()
        self._processes = process_cpu(self.me, self.daemon_pid)
        self._containers = {cid: container_cpu(cid) or 0.0 for cid in containers}
        self._self = sum(os.times()[:2])

    def stop(self, containers: list[str]) -> None:
        self.busy = machine_busy() - self._machine
        groups: dict[str, float] = {}
        for pid, (group, seconds) in process_cpu(self.me, self.daemon_pid).items():
            before = self._processes.get(pid, (group, 0.0))[1]
            groups[group] = groups.get(group, 0.0) + seconds - before
        # A container with no cgroup now (not started yet, or gone) adds nothing: the CPU
        # of one that ended during the burst is not seen.
        now = {cid: container_cpu(cid) for cid in containers}
        self.unseen = sum(1 for seconds in now.values() if seconds is None)
        groups["server containers (cgroups)"] = sum(
            seconds - self._containers.get(cid, 0.0)
            for cid, seconds in now.items()
            if seconds is not None
        )
        groups["hosts (this process: the SDK clients)"] = sum(os.times()[:2]) - self._self
        self.groups = dict(sorted(groups.items(), key=lambda item: -item[1]))

    def markdown(self, window: float, cores: int) -> list[str]:
        lines = [
            f"| CPU from launch to all served ({window:.1f} s x {cores} cores = "
            f"{window * cores:.1f} CPU s) | CPU s | share of capacity |",
            "| --- | --- | --- |",
        ]
        capacity = window * cores
        for group, seconds in self.groups.items():
            lines.append(f"| {group} | {seconds:.1f} | {seconds / capacity:.0%} |")
        known = sum(self.groups.values())
        lines.append(f"| sum of the above | {known:.1f} | {known / capacity:.0%} |")
        lines.append(
            f"| machine busy (all processes, other work too) | {self.busy:.1f} "
            f"| {self.busy / capacity:.0%} |"
        )
        if self.unseen:
            lines.append(
                f"| containers with no cgroup then (being created, or gone) | {self.unseen} | |"
            )
        return lines
