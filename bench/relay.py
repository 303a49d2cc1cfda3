"""What Stockade adds to a tools/call round trip, next to the paths without it.

Rows (mcp-server-time, `get_current_time`, sequential, n calls each after a warm-up):
  direct stdio        the server as a local process, no container
  docker run -i       the same server in the hardened container, straight over the docker CLI
  stockade (unix)     stockade connect -> gRPC over the Unix socket (mTLS) -> daemon -> attach
  stockade (tcp)      the same over TCP on loopback (mTLS)
  stockade (http)     the Streamable HTTP front, HTTPS with a client certificate
  mcp-proxy (http)    PyPI mcp-proxy (stdio -> Streamable HTTP, plain HTTP) in front of the
                      same hardened `docker run -i` container, in its own venv (.tools/)
and the pipelined throughput of one Stockade session (all requests written, then read).
The stdio paths are driven by a raw JSON-RPC client on a child process's stdio, the HTTP
paths by one small HTTP client (keep-alive, one POST per request). Prints Markdown; not a test.

Run: PYTHONPATH=. .venv/bin/python bench/relay.py [--calls 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

from tests.daemon_helper import running_daemon

CALL = {"name": "get_current_time", "arguments": {"timezone": "UTC"}}
MCP_PROXY_VERSION = "0.13.0"
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


class HttpClient:
    """One POST per request on a kept-alive connection; the answer is JSON or the last
    event of an event stream."""

    def __init__(self, url: str, **options: object) -> None:
        self.url = url
        self.client = httpx2.Client(timeout=60, **options)  # type: ignore[arg-type]
        self.headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        }
        self._next = 0

    def post(self, body: dict[str, object]) -> dict[str, object] | None:
        answer = self.client.post(self.url, content=json.dumps(body), headers=self.headers)
        if "Mcp-Session-Id" in answer.headers:
            self.headers["Mcp-Session-Id"] = answer.headers["Mcp-Session-Id"]
        if answer.status_code == 202:
            return None
        if answer.headers.get("Content-Type", "").startswith("text/event-stream"):
            data = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
            return dict(json.loads(data[-1]))
        return dict(answer.json())

    def round_trips(self, calls: int) -> list[float]:
        init = {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        }
        self.post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        times = []
        for n in range(20 + calls):
            began = time.perf_counter()
            answer = self.post(
                {"jsonrpc": "2.0", "id": n + 1, "method": "tools/call", "params": CALL}
            )
            if n >= 20:  # after the warm-up
                times.append(time.perf_counter() - began)
            assert answer is not None and "result" in answer, answer
        self.client.close()
        return times


def mcp_proxy() -> Path:
    """mcp-proxy in its own venv: it pins an older MCP SDK than Stockade's tests use."""
    venv = Path(".tools/mcp-proxy")
    binary = venv / "bin" / "mcp-proxy"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q", f"mcp-proxy=={MCP_PROXY_VERSION}"]
        subprocess.run(pip, check=True)
    return binary


def via_mcp_proxy(container: list[str], calls: int) -> list[float]:
    port = free_port()
    proxy = subprocess.Popen(
        [str(mcp_proxy()), "--host", "127.0.0.1", "--port", str(port), "--", *container],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mcp-proxy did not start") from None
                time.sleep(0.2)
        return HttpClient(f"http://127.0.0.1:{port}/mcp").round_trips(calls)
    finally:
        proxy.terminate()
        proxy.wait(30)


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
        tcp, https = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        daemon_env = {"STOCKADE_TCP_ADDRESS": tcp, "STOCKADE_HTTP_ADDRESS": https}
        with running_daemon(Path(root), **daemon_env) as daemon:
            daemon.add_server(
                "time",
                "stockade/python:latest",
                "mcp-server-time",
                "--local-timezone",
                "UTC",
                warm=2,
            )
            creds = daemon.issue_host("bench")
            over_unix = daemon.bridge("time", creds)
            over_tcp = list(over_unix)
            at = over_tcp.index("--socket")
            over_tcp[at : at + 2] = ["--address", tcp]
            via_unix = measure(over_unix, calls, daemon.env)
            via_tcp = measure(over_tcp, calls, daemon.env)
            tls = ssl.create_default_context(cafile=str(creds / "ca.crt"))
            tls.load_cert_chain(creds / "client.crt", creds / "client.key")
            via_http = HttpClient(f"https://{https}/servers/time/mcp", verify=tls).round_trips(
                calls
            )
            pipe = RawClient(over_unix, daemon.env)
            pipe.initialize()
            throughput = pipe.pipelined(max(calls, 1000))
            pipe.close()

    proxied = via_mcp_proxy(container, calls)
    docker_p50 = statistics.median(in_docker) * 1000
    print(f"| path (mcp-server-time, tools/call, n={calls}) | p50 | p99 | vs docker run -i |")
    print("| --- | --- | --- | --- |")
    print(row("direct stdio, no container", direct, None))
    print(row("`docker run -i`, hardened", in_docker, None))
    print(row("Stockade, Unix socket + mTLS", via_unix, docker_p50))
    print(row("Stockade, TCP + mTLS", via_tcp, docker_p50))
    print(row("Stockade, Streamable HTTP (HTTPS + client cert)", via_http, docker_p50))
    print(row(f"mcp-proxy {MCP_PROXY_VERSION}, Streamable HTTP (plain)", proxied, docker_p50))
    ratio = statistics.median(proxied) / statistics.median(via_http)
    print(f"| Stockade HTTP vs mcp-proxy, p50 | {ratio:.1f}x faster | | |")
    print(f"| Stockade pipelined, one session | {throughput:,.0f} msg/s | | |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=500)
    main(parser.parse_args().calls)
