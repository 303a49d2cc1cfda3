"""Logging: JSON lines with context, no locals in tracebacks, secrets redacted, stdlib routed."""

from __future__ import annotations

import io
import json
import logging

import pytest

from stockade.logs import configure_logging, get_logger, log_context


@pytest.fixture
def out() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    return stream


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_shape_with_context(out: io.StringIO) -> None:
    with log_context(session="s-1", server="time", identity="spiffe://stockade.local/host/x"):
        get_logger("stockade.test").info("session opened", instance="i-1")
    get_logger("stockade.test").info("after")
    first, second = records(out)
    assert first["event"] == "session opened"
    assert first["level"] == "info"
    assert first["logger"] == "stockade.test"
    assert first["session"] == "s-1"
    assert first["server"] == "time"
    assert first["identity"] == "spiffe://stockade.local/host/x"
    assert first["instance"] == "i-1"
    assert str(first["timestamp"]).endswith("Z")
    assert "session" not in second  # context does not leak out of its block


def test_tracebacks_carry_no_local_variables(out: io.StringIO) -> None:
    def fail_with_a_secret_in_scope() -> None:
        api_key = "sk-live-DO-NOT-LOG-4242"
        raise RuntimeError(f"failed after reading {len(api_key)} bytes")

    try:
        fail_with_a_secret_in_scope()
    except RuntimeError:
        get_logger("stockade.test").exception("boom")
    text = out.getvalue()
    assert "sk-live-DO-NOT-LOG-4242" not in text
    (record,) = records(out)
    exception = record["exception"]
    assert isinstance(exception, list)
    assert exception[0]["exc_type"] == "RuntimeError"
    assert all("locals" not in frame for frame in exception[0]["frames"])


def test_console_format_also_omits_locals() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream)

    def fail() -> None:
        token_value = "tok-CONSOLE-SECRET-77"
        raise ValueError(token_value[:3])

    try:
        fail()
    except ValueError:
        get_logger("stockade.test").exception("boom")
    assert "tok-CONSOLE-SECRET-77" not in stream.getvalue()
    assert "ValueError" in stream.getvalue()


def test_sensitive_keys_are_redacted(out: io.StringIO) -> None:
    get_logger("stockade.test").info("auth", token="abc123", password="hunter2", user="ann")
    (record,) = records(out)
    assert record["token"] == "[REDACTED]"
    assert record["password"] == "[REDACTED]"
    assert record["user"] == "ann"
    assert "abc123" not in out.getvalue()


@pytest.mark.parametrize("name", ["grpc._server", "docker.api.client"])
def test_stdlib_loggers_go_through_the_same_chain(out: io.StringIO, name: str) -> None:
    with log_context(server="time"):
        logging.getLogger(name).warning("engine said %s", "hello")
    (record,) = records(out)
    assert record["event"] == "engine said hello"
    assert record["logger"] == name
    assert record["level"] == "warning"
    assert record["server"] == "time"


def test_level_filters(out: io.StringIO) -> None:
    get_logger("stockade.test").debug("hidden")
    logging.getLogger("grpc").debug("hidden too")
    assert out.getvalue() == ""
