"""I/O-free decoding of a container's attached stdio.

With `tty=False`, Docker multiplexes stdout and stderr on the attach stream: each frame is an
8-byte header (byte 0 = stream: 1 stdout, 2 stderr; bytes 4-7 = big-endian payload length)
followed by the payload. Frames do not align with JSON-RPC lines, so stdout is re-split on
newlines by `LineSplitter`, which also bounds how much it will buffer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct(">BxxxI")


class Stream(IntEnum):
    STDIN = 0
    STDOUT = 1
    STDERR = 2


class StreamFormatError(ValueError):
    """The attach stream is not in Docker's multiplexed format."""


@dataclass
class MultiplexDecoder:
    """Feed raw attach bytes; get `(stream, payload)` chunks back as frames complete."""

    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[tuple[Stream, bytes]]:
        self._buffer += data
        chunks: list[tuple[Stream, bytes]] = []
        while len(self._buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buffer)
            if kind not in (Stream.STDOUT, Stream.STDERR):
                raise StreamFormatError(f"unexpected stream id {kind} in attach header")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            chunks.append((Stream(kind), bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return chunks

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buffer)


@dataclass(frozen=True)
class OversizedLine:
    """Marks where a line longer than the limit was dropped; `seen` is how much of it arrived."""

    seen: int


@dataclass
class LineSplitter:
    """Split a byte stream on b"\\n", holding at most `max_line_bytes` of any one line.

    A longer line is dropped (up to its newline) and reported in-band as `OversizedLine`, in
    its place among the other lines, so one bad message does not poison what follows it and
    memory stays bounded whatever the peer sends. Blank lines are skipped.
    """

    max_line_bytes: int
    _buffer: bytearray = field(default_factory=bytearray)
    _discarded: int = 0  # > 0 while dropping the rest of an oversized line

    def feed(self, data: bytes) -> list[bytes | OversizedLine]:
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
            self._buffer.clear()
        else:
            self._buffer += piece

    def _finish_line(self, out: list[bytes | OversizedLine]) -> None:
        if self._discarded:
            out.append(OversizedLine(seen=self._discarded))
            self._discarded = 0
            return
        line = bytes(self._buffer).rstrip(b"\r")
        self._buffer.clear()
        if line.strip():
            out.append(line)
