"""The relay core as playbooks: RelaySession, SharedRouter and the guard, with no Docker.

Each test feeds messages in from the host or the (fake) server and checks what came out on
the other side and what the audit log holds. See tests/relay_playbook.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from stockade.relay import jsonrpc
from stockade.relay.budget import DENIAL_BURST, MAX_CALLER_STRING
from stockade.relay.session import RelaySession
from stockade.relay.shared import SharedRouter
from stockade.wire.lines import OversizedLine
from tests.relay_playbook import (
    A,
    B,
    FakeInstance,
    Host,
    Playbook,
    message,
    notification,
    request,
    result,
    settle,
)

POLICY = f"""\
version: 1
rules:
  - name: a-and-b-use-srv
    effect: allow
    identities: ["{A}", "{B}"]
    servers: ["srv"]
    methods: ["tools/call", "resources/subscribe", "logging/setLevel"]
    names: ["echo", "file:///*"]
  - name: only-a-reads-a-files
    effect: allow
    identities: ["{A}"]
    servers: ["srv"]
    methods: ["resources/read"]
    names: ["file:///a/*"]
server_requests:
  srv: ["sampling/createMessage"]
"""

Scenario = Callable[[Playbook], Awaitable[None]]


def play(tmp_path: Path, scenario: Scenario) -> None:
    async def run() -> None:
        book = Playbook(tmp_path, POLICY)
        try:
            await scenario(book)
        finally:
            await book.audit.close()

    asyncio.run(run())


def own_session(book: Playbook, identity: str = A) -> tuple[RelaySession, FakeInstance, Host]:
    instance, host = FakeInstance(), Host()
    session = RelaySession(
        "s",
        "srv",
        instance,
        host,
        max_message_bytes=1 << 20,
        guard=book.guard(identity),  # type: ignore[arg-type]
    )
    instance.bind(session.from_server)
    return session, instance, host


# -- one host, one instance ------------------------------------------------------------


def test_ids_are_per_direction_and_answers_find_their_request(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book)
        await session.from_host(request(1, "tools/call", name="echo", arguments={"x": 1}))
        assert server.sent[0]["id"] == 1 and server.sent[0]["params"]["name"] == "echo"
        # The server asks the host something with the same id 1: another id space.
        await server.says(request(1, "sampling/createMessage", messages=[]))
        await server.says(result(1, {"content": [{"type": "text", "text": "x"}]}))
        assert host.got[0]["method"] == "sampling/createMessage"
        assert host.answer(1)["result"]["content"][0]["text"] == "x"
        await session.from_host(result(1, {"role": "assistant"}))  # the host answers it
        assert server.sent[-1] == {"jsonrpc": "2.0", "id": 1, "result": {"role": "assistant"}}

    play(tmp_path, scenario)


def test_a_host_response_to_nothing_outstanding_never_reaches_the_server(
    tmp_path: Path,
) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, _ = own_session(book)
        await session.from_host(result(7, {"injected": True}))  # nobody asked
        await server.says(request("q", "sampling/createMessage", messages=[]))
        await session.from_host(result("q", {"first": True}))
        await session.from_host(result("q", {"second": True}))  # answered already
        assert [m.get("result") for m in server.sent] == [{"first": True}]
        dropped = book.records(type="request", outcome="deny", action="response")
        assert dropped and "no outstanding server request" in dropped[0]["reason"]

    play(tmp_path, scenario)


def test_a_denied_call_is_answered_and_never_forwarded(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book, B)
        await session.from_host(request(3, "resources/read", uri="file:///a/secret"))
        assert server.sent == []
        assert host.answer(3)["error"]["code"] == jsonrpc.POLICY_DENIED
        assert book.records(type="request", outcome="deny", target="file:///a/secret")

    play(tmp_path, scenario)


# -- audit volume a host controls ------------------------------------------------------


def test_repeated_identical_denials_are_one_record_with_a_count(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book, B)
        guard = session._guard
        for n in range(20):
            await session.from_host(request(n, "resources/read", uri="file:///a/x"))
        assert server.sent == []
        codes = {host.answer(n)["error"]["code"] for n in range(20)}
        assert codes <= {jsonrpc.POLICY_DENIED, jsonrpc.RATE_LIMITED}
        assert len(book.records(type="request", outcome="deny", target="file:///a/x")) == 1
        await guard.summarise()  # the session ends: the repeats go on record, with the count
        counted = book.records(type="request", outcome="deny", target="file:///a/x")
        assert sum(r["count"] for r in counted) == 20

    play(tmp_path, scenario)


def test_a_host_varying_its_denied_calls_cannot_grow_the_audit_log(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, _, host = own_session(book, B)
        sent = 0
        before = book.audit_bytes()
        for n in range(1000):
            raw = request(n, "resources/read", uri=f"file:///a/{n}-{'x' * 300}")
            sent += len(raw)
            await session.from_host(raw)
        grown = book.audit_bytes() - before
        per_call = [r for r in book.records(type="request", outcome="deny") if r.get("target")]
        assert len(per_call) <= DENIAL_BURST + 2  # then the budget: summarised, not per call
        assert grown < sent / 10, (grown, sent)
        assert host.answer(999)["error"]["code"] == jsonrpc.RATE_LIMITED
        await session._guard.summarise()  # the session ends: every refusal is counted
        denials = book.records(type="request", outcome="deny")
        assert sum(r.get("count", 1) for r in denials) == 1000

    play(tmp_path, scenario)


def test_a_caller_chosen_name_is_cut_in_records(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, _, _ = own_session(book, B)
        await session.from_host(request(1, "tools/call", name="n" * 10_000))
        target = book.records(type="request", outcome="deny")[0]["target"]
        assert len(target) < MAX_CALLER_STRING + 20

    play(tmp_path, scenario)


# -- a shared instance, two hosts ------------------------------------------------------


class SettledRouter(SharedRouter):
    """A shared router whose calls return once each host's queue has had its turn: each
    host of a shared instance is written to by its own task (`relay/outbox.py`)."""

    async def from_host(self, session: Any, raw: bytes) -> None:
        await super().from_host(session, raw)
        await settle()

    async def expire(self, session: Any, timeout: float) -> None:
        await super().expire(session, timeout)
        await settle()


def shared(book: Playbook) -> tuple[SharedRouter, FakeInstance, Any, Host, Any, Host]:
    router, server = SettledRouter("srv", 1 << 20), FakeInstance()
    router.adopt(server, {"protocolVersion": "2025-06-18", "capabilities": {}})  # type: ignore[arg-type]
    host_a, host_b = Host(), Host()
    seat_a = router.join("sa", host_a, book.guard(A, session="sa"))
    seat_b = router.join("sb", host_b, book.guard(B, session="sb"))
    return router, server, seat_a, host_a, seat_b, host_b


def test_shared_ids_never_cross_and_a_log_goes_only_to_its_session(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        router, server, seat_a, host_a, seat_b, host_b = shared(book)

        async def log(text: str) -> None:
            await server.says(notification("notifications/message", level="info", data=text))

        await router.from_host(seat_a, request(1, "tools/call", name="echo"))
        await router.from_host(seat_b, request(1, "tools/call", name="echo"))
        first, second = (m["id"] for m in server.sent)
        assert first != second  # rewritten: unique on the instance
        await log("both busy")
        await server.says(result(second, "for b"))
        await log("b is done")  # a is the only one busy now, but this may be about b
        await server.says(result(first, "for a"))
        await router.from_host(seat_a, request(2, "tools/call", name="echo"))
        await log("a's log")  # only a has been active since its request began
        await server.says(result(server.sent[-1]["id"], "again for a"))
        await log("idle")
        assert host_a.answer(1)["result"] == "for a" and host_b.answer(1)["result"] == "for b"
        logs_a = [m["params"]["data"] for m in host_a.got if m.get("method")]
        logs_b = [m["params"]["data"] for m in host_b.got if m.get("method")]
        assert logs_a == ["a's log"] and logs_b == []
        assert router.unattributed == 3

    play(tmp_path, scenario)


def test_a_shared_session_cannot_make_the_router_hold_without_bound(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        router, server, seat_a, host_a, _, _ = shared(book)
        big = "t" * 10_000
        await router.from_host(
            seat_a, request(1, "tools/call", name="echo", _meta={"progressToken": big})
        )
        assert server.sent == [] and host_a.answer(1)["error"]["code"] == jsonrpc.INVALID_REQUEST
        for n in range(20):  # tokens are forgotten when their request is answered
            await router.from_host(
                seat_a, request(10 + n, "tools/call", name="echo", _meta={"progressToken": n})
            )
            await server.says(result(server.sent[-1]["id"], "ok"))
        assert router._tokens == {} and router._routes == {}

    play(tmp_path, scenario)


def test_resource_updates_go_to_subscribers_the_policy_lets_read(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        router, server, seat_a, host_a, seat_b, host_b = shared(book)
        for seat in (seat_a, seat_b):
            await router.from_host(seat, request(1, "resources/subscribe", uri="file:///a/x"))
        await router.from_host(seat_b, request(2, "resources/subscribe", uri="file:///b/y"))
        await server.says(notification("notifications/resources/updated", uri="file:///a/x"))
        await server.says(notification("notifications/resources/updated", uri="file:///b/y"))
        await server.says(notification("notifications/tools/list_changed"))
        seen_a = [m for m in host_a.got if m.get("method")]
        seen_b = [m for m in host_b.got if m.get("method")]
        assert [m.get("params", {}).get("uri") for m in seen_a] == ["file:///a/x", None]
        # b subscribed to a's file but may not read it: it hears only of its own and the list
        assert [m.get("params", {}).get("uri") for m in seen_b] == [None]

    play(tmp_path, scenario)


def test_no_host_sets_the_log_level_or_answers_for_a_shared_server(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        router, server, seat_a, host_a, _, _ = shared(book)
        await router.from_host(seat_a, request(5, "logging/setLevel", level="debug"))
        await router.from_host(seat_a, result("stk-1", {"forged": True}))
        await router.from_host(seat_a, request(6, "notifications/initialized"))
        assert server.sent == []
        assert host_a.answer(5)["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
        assert host_a.answer(6)["error"]["code"] == jsonrpc.INVALID_REQUEST
        assert book.records(type="request", outcome="deny", action="logging/setLevel")

    play(tmp_path, scenario)


def test_a_session_cancels_only_its_own_requests(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        router, server, seat_a, _, seat_b, _ = shared(book)
        await router.from_host(seat_a, request(1, "tools/call", name="echo"))
        await router.from_host(seat_b, notification("notifications/cancelled", requestId=1))
        assert [m.get("method") for m in server.sent] == ["tools/call"]  # b's cancel: nothing
        await router.from_host(seat_a, notification("notifications/cancelled", requestId=1))
        cancel = server.sent[-1]
        assert cancel["method"] == "notifications/cancelled"
        assert cancel["params"]["requestId"] == server.sent[0]["id"]  # rewritten

    play(tmp_path, scenario)


@pytest.mark.parametrize("raw", [b"{", b"[]", message({"jsonrpc": "1.0", "id": 1})])
def test_malformed_host_input_gets_an_error_and_nothing_is_forwarded(
    tmp_path: Path, raw: bytes
) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book)
        await session.from_host(raw)
        assert server.sent == []
        assert host.got[0]["error"]["code"] in (jsonrpc.PARSE_ERROR, jsonrpc.INVALID_REQUEST)

    play(tmp_path, scenario)


# -- every request ends with an answer ---------------------------------------------------


def test_a_request_with_no_answer_times_out_and_the_server_is_told(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book)
        await session.from_host(request(9, "tools/call", name="echo"))
        await session.expire(60.0)  # not yet overdue
        assert host.got == []
        await asyncio.sleep(0.05)
        await session.expire(0.01)
        assert host.answer(9)["error"]["code"] == jsonrpc.REQUEST_TIMEOUT
        cancel = server.sent[-1]
        assert cancel["method"] == "notifications/cancelled"
        assert cancel["params"]["requestId"] == 9
        await server.says(result(9, "too late"))  # the late answer is not forwarded
        assert len([m for m in host.got if m.get("id") == 9]) == 1

    play(tmp_path, scenario)


def test_a_shared_request_times_out_with_its_own_id(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        router, server, seat_a, host_a, _, host_b = shared(book)
        await router.from_host(seat_a, request(3, "tools/call", name="echo"))
        rewritten = server.sent[0]["id"]
        await asyncio.sleep(0.05)
        await router.expire(seat_a, 0.01)
        assert host_a.answer(3)["error"]["code"] == jsonrpc.REQUEST_TIMEOUT
        assert server.sent[-1]["params"]["requestId"] == rewritten
        assert host_b.got == []

    play(tmp_path, scenario)


def test_an_oversized_answer_fails_its_own_request_at_once(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book)
        await session.from_host(request("big", "tools/call", name="echo"))
        head = b'{"jsonrpc":"2.0","id":"big","result":{"content":"' + b"x" * 400
        await server.says(OversizedLine(seen=5_000_000, head=head))
        error = host.answer("big")["error"]
        assert error["code"] == jsonrpc.MESSAGE_TOO_LARGE and "5000000" in error["message"]

    play(tmp_path, scenario)


def test_a_refused_answer_fails_its_own_request_at_once(tmp_path: Path) -> None:
    """An answer the strict parser refuses (here: two `result` members, which parsers
    read differently) is never forwarded, and its request ends now, not at the timeout."""

    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book)
        await session.from_host(request(5, "tools/call", name="echo"))
        await server.says(b'{"jsonrpc":"2.0","id":5,"result":{"a":1},"result":{"b":2}}')
        error = host.answer(5)["error"]
        assert error["code"] == jsonrpc.INVALID_REQUEST
        assert error["message"].startswith("the server's answer was refused: duplicate key")
        assert len(host.got) == 1
        await server.says(b'{"jsonrpc":"2.0","id":5,"result":"late"}')  # nothing pending now
        assert len(host.got) == 1

    play(tmp_path, scenario)


def test_an_oversized_request_is_answered_with_its_id(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book)
        big = request(77, "tools/call", name="echo", arguments={"blob": "y" * (1 << 20)})
        await session.from_host(big)
        assert server.sent == []
        assert host.answer(77)["error"]["code"] == jsonrpc.MESSAGE_TOO_LARGE

    play(tmp_path, scenario)


def test_a_server_answer_to_nothing_pending_is_dropped(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book)
        await server.says(result(404, {"made": "up"}))
        await session.from_host(request(1, "tools/call", name="echo"))
        await server.says(result(1, "first"))
        await server.says(result(1, "again"))
        assert [m.get("result") for m in host.got] == ["first"]

    play(tmp_path, scenario)


def test_caller_strings_in_reasons_and_server_requests_are_cut_and_counted(
    tmp_path: Path,
) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book, B)
        huge = "n" * 1_000_000
        before = book.audit_bytes()
        for n in range(5):  # the default-deny reason quotes the name: cut, and counted
            await session.from_host(request(n, "tools/call", name=huge))
        for n in range(5):  # a lying server asks the host with a 1 MB method, again and again
            await server.says(request(f"s{n}", "x" * 1_000_000))
        grown = book.audit_bytes() - before
        assert grown < 20_000, grown  # 10 MB of caller strings, a few KiB of records
        refused = [m for m in server.sent if "error" in m]
        assert len(refused) == 5 and all(len(m["error"]["message"]) < 1000 for m in refused)
        assert all(len(m["error"]["message"]) < 1000 for m in host.got)

    play(tmp_path, scenario)


def test_completions_are_decided_as_using_the_prompt_or_resource(tmp_path: Path) -> None:
    async def scenario(book: Playbook) -> None:
        session, server, host = own_session(book, B)  # B may not read file:///a/*
        complete = {"argument": {"name": "x", "value": "a"}}
        await session.from_host(
            request(
                1,
                "completion/complete",
                ref={"type": "ref/resource", "uri": "file:///a/{x}"},
                **complete,
            )
        )
        await session.from_host(
            request(
                2,
                "completion/complete",
                ref={"type": "ref/prompt", "name": "secret_report"},
                **complete,
            )
        )
        assert server.sent == []
        assert host.answer(1)["error"]["code"] == jsonrpc.POLICY_DENIED
        assert host.answer(2)["error"]["code"] == jsonrpc.POLICY_DENIED

    play(tmp_path, scenario)


def test_a_host_that_never_reads_holds_back_no_other_host_of_a_shared_server(
    tmp_path: Path,
) -> None:
    """Red-team finding: the shared instance's one reader awaited each host's transport,
    so one host that stopped reading stalled every other host's answers."""

    class Stuck(Host):
        async def __call__(self, raw: bytes) -> None:
            await asyncio.Event().wait()  # the host never reads: the write never completes

    async def scenario(book: Playbook) -> None:
        router, server = SettledRouter("srv", 1 << 10), FakeInstance()
        router.adopt(server, {"protocolVersion": "2025-06-18", "capabilities": {}})  # type: ignore[arg-type]
        stuck, host_b = Stuck(), Host()
        seat_a = router.join("sa", stuck, book.guard(A, session="sa"))
        seat_b = router.join("sb", host_b, book.guard(B, session="sb"))
        for n in range(10):
            await router.from_host(seat_a, request(n, "tools/call", name="echo"))
        await router.from_host(seat_b, request(1, "tools/call", name="echo"))
        for sent in server.sent[:10]:  # answers for the stuck host: 500 bytes each
            await server.says(result(sent["id"], "x" * 500))
        await server.says(result(server.sent[10]["id"], "for b"))
        assert host_b.answer(1)["result"] == "for b"
        assert seat_a.outbox is not None and seat_a.outbox.dropped >= 7  # bounded: 2 KiB
        router.leave(seat_a)
        router.leave(seat_b)

    play(tmp_path, scenario)
