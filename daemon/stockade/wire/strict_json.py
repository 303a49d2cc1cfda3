"""Strict JSON in, canonical JSON out: what Stockade checks is exactly what it forwards.

Parsers disagree on inputs at the edge of JSON: duplicate keys (first or last wins), keys that
differ only in case (Go's `encoding/json` matches them case-insensitively, last wins), keys
with a NUL or other control character appended (go-sdk 1.3.1-1.4.0 folds `"name\\u0000"` into
`"name"`), NaN, huge numbers, deep nesting, lone surrogates. A relay that decides on its own
reading and forwards the original bytes lets a server execute what the policy refused. So:

- `loads` refuses every such input with `StrictJSONError` (and never raises anything else,
  whatever the bytes): invalid UTF-8, syntax errors, `NaN`/`Infinity`, lone surrogates (also
  escaped ones) are `PARSE_ERROR` (-32700); duplicate keys, keys holding a control character
  (an escaped NUL...), two keys in one object that are equal under `fold_key`, nesting
  deeper than `MAX_DEPTH`, more than `MAX_VALUES` values, integers of more than
  `MAX_INT_DIGITS` digits, number literals
  over `MAX_NUMBER_CHARS` characters and numbers that overflow a double are
  `INVALID_REQUEST` (-32600);
- `dumps` is the one canonical serialisation: compact, UTF-8 (non-ASCII kept as is, control
  characters escaped), object members in the order they arrived. The same value always gives
  the same bytes, and they never contain a raw newline (one message per line on stdio).

The parser is the C scanner of the standard library with hooks (measured in
`bench/canonical.py`): objects go through a duplicate and fold check, integers and floats
through a size and finiteness check, and a bracket and comma count before parsing (a full
scan only when a message has more brackets than `MAX_DEPTH` or more than `MAX_VALUES`
commas and brackets) keeps the recursive scanner far from Python's recursion limit and the
per-value work bounded. Cost: a few µs on a typical message; on large ones about 1 µs per
object plus 2-3x a plain `json.loads` for the scan and the serialiser.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

PARSE_ERROR = -32700  # JSON-RPC: the bytes are not well-formed JSON over valid Unicode
INVALID_REQUEST = -32600  # JSON-RPC: well-formed, but Stockade does not take it

MAX_DEPTH = 64  # nested arrays/objects; the top-level object is depth 1
MAX_INT_DIGITS = 20  # an integer literal longer than this is refused (2^64 has 20 digits)
MAX_NUMBER_CHARS = 100  # any number literal longer than this is refused
# Values (objects, arrays, members, items) in one message. Parsing and serialising cost CPU
# per value, much of it in C code that holds the GIL (the daemon's one event loop waits):
# 100,000 values cost about 50 ms; a crafted 4 MiB message can hold over a million. Large
# honest messages are long strings (a file, an image), which cost little per byte.
MAX_VALUES = 100_000

_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
# Bytes other than quotes, brackets and commas; a string once only those are left.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{},')
_INNERMOST = re.compile(rb"\[\]|\{\}")
_STRING = re.compile(rb'"[^"]*+"?')  # unterminated: to the end (the decoder stops there)
_ASCII_CONTROLS = dict.fromkeys([*range(0x20), 0x7F])
# Key sets already found free of fold collisions (most objects repeat a few shapes). Bounded
# in entries and in the characters of each entry, since callers choose the keys.
CLEAN_KEYS_LIMIT = 1024
CLEAN_KEYS_CHARS = 256
_CLEAN_KEYS: dict[tuple[str, ...], None] = {}


class StrictJSONError(ValueError):
    """Input refused; `code` is the JSON-RPC error code to answer with, str() says why."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def fold_key(key: str) -> str:
    """The form under which two keys count as the same key to some parser.

    ASCII: lower case, control characters removed. Otherwise, with control and format
    characters removed: upper case, then the Unicode compatibility caseless form (Unicode
    3.13, D146), without U+0307 COMBINING DOT ABOVE. That covers Go's simple folding
    (U+212A KELVIN SIGN ~ k, U+017F LONG S ~ s, U+212B ANGSTROM SIGN ~ å), per-character
    upper/lower comparisons such as Java's equalsIgnoreCase (U+0131 dotless i ~ i, U+0130
    dotted I ~ i), and full-width or ligature look-alikes.
    """
    if key.isascii():
        if key.isprintable():
            return key.lower()
        return key.translate(_ASCII_CONTROLS).lower()
    kept = "".join(c for c in key if unicodedata.category(c) not in ("Cc", "Cf"))
    upper = unicodedata.normalize("NFD", kept).upper()
    caseless = unicodedata.normalize("NFKD", upper.casefold()).casefold()
    return unicodedata.normalize("NFKD", caseless).replace("\u0307", "")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build one object; refuse duplicate keys, keys equal under `fold_key`, control keys."""
    value = dict(pairs)
    if len(pairs) > 1:
        if len(value) != len(pairs):
            raise StrictJSONError(
                INVALID_REQUEST, f"duplicate key {_shown(_twice(pairs))} in an object"
            )
        keys = tuple(value)
        if keys in _CLEAN_KEYS:
            return value
        joined = "".join(keys)
        plain = joined.isascii() and joined.isprintable()  # then lower() is the fold
        if not plain or len(set(map(str.lower, keys))) != len(keys):
            _refuse_folded(keys)
        if len(joined) <= CLEAN_KEYS_CHARS:
            if len(_CLEAN_KEYS) >= CLEAN_KEYS_LIMIT:
                _CLEAN_KEYS.clear()
            _CLEAN_KEYS[keys] = None
    elif pairs and not pairs[0][0].isprintable():
        _refuse_folded((pairs[0][0],))
    return value


def _refuse_folded(keys: tuple[str, ...]) -> None:
    """Raise when a key holds a control character, or two keys have the same `fold_key`."""
    folded: dict[str, str] = {}
    for key in keys:
        if any(unicodedata.category(c) == "Cc" for c in key):
            raise StrictJSONError(
                INVALID_REQUEST,
                f"key {_shown(key)} holds a control character; some parsers drop it",
            )
        other = folded.setdefault(fold_key(key), key)
        if other is not key:
            raise StrictJSONError(
                INVALID_REQUEST,
                f"keys {_shown(other)} and {_shown(key)} in one object differ only in case "
                "or by invisible characters; some parsers take them for the same key",
            )


def _twice(pairs: list[tuple[str, Any]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""


def _shown(key: str) -> str:
    """A key for an error message: escaped, bounded (keys are caller-chosen)."""
    text = json.dumps(key[:40], ensure_ascii=True)
    return text if len(key) <= 40 else text[:-1] + '..."'


def _int(literal: str) -> int:
    if len(literal) > MAX_INT_DIGITS + literal.startswith("-"):
        raise StrictJSONError(
            INVALID_REQUEST, f"an integer of {len(literal)} characters (at most {MAX_INT_DIGITS})"
        )
    return int(literal)


def _float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise StrictJSONError(
            INVALID_REQUEST,
            f"a number literal of {len(literal)} characters (at most {MAX_NUMBER_CHARS})",
        )
    value = float(literal)
    if not math.isfinite(value):
        raise StrictJSONError(INVALID_REQUEST, f"number {literal[:30]} is out of range")
    return value


def _constant(literal: str) -> Any:
    raise StrictJSONError(PARSE_ERROR, f"{literal} is not JSON")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object, parse_int=_int, parse_float=_float, parse_constant=_constant
)
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _check_structure(raw: bytes) -> None:
    """Refuse nesting over MAX_DEPTH (before the recursive decoder sees it) and more than
    MAX_VALUES values (before any per-value work is done).

    Works on the UTF-8 bytes with C-speed passes: drop escaped backslashes and quotes, keep
    only quotes, brackets and commas, drop string contents, count, then peel innermost pairs
    level by level. Where the input stops being JSON the counts may be off, but the decoder
    stops there too.
    """
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets <= MAX_DEPTH and brackets + raw.count(b",") <= MAX_VALUES:
        return  # cannot be deeper or larger, even counting what is inside strings
    if b"\\" in raw:  # escaped backslashes first, then escaped quotes: neither ends a string
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = raw.translate(None, _NOT_STRUCTURE)
    shape = shape.replace(b'""', b"")  # empty strings (or two strings merged: same brackets)
    if b'"' in shape:
        shape = _STRING.sub(b"", shape)
    values = shape.count(b",") + shape.count(b"[") + shape.count(b"{") + 1
    if values > MAX_VALUES:
        raise StrictJSONError(
            INVALID_REQUEST, f"a message of about {values} values (at most {MAX_VALUES})"
        )
    shape = shape.replace(b",", b"")
    for _ in range(MAX_DEPTH):  # each pass removes the innermost level of every branch
        if not shape:
            return
        # One regex pass removes exactly one level: two replace() calls in a row could peel
        # two where [ and { alternate, letting 128 levels through.
        peeled = _INNERMOST.sub(b"", shape)
        if peeled == shape:
            raise StrictJSONError(PARSE_ERROR, "invalid JSON: unbalanced brackets")
        shape = peeled
    if shape:
        raise StrictJSONError(INVALID_REQUEST, f"nesting deeper than {MAX_DEPTH} levels")


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates (only reachable through \\u escapes)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: list[str] = [item]
        elif isinstance(item, dict):
            strings = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise StrictJSONError(
                    PARSE_ERROR, "a string holds a lone surrogate (not Unicode text)"
                ) from None


def loads(data: bytes | str) -> Any:
    """Parse one JSON text strictly; raises only StrictJSONError."""
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:
            raise StrictJSONError(PARSE_ERROR, "text holds a lone surrogate") from None
        text = data
    else:
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StrictJSONError(PARSE_ERROR, f"not valid UTF-8 (at byte {exc.start})") from None
    _check_structure(raw)
    try:
        value = _DECODER.decode(text)
    except StrictJSONError:
        raise
    except json.JSONDecodeError as exc:
        raise StrictJSONError(PARSE_ERROR, f"invalid JSON: {exc.msg} at char {exc.pos}") from None
    except (ValueError, RecursionError, OverflowError) as exc:  # not reached; fail closed
        raise StrictJSONError(PARSE_ERROR, f"invalid JSON ({type(exc).__name__})") from None
    if _ESCAPED_SURROGATE.search(text) is not None:
        _check_strings(value)
    return value


def dumps(value: Any) -> bytes:
    """The canonical bytes of a value (as `loads` returns, or built from such values)."""
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise StrictJSONError(INVALID_REQUEST, f"cannot serialise: {exc}") from None


def canonical(data: bytes | str) -> tuple[Any, bytes]:
    """Parse strictly and serialise again: (the value, the bytes to forward)."""
    value = loads(data)
    return value, dumps(value)
