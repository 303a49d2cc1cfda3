"""mcp-server-fetch from PyPI fetches a page through an egress allowlist (issue 17).

The page is served by a container this test starts on its own network (never an outside
address); the server reaches it only through Stockade's egress gateway, as its sandbox
policy allows, and the trial sandbox at registration runs under that same policy.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from stockade.sandbox.images import ImageBuilder
from stockade.sandbox.spec import LABEL_DAEMON
from tests.daemon_helper import ALLOW_ALL_POLICY, HostSession, running_daemon
from tests.test_sources import FETCH, INIT, build_args

pytestmark = [pytest.mark.docker]

PAGE = "<html><body><h1>Stockade test page</h1><p>fetched through the gateway</p></body></html>"
SERVE = f"""
import http.server
class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {PAGE!r}.encode() if self.path == "/" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Page).serve_forever()
"""


@pytest.fixture
def page_network(images: ImageBuilder) -> Iterator[tuple[str, str]]:
    """(network name, address) of a web server at web.test:8080 on a network of its own."""
    client = docker.from_env()
    name = f"stockade-test-{uuid.uuid4().hex[:8]}"
    network = client.networks.create(name, driver="bridge", labels={LABEL_DAEMON: "pytest"})
    container = client.containers.create(
        "stockade/python:latest",
        ["python3", "-c", SERVE],
        labels={LABEL_DAEMON: "pytest"},
        network=name,
        networking_config={name: client.api.create_endpoint_config(aliases=["web.test"])},
    )
    try:
        container.start()
        container.reload()
        yield name, container.attrs["NetworkSettings"]["Networks"][name]["IPAddress"]
    finally:
        container.remove(force=True)
        network.remove()


def test_fetch_reads_a_page_through_the_egress_allowlist(
    tmp_path: Path, page_network: tuple[str, str]
) -> None:
    network, address = page_network
    policy = ALLOW_ALL_POLICY + (
        "sandboxes:\n  fetch:\n    network:\n"
        f"      egress: [web.test:8080]\n      allow_addresses: [{address}/32]\n"
    )
    with running_daemon(tmp_path, policy=policy, STOCKADE_EGRESS_NETWORK=network) as daemon:
        daemon.cli(
            "server",
            "add",
            "fetch",
            "--pypi",
            FETCH,
            "--warm",
            "0",
            *build_args(),
            "--",
            "--ignore-robots-txt",
            "--allow-private-ips",
        )
        shown = daemon.cli("server", "show", "fetch").stdout
        assert "network egress to web.test:8080" in shown

        async def scenario() -> dict[str, Any]:
            async with HostSession(daemon, "fetch") as host:
                await host.request("initialize", INIT)
                return await host.request(
                    "tools/call",
                    {"name": "fetch", "arguments": {"url": "http://web.test:8080/"}},
                    timeout=90,
                )

        answer = asyncio.run(scenario())
    text = answer["result"]["content"][0]["text"]
    assert "Stockade test page" in text, answer
    assert "fetched through the gateway" in text
