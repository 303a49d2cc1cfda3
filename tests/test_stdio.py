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
