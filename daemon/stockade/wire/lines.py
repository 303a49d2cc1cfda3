"""Split a byte stream into lines, bounded: the framing of MCP's stdio transport.

Used on both sides of the relay: the bridge splits what the host writes, the daemon splits
what a container prints. Neither may hold more than one message's worth of bytes, whatever
the peer sends, so an over-long line is dropped and reported in-band (`OversizedLine`).
"""

from __future__ import annotations

HEAD_BYTES = 512  # what is kept of a dropped line: enough to read the id of a message


class OversizedLine:
    """Marks where a line longer than the limit was dropped; `seen` is how much of it arrived.

    `head` is its first HEAD_BYTES, so that the request it answers (or asks) can still get
    an error at once instead of waiting for nothing. Equal when `seen` is (the head aside).
    A plain class, not a dataclass: the bridge imports this and must start fast.
    """

    __slots__ = ("head", "seen")

    def __init__(self, seen: int, head: bytes = b"") -> None:
        self.seen = seen
        self.head = head

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OversizedLine) and other.seen == self.seen

    def __hash__(self) -> int:
        return hash(("OversizedLine", self.seen))

    def __repr__(self) -> str:
        return f"OversizedLine(seen={self.seen})"


class LineSplitter:
    """Split a byte stream on b"\\n", holding at most `max_line_bytes` of any one line.

    A longer line is dropped (up to its newline) and reported in-band as `OversizedLine`, in
    its place among the other lines, so one bad message does not poison what follows it and
    memory stays bounded whatever the peer sends. Blank lines are skipped.
    """

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._discarded = 0  # > 0 while dropping the rest of an oversized line
        self._head = b""

    def feed(self, data: bytes) -> list[bytes | OversizedLine]:
        if (  # the usual chunk: one whole line, nothing held
            not self._buffer
            and not self._discarded
            and data.endswith(b"\n")
            and len(data) <= self.max_line_bytes
            and data.find(b"\n") == len(data) - 1
        ):
            line = data[:-1].rstrip(b"\r")
            return [line] if line and not line.isspace() else []
        out: list[bytes | OversizedLine] = []
        start = 0
        while start <= len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            self._take(data[start:end])
            if newline < 0:
                break
            self._finish_line(out)
            start = newline + 1
        return out

    def _take(self, piece: bytes) -> None:
        if self._discarded:
            self._discarded += len(piece)
        elif len(self._buffer) + len(piece) > self.max_line_bytes:
            self._discarded = len(self._buffer) + len(piece)
            self._head = (bytes(self._buffer[:HEAD_BYTES]) + piece[:HEAD_BYTES])[:HEAD_BYTES]
            self._buffer.clear()
        else:
            self._buffer += piece

    def _finish_line(self, out: list[bytes | OversizedLine]) -> None:
        if self._discarded:
            out.append(OversizedLine(seen=self._discarded, head=self._head))
            self._discarded, self._head = 0, b""
            return
        line = bytes(self._buffer).rstrip(b"\r")
        self._buffer.clear()
        if line.strip():
            out.append(line)
