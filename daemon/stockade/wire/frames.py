"""The framed relay stream: what `stockade connect` and the daemon say over TLS (I/O-free).

One MCP session per TLS connection, as frames of `4-byte big-endian payload length, 1 type
byte, payload`. The same conversation as `Relay.Connect` (relay.proto), without gRPC, so
that the bridge a host launches per session imports only the standard library:

  host -> daemon   OPEN (JSON: server, options)   first, once
                   MESSAGE (one JSON-RPC message)  after `opened`
                   END (empty)                     no more messages: drain, then close
  daemon -> host   OPENED (JSON: session_id, instance, max_message_bytes)
                   MESSAGE (one JSON-RPC message)
                   CLOSED (JSON: reason, exit_code)   the server ended
                   ERROR (JSON: code, reason)          refused or broken; the stream ends

A frame longer than the reader's limit is refused from its header, before its payload is
read, so a peer can never make the other side hold more than one message's worth of bytes.
Encoding, checking and `FrameBuffer` are I/O-free (the bridge, on `selectors`); `read_frame`
reads one from an asyncio stream (the daemon). asyncio is imported only there: the bridge
must not pay for it.
"""

from __future__ import annotations

import json
import struct

TYPE_CHECKING = False  # not typing's: the bridge does not import typing
if TYPE_CHECKING:
    import asyncio
    from typing import Any

HEADER = struct.Struct(">IB")  # payload length, frame type

OPEN = 0x01
MESSAGE = 0x02
END = 0x03
OPENED = 0x81
CLOSED = 0x82
ERROR = 0x83
NAMES = {
    OPEN: "open",
    MESSAGE: "message",
    END: "end",
    OPENED: "opened",
    CLOSED: "closed",
    ERROR: "error",
}

# Frames other than MESSAGE carry a small JSON object: this is their limit.
CONTROL_LIMIT = 64 * 1024

# The `code` of an ERROR frame: the daemon's refusal kinds (as api/relay.py's trailing
# metadata) and the stream's own.
UNKNOWN_SERVER = "unknown_server"
DENIED = "denied"
QUOTA = "quota"
UNAVAILABLE = "unavailable"
REVOKED = "revoked"
UNAUTHENTICATED = "unauthenticated"
PERMISSION_DENIED = "permission_denied"
BAD_FRAME = "bad_frame"
TOO_LARGE = "too_large"
TIMEOUT = "timeout"


class FrameError(ValueError):
    """A frame that breaks the protocol; `code` is the ERROR code to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Frame:
    """One frame: its type and payload (a plain class: the bridge does not import dataclasses)."""

    __slots__ = ("kind", "payload")

    def __init__(self, kind: int, payload: bytes) -> None:
        self.kind = kind
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (other.kind, other.payload) == (self.kind, self.payload)

    def __hash__(self) -> int:
        return hash((self.kind, self.payload))

    def __repr__(self) -> str:
        return f"Frame({self.name}, {self.payload[:64]!r})"

    @property
    def name(self) -> str:
        return NAMES.get(self.kind, f"0x{self.kind:02x}")

    def fields(self) -> dict[str, Any]:
        """The JSON object of a control frame; `FrameError` if it is not one."""
        try:
            body = json.loads(self.payload)
        except (ValueError, RecursionError):  # deep nesting: C recursion, refused the same
            body = None
        if not isinstance(body, dict):
            raise FrameError(BAD_FRAME, f"the {self.name} frame is not a JSON object")
        return body


def encode(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def control(kind: int, **fields: Any) -> bytes:
    return encode(kind, json.dumps(fields, separators=(",", ":")).encode())


def check_header(header: bytes, max_message_bytes: int) -> tuple[int, int]:
    """(type, payload length) of a header; `FrameError` for an unknown type or a length
    over the limit (MESSAGE: `max_message_bytes`; others: `CONTROL_LIMIT`)."""
    length, kind = HEADER.unpack(header)
    if kind not in NAMES:
        raise FrameError(BAD_FRAME, f"unknown frame type 0x{kind:02x}")
    limit = max_message_bytes if kind == MESSAGE else CONTROL_LIMIT
    if length > limit:
        raise FrameError(
            TOO_LARGE, f"a {NAMES[kind]} frame of {length} bytes is over the {limit}-byte limit"
        )
    return kind, length


class FrameBuffer:
    """Frames out of a byte stream as it arrives, bounded by the limit (I/O-free)."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._data = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """The frames complete now; `FrameError` as soon as a header is refused."""
        self._data += data
        found = []
        while len(self._data) >= HEADER.size:
            kind, length = check_header(bytes(self._data[: HEADER.size]), self.max_message_bytes)
            end = HEADER.size + length
            if len(self._data) < end:
                break
            found.append(Frame(kind, bytes(self._data[HEADER.size : end])))
            del self._data[:end]
        return found

    @property
    def partial(self) -> bool:
        """Whether a frame has begun and not ended (the stream may not end here)."""
        return bool(self._data)


async def read_frame(reader: asyncio.StreamReader, max_message_bytes: int) -> Frame | None:
    """The next frame, or None at a clean end of the stream (between frames).

    `FrameError` for a frame over the limit (refused before its payload is read) or cut off
    by the end of the stream.
    """
    import asyncio  # noqa: PLC0415 - loaded already wherever this runs; not in the bridge

    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError(BAD_FRAME, "the stream ended inside a frame header") from None
    kind, length = check_header(header, max_message_bytes)
    try:
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise FrameError(BAD_FRAME, f"the stream ended inside a {NAMES[kind]} frame") from None
    return Frame(kind, payload)
