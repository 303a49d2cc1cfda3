"""Replace granted secret values in what a server sends out by `[REDACTED:NAME]`.

Applied to every stdout line of an instance (so to every server->host message, per-session
or shared) and to its stderr before it is logged. A value is looked for as raw bytes and in
its JSON-escaped form (how it appears inside a JSON string).
"""

from __future__ import annotations

import json


class Redactor:
    def __init__(self, values: dict[str, bytes]) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        patterns: list[tuple[bytes, bytes]] = []
        for name, value in values.items():
            marker = f"[REDACTED:{name}]".encode()
            forms = {value}
            try:
                escaped = json.dumps(value.decode(), ensure_ascii=False)[1:-1].encode()
                forms |= {escaped, json.dumps(value.decode())[1:-1].encode()}
            except UnicodeDecodeError:
                pass
            patterns.extend((form, marker) for form in forms if form)
        self._patterns = sorted(patterns, key=lambda p: len(p[0]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def apply(self, data: bytes) -> tuple[bytes, list[str]]:
        """`data` with every secret replaced, and the names that were found."""
        found: list[str] = []
        for value, marker in self._patterns:
            if value in data:
                data = data.replace(value, marker)
                found.append(marker[10:-1].decode())
        return data, found
