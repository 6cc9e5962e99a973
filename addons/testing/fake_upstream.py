"""A fake api.openai.com and api.anthropic.com on a loopback port, for tests and the demo.

`FakeUpstream` is a small HTTP/1.1 server (asyncio streams, keep-alive, chunked request bodies) whose
responses have the shape, headers and framing of the real APIs. Paths under ``/v1/messages`` and requests
that carry ``anthropic-version`` get Anthropic responses, everything else gets OpenAI responses. Responses
are deterministic, and these request headers steer them:

- ``x-fake-text``: the assistant text, percent-encoded UTF-8.
- ``x-fake-usage``: a JSON object in the provider's own usage field names, merged into the default usage.
- ``x-fake-tool-call``: ``1`` forces a tool call when the request offers tools, ``0`` forbids one.
- ``x-fault``: comma-separated directives ``status:N``, ``retry``, ``retry-after:SECONDS``, ``times:N``,
  ``midstream-error``, ``early-error``, ``cut`` and ``slow:SECONDS``, narrowed to some requests by
  ``model:NAME`` and ``kind:openai`` or ``kind:anthropic`` (see `parse_fault`).
- ``x-fake-gzip``: ``1`` or ``gzip`` compresses the response with gzip, ``br`` with brotli, ``0`` not at all.
- ``x-fake-crlf``: ``1`` ends SSE lines with CRLF instead of LF.
- ``x-fixture``: replays the recorded response ``<fixtures_dir>/<name>.json`` byte for byte.

Run ``python -m addons.testing.fake_upstream --port N`` to serve until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import hashlib
import http
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
import zlib
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import brotli

logger = logging.getLogger(__name__)

Headers = list[tuple[str, str]]

#: Keys the fake accepts when the caller passes no `expected_keys`.
DEFAULT_KEYS = {"openai": "sk-real-openai", "anthropic": "sk-ant-real"}

#: Assistant text when the request has no `x-fake-text` header.
DEFAULT_TEXT = "Hello from the fake upstream."

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Upper bound for `slow:SECONDS`, so that a typo cannot hang a test run.
MAX_SLOW_SECONDS = 600.0

#: Aliases and the snapshot names that the APIs reported for them (2024-2026). Other names are echoed.
MODEL_SNAPSHOTS = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "gpt-5.5": "gpt-5.5-2026-04-23",
    "o3": "o3-2025-04-16",
    "o4-mini": "o4-mini-2025-04-16",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
}

ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
HEX_DIGITS = "0123456789abcdef"
FIXTURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Azure OpenAI's deployment paths. The deployment name in them takes the place of a model name.
AZURE_DEPLOYMENT_PATH = re.compile(r"^/openai/deployments/([^/]+)/")
#: Provider kinds that `kind:` accepts. They equal the `KIND` values of the provider modules.
PROVIDER_KINDS = ("openai", "anthropic")
#: Response headers that the server sets itself from the way it frames and encodes the body.
FRAMING_HEADERS = {"content-length", "transfer-encoding", "content-encoding", "connection", "date"}


# --- records and replies ---------------------------------------------------------------------------


@dataclass(slots=True)
class ReceivedRequest:
    """One request as the fake read it off the wire."""

    method: str
    path: str
    query: str
    #: Header pairs in arrival order, names in their original case.
    headers: Headers
    body: bytes
    #: The parsed JSON body, or None when the body is empty or not JSON.
    json: Any = None
    version: str = "HTTP/1.1"
    #: 1-based number of the connection the request came on, so tests can check connection reuse.
    connection_id: int = 0

    def header(self, name: str) -> str | None:
        """Return the first value of header `name` (case-insensitive), or None."""
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), None)


@dataclass(slots=True)
class SentResponse:
    """One response as the fake wrote it.

    Fields are updated before each socket write, so a client that has read a byte finds it recorded here.
    """

    status: int
    reason: str
    headers: Headers
    #: The body before content coding.
    body: bytes = b""
    #: The body bytes as they went on the wire: after content coding, without chunked framing.
    wire_body: bytes = b""
    #: `body` split into the pieces that went out in separate socket writes.
    writes: list[bytes] = field(default_factory=list)
    #: False while the response is being written, and for good when it was cut short.
    complete: bool = False

    def header(self, name: str) -> str | None:
        """Return the first value of header `name` (case-insensitive), or None."""
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), None)


@dataclass(slots=True)
class Reply:
    """A provider module's response before the server encodes and writes it."""

    status: int
    headers: Headers
    body: bytes = b""
    #: Server-sent events, each ending in its blank line. None for a response with a plain body.
    events: list[str] | None = None
    reason: str | None = None


class BadRequest(Exception):
    """A request that the real API rejects with status 400. `param` names the invalid field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class HttpError(Exception):
    """A request that cannot be parsed as HTTP/1.1. The server responds with `status` and closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- steering headers ------------------------------------------------------------------------------


@dataclass(slots=True)
class Fault:
    """The failure that an `x-fault` header requests."""

    status: int | None = None
    #: Send `x-should-retry: true` instead of `false` with a status fault.
    retry: bool = False
    #: Seconds for `retry-after` (and `retry-after-ms`). None keeps the provider's default.
    retry_after: float | None = None
    #: Apply the fault to the first N matching requests that carry the same `x-fault` value, then respond
    #: normally. Requests that `model` or `kind` exclude do not count.
    times: int | None = None
    midstream_error: bool = False
    #: Whether a streamed response ends with an error event before its first content delta.
    early_error: bool = False
    cut: bool = False
    #: Seconds to wait before the first byte of the response.
    slow: float = 0.0
    #: The only model that the fault applies to, compared with the body's `model` and an Azure deployment name.
    model: str | None = None
    #: The only provider kind ("openai" or "anthropic") that the fault applies to, as `_provider_for` picks it.
    kind: str | None = None

    def applies_to(self, request: ReceivedRequest, kind: str) -> bool:
        """Return whether the `model` and `kind` filters select `request`, which the provider of kind `kind` serves."""
        if self.kind is not None and self.kind != kind:
            return False
        if self.model is not None and self.model not in requested_models(request):
            return False
        return True


@dataclass(slots=True)
class Steering:
    """Response options requested by the `x-fake-*`, `x-fault` and `x-fixture` headers."""

    text: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    tool_call: bool | None = None
    fault: Fault = field(default_factory=Fault)
    #: Content coding forced by `x-fake-gzip`: "gzip", "br", "identity", or None to negotiate.
    coding: str | None = None
    crlf: bool = False
    fixture: str | None = None
    #: The raw `x-fault` value, which keys the `times:N` budget.
    fault_key: str = ""


def parse_fault(value: str) -> Fault:
    """Parse an `x-fault` value such as ``status:529, model:gpt-4o, times:2``, raising ValueError for invalid input.

    Directive names are case-insensitive, and the arguments of `model:` and `kind:` are compared exactly.
    """
    fault = Fault()
    for raw in value.split(","):
        directive = raw.strip()
        if not directive:
            continue
        name, _, argument = directive.partition(":")
        name = name.strip().lower()
        argument = argument.strip()
        match name:
            case "status":
                fault.status = _parse_number(argument, directive, int, 100, 599)
            case "retry":
                fault.retry = True
            case "retry-after":
                fault.retry_after = _parse_number(argument, directive, float, 0.0, 3600.0)
            case "times":
                fault.times = _parse_number(argument, directive, int, 1, 1_000_000)
            case "midstream-error":
                fault.midstream_error = True
            case "early-error":
                fault.early_error = True
            case "cut":
                fault.cut = True
            case "slow":
                fault.slow = _parse_number(argument, directive, float, 0.0, MAX_SLOW_SECONDS)
            case "model":
                if not argument:
                    message = f"x-fault: {directive!r} is missing the model name. Use model:NAME, such as model:gpt-4o."
                    raise ValueError(message)
                fault.model = argument
            case "kind":
                if argument not in PROVIDER_KINDS:
                    raise ValueError(f"x-fault: invalid provider in {directive!r}. Use kind:openai or kind:anthropic.")
                fault.kind = argument
            case _:
                raise ValueError(
                    f"x-fault: unknown directive {directive!r}. Expected status:N, retry, retry-after:SECONDS, "
                    "times:N, midstream-error, early-error, cut, slow:SECONDS, model:NAME, kind:openai "
                    "or kind:anthropic"
                )
    return fault


def _parse_number[T: (int, float)](text: str, directive: str, kind: type[T], low: T, high: T) -> T:
    try:
        number = kind(text)
    except ValueError:
        raise ValueError(f"x-fault: invalid number in {directive!r}") from None
    if not (low <= number <= high) or (isinstance(number, float) and math.isnan(number)):
        raise ValueError(f"x-fault: {directive!r} is out of range. Use a value from {low} to {high}.")
    return number


def requested_models(request: ReceivedRequest) -> list[str]:
    """Return the model names in `request`: its JSON body's `model` and its Azure deployment name."""
    names = []
    if isinstance(request.json, dict) and isinstance(request.json.get("model"), str):
        names.append(request.json["model"])
    deployment = AZURE_DEPLOYMENT_PATH.match(request.path)
    if deployment:
        names.append(urllib.parse.unquote(deployment.group(1)))
    return names


def parse_steering(request: ReceivedRequest) -> Steering:
    """Read the steering headers of `request`, raising ValueError that names an invalid header."""
    steering = Steering()

    text = request.header("x-fake-text")
    if text is not None:
        try:
            steering.text = urllib.parse.unquote(text, encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            raise ValueError("x-fake-text: invalid percent-encoded UTF-8") from None

    usage = request.header("x-fake-usage")
    if usage is not None:
        try:
            steering.usage = json.loads(usage)
        except ValueError:
            raise ValueError(f"x-fake-usage: invalid JSON {usage!r}") from None
        if not isinstance(steering.usage, dict):
            raise ValueError("x-fake-usage: expected a JSON object")

    tool_call = request.header("x-fake-tool-call")
    if tool_call is not None:
        if tool_call not in ("0", "1"):
            raise ValueError(f"x-fake-tool-call: expected 0 or 1, got {tool_call!r}")
        steering.tool_call = tool_call == "1"

    fault = request.header("x-fault")
    if fault is not None:
        steering.fault = parse_fault(fault)
        steering.fault_key = fault

    coding = request.header("x-fake-gzip")
    if coding is not None:
        codings = {"1": "gzip", "gzip": "gzip", "br": "br", "0": "identity"}
        if coding.lower() not in codings:
            raise ValueError(f"x-fake-gzip: expected 1, gzip, br or 0, got {coding!r}")
        steering.coding = codings[coding.lower()]

    steering.crlf = request.header("x-fake-crlf") == "1"
    steering.fixture = request.header("x-fixture")
    return steering


# --- helpers shared by the provider modules --------------------------------------------------------


@dataclass(slots=True)
class Exchange:
    """A request in progress, as the provider handlers see it."""

    request: ReceivedRequest
    steering: Steering
    #: 1-based number of the request on this server. It seeds the ids, so a fresh server repeats them.
    serial: int
    #: Unix time in seconds when the request arrived.
    created: int
    _id_count: int = 0

    def make_id(self, prefix: str, length: int, *, alphabet: str = ALPHANUMERIC, name: str | None = None) -> str:
        """Return `prefix` plus `length` deterministic characters.

        Ids with the same `name` are equal within one exchange; unnamed ids are all different.
        """
        if name is None:
            self._id_count += 1
            name = str(self._id_count)
        return prefix + deterministic_token(f"{self.serial}:{name}:{prefix}", length, alphabet)

    def json_body(self) -> dict[str, Any]:
        """Return the request's JSON object, or raise BadRequest when the body is not one."""
        if not isinstance(self.request.json, dict):
            raise BadRequest("The request body must be a JSON object.")
        return self.request.json


def deterministic_token(seed: str, length: int, alphabet: str = ALPHANUMERIC) -> str:
    """Return `length` characters of `alphabet` derived from `seed` with SHA-256."""
    characters: list[str] = []
    counter = 0
    while len(characters) < length:
        digest = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        characters.extend(alphabet[byte % len(alphabet)] for byte in digest)
        counter += 1
    return "".join(characters[:length])


def resolve_model(name: str) -> str:
    """Return the snapshot name that the API reports for model alias `name`."""
    return MODEL_SNAPSHOTS.get(name, name)


def json_compact(value: Any) -> str:
    """Serialise `value` without spaces and with raw UTF-8, as both APIs write SSE data."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_indented(value: Any, indent: int) -> bytes:
    """Serialise `value` indented and newline-terminated, as OpenAI writes JSON bodies."""
    return (json.dumps(value, ensure_ascii=False, indent=indent) + "\n").encode()


def sse_event(data: str, *, event: str | None = None, crlf: bool = False) -> str:
    """Format one server-sent event, ending in the blank line that terminates it."""
    newline = "\r\n" if crlf else "\n"
    head = f"event: {event}{newline}" if event is not None else ""
    return f"{head}data: {data}{newline}{newline}"


def split_tokens(text: str) -> list[str]:
    """Split `text` into word pieces that keep their leading whitespace, so that they join back to `text`."""
    pieces = re.findall(r"\s*\S+", text)
    rest = text[sum(map(len, pieces)) :]
    if rest:
        if pieces:
            pieces[-1] += rest
        else:
            pieces = [rest]
    return pieces


def estimate_tokens(*values: Any) -> int:
    """Return a deterministic token estimate: the UTF-8 bytes of all strings in `values`, divided by 4."""
    total = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value.encode())
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return max(1, math.ceil(total / 4))


def merge_usage(default: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `default` with `override` laid over it. Nested objects are merged, and new keys go last."""
    merged = dict(default)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_usage(merged[key], value)
        else:
            merged[key] = value
    return merged


def example_arguments(schema: Any) -> dict[str, Any]:
    """Return deterministic tool arguments for a JSON Schema object: one example value per property."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    return {name: _example_value(spec) for name, spec in properties.items()}


def _example_value(spec: Any) -> Any:
    if not isinstance(spec, dict):
        return "example"
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        return spec["enum"][0]
    kind = spec.get("type")
    if isinstance(kind, list):
        kind = next((item for item in kind if item != "null"), "string")
    examples = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "null": None}
    if kind == "object":
        return example_arguments(spec)
    return examples.get(kind, "example")


def limit_pieces(pieces: list[str], limit: Any) -> tuple[list[str], bool]:
    """Cut `pieces` to `limit` tokens when `limit` is a positive int, and return whether it cut any."""
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(pieces):
        return pieces[:limit], True
    return pieces, False


# --- wire: reading requests ------------------------------------------------------------------------


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> ReceivedRequest | None:
    """Read one request. Return None at a clean end of the connection, and raise HttpError on bad framing."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise HttpError(400, "the connection ended inside a request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes") from None

    lines = head.lstrip(b"\r\n")[:-4].split(b"\r\n")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, f"invalid request line {lines[0][:200]!r}") from None
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, f"unsupported HTTP version {version!r}")

    headers: Headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise HttpError(400, f"invalid header line {line[:200]!r}")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))

    if target.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(target)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
    path, _, query = target.partition("?")
    request = ReceivedRequest(method, path, query, headers, b"", None, version)

    if (request.header("expect") or "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.body = await _read_body(reader, request)
    if request.body:
        with suppress(ValueError):
            request.json = json.loads(request.body)
    return request


async def _read_body(reader: asyncio.StreamReader, request: ReceivedRequest) -> bytes:
    transfer_encoding = (request.header("transfer-encoding") or "").lower()
    if transfer_encoding:
        if transfer_encoding.split(",")[-1].strip() != "chunked":
            raise HttpError(501, f"unsupported transfer-encoding {transfer_encoding!r}")
        return await _read_chunked(reader)

    length_header = request.header("content-length")
    if length_header is None:
        return b""
    if not length_header.isdigit():
        raise HttpError(400, f"invalid content-length {length_header!r}")
    length = int(length_header)
    if length > MAX_BODY_BYTES:
        raise HttpError(413, f"the request body has {length} bytes, more than the limit of {MAX_BODY_BYTES}")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise HttpError(400, "the connection ended inside the request body") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    try:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise HttpError(400, f"invalid chunk size line {size_line[:100]!r}") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailer fields are read and dropped
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise HttpError(413, f"the chunked request body exceeds {MAX_BODY_BYTES} bytes")
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise HttpError(400, "a request body chunk does not end in CRLF")
    except asyncio.IncompleteReadError:
        raise HttpError(400, "the connection ended inside the chunked request body") from None
    except asyncio.LimitOverrunError:
        raise HttpError(400, "a chunk size line is too long") from None


# --- wire: writing responses -----------------------------------------------------------------------


class BodyEncoder:
    """Content coding that is flushed after every piece, so that a compressed stream stays incremental."""

    def __init__(self, coding: str | None) -> None:
        self.coding = coding
        self._gzip = zlib.compressobj(wbits=31) if coding == "gzip" else None
        self._brotli = brotli.Compressor() if coding == "br" else None

    def encode(self, piece: bytes) -> bytes:
        """Return the coded bytes of `piece`. A decoder that reads them can output all of `piece`."""
        if self._gzip is not None:
            return self._gzip.compress(piece) + self._gzip.flush(zlib.Z_SYNC_FLUSH)
        if self._brotli is not None:
            return self._brotli.process(piece) + self._brotli.flush()
        return piece

    def finish(self) -> bytes:
        """Return the bytes that end the coded stream."""
        if self._gzip is not None:
            return self._gzip.flush(zlib.Z_FINISH)
        if self._brotli is not None:
            return self._brotli.finish()
        return b""


def plan_writes(events: list[bytes]) -> list[bytes]:
    """Split an event stream into the pieces for separate socket writes.

    Each event is cut twice: after the first byte of its first multi-byte UTF-8 character (at its
    midpoint when it has none), and between the two line breaks that end it. So write boundaries fall
    inside events, inside UTF-8 characters and inside the blank-line terminator, the same way every time.
    """
    cuts: set[int] = set()
    offset = 0
    for event in events:
        lead = next((index for index, byte in enumerate(event) if byte >= 0xC0), None)
        cuts.add(offset + (lead + 1 if lead is not None else len(event) // 2))
        if event.endswith((b"\n\n", b"\r\n")):
            cuts.add(offset + len(event) - 1)
        offset += len(event)
    stream = b"".join(events)
    points = sorted(point for point in cuts if 0 < point < len(stream))
    return [stream[start:end] for start, end in zip([0, *points], [*points, len(stream)])]


def split_sse_text(text: str) -> list[str]:
    """Split a recorded event stream into events, each keeping its terminating blank line."""
    return [part for part in re.split(r"(?<=\n\n)", text) if part]


def choose_coding(accept_encoding: str) -> str | None:
    """Return "br" or "gzip" if the `Accept-Encoding` value allows it (brotli first), else None."""
    accepted: set[str] = set()
    for item in accept_encoding.split(","):
        coding, _, parameters = item.strip().partition(";")
        quality = parameters.strip().removeprefix("q=")
        if quality and quality.replace(".", "", 1).isdigit() and float(quality) == 0:
            continue
        accepted.add(coding.strip().lower())
    for coding in ("br", "gzip"):
        if coding in accepted or "*" in accepted:
            return coding
    return None


def status_reason(status: int) -> str:
    """Return the reason phrase for `status`, including 529 (Anthropic's overloaded status), which `http` lacks."""
    if status == 529:
        return "Overloaded"
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- the server ------------------------------------------------------------------------------------


class FakeUpstream:
    """Loopback HTTP/1.1 server that responds like api.openai.com and api.anthropic.com.

    Use `start`/`stop` from async code or `start_in_thread`/`stop_thread` (or ``with``) from sync code.
    `received` and `sent` record every exchange in arrival order, and `sent[i]` is the response to
    `received[i]` (a request with broken HTTP framing is in neither). `errors` collects exceptions raised
    while responding, which tests should expect to stay empty.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        chunk_delay: float = 0.0,
        expected_keys: dict[str, str] | None = None,
        fixtures_dir: str | Path | None = None,
        compress: bool = False,
    ) -> None:
        """Configure the server; `port` 0 picks a free port.

        `chunk_delay` is the pause in seconds between the writes of a streamed body. `expected_keys` maps
        a provider kind ("openai", "anthropic") to the only key it accepts. A kind missing from the map
        accepts any request, with or without a key. `fixtures_dir` contains the recordings for `x-fixture`.
        With `compress`, bodies are compressed whenever the client's `Accept-Encoding` allows br or gzip.
        """
        self.host = host
        self.port = port
        self.chunk_delay = chunk_delay
        self.expected_keys = dict(DEFAULT_KEYS if expected_keys is None else expected_keys)
        self.fixtures_dir = Path(fixtures_dir) if fixtures_dir is not None else None
        self.compress = compress
        self.received: list[ReceivedRequest] = []
        self.sent: list[SentResponse] = []
        self.errors: list[BaseException] = []
        self._fault_uses: dict[str, int] = {}
        self._serial = 0
        self._connection_count = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The server's origin, such as ``http://127.0.0.1:8123``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def clear(self) -> None:
        """Forget the recorded exchanges, errors and `times:N` fault budgets."""
        self.received.clear()
        self.sent.clear()
        self.errors.clear()
        self._fault_uses.clear()

    # lifecycle

    async def start(self) -> None:
        """Start listening on the running event loop, and set `port` to the bound port."""
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port, limit=MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("fake upstream listening on %s", self.base_url)

    async def stop(self) -> None:
        """Stop listening and close every open connection, including streams in progress."""
        if self._server is None:
            return
        self._server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        logger.info("fake upstream on %s stopped", self.base_url)

    def start_in_thread(self, timeout: float = 10.0) -> FakeUpstream:
        """Run the server on its own event loop in a daemon thread, and return self once it is listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except OSError as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the fake upstream did not start listening within {timeout} s")
        if failure:
            raise failure[0]
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with `start_in_thread` and wait for its thread to end."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start_in_thread()

    def __exit__(self, *exc_info: object) -> None:
        self.stop_thread()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # connections

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        self._connection_count += 1
        connection_id = self._connection_count
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            keep_alive = True
            while keep_alive:
                try:
                    request = await read_request(reader, writer)
                except HttpError as exc:
                    logger.warning(
                        "fake upstream rejected a request on connection %d from %s with %d: %s",
                        connection_id,
                        peer,
                        exc.status,
                        exc.message,
                    )
                    await _write_http_error(writer, exc)
                    break
                if request is None:
                    break
                request.connection_id = connection_id
                self.received.append(request)
                self._serial += 1
                keep_alive = await self._respond(writer, request, self._serial)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("fake upstream connection %d from %s ended early: %r", connection_id, peer, exc)
        except asyncio.CancelledError:
            # `stop` cancels open connections. The task ends normally here because asyncio 3.12.1 logs
            # a cancelled `start_server` connection task as an unhandled error.
            logger.debug("fake upstream closed a connection while stopping")
        except Exception as exc:  # a bug in the fake: record it for the test, and close the connection
            logger.exception("fake upstream failed to respond on connection %d from %s", connection_id, peer)
            self.errors.append(exc)
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, request: ReceivedRequest, serial: int) -> bool:
        """Respond to one request, and return whether the connection stays open for the next one."""
        reply, steering = self._build_reply(request, serial)
        connection = (request.header("connection") or "").lower()
        if request.version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:
            keep_alive = "keep-alive" in connection
        coding = steering.coding
        if coding is None and self.compress:
            coding = choose_coding(request.header("accept-encoding") or "")
        if coding == "identity":
            coding = None
        return await self._write_reply(writer, request, reply, steering.fault, coding, keep_alive)

    def _build_reply(self, request: ReceivedRequest, serial: int) -> tuple[Reply, Steering]:
        provider = _provider_for(request)
        steering_error = None
        try:
            steering = parse_steering(request)
        except ValueError as exc:
            steering, steering_error = Steering(), str(exc)
        exchange = Exchange(request, steering, serial, int(time.time()))

        expected = self.expected_keys.get(provider.KIND)
        presented = provider.presented_key(request)
        if expected is not None and presented != expected:
            logger.info("fake upstream: %s %s rejected with 401 (wrong or missing key)", request.method, request.path)
            return provider.authentication_error(exchange, presented), steering
        if steering_error is not None:
            logger.info("fake upstream: 400 for %s %s: %s", request.method, request.path, steering_error)
            return provider.invalid_request_error(exchange, steering_error), steering

        if not steering.fault.applies_to(request, provider.KIND):
            logger.debug(
                "fake upstream: x-fault %r does not match %s %s, so the fake responds normally",
                steering.fault_key,
                request.method,
                request.path,
            )
            steering.fault = Fault()
        self._spend_fault_budget(steering)
        if steering.fault.status is not None:
            status = steering.fault.status
            logger.info("fake upstream: x-fault sets status %d for %s %s", status, request.method, request.path)
            return provider.fault_error(exchange, steering.fault.status), steering
        if steering.fixture is not None:
            return self._replay_fixture(provider, exchange, steering.fixture), steering

        handler = provider.route(request.method, request.path)
        if handler is None:
            logger.info("fake upstream: 404 for %s %s, which it does not serve", request.method, request.path)
            return provider.not_found_error(exchange), steering
        try:
            return handler(exchange), steering
        except BadRequest as exc:
            logger.info("fake upstream: 400 for %s %s: %s", request.method, request.path, exc.message)
            return provider.invalid_request_error(exchange, exc.message, exc.param), steering

    def _spend_fault_budget(self, steering: Steering) -> None:
        """Drop the fault once `times:N` requests with the same `x-fault` value have had it."""
        times = steering.fault.times
        if times is None:
            return
        used = self._fault_uses.get(steering.fault_key, 0)
        if used >= times:
            steering.fault = Fault()
        else:
            self._fault_uses[steering.fault_key] = used + 1

    def _replay_fixture(self, provider: ModuleType, exchange: Exchange, name: str) -> Reply:
        if self.fixtures_dir is None:
            logger.warning("fake upstream: x-fixture %r sent, but no fixtures_dir is configured", name)
            return provider.not_found_error(exchange, "x-fixture needs a FakeUpstream(fixtures_dir=...)")
        path = self.fixtures_dir / f"{name}.json"
        if not FIXTURE_NAME.fullmatch(name) or not path.is_file():
            logger.warning("fake upstream: x-fixture %r not found in %s", name, self.fixtures_dir)
            return provider.not_found_error(exchange, f"fixture {name!r} not found in {self.fixtures_dir}")
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))["response"]
            headers = [(key, str(value)) for key, value in recorded["headers"].items()]
            status, reason, text = int(recorded["status"]), recorded.get("reason"), recorded["body"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("fake upstream: fixture %s is unreadable: %r", path, exc)
            return provider.not_found_error(exchange, f"fixture {name!r} is unreadable: {exc!r}")

        content_type = next((value for key, value in headers if key.lower() == "content-type"), "")
        if content_type.startswith("text/event-stream"):
            return Reply(status, headers, events=split_sse_text(text), reason=reason)
        return Reply(status, headers, text.encode(), reason=reason)

    async def _write_reply(
        self,
        writer: asyncio.StreamWriter,
        request: ReceivedRequest,
        reply: Reply,
        fault: Fault,
        coding: str | None,
        keep_alive: bool,
    ) -> bool:
        """Write `reply` with its framing, coding and faults, and return whether the connection stays open."""
        streaming = reply.events is not None
        chunked = streaming and request.version == "HTTP/1.1"
        if fault.cut or (streaming and not chunked):
            keep_alive = False

        encoder = BodyEncoder(coding)
        headers = [(name, value) for name, value in reply.headers if name.lower() not in FRAMING_HEADERS]
        headers.append(("date", email.utils.formatdate(usegmt=True)))
        if coding is not None:
            headers.append(("content-encoding", coding))
        if streaming:
            pieces = plan_writes([event.encode() for event in reply.events or []])
            if chunked:
                headers.append(("transfer-encoding", "chunked"))
        else:
            wire = encoder.encode(reply.body) + encoder.finish()
            headers.append(("content-length", str(len(wire))))
        if not keep_alive:
            headers.append(("connection", "close"))

        sent = SentResponse(reply.status, reply.reason or status_reason(reply.status), headers)
        self.sent.append(sent)
        if fault.slow:
            await asyncio.sleep(fault.slow)
        head = f"HTTP/1.1 {sent.status} {sent.reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        writer.write(head.encode("latin-1"))

        if streaming:
            await self._write_stream(writer, sent, pieces, encoder, chunked=chunked, cut=fault.cut)
        else:
            await _write_whole(writer, sent, reply.body, wire, cut=fault.cut)
        if not sent.complete:
            logger.info("fake upstream: x-fault cut the response to %s %s", request.method, request.path)
        return keep_alive

    async def _write_stream(
        self,
        writer: asyncio.StreamWriter,
        sent: SentResponse,
        pieces: list[bytes],
        encoder: BodyEncoder,
        *,
        chunked: bool,
        cut: bool,
    ) -> None:
        """Write `pieces` one socket write each. With `cut`, close the connection after half of them."""
        cut_at = max(1, len(pieces) // 2) if cut else None
        for index, piece in enumerate(pieces):
            if index == cut_at:
                writer.close()
                return
            data = encoder.encode(piece)
            sent.writes.append(piece)
            sent.body += piece
            sent.wire_body += data
            writer.write(_chunk(data) if chunked else data)
            await writer.drain()
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        if cut:
            writer.close()
            return

        tail = encoder.finish()
        sent.wire_body += tail
        sent.complete = True
        if chunked:
            writer.write((_chunk(tail) if tail else b"") + b"0\r\n\r\n")
        else:
            writer.write(tail)
        await writer.drain()


async def _write_whole(
    writer: asyncio.StreamWriter, sent: SentResponse, body: bytes, wire: bytes, *, cut: bool
) -> None:
    """Write a Content-Length body in one write. With `cut`, write half of it and close the connection."""
    if cut:
        wire = wire[: len(wire) // 2]
        sent.wire_body = wire
        writer.write(wire)
        await writer.drain()
        writer.close()
        return
    sent.writes.append(body)
    sent.body = body
    sent.wire_body = wire
    sent.complete = True
    writer.write(wire)
    await writer.drain()


async def _write_http_error(writer: asyncio.StreamWriter, error: HttpError) -> None:
    body = f"{error.message}\n".encode()
    head = (
        f"HTTP/1.1 {error.status} {status_reason(error.status)}\r\n"
        f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    with suppress(ConnectionError):
        await writer.drain()


def _provider_for(request: ReceivedRequest) -> ModuleType:
    """Return the provider module that handles `request`."""
    # Imported here because both provider modules import this module's shared types and helpers.
    from addons.testing import fake_anthropic, fake_openai

    if request.path.startswith("/v1/messages") or request.header("anthropic-version") is not None:
        return fake_anthropic
    return fake_openai


# --- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Serve a fake upstream until SIGINT or SIGTERM, after printing the bound port on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m addons.testing.fake_upstream",
        description="Serve a fake api.openai.com and api.anthropic.com over plain HTTP on a local port.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="TCP port to listen on, or 0 for a free port (default: 0)")
    parser.add_argument(
        "--chunk-delay", type=float, default=0.0, help="seconds to wait between the writes of a stream (default: 0)"
    )
    parser.add_argument("--fixtures-dir", type=Path, help="directory of recorded fixtures for x-fixture")
    parser.add_argument("--compress", action="store_true", help="compress when Accept-Encoding allows br or gzip")
    parser.add_argument("--openai-key", default=DEFAULT_KEYS["openai"], help="the only OpenAI key accepted")
    parser.add_argument("--anthropic-key", default=DEFAULT_KEYS["anthropic"], help="the only Anthropic key accepted")
    parser.add_argument("--log-level", default="INFO", help="logging level for stderr (default: %(default)s)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    fake = FakeUpstream(
        args.host,
        args.port,
        chunk_delay=args.chunk_delay,
        expected_keys={"openai": args.openai_key, "anthropic": args.anthropic_key},
        fixtures_dir=args.fixtures_dir,
        compress=args.compress,
    )
    return asyncio.run(_serve_until_signal(fake))


async def _serve_until_signal(fake: FakeUpstream) -> int:
    try:
        await fake.start()
    except OSError as exc:
        logger.error("fake upstream could not listen on %s:%d: %s", fake.host, fake.port, exc)
        return 1
    print(fake.port, flush=True)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await fake.stop()
    return 0


if __name__ == "__main__":
    # Run the imported module's `main`, so that the provider modules and this one share one set of types.
    from addons.testing.fake_upstream import main as module_main

    sys.exit(module_main())
