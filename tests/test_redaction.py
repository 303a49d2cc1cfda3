"""Redaction of granted secrets in every form a server might echo them in (`secrets/redact.py`).

Each form below is one way a careless server (or its HTTP client, logger or JSON encoder)
prints a value; each case fails when the handling of that form is removed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets as random
import urllib.parse
from collections.abc import Callable

import pytest

from stockade.relay import jsonrpc
from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.instance import Instance, Redaction
from stockade.sandbox.spec import LABEL_DAEMON, ContainerSpec
from stockade.secrets.redact import Redactor, StreamRedactor

# Characters that JSON, Go, URLs and base64 each treat specially: / + space & < > " and é.
VALUE = f'ghp_{random.token_hex(8)}/+ &<>"é-{random.token_hex(4)}'
MARK = "[REDACTED:tok]"


def _each_char(escape: Callable[[str], str], which: Callable[[int], bool]) -> str:
    return "".join(escape(c) if which(i) else c for i, c in enumerate(VALUE))


def _u(c: str) -> str:
    return f"\\u{ord(c):04x}"


def _json_string(raw_inner: str) -> bytes:
    """A JSON-RPC line whose text field holds `raw_inner` exactly (already escaped)."""
    return b'{"jsonrpc":"2.0","id":1,"result":{"text":"before ' + raw_inner.encode() + b' after"}}'


def _go(text: str) -> str:
    """Go's encoding/json: HTML-safe escapes for & < >, \\" for the quote."""
    escaped = json.dumps(text, ensure_ascii=False)[1:-1]
    return escaped.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


def _b64(prefix: bytes, encode: Callable[[bytes], bytes], strip: bool = False) -> bytes:
    encoded = encode(prefix + VALUE.encode() + b"!")
    return b"data:" + (encoded.rstrip(b"=") if strip else encoded) + b";"


FORMS: dict[str, bytes] = {
    "raw": f"the token is {VALUE}.".encode(),
    "json (ensure_ascii)": _json_string(json.dumps(VALUE)[1:-1]),
    "json, every char \\u-escaped": _json_string(_each_char(_u, lambda _i: True)),
    "json, a mix of \\u and plain": _json_string(_each_char(_u, lambda i: i % 3 == 0)),
    "json, Go's \\u0026 \\u003c \\u003e": _json_string(_go(VALUE)),
    "json, \\/ for /": _json_string(json.dumps(VALUE)[1:-1].replace("/", "\\/")),
    "url, %XX": f"GET /?t={urllib.parse.quote(VALUE, safe='')} HTTP/1.1".encode(),
    "url, lower-case %xx": f"/?t={_lower_hex(urllib.parse.quote(VALUE, safe=''))}".encode(),
    "url, + for space": f"t={urllib.parse.quote_plus(VALUE)}&x=1".encode(),
    "url, only some escaped": f"/?t={urllib.parse.quote(VALUE, safe='/&<>')}".encode(),
    "url inside json, \\u0026 and %XX": _json_string(
        _go(f"https://x.test/?a=1&t={urllib.parse.quote(VALUE, safe='')}")
    ),
    "base64, offset 0": _b64(b"", base64.b64encode),
    "base64, offset 1": _b64(b"a", base64.b64encode),
    "base64, offset 2": _b64(b"ab", base64.b64encode),
    "base64 url-safe unpadded, offset 0": _b64(b"", base64.urlsafe_b64encode, strip=True),
    "base64 url-safe unpadded, offset 1": _b64(b"a", base64.urlsafe_b64encode, strip=True),
    "base64 url-safe unpadded, offset 2": _b64(b"ab", base64.urlsafe_b64encode, strip=True),
    "base64 inside json with \\/": _json_string(
        base64.b64encode(b"x" + VALUE.encode()).decode().replace("/", "\\/")
    ),
    "split across content items": json.dumps(
        {
            "content": [
                {"type": "text", "text": "token: " + VALUE[:9]},
                {"type": "text", "text": VALUE[9:20]},
                {"type": "text", "text": VALUE[20:] + " (end)"},
            ]
        }
    ).encode(),
    "split across a string array": json.dumps({"parts": [VALUE[:5], VALUE[5:]]}).encode(),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_of_a_granted_value_is_redacted(form: str) -> None:
    data = FORMS[form]
    assert VALUE.encode() not in data or form == "raw"  # the case really is encoded
    out, found = Redactor({"tok": VALUE.encode()}).apply(data)
    assert found == ["tok"], out
    assert MARK.encode() in out
    for piece in (VALUE[:8], VALUE[-8:]):  # nothing of the value is left in any form
        assert piece.encode() not in out
        assert base64.b64encode(VALUE.encode())[4:12] not in out
    if data.startswith(b"{"):
        json.loads(out)  # a redacted message is still JSON


def test_json_stays_json_and_escapes_are_replaced_whole() -> None:
    inner = _each_char(_u, lambda i: i % 2 == 0)
    out, _ = Redactor({"tok": VALUE.encode()}).apply(_json_string(inner))
    assert json.loads(out)["result"]["text"] == f"before {MARK} after"


def test_a_value_stored_with_a_trailing_newline_is_found_without_it() -> None:
    out, found = Redactor({"tok": VALUE.encode() + b"\r\n"}).apply(FORMS["raw"])
    assert found == ["tok"] and out == f"the token is {MARK}.".encode()


def test_fragments_under_different_keys_are_not_joined() -> None:
    """The documented limit: only values of one key are joined (no false joins either)."""
    data = json.dumps({"a": VALUE[:9], "b": VALUE[9:]}).encode()
    assert Redactor({"tok": VALUE.encode()}).apply(data) == (data, [])


def test_text_that_merely_looks_similar_is_left_alone() -> None:
    data = json.dumps({"content": [{"text": "ghp_"}, {"text": "hello"}], "u": "a%20b+c"}).encode()
    assert Redactor({"tok": VALUE.encode()}).apply(data) == (data, [])


PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    + "\n".join(random.token_urlsafe(48) for _ in range(4))
    + "\n-----END PRIVATE KEY-----\n"
)


def test_the_stream_redactor_catches_a_value_across_chunks_and_lines() -> None:
    found: list[str] = []
    stream = StreamRedactor(Redactor({"key": PEM.encode()}), found.extend)
    data = ("starting\n" + PEM + "after the key\n").encode()
    out = b"".join(stream.feed(data[i : i + 7]) for i in range(0, len(data), 7))
    out += stream.feed(b"", True)
    assert out == b"starting\n[REDACTED:key]\nafter the key\n"
    assert found == ["key"]


def test_the_stream_redactor_passes_an_ordinary_line_at_once() -> None:
    stream = StreamRedactor(Redactor({"key": PEM.encode()}), lambda _names: None)
    assert stream.feed(b"listening on 8080\n") == b"listening on 8080\n"
    assert stream.feed(b"-----BEGIN PRI") == b""  # could be the key: held back
    assert stream.feed(b"NTER-----\n") == b"-----BEGIN PRINTER-----\n"


PEM_WRITER = """
import sys, time
for line in sys.argv[1].splitlines(keepends=True):
    sys.stderr.write(line); sys.stderr.flush(); time.sleep(0.05)
sys.stderr.write("after the key\\n"); sys.stderr.flush()
"""


@pytest.mark.docker
@pytest.mark.usefixtures("images", "cleanup_containers")
def test_a_multi_line_secret_written_to_stderr_is_redacted(backend: DockerBackend) -> None:
    """Line by line, in separate writes: stderr is redacted before it is cut into lines."""
    found: list[str] = []

    async def run() -> list[str]:
        spec = ContainerSpec(
            image="stockade/python:latest",
            command=("python3", "-c", PEM_WRITER, PEM),
            labels={LABEL_DAEMON: "pytest"},
        )
        redaction = Redaction(Redactor({"key": PEM.encode()}), found.extend)
        instance = await Instance.start(backend, spec, "s", "i", 1 << 20, redaction=redaction)
        await asyncio.wait_for(instance.exited, 60)
        return instance.stderr.since(0)

    lines = asyncio.run(run())
    assert "[REDACTED:key]" in lines and lines[-1] == "after the key", lines
    for secret_line in PEM.splitlines()[1:-1]:
        assert not any(secret_line in line for line in lines)
    assert found == ["key"]


def test_a_secret_that_only_the_canonical_form_shows_is_withheld() -> None:
    """Review finding 13: a numeric secret written in another notation passes the line's
    redaction, and re-serialising it (`8.4736291e7` -> `84736291.0`) would show it: the
    canonical bytes are redacted too, and a message they cannot stay JSON for is withheld."""
    found: list[list[str]] = []
    redaction = Redaction(Redactor({"pin": b"84736291"}), found.append)
    answer = b'{"jsonrpc":"2.0","id":7,"result":{"pin":8.4736291e7}}'
    assert redaction.apply(answer) == answer  # the line itself shows no secret
    withheld = jsonrpc.parse_server_line(answer, 1 << 20, redaction.apply)
    assert withheld is not None
    assert b"84736291" not in withheld.raw
    assert withheld.id == 7
    assert withheld.body["error"]["code"] == jsonrpc.SECRET_WITHHELD
    notification = b'{"jsonrpc":"2.0","method":"notifications/message","params":{"n":8.4736291e7}}'
    assert jsonrpc.parse_server_line(notification, 1 << 20, redaction.apply) is None
    # Inside a string the canonical bytes stay JSON: redacted and forwarded.
    escaped = b'{"jsonrpc":"2.0","id":8,"result":{"t":"pin 8473\\u0036291"}}'
    message = jsonrpc.parse_server_line(escaped, 1 << 20, redaction.apply)
    assert message is not None
    assert message.body["result"]["t"] == "pin [REDACTED:pin]"
    assert found == [["pin"]] * 3  # each found one is said (an audit record, names only)
    # Without the canonical pass the number reaches the host.
    plain = jsonrpc.parse_server_line(answer, 1 << 20)
    assert plain is not None and b"84736291" in plain.raw
