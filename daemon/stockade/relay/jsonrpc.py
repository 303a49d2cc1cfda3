"""I/O-free JSON-RPC: check a message strictly, and forward only its canonical bytes.

What the relay forwards is what it checked: `parse` reads a message with the strict parser
(`wire.strict_json`), checks the JSON-RPC envelope, and `Message.raw` is Stockade's own
serialisation of exactly that object, never the bytes as they arrived. A parser that reads
JSON differently (Go's case-insensitive keys, NUL-suffixed keys, first-of-duplicates) thus
cannot see another message than the policy saw.

Refused with `InvalidMessage` (-32700 or -32600, and the request's id when it can be read):
- everything `strict_json` refuses (duplicate or look-alike keys, NaN, huge numbers, deep
  nesting, lone surrogates, invalid UTF-8), and batches;
- members other than jsonrpc, id, method, params, result and error; `jsonrpc` not "2.0";
- `method` with `result` or `error`; `result` with `error`; a response without an id;
- ids that are not a string or an integer within +-(2^53 - 1); a null id, except on an error;
- an error without an integer code and a string message;
- a look-alike (e.g. "Name", "Tools") of a member the guard reads, even alone: in params
  (name, uri, arguments, _meta) and in a result (the lists and capabilities it filters).
A server's bad line is dropped and logged (at a bounded rate), never raised.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from stockade.logs import get_logger
from stockade.wire import strict_json
from stockade.wire.lines import HEAD_BYTES, OversizedLine

# The codes and id helpers live in the light `wire.rpc` (the bridge uses them); re-exported.
from stockade.wire.rpc import (
    AUDIT_UNAVAILABLE as AUDIT_UNAVAILABLE,
)
from stockade.wire.rpc import (
    DAEMON_GONE as DAEMON_GONE,
)
from stockade.wire.rpc import (
    HEADER_MISMATCH as HEADER_MISMATCH,
)
from stockade.wire.rpc import (
    INVALID_REQUEST as INVALID_REQUEST,
)
from stockade.wire.rpc import (
    MAX_ID as MAX_ID,
)
from stockade.wire.rpc import (
    MESSAGE_TOO_LARGE as MESSAGE_TOO_LARGE,
)
from stockade.wire.rpc import (
    METHOD_NOT_FOUND as METHOD_NOT_FOUND,
)
from stockade.wire.rpc import (
    PARSE_ERROR as PARSE_ERROR,
)
from stockade.wire.rpc import (
    POLICY_DENIED as POLICY_DENIED,
)
from stockade.wire.rpc import (
    RATE_LIMITED as RATE_LIMITED,
)
from stockade.wire.rpc import (
    REQUEST_TIMEOUT as REQUEST_TIMEOUT,
)
from stockade.wire.rpc import (
    SECRET_WITHHELD as SECRET_WITHHELD,
)
from stockade.wire.rpc import (
    SERVER_EXITED as SERVER_EXITED,
)
from stockade.wire.rpc import (
    SERVER_UNAVAILABLE as SERVER_UNAVAILABLE,
)
from stockade.wire.rpc import (
    error_response as error_response,
)
from stockade.wire.rpc import (
    id_from_head as id_from_head,
)
from stockade.wire.rpc import (
    id_key as id_key,
)
from stockade.wire.rpc import (
    valid_id as valid_id,
)
from stockade.wire.strict_json import StrictJSONError

log = get_logger("stockade.relay")


Redact = Callable[[bytes], bytes]  # granted secrets replaced (an instance's redaction)


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
    raw: bytes  # what is forwarded: the canonical serialisation of `body` (one line)
    kind: Kind
    id: Any  # JSON value of "id" (None for notifications)
    method: str | None
    params: dict[str, Any] | None
    body: dict[str, Any]

    @property
    def id_key(self) -> str:
        """A hashable key for the id that keeps 1 and "1" apart."""
        return id_key(self.id)


ENVELOPE = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
# Members the guard reads, in params and in results (list answers, capabilities): a look-alike
# spelling (case, invisible characters) that another parser could take for one of them is
# refused, even alone, or the guard would decide on (or filter) something else than is read.
POLICY_PARAMS = frozenset({"name", "uri", "arguments", "_meta"})
POLICY_RESULTS = frozenset({"tools", "prompts", "resources", "resourceTemplates", "capabilities"})


def too_large(size: int, max_bytes: int, head: bytes) -> InvalidMessage:
    return InvalidMessage(
        MESSAGE_TOO_LARGE,
        f"message of {size} bytes is over the {max_bytes}-byte limit",
        id_from_head(head),
    )


def parse(raw: bytes, max_bytes: int) -> Message:
    """Check one message. Raises `InvalidMessage` (only) with the code to answer."""
    if len(raw) > max_bytes:
        raise too_large(len(raw), max_bytes, raw[:HEAD_BYTES])
    try:
        body = strict_json.loads(raw)
    except StrictJSONError as exc:
        raise InvalidMessage(exc.code, exc.reason, _readable_id(raw)) from None
    kind = _envelope(body)
    try:
        canonical = strict_json.dumps(body)
    except StrictJSONError as exc:  # not reached: what loads returns always serialises
        raise InvalidMessage(INVALID_REQUEST, exc.reason, body.get("id")) from None
    params = body.get("params")
    return Message(
        raw=canonical,
        kind=kind,
        id=body.get("id"),
        method=body.get("method"),
        params=params if isinstance(params, dict) else None,
        body=body,
    )


def encode(body: dict[str, Any]) -> bytes:
    """A message the relay itself builds or rewrites, in the one canonical serialisation."""
    return strict_json.dumps(body)


def _envelope(body: Any) -> Kind:
    """The kind of a parsed message, once its envelope is checked."""
    if isinstance(body, list):
        raise InvalidMessage(INVALID_REQUEST, "JSON-RPC batches are not supported")
    if not isinstance(body, dict):
        raise InvalidMessage(INVALID_REQUEST, "a JSON-RPC message is a JSON object")
    request_id = body.get("id")
    readable = request_id if valid_id(request_id) else None
    unknown = set(body) - ENVELOPE
    if unknown:
        shown = ", ".join(json.dumps(k[:40]) for k in sorted(unknown)[:5])
        raise InvalidMessage(
            INVALID_REQUEST,
            f"unknown member(s) {shown}: a JSON-RPC message has only "
            "jsonrpc, id, method, params, result and error",
            readable,
        )
    if body.get("jsonrpc") != "2.0":
        raise InvalidMessage(
            INVALID_REQUEST, 'not a JSON-RPC 2.0 message (need "jsonrpc": "2.0")', readable
        )
    if request_id is not None and not valid_id(request_id):
        raise InvalidMessage(
            INVALID_REQUEST, f"id must be a string or an integer within +-{MAX_ID}"
        )
    if "method" in body:
        return _call_kind(body, readable)
    return _response_kind(body, readable)


def _call_kind(body: dict[str, Any], request_id: Any) -> Kind:
    """A request or a notification; refused when it also looks like a response."""
    method = body["method"]
    if "result" in body or "error" in body:
        raise InvalidMessage(
            INVALID_REQUEST,
            "a message with a method cannot carry result or error (is it a request or a response?)",
            request_id,
        )
    if not isinstance(method, str) or not method:
        raise InvalidMessage(INVALID_REQUEST, "method must be a non-empty string", request_id)
    params = body.get("params")
    if "params" in body and not isinstance(params, (dict, list)):
        raise InvalidMessage(INVALID_REQUEST, "params must be an object or an array", request_id)
    if isinstance(params, dict):
        _refuse_look_alike("params", params, POLICY_PARAMS, request_id)
    if "id" not in body:
        return Kind.NOTIFICATION
    if body["id"] is None:
        raise InvalidMessage(INVALID_REQUEST, "a request id must not be null")
    return Kind.REQUEST


def _response_kind(body: dict[str, Any], request_id: Any) -> Kind:
    """A response: exactly one of result and error, an id, no params."""
    has_result, has_error = "result" in body, "error" in body
    if not has_result and not has_error:
        raise InvalidMessage(
            INVALID_REQUEST, "neither a request, a notification nor a response", request_id
        )
    if has_result and has_error:
        raise InvalidMessage(
            INVALID_REQUEST, "a response carries result or error, not both", request_id
        )
    if "params" in body:
        raise InvalidMessage(INVALID_REQUEST, "a response carries no params", request_id)
    result = body.get("result")
    if isinstance(result, dict):
        _refuse_look_alike("result", result, POLICY_RESULTS, request_id)
        capabilities = result.get("capabilities")
        if isinstance(capabilities, dict):
            _refuse_look_alike("capabilities", capabilities, POLICY_RESULTS, request_id)
    if "id" not in body:
        raise InvalidMessage(INVALID_REQUEST, "a response needs the id it answers")
    if has_result and body["id"] is None:
        raise InvalidMessage(INVALID_REQUEST, "a result must answer a non-null id")
    error = body.get("error")
    if has_error and not (
        isinstance(error, dict)
        and isinstance(error.get("code"), int)
        and not isinstance(error.get("code"), bool)
        and isinstance(error.get("message"), str)
    ):
        raise InvalidMessage(
            INVALID_REQUEST,
            "error must be an object with an integer code and a string message",
            request_id,
        )
    return Kind.RESPONSE


# The folded forms of the members the guard reads, folded once.
_FOLDED = {
    names: {strict_json.fold_key(name): name for name in names}
    for names in (POLICY_PARAMS, POLICY_RESULTS)
}


def _refuse_look_alike(
    where: str, members: dict[str, Any], exact: frozenset[str], request_id: Any
) -> None:
    folded = _FOLDED[exact]
    for key in members:
        if key not in exact and (meant := folded.get(strict_json.fold_key(key))) is not None:
            raise InvalidMessage(
                INVALID_REQUEST,
                f"{where} member {json.dumps(key[:40])} looks like {json.dumps(meant)} to some "
                "parsers; spell it exactly",
                request_id,
            )


LENIENT_ID_BYTES = 64 * 1024


def _readable_id(raw: bytes) -> Any:
    """The id of a message the strict parser refused, when a lenient reading is unambiguous.

    Only to address the error to the right request: a top-level "id" member that is the only
    key folding to "id", and a valid id. Otherwise None (JSON-RPC: null when unknown).
    A large message is not parsed a second time: its id is read from its head.
    """
    if len(raw) > LENIENT_ID_BYTES:
        return id_from_head(raw[:HEAD_BYTES])
    try:
        top = json.loads(
            raw.decode("utf-8", errors="replace"),
            object_pairs_hook=lambda pairs: ("object", pairs),
            parse_int=lambda s: int(s) if len(s) <= 20 else None,
            parse_constant=lambda s: None,
        )
    except (ValueError, RecursionError):
        return None
    if not (isinstance(top, tuple) and top[0] == "object"):
        return None
    ids = [(key, value) for key, value in top[1] if strict_json.fold_key(key) == "id"]
    if len(ids) != 1 or ids[0][0] != "id" or not valid_id(ids[0][1]):
        return None
    request_id = ids[0][1]
    if isinstance(request_id, str):
        try:
            request_id.encode("utf-8")
        except UnicodeEncodeError:
            return None
    return request_id


def answer_too_large(request_id: Any, size: int, max_bytes: int) -> bytes:
    """The error a request gets when its answer is over the limit (the answer is dropped)."""
    return error_response(
        request_id,
        MESSAGE_TOO_LARGE,
        f"the server's answer of {size} bytes is over the {max_bytes}-byte limit; dropped",
    )


def timed_out(request_id: Any, server: str, timeout: float) -> bytes:
    return error_response(
        request_id,
        REQUEST_TIMEOUT,
        f"no answer from server {server!r} within {timeout:g} s (request_timeout_seconds)",
    )


def cancel(request_id: Any, reason: str) -> bytes:
    """`notifications/cancelled` for a request the server need not finish any more."""
    params = {"requestId": request_id, "reason": reason}
    return encode({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})


def log_unowed_answer(server: str, request_id: Any) -> None:
    """A server answer to no pending request: logged, at a bounded rate (servers repeat)."""
    _dropped.warn(
        "dropped a server answer to no pending request", server=server, id=str(request_id)[:64]
    )


class _DropLog:
    """Warnings about dropped server lines, at most `burst` per `window` seconds.

    A server flooding stdout with garbage must not flood the daemon's log: past the burst,
    lines are counted and the count is said with the next warning.
    """

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self._burst = burst
        self._window = window
        self._began = -window
        self._said = 0
        self._quiet = 0

    def warn(self, message: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._began >= self._window:
            self._began, self._said = now, 0
        if self._said >= self._burst:
            self._quiet += 1
            return
        self._said += 1
        if self._quiet:
            fields["not_logged_before"] = self._quiet
            self._quiet = 0
        log.warning(message, **fields)


_dropped = _DropLog()


# A message this large is parsed in a worker thread: a crafted one (deep nesting, many
# distinct keys) can take a second or more of CPU, and the event loop serves every session.
OFF_LOOP_BYTES = 64 * 1024


async def parse_off_loop(raw: bytes | Message, max_bytes: int) -> Message:
    """`parse`, in a worker thread for a large message (raises InvalidMessage). A Message
    is one `parse` made already, with the same limit (the HTTP front reads each POST to
    route it): taken as it is, not parsed twice."""
    if isinstance(raw, Message):
        return raw
    if len(raw) <= OFF_LOOP_BYTES:
        return parse(raw, max_bytes)
    return await asyncio.to_thread(parse, raw, max_bytes)


async def parse_server_line_off_loop(
    line: bytes | OversizedLine, max_bytes: int, redact: Redact | None = None
) -> Message | None:
    """`parse_server_line`, in a worker thread for a large line."""
    if isinstance(line, OversizedLine) or len(line) <= OFF_LOOP_BYTES:
        return parse_server_line(line, max_bytes, redact)
    return await asyncio.to_thread(parse_server_line, line, max_bytes, redact)


def parse_server_line(
    line: bytes | OversizedLine, max_bytes: int, redact: Redact | None = None
) -> Message | None:
    """A server's stdout line as a message, or None (logged) when it cannot be forwarded.

    A server that writes something other than strict JSON-RPC to stdout (a stray print, a
    line over the limit, a message another parser could read differently) breaks no session:
    the line is dropped and said in the daemon's log; where its id can be read, its request
    gets an error now (a refused answer). Nothing here raises.

    `redact` (an instance with granted secrets) runs on the canonical bytes, which are what
    the host gets: the line itself was redacted as it arrived, but re-serialising can show
    a value the line hid (a number written `8.4736291e7` becomes `84736291.0`).
    """
    if isinstance(line, OversizedLine):
        _dropped.warn("server sent a message over the limit; dropped", bytes=line.seen)
        return None
    try:
        message = parse(line, max_bytes)
    except InvalidMessage as exc:
        _dropped.warn(
            "server wrote a line that is not strict JSON-RPC; dropped",
            code=exc.code,
            reason=str(exc),
        )
        if exc.request_id is None:
            return None
        # An answer the relay refuses fails its request at once rather than at the timeout
        # (a server that lies about the id can only fail a request early: it could answer
        # it with an error anyway).
        refused = f"the server's answer was refused: {exc}"
        return parse(error_response(exc.request_id, exc.code, refused), max_bytes)
    return message if redact is None else _redacted(message, redact, max_bytes)


def _redacted(message: Message, redact: Redact, max_bytes: int) -> Message | None:
    """The message with its canonical bytes redacted; where the redaction leaves no JSON (a
    secret that was a number), its request fails and anything else is dropped: withheld."""
    cleaned = redact(message.raw)
    if cleaned == message.raw:
        return message
    try:
        return parse(cleaned, max_bytes)
    except InvalidMessage:
        pass
    if message.kind is Kind.RESPONSE:
        return parse(
            error_response(
                message.id,
                SECRET_WITHHELD,
                "the server's answer held a granted secret that cannot be redacted; withheld",
            ),
            max_bytes,
        )
    _dropped.warn("server message held a granted secret that cannot be redacted; dropped")
    return None
