"""The MCP Inspector's CLI (Node 22, from scripts/node-tools.sh) using a server through Stockade."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_helper import Daemon, running_daemon

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

NODE_BIN = Path(__file__).resolve().parents[1] / ".tools" / "node" / "node_modules" / ".bin"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if not (NODE_BIN / "mcp-inspector").exists():
        pytest.fail("the Inspector is not installed: run scripts/node-tools.sh (test.sh does)")
    with running_daemon(tmp_path_factory.mktemp("inspector")) as running:
        running.add_server("everything", "stockade/node:latest", "mcp-server-everything")
        running.issue_host("inspector")
        yield running


def inspector(daemon: Daemon, *method: str) -> subprocess.CompletedProcess[str]:
    env = {**daemon.env, "PATH": f"{NODE_BIN}:{os.environ['PATH']}"}
    bridge = daemon.bridge("everything", daemon.hosts["inspector"])
    return subprocess.run(
        [str(NODE_BIN / "mcp-inspector"), "--cli", *bridge, *method],
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
