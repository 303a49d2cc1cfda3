"""I/O-free decoding of a container's attached stdio.

With `tty=False`, Docker multiplexes stdout and stderr on the attach stream: each frame is an
8-byte header (byte 0 = stream: 1 stdout, 2 stderr; bytes 4-7 = big-endian payload length)
followed by the payload. Frames do not align with JSON-RPC lines, so stdout is re-split on
newlines by `stockade.wire.lines.LineSplitter`, which also bounds how much it buffers.
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


_OUTPUT = {Stream.STDOUT.value: Stream.STDOUT, Stream.STDERR.value: Stream.STDERR}


class StreamFormatError(ValueError):
    """The attach stream is not in Docker's multiplexed format."""


@dataclass
class MultiplexDecoder:
    """Feed raw attach bytes; get `(stream, payload)` chunks back as frames complete."""

    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[tuple[Stream, bytes]]:
        if not self._buffer and len(data) >= HEADER.size:  # the usual read: one whole frame
            kind, length = HEADER.unpack_from(data)
            stream = _OUTPUT.get(kind)
            if stream is not None and len(data) == HEADER.size + length:
                return [(stream, data[HEADER.size :])]
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
