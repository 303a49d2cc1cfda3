"""Hostile host messages (issue 14): each is refused, or forwarded as canonical bytes only.

The corpus is `tests/data/hostile_messages.json`. For each case, `jsonrpc.parse` either
refuses it with the expected code (and the error carries the expected id), or returns a
message whose `raw`, the bytes the relay forwards, are exactly the expected canonical
bytes; where the case names a policy outcome, the shipped `policies/filesystem.yaml`
decides the parsed call that way. The server side (`parse_server_line`) drops every refused
case without raising. No Docker: this is the relay's core, in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from stockade.policy.evaluator import Evaluator, Request
from stockade.policy.loader import load_policy
from stockade.relay import jsonrpc
from stockade.relay.jsonrpc import InvalidMessage, Kind

ROOT = Path(__file__).resolve().parents[1]
CORPUS = json.loads((ROOT / "tests" / "data" / "hostile_messages.json").read_text())["cases"]
HOST = "spiffe://stockade.local/host/laptop"
LIMIT = 1024 * 1024


def raw_of(case: dict[str, Any]) -> bytes:
    if "raw_hex" in case:
        return bytes.fromhex(case["raw_hex"])
    return str(case["raw"]).encode("utf-8")


@pytest.fixture(scope="module")
def filesystem() -> Evaluator:
    return Evaluator(load_policy([ROOT / "policies" / "filesystem.yaml"]))


def decide(evaluator: Evaluator, message: jsonrpc.Message) -> str:
    """The policy decision the guard would take (its reading of name and arguments)."""
    params = message.params or {}
    arguments = params.get("arguments")
    request = Request(
        HOST,
        "filesystem",
        message.method or "",
        params.get("name"),
        arguments if isinstance(arguments, dict) else {},
    )
    return "allow" if evaluator.decide(request).allowed else "deny"


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_host_message(case: dict[str, Any], filesystem: Evaluator) -> None:
    raw = raw_of(case)
    expect = case["expect"]
    if "refused" in expect:
        with pytest.raises(InvalidMessage) as caught:
            jsonrpc.parse(raw, LIMIT)
        assert caught.value.code == expect["refused"], str(caught.value)
        assert caught.value.request_id == expect["id"]
        assert str(caught.value)  # a reason is always given
        # the error the host gets is itself canonical JSON-RPC
        answer = jsonrpc.error_response(caught.value.request_id, caught.value.code, "x")
        assert jsonrpc.parse(answer, LIMIT).kind is Kind.RESPONSE
        return
    message = jsonrpc.parse(raw, LIMIT)
    assert message.raw == expect["canonical"].encode("utf-8")
    assert b"\n" not in message.raw and b"\r" not in message.raw
    assert jsonrpc.parse(message.raw, LIMIT).raw == message.raw  # a fixed point
    if "policy" in expect:
        assert decide(filesystem, message) == expect["policy"]


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_server_line(case: dict[str, Any]) -> None:
    """A server writing the same lines: refused ones are never forwarded or raised; where
    an id can be read, its request fails at once with why."""
    message = jsonrpc.parse_server_line(raw_of(case), LIMIT)
    if "refused" in case["expect"]:
        if message is not None:
            assert message.kind is jsonrpc.Kind.RESPONSE
            assert set(message.body) == {"jsonrpc", "id", "error"}
            assert message.body["error"]["message"].startswith("the server's answer was refused")
    else:
        assert message is not None
        assert message.raw == case["expect"]["canonical"].encode("utf-8")


def test_the_corpus_covers_the_cases_of_issue_14() -> None:
    names = " ".join(c["name"] for c in CORPUS)
    for needle in (
        "Name next to name",
        "PARAMS",
        "NUL-suffixed",
        "error plus Method",
        "ID instead of id",
        "5000-digit",
        "1000-deep",
        "lone high surrogate",
        "invalid UTF-8",
        "NaN",
        "/data followed by a newline",
        "/data/../etc/passwd",
        "the decoy",
        "Kelvin",
    ):
        assert needle in names, needle


def test_an_oversized_message_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(InvalidMessage) as caught:
        jsonrpc.parse(b'{"jsonrpc":"2.0","id":1,"method":"ping"}' + b" " * 100, 100)
    assert caught.value.code == jsonrpc.MESSAGE_TOO_LARGE


def test_server_garbage_is_logged_at_a_bounded_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonrpc, "_dropped", jsonrpc._DropLog(burst=20, window=60))
    with capture_logs() as logged:
        for _ in range(500):
            assert jsonrpc.parse_server_line(b"not json", LIMIT) is None
    dropped = [entry for entry in logged if "not strict" in entry["event"]]
    assert len(dropped) == 20
