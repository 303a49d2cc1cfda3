"""Revoking a credential ends what it already opened: gRPC streams and HTTP event streams."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx2
import pytest

from tests.daemon_helper import INIT_REQUEST as INIT
from tests.daemon_helper import Daemon, HostSession, free_port, running_daemon

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    address = f"127.0.0.1:{free_port()}"
    root = tmp_path_factory.mktemp("revocation")
    with running_daemon(root, STOCKADE_HTTP_ADDRESS=address) as running:
        running.add_scratch_server("scratch", "--warm", "0")
        for name in ("doomed", "spared", "ca-holder"):
            running.issue_host(name)
        running.http_base = f"https://{address}/servers"
        yield running


def audit_types(daemon: Daemon) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted((daemon.state_dir / "audit").glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_a_revoked_certificate_ends_its_open_stream_and_no_other(daemon: Daemon) -> None:
    async def scenario() -> tuple[grpc.aio.AioRpcError | None, float, dict[str, Any]]:
        async with (
            HostSession(daemon, "scratch", daemon.hosts["doomed"]) as doomed,
            HostSession(daemon, "scratch", daemon.hosts["spared"]) as spared,
        ):
            await doomed.request("scratch/echo", {"n": 1})
            began = time.monotonic()
            await asyncio.to_thread(daemon.cli, "cert", "revoke", "--identity", "host/doomed")
            await doomed.wait_for(lambda: doomed.error is not None, 30)
            took = time.monotonic() - began
            still = await spared.request("scratch/echo", {"n": 2})
            return doomed.error, took, still

    error, took, still = asyncio.run(scenario())
    assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (error.details() or "")
    assert still["result"]["echo"] == {"n": 2}  # another identity's session carries on
    print(f"revocation ended the stream in {took:.2f} s")  # the figure; not a pass/fail bound
    revoked = [r for r in audit_types(daemon) if r["type"] == "session.revoked"]
    assert revoked and len(revoked[-1]["detail"]["sessions"]) == 1


def test_a_revoked_token_ends_its_http_session_and_event_stream(daemon: Daemon) -> None:
    issued = daemon.cli(
        "token", "issue", "--identity", "tokenhost", "--server", "scratch", "--json"
    )
    token = json.loads(issued.stdout)
    url = f"{daemon.http_base}/scratch/mcp"
    bearer = {"Authorization": f"Bearer {token['token']}"}
    context = ssl.create_default_context(cafile=str(daemon.hosts["ca-holder"] / "ca.crt"))

    async def scenario() -> tuple[int, int]:
        async with httpx2.AsyncClient(verify=context, timeout=30) as client:
            opened = await client.post(url, content=json.dumps(INIT), headers={**HEADERS, **bearer})
            session = {"Mcp-Session-Id": opened.headers["Mcp-Session-Id"], **bearer}
            stream_ended = asyncio.Event()

            async def listen() -> None:
                async with client.stream(
                    "GET", url, headers={"Accept": "text/event-stream", **session}
                ) as events:
                    async for _ in events.aiter_bytes():
                        pass
                stream_ended.set()

            listener = asyncio.create_task(listen())
            await asyncio.sleep(0.5)  # the event stream is open
            await asyncio.to_thread(daemon.cli, "token", "revoke", token["token_id"])
            await asyncio.wait_for(stream_ended.wait(), 30)
            await listener
            later = await client.post(
                url,
                content=json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"}),
                headers={**HEADERS, **session},
            )
            return opened.status_code, later.status_code

    opened, later = asyncio.run(scenario())
    assert opened == 200
    assert later == 401  # the token itself is refused now, and the session is gone
    closes = [
        r
        for r in audit_types(daemon)
        if r["type"] == "session.close" and "revoked" in r.get("reason", "")
    ]
    assert closes
