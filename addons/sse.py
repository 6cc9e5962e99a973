"""Incremental reader for server-sent events (SSE) as they arrive from upstream.

`SSEReader.feed` takes network reads (compressed as upstream sent them) and returns the events that
became complete. Line endings follow the WHATWG event-stream rules: CRLF, LF or a lone CR ends a line,
and an empty line ends an event. Every decoded byte belongs to exactly one returned event, so joining
the `raw` of all events from `feed` and `close` reproduces the decoded stream. Blocks without a `data:`
line (comments such as ``: ping``, or extra blank lines) are returned as events too, with empty `data`,
so that a proxy can forward them.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["SSEEvent", "SSEReader", "make_decompressor"]

_UNPARSED: Any = object()
_UTF8_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = 0x0A

# An empty line after a line end: the end of an event. `\r(?!\n)` keeps CRLF a single line end.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
# The longest event end is CRLF CRLF, so a search resumed this many bytes back cannot miss one.
_EVENT_END_OVERLAP = 4


@dataclass(slots=True)
class SSEEvent:
    """One event of an event stream."""

    #: Value of the last `event:` line, or None when the event has none.
    event: str | None
    #: The `data:` lines joined with "\n" (empty for comments and blank lines).
    data: str
    #: The decoded bytes of this event as received, including the blank line that ends it.
    #: Rewriting plugins may replace it, because the gateway sends `raw` to the client.
    raw: bytes
    _json: Any = field(default=_UNPARSED, init=False, repr=False, compare=False)

    @property
    def json(self) -> Any:
        """The parsed `data`, or None for "[DONE]", empty data or invalid JSON. Parsed once."""
        if self._json is _UNPARSED:
            self._json = _parse_json(self.data)
        return self._json


def _parse_json(data: str) -> Any:
    if not data or data == "[DONE]":
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


class _Decompressor(Protocol):
    def decompress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _ZlibDecompressor:
    """gzip (several members allowed) or HTTP deflate, which is zlib-wrapped or, from some servers, raw."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._head = b""
        self._obj: Any = None
        if encoding == "gzip":
            self._obj = zlib.decompressobj(zlib.MAX_WBITS | 16)

    def _start_deflate(self, data: bytes) -> bytes:
        # A zlib header is two bytes whose big-endian value is a multiple of 31, with method 8 (deflate).
        self._head += data
        if len(self._head) < 2:
            return b""
        cmf, flg = self._head[0], self._head[1]
        zlib_wrapped = cmf & 0x0F == 8 and (cmf * 256 + flg) % 31 == 0
        self._obj = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
        data, self._head = self._head, b""
        return data

    def decompress(self, data: bytes) -> bytes:
        if self._obj is None:
            data = self._start_deflate(data)
            if self._obj is None:
                return b""
        out = self._obj.decompress(data)
        # A gzip body may contain several members, and each one needs a new decompressor.
        while self._encoding == "gzip" and self._obj.eof and self._obj.unused_data:
            rest = self._obj.unused_data
            self._obj = zlib.decompressobj(zlib.MAX_WBITS | 16)
            out += self._obj.decompress(rest)
        return out

    def flush(self) -> bytes:
        if self._obj is None:
            return b""
        return self._obj.flush()


class _BrotliDecompressor:
    def __init__(self) -> None:
        import brotli

        self._obj = brotli.Decompressor()

    def decompress(self, data: bytes) -> bytes:
        return self._obj.process(data)

    def flush(self) -> bytes:
        return b""


class _ZstdDecompressor:
    """zstd (several frames allowed), from `compression.zstd` (Python 3.14) or `backports.zstd`."""

    def __init__(self) -> None:
        try:
            from compression import zstd  # type: ignore[import-not-found]
        except ImportError:
            from backports import zstd  # type: ignore[import-not-found,no-redef]
        self._module = zstd
        self._obj = zstd.ZstdDecompressor()

    def decompress(self, data: bytes) -> bytes:
        out = self._obj.decompress(data)
        while self._obj.eof and self._obj.unused_data:
            rest = self._obj.unused_data
            self._obj = self._module.ZstdDecompressor()
            out += self._obj.decompress(rest)
        return out

    def flush(self) -> bytes:
        return b""


def make_decompressor(content_encoding: str | None) -> _Decompressor | None:
    """Return an incremental decoder for a `content-encoding` value, or None for identity.

    :raises ValueError: for an encoding other than gzip, deflate, br, zstd and identity.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return _ZlibDecompressor("gzip")
    if encoding == "deflate":
        return _ZlibDecompressor("deflate")
    try:
        if encoding == "br":
            return _BrotliDecompressor()
        if encoding == "zstd":
            return _ZstdDecompressor()
    except ImportError as e:
        raise ValueError(f"content-encoding {encoding!r} needs a module that is not installed: {e}") from e
    raise ValueError(
        f"unsupported content-encoding {content_encoding!r}: expected gzip, deflate, br, zstd or identity"
    )


class SSEReader:
    """Split a (possibly compressed) event stream into events, across any split of the input.

    A reader is not thread-safe. Use one reader per response.
    """

    def __init__(self, content_encoding: str | None = None) -> None:
        """Create a reader for a body sent with this `Content-Encoding` header value.

        :raises ValueError: for an encoding other than gzip, deflate, br, zstd or identity, or when the
            module for br or zstd is missing.
        """
        self._encoding = content_encoding
        self._decompressor = make_decompressor(content_encoding)
        #: Count of decoded (decompressed) bytes received so far.
        self.decoded = 0
        self._buffer = bytearray()
        # Offset in `_buffer` before which no event end can start. It saves rescanning a long event.
        self._scan_from = 0
        # LF-only streams use a plain bytes.find. The regular expression is needed once a CR shows up.
        self._seen_cr = False
        self._at_stream_start = True
        self._closed = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add one network read and return the events it completed, in order.

        :raises ValueError: when the compressed data is invalid, or after `close`.
        """
        if self._closed:
            raise ValueError("SSEReader.feed called after close")
        data = self._decompress(chunk)
        if not data:
            return []
        self._append(data)
        return self._take_events(final=False)

    def close(self) -> list[SSEEvent]:
        """End the stream: flush the decompressor and return the remaining events.

        The last event may lack its terminating blank line when the stream was cut. It is returned
        anyway, so its bytes are not lost. Calling `close` again returns an empty list.
        """
        if self._closed:
            return []
        self._closed = True
        if self._decompressor is not None:
            try:
                tail = self._decompressor.flush()
            except zlib.error as e:
                raise ValueError(f"invalid {self._encoding} data in the event stream: {e}") from e
            if tail:
                self._append(tail)
        events = self._take_events(final=True)
        if self._buffer:
            events.append(self._parse_event(bytes(self._buffer)))
            self._buffer.clear()
        return events

    def _decompress(self, chunk: bytes) -> bytes:
        if self._decompressor is None:
            return chunk
        try:
            return self._decompressor.decompress(chunk)
        except Exception as e:
            # zlib.error, brotli.error and zstd.ZstdError share no base class but Exception.
            raise ValueError(f"invalid {self._encoding} data in the event stream: {e}") from e

    def _append(self, data: bytes) -> None:
        self.decoded += len(data)
        if not self._seen_cr and b"\r" in data:
            self._seen_cr = True
        self._buffer += data

    def _take_events(self, final: bool) -> list[SSEEvent]:
        buffer = self._buffer
        events: list[SSEEvent] = []
        start = 0
        while start < len(buffer):
            end = self._find_event_end(start, final)
            if end < 0:
                break
            events.append(self._parse_event(bytes(buffer[start:end])))
            start = end
        if start:
            # Deleting from the front of a bytearray does not move the remaining bytes in CPython.
            del buffer[:start]
            self._scan_from = max(0, self._scan_from - start)
        return events

    def _find_event_end(self, start: int, final: bool) -> int:
        """Return the offset just after the event starting at `start`, or -1 if it is incomplete."""
        buffer = self._buffer
        size = len(buffer)

        # An event that starts with a line end is a lone blank line.
        first = buffer[start]
        if first == _LF:
            return start + 1
        if first == _CR:
            if start + 1 < size:
                return start + 2 if buffer[start + 1] == _LF else start + 1
            # A CR at the end of the buffer may be the first half of a CRLF.
            return size if final else -1

        scan = max(start, self._scan_from)
        if not self._seen_cr:
            found = buffer.find(b"\n\n", scan)
            if found >= 0:
                self._scan_from = 0
                return found + 2
        else:
            match = _EVENT_END.search(buffer, scan)
            if match is not None:
                end = match.end()
                if end < size or buffer[end - 1] != _CR or final:
                    self._scan_from = 0
                    return end
        self._scan_from = max(start, size - _EVENT_END_OVERLAP)
        return -1

    def _parse_event(self, raw: bytes) -> SSEEvent:
        text = raw
        if self._at_stream_start:
            self._at_stream_start = False
            if text.startswith(_UTF8_BOM):
                text = text[len(_UTF8_BOM) :]

        event_name: str | None = None
        data_lines: list[bytes] = []
        # bytes.splitlines splits on exactly CRLF, CR and LF, the SSE line ends.
        for line in text.splitlines():
            if not line or line[0] == 0x3A:  # blank line or ":" comment
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data_lines.append(value)
            elif name == b"event":
                event_name = value.decode("utf-8", "replace")
            # "id" and "retry" only matter to a client that reconnects, which the gateway never does.

        if len(data_lines) == 1:
            data = data_lines[0].decode("utf-8", "replace")
        else:
            data = b"\n".join(data_lines).decode("utf-8", "replace")
        return SSEEvent(event=event_name, data=data, raw=raw)
