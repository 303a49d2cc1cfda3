"""The Streamable HTTP front: the official SDK's HTTP client through it, server-initiated
requests over the event stream, and every kind of bad input getting its 4xx."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import docker
import httpx2
import pytest
from mcp import Client, types
from mcp.client.streamable_http import streamable_http_client

from tests.daemon_helper import INIT_REQUEST as INIT
from tests.daemon_helper import Daemon, free_port, running_daemon

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

JSON_AND_SSE = {"Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("http")
    address = f"127.0.0.1:{free_port()}"
    with running_daemon(root, STOCKADE_HTTP_ADDRESS=address) as running:
        running.add_server("time", "stockade/python:latest", "mcp-server-time", warm=1)
        running.add_server("everything", "stockade/node:latest", "mcp-server-everything", warm=0)
        running.add_server(
            "modern",
            "stockade/python:latest",
            "python",
            "/opt/mcp/servers/modern_server.py",
            warm=0,
        )
        running.issue_host("alice")
        running.issue_host("bob")
        running.http_base = f"https://{address}/servers"
        yield running


def http(creds: Path | None, ca: Path | None = None, **options: Any) -> httpx2.AsyncClient:
    """An HTTP client trusting the daemon's CA; presenting `creds` (a cert folder) if given."""
    context = ssl.create_default_context(cafile=str((creds or ca or Path()) / "ca.crt"))
    if creds is not None:
        context.load_cert_chain(creds / "client.crt", creds / "client.key")
    return httpx2.AsyncClient(verify=context, timeout=30, **options)


def test_the_sdk_http_client_works_through_stockade(daemon: Daemon) -> None:
    url = f"{daemon.http_base}/time/mcp"

    async def scenario() -> tuple[list[str], str]:
        client = http(daemon.hosts["alice"])
        transport = streamable_http_client(url, http_client=client)
        async with client, Client(transport, mode="legacy") as mcp:
            names = [t.name for t in (await mcp.list_tools()).tools]
            answer = await mcp.call_tool("get_current_time", {"timezone": "Europe/Oslo"})
            text = "".join(c.text for c in answer.content if isinstance(c, types.TextContent))
            return names, text

    names, text = anyio.run(scenario)
    assert "get_current_time" in names
    assert json.loads(text)["timezone"] == "Europe/Oslo"


def test_server_requests_reach_the_host_over_the_event_stream(daemon: Daemon) -> None:
    url = f"{daemon.http_base}/everything/mcp"
    asked: list[str] = []

    async def sampling(context: Any, params: types.CreateMessageRequestParams) -> Any:
        asked.append(str(params.messages[0].content))
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="sampled over HTTP"),
            model="test",
        )

    async def scenario() -> str:
        async with http(daemon.hosts["alice"]) as client:
            transport = streamable_http_client(url, http_client=client)
            async with Client(transport, mode="legacy", sampling_callback=sampling) as mcp:
                answer = await mcp.call_tool(
                    "trigger-sampling-request", {"prompt": "hello", "maxTokens": 10}
                )
                return json.dumps(answer.model_dump(mode="json"))

    result = anyio.run(scenario)
    assert asked, "the server's sampling request reached the host"
    assert "sampled over HTTP" in result


async def _post(client: httpx2.AsyncClient, url: str, body: Any, **headers: str) -> httpx2.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    merged = {"Content-Type": "application/json", **JSON_AND_SSE, **headers}
    return await client.post(url, content=content, headers=merged)


def sse_messages(response: httpx2.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a POST's answer, in order: an event stream, or one JSON
    message when nothing came before the answer."""
    if response.headers["Content-Type"].startswith("application/json"):
        return [response.json()]
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")
    ]


def test_bad_input_gets_the_documented_4xx_and_harms_nothing(daemon: Daemon) -> None:
    base = daemon.http_base
    url = f"{base}/time/mcp"
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with http(daemon.hosts["alice"]) as alice, http(daemon.hosts["bob"]) as bob:
            opened = await _post(alice, url, INIT)
            session = opened.headers["Mcp-Session-Id"]
            seen["init"] = opened.status_code
            ours = {"Mcp-Session-Id": session}
            seen["content-type"] = (
                await alice.post(url, content=b"{}", headers={**JSON_AND_SSE, **ours})
            ).status_code
            seen["accept"] = (
                await alice.post(url, json=listing, headers={"Accept": "application/json", **ours})
            ).status_code
            big = json.dumps(
                {"jsonrpc": "2.0", "id": 3, "method": "x", "params": {"p": "x" * (5 << 20)}}
            )
            seen["too-large"] = (await _post(alice, url, big.encode(), **ours)).status_code
            broken = await _post(alice, url, b"{not json", **ours)
            seen["malformed"] = (broken.status_code, broken.json()["error"]["code"])
            seen["unknown-server"] = (await _post(alice, f"{base}/nope/mcp", INIT)).status_code
            seen["no-session"] = (await _post(alice, url, listing)).status_code
            seen["unknown-session"] = (
                await _post(alice, url, listing, **{"Mcp-Session-Id": "made-up"})
            ).status_code
            seen["other-identity"] = (await _post(bob, url, listing, **ours)).status_code
            seen["origin"] = (
                await _post(alice, url, listing, Origin="https://evil.example", **ours)
            ).status_code
            seen["version"] = (
                await _post(alice, url, listing, **{"MCP-Protocol-Version": "1999-01-01"}, **ours)
            ).status_code
            seen["get-without-sse"] = (
                await alice.get(url, headers={"Accept": "application/json", **ours})
            ).status_code
            still = await _post(alice, url, listing, **ours)  # the session survived it all
            seen["still"] = (still.status_code, "tools" in sse_messages(still)[-1]["result"])
            seen["delete"] = (await alice.delete(url, headers=ours)).status_code
            seen["after-delete"] = (await _post(alice, url, listing, **ours)).status_code
        async with http(None, ca=daemon.hosts["alice"]) as anonymous:
            bare = await _post(anonymous, url, INIT)
            seen["no-credentials"] = (bare.status_code, bare.headers.get("WWW-Authenticate"))
        return seen

    seen = asyncio.run(scenario())
    assert seen["init"] == 200
    assert seen["content-type"] == 415
    assert seen["accept"] == 406
    assert seen["too-large"] == 413
    assert seen["malformed"] == (400, -32700)
    assert seen["unknown-server"] == 404
    assert seen["no-session"] == 400
    assert seen["unknown-session"] == 404
    assert seen["other-identity"] == 404  # a session id is never a credential
    assert seen["origin"] == 403
    assert seen["version"] == 400
    assert seen["get-without-sse"] == 406
    assert seen["still"] == (200, True)
    assert seen["delete"] == 200
    assert seen["after-delete"] == 404
    assert seen["no-credentials"] == (401, 'Bearer realm="stockade"')
    refusals = [
        json.loads(line)
        for path in (daemon.state_dir / "audit").glob("audit-*.jsonl")
        for line in path.read_text().splitlines()
        if '"type":"access"' in line and '"transport":"http"' in line
    ]
    reasons = " | ".join(r["reason"] for r in refusals)
    assert "origin 'https://evil.example' is not allowed" in reasons  # each refusal audited
    assert "present a client certificate or a Stockade bearer token" in reasons


def test_progress_arrives_on_the_requests_own_stream(daemon: Daemon) -> None:
    url = f"{daemon.http_base}/everything/mcp"
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async def scenario() -> str:
        client = http(daemon.hosts["alice"])
        transport = streamable_http_client(url, http_client=client)
        async with client, Client(transport, mode="legacy") as mcp:
            answer = await mcp.call_tool(
                "trigger-long-running-operation",
                {"duration": 1, "steps": 4},
                progress_callback=on_progress,
            )
            return "".join(c.text for c in answer.content if isinstance(c, types.TextContent))

    text = anyio.run(scenario)
    assert "completed" in text.lower()
    assert len(seen) == 4 and seen == sorted(seen)  # every step, in order, before the answer


NODE_BIN = Path(__file__).resolve().parents[1] / ".tools" / "node" / "node_modules" / ".bin"


def test_stockade_bearer_tokens_for_one_identity_and_one_server(daemon: Daemon) -> None:
    base = daemon.http_base
    issued = daemon.cli("token", "issue", "--identity", "inspector", "--server", "time", "--json")
    token = json.loads(issued.stdout)
    bearer = {"Authorization": f"Bearer {token['token']}"}

    async def status(url: str, headers: dict[str, str]) -> int:
        async with http(None, ca=daemon.hosts["alice"]) as client:
            return (await _post(client, url, INIT, **headers)).status_code

    assert asyncio.run(status(f"{base}/time/mcp", bearer)) == 200
    assert asyncio.run(status(f"{base}/everything/mcp", bearer)) == 401  # its audience only
    forged = {"Authorization": f"Bearer {token['token'][:-4]}AAAA"}
    assert asyncio.run(status(f"{base}/time/mcp", forged)) == 401

    # The MCP Inspector's CLI, over HTTP with the token (it cannot present a certificate).
    env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(daemon.hosts["alice"] / "ca.crt")}
    listed = subprocess.run(
        [
            str(NODE_BIN / "mcp-inspector"),
            "--cli",
            f"{base}/time/mcp",
            "--transport",
            "http",
            "--header",
            f"Authorization: Bearer {token['token']}",
            "--method",
            "tools/list",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert listed.returncode == 0, listed.stderr
    assert "get_current_time" in {t["name"] for t in json.loads(listed.stdout)["tools"]}

    daemon.cli("token", "revoke", token["token_id"])
    assert asyncio.run(status(f"{base}/time/mcp", bearer)) == 401


MODERN = "2026-07-28"
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
}


def test_the_2026_07_28_era_is_stateless_and_checks_its_headers(daemon: Daemon) -> None:
    url = f"{daemon.http_base}/modern/mcp"
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": 2, "b": 3}, "_meta": ENVELOPE},
    }
    routed = {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "add"}

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with http(daemon.hosts["alice"]) as alice:
            answer = await _post(alice, url, call, **routed)  # no initialize, no session
            seen["call"] = (answer.status_code, sse_messages(answer)[-1])
            # Its sandbox dies: the next stateless request gets a fresh one, not an error.
            for container in docker.from_env().containers.list(
                filters={"label": "io.stockade.server=modern"}
            ):
                container.kill()
            await asyncio.sleep(1)
            again = await _post(alice, url, {**call, "id": 8}, **routed)
            seen["after-crash"] = sse_messages(again)[-1]
            wrong = await _post(alice, url, call, **{**routed, "Mcp-Name": "shout"})
            seen["name-mismatch"] = (wrong.status_code, wrong.json()["error"]["code"])
            wrong = await _post(alice, url, call, **{**routed, "Mcp-Method": "tools/list"})
            seen["method-mismatch"] = (wrong.status_code, wrong.json()["error"]["code"])
            seen["get"] = (
                await alice.get(
                    url, headers={"Accept": "text/event-stream", "MCP-Protocol-Version": MODERN}
                )
            ).status_code
            seen["delete"] = (
                await alice.delete(url, headers={"MCP-Protocol-Version": MODERN})
            ).status_code
        return seen

    seen = asyncio.run(scenario())
    status, answer = seen["call"]
    assert status == 200
    assert answer["id"] == 7 and "5" in json.dumps(answer["result"])
    assert seen["after-crash"]["id"] == 8 and "result" in seen["after-crash"]
    assert seen["name-mismatch"] == (400, -32020)  # MCP's HEADER_MISMATCH
    assert seen["method-mismatch"] == (400, -32020)
    assert seen["get"] == 405 and seen["delete"] == 405


def test_the_sdk_client_negotiates_2026_07_28_through_stockade(daemon: Daemon) -> None:
    url = f"{daemon.http_base}/modern/mcp"

    async def scenario() -> tuple[Any, str]:
        client = http(daemon.hosts["alice"])
        transport = streamable_http_client(url, http_client=client)
        async with client, Client(transport, mode="auto") as mcp:
            answer = await mcp.call_tool("shout", {"text": "through stockade"})
            text = "".join(c.text for c in answer.content if isinstance(c, types.TextContent))
            return mcp.protocol_version, text

    version, text = anyio.run(scenario)
    assert text == "THROUGH STOCKADE"
    assert version == MODERN  # auto mode settled on the new era, not the legacy fallback


def test_the_event_stream_numbers_events_and_replays_after_last_event_id() -> None:
    from stockade.http.sessions import HttpSession  # the session alone: no daemon needed

    async def scenario() -> tuple[list[int], list[int]]:
        session = HttpSession("s", "spiffe://stockade.local/host/a", "time")
        for n in range(5):  # server notifications while no request is pending
            await session.to_host(json.dumps({"jsonrpc": "2.0", "method": f"n/{n}"}).encode())

        async def take(after: int | None, count: int) -> list[int]:
            got: list[int] = []
            async for event in session.events(after):
                if event is not None:
                    got.append(event[0])
                if len(got) == count:
                    break
            return got

        first = await take(0, 5)  # from the start
        resumed = await take(3, 2)  # a client that saw up to id 3 gets 4 and 5 only
        await session.end("test over")
        return first, resumed

    first, resumed = asyncio.run(scenario())
    assert first == [1, 2, 3, 4, 5]
    assert resumed == [4, 5]


def test_a_posted_request_hears_what_comes_before_its_answer_then_the_answer() -> None:
    """HttpSession.request_stream alone (the relay side is a function that makes the server
    speak): what the server says first comes first, then the answer; what it says after the
    answer is not that POST's; no answer in time is MCP's -32001 for that id; a client that
    went away frees its id; a session that ends cancels the POST; what a stream closed
    early did not take goes to the GET event stream."""
    from types import SimpleNamespace

    from stockade.http.sessions import HttpSession
    from stockade.relay import jsonrpc

    def say(body: dict[str, object]) -> bytes:
        return json.dumps({"jsonrpc": "2.0", **body}).encode()

    def call(request_id: int) -> jsonrpc.Message:
        raw = say({"id": request_id, "method": "tools/call", "params": {"name": "t"}})
        return jsonrpc.parse(raw, 1 << 20)

    async def scenario() -> dict[str, object]:
        session = HttpSession("s", "spiffe://stockade.local/host/a", "time")
        replies: dict[int, list[bytes]] = {
            1: [say({"method": "notifications/progress"}), say({"id": 1, "result": {}})],
            3: [say({"method": "n/a"}), say({"method": "n/b"})],
            5: [say({"id": 5, "result": {}}), say({"method": "n/after"})],
        }

        async def from_host(message: jsonrpc.Message) -> None:  # the server answers
            request_id = message.id  # the front's own parse goes on: not parsed twice
            for reply in replies.get(request_id, []):
                asyncio.get_running_loop().call_soon(
                    lambda r=reply: asyncio.ensure_future(session.to_host(r))
                )

        async def close(reason: str) -> None:
            closed.append(reason)

        closed: list[str] = []
        session.relay = SimpleNamespace(from_host=from_host, close=close)  # type: ignore[assignment]
        seen: dict[str, object] = {}
        seen["answered"] = [
            (json.loads(raw), last) async for raw, last in session.request_stream(call(1), 5)
        ]
        seen["late"] = [json.loads(raw) async for raw, _ in session.request_stream(call(2), 0.2)]
        stream = session.request_stream(call(3), 5)
        seen["first"] = json.loads((await anext(stream))[0])
        await stream.aclose()  # n/b was said and not taken: it goes to GET
        async for event in session.events(0):
            seen["to_get"] = json.loads(event[1]) if event else None
            break
        # Said after the answer: not this POST's any more (it went to GET).
        seen["after"] = [
            (json.loads(raw), last) async for raw, last in session.request_stream(call(5), 5)
        ]
        async for event in session.events(1):
            seen["after_to_get"] = json.loads(event[1]) if event else None
            break
        # A client that went away frees its request id within about a second.
        left = [False]
        orphan = asyncio.ensure_future(
            anext(session.request_stream(call(6), 60, gone=lambda: left[0]))
        )
        await asyncio.sleep(0.05)
        left[0] = True
        seen["orphan"] = await asyncio.gather(orphan, return_exceptions=True)
        seen["waiting_after_orphan"] = session.waiting
        pending = asyncio.ensure_future(anext(session.request_stream(call(4), 5)))
        await asyncio.sleep(0.05)
        await session.end("test over")
        seen["ended"] = await asyncio.gather(pending, return_exceptions=True)
        seen["waiting"] = session.waiting
        seen["closed"] = closed
        return seen

    seen = asyncio.run(scenario())
    assert seen["answered"] == [
        ({"jsonrpc": "2.0", "method": "notifications/progress"}, False),
        ({"jsonrpc": "2.0", "id": 1, "result": {}}, True),
    ]
    late = seen["late"]
    assert isinstance(late, list) and len(late) == 1
    assert late[0]["id"] == 2 and late[0]["error"]["code"] == -32001
    assert seen["first"] == {"jsonrpc": "2.0", "method": "n/a"}
    assert seen["to_get"] == {"jsonrpc": "2.0", "method": "n/b"}
    ended = seen["ended"]
    assert isinstance(ended, list) and isinstance(ended[0], asyncio.CancelledError)
    assert seen["after"] == [({"jsonrpc": "2.0", "id": 5, "result": {}}, True)]
    assert seen["after_to_get"] == {"jsonrpc": "2.0", "method": "n/after"}
    orphan = seen["orphan"]
    assert isinstance(orphan, list) and isinstance(orphan[0], asyncio.CancelledError)
    assert seen["waiting_after_orphan"] == set()
    assert seen["waiting"] == set()
    assert seen["closed"] == ["test over"]


def test_a_plain_answer_is_json_when_the_client_prefers_it(daemon: Daemon) -> None:
    """JSON keeps the connection reusable (no TLS handshake per call); an event stream is
    used when the client prefers it, or when anything comes before the answer."""
    url = f"{daemon.http_base}/everything/mcp"

    async def scenario() -> tuple[str, str, str, int]:
        async with http(daemon.hosts["alice"]) as client:
            json_first = {"Accept": "application/json, text/event-stream"}
            opened = await _post(client, url, INIT, **json_first)
            session = {"Mcp-Session-Id": opened.headers["Mcp-Session-Id"]}
            listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
            as_json = await _post(client, url, listing, **json_first, **session)
            sse_first = {"Accept": "text/event-stream, application/json"}
            as_sse = await _post(client, url, {**listing, "id": 3}, **sse_first, **session)
            slow = {  # progress notifications come before the answer
                "jsonrpc": "2.0",
                "id": 4,
                "method": "tools/call",
                "params": {
                    "name": "trigger-long-running-operation",
                    "arguments": {"duration": 1, "steps": 2},
                    "_meta": {"progressToken": "p"},
                },
            }
            streamed = await _post(client, url, slow, **json_first, **session)
            return (
                as_json.headers["Content-Type"],
                as_sse.headers["Content-Type"],
                streamed.headers["Content-Type"],
                len(sse_messages(streamed)),
            )

    as_json, as_sse, streamed, messages = asyncio.run(scenario())
    assert as_json.startswith("application/json")
    assert as_sse.startswith("text/event-stream")
    assert streamed.startswith("text/event-stream") and messages >= 2


def test_what_a_post_holds_for_a_client_that_does_not_read_is_bounded() -> None:
    """A server that says 20 MiB while a POST waits, to a client that reads none of it: the
    POST holds at most POST_BACKLOG_BYTES, the rest goes to the GET stream, nothing is lost
    and the answer still ends the POST."""
    from types import SimpleNamespace

    from stockade.http.sessions import POST_BACKLOG_BYTES, HttpSession
    from stockade.relay import jsonrpc

    chunk = "x" * (1024 * 1024)

    async def scenario() -> tuple[int, list[int], int, bool]:
        session = HttpSession("s", "spiffe://stockade.local/host/a", "time")

        async def from_host(message: jsonrpc.Message) -> None:
            return None  # the server speaks below, at its own pace

        session.relay = SimpleNamespace(from_host=from_host)  # type: ignore[assignment]
        raw = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {}})
        stream = session.request_stream(jsonrpc.parse(raw.encode(), 1 << 20), 30)
        waiting = asyncio.ensure_future(anext(stream))  # forwarded; now the server floods
        await asyncio.sleep(0)
        for n in range(20):
            note = {"jsonrpc": "2.0", "method": "n", "params": {"n": n, "pad": chunk}}
            await session.to_host(json.dumps(note).encode())
        held = session._posts[0].said_bytes
        await session.to_host(b'{"jsonrpc":"2.0","id":7,"result":{}}')
        on_post = [json.loads((await waiting)[0])["params"]["n"]]
        answered = False
        async for said, last in stream:
            if last:
                answered = True
            else:
                on_post.append(json.loads(said)["params"]["n"])
        to_get = len(session._events)
        return held, on_post, to_get, answered

    held, on_post, to_get, answered = asyncio.run(scenario())
    assert held <= POST_BACKLOG_BYTES
    assert on_post == list(range(len(on_post))) and 0 < len(on_post) < 20
    assert len(on_post) + to_get == 20
    assert answered
