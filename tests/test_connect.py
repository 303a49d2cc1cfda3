"""`stockade connect` as hosts use it: the official MCP SDK client, pipes, files, bad input."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from tests.daemon_helper import BIN, Daemon, running_daemon
from tests.daemon_helper import INIT_REQUEST as INITIALIZE

TIME_IMAGE = "stockade/python:latest"

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("connect")) as running:
        running.add_server("time", TIME_IMAGE, "mcp-server-time", "--local-timezone", "UTC")
        running.issue_host("test-host")
        yield running


def host_args(daemon: Daemon, server: str) -> list[str]:
    """What a host's config holds: the bridge, the server, the socket and its certificate."""
    return daemon.bridge(server, daemon.hosts["test-host"])[1:]


def connect(
    daemon: Daemon, server: str, stdin: bytes, *options: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "stockade"), *host_args(daemon, server), *options],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=daemon.env,
    )


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def test_the_official_sdk_client_uses_a_server_through_the_bridge(daemon: Daemon) -> None:
    params = StdioServerParameters(command=str(BIN / "stockade"), args=host_args(daemon, "time"))

    async def scenario() -> tuple[list[str], dict[str, Any]]:
        async with Client(params) as client:
            tools = await client.list_tools()
            result = await client.call_tool("get_current_time", {"timezone": "Europe/Paris"})
            return [t.name for t in tools.tools], json.loads(result.content[0].text)

    names, now = anyio.run(scenario)
    assert sorted(names) == ["convert_time", "get_current_time"]
    assert now["timezone"] == "Europe/Paris"
    assert now["datetime"].startswith("20")


def test_answers_arrive_even_when_stdin_ends_right_after_the_request(
    daemon: Daemon, tmp_path: Path
) -> None:
    request_file = tmp_path / "request.jsonl"
    request_file.write_text(json.dumps(INITIALIZE) + "\n")
    with request_file.open("rb") as handle:  # a script: it asks to wait for its answers
        result = subprocess.run(
            [str(BIN / "stockade"), *host_args(daemon, "time"), "--drain", "30"],
            stdin=handle,
            capture_output=True,
            timeout=60,
            env=daemon.env,
        )
    assert result.returncode == 0, result.stderr
    (answer,) = lines(result.stdout)
    assert answer["id"] == 1
    assert answer["result"]["serverInfo"]["name"] == "mcp-time"


def test_bad_input_gets_errors_and_the_session_survives(daemon: Daemon) -> None:
    oversized = (
        b'{"jsonrpc":"2.0","id":9,"method":"ping","params":{"pad":"' + b"x" * (5 << 20) + b'"}}'
    )
    stdin = (
        b"\n".join(
            [
                b"{not json",
                b"\xff\xfe not utf-8",
                b'[{"jsonrpc":"2.0","id":2,"method":"ping"}]',
                oversized,
                json.dumps(INITIALIZE).encode(),
            ]
        )
        + b"\n"
    )
    # A script: it waits for its answers (the bridge now starts faster than the warm pool
    # refills after the previous test, so `initialize` may meet a cold start).
    result = connect(daemon, "time", stdin, "--drain", "30")
    assert result.returncode == 0, result.stderr
    answers = lines(result.stdout)
    # The bridge answers the oversized line itself, the daemon the others: in either order.
    errors = sorted((a["error"]["code"], a["id"] or 0) for a in answers if "error" in a)
    # each error carries its request's id when it can be read: the oversized one's from its head
    assert errors == [(-32700, 0), (-32700, 0), (-32600, 0), (-32003, 9)]
    assert answers[-1]["id"] == 1 and "result" in answers[-1]


def test_an_unknown_server_is_one_line_and_exit_2(daemon: Daemon) -> None:
    result = connect(daemon, "nosuch", b"")
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode().strip().splitlines() == [
        "stockade: no server named 'nosuch' is registered (see `stockade server ls`)"
    ]


def test_an_unreachable_daemon_is_one_line_and_exit_3(daemon: Daemon, tmp_path: Path) -> None:
    args = host_args(daemon, "time")
    args[args.index("--socket") + 1] = str(tmp_path / "none.sock")
    result = subprocess.run(
        [str(BIN / "stockade"), *args], input=b"", capture_output=True, timeout=60
    )
    assert result.returncode == 3
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert "does not answer" in result.stderr.decode()


def test_the_bridge_tracks_the_same_pending_ids_from_a_messages_head_as_from_a_parse() -> None:
    """`Pending` reads the kind and id from the head of the usual message instead of parsing
    it whole: what it keeps (the requests the bridge answers -32004 if the daemon goes away)
    is what a whole parse gives, for every order, spacing and id form."""
    from stockade.cli.bridge import Pending, _lenient

    sent = [
        b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"t"}}',
        b'{"jsonrpc": "2.0", "id": "a\\"b", "method": "x"}',  # spaces, an escaped quote
        b'{"jsonrpc":"2.0","id":"\\u00e9","method":"x"}',  # a \u escape
        b'{"method":"x","params":{"id":1},"jsonrpc":"2.0","id":9}',  # another order: parsed
        b'{"jsonrpc":"2.0","method":"notifications/initialized"}',  # no id: nothing owed
        b'{"jsonrpc":"2.0","id":05,"method":"x"}',  # not JSON: the daemon refuses it
        b'{"jsonrpc":"2.0","id":"\\q","method":"x"}',  # an escape JSON has not: the same
        b'{"jsonrpc":"2.0","id":-7,"method":"x"}',
        b'{"jsonrpc":"2.0","id":12,"result":{}}',  # the host answering a server request
    ]
    received = [
        b'{"jsonrpc":"2.0","id":5,"result":{"id":8}}',
        b'{"jsonrpc":"2.0","id":"a\\"b","error":{"code":-1,"message":"m"}}',
        b'{"result":{},"jsonrpc":"2.0","id":9}',  # another order: parsed
        b'{"jsonrpc":"2.0","id":-7,"method":"sampling/createMessage"}',  # the server asks
    ]

    def reference(lines: list[bytes], answers: list[bytes]) -> dict[str, Any]:
        ids: dict[str, Any] = {}
        for line in lines:
            body = _lenient(line)
            if isinstance(body, dict) and "method" in body and "id" in body:
                ids[json.dumps(body["id"], separators=(",", ":"))] = body["id"]
        for answer in answers:
            body = _lenient(answer)
            if isinstance(body, dict) and "method" not in body and "id" in body:
                ids.pop(json.dumps(body["id"], separators=(",", ":")), None)
        return ids

    for cut in range(len(received) + 1):
        pending = Pending()
        for line in sent:
            pending.sent(line)
        for answer in received[:cut]:
            pending.received(answer)
        expected = reference(sent, received[:cut])
        owed = [json.loads(line)["id"] for line in pending.fail_all("gone")]
        assert owed == list(expected.values()), cut
    assert owed == ["\u00e9", -7]  # after every answer: the two never answered
