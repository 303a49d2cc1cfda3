"""I/O-free JSON-RPC inspection: parse only what the relay needs, keep the original bytes.

The relay forwards each message as the bytes it arrived as. It parses a message once to learn
its kind, id, method and params (what the checks need). It never re-serialises a message it
only forwards. The one exception is line endings: JSON strings cannot hold raw CR or LF, so a
CR or LF in a message is whitespace between tokens, and becomes a space. That keeps one
message on one line on stdio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from stockade.logs import get_logger
from stockade.wire.lines import OversizedLine

log = get_logger("stockade.relay")

# Standard JSON-RPC codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
# Stockade's own codes (documented in the README): server-side errors, -32000 to -32099,
# clear of the codes MCP itself defines there (-32001, -32020 to -32022, -32042).
SERVER_EXITED = -32000  # the sandboxed server ended while the request was pending
SERVER_UNAVAILABLE = -32002  # the server is restarting or could not be started
MESSAGE_TOO_LARGE = -32003  # over the configured size limit
POLICY_DENIED = -32010  # refused by the access policy; never forwarded
RATE_LIMITED = -32011  # a rate limit of the policy is reached; data.retry_after_seconds
AUDIT_UNAVAILABLE = -32030  # the audit log cannot be written: nothing is relayed until it can
# MCP's own codes that the HTTP front answers with.
REQUEST_TIMEOUT = -32001  # no answer from the server in time
HEADER_MISMATCH = -32020  # 2026-07-28: MCP-Protocol-Version / Mcp-Method / Mcp-Name disagree


class Kind(Enum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"  # result or error


class InvalidMessage(ValueError):
    """A message the relay refuses; `code` is the JSON-RPC error code to answer with."""

    def __init__(self, code: int, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True)
class Message:
    raw: bytes  # exactly what is forwarded (one line, no newline)
    kind: Kind
    id: Any  # JSON value of "id" (None for notifications)
    method: str | None
    params: dict[str, Any] | None
    body: dict[str, Any]

    @property
    def id_key(self) -> str:
        """A hashable key for the id that keeps 1 and "1" apart."""
        return id_key(self.id)


def id_key(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _single_line(raw: bytes) -> bytes:
    if b"\n" in raw or b"\r" in raw:
        return raw.replace(b"\r", b" ").replace(b"\n", b" ")
    return raw


def parse(raw: bytes, max_bytes: int) -> Message:
    """Inspect one message. Raises `InvalidMessage` with the code to answer."""
    if len(raw) > max_bytes:
        raise InvalidMessage(
            MESSAGE_TOO_LARGE, f"message of {len(raw)} bytes is over the {max_bytes}-byte limit"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage(PARSE_ERROR, "message is not valid UTF-8") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(PARSE_ERROR, f"invalid JSON: {exc.msg} at char {exc.pos}") from None
    if isinstance(body, list):
        raise InvalidMessage(INVALID_REQUEST, "JSON-RPC batches are not supported")
    if not isinstance(body, dict) or body.get("jsonrpc") != "2.0":
        raise InvalidMessage(INVALID_REQUEST, 'not a JSON-RPC 2.0 message (need "jsonrpc": "2.0")')
    request_id = body.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, (str, int))
    ):
        raise InvalidMessage(INVALID_REQUEST, "id must be a string or an integer")
    method = body.get("method")
    params = body.get("params")
    if params is not None and not isinstance(params, (dict, list)):
        raise InvalidMessage(INVALID_REQUEST, "params must be an object or an array", request_id)
    if method is not None:
        if not isinstance(method, str) or not method:
            raise InvalidMessage(INVALID_REQUEST, "method must be a non-empty string", request_id)
        kind = Kind.NOTIFICATION if "id" not in body else Kind.REQUEST
        if kind is Kind.REQUEST and request_id is None:
            raise InvalidMessage(INVALID_REQUEST, "a request id must not be null")
    elif "result" in body or "error" in body:
        kind = Kind.RESPONSE
    else:
        raise InvalidMessage(
            INVALID_REQUEST, "neither a request, a notification nor a response", request_id
        )
    return Message(
        raw=_single_line(raw),
        kind=kind,
        id=request_id,
        method=method,
        params=params if isinstance(params, dict) else None,
        body=body,
    )


def encode(body: dict[str, Any]) -> bytes:
    """A message the relay itself builds or rewrites, as one compact line."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def error_response(request_id: Any, code: int, message: str, data: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": error}, separators=(",", ":")
    ).encode()


def parse_server_line(line: bytes | OversizedLine, max_bytes: int) -> Message | None:
    """A server's stdout line as a message, or None (logged) when it cannot be forwarded.

    A server that writes something other than JSON-RPC to stdout (a stray print, a line over
    the limit) breaks no session: the line is dropped and said in the daemon's log.
    """
    if isinstance(line, OversizedLine):
        log.warning("server sent a message over the limit; dropped", bytes=line.seen)
        return None
    try:
        return parse(line, max_bytes)
    except InvalidMessage as exc:
        log.warning("server wrote a non-JSON-RPC line to stdout; dropped", reason=str(exc))
        return None
