"""What Stockade adds to a tools/call round trip, next to the bare container and the peers,
all measured in one run with the official MCP SDK client (PyPI `mcp`), as hosts use it.

Each row: one SDK session, `WARMUP` untimed calls, then n sequential `tools/call`s, timed.
Rows for mcp-server-time (`get_current_time`), each in the same hardened container image:
  docker run -i             the container straight over the docker CLI, SDK stdio client: the limit
  Stockade connect          `stockade connect` (stdio -> framed TLS 1.3 mTLS on the relay socket),
                            SDK stdio; and `--grpc` (stdio -> gRPC/mTLS, the bridge before issue 18)
  Stockade HTTP             the Streamable HTTP front, HTTPS with a client certificate, SDK HTTP
  mcp-proxy / supergateway / ContextForge translate
                            each wrapping the same `docker run -i` container, SDK HTTP client
and the same for a trivial echo server (bench/peers.py), whose time is almost all relay.
Also: the raw-client rows (no SDK: the least a client can do), the pipelined throughput of
one session, and the CPU that stockaded, the bridge and dockerd spend per relayed message
(/proc/PID/stat around the timed calls; bench/measure.py). HTTP rows count the TCP
connections opened and closed per call from the kernel's socket table (bench/measure.py).
With --rounds R every row is measured R times, interleaved (a round runs every row once),
and the tables give the median over the rounds of each round's p50 and p99: other work on a
shared machine then moves a round, not a row.
Peers come from `bash bench/peers.sh`. Prints Markdown; a benchmark, not a test.

Run: bash bench/peers.sh && PYTHONPATH=daemon:. python bench/relay.py [--calls 300 --rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import peers, raw_client, sdk_client
from bench.measure import (
    ConnectionMeter,
    CpuMeter,
    Meters,
    children,
    machine,
    percentile,
    pid_of,
)
from bench.sdk_client import ECHO, TIME
from tests.daemon_helper import Daemon, running_daemon

WARM = 2
SERVERS = (("time", peers.TIME_SERVER, TIME), ("echo", peers.ECHO_SERVER, ECHO))


@dataclass
class Row:
    """One path, over every round: its timed calls and, for HTTP, its connections."""

    name: str
    rounds: list[list[float]] = field(default_factory=list)
    http: bool = False
    opened: int = 0
    closed: int = 0

    def add(self, times: list[float], connections: ConnectionMeter | None = None) -> None:
        self.rounds.append(times)
        if connections is not None:
            self.http = True
            self.opened += connections.opened
            self.closed += connections.closed

    @property
    def p50(self) -> float:
        return statistics.median(statistics.median(times) for times in self.rounds) * 1000

    @property
    def p99(self) -> float:
        return statistics.median(percentile(times, 0.99) for times in self.rounds) * 1000

    def markdown(self, base: Row) -> str:
        conns = "—"
        if self.http:
            calls = sum(len(times) for times in self.rounds)
            conns = f"{self.opened / calls:.2f} / {self.closed / calls:.2f}"
        ratio = self.p50 / base.p50
        return f"| {self.name} | {self.p50:.2f} | {self.p99:.2f} | {ratio:.2f}x | {conns} |"


def wait_for_pool(daemon: Daemon, server: str) -> None:
    """Let the pool refill and its servers finish importing, so that no container start
    (the refill after a session took a pooled one) runs during the timed calls."""
    deadline = time.monotonic() + 120
    while daemon.status(server).get("pooled", 0) < WARM:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm pool of {server} did not refill")
        time.sleep(0.1)
    time.sleep(1.0)


class StdioCpu:
    """stockaded's, the bridge's and dockerd's CPU over the timed calls of a stdio row.
    dockerd is shared with whatever else runs on the machine: read it as an upper bound."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.spent: dict[str, float] = {}
        self.calls = 0
        self._cpu = CpuMeter()
        self._daemon: Daemon | None = None
        self._server = ""

    def round(self, daemon: Daemon, server: str) -> Meters:
        """A new round: its meters, to stop after the timed calls."""
        assert daemon.process is not None
        self._daemon, self._server = daemon, server
        self._cpu = CpuMeter()
        self._cpu.watch("stockaded", daemon.process.pid)
        self._cpu.watch("dockerd", pid_of("dockerd"))
        return Meters(self._cpu)

    def begin(self, bridge: int | None = None) -> None:
        """Just before the timed calls: the pool is full again, the bridge is known."""
        assert self._daemon is not None
        wait_for_pool(self._daemon, self._server)
        if bridge is None:
            found = children(os.getpid(), "connect")
            bridge = found[0] if len(found) == 1 else None
        self._cpu.watch("bridge", bridge)
        self._cpu.start()

    def end(self, calls: int) -> None:
        for name, seconds in self._cpu.spent.items():
            self.spent[name] = self.spent.get(name, 0.0) + seconds
        self.calls += calls

    def markdown(self) -> str:
        def per(name: str) -> str:
            if name not in self.spent:
                return "—"
            per_call = self.spent[name] / self.calls * 1000
            return f"{per_call:.3f} ({per_call / 2:.3f})"  # a call relays two messages

        return f"| {self.label} | {per('stockaded')} | {per('bridge')} | {per('dockerd')} |"


@dataclass
class Results:
    sdk: dict[str, Row] = field(default_factory=dict)
    raw: dict[str, Row] = field(default_factory=dict)
    rates: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, StdioCpu] = field(default_factory=dict)

    def sdk_row(self, name: str) -> Row:
        return self.sdk.setdefault(name, Row(name))

    def raw_row(self, name: str) -> Row:
        return self.raw.setdefault(name, Row(name))

    def rate(self, name: str, value: float) -> None:
        self.rates.setdefault(name, []).append(value)

    def cpu_of(self, label: str) -> StdioCpu:
        return self.cpu.setdefault(label, StdioCpu(label))


def bare(calls: int, pipelined: int, results: Results) -> None:
    """The limit: each server in the hardened container straight over `docker run -i`."""
    for server, argv, tool in SERVERS:
        name = f"`docker run -i`, hardened (the limit), {server}"
        results.sdk_row(name).add(sdk_client.over_stdio(peers.container(argv), tool, calls))
    direct = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]
    results.sdk_row("direct stdio, no container, time").add(
        sdk_client.over_stdio(direct, TIME, calls)
    )
    times = raw_client.raw_stdio(peers.container(peers.TIME_SERVER), TIME, calls)
    results.raw_row("`docker run -i`, hardened").add(times)
    for server, argv, tool in SERVERS:
        rate = raw_client.raw_pipelined(peers.container(argv), tool, pipelined)
        results.rate(f"`docker run -i`, {server}", rate)


def through_stockade(calls: int, pipelined: int, results: Results) -> None:
    """Everything measured through a daemon of its own, in a temporary state folder."""
    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as root:
        tcp, https = f"127.0.0.1:{peers.free_port()}", f"127.0.0.1:{peers.free_port()}"
        relay_tcp = f"127.0.0.1:{peers.free_port()}"
        daemon_env = {
            "STOCKADE_TCP_ADDRESS": tcp,
            "STOCKADE_HTTP_ADDRESS": https,
            "STOCKADE_RELAY_TCP_ADDRESS": relay_tcp,
        }
        with running_daemon(Path(root), **daemon_env) as daemon:
            daemon.add_server("time", peers.IMAGE, *peers.TIME_SERVER, warm=WARM)
            daemon.add_server("echo", peers.IMAGE, *peers.ECHO_SERVER, warm=WARM)
            creds = daemon.issue_host("bench")
            tls = sdk_client.client_tls(creds)
            for server, _, tool in SERVERS:
                bridge = daemon.bridge(server, creds)
                for how, argv in (
                    ("framed TLS/mTLS", bridge),
                    ("`--grpc`: gRPC/mTLS", [*bridge, "--grpc"]),
                ):
                    cpu = results.cpu_of(f"SDK client, sequential, {how}, {server}")
                    meters = cpu.round(daemon, server)
                    times = sdk_client.over_stdio(
                        argv, tool, calls, env=daemon.env, meters=meters, on_timed=cpu.begin
                    )
                    cpu.end(calls)
                    name = f"Stockade `stockade connect` (stdio → {how}), {server}"
                    results.sdk_row(name).add(times)

                conns = ConnectionMeter(int(https.rsplit(":", 1)[1]))
                times = sdk_client.over_http(
                    f"https://{https}/servers/{server}/mcp",
                    tool,
                    calls,
                    tls=tls,
                    meters=Meters(conns),
                    on_timed=functools.partial(wait_for_pool, daemon, server),
                )
                results.sdk_row(f"Stockade HTTP front, client cert, {server}").add(times, conns)

                cpu = results.cpu_of(f"raw client, pipelined, {server}")
                meters = cpu.round(daemon, server)
                rate = raw_client.raw_pipelined(
                    bridge, tool, pipelined, env=daemon.env, on_timed=cpu.begin, meters=meters
                )
                cpu.end(pipelined)
                results.rate(f"Stockade `stockade connect`, {server}", rate)
            over_unix = daemon.bridge("time", creds)
            at = over_unix.index("--socket")
            over_tcp = [*over_unix[:at], "--relay-address", relay_tcp, *over_unix[at + 2 :]]
            grpc_tcp = [*over_unix[:at], "--address", tcp, *over_unix[at + 2 :]]

            def settle(*_: int) -> None:
                wait_for_pool(daemon, "time")

            for name, argv in (
                ("Unix socket", over_unix),
                ("TCP", over_tcp),
                ("`--grpc`, Unix socket", [*over_unix, "--grpc"]),
                ("`--grpc`, TCP", grpc_tcp),
            ):
                times = raw_client.raw_stdio(argv, TIME, calls, env=daemon.env, on_timed=settle)
                results.raw_row(f"Stockade `stockade connect`, {name} + mTLS").add(times)
            url = f"https://{https}/servers/time/mcp"
            times = raw_client.raw_http(url, TIME, calls, on_timed=settle, verify=tls)
            results.raw_row("Stockade HTTP front, keep-alive client").add(times)


def through_peers(calls: int, results: Results) -> None:
    for name in peers.PEERS:
        for server, argv, tool in SERVERS:
            with peers.http_peer(name, peers.container(argv)) as url:
                conns = ConnectionMeter(int(url.rsplit(":", 1)[1].split("/")[0]))
                times = sdk_client.over_http(url, tool, calls, meters=Meters(conns))
                results.sdk_row(f"{name}, container, {server}").add(times, conns)


def main(calls: int, pipelined: int, rounds: int) -> None:
    started = time.monotonic()
    results = Results()
    try:
        for _ in range(rounds):
            bare(calls, pipelined, results)
            through_stockade(calls, pipelined, results)
            through_peers(calls, results)
    finally:
        peers.remove_containers()
    print_tables(calls, pipelined, rounds, results)
    print(f"\n{machine()}; the whole run took {time.monotonic() - started:.0f} s.")


def print_tables(calls: int, pipelined: int, rounds: int, results: Results) -> None:
    header = "| p50 ms | p99 ms | x bare container (p50) | TCP opened / closed per call |"
    each = f"{calls} sequential tools/call, median of {rounds} rounds"
    print(f"| official SDK client, {each} {header}")
    print("| --- | --- | --- | --- | --- |")
    for server in ("time", "echo"):
        base = results.sdk[f"`docker run -i`, hardened (the limit), {server}"]
        for row in results.sdk.values():
            if row.name.endswith(f", {server}"):
                print(row.markdown(base))
    print(f"\n| raw client (no SDK), {each}, time {header}")
    print("| --- | --- | --- | --- | --- |")
    base = results.raw["`docker run -i`, hardened"]
    for row in results.raw.values():
        print(row.markdown(base))
    print(f"\n| pipelined, one session, {pipelined} calls written, then read | calls/s | x bare |")
    print("| --- | --- | --- |")
    for name, values in results.rates.items():
        rate = statistics.median(values)
        bare_rate = statistics.median(results.rates[f"`docker run -i`, {name.rsplit(', ', 1)[1]}"])
        print(f"| {name} | {rate:,.0f} | {rate / bare_rate:.2f}x |")
    print("\n| CPU ms per call (per relayed message), timed calls | stockaded | bridge | dockerd |")
    print("| --- | --- | --- | --- |")
    for meter in results.cpu.values():
        print(meter.markdown())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--pipelined", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    main(arguments.calls, arguments.pipelined, arguments.rounds)
