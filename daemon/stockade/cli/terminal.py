"""Text a host, a server or a file chose, made safe to print on a terminal.

A terminal obeys what it is sent: ESC sequences move the cursor, erase lines and retitle the
window; CR returns to the line start; bidi overrides reorder what follows. A host that names
a tool "\\x1b[2K\\rallow get_me" would make a denial read as an allow in `stockade audit
tail`. So every foreign string the CLI prints goes through `printable`, which shows each such
character as a visible escape instead: C0 controls, DEL and C1 controls (so ESC and CSI, and
with them every escape sequence, and newline and tab too: only the CLI itself starts lines and
columns) as `\\xNN`; Unicode bidi controls, line and paragraph separators and lone surrogates
as `\\uNNNN`. Everything else, including non-ASCII text, is shown as it is. A backslash is
left as it is: the escapes are for reading; `--json` output is the exact form.
"""

from __future__ import annotations

import re

# C0, DEL and C1 (Unicode category Cc); the bidi embeddings, overrides, isolates and marks;
# line and paragraph separators; surrogates (a lone one cannot even be encoded to stdout).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """`text` as a string with every character that could steer a terminal made visible."""
    return _UNSAFE.sub(_escape, str(text))
