"""End-to-end tests of the proxied endpoints: official SDKs -> HTTPS_PROXY -> gateway -> fake upstream.

Each test calls one endpoint the way a container would, with an SDK that reads HTTPS_PROXY and
SSL_CERT_FILE. It then checks what the SDK parsed, compares the bytes the client received with the bytes
the fake upstream sent, and checks the DuckDB row of the call with exact token counts and costs.

Expected costs are written out from the per-million-token prices of genai-prices 0.2.3 (or the rules'
price override), so a wrong count or a token priced twice changes the Decimal.
"""

from __future__ import annotations

import json
import re
import ssl
import struct
import urllib.parse
import uuid
import zlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import brotli
import httpx2
import pytest

from addons.testing.fake_openai import embedding_vector
from addons.testing.fake_upstream import DEFAULT_TEXT, FakeUpstream, ReceivedRequest, SentResponse
from addons.testing.gateway_process import GatewayProcess, start_gateway
from conftest import (
    ALPHA_KEY,
    ANTHROPIC_REAL_KEY,
    GATEWAY_ENV,
    OPENAI_REAL_KEY,
    anthropic_client,
    openai_client,
    rules_text,
    use_gateway,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "recorded"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json")) if FIXTURES.is_dir() else []

REQUEST_ID_HEADER = "x-tollhouse-request-id"
#: Request header with a value unique to one test call, to find that call in the shared fake's records.
CASE_HEADER = "x-test-case"

PROMPT = "Say hello."
CHAT_MESSAGES = [{"role": "user", "content": PROMPT}]
MAX_TOKENS = 256
UTF8_TEXT = "Grüße 👋 日本"

#: Seconds the slow fake upstream waits after each socket write of a stream.
CHUNK_DELAY = 0.2
CLIENT_TIMEOUT = 20.0


# --- scenarios: steering usage, and the row it must produce ----------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A call's model and usage as the fake reports it, with the row columns the gateway must log."""

    provider: str
    endpoint: str
    model: str
    response_model: str
    #: The usage in the provider's own field names, sent as `x-fake-usage`.
    usage: dict[str, Any]
    #: Normalised token columns. Input, cache reads and cache writes are disjoint, and output includes reasoning.
    tokens: dict[str, int]
    cost_usd: Decimal | None
    price_flag: str = "priced"

    def expected_row(self, *, stream: bool) -> dict[str, Any]:
        columns = {
            "project": "alpha",
            "provider": self.provider,
            "endpoint": self.endpoint,
            "model": self.model,
            "response_model": self.response_model,
            "stream": stream,
            "status": 200,
            "error": None,
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
            "cache_write_1h_tokens": 0,
            "reasoning_tokens": 0,
            "cost_usd": self.cost_usd,
            "price_flag": self.price_flag,
        }
        columns.update(self.tokens)
        return columns


CHAT = Scenario(
    provider="openai",
    endpoint="chat.completions",
    model="gpt-4o-mini",
    response_model="gpt-4o-mini-2024-07-18",
    usage={"prompt_tokens": 1000, "completion_tokens": 500},
    tokens={"input_tokens": 1000, "output_tokens": 500},
    # 1000 x $0.15 + 500 x $0.60 per 1M
    cost_usd=Decimal("0.00045"),
)

CHAT_CACHED_REASONING = Scenario(
    provider="openai",
    endpoint="chat.completions",
    model="gpt-5-mini",
    response_model="gpt-5-mini-2025-08-07",
    usage={
        "prompt_tokens": 2000,
        "completion_tokens": 800,
        "prompt_tokens_details": {"cached_tokens": 1500},
        "completion_tokens_details": {"reasoning_tokens": 600},
    },
    tokens={"input_tokens": 500, "cache_read_tokens": 1500, "output_tokens": 800, "reasoning_tokens": 600},
    # 500 x $0.25 + 1500 x $0.025 + 800 x $2.00 per 1M. The 600 reasoning tokens are part of the 800.
    cost_usd=Decimal("0.0017625"),
)

RESPONSES = Scenario(
    provider="openai",
    endpoint="responses",
    model="gpt-5",
    response_model="gpt-5-2025-08-07",
    usage={
        "input_tokens": 1000,
        "input_tokens_details": {"cached_tokens": 400},
        "output_tokens": 300,
        "output_tokens_details": {"reasoning_tokens": 100},
    },
    tokens={"input_tokens": 600, "cache_read_tokens": 400, "output_tokens": 300, "reasoning_tokens": 100},
    # 600 x $1.25 + 400 x $0.125 + 300 x $10.00 per 1M
    cost_usd=Decimal("0.0038"),
)

EMBEDDINGS = Scenario(
    provider="openai",
    endpoint="embeddings",
    model="text-embedding-3-small",
    response_model="text-embedding-3-small",
    usage={"prompt_tokens": 1000},
    tokens={"input_tokens": 1000},
    # 1000 x $0.02 per 1M
    cost_usd=Decimal("0.00002"),
)

MESSAGES = Scenario(
    provider="anthropic",
    endpoint="messages",
    model="claude-sonnet-4-5",
    response_model="claude-sonnet-4-5-20250929",
    usage={
        "input_tokens": 500,
        "cache_read_input_tokens": 200,
        "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 100},
        "output_tokens": 500,
    },
    tokens={
        "input_tokens": 500,
        "cache_read_tokens": 200,
        "cache_write_tokens": 300,
        "cache_write_1h_tokens": 100,
        "output_tokens": 500,
    },
    # 500 x $3.00 + 200 x $0.30 (read) + 200 x $3.75 (5m write) + 100 x $6.00 (1h write) + 500 x $15.00 per 1M
    cost_usd=Decimal("0.01041"),
)

#: The usage scenario of each raw stream kind (see `open_raw_stream`).
STREAM_SCENARIOS = {"chat": CHAT, "chat-injected": CHAT, "responses": RESPONSES, "messages": MESSAGES}


# --- helpers ---------------------------------------------------------------------------------------


def steering_headers(
    usage: dict[str, Any], *, text: str | None = None, coding: str | None = None, crlf: bool = False
) -> dict[str, str]:
    """Return request headers that steer the fake upstream, plus a unique `x-test-case` value."""
    headers = {CASE_HEADER: uuid.uuid4().hex, "x-fake-usage": json.dumps(usage)}
    if text is not None:
        headers["x-fake-text"] = urllib.parse.quote(text)
    if coding is not None:
        headers["x-fake-gzip"] = coding
    if crlf:
        headers["x-fake-crlf"] = "1"
    return headers


def upstream_exchange(upstream: FakeUpstream, headers: dict[str, str]) -> tuple[ReceivedRequest, SentResponse]:
    """Return the request the fake received with the `x-test-case` value of `headers`, and its response."""
    case = headers[CASE_HEADER]
    for index, request in enumerate(upstream.received):
        if request.header(CASE_HEADER) == case:
            return request, upstream.sent[index]
    raise AssertionError(f"the fake upstream received no request with {CASE_HEADER}: {case}")


def assert_row(row: dict[str, Any], expected: dict[str, Any]) -> None:
    """Assert each expected column of a DuckDB row, naming the column on failure."""
    for column, value in expected.items():
        assert row[column] == value, f"column {column}: expected {value!r}, got {row[column]!r}"


def split_events(stream: bytes) -> list[bytes]:
    """Split an event stream into events, each ending in its blank line (LF or CRLF framing)."""
    return [event for event in re.split(rb"(?<=\r\n\r\n)|(?<=\n\n)", stream) if event]


def event_json(event: bytes) -> Any:
    """Return the parsed `data:` line of one event, or None for `[DONE]` and events without JSON data."""
    for line in event.splitlines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            return json.loads(line.removeprefix(b"data: "))
    return None


def without_usage_reports(upstream_body: bytes) -> bytes:
    """Return a chat stream as the client expects it after the gateway turned `include_usage` on.

    The client did not request usage, so the `"choices": []` usage chunk is dropped, and the
    `"usage":null` member that the option adds to every other chunk is removed.
    """
    client_events = []
    for event in split_events(upstream_body):
        chunk = event_json(event)
        if isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict):
            continue
        client_events.append(event.replace(b',"usage":null', b""))
    return b"".join(client_events)


def decode_body(wire: bytes, coding: str | None) -> bytes:
    if coding == "gzip":
        return zlib.decompress(wire, wbits=31)
    if coding == "br":
        return brotli.decompress(wire)
    return wire


@dataclass
class SdkCall:
    """What an SDK call returned: the gateway's request id, the parsed text and the parsed usage."""

    request_id: str
    text: str
    #: The SDK's usage object, or None when the response carried no usage.
    usage: Any = None
    #: `output_text` of the final response object of a Responses stream.
    output_text: str | None = None


def call_chat(headers: dict[str, str], *, stream: bool, model: str = CHAT.model) -> SdkCall:
    """Call Chat Completions through the gateway, streaming without `stream_options` when `stream`."""
    client = openai_client()
    if not stream:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=CHAT_MESSAGES, extra_headers=headers
        )
        completion = raw.parse()
        return SdkCall(raw.headers[REQUEST_ID_HEADER], completion.choices[0].message.content, completion.usage)

    chunks = client.chat.completions.create(model=model, messages=CHAT_MESSAGES, stream=True, extra_headers=headers)
    pieces: list[str] = []
    usage = None
    with chunks:
        request_id = chunks.response.headers[REQUEST_ID_HEADER]
        for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)
    return SdkCall(request_id, "".join(pieces), usage)


def call_responses(headers: dict[str, str], *, stream: bool, model: str = RESPONSES.model) -> SdkCall:
    """Call the Responses API through the gateway."""
    client = openai_client()
    if not stream:
        raw = client.responses.with_raw_response.create(model=model, input=PROMPT, extra_headers=headers)
        response = raw.parse()
        return SdkCall(raw.headers[REQUEST_ID_HEADER], response.output_text, response.usage)

    events = client.responses.create(model=model, input=PROMPT, stream=True, extra_headers=headers)
    deltas: list[str] = []
    completed = None
    with events:
        request_id = events.response.headers[REQUEST_ID_HEADER]
        for event in events:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.completed":
                completed = event.response
    assert completed is not None, "the Responses stream ended without a response.completed event"
    return SdkCall(request_id, "".join(deltas), completed.usage, completed.output_text)


def call_messages(headers: dict[str, str], *, stream: bool, model: str = MESSAGES.model) -> SdkCall:
    """Call Anthropic Messages through the gateway, streaming with the SDK's `messages.stream` helper."""
    client = anthropic_client()
    if not stream:
        raw = client.messages.with_raw_response.create(
            model=model, max_tokens=MAX_TOKENS, messages=CHAT_MESSAGES, extra_headers=headers
        )
        message = raw.parse()
        text = "".join(block.text for block in message.content if block.type == "text")
        return SdkCall(raw.headers[REQUEST_ID_HEADER], text, message.usage)

    with client.messages.stream(
        model=model, max_tokens=MAX_TOKENS, messages=CHAT_MESSAGES, extra_headers=headers
    ) as events:
        request_id = events.response.headers[REQUEST_ID_HEADER]
        text = "".join(events.text_stream)
        message = events.get_final_message()
    return SdkCall(request_id, text, message.usage)


def open_raw_stream(kind: str, headers: dict[str, str], stream_options: dict[str, bool] | None = None):
    """Start a streamed call with the SDK's raw streaming response, which leaves the body unread.

    Kinds: "chat" (with `stream_options.include_usage`), "chat-injected" (without it, so the gateway
    injects it), "responses" and "messages". `stream_options` is the Chat Completions option that a
    "chat-injected" call sends.
    """
    if kind in ("chat", "chat-injected"):
        if kind == "chat":
            stream_options = {"include_usage": True}
        options = {"stream_options": stream_options} if stream_options is not None else {}
        return openai_client().chat.completions.with_streaming_response.create(
            model=CHAT.model, messages=CHAT_MESSAGES, stream=True, extra_headers=headers, **options
        )
    if kind == "responses":
        return openai_client().responses.with_streaming_response.create(
            model=RESPONSES.model, input=PROMPT, stream=True, extra_headers=headers
        )
    if kind == "messages":
        return anthropic_client().messages.with_streaming_response.create(
            model=MESSAGES.model, max_tokens=MAX_TOKENS, messages=CHAT_MESSAGES, stream=True, extra_headers=headers
        )
    raise ValueError(f"unknown stream kind {kind!r}")


def read_raw_stream(
    kind: str, headers: dict[str, str], stream_options: dict[str, bool] | None = None
) -> tuple[str, bytes, httpx2.Headers]:
    """Return the request id, the body bytes as they arrived (before content decoding) and the headers."""
    with open_raw_stream(kind, headers, stream_options) as response:
        wire = b"".join(response.http_response.iter_raw())
        return response.headers[REQUEST_ID_HEADER], wire, response.headers


@pytest.fixture(autouse=True)
def no_new_fake_errors(fake: FakeUpstream):
    """Fail a test during which the shared fake upstream raised while responding."""
    before = len(fake.errors)
    yield
    assert fake.errors[before:] == []


# --- endpoints through the SDKs --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_completions_row(proxy_env: GatewayProcess, stream: bool):
    result = call_chat(steering_headers(CHAT.usage), stream=stream)

    assert result.text == DEFAULT_TEXT
    if stream:
        # The client did not request usage, so the usage chunk that the gateway requested must not reach it.
        assert result.usage is None
    else:
        assert result.usage.prompt_tokens == 1000
    assert_row(proxy_env.wait_row(result.request_id), CHAT.expected_row(stream=stream))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_cached_reasoning_cost(proxy_env: GatewayProcess, stream: bool):
    scenario = CHAT_CACHED_REASONING
    result = call_chat(steering_headers(scenario.usage), stream=stream, model=scenario.model)

    assert result.text == DEFAULT_TEXT
    if not stream:
        assert result.usage.prompt_tokens_details.cached_tokens == 1500
        assert result.usage.completion_tokens_details.reasoning_tokens == 600
    assert_row(proxy_env.wait_row(result.request_id), scenario.expected_row(stream=stream))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_responses_row(proxy_env: GatewayProcess, stream: bool):
    result = call_responses(steering_headers(RESPONSES.usage), stream=stream)

    assert result.text == DEFAULT_TEXT
    assert result.usage.input_tokens_details.cached_tokens == 400
    assert result.usage.output_tokens_details.reasoning_tokens == 100
    assert_row(proxy_env.wait_row(result.request_id), RESPONSES.expected_row(stream=stream))


@pytest.mark.parametrize("encoding_format", [None, "float"], ids=["base64-default", "float"])
def test_embeddings_row(proxy_env: GatewayProcess, fake: FakeUpstream, encoding_format: str | None):
    headers = steering_headers(EMBEDDINGS.usage)
    options = {"encoding_format": encoding_format} if encoding_format else {}
    raw = openai_client().embeddings.with_raw_response.create(
        model=EMBEDDINGS.model, input=PROMPT, dimensions=8, extra_headers=headers, **options
    )
    result = raw.parse()

    request, _ = upstream_exchange(fake, headers)
    assert request.json["encoding_format"] == (encoding_format or "base64")
    # The fake's values are float32 numbers. Base64 carries them as float32, and JSON as shortest decimals.
    vector = result.data[0].embedding
    assert len(vector) == 8
    assert struct.pack("<8f", *vector) == struct.pack("<8f", *embedding_vector(EMBEDDINGS.model, PROMPT, 8))
    assert result.usage.prompt_tokens == 1000
    assert_row(proxy_env.wait_row(raw.headers[REQUEST_ID_HEADER]), EMBEDDINGS.expected_row(stream=False))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_messages_cache_read_write_cost(proxy_env: GatewayProcess, stream: bool):
    result = call_messages(steering_headers(MESSAGES.usage), stream=stream)

    assert result.text == DEFAULT_TEXT
    assert result.usage.cache_read_input_tokens == 200
    assert result.usage.cache_creation_input_tokens == 300
    assert result.usage.cache_creation.ephemeral_1h_input_tokens == 100
    assert result.usage.output_tokens == 500
    assert_row(proxy_env.wait_row(result.request_id), MESSAGES.expected_row(stream=stream))


def test_count_tokens_not_billed(proxy_env: GatewayProcess):
    headers = steering_headers({"input_tokens": 1234})
    raw = anthropic_client().messages.with_raw_response.count_tokens(
        model=MESSAGES.model, messages=CHAT_MESSAGES, extra_headers=headers
    )

    assert raw.parse().input_tokens == 1234
    expected = {
        "project": "alpha",
        "provider": "anthropic",
        "endpoint": "messages.count_tokens",
        "model": MESSAGES.model,
        "response_model": None,
        "stream": False,
        "status": 200,
        "error": None,
        # Counting tokens bills nothing, so the counted tokens are not usage.
        "input_tokens": None,
        "output_tokens": None,
        "cache_read_tokens": None,
        "cache_write_tokens": None,
        "reasoning_tokens": None,
        "cost_usd": Decimal(0),
        "price_flag": "not_billed",
    }
    assert_row(proxy_env.wait_row(raw.headers[REQUEST_ID_HEADER]), expected)


PRICE_CASES = [
    pytest.param(
        "chat",
        False,
        Scenario(
            provider="openai",
            endpoint="chat.completions",
            model="mystery-model-9",
            response_model="mystery-model-9",
            usage=CHAT.usage,
            tokens=CHAT.tokens,
            cost_usd=None,
            price_flag="unknown_model",
        ),
        id="chat-unknown-model",
    ),
    pytest.param(
        "messages",
        True,
        Scenario(
            provider="anthropic",
            endpoint="messages",
            model="claude-mystery-9",
            response_model="claude-mystery-9",
            usage=MESSAGES.usage,
            tokens=MESSAGES.tokens,
            cost_usd=None,
            price_flag="unknown_model",
        ),
        id="messages-unknown-model",
    ),
    pytest.param(
        "chat",
        True,
        Scenario(
            provider="openai",
            endpoint="chat.completions",
            model="tollhouse-test-model",
            response_model="tollhouse-test-model",
            usage={"prompt_tokens": 1000, "completion_tokens": 500, "prompt_tokens_details": {"cached_tokens": 400}},
            tokens={"input_tokens": 600, "cache_read_tokens": 400, "output_tokens": 500},
            # The override sets no cache-read rate, so cache reads cost the input rate:
            # 600 x $1.50 + 400 x $1.50 + 500 x $6.00 per 1M
            cost_usd=Decimal("0.0045"),
            price_flag="override",
        ),
        id="chat-override",
    ),
    pytest.param(
        "messages",
        False,
        Scenario(
            provider="anthropic",
            endpoint="messages",
            model="tollhouse-test-model",
            response_model="tollhouse-test-model",
            usage={**MESSAGES.usage, "output_tokens": 1000},
            tokens={**MESSAGES.tokens, "output_tokens": 1000},
            # Without cache rates in the override, reads and both write lifetimes cost the input rate:
            # (500 + 200 + 200 + 100) x $1.50 + 1000 x $6.00 per 1M
            cost_usd=Decimal("0.0075"),
            price_flag="override",
        ),
        id="messages-override",
    ),
]


@pytest.mark.parametrize(("api", "stream", "scenario"), PRICE_CASES)
def test_price_flag(proxy_env: GatewayProcess, api: str, stream: bool, scenario: Scenario):
    call = call_chat if api == "chat" else call_messages
    result = call(steering_headers(scenario.usage), stream=stream, model=scenario.model)

    assert result.text == DEFAULT_TEXT
    assert_row(proxy_env.wait_row(result.request_id), scenario.expected_row(stream=stream))


# --- stream bytes ----------------------------------------------------------------------------------

FRAMINGS = {
    "plain": {},
    "gzip": {"coding": "gzip"},
    "br": {"coding": "br"},
    "crlf": {"crlf": True},
}


@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("kind", ["chat", "responses", "messages"])
def test_stream_passthrough_bytes(proxy_env: GatewayProcess, fake: FakeUpstream, kind: str, framing: str):
    scenario = STREAM_SCENARIOS[kind]
    headers = steering_headers(scenario.usage, **FRAMINGS[framing])

    request_id, wire, response_headers = read_raw_stream(kind, headers)

    request, sent = upstream_exchange(fake, headers)
    assert sent.complete
    if framing == "crlf":
        assert b"\r\n\r\n" in sent.body
        assert b"\n\n" not in sent.body
    coding = FRAMINGS[framing].get("coding")
    assert response_headers.get("content-encoding") == coding
    assert wire == sent.wire_body
    assert decode_body(wire, coding) == sent.body
    if kind == "chat":
        assert request.json["stream_options"] == {"include_usage": True}
        assert b'"choices":[],"usage":{' in sent.body
    assert_row(proxy_env.wait_row(request_id), scenario.expected_row(stream=True))


INJECTED_CASES = [
    *(pytest.param(framing, None, id=framing) for framing in FRAMINGS),
    # With obfuscation off, `"usage":null` is the last member of each chunk instead of a middle one.
    pytest.param("plain", {"include_obfuscation": False}, id="obfuscation-off"),
    pytest.param("plain", {"include_usage": False}, id="include-usage-false"),
]


@pytest.mark.parametrize(("framing", "stream_options"), INJECTED_CASES)
def test_chat_stream_injected_usage(
    proxy_env: GatewayProcess, fake: FakeUpstream, framing: str, stream_options: dict[str, bool] | None
):
    headers = steering_headers(CHAT.usage, **FRAMINGS[framing])

    request_id, wire, response_headers = read_raw_stream("chat-injected", headers, stream_options)

    request, sent = upstream_exchange(fake, headers)
    assert request.json["stream_options"] == {**(stream_options or {}), "include_usage": True}
    assert sent.complete
    # The rewritten stream is sent decoded, whatever coding upstream used.
    assert "content-encoding" not in response_headers
    expected = without_usage_reports(sent.body)
    assert expected != sent.body
    assert b'"usage"' not in expected
    assert wire == expected
    assert_row(proxy_env.wait_row(request_id), CHAT.expected_row(stream=True))


UTF8_CALLS = {
    "chat-injected": (call_chat, CHAT),
    "responses": (call_responses, RESPONSES),
    "messages": (call_messages, MESSAGES),
}


@pytest.mark.parametrize("kind", list(UTF8_CALLS))
def test_stream_utf8_split(proxy_env: GatewayProcess, fake: FakeUpstream, kind: str):
    call, scenario = UTF8_CALLS[kind]
    headers = steering_headers(scenario.usage, text=UTF8_TEXT)

    result = call(headers, stream=True)

    assert result.text == UTF8_TEXT
    if result.output_text is not None:
        assert result.output_text == UTF8_TEXT
    _, sent = upstream_exchange(fake, headers)
    split_characters = 0
    for write in sent.writes:
        try:
            write.decode("utf-8")
        except UnicodeDecodeError:
            split_characters += 1
    assert split_characters > 0, "the fake sent no write that ends or starts inside a UTF-8 character"
    assert_row(proxy_env.wait_row(result.request_id), scenario.expected_row(stream=True))


# --- incremental forwarding ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_upstream(tmp_path_factory) -> tuple[FakeUpstream, GatewayProcess]:
    """A fake upstream that pauses after each stream write, and a gateway in front of it."""
    upstream = FakeUpstream(
        chunk_delay=CHUNK_DELAY, expected_keys={"openai": OPENAI_REAL_KEY, "anthropic": ANTHROPIC_REAL_KEY}
    ).start_in_thread()
    try:
        process = start_gateway(tmp_path_factory.mktemp("slow-gateway"), rules_text(upstream.port), GATEWAY_ENV)
        try:
            yield upstream, process
        finally:
            process.stop()
    finally:
        upstream.stop_thread()


@pytest.mark.parametrize("kind", ["chat", "chat-injected"])
def test_stream_forwarded_incrementally(slow_upstream, monkeypatch, kind: str):
    upstream, process = slow_upstream
    use_gateway(process, monkeypatch)
    headers = steering_headers(CHAT.usage, text="Hi")

    received = b""
    with open_raw_stream(kind, headers) as response:
        reads = response.http_response.iter_raw()
        for data in reads:
            received += data
            if b"\n\n" in received:
                break
        _, sent = upstream_exchange(upstream, headers)
        # Read the fake's progress at the moment the client has received its first complete event.
        writes_at_first_event = len(sent.writes)
        complete_at_first_event = sent.complete
        for data in reads:
            received += data
        request_id = response.headers[REQUEST_ID_HEADER]

    assert not complete_at_first_event
    assert writes_at_first_event < len(sent.writes)
    assert sent.complete
    expected = sent.body if kind == "chat" else without_usage_reports(sent.body)
    assert received == expected
    assert upstream.errors == []
    assert_row(process.wait_row(request_id), CHAT.expected_row(stream=True))


# --- recorded provider responses -------------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_upstream(tmp_path_factory) -> tuple[FakeUpstream, GatewayProcess]:
    """A fake upstream that replays recorded responses for `x-fixture`, and a gateway in front of it."""
    if not FIXTURE_FILES:
        pytest.skip(
            f"recorded provider responses not found in {FIXTURES}. They exist only beside the development clone."
        )
    upstream = FakeUpstream(
        expected_keys={"openai": OPENAI_REAL_KEY, "anthropic": ANTHROPIC_REAL_KEY}, fixtures_dir=FIXTURES
    ).start_in_thread()
    try:
        process = start_gateway(tmp_path_factory.mktemp("replay-gateway"), rules_text(upstream.port), GATEWAY_ENV)
        try:
            yield upstream, process
        finally:
            process.stop()
    finally:
        upstream.stop_thread()


def normalised_usage(fixture: dict[str, Any]) -> dict[str, int]:
    """Return the token columns for a recording's usage reports, normalised as `addons.call.Usage` defines.

    Anthropic streams report usage in `message_start` and again in `message_delta`, and the later fields
    win. OpenAI reports once, and counts cached tokens inside the prompt and reasoning inside the output.
    """
    reports = [entry["usage"] for entry in fixture["usage_on_wire"]]
    if fixture["provider"] == "anthropic":
        merged: dict[str, Any] = {}
        for report in reports:
            merged.update(report)
        return {
            "input_tokens": merged["input_tokens"],
            "output_tokens": merged["output_tokens"],
            "cache_read_tokens": merged.get("cache_read_input_tokens", 0),
            "cache_write_tokens": merged.get("cache_creation_input_tokens", 0),
            "cache_write_1h_tokens": (merged.get("cache_creation") or {}).get("ephemeral_1h_input_tokens", 0),
            "reasoning_tokens": 0,
        }

    (report,) = reports
    if "prompt_tokens" in report:
        prompt, output = report["prompt_tokens"], report.get("completion_tokens", 0)
        input_details = report.get("prompt_tokens_details") or {}
        output_details = report.get("completion_tokens_details") or {}
    else:
        prompt, output = report["input_tokens"], report["output_tokens"]
        input_details = report.get("input_tokens_details") or {}
        output_details = report.get("output_tokens_details") or {}
    cached = input_details.get("cached_tokens", 0)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": output,
        "cache_read_tokens": cached,
        "cache_write_tokens": 0,
        "cache_write_1h_tokens": 0,
        "reasoning_tokens": output_details.get("reasoning_tokens", 0),
    }


def replay_request(client: httpx2.Client, fixture: dict[str, Any]) -> tuple[str, bytes]:
    """Send a recording's request through the gateway, and return the request id and the body bytes."""
    recorded = fixture["request"]
    host = "api.anthropic.com" if fixture["provider"] == "anthropic" else "api.openai.com"
    url = f"https://{host}{recorded['path']}" + (f"?{recorded['query']}" if recorded.get("query") else "")
    headers = {key: value for key, value in recorded["headers"].items()}
    headers["x-fixture"] = fixture["name"]
    if fixture["provider"] == "anthropic":
        headers["x-api-key"] = ALPHA_KEY
    else:
        headers["authorization"] = f"Bearer {ALPHA_KEY}"
    body = json.dumps(recorded["body"]).encode()
    with client.stream(recorded["method"], url, headers=headers, content=body) as response:
        assert response.status_code == 200
        return response.headers[REQUEST_ID_HEADER], b"".join(response.iter_raw())


def test_recorded_responses_replayed(replay_upstream, subtests):
    upstream, process = replay_upstream
    fixtures = [json.loads(path.read_text(encoding="utf-8")) for path in FIXTURE_FILES]
    fixtures = [fixture for fixture in fixtures if fixture["response"]["status"] == 200]
    assert fixtures, f"no recorded response with status 200 in {FIXTURES}"

    verify = ssl.create_default_context(cafile=str(process.ca_cert))
    with httpx2.Client(proxy=process.proxy_url, verify=verify, trust_env=False, timeout=CLIENT_TIMEOUT) as client:
        for fixture in fixtures:
            with subtests.test(fixture=fixture["name"]):
                request_id, body = replay_request(client, fixture)

                assert body == fixture["response"]["body"].encode("utf-8")
                row = process.wait_row(request_id)
                assert_row(row, normalised_usage(fixture))
                assert_row(row, {"status": 200, "stream": fixture["request"]["body"].get("stream") is True})
                assert row["price_flag"] == "priced"
                assert row["cost_usd"] is not None
    assert upstream.errors == []
