"""Replace granted secret values in what a server sends out by `[REDACTED:NAME]`.

Applied to every stdout line of an instance (so to every server->host message, per-session
or shared), to its stderr *stream* before that is cut into lines (`StreamRedactor`, so a
multi-line value such as a PEM key is caught), and to audited arguments. A value is found:
- as it is, less a trailing CR/LF (a value stored with one, before stores stripped it, is
  printed without it; and the line break after a multi-line value is not secret);
- in base64, standard or URL-safe, padded or not. Base64 of a value that sits at byte
  offset 1 or 2 of the encoded data spells different characters than at offset 0, so for
  each of the three alignments the characters that depend on the value alone are sought;
- through any mix of escapes (`views.py`): JSON string escapes (`\\uXXXX`, Go's `\\u0026`,
  `\\/`, ...), URL `%XX` in either case, `+` for a space, and JSON escapes around `%XX`;
- across adjacent JSON string values of one key (the `text` of consecutive content items, or
  the items of a string array): each fragment's part is replaced. Fragments under different
  keys, or in different messages, are not joined.

Encoded and joined forms are sought only for values of at least `MIN_ENCODED_BYTES`, so a
short value does not turn common text into markers.

Redaction cannot catch a server that hides a value on purpose: encrypted, hashed, hex or
otherwise re-encoded, reversed, or split across messages. It is a net for accidents; the
boundary is the sandbox (no network but the egress allowlist, secrets only where granted).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from stockade.secrets.views import (
    View,
    json_readings,
    json_unescaped,
    percent_decoded,
    string_groups,
)

MIN_ENCODED_BYTES = 6
_STANDARD_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def base64_forms(value: bytes) -> set[bytes]:
    """The base64 characters that depend on `value` alone, per alignment and alphabet."""
    forms: set[bytes] = set()
    bits = 8 * len(value)
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + value)
        first = -(-8 * shift // 6)  # the first character made of the value's bits only
        last = (8 * shift + bits) // 6  # the characters before it hold no later bytes' bits
        stable = encoded[first:last]
        if stable:
            forms |= {stable, stable.translate(_STANDARD_TO_URLSAFE)}
    return forms


class Redactor:
    def __init__(self, values: dict[str, bytes]) -> None:
        # (form, name): the forms found literally in the output and in every reading of it.
        patterns: list[tuple[bytes, str]] = []
        self._joined: list[tuple[bytes, str]] = []  # raw values sought across fragments
        self._spaces = False
        for name, value in values.items():
            # Sought without a trailing CR/LF: a line break after the value is not secret,
            # and a value stored with one is printed without it.
            raw = value.rstrip(b"\r\n") or value
            forms = {raw}
            if len(raw) >= MIN_ENCODED_BYTES:
                forms |= base64_forms(raw) | base64_forms(value)
                self._joined.append((raw, name))
            self._spaces |= b" " in raw
            patterns += [(form, name) for form in forms]
        # Longest first, so that a secret containing another is replaced whole.
        self._patterns = sorted(patterns, key=lambda p: len(p[0]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    @property
    def forms(self) -> list[bytes]:
        """Every literal form sought (for the stream redactor's hold-back)."""
        return [form for form, _ in self._patterns]

    def apply(self, data: bytes) -> tuple[bytes, list[str]]:
        """`data` with every secret replaced, and the names that were found."""
        if not self._patterns or not self._may_hold(data):
            return data, []
        hits: list[tuple[int, int, str]] = []
        for view in self._views(data):
            self._find(view, self._patterns, hits)
        for view in string_groups(data) if b'"' in data and self._joined else ():
            self._find(view, self._joined, hits)
        if not hits:
            return data, []
        return _replace(data, hits)

    def _may_hold(self, data: bytes) -> bool:
        """False only when no reading of `data` can hold a value: a quick check at C speed
        for the usual message, before the mapped readings (slower: Python per escape)."""
        if any(form in data for form, _ in self._patterns):
            return True
        if not (b"\\" in data or b"%" in data or b"+" in data or b'"' in data):
            return False  # no reading differs from the text itself
        readings = json_readings(data)
        if readings is None:
            return True  # not JSON (stderr, a broken line): read it the mapped way
        strings, groups = readings
        # One text to search (a separator that only makes the check more cautious).
        text = b"\0".join(strings)
        texts = [text, *groups]
        if b"%" in text:
            texts.append(unquote_to_bytes(text))
        if self._spaces and b"+" in text:
            texts.append(unquote_to_bytes(text.replace(b"+", b" ")))
        if any(form in each for each in texts for form, _ in self._patterns):
            return True
        return any(value in group for group in groups for value, _ in self._joined)

    def _views(self, data: bytes) -> list[View]:
        """The readings of `data` worth searching (a reading that changes nothing is skipped)."""
        original = View(data)
        views = [original]
        if b"\\" in data:
            views.append(json_unescaped(original))
        for base in list(views):
            if b"%" in base.text:
                views.append(percent_decoded(base, plus=False))
            if self._spaces and b"+" in base.text:
                views.append(percent_decoded(base, plus=True))
        return views

    @staticmethod
    def _find(
        view: View, patterns: list[tuple[bytes, str]], hits: list[tuple[int, int, str]]
    ) -> None:
        text = view.text
        for form, name in patterns:
            start = text.find(form)
            while start >= 0:
                hits += [(s, e, name) for s, e in view.origin(start, start + len(form))]
                start = text.find(form, start + len(form))


def _replace(data: bytes, hits: list[tuple[int, int, str]]) -> tuple[bytes, list[str]]:
    """Replace each span by its marker; overlapping spans merge (named by the first)."""
    hits.sort(key=lambda hit: (hit[0], hit[0] - hit[1]))
    merged: list[tuple[int, int, str]] = []
    for start, end, name in hits:
        if merged and start < merged[-1][1]:
            first, last, first_name = merged[-1]
            merged[-1] = (first, max(last, end), first_name)
        else:
            merged.append((start, end, name))
    out: list[bytes] = []
    position = 0
    for start, end, name in merged:
        out += [data[position:start], f"[REDACTED:{name}]".encode()]
        position = end
    out.append(data[position:])
    found = list(dict.fromkeys(name for _, _, name in hits))
    return b"".join(out), found


class StreamRedactor:
    """Redacts a byte stream (stderr) before it is split into lines.

    `feed` returns what is safe to pass on: the redacted input, less the longest tail that
    could still begin a secret (a literal form), which waits for the next chunk. A line that
    does not look like the start of a secret passes at once. `final=True` flushes all.
    A value in an escaped form (JSON, %XX) is caught when one chunk holds it whole.
    """

    def __init__(self, redactor: Redactor, on_found: Callable[[list[str]], None]) -> None:
        self._redactor = redactor
        self._on_found = on_found
        self._forms = redactor.forms
        self._held = b""

    def feed(self, data: bytes, final: bool = False) -> bytes:
        text, found = self._redactor.apply(self._held + data)
        if found:
            self._on_found(found)
        keep = 0 if final else self._tail(text)
        self._held = text[len(text) - keep :] if keep else b""
        return text[: len(text) - keep]

    def _tail(self, text: bytes) -> int:
        """The length of the longest suffix of `text` that is a proper prefix of a form."""
        best = 0
        for form in self._forms:
            window = min(len(text), len(form) - 1)
            start = len(text) - window
            while window > best:
                at = text.find(form[:1], start)
                if at < 0:
                    break
                if form.startswith(text[at:]):
                    best = max(best, len(text) - at)
                    break
                start = at + 1
                window = len(text) - start
        return best
