"""Docker attach stream decoding and line splitting (I/O-free)."""

from __future__ import annotations

import struct

import pytest

from stockade.sandbox.stdio import MultiplexDecoder, Stream, StreamFormatError
from stockade.wire.lines import LineSplitter, OversizedLine


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def test_decoder_splits_frames_across_arbitrary_chunks() -> None:
    data = frame(1, b'{"id":1}\n') + frame(2, b"log line\n") + frame(1, b'{"id":2}')
    for cut in range(len(data) + 1):
        decoder = MultiplexDecoder()
        chunks = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert chunks == [
            (Stream.STDOUT, b'{"id":1}\n'),
            (Stream.STDERR, b"log line\n"),
            (Stream.STDOUT, b'{"id":2}'),
        ]
        assert decoder.pending == 0


def test_decoder_rejects_a_stream_that_is_not_multiplexed() -> None:
    with pytest.raises(StreamFormatError):
        MultiplexDecoder().feed(b'{"jsonrpc":"2.0"}\n')


def test_lines_do_not_need_to_align_with_frames() -> None:
    splitter = LineSplitter(max_line_bytes=100)
    assert splitter.feed(b'{"a":') == []
    assert splitter.feed(b'1}\n{"b":2}\r\n\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert splitter.feed(b":3}\n") == [b'{"c":3}']


def test_oversized_line_is_reported_in_place_and_the_stream_recovers() -> None:
    splitter = LineSplitter(max_line_bytes=8)
    assert splitter.feed(b"ok\n" + b"x" * 20) == [b"ok"]
    assert splitter.feed(b"y" * 5 + b"\nnext\n") == [OversizedLine(seen=25), b"next"]
    assert splitter.feed(b"0123456789\nz\n") == [OversizedLine(seen=10), b"z"]


def test_line_exactly_at_the_limit_passes() -> None:
    splitter = LineSplitter(max_line_bytes=8)
    assert splitter.feed(b"12345678\n") == [b"12345678"]


def test_whole_frames_and_whole_lines_read_as_the_same_as_byte_by_byte() -> None:
    """The decoder's and the splitter's one-whole-frame / one-whole-line shortcuts give what
    the general path gives, for every kind of line (blank, CR, spaces, at and over the limit)."""
    lines = [
        b'{"id":1}\n',
        b"\n",
        b"  \t\n",
        b'{"i":2}\r\n',  # the CR counts toward the limit
        b"12345678\n",
        b"123456789\n",
        b"z\n",
    ]
    frames = [frame(1, line) for line in lines] + [frame(2, b"log\n")]

    def by_bytes(chunks: list[bytes]) -> tuple[list[object], list[object]]:
        decoder, splitter = MultiplexDecoder(), LineSplitter(max_line_bytes=8)
        got: list[object] = []
        said: list[object] = []
        for chunk in chunks:
            for stream, payload in decoder.feed(chunk):
                said.append((stream, payload))
                if stream is Stream.STDOUT:
                    got.extend(splitter.feed(payload))
        return got, said

    whole = by_bytes(frames)
    assert whole == by_bytes([bytes([b]) for b in b"".join(frames)])
    assert whole[0] == [b'{"id":1}', b'{"i":2}', b"12345678", OversizedLine(seen=9), b"z"]
    with pytest.raises(StreamFormatError):
        MultiplexDecoder().feed(frame(3, b"x\n"))  # a whole frame of no output stream
