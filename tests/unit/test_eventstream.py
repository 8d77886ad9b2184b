"""AWS eventstream decoding: framing, header types, CRC failures, size caps."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from extproc.codecs.eventstream import EventStreamDecoder
from tests.support.provider_cases import BY_NAME, event_frame, frame, new_parser


def _frame_with_headers(block: bytes, payload: bytes) -> bytes:
    total = 12 + len(block) + len(payload) + 4
    prelude = struct.pack(">II", total, len(block))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + block + payload
    return message + struct.pack(">I", zlib.crc32(message))


def test_recorded_converse_stream_frames(fixtures_dir: Path) -> None:
    body = (fixtures_dir / "agw__bedrock__converse_stream_basic.bin").read_bytes()
    messages = EventStreamDecoder().decode(body)
    assert [m.headers[":event-type"] for m in messages] == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert all(m.headers[":message-type"] == "event" for m in messages)
    assert messages[-1].payload.endswith(b'"usage":{"inputTokens":15,"outputTokens":142,"totalTokens":157}}')


def test_every_header_type_is_skipped_by_its_size() -> None:
    block = b""
    for name, kind, value in [
        ("t", 0, b""),
        ("f", 1, b""),
        ("b", 2, b"\x01"),
        ("s", 3, b"\x00\x02"),
        ("i", 4, b"\0\0\0\3"),
        ("l", 5, b"\0" * 8),
        ("ba", 6, b"\x00\x03abc"),
        ("ts", 8, b"\0" * 8),
        ("u", 9, b"\1" * 16),
        (":event-type", 7, b"\x00\x08metadata"),
    ]:
        block += bytes([len(name)]) + name.encode() + bytes([kind]) + value
    messages = EventStreamDecoder().decode(_frame_with_headers(block, b"{}"))
    assert len(messages) == 1
    assert messages[0].headers == {":event-type": "metadata"}
    assert messages[0].payload == b"{}"


def test_unknown_header_type_is_a_bad_frame_not_an_exception() -> None:
    bad = _frame_with_headers(b"\x01x\x0a\x00", b"{}")
    good = event_frame("metadata", {"usage": {}})
    dec = EventStreamDecoder()
    messages = dec.decode(bad + good)
    assert dec.bad_frames == 1
    assert [m.headers[":event-type"] for m in messages] == ["metadata"]


def test_corrupted_message_crc_counts_and_later_frames_decode(fixtures_dir: Path) -> None:
    body = bytearray((fixtures_dir / "agw__bedrock__converse_stream_basic.bin").read_bytes())
    first_len = struct.unpack(">I", body[:4])[0]
    body[first_len + 30] ^= 0xFF  # a byte inside the second frame's headers/payload
    dec = EventStreamDecoder()
    messages = []
    for i in range(0, len(body), 5):
        messages += dec.decode(bytes(body[i : i + 5]))
    assert dec.bad_frames == 1
    assert dec.failed is None
    assert len(messages) == 6
    assert messages[-1].headers[":event-type"] == "metadata"


def test_corrupted_crc_through_the_parser_counts_a_parse_error(fixtures_dir: Path) -> None:
    body = bytearray((fixtures_dir / "agw__bedrock__converse_stream_basic.bin").read_bytes())
    first_len = struct.unpack(">I", body[:4])[0]
    body[first_len - 1] ^= 0x01  # the first frame's message CRC itself
    parser, obs = new_parser(BY_NAME["bedrock_converse_stream"])
    parser.feed_response(bytes(body), True)
    assert obs.parse_errors == 1
    assert obs.parse_error_reason == "eventstream_crc"
    assert (obs.usage.input_tokens, obs.usage.output_tokens, obs.usage.total_tokens) == (15, 142, 157)


def test_bad_prelude_crc_stops_decoding_without_raising() -> None:
    data = bytearray(event_frame("metadata", {}))
    data[9] ^= 0xFF
    dec = EventStreamDecoder()
    assert dec.decode(bytes(data) + event_frame("metadata", {})) == []
    assert dec.failed == "prelude_crc"
    assert dec.decode(event_frame("metadata", {})) == []


def test_oversized_declared_frame_is_refused_without_buffering() -> None:
    prelude = struct.pack(">II", 1 << 30, 0)
    prelude += struct.pack(">I", zlib.crc32(prelude))
    dec = EventStreamDecoder(max_frame=16 << 20)
    assert dec.decode(prelude + b"x" * 100) == []
    assert dec.failed == "frame_too_large"
    assert dec.held == 0


def test_truncated_stream_is_counted() -> None:
    data = event_frame("metadata", {"usage": {"inputTokens": 1, "outputTokens": 2}})
    parser, obs = new_parser(BY_NAME["bedrock_converse_stream"])
    parser.feed_response(data[:-3], True)
    assert obs.parse_error_reason == "eventstream_truncated"
    assert obs.usage.input_tokens is None


def test_exception_message_sets_error_type() -> None:
    parser, obs = new_parser(BY_NAME["bedrock_converse_stream"])
    data = frame(
        {":message-type": "exception", ":exception-type": "throttlingException", ":content-type": "application/json"},
        b'{"message":"slow down"}',
    )
    parser.feed_response(data, True)
    assert obs.error_type == "throttlingException"
    assert obs.parse_errors == 0
