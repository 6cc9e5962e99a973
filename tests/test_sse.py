"""Tests for the incremental event-stream reader `addons.sse.SSEReader`."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import brotli
import pytest

from addons.sse import SSEEvent, SSEReader

RECORDED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "recorded"


def _load_stream_fixtures() -> list[dict[str, Any]]:
    if not RECORDED.is_dir():
        return []
    fixtures = []
    for path in sorted(RECORDED.glob("*.json")):
        fixture = json.loads(path.read_text(encoding="utf-8"))
        if fixture["response"]["headers"].get("content-type", "").startswith("text/event-stream"):
            fixtures.append(fixture)
    return fixtures


STREAM_FIXTURES = _load_stream_fixtures()
needs_fixtures = pytest.mark.skipif(
    not STREAM_FIXTURES,
    reason=f"recorded provider traffic not found at {RECORDED} (it is not part of the repository)",
)
fixture_params = pytest.mark.parametrize(
    "fixture", STREAM_FIXTURES, ids=[fixture["name"] for fixture in STREAM_FIXTURES]
)


# -- helpers ---------------------------------------------------------------------------------------


def read_all(chunks: Iterable[bytes], encoding: str | None = None) -> list[SSEEvent]:
    reader = SSEReader(encoding)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
    events.extend(reader.close())
    return events


def fields(events: list[SSEEvent]) -> list[tuple[str | None, str]]:
    return [(event.event, event.data) for event in events]


def random_pieces(data: bytes, rng: random.Random, max_size: int = 40) -> list[bytes]:
    pieces = []
    offset = 0
    while offset < len(data):
        size = rng.randint(1, max_size)
        pieces.append(data[offset : offset + size])
        offset += size
    return pieces


def deflate_zlib(data: bytes) -> bytes:
    return zlib.compress(data)


def deflate_raw(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def zstd_compress(data: bytes) -> bytes:
    from backports import zstd

    return zstd.compress(data)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "br": brotli.compress,
    "deflate": deflate_zlib,
    "zstd": zstd_compress,
}


def reference_events(stream: bytes) -> list[tuple[str | None, str]]:
    """Parse a complete stream line by line, the slow and obvious way, for comparison."""
    text = stream.decode("utf-8", "replace")
    events: list[tuple[str | None, str]] = []
    name: str | None = None
    data: list[str] = []
    pending = False
    index = 0
    while index < len(text):
        end = index
        while end < len(text) and text[end] not in "\r\n":
            end += 1
        line = text[index:end]
        if end < len(text) and text[end] == "\r" and end + 1 < len(text) and text[end + 1] == "\n":
            index = end + 2
        else:
            index = end + 1
        terminated = end < len(text)
        if line == "" and terminated:
            events.append((name, "\n".join(data)))
            name, data, pending = None, [], False
            continue
        pending = True
        if line.startswith(":"):
            continue
        field_name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field_name == "data":
            data.append(value)
        elif field_name == "event":
            name = value
    if pending:
        events.append((name, "\n".join(data)))
    return events


def usage_objects(events: list[SSEEvent]) -> list[dict[str, Any]]:
    """Return every usage object in a provider stream, in order, as the providers place them."""
    found = []
    for event in events:
        body = event.json
        if not isinstance(body, dict):
            continue
        for holder in (body, body.get("response"), body.get("message")):
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                found.append(holder["usage"])
    return found


# -- recorded streams ------------------------------------------------------------------------------


@needs_fixtures
@fixture_params
def test_fixture_whole_stream(fixture: dict[str, Any]) -> None:
    body = fixture["response"]["body"].encode("utf-8")
    events = read_all([body])

    assert b"".join(event.raw for event in events) == body
    assert fields(events) == reference_events(body)
    expected_usage = [entry["usage"] for entry in fixture["usage_on_wire"]]
    assert usage_objects(events) == expected_usage


@needs_fixtures
@fixture_params
def test_fixture_split_at_every_byte(fixture: dict[str, Any]) -> None:
    body = fixture["response"]["body"].encode("utf-8")
    expected = fields(read_all([body]))
    expected_usage = [entry["usage"] for entry in fixture["usage_on_wire"]]

    for position in range(len(body) + 1):
        events = read_all([body[:position], body[position:]])
        assert fields(events) == expected, f"split at byte {position}"
        assert b"".join(event.raw for event in events) == body, f"split at byte {position}"
        assert usage_objects(events) == expected_usage, f"split at byte {position}"


@needs_fixtures
@fixture_params
def test_fixture_one_byte_per_feed(fixture: dict[str, Any]) -> None:
    body = fixture["response"]["body"].encode("utf-8")
    events = read_all(body[i : i + 1] for i in range(len(body)))

    assert fields(events) == fields(read_all([body]))
    assert b"".join(event.raw for event in events) == body


@needs_fixtures
@fixture_params
@pytest.mark.parametrize("encoding", sorted(COMPRESSORS))
def test_fixture_compressed_random_splits(fixture: dict[str, Any], encoding: str) -> None:
    body = fixture["response"]["body"].encode("utf-8")
    compressed = COMPRESSORS[encoding](body)
    expected = fields(read_all([body]))
    expected_usage = [entry["usage"] for entry in fixture["usage_on_wire"]]
    rng = random.Random(20261204)

    for attempt in range(30):
        reader = SSEReader(encoding)
        events: list[SSEEvent] = []
        for piece in random_pieces(compressed, rng, max_size=rng.choice([3, 50, 500])):
            events.extend(reader.feed(piece))
        events.extend(reader.close())

        assert fields(events) == expected, f"attempt {attempt}"
        assert usage_objects(events) == expected_usage, f"attempt {attempt}"
        assert reader.decoded == len(body)


@needs_fixtures
@fixture_params
@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_fixture_other_line_ends(fixture: dict[str, Any], line_end: bytes) -> None:
    original = fixture["response"]["body"].encode("utf-8")
    body = original.replace(b"\n", line_end)
    expected = fields(read_all([original]))

    for position in range(len(body) + 1):
        events = read_all([body[:position], body[position:]])
        assert fields(events) == expected, f"split at byte {position}"
        assert b"".join(event.raw for event in events) == body, f"split at byte {position}"


# -- framing ---------------------------------------------------------------------------------------


def test_reader_event_name_and_data() -> None:
    events = read_all([b"event: message_start\ndata: {\"a\": 1}\n\n"])

    assert len(events) == 1
    assert events[0].event == "message_start"
    assert events[0].data == '{"a": 1}'
    assert events[0].json == {"a": 1}
    assert events[0].raw == b"event: message_start\ndata: {\"a\": 1}\n\n"


def test_reader_multiple_data_lines() -> None:
    events = read_all([b"data: first\ndata:second\ndata\ndata:  indented\n\n"])

    assert fields(events) == [(None, "first\nsecond\n\n indented")]


def test_reader_comment_and_blank_lines_kept() -> None:
    stream = b": ping\n\n\ndata: x\n\n\n\n"
    events = read_all([stream])

    assert [event.raw for event in events] == [b": ping\n\n", b"\n", b"data: x\n\n", b"\n", b"\n"]
    assert fields(events) == [(None, ""), (None, ""), (None, "x"), (None, ""), (None, "")]


def test_reader_comment_inside_event() -> None:
    events = read_all([b"event: e\n: keep-alive\ndata: 1\n\n"])

    assert fields(events) == [("e", "1")]


def test_reader_ignores_id_and_retry() -> None:
    events = read_all([b"id: 7\nretry: 1000\nevent: e\ndata: 1\n\n"])

    assert fields(events) == [("e", "1")]


def test_reader_last_event_name_wins() -> None:
    events = read_all([b"event: a\nevent: b\ndata: 1\n\n"])

    assert fields(events) == [("b", "1")]


def test_reader_strips_bom_at_start() -> None:
    stream = b"\xef\xbb\xbfdata: 1\n\n\xef\xbb\xbfdata: 2\n\n"
    events = read_all([stream[:1], stream[1:]])

    assert fields(events) == [(None, "1"), (None, "")]
    assert b"".join(event.raw for event in events) == stream


def test_reader_mixed_line_ends() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\rdata: c\n\ndata: d\r\n\rdata: e\r\r\n"
    events = read_all([stream])

    assert fields(events) == [(None, "a"), (None, "b"), (None, "c"), (None, "d"), (None, "e")]
    assert [event.raw for event in events] == [
        b"data: a\r\n\r\n",
        b"data: b\r\r",
        b"data: c\n\n",
        b"data: d\r\n\r",
        b"data: e\r\r\n",
    ]


def test_reader_waits_on_trailing_cr() -> None:
    reader = SSEReader()

    assert reader.feed(b"data: a\r\n\r") == []
    events = reader.feed(b"\ndata: b\r\r")
    assert [event.raw for event in events] == [b"data: a\r\n\r\n"]
    events = reader.close()
    assert [event.raw for event in events] == [b"data: b\r\r"]


def test_reader_lone_cr_blank_line_at_end() -> None:
    reader = SSEReader()

    assert [event.raw for event in reader.feed(b"data: a\n\n\r")] == [b"data: a\n\n"]
    assert [event.raw for event in reader.feed(b"data: b\n\n")] == [b"\r", b"data: b\n\n"]


def test_reader_utf8_split_everywhere() -> None:
    stream = "data: {\"text\": \"héllo — 你好 🎉\"}\n\n".encode("utf-8")

    for position in range(len(stream) + 1):
        events = read_all([stream[:position], stream[position:]])
        assert events[0].json == {"text": "héllo — 你好 🎉"}, f"split at byte {position}"


def test_reader_invalid_utf8_replaced() -> None:
    events = read_all([b"data: \xff\xfe\n\n"])

    assert events[0].data == "\ufffd\ufffd"


def test_reader_random_streams_match_reference() -> None:
    rng = random.Random(7)
    line_ends = [b"\n", b"\r\n", b"\r"]
    lines = [b"data: {\"k\":1}", b"event: e", b": comment", b"data:x", b"", b"retry: 5", b"data"]

    for attempt in range(300):
        stream = b"".join(rng.choice(lines) + rng.choice(line_ends) for _ in range(rng.randint(1, 30)))
        if rng.random() < 0.3:
            stream += rng.choice(lines)
        events = read_all(random_pieces(stream, rng, max_size=6))

        assert fields(events) == reference_events(stream), f"attempt {attempt}: {stream!r}"
        assert b"".join(event.raw for event in events) == stream, f"attempt {attempt}: {stream!r}"


def test_reader_long_event_many_feeds() -> None:
    payload = "x" * 300_000
    stream = f"data: {payload}\n\ndata: end\n\n".encode()
    pieces = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]

    events = read_all(pieces)

    assert fields(events) == [(None, payload), (None, "end")]


# -- end of stream ---------------------------------------------------------------------------------


def test_close_returns_unterminated_event() -> None:
    reader = SSEReader()

    assert reader.feed(b"data: 1\n\nevent: e\ndata: 2") == [SSEEvent(None, "1", b"data: 1\n\n")]
    assert reader.close() == [SSEEvent("e", "2", b"event: e\ndata: 2")]
    assert reader.close() == []


def test_close_after_single_line_end() -> None:
    reader = SSEReader()

    assert reader.feed(b"data: 1\n") == []
    assert fields(reader.close()) == [(None, "1")]


def test_feed_after_close_raises() -> None:
    reader = SSEReader()
    reader.close()

    with pytest.raises(ValueError, match="after close"):
        reader.feed(b"data: 1\n\n")


def test_decoded_counts_decompressed_bytes() -> None:
    stream = b"data: 1\n\n" * 100
    reader = SSEReader("gzip")
    reader.feed(gzip.compress(stream))
    reader.close()

    assert reader.decoded == len(stream)


# -- json ------------------------------------------------------------------------------------------


def test_json_done_and_invalid_are_none() -> None:
    events = read_all([b"data: [DONE]\n\ndata: {not json\n\n: only a comment\n\n"])

    assert [event.json for event in events] == [None, None, None]


def test_json_parsed_once() -> None:
    event = read_all([b"data: {\"a\": [1]}\n\n"])[0]

    assert event.json is event.json


# -- compression -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP", "deflate", "br", "zstd"])
def test_compressed_stream_byte_by_byte(encoding: str) -> None:
    stream = "event: e\ndata: {\"t\": \"ünïcödé\"}\n\n".encode() * 20
    compress = COMPRESSORS["gzip" if "gzip" in encoding.lower() else encoding]
    compressed = compress(stream)

    events = read_all([compressed[i : i + 1] for i in range(len(compressed))], encoding)

    assert fields(events) == [("e", '{"t": "ünïcödé"}')] * 20


def test_raw_deflate_accepted() -> None:
    stream = b"data: 1\n\ndata: 2\n\n"
    compressed = deflate_raw(stream)

    events = read_all([compressed[:1], compressed[1:]], "deflate")

    assert fields(events) == [(None, "1"), (None, "2")]


def test_gzip_several_members() -> None:
    compressed = gzip.compress(b"data: 1\n\n") + gzip.compress(b"data: 2\n\n")

    assert fields(read_all([compressed], "gzip")) == [(None, "1"), (None, "2")]


@pytest.mark.parametrize("encoding", [None, "identity", "", " Identity "])
def test_identity_encodings(encoding: str | None) -> None:
    assert fields(read_all([b"data: 1\n\n"], encoding)) == [(None, "1")]


def test_unsupported_encoding_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported content-encoding 'compress'"):
        SSEReader("compress")


def test_corrupt_gzip_raises_value_error() -> None:
    reader = SSEReader("gzip")

    with pytest.raises(ValueError, match="invalid gzip data"):
        reader.feed(b"\x1f\x8b\x08\x00" + b"\xff" * 40)
