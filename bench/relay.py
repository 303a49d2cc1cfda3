"""What Stockade adds to a tools/call round trip, next to the bare container and the peers,
all measured in one run with the official MCP SDK client (PyPI `mcp`), as hosts use it.

Each row: one SDK session, `WARMUP` untimed calls, then n sequential `tools/call`s, timed.
Rows for mcp-server-time (`get_current_time`), each in the same hardened container image:
  docker run -i             the container straight over the docker CLI, SDK stdio client: the limit
  Stockade connect          `stockade connect` (stdio -> gRPC/mTLS on the Unix socket), SDK stdio
  Stockade HTTP             the Streamable HTTP front, HTTPS with a client certificate, SDK HTTP
  mcp-proxy / supergateway / ContextForge translate
                            each wrapping the same `docker run -i` container, SDK HTTP client
and the same for a trivial echo server (bench/peers.py), whose time is almost all relay.
Also: the raw-client rows (no SDK: the least a client can do), the pipelined throughput of
one session, and the CPU that stockaded, the bridge and dockerd spend per relayed message
(/proc/PID/stat around the timed calls; bench/measure.py). HTTP rows count the TCP
connections opened and closed per call from the kernel's socket table (bench/measure.py).
Peers come from `bash bench/peers.sh`. Prints Markdown; a benchmark, not a test.

Run: bash bench/peers.sh && PYTHONPATH=daemon:. python bench/relay.py [--calls 300]
"""

from __future__ import annotations

import argparse
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


@dataclass
class Row:
    name: str
    times: list[float]
    base: list[float] | None = None  # the bare container's times for the same server
    connections: ConnectionMeter | None = None
    calls: int = field(init=False)

    def __post_init__(self) -> None:
        self.calls = len(self.times)

    def markdown(self) -> str:
        p50, p99 = statistics.median(self.times) * 1000, percentile(self.times, 0.99) * 1000
        ratio = (
            f"{statistics.median(self.times) / statistics.median(self.base):.2f}x"
            if self.base
            else "1.00x"
        )
        conns = "—"
        if self.connections is not None:
            opened = self.connections.opened / self.calls
            closed = self.connections.closed / self.calls
            conns = f"{opened:.2f} / {closed:.2f}"
        return f"| {self.name} | {p50:.2f} | {p99:.2f} | {ratio} | {conns} |"


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

    def __init__(self, daemon: Daemon, server: str, label: str) -> None:
        assert daemon.process is not None
        self.daemon, self.server, self.label = daemon, server, label
        self.cpu = CpuMeter()
        self.cpu.watch("stockaded", daemon.process.pid)
        self.cpu.watch("dockerd", pid_of("dockerd"))
        self.meters = Meters(self.cpu)
        self.calls = 0

    def begin(self, bridge: int | None = None) -> None:
        """Just before the timed calls: the pool is full again, the bridge is known."""
        wait_for_pool(self.daemon, self.server)
        if bridge is None:
            found = children(os.getpid(), "connect")
            bridge = found[0] if len(found) == 1 else None
        self.cpu.watch("bridge", bridge)
        self.meters.start()

    def markdown(self) -> str:
        def per(name: str) -> str:
            if name not in self.cpu.spent:
                return "—"
            per_call = self.cpu.spent[name] / self.calls * 1000
            return f"{per_call:.3f} ({per_call / 2:.3f})"  # a call relays two messages

        return f"| {self.label} | {per('stockaded')} | {per('bridge')} | {per('dockerd')} |"


@dataclass
class Results:
    sdk_rows: list[Row] = field(default_factory=list)
    raw_rows: list[Row] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)
    cpu: list[StdioCpu] = field(default_factory=list)


def through_stockade(calls: int, pipelined: int, results: Results) -> None:
    """Everything measured through a daemon of its own, in a temporary state folder."""
    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as root:
        tcp, https = f"127.0.0.1:{peers.free_port()}", f"127.0.0.1:{peers.free_port()}"
        daemon_env = {"STOCKADE_TCP_ADDRESS": tcp, "STOCKADE_HTTP_ADDRESS": https}
        with running_daemon(Path(root), **daemon_env) as daemon:
            daemon.add_server("time", peers.IMAGE, *peers.TIME_SERVER, warm=WARM)
            daemon.add_server("echo", peers.IMAGE, *peers.ECHO_SERVER, warm=WARM)
            creds = daemon.issue_host("bench")
            tls = sdk_client.client_tls(creds)
            for server, tool in (("time", TIME), ("echo", ECHO)):
                bridge = daemon.bridge(server, creds)
                meter = StdioCpu(daemon, server, f"SDK client, sequential, {server}")
                times = sdk_client.over_stdio(
                    bridge, tool, calls, env=daemon.env, meters=meter.meters, on_timed=meter.begin
                )
                meter.calls = calls
                results.cpu.append(meter)
                name = f"Stockade `stockade connect` (stdio → gRPC/mTLS), {server}"
                results.sdk_rows.append(Row(name, times))

                conns = ConnectionMeter(int(https.rsplit(":", 1)[1]))
                url = f"https://{https}/servers/{server}/mcp"
                times = sdk_client.over_http(
                    url,
                    tool,
                    calls,
                    tls=tls,
                    meters=Meters(conns),
                    on_timed=lambda s=server: wait_for_pool(daemon, s),
                )
                name = f"Stockade HTTP front, client cert, {server}"
                results.sdk_rows.append(Row(name, times, connections=conns))

                piped = StdioCpu(daemon, server, f"raw client, pipelined, {server}")
                rate = raw_client.raw_pipelined(
                    bridge,
                    tool,
                    pipelined,
                    env=daemon.env,
                    on_timed=piped.begin,
                    meters=piped.meters,
                )
                piped.calls = pipelined
                results.cpu.append(piped)
                results.rates[f"Stockade `stockade connect`, {server}"] = rate
            over_tcp = daemon.bridge("time", creds)
            at = over_tcp.index("--socket")
            over_tcp[at : at + 2] = ["--address", tcp]
            settle = lambda *_: wait_for_pool(daemon, "time")  # noqa: E731
            for name, argv in (("Unix socket", daemon.bridge("time", creds)), ("TCP", over_tcp)):
                times = raw_client.raw_stdio(argv, TIME, calls, env=daemon.env, on_timed=settle)
                results.raw_rows.append(Row(f"Stockade `stockade connect`, {name} + mTLS", times))
            url = f"https://{https}/servers/time/mcp"
            times = raw_client.raw_http(url, TIME, calls, on_timed=settle, verify=tls)
            results.raw_rows.append(Row("Stockade HTTP front, keep-alive client", times))


SERVERS = (("time", peers.TIME_SERVER, TIME), ("echo", peers.ECHO_SERVER, ECHO))


def through_peers(calls: int, results: Results) -> None:
    for name in peers.PEERS:
        for server, argv, tool in SERVERS:
            with peers.http_peer(name, peers.container(argv)) as url:
                conns = ConnectionMeter(int(url.rsplit(":", 1)[1].split("/")[0]))
                times = sdk_client.over_http(url, tool, calls, meters=Meters(conns))
                results.sdk_rows.append(
                    Row(f"{name}, container, {server}", times, connections=conns)
                )


def main(calls: int, pipelined: int) -> None:
    started = time.monotonic()
    results = Results()
    try:
        bare = {
            server: sdk_client.over_stdio(peers.container(argv), tool, calls)
            for server, argv, tool in SERVERS
        }
        server = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]
        direct = Row("direct stdio, no container", sdk_client.over_stdio(server, TIME, calls))
        results.raw_rows.append(
            Row(
                "`docker run -i`, hardened",
                raw_client.raw_stdio(peers.container(peers.TIME_SERVER), TIME, calls),
            )
        )
        for server, argv, tool in SERVERS:
            rate = raw_client.raw_pipelined(peers.container(argv), tool, pipelined)
            results.rates[f"`docker run -i`, {server}"] = rate
        through_stockade(calls, pipelined, results)
        through_peers(calls, results)
    finally:
        peers.remove_containers()
    print_tables(calls, pipelined, bare, direct, results)
    print(f"\n{machine()}; the whole run took {time.monotonic() - started:.0f} s.")


def print_tables(
    calls: int, pipelined: int, bare: dict[str, list[float]], direct: Row, results: Results
) -> None:
    header = "| p50 ms | p99 ms | x bare container (p50) | TCP opened / closed per call |"
    print(f"| official SDK client, {calls} sequential tools/call {header}")
    print("| --- | --- | --- | --- | --- |")
    for server in ("time", "echo"):
        print(Row(f"`docker run -i`, hardened (the limit), {server}", bare[server]).markdown())
        for row in results.sdk_rows:
            if row.name.endswith(f", {server}"):
                row.base = bare[server]
                print(row.markdown())
    direct.base = bare["time"]
    print(direct.markdown())
    print(f"\n| raw client (no SDK), {calls} sequential tools/call, time {header}")
    print("| --- | --- | --- | --- | --- |")
    for row in results.raw_rows:
        row.base = results.raw_rows[0].times
        print(row.markdown())
    print(f"\n| pipelined, one session, {pipelined} calls written, then read | calls/s | x bare |")
    print("| --- | --- | --- |")
    for name, rate in results.rates.items():
        bare_rate = results.rates[f"`docker run -i`, {name.rsplit(', ', 1)[1]}"]
        print(f"| {name} | {rate:,.0f} | {rate / bare_rate:.2f}x |")
    print("\n| CPU ms per call (per relayed message), timed calls | stockaded | bridge | dockerd |")
    print("| --- | --- | --- | --- |")
    for meter in results.cpu:
        print(meter.markdown())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--pipelined", type=int, default=1000)
    arguments = parser.parse_args()
    main(arguments.calls, arguments.pipelined)
