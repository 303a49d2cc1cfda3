"""The MCP Inspector's CLI (Node 22, from scripts/node-tools.sh) using a server through Stockade."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.daemon_helper import BIN, Daemon
from tests.test_supervisor import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

NODE_BIN = Path(__file__).resolve().parents[1] / ".tools" / "node" / "node_modules" / ".bin"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if not (NODE_BIN / "mcp-inspector").exists():
        pytest.fail("the Inspector is not installed: run scripts/node-tools.sh (test.sh does)")
    running = Daemon(tmp_path_factory.mktemp("inspector"))
    running.start()
    running.cli(
        "server",
        "add",
        "everything",
        "--image",
        "stockade/node:latest",
        "--warm",
        "1",
        "--",
        "mcp-server-everything",
    )
    running.cli("cert", "issue", "--identity", "inspector", "--out", str(running.root / "host"))
    wait_until(lambda: running.status("everything").get("pooled") == 1, 90, "a warm pool")
    yield running
    running.stop()
    for summary in running.containers():
        docker.from_env().api.remove_container(summary["Id"], force=True)


def inspector(daemon: Daemon, *method: str) -> subprocess.CompletedProcess[str]:
    folder = daemon.root / "host"
    env = {**daemon.env, "PATH": f"{NODE_BIN}:{os.environ['PATH']}"}
    return subprocess.run(
        [
            str(NODE_BIN / "mcp-inspector"),
            "--cli",
            str(BIN / "stockade"),
            "connect",
            "everything",
            "--socket",
            str(daemon.socket),
            "--cert",
            str(folder / "client.crt"),
            "--key",
            str(folder / "client.key"),
            "--ca",
            str(folder / "ca.crt"),
            *method,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_inspector_lists_tools(daemon: Daemon) -> None:
    result = inspector(daemon, "--method", "tools/list")
    assert result.returncode == 0, result.stderr
    names = {tool["name"] for tool in json.loads(result.stdout)["tools"]}
    assert {"echo", "get-sum"} <= names


def test_inspector_calls_a_tool(daemon: Daemon) -> None:
    result = inspector(
        daemon,
        "--method",
        "tools/call",
        "--tool-name",
        "get-sum",
        "--tool-arg",
        "a=19",
        "--tool-arg",
        "b=23",
    )
    assert result.returncode == 0, result.stderr
    texts = [c.get("text", "") for c in json.loads(result.stdout)["content"]]
    assert any("42" in text for text in texts)
