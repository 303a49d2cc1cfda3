"""Through Stockade, a server that reads JSON the way Go does runs only what the audit allowed.

Each attack below got a Go server to run a tool the policy denied, while the audit said
"allow get_me" (parser differential, CVE-2026-27896 and its relatives). The relay now parses
strictly and forwards its own canonical bytes, so the server (tests/go_style_server.py)
must execute exactly the calls the audit log records as allowed, and nothing else.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_helper import Daemon, HostSession, running_daemon

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

GO_SERVER = (Path(__file__).parent / "go_style_server.py").read_text()
AGENT = "spiffe://stockade.local/host/agent"
POLICY = f"""\
version: 1
rules:
  - name: agent-reads-only
    effect: allow
    identities: ["{AGENT}"]
    servers: ["go"]
    methods: ["tools/call"]
    names: ["get_me"]
"""
EVIL = "create_or_update_file"
ATTACKS = [
    # a second, case-variant key: Go takes the last match
    f'{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"get_me","Name":"{EVIL}"}}}}',
    # a second params object, upper case
    f'{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"get_me"}},'
    f'"PARAMS":{{"name":"{EVIL}"}}}}',
    # a NUL-suffixed key that go-sdk 1.3.1-1.4.0 folds into "name"
    f'{{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{{"name":"get_me",'
    f'"name\\u0000":"{EVIL}"}}}}',
    # looks like a response to Python, is a request to Go
    f'{{"jsonrpc":"2.0","id":4,"error":{{"code":1,"message":"x"}},"Method":"tools/call",'
    f'"Params":{{"name":"{EVIL}"}}}}',
    # "ID": a notification to Python (no rate limit, no answer owed), a request to Go
    '{"jsonrpc":"2.0","ID":5,"method":"tools/call","params":{"name":"get_me"}}',
    # duplicate keys: Python takes the last, some parsers the first
    f'{{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{{"name":"{EVIL}","name":"get_me"}}}}',
    # the Kelvin sign folds to k in Go: "\u212aey"-style look-alike of a member
    f'{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"get_me",'
    f'"N\\u0041ME":"{EVIL}"}}}}',
]
HONEST = [
    '{"jsonrpc":"2.0","id":100,"method":"tools/call","params":{"name":"get_me"}}',
    f'{{"jsonrpc":"2.0","id":101,"method":"tools/call","params":{{"name":"{EVIL}"}}}}',
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("hostile"), policy=POLICY) as running:
        running.add_server("go", "stockade/python:latest", "python3", "-c", GO_SERVER, warm=1)
        running.issue_host("agent")
        yield running


def test_the_go_style_server_runs_only_what_the_audit_allowed(daemon: Daemon) -> None:
    async def scenario() -> tuple[str, list[dict[str, object]], str]:
        async with HostSession(daemon, "go", daemon.hosts["agent"]) as host:
            assert host.opened is not None
            for raw in [*ATTACKS, *HONEST]:
                await host.send_raw(raw.encode())
            await host.wait_for(lambda: host.answer(100) and host.answer(101), 60)
            await asyncio.sleep(1)  # anything a wrongly forwarded attack made the server say
            logs = await asyncio.to_thread(
                daemon.cli, "server", "logs", "go", "--session", host.opened.session_id
            )
            return host.opened.session_id, list(host.messages), logs.stdout

    session, answers, stderr = asyncio.run(scenario())
    executed = Counter(
        line.split("EXECUTED ", 1)[1].split()[0]
        for line in stderr.splitlines()
        if "EXECUTED " in line
    )
    records = [
        json.loads(line)
        for path in sorted((daemon.state_dir / "audit").glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    allowed = Counter(
        r["target"]
        for r in records
        if r.get("session") == session
        and r["type"] == "request"
        and r.get("outcome") == "allow"
        and r.get("action") == "tools/call"
    )
    assert executed == allowed  # the server ran exactly what the audit says was allowed
    assert executed == Counter({"get_me": 1})  # the honest call, and nothing else
    refused = [m for m in answers if "error" in m and m.get("id") in (1, 2, 3, 4, 6, 7)]
    assert {m["id"] for m in refused} == {1, 2, 3, 4, 6, 7}  # each attack got its own error
