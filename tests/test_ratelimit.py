"""Rate limits: token buckets (a clock the test moves) and which requests a limit covers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.policy.evaluator import Evaluator, Request
from stockade.policy.loader import load_policy
from stockade.policy.ratelimit import RateLimiter
from tests.daemon_helper import Daemon, HostSession, running_daemon


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("steps", "granted"),
    [
        # (seconds to advance before the call) -> granted?  per_minute=60 (1/s), burst=3
        ([0, 0, 0, 0], [True, True, True, False]),  # the burst, then empty
        ([0, 0, 0, 0, 1.0], [True, True, True, False, True]),  # one second refills one
        ([0, 0, 0, 0.5, 0.5], [True, True, True, False, True]),  # half + half = one token
        ([0, 0, 0, 10, 0, 0, 0], [True, True, True, True, True, True, False]),  # capped at 3
    ],
)
def test_token_bucket_exhaustion_and_refill(steps: list[float], granted: list[bool]) -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    results = []
    for advance in steps:
        clock.now += advance
        results.append(limiter.take(("limit", "host", "server", "tool"), 60, 3) == 0.0)
    assert results == granted


def test_a_refusal_says_when_to_retry_and_buckets_are_separate() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    assert limiter.take(("l", "alice", "s", "t"), 6, 1) == 0.0
    assert limiter.take(("l", "alice", "s", "t"), 6, 1) == pytest.approx(10.0)
    assert limiter.take(("l", "bob", "s", "t"), 6, 1) == 0.0  # bob's own bucket
    assert limiter.take(("l", "alice", "s", "other"), 6, 1) == 0.0  # and per tool


def test_the_number_of_buckets_is_bounded() -> None:
    limiter = RateLimiter(Clock(), max_buckets=3)
    for n in range(10):
        limiter.take(("l", f"host-{n}", "s", "t"), 60, 1)
    assert len(limiter._buckets) == 3


LIMITED = """\
version: 1
rules:
  - name: all
    effect: allow
    identities: ["*"]
    servers: ["*"]
    methods: ["*"]
rate_limits:
  - name: two-slow-calls
    identities: ["spiffe://stockade.local/host/*"]
    servers: ["scratch"]
    methods: ["scratch/echo"]
    per_minute: 1
    burst: 2
"""


def test_which_requests_a_limit_covers(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(LIMITED)
    evaluator = Evaluator(load_policy([path]))
    host = "spiffe://stockade.local/host/a"
    assert [
        limit.name for limit in evaluator.limits_for(Request(host, "scratch", "scratch/echo"))
    ] == ["two-slow-calls"]
    assert evaluator.limits_for(Request(host, "scratch", "scratch/read")) == []
    assert evaluator.limits_for(Request(host, "time", "scratch/echo")) == []
    admin = "spiffe://stockade.local/admin/a"
    assert evaluator.limits_for(Request(admin, "scratch", "scratch/echo")) == []


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path, policy=LIMITED) as running:
        running.add_scratch_server("scratch", "--warm", "0")
        running.issue_host("busy")
        yield running


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_the_relay_refuses_past_the_limit_with_a_retry_time(daemon: Daemon) -> None:
    async def scenario() -> list[dict[str, object]]:
        async with HostSession(daemon, "scratch", daemon.hosts["busy"]) as host:
            return [await host.request("scratch/echo", {"n": n}) for n in range(3)]

    first, second, third = asyncio.run(scenario())
    assert "result" in first and "result" in second
    error = third["error"]
    assert error["code"] == -32011  # type: ignore[index]
    assert "two-slow-calls" in error["message"]  # type: ignore[index]
    assert 0 < error["data"]["retry_after_seconds"] <= 60  # type: ignore[index]
