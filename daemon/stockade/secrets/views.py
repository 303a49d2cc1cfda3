"""Decoded readings of a server's output, each with a map back to the original bytes.

The redactor looks for a secret in the text as it is and in these readings of it:
- `json_unescaped`: JSON string escapes decoded (`\\"`, `\\/`, `\\n`, `\\uXXXX` and surrogate
  pairs, Go's `\\u0026`/`\\u003c`/`\\u003e`), in any mix with plain characters;
- `percent_decoded`: URL `%XX` decoded (either hex case), optionally `+` read as a space;
- `string_groups`: the decoded contents of the JSON string values that follow the same key
  (`"text"` in each item of an MCP `content` array, or the items of a string array),
  joined, so a value split across adjacent fragments is found.

`json_readings` is the quick check: the same readings of a JSON document, by the C parser
and without a map, so a message that holds no secret (the usual case) costs little.

A match in a reading maps back to original spans (`View.origin`): an escape is replaced
whole, never cut, and a match across string fragments maps to one span per fragment, so
the quotes and commas between them are kept and JSON stays JSON.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

Span = tuple[int, int]

_JSON_ESCAPE = re.compile(
    rb"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"  # a surrogate pair
    rb"|\\u([0-9a-fA-F]{4})"
    rb'|\\(["\\/bfnrt])'
)
_SIMPLE_ESCAPES = {b'"': b'"', b"\\": b"\\", b"/": b"/", b"b": b"\b", b"f": b"\f"}
_SIMPLE_ESCAPES |= {b"n": b"\n", b"r": b"\r", b"t": b"\t"}
_PERCENT = re.compile(rb"%([0-9a-fA-F]{2})")
_PERCENT_PLUS = re.compile(rb"%([0-9a-fA-F]{2})|\+")
# A JSON string token, and whether a colon follows it (then it is a key).
_STRING = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)"(\s*:)?', re.DOTALL)


@dataclass
class View:
    """`text` decoded from a parent (the original when `parent` is None).

    `pieces[i]` = (start in `text`, start and end in the parent, literal?): a literal piece
    maps byte for byte, a decoded escape maps to its whole source.
    """

    text: bytes
    pieces: list[tuple[int, int, int, bool]] = field(default_factory=list)
    parent: View | None = None
    _starts: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._starts = [piece[0] for piece in self.pieces]

    def origin(self, start: int, end: int) -> list[Span]:
        """The original spans that the bytes `text[start:end]` came from."""
        if not self.pieces:  # the original itself
            return [(start, end)]
        spans: list[Span] = []
        index = max(bisect.bisect_right(self._starts, start) - 1, 0)
        for text_start, source_start, source_end, literal in self.pieces[index:]:
            if text_start >= end:
                break
            if literal:
                length = source_end - source_start
                first = max(start - text_start, 0)
                last = min(end - text_start, length)
                if first >= last:
                    continue
                span = (source_start + first, source_start + last)
            else:
                span = (source_start, source_end)
            if spans and spans[-1][1] == span[0]:
                spans[-1] = (spans[-1][0], span[1])
            else:
                spans.append(span)
        if self.parent is None:
            return spans
        return [outer for s, e in spans for outer in self.parent.origin(s, e)]


class _Builder:
    """Accumulates a view's text and pieces from literal runs and decoded escapes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.pieces: list[tuple[int, int, int, bool]] = []
        self.length = 0

    def literal(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._add(data[start:end], start, end, literal=True)

    def decoded(self, value: bytes, start: int, end: int) -> None:
        self._add(value, start, end, literal=False)

    def _add(self, value: bytes, start: int, end: int, *, literal: bool) -> None:
        self.pieces.append((self.length, start, end, literal))
        self.chunks.append(value)
        self.length += len(value)

    def view(self, parent: View | None) -> View:
        return View(b"".join(self.chunks), self.pieces, parent)


def _decode(
    data: bytes,
    pattern: re.Pattern[bytes],
    decode: Callable[[re.Match[bytes]], bytes],
    offset: int = 0,
) -> _Builder:
    builder = _Builder()
    position = 0
    for match in pattern.finditer(data):
        builder.literal(data, position, match.start())
        builder.decoded(decode(match), match.start(), match.end())
        position = match.end()
    builder.literal(data, position, len(data))
    if offset:
        builder.pieces = [(t, s + offset, e + offset, lit) for t, s, e, lit in builder.pieces]
    return builder


def _json_escape(match: re.Match[bytes]) -> bytes:
    high, low, unit, simple = match.groups()
    if high is not None:
        code = 0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00)
        return chr(code).encode()
    if unit is not None:
        code = int(unit, 16)
        return "\ufffd".encode() if 0xD800 <= code <= 0xDFFF else chr(code).encode()
    return _SIMPLE_ESCAPES[simple]


def _percent(match: re.Match[bytes]) -> bytes:
    return b" " if match.group(0) == b"+" else bytes([int(match.group(1), 16)])


def json_unescaped(view: View) -> View:
    return _decode(view.text, _JSON_ESCAPE, _json_escape).view(_parent(view))


def percent_decoded(view: View, *, plus: bool) -> View:
    pattern = _PERCENT_PLUS if plus else _PERCENT
    return _decode(view.text, pattern, _percent).view(_parent(view))


def _parent(view: View) -> View | None:
    """The original has no pieces: a view of it maps straight to original offsets."""
    return view if view.pieces or view.parent is not None else None


def string_groups(data: bytes) -> list[View]:
    """Per key, the joined decoded contents of its string values (groups of two or more)."""
    groups: dict[bytes | None, list[tuple[int, int]]] = {}
    key: bytes | None = None
    for match in _STRING.finditer(data):
        if match.group(2) is not None:
            key = match.group(1)
        else:
            groups.setdefault(key, []).append(match.span(1))
    views = []
    for spans in groups.values():
        if len(spans) < 2:
            continue
        builder = _Builder()
        for start, end in spans:
            part = _decode(data[start:end], _JSON_ESCAPE, _json_escape, offset=start)
            builder.pieces += [(builder.length + t, s, e, lit) for t, s, e, lit in part.pieces]
            builder.chunks += part.chunks
            builder.length += part.length
        views.append(builder.view(None))
    return views


class _Pairs(list[tuple[str, object]]):
    """A JSON object as its (key, value) pairs in text order."""


@dataclass
class _Key:
    text: str


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def json_readings(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """Every string of JSON `data`, decoded, and per key its values joined (like
    `string_groups`); None when `data` is not JSON."""
    try:
        document = json.loads(data, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return None
    strings: list[bytes] = []
    groups: dict[str | None, list[bytes]] = {}
    key: str | None = None
    stack: list[object] = [document]
    while stack:  # pre-order, so `key` is the last key before each value in text order
        node = stack.pop()
        if isinstance(node, _Key):
            key = node.text
            strings.append(_utf8(key))
        elif isinstance(node, str):
            strings.append(_utf8(node))
            groups.setdefault(key, []).append(strings[-1])
        elif isinstance(node, _Pairs):
            for name, value in reversed(node):
                stack += [value, _Key(name)]
        elif isinstance(node, list):
            stack.extend(reversed(node))
    return strings, [b"".join(parts) for parts in groups.values() if len(parts) > 1]
