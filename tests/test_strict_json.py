"""wire.strict_json: limits at their edges, key folding, and a fuzz run that only ever refuses.

The fuzz run is deterministic (a seeded generator): mutations of the hostile corpus and of
valid messages, plus random bytes. On any input the parser either refuses with
StrictJSONError (never another exception), or returns a value that the standard parser reads
the same way, whose canonical bytes are a fixed point.
"""

from __future__ import annotations

import json
import random
import sys
import unicodedata
from pathlib import Path

import pytest

from stockade.relay import jsonrpc
from stockade.wire import strict_json
from stockade.wire.strict_json import (
    INVALID_REQUEST,
    MAX_DEPTH,
    MAX_INT_DIGITS,
    MAX_VALUES,
    PARSE_ERROR,
    StrictJSONError,
    fold_key,
)

ROOT = Path(__file__).resolve().parents[1]


def refused(data: bytes | str) -> StrictJSONError:
    with pytest.raises(StrictJSONError) as caught:
        strict_json.loads(data)
    return caught.value


def test_values_are_bounded_and_commas_in_strings_do_not_count() -> None:
    """A crafted message of many small values costs CPU per value, mostly in C code that
    holds the event loop: it is refused before any per-value work. Long strings are not."""
    many = b"[" + b",".join([b"{}"] * MAX_VALUES) + b"]"
    error = refused(many)
    assert error.code == INVALID_REQUEST
    assert f"at most {MAX_VALUES}" in error.reason
    fits = b"[" + b",".join([b"1"] * (MAX_VALUES - 10)) + b"]"
    assert len(strict_json.loads(fits)) == MAX_VALUES - 10
    text = b'{"text":"' + b"a, b, [c], {d}, " * MAX_VALUES + b'"}'  # a CSV file, say
    assert strict_json.loads(text)["text"].startswith("a, b")
    escaped = b'{"t":"\\\\", "u":"' + b',\\",' * MAX_VALUES + b'"}'  # escaped quotes
    assert len(strict_json.loads(escaped)["u"]) == 3 * MAX_VALUES


def test_depth_limit_is_exact_and_ignores_brackets_in_strings() -> None:
    assert strict_json.loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    assert refused(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)).code == INVALID_REQUEST
    mixed = b'{"a":' * (MAX_DEPTH - 1) + b"[]" + b"}" * (MAX_DEPTH - 1)
    assert strict_json.loads(mixed) is not None
    inside = b"[" * MAX_DEPTH + b'"[[[{{{\\"[[[\\\\"' + b"]" * MAX_DEPTH
    assert strict_json.loads(inside) is not None
    # a quote escaped inside a string does not end it: the brackets after it are text
    assert refused(b"[" * MAX_DEPTH + b'"\\"' + b"[" * 5 + b"]" * MAX_DEPTH).code == PARSE_ERROR
    assert refused(b"[" * 5000 + b"]" * 5000).code == INVALID_REQUEST


def test_integer_digits_are_bounded_and_never_hit_pythons_limit() -> None:
    assert strict_json.loads(b"9" * MAX_INT_DIGITS) == int("9" * MAX_INT_DIGITS)
    assert strict_json.loads(b"-" + b"9" * MAX_INT_DIGITS) == -int("9" * MAX_INT_DIGITS)
    assert refused(b"9" * (MAX_INT_DIGITS + 1)).code == INVALID_REQUEST
    too_long = b"1" * (sys.get_int_max_str_digits() + 1)
    assert type(refused(too_long)) is StrictJSONError
    assert refused(b"1" + b"0" * 400 + b".5").code == INVALID_REQUEST


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("key", "\u212aey"),  # KELVIN SIGN
        ("s", "\u017f"),  # LATIN SMALL LETTER LONG S
        ("\u00e5", "\u212b"),  # ANGSTROM SIGN
        ("stra\u00dfe", "STRASSE"),  # full case folding
        ("\u03c3", "\u03c2"),  # final sigma
        ("path", "\uff50\uff41\uff54\uff48"),  # full-width
        ("path", "pa\u200dth"),  # zero-width joiner
        ("name", "name\x00"),
        ("name", "NAME\x1f"),
        ("file", "\ufb01le"),  # ligature
        ("id", "\u0131d"),  # dotless i: its upper case is I (Java's equalsIgnoreCase)
        ("id", "\u0130d"),  # dotted I: its simple lower case is i
    ],
)
def test_look_alike_keys_fold_together(one: str, other: str) -> None:
    assert fold_key(one) == fold_key(other)
    text = json.dumps({one: 1, other: 2})
    assert refused(text).code == INVALID_REQUEST


def test_every_simple_case_mapping_folds_together() -> None:
    """Go's encoding/json folds by Unicode simple case orbits: cover every one-char mapping."""
    for point in range(sys.maxunicode + 1):
        char = chr(point)
        if unicodedata.category(char) in ("Cs", "Cn"):
            continue
        for mapped in (char.lower(), char.upper(), char.casefold()):
            if len(mapped) == 1 and mapped != char:
                assert fold_key(char) == fold_key(mapped), hex(point)


def test_distinct_keys_stay_distinct() -> None:
    value = strict_json.loads('{"path":1,"paths":2,"path_":3,"\u00e9":4,"e":5}')
    assert list(value) == ["path", "paths", "path_", "\u00e9", "e"]


def test_the_clean_key_cache_is_bounded_and_never_skips_a_check() -> None:
    for index in range(strict_json.CLEAN_KEYS_LIMIT * 2):
        strict_json.loads(f'{{"a{index}":1,"b":2}}')
    assert len(strict_json._CLEAN_KEYS) <= strict_json.CLEAN_KEYS_LIMIT
    assert strict_json.loads('{"a":1,"b":2}') == {"a": 1, "b": 2}
    assert refused('{"a":1,"b":2,"a":3}').code == INVALID_REQUEST
    assert refused('{"a":1,"b":2,"B":3}').code == INVALID_REQUEST
    long_keys = json.dumps({"k" * 300: 1, "K" * 300: 2})
    assert refused(long_keys).code == INVALID_REQUEST


def test_text_input_with_a_lone_surrogate_is_refused() -> None:
    assert refused('["\ud800"]').code == PARSE_ERROR
    assert strict_json.loads('["\\ud83d\\ude00"]') == ["\U0001f600"]


def test_canonical_bytes_are_compact_utf8_in_arrival_order() -> None:
    value, raw = strict_json.canonical(b'{ "b" : [1, 2.0, "\\u00e9\\u2028\\t"], "a" : null }')
    assert raw == '{"b":[1,2.0,"\u00e9\u2028\\t"],"a":null}'.encode()
    assert strict_json.dumps(value) == raw


# -- fuzz ----------------------------------------------------------------------------------

VALID = [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file",'
    b'"arguments":{"path":"/data/x","head":10,"flags":[true,false,null,1.5e3]}}}',
    b'{"jsonrpc":"2.0","id":"a\\"b","result":{"content":[{"type":"text","text":"\\u00e9"}]}}',
    b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":3}}',
]
TOKENS = [
    b'"',
    b"\\",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b":",
    b"\\u0000",
    b"\\ud800",
    b"\\udc00",
    b"NaN",
    b"-Infinity",
    b"1e999",
    b"9" * 25,
    b"\xff",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b'"ID":1,',
    b'"Name":"x",',
    b"\xe2\x84\xaa",
    b"[" * 70,
    b"]" * 70,
    b"\n",
    b"\x00",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 4)):
        position = rng.randint(0, len(data))
        choice = rng.random()
        if choice < 0.35:
            data = data[:position] + rng.choice(TOKENS) + data[position:]
        elif choice < 0.55:
            data = data[:position] + data[position + rng.randint(1, 8) :]
        elif choice < 0.75 and data:
            data = data[:position] + bytes([rng.randrange(256)]) + data[position + 1 :]
        elif choice < 0.9:
            data = data[:position]
        else:
            data = data + data[position:]
    return data


def corpus_seeds() -> list[bytes]:
    cases = json.loads((ROOT / "tests" / "data" / "hostile_messages.json").read_text())["cases"]
    seeds = [bytes.fromhex(c["raw_hex"]) if "raw_hex" in c else c["raw"].encode() for c in cases]
    return [seed for seed in seeds if len(seed) < 3000] + VALID


def check_one(data: bytes) -> None:
    try:
        value = strict_json.loads(data)
    except StrictJSONError as exc:
        assert type(exc) is StrictJSONError
        assert exc.code in (PARSE_ERROR, INVALID_REQUEST)
        return
    raw = strict_json.dumps(value)
    assert json.loads(data.decode("utf-8")) == value  # a subset of standard JSON
    assert strict_json.loads(raw) == value
    assert strict_json.dumps(strict_json.loads(raw)) == raw
    assert b"\n" not in raw


def test_fuzz_only_ever_refuses_with_its_own_error() -> None:
    rng = random.Random(14)
    seeds = corpus_seeds()
    for _ in range(6000):
        check_one(mutate(rng, rng.choice(seeds)))
    for _ in range(1000):
        check_one(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
        check_one(bytes(rng.choice(b'[]{}":,0123456789.eE-+ tfnul\\') for _ in range(40)))


def test_fuzz_the_relay_parser_raises_only_invalid_message() -> None:
    rng = random.Random(53)
    seeds = corpus_seeds()
    for _ in range(3000):
        data = mutate(rng, rng.choice(seeds))
        try:
            message = jsonrpc.parse(data, 1 << 20)
        except jsonrpc.InvalidMessage:
            continue
        assert jsonrpc.parse(message.raw, 1 << 20).raw == message.raw
        assert jsonrpc.parse_server_line(data, 1 << 20) is not None


def test_depth_limit_holds_where_arrays_and_objects_alternate() -> None:
    def nested(depth: int) -> bytes:
        opening = "".join("[" if i % 2 == 0 else '{"a":' for i in range(depth))
        closing = "".join("]" if i % 2 == 0 else "}" for i in reversed(range(depth)))
        return (
            (opening + "1" + closing).encode() if depth % 2 == 0 else (opening + closing).encode()
        )

    strict_json.loads(nested(MAX_DEPTH))
    for depth in (MAX_DEPTH + 1, MAX_DEPTH + 2, 2 * MAX_DEPTH):
        with pytest.raises(StrictJSONError, match="nesting deeper"):
            strict_json.loads(nested(depth))
