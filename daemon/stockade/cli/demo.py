"""`stockade demo`: the whole path, from nothing to an answer, in a scratch folder.

Builds the sandbox images, starts a daemon whose state lives in a temporary folder,
registers `time` (mcp-server-time in the hardened python image), issues a host
certificate, then runs the official MCP SDK client with `stockade connect time` as its
server command: it lists the tools and calls get_current_time. Everything is removed after.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stockade import exitcodes
from stockade.audit.chain import AUDIT_KEY_FILE, load_public_key, public_path
from stockade.audit.verify import audit_files, default_head, verify
from stockade.cli.channel import CliError
from stockade.config import load_settings
from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.images import ImageBuilder

TIME_COMMAND = ("mcp-server-time", "--local-timezone", "UTC")
# The demo host may ask the time; nothing else (default deny does the rest).
DEMO_POLICY = """\
version: 1
rules:
  - name: demo-host-asks-the-time
    effect: allow
    identities: ["spiffe://stockade.local/host/demo-host"]
    servers: ["time"]
    methods: ["tools/call"]
    names: ["get_current_time"]
"""


def _say(text: str) -> None:
    print(text, flush=True)


def _accepting(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class _ScratchDaemon:
    """stockaded with its state, socket and credentials in a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "run" / "stockaded.sock"
        self.env = {
            **os.environ,
            "STOCKADE_STATE_DIR": str(root / "state"),
            "STOCKADE_SOCKET_PATH": str(self.socket),
            "STOCKADE_LOG_FORMAT": "json",
            "STOCKADE_POLICY_DIR": str(root / "policies"),
            "XDG_CONFIG_HOME": str(root / "config"),
        }
        (root / "policies").mkdir()
        (root / "policies" / "demo.yaml").write_text(DEMO_POLICY)
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _ScratchDaemon:
        log = (self.root / "stockaded.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stockade.daemon"], env=self.env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 30
        while not _accepting(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise CliError(
                    f"the demo daemon did not start; see {self.root / 'stockaded.log'}",
                    exitcodes.FAILED,
                )
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)

    def wait_for_warm_pool(self, server: str, timeout: float = 60) -> None:
        """Sessions take a pooled container; wait until one is ready, as a daemon would be."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            (status,) = json.loads(self.cli("server", "status", server, "--json"))
            if status.get("pooled", 0) >= 1:
                return
            time.sleep(0.2)
        raise CliError(f"the warm pool of {server!r} did not fill", exitcodes.FAILED)

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "stockade.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != exitcodes.OK:
            raise CliError(f"stockade {args[0]} failed: {result.stderr.strip()}", result.returncode)
        return result.stdout


def _run_client(daemon: _ScratchDaemon, host: Path) -> tuple[list[str], dict[str, Any], float]:
    try:
        import anyio  # noqa: PLC0415 - the optional [demo] extra; only the demo needs it
        from mcp import Client, StdioServerParameters, types  # noqa: PLC0415
    except ImportError:
        raise CliError(
            "the demo's MCP client needs the SDK: pip install 'stockade[demo]'", exitcodes.FAILED
        ) from None
    bridge = [
        "-m",
        "stockade.cli.main",
        "connect",
        "time",
        "--socket",
        str(daemon.socket),
        "--cert",
        str(host / "client.crt"),
        "--key",
        str(host / "client.key"),
        "--ca",
        str(host / "ca.crt"),
    ]

    async def session() -> tuple[list[str], dict[str, Any], float]:
        began = time.perf_counter()
        params = StdioServerParameters(command=sys.executable, args=bridge)
        async with Client(params, mode="legacy") as client:
            tools = [tool.name for tool in (await client.list_tools()).tools]
            result = await client.call_tool("get_current_time", {"timezone": "Europe/Paris"})
            text = "".join(c.text for c in result.content if isinstance(c, types.TextContent))
            return tools, json.loads(text), time.perf_counter() - began

    return anyio.run(session)


def _say_audit(state: Path) -> None:
    """What the daemon recorded, checked the way a security team would (`audit verify`)."""
    files = audit_files([state / "audit"])
    key = load_public_key(public_path(state / "pki" / AUDIT_KEY_FILE))
    result = verify(files, key, default_head(files))
    verdict = "the hash chain and signatures verify" if result.ok else f"FAILED {result.problem}"
    _say(
        f"    audit: {result.records} records, {result.checkpoints} signed checkpoint(s);"
        f" {verdict}  (stockade audit verify / tail)"
    )


def run_demo(ca_bundle: Path | None) -> int:
    settings = load_settings()
    started = time.monotonic()
    _say("1/4 sandbox images (built once, then skipped while their recipes are unchanged)")
    builder = ImageBuilder(
        DockerBackend().client, ca_bundle=ca_bundle, progress=lambda s: _say(f"    {s}")
    )
    builder.ensure(["python"])
    with tempfile.TemporaryDirectory(prefix="stockade-demo-") as scratch:
        root = Path(scratch)
        _say(f"2/4 starting stockaded (state in {root}; its own CA; mTLS on its socket)")
        with _ScratchDaemon(root) as daemon:
            _say(
                "3/4 registering `time`, issuing a certificate for the demo host,"
                " and a policy: it may call get_current_time, nothing else"
            )
            daemon.cli(
                "server",
                "add",
                "time",
                "--image",
                "stockade/python:latest",
                "--warm",
                "1",
                "--",
                *TIME_COMMAND,
            )
            daemon.cli("cert", "issue", "--identity", "demo-host", "--out", str(root / "host"))
            daemon.wait_for_warm_pool("time")
            _say("4/4 the MCP SDK client runs `stockade connect time` as its server command")
            _say(
                "    the server runs in its own container: read-only root, no capabilities,"
                f" uid 10001, no network, {settings.container_memory_bytes // 2**20} MiB,"
                f" {settings.container_pids_limit} pids"
            )
            tools, now, took = _run_client(daemon, root / "host")
            _say(
                f"    tools: {', '.join(tools)}  (the policy lets this host call only that;"
                " mcp-server-time also has convert_time)"
            )
            _say(f"    get_current_time(Europe/Paris) -> {now['datetime']} ({now['day_of_week']})")
            _say(
                f"    {took * 1000:.0f} ms from launching the bridge to the answer"
                " (a warm container from the pool; bridge start-up included)"
            )
        _say_audit(root / "state")
    _say(
        f"done in {time.monotonic() - started:.1f}s; the daemon stopped and removed its containers"
    )
    return exitcodes.OK
