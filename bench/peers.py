"""The servers and the peers the relay benchmark compares Stockade with.

Every peer wraps the same hardened container (`docker run -i` with Stockade's sandbox flags,
image stockade/python) as its stdio command, and serves Streamable HTTP on loopback:
  mcp-proxy 0.13.0                 its own venv (.tools/bench/mcp-proxy, MCP SDK < 2)
  supergateway --stateful (npm)    .tools/bench/npm; binds every interface (it has no host
                                   option); only loopback is ever used
  ContextForge mcpgateway.translate  its own venv (.tools/bench/contextforge),
                                   --expose-streamable-http, its default event-stream answers
`bash bench/peers.sh` installs them; nothing here installs anything.
The echo server is a raw JSON-RPC loop run with `python3 -c` in the same image, so that the
relay's own ceiling shows where the time server is the bottleneck.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / ".tools" / "bench"
IMAGE = "stockade/python:latest"
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
TIME_SERVER = ["mcp-server-time", "--local-timezone", "UTC"]
ECHO_SCRIPT = """\
import json, sys
read, write = sys.stdin.buffer.readline, sys.stdout.buffer
tools = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
for line in iter(read, b""):
    message = json.loads(line)
    if "id" not in message or "method" not in message:
        continue
    method = message["method"]
    if method == "initialize":
        result = {"protocolVersion": message["params"]["protocolVersion"],
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "echo", "version": "1"}}
    elif method == "tools/list":
        result = tools
    elif method == "tools/call":
        text = json.dumps(message["params"].get("arguments"))
        result = {"content": [{"type": "text", "text": text}]}
    else:
        result = {}
    write.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode())
    write.write(b"\\n")
    write.flush()
"""
ECHO_SERVER = ["python3", "-c", ECHO_SCRIPT]


LABEL = "io.stockade.bench"
RUN = f"{os.getpid()}-{secrets.token_hex(4)}"  # this run's containers carry LABEL=RUN


def container(server: list[str]) -> list[str]:
    """`docker run -i` of `server` in the hardened sandbox: the bare limit every peer wraps."""
    docker = shutil.which("docker") or "docker"
    return [docker, "run", "--rm", "-i", "--label", f"{LABEL}={RUN}", *HARDENED, IMAGE, *server]


def remove_containers() -> None:
    """Remove what this run started with `docker run` and is still there."""
    listed = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL}={RUN}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if listed:
        subprocess.run(["docker", "rm", "-f", *listed], capture_output=True, check=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (see bench/peers.sh)") from None
            time.sleep(0.2)


def _need(path: Path) -> Path:
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `bash bench/peers.sh` first")
    return path


def mcp_proxy_argv(port: int, wrapped: list[str]) -> list[str]:
    binary = _need(TOOLS / "mcp-proxy" / "bin" / "mcp-proxy")
    return [str(binary), "--host", "127.0.0.1", "--port", str(port), "--", *wrapped]


def supergateway_argv(port: int, wrapped: list[str]) -> list[str]:
    binary = _need(TOOLS / "npm" / "node_modules" / ".bin" / "supergateway")
    return [
        str(binary),
        "--stdio",
        shlex.join(wrapped),
        "--outputTransport",
        "streamableHttp",
        "--stateful",
        "--port",
        str(port),
        "--logLevel",
        "none",
    ]


def contextforge_argv(port: int, wrapped: list[str]) -> list[str]:
    python = _need(TOOLS / "contextforge" / "bin" / "python")
    return [
        str(python),
        "-m",
        "mcpgateway.translate",
        "--stdio",
        shlex.join(wrapped),
        "--expose-streamable-http",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--logLevel",
        "error",
    ]


def contextforge_env() -> dict[str, str]:
    """ContextForge refuses to start without these set to long values; throwaway ones."""
    names = [
        "JWT_SECRET_KEY",
        "AUTH_ENCRYPTION_SECRET",
        "BASIC_AUTH_PASSWORD",
        "PLATFORM_ADMIN_PASSWORD",
        "DEFAULT_USER_PASSWORD",
    ]
    return {**os.environ, **{name: secrets.token_urlsafe(32) for name in names}}


PEERS = {
    "mcp-proxy 0.13.0": mcp_proxy_argv,
    "supergateway 4.0.0 `--stateful`": supergateway_argv,
    "ContextForge 1.0.7 translate": contextforge_argv,
}


@contextlib.contextmanager
def http_peer(name: str, wrapped: list[str]) -> Iterator[str]:
    """Start the peer `name` in front of `wrapped`; yield its MCP URL; stop it after."""
    port = free_port()
    argv = PEERS[name](port, wrapped)
    env = contextforge_env() if "ContextForge" in name else None
    with tempfile.TemporaryDirectory(prefix="stockade-peer-") as scratch:  # its files land here
        process = subprocess.Popen(
            argv,
            cwd=scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # so its wrapped docker CLI goes with it
        )
        try:
            wait_for_port(port, process, name)
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(30)
