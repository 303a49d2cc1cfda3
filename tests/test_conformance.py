"""The official MCP conformance suite, against our fixture directly and through Stockade.

Direct: the fixture (sandbox-images/python/servers/conformance_server.py) on the SDK's own
Streamable HTTP. Through Stockade: the same fixture in its hardened container, behind the
daemon's HTTPS front, reached through `stockade connect --listen` (the suite can present
neither a client certificate nor a header). The two summaries must be the same.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_helper import ALLOW_ALL_POLICY, free_port, running_daemon

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

ROOT = Path(__file__).resolve().parent.parent
NODE_BIN = ROOT / ".tools" / "node" / "node_modules" / ".bin"
FIXTURE = ROOT / "sandbox-images" / "python" / "servers" / "conformance_server.py"
SPEC_VERSION = "2025-11-25"
POLICY = (
    ALLOW_ALL_POLICY
    + """\
  conformance: ["sampling/createMessage", "elicitation/create", "roots/list"]
"""
)


def _wait_for(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what} did not start") from None
            time.sleep(0.2)


def _suite(url: str, out: Path, *selection: str) -> dict[str, tuple[int, int]]:
    command = [str(NODE_BIN / "node"), str(NODE_BIN / "conformance"), "server", "--url", url]
    command += ["--spec-version", SPEC_VERSION, "-o", str(out), *selection]
    suite = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "PATH": f"{NODE_BIN}:{os.environ['PATH']}"},
    )
    summary = suite.stdout.split("=== SUMMARY ===")[-1]
    results = {
        m[1]: (int(m[2]), int(m[3]))
        for m in re.finditer(r"[✓✗] ([\w-]+): (\d+) passed, (\d+) failed", summary)
    }
    if not results and selection:  # a single scenario prints its checks, not a summary
        counts = re.search(r"Passed: (\d+)/(\d+), (\d+) failed", suite.stdout)
        if counts:
            results = {selection[-1]: (int(counts[1]), int(counts[3]))}
    assert results, suite.stdout[-2000:] + suite.stderr[-2000:]
    return results


def run_suite(url: str, out: Path) -> dict[str, tuple[int, int]]:
    """scenario -> (passed, failed). A scenario that fails is run once more on its own, and
    the rerun's result stands: the SDK's own HTTP server (the direct side) was seen to fail
    `tools-call-sampling` once under CI load. The same rule applies to both sides."""
    results = _suite(url, out)
    for name in [n for n, (_, failed) in results.items() if failed]:
        results |= _suite(url, out / f"rerun-{name}", "--scenario", name)
    return results


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, int]]]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(FIXTURE), "--http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port, server, "the fixture")
        yield run_suite(f"http://127.0.0.1:{port}/mcp", tmp_path_factory.mktemp("direct"))
    finally:
        server.terminate()
        server.wait(30)


def test_the_fixture_passes_the_suite_directly(direct: dict[str, tuple[int, int]]) -> None:
    assert len(direct) >= 25
    assert {name for name, (_, failed) in direct.items() if failed} == set()


def test_the_suite_gives_the_same_result_through_stockade(
    tmp_path: Path, direct: dict[str, tuple[int, int]]
) -> None:
    front = f"127.0.0.1:{free_port()}"
    with running_daemon(tmp_path, policy=POLICY, STOCKADE_HTTP_ADDRESS=front) as daemon:
        daemon.add_server(
            "conformance",
            "stockade/python:latest",
            "python",
            "/opt/mcp/servers/conformance_server.py",
            warm=2,
        )
        creds = daemon.issue_host("conformance-suite")
        port = free_port()
        bridge = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "stockade"),
                "connect",
                "conformance",
                "--listen",
                f"127.0.0.1:{port}",
                "--front",
                f"https://{front}",
                "--cert",
                str(creds / "client.crt"),
                "--key",
                str(creds / "client.key"),
                "--ca",
                str(creds / "ca.crt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=daemon.env,
        )
        try:
            _wait_for(port, bridge, "the HTTP bridge")
            through = run_suite(f"http://127.0.0.1:{port}/mcp", tmp_path / "through")
        finally:
            bridge.terminate()
            bridge.wait(30)
    assert through == direct  # the same scenarios, the same passes and failures
