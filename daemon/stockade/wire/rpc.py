"""The JSON-RPC pieces both ends of the relay need, with nothing heavy imported.

The error codes, id keys and error answers live here rather than in `relay/jsonrpc.py`
because `stockade connect` (the bridge a host launches per session) answers oversized lines
and a vanished daemon itself, and must start fast: it may import only the standard library.
`relay/jsonrpc.py` re-exports all of it for the daemon.
"""

from __future__ import annotations

import json
import re

TYPE_CHECKING = False  # not typing's: the bridge does not import typing
if TYPE_CHECKING:
    from typing import Any

# `"id": 12` or `"id": "abc"` near the start of a message (the usual place for it).
_HEAD_ID = re.compile(rb'"id"\s*:\s*(-?[0-9]{1,16}|"(?:[^"\\\x00-\x1f]|\\.){0,256}")')

# Standard JSON-RPC codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
# Stockade's own codes (documented in the README): server-side errors, -32000 to -32099,
# clear of the codes MCP itself defines there (-32001, -32020 to -32022, -32042).
SERVER_EXITED = -32000  # the sandboxed server ended while the request was pending
SERVER_UNAVAILABLE = -32002  # the server is restarting or could not be started
MESSAGE_TOO_LARGE = -32003  # over the configured size limit
DAEMON_GONE = -32004  # (from `stockade connect`) the daemon went away with the request pending
POLICY_DENIED = -32010  # refused by the access policy; never forwarded
RATE_LIMITED = -32011  # a rate limit of the policy is reached; data.retry_after_seconds
AUDIT_UNAVAILABLE = -32030  # the audit log cannot be written: nothing is relayed until it can
SECRET_WITHHELD = -32031  # the server's answer held a granted secret that could not be redacted
# MCP's own codes that the HTTP front answers with.
REQUEST_TIMEOUT = -32001  # no answer from the server in time
HEADER_MISMATCH = -32020  # 2026-07-28: MCP-Protocol-Version / Mcp-Method / Mcp-Name disagree

MAX_ID = 2**53 - 1  # ids beyond this are not exact in JavaScript (and many other) hosts


_ID_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps's output, made once


def id_key(value: Any) -> str:
    """A hashable key for a JSON-RPC id that keeps 1 and "1" apart: its compact JSON."""
    if type(value) is int:  # the usual id, on every message: skip the encoder
        return str(value)
    return _ID_ENCODER.encode(value)


# A message that opens with "jsonrpc", then "id", then "method", "result" or "error" (what
# the SDKs write, in that order, and the daemon forwards in the order it received) says its
# kind and id in its first bytes: no whole parse is needed to route or track it.
_HEAD = re.compile(
    rb'\s*\{\s*"jsonrpc"\s*:\s*"2\.0"\s*,\s*"id"\s*:\s*'
    rb'(-?(?:0|[1-9][0-9]{0,15})|"(?:[^"\\\x00-\x1f]|\\.){0,256}")\s*,\s*"(method|result|error)"\s*:'
)


def peek_head(raw: bytes) -> tuple[bytes, Any] | None:
    """(b"method", b"result" or b"error"; the id) from the head of a message, or None: then
    parse it. Exact where the message is one JSON object with unique keys (the first three
    members are top-level); a bookkeeping shortcut, never a policy decision."""
    found = _HEAD.match(raw)
    if found is None:
        return None
    try:
        return found[2], json.loads(found[1])  # an integer or a whole JSON string
    except ValueError:  # an escape JSON does not have: parse the message instead
        return None


def valid_id(value: Any) -> bool:
    """A JSON-RPC id Stockade relays: a string, or an integer within +-(2^53 - 1)."""
    if isinstance(value, str):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_ID <= value <= MAX_ID


def id_from_head(head: bytes) -> Any:
    """The id of a message too large to parse, read from its first bytes; None if unsure.

    Only to address an error to the request it belongs to: a peer that lies here can only
    make its own request fail early.
    """
    found = _HEAD_ID.search(head)
    if found is None:
        return None
    try:
        value = json.loads(found.group(1))
    except ValueError:
        return None
    return value if valid_id(value) else None


def error_response(request_id: Any, code: int, message: str, data: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": error}, separators=(",", ":")
    ).encode()


def line_too_large(head: bytes, seen: int, limit: int) -> bytes:
    """What a bridge answers a host line over the limit with (never sent to the daemon)."""
    return error_response(
        id_from_head(head),
        MESSAGE_TOO_LARGE,
        f"message of {seen} bytes is over the {limit}-byte limit",
    )
