"""Tests for the fake upstream: the official SDKs against it, its wire format, and fidelity to recordings.

Recorded provider traffic lives outside the repository, in ``../shared/fixtures/recorded`` next to the
clone. The tests that compare against it skip when that folder is absent.
"""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import zlib
from pathlib import Path
from typing import Any

import anthropic
import brotli
import openai
import pytest

from addons.testing.fake_upstream import Fault, FakeUpstream, parse_fault, plan_writes, split_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "recorded"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json")) if FIXTURES.is_dir() else []
NO_FIXTURES = f"recorded provider traffic not found at {FIXTURES}; it exists only next to the development clone"

OPENAI_KEY = "sk-test-openai-0123456789"
ANTHROPIC_KEY = "sk-ant-test-0123456789"
TIMEOUT = 10.0
UTF8_TEXT = "Grüße aus Köln — 東京 ✓ 🐘"


# --- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> FakeUpstream:
    server = FakeUpstream(
        expected_keys={"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY},
        fixtures_dir=FIXTURES if FIXTURES.is_dir() else None,
    ).start_in_thread()
    yield server
    server.stop_thread()


@pytest.fixture(autouse=True)
def fresh_records(fake: FakeUpstream) -> None:
    fake.clear()
    yield
    assert fake.errors == []


def openai_client(server: FakeUpstream, max_retries: int = 0, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=kwargs.pop("api_key", OPENAI_KEY),
        base_url=server.base_url + "/v1",
        max_retries=max_retries,
        timeout=kwargs.pop("timeout", TIMEOUT),
        **kwargs,
    )


def anthropic_client(server: FakeUpstream, max_retries: int = 0, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=kwargs.pop("api_key", ANTHROPIC_KEY),
        base_url=server.base_url,
        max_retries=max_retries,
        timeout=kwargs.pop("timeout", TIMEOUT),
        **kwargs,
    )


def text_header(text: str) -> dict[str, str]:
    return {"x-fake-text": urllib.parse.quote(text)}


def usage_header(usage: dict[str, Any]) -> dict[str, str]:
    return {"x-fake-usage": json.dumps(usage)}


USER_HI = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a place.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["location"],
        },
    },
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Weather for a place.",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}}},
}


def raw_exchange(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """Send one request with `Connection: close` over a plain socket, and return every byte of the response."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        received = []
        while data := sock.recv(65536):
            received.append(data)
    return b"".join(received)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


def dechunk(body: bytes) -> tuple[list[bytes], bool]:
    """Return the payloads of a chunked body and whether it ended with the zero-size chunk."""
    payloads = []
    while body:
        size_line, separator, body = body.partition(b"\r\n")
        if not separator:
            return payloads, False
        size = int(size_line, 16)
        if size == 0:
            return payloads, True
        if len(body) < size + 2:
            return payloads, False
        payloads.append(body[:size])
        body = body[size + 2 :]
    return payloads, False


def parse_sse(body: bytes) -> list[tuple[str | None, str]]:
    """Return (event name, data) for each event of an SSE body, with LF or CRLF line ends."""
    events = []
    for block in body.decode().replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        events.append((name, "\n".join(data)))
    return events


def post_json(
    server: FakeUpstream, path: str, payload: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """POST `payload` over a fresh connection, and return status, headers and the de-chunked body."""
    body = json.dumps(payload).encode()
    status, response_headers, wire = split_response(
        raw_exchange(server.port, "POST", path, body, {"Content-Type": "application/json", **headers})
    )
    if response_headers.get("transfer-encoding") == "chunked":
        payloads, complete = dechunk(wire)
        assert complete
        wire = b"".join(payloads)
    return status, response_headers, wire


# --- OpenAI through the SDK ------------------------------------------------------------------------


def test_chat_json_text_model_and_usage(fake: FakeUpstream) -> None:
    usage = {"prompt_tokens": 1200, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 1024}}
    usage["completion_tokens_details"] = {"reasoning_tokens": 7}
    raw = openai_client(fake).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=USER_HI, extra_headers={**text_header(UTF8_TEXT), **usage_header(usage)}
    )
    completion = raw.parse()

    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert completion.choices[0].message.content == UTF8_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 1200
    assert completion.usage.completion_tokens == 20
    assert completion.usage.total_tokens == 1220
    assert completion.usage.prompt_tokens_details.cached_tokens == 1024
    assert completion.usage.prompt_tokens_details.audio_tokens == 0
    assert completion.usage.completion_tokens_details.reasoning_tokens == 7
    assert raw.headers["openai-version"] == "2020-10-01"
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-ratelimit-limit-requests"] == "30000"
    assert raw.headers["content-type"] == "application/json"
    assert fake.received[0].json["model"] == "gpt-4o-mini"
    assert fake.received[0].header("Authorization") == f"Bearer {OPENAI_KEY}"


def test_chat_stream_with_include_usage(fake: FakeUpstream) -> None:
    stream = openai_client(fake).chat.completions.create(
        model="gpt-4o",
        messages=USER_HI,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={**text_header(UTF8_TEXT), **usage_header({"prompt_tokens": 50})},
    )
    chunks = list(stream)

    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == UTF8_TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 50
    assert chunks[-1].usage.completion_tokens == len(split_tokens(UTF8_TEXT))
    assert {chunk.model for chunk in chunks} == {"gpt-4o-2024-08-06"}

    events = parse_sse(fake.sent[0].body)
    assert events[-1] == (None, "[DONE]")
    for _, data in events[:-2]:
        assert '"usage":null,"obfuscation":"' in data
    final = json.loads(events[-2][1])
    assert list(final)[-3:] == ["choices", "usage", "obfuscation"]
    assert fake.sent[0].header("content-type") == "text/event-stream; charset=utf-8"
    assert fake.sent[0].header("transfer-encoding") == "chunked"


def test_chat_stream_without_include_usage(fake: FakeUpstream) -> None:
    chunks = list(
        openai_client(fake).chat.completions.create(
            model="gpt-4o", messages=USER_HI, stream=True, stream_options={"include_obfuscation": False}
        )
    )

    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    events = parse_sse(fake.sent[0].body)
    assert events[-1] == (None, "[DONE]")
    for _, data in events[:-1]:
        assert "usage" not in json.loads(data)
        assert "obfuscation" not in json.loads(data)


def test_chat_tool_call_json(fake: FakeUpstream) -> None:
    completion = openai_client(fake).chat.completions.create(model="gpt-4.1", messages=USER_HI, tools=[WEATHER_TOOL])

    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"location": "example", "days": 1}
    assert message.tool_calls[0].id.startswith("call_")


def test_chat_tool_call_stream_fragments(fake: FakeUpstream) -> None:
    chunks = list(
        openai_client(fake).chat.completions.create(
            model="gpt-4o-mini", messages=USER_HI, tools=[WEATHER_TOOL], stream=True
        )
    )

    calls = [chunk.choices[0].delta.tool_calls[0] for chunk in chunks if chunk.choices[0].delta.tool_calls]
    assert calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == ""
    assert len(calls) > 3
    assert all(call.id is None and call.index == 0 for call in calls[1:])
    assert json.loads("".join(call.function.arguments for call in calls)) == {"location": "example", "days": 1}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_chat_after_tool_result_is_text(fake: FakeUpstream) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    history = [*USER_HI, {"role": "assistant", "content": None, "tool_calls": [call]}]
    history.append({"role": "tool", "tool_call_id": "call_1", "content": "sunny"})
    completion = openai_client(fake).chat.completions.create(model="gpt-4o", messages=history, tools=[WEATHER_TOOL])

    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == "Hello from the fake upstream."


def test_chat_tool_call_header_off(fake: FakeUpstream) -> None:
    completion = openai_client(fake).chat.completions.create(
        model="gpt-4o", messages=USER_HI, tools=[WEATHER_TOOL], extra_headers={"x-fake-tool-call": "0"}
    )

    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.tool_calls is None


def test_chat_max_tokens_gives_length(fake: FakeUpstream) -> None:
    completion = openai_client(fake).chat.completions.create(
        model="gpt-4o", messages=USER_HI, max_completion_tokens=2, extra_headers=text_header("one two three four")
    )

    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "one two"
    assert completion.usage.completion_tokens == 2


def test_responses_json(fake: FakeUpstream) -> None:
    response = openai_client(fake).responses.create(
        model="gpt-5.5", input="hi", extra_headers={**text_header(UTF8_TEXT), **usage_header({"input_tokens": 11})}
    )

    assert response.model == "gpt-5.5-2026-04-23"
    assert response.status == "completed"
    assert response.output_text == UTF8_TEXT
    assert response.usage.input_tokens == 11
    assert response.usage.output_tokens == len(split_tokens(UTF8_TEXT))
    assert response.usage.total_tokens == 11 + len(split_tokens(UTF8_TEXT))
    assert response.id.startswith("resp_")


def test_responses_stream_events_and_usage(fake: FakeUpstream) -> None:
    with openai_client(fake).responses.stream(model="gpt-5.5", input="hi", extra_headers=text_header("a b")) as stream:
        events = list(stream)
        final = stream.get_final_response()

    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.usage is None
    assert events[1].response.usage is None
    assert final.usage.output_tokens == 2
    assert final.output_text == "a b"
    assert [name for name, _ in parse_sse(fake.sent[0].body)] == [event.type for event in events]


def test_responses_function_call_after_reasoning(fake: FakeUpstream) -> None:
    parameters = {"type": "object", "properties": {"key": {"type": "string"}}}
    tool = {"type": "function", "name": "lookup", "parameters": parameters}
    usage = usage_header({"output_tokens": 65, "output_tokens_details": {"reasoning_tokens": 45}})
    client = openai_client(fake)
    response = client.responses.create(
        model="gpt-5.5", input="go", tools=[tool], include=["reasoning.encrypted_content"], extra_headers=usage
    )

    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    assert response.output[0].encrypted_content
    assert json.loads(response.output[1].arguments) == {"key": "example"}
    assert response.usage.output_tokens_details.reasoning_tokens == 45

    with client.responses.stream(model="gpt-5.5", input="go", tools=[tool], extra_headers=usage) as stream:
        events = list(stream)
    deltas = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1
    assert json.loads("".join(deltas)) == {"key": "example"}
    assert events[-1].type == "response.completed"


def test_responses_max_output_tokens_incomplete(fake: FakeUpstream) -> None:
    with openai_client(fake).responses.stream(
        model="gpt-5.5", input="hi", max_output_tokens=2, extra_headers=text_header("one two three")
    ) as stream:
        events = list(stream)

    assert events[-1].type == "response.incomplete"
    assert events[-1].response.status == "incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 2


def test_embeddings_float_and_base64_agree(fake: FakeUpstream) -> None:
    client = openai_client(fake)
    decoded = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    floats = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float")

    assert fake.received[0].json["encoding_format"] == "base64"
    assert isinstance(json.loads(fake.sent[0].body)["data"][0]["embedding"], str)
    assert len(decoded.data) == 2
    assert len(decoded.data[0].embedding) == 1536
    for left, right in zip(decoded.data, floats.data, strict=True):
        assert struct.pack("<1536f", *left.embedding) == struct.pack("<1536f", *right.embedding)
    assert decoded.data[0].embedding != decoded.data[1].embedding
    assert decoded.usage.prompt_tokens == 3  # ceil(5 bytes / 4) + ceil(4 bytes / 4)
    assert decoded.usage.total_tokens == 3

    small = client.embeddings.create(model="text-embedding-3-small", input="alpha", dimensions=8)
    assert len(small.data[0].embedding) == 8


def test_models_list_both_providers(fake: FakeUpstream) -> None:
    openai_ids = [model.id for model in openai_client(fake).models.list()]
    anthropic_ids = [model.id for model in anthropic_client(fake).models.list()]

    assert "gpt-4o-mini" in openai_ids
    assert "text-embedding-3-small" in openai_ids
    assert "claude-sonnet-4-20250514" in anthropic_ids
    assert not any(name.startswith("gpt") for name in anthropic_ids)


# --- Anthropic through the SDK ---------------------------------------------------------------------


def test_messages_json_with_cache_usage(fake: FakeUpstream) -> None:
    usage = {"input_tokens": 3, "cache_read_input_tokens": 1111, "cache_creation_input_tokens": 418}
    raw = anthropic_client(fake).messages.with_raw_response.create(
        model="claude-sonnet-4-20250514",
        max_tokens=100,
        messages=USER_HI,
        extra_headers={**text_header(UTF8_TEXT), **usage_header(usage)},
    )
    message = raw.parse()

    assert message.model == "claude-sonnet-4-20250514"
    assert message.content[0].text == UTF8_TEXT
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 3
    assert message.usage.cache_read_input_tokens == 1111
    assert message.usage.cache_creation_input_tokens == 418
    assert message.usage.cache_creation.ephemeral_5m_input_tokens == 418
    assert message.usage.cache_creation.ephemeral_1h_input_tokens == 0
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "4000"
    assert raw.headers["content-type"] == "application/json"


def test_messages_stream_usage_is_cumulative(fake: FakeUpstream) -> None:
    usage = {"input_tokens": 20, "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 300}}
    usage["output_tokens"] = 42
    with anthropic_client(fake).messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=100,
        messages=USER_HI,
        extra_headers={**text_header(UTF8_TEXT), **usage_header(usage)},
    ) as stream:
        events = list(stream)
        message = stream.get_final_message()

    assert message.model == "claude-sonnet-4-5-20250929"
    assert message.content[0].text == UTF8_TEXT
    assert message.usage.output_tokens == 42
    assert message.usage.cache_creation_input_tokens == 400
    assert message.usage.cache_creation.ephemeral_1h_input_tokens == 300

    names = [name for name, _ in parse_sse(fake.sent[0].body)]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    data = {name: json.loads(text) for name, text in parse_sse(fake.sent[0].body)}
    assert data["message_start"]["message"]["usage"]["output_tokens"] == 1
    assert data["message_start"]["message"]["usage"]["cache_creation_input_tokens"] == 400
    assert data["message_delta"]["usage"] == {
        "input_tokens": 20,
        "cache_creation_input_tokens": 400,
        "cache_read_input_tokens": 0,
        "output_tokens": 42,
    }
    assert any(event.type == "text" for event in events)


def test_messages_tool_use_stream(fake: FakeUpstream) -> None:
    with anthropic_client(fake).messages.stream(
        model="claude-haiku-4-5", max_tokens=100, messages=USER_HI, tools=[ANTHROPIC_TOOL]
    ) as stream:
        message = stream.get_final_message()

    assert message.stop_reason == "tool_use"
    assert message.content[-1].type == "tool_use"
    assert message.content[-1].name == "get_weather"
    assert message.content[-1].input == {"location": "example", "days": 1}
    deltas = [json.loads(data)["delta"] for name, data in parse_sse(fake.sent[0].body) if name == "content_block_delta"]
    partials = [delta.get("partial_json") for delta in deltas]
    assert partials[0] == ""
    assert len(partials) > 2
    assert json.loads("".join(partials)) == {"location": "example", "days": 1}


def test_messages_after_tool_result_is_text(fake: FakeUpstream) -> None:
    turns = [
        *USER_HI,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    message = anthropic_client(fake).messages.create(
        model="claude-haiku-4-5", max_tokens=100, messages=turns, tools=[ANTHROPIC_TOOL]
    )

    assert message.stop_reason == "end_turn"
    assert [block.type for block in message.content] == ["text"]


def test_messages_thinking_blocks(fake: FakeUpstream) -> None:
    with anthropic_client(fake).messages.stream(
        model="claude-haiku-4-5",
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=USER_HI,
        extra_headers=text_header(UTF8_TEXT),
    ) as stream:
        message = stream.get_final_message()

    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking
    assert message.content[0].signature
    assert message.content[1].text == UTF8_TEXT
    events = parse_sse(fake.sent[0].body)
    delta_types = [json.loads(data)["delta"]["type"] for name, data in events if name == "content_block_delta"]
    assert delta_types.index("signature_delta") < delta_types.index("text_delta")


def test_count_tokens(fake: FakeUpstream) -> None:
    client = anthropic_client(fake)
    counted = client.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x" * 40}])
    steered = client.messages.count_tokens(
        model="claude-sonnet-4-5", messages=USER_HI, extra_headers=usage_header({"input_tokens": 1234})
    )

    assert counted.input_tokens == 11
    assert steered.input_tokens == 1234


def test_anthropic_accepts_x_api_key_and_bearer(fake: FakeUpstream) -> None:
    payload = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": USER_HI}
    with_x_api_key = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    with_bearer = {"Authorization": f"Bearer {ANTHROPIC_KEY}", "anthropic-version": "2023-06-01"}

    assert post_json(fake, "/v1/messages", payload, with_x_api_key)[0] == 200
    assert post_json(fake, "/v1/messages", payload, with_bearer)[0] == 200


def test_anthropic_requires_version_header(fake: FakeUpstream) -> None:
    payload = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": USER_HI}
    status, _, body = post_json(fake, "/v1/messages", payload, {"x-api-key": ANTHROPIC_KEY})

    assert status == 400
    expected = {"type": "invalid_request_error", "message": "anthropic-version: header is required"}
    assert json.loads(body)["error"] == expected


def test_anthropic_missing_max_tokens_is_400(fake: FakeUpstream) -> None:
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    payload = {"model": "claude-haiku-4-5", "messages": USER_HI}
    status, response_headers, body = post_json(fake, "/v1/messages", payload, headers)

    assert status == 400
    assert json.loads(body)["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    assert json.loads(body)["request_id"] == response_headers["request-id"]


# --- authentication and faults ---------------------------------------------------------------------


def test_openai_401_echoes_wrong_key(fake: FakeUpstream) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        openai_client(fake, api_key="sk-wrong-key-42").chat.completions.create(model="gpt-4o", messages=USER_HI)

    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.body["message"] == (
        "Incorrect API key provided: sk-wrong-key-42. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )


def test_openai_missing_key_is_401(fake: FakeUpstream) -> None:
    status, _, body = post_json(fake, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER_HI}, {})

    assert status == 401
    assert json.loads(body)["error"]["message"].startswith("You didn't provide an API key.")


def test_anthropic_wrong_key_is_401(fake: FakeUpstream) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic_client(fake, api_key="sk-ant-wrong").messages.create(
            model="claude-haiku-4-5", max_tokens=10, messages=USER_HI
        )

    assert caught.value.body["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(429, openai.RateLimitError), (500, openai.InternalServerError), (503, openai.InternalServerError)],
)
def test_openai_status_faults(fake: FakeUpstream, status: int, error_class: type[Exception]) -> None:
    with pytest.raises(error_class) as caught:
        openai_client(fake, max_retries=2).chat.completions.create(
            model="gpt-4o", messages=USER_HI, extra_headers={"x-fault": f"status:{status}"}
        )

    headers = caught.value.response.headers
    assert caught.value.status_code == status
    assert headers["x-should-retry"] == "false"
    assert headers["x-request-id"].startswith("req_")
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert len(fake.received) == 1
    if status == 429:
        assert headers["retry-after"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert caught.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_anthropic_status_faults(
    fake: FakeUpstream, status: int, error_class: type[Exception], error_type: str
) -> None:
    with pytest.raises(error_class) as caught:
        anthropic_client(fake, max_retries=2).messages.create(
            model="claude-haiku-4-5", max_tokens=10, messages=USER_HI, extra_headers={"x-fault": f"status:{status}"}
        )

    headers = caught.value.response.headers
    assert caught.value.status_code == status
    assert caught.value.body["error"]["type"] == error_type
    assert caught.value.body["request_id"] == headers["request-id"]
    assert headers["x-should-retry"] == "false"
    assert headers["anthropic-ratelimit-requests-limit"] == "4000"
    assert len(fake.received) == 1
    if status in (429, 529):
        assert headers["retry-after"] == "1"


def test_fault_times_allows_sdk_retry(fake: FakeUpstream) -> None:
    fault = {"x-fault": "status:529, retry, retry-after:0.01, times:1"}
    message = anthropic_client(fake, max_retries=2).messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=USER_HI, extra_headers=fault
    )

    assert message.stop_reason == "end_turn"
    assert [response.status for response in fake.sent] == [529, 200]
    assert fake.sent[0].header("x-should-retry") == "true"
    assert fake.sent[0].header("retry-after-ms") == "10"
    assert [request.header("x-stainless-retry-count") for request in fake.received] == ["0", "1"]

    completion = openai_client(fake, max_retries=2).chat.completions.create(
        model="gpt-4o", messages=USER_HI, extra_headers={"x-fault": "status:500, retry, retry-after:0.01, times:2"}
    )
    assert completion.choices[0].finish_reason == "stop"
    assert [response.status for response in fake.sent[2:]] == [500, 500, 200]


def test_openai_midstream_error(fake: FakeUpstream) -> None:
    stream = openai_client(fake).chat.completions.create(
        model="gpt-4o",
        messages=USER_HI,
        stream=True,
        extra_headers={"x-fault": "midstream-error", **text_header("one two three four")},
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)

    assert received == ["", "one", " two"]
    assert caught.value.body["type"] == "server_error"
    assert not isinstance(caught.value, openai.APIStatusError)
    assert parse_sse(fake.sent[0].body)[-1][1].startswith('{"error":')


def test_anthropic_midstream_error(fake: FakeUpstream) -> None:
    stream = anthropic_client(fake).messages.create(
        model="claude-haiku-4-5",
        max_tokens=10,
        messages=USER_HI,
        stream=True,
        extra_headers={"x-fault": "midstream-error"},
    )
    types = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        for event in stream:
            types.append(event.type)

    assert types == ["message_start", "content_block_start", "content_block_delta"]
    assert caught.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert parse_sse(fake.sent[0].body)[-1][0] == "error"


def test_responses_midstream_error_event(fake: FakeUpstream) -> None:
    stream = openai_client(fake).responses.create(
        model="gpt-5.5", input="hi", stream=True, extra_headers={"x-fault": "midstream-error"}
    )
    events = list(stream)

    assert events[-1].type == "error"
    assert events[-1].code == "server_error"
    assert events[-1].sequence_number == len(events) - 1
    assert not any(event.type == "response.completed" for event in events)


def test_cut_stream_raises_connection_error(fake: FakeUpstream) -> None:
    stream = openai_client(fake).chat.completions.create(
        model="gpt-4o", messages=USER_HI, stream=True, extra_headers={"x-fault": "cut"}
    )
    with pytest.raises(openai.APIConnectionError):
        list(stream)

    assert fake.sent[0].complete is False
    assert fake.sent[0].body.startswith(b"data: ")
    assert b"[DONE]" not in fake.sent[0].body
    follow_up = openai_client(fake).chat.completions.create(model="gpt-4o", messages=USER_HI)
    assert follow_up.choices[0].finish_reason == "stop"


def test_cut_stream_on_the_wire(fake: FakeUpstream) -> None:
    payload = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": USER_HI, "stream": True}
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01", "x-fault": "cut"}
    raw = raw_exchange(fake.port, "POST", "/v1/messages", json.dumps(payload).encode(), headers)
    status, response_headers, wire = split_response(raw)
    payloads, complete = dechunk(wire)

    assert status == 200
    assert response_headers["connection"] == "close"
    assert complete is False
    assert b"".join(payloads) == fake.sent[0].body
    assert fake.sent[0].writes == payloads
    assert not fake.sent[0].body.endswith(b"\n\n")


def test_cut_json_body_on_the_wire(fake: FakeUpstream) -> None:
    headers = {"Authorization": f"Bearer {OPENAI_KEY}", "x-fault": "cut"}
    body = json.dumps({"model": "m", "messages": USER_HI}).encode()
    raw = raw_exchange(fake.port, "POST", "/v1/chat/completions", body, headers)
    _, response_headers, wire = split_response(raw)

    assert len(wire) < int(response_headers["content-length"])
    assert wire == fake.sent[0].wire_body
    assert fake.sent[0].complete is False


def test_slow_fault_exceeds_client_timeout() -> None:
    with FakeUpstream(expected_keys={}) as server:
        with pytest.raises(openai.APITimeoutError):
            openai_client(server, timeout=0.2).chat.completions.create(
                model="gpt-4o", messages=USER_HI, extra_headers={"x-fault": "slow:5"}
            )
        completion = openai_client(server).chat.completions.create(
            model="gpt-4o", messages=USER_HI, extra_headers={"x-fault": "slow:0.05"}
        )
        assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("status:abc", "invalid number"),
        ("explode", "unknown directive"),
        ("slow:9999", "out of range"),
        ("model:", "missing the model name"),
        ("kind:azure", "invalid provider"),
        ("kind:OpenAI", "invalid provider"),
        ("models:gpt-4o", "unknown directive"),
        ("early-errors", "unknown directive"),
    ],
)
def test_invalid_fault_header_is_400(fake: FakeUpstream, fault: str, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(fake).chat.completions.create(model="gpt-4o", messages=USER_HI, extra_headers={"x-fault": fault})

    assert message in caught.value.body["message"]
    assert caught.value.body["message"].startswith("x-fault:")


def test_invalid_usage_header_is_400(fake: FakeUpstream) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        anthropic_client(fake).messages.create(
            model="claude-haiku-4-5", max_tokens=10, messages=USER_HI, extra_headers={"x-fake-usage": "[1]"}
        )

    assert caught.value.body["error"]["message"] == "x-fake-usage: expected a JSON object"


def test_unknown_paths_are_404_per_provider(fake: FakeUpstream) -> None:
    openai_status, _, openai_body = post_json(fake, "/v1/nothing", {}, {"Authorization": f"Bearer {OPENAI_KEY}"})
    anthropic_headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    anthropic_status, _, anthropic_body = post_json(fake, "/v1/messages/nothing", {}, anthropic_headers)

    assert openai_status == 404
    assert json.loads(openai_body)["error"]["message"] == "Invalid URL (POST /v1/nothing)"
    assert anthropic_status == 404
    assert json.loads(anthropic_body)["error"]["type"] == "not_found_error"


# --- faults aimed at one model or provider, and early stream errors -----------------------------------

OPENAI_AUTH = {"Authorization": f"Bearer {OPENAI_KEY}"}
ANTHROPIC_AUTH = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
SONNET = "claude-sonnet-4-20250514"
SERVER_ERROR = {
    "message": "The server had an error while processing your request. Sorry about that!",
    "type": "server_error",
    "param": None,
    "code": None,
}
OPENAI_500_BODY = (
    b"{\n"
    b'    "error": {\n'
    b'        "message": "The server had an error while processing your request. Sorry about that!",\n'
    b'        "type": "server_error",\n'
    b'        "param": null,\n'
    b'        "code": null\n'
    b"    }\n"
    b"}\n"
)
OVERLOADED_EVENT = (
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)


def chat_payload(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": USER_HI, **fields}


def messages_payload(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 100, "messages": USER_HI, **fields}


def without_ids(document: dict[str, Any]) -> dict[str, Any]:
    """Drop the fields that differ between two otherwise equal responses: the id and the creation time."""
    return {key: value for key, value in document.items() if key not in ("id", "created")}


def test_parse_fault_target_directives() -> None:
    parsed = parse_fault("status:529, model:claude-sonnet-4-20250514, times:2")

    assert parsed == Fault(status=529, times=2, model=SONNET)
    assert parse_fault("kind:anthropic,early-error") == Fault(early_error=True, kind="anthropic")
    assert parse_fault("MODEL: Gpt-X ").model == "Gpt-X"
    assert parse_fault("model:ft:gpt-4o-mini:org:abc123").model == "ft:gpt-4o-mini:org:abc123"
    assert parse_fault("early-error").early_error is True
    assert parse_fault("midstream-error").early_error is False


def test_unknown_fault_lists_accepted_directives() -> None:
    with pytest.raises(ValueError) as caught:
        parse_fault("status:500, model-name:gpt-4o")

    assert str(caught.value) == (
        "x-fault: unknown directive 'model-name:gpt-4o'. Expected status:N, retry, retry-after:SECONDS, "
        "times:N, midstream-error, early-error, cut, slow:SECONDS, model:NAME, kind:openai or kind:anthropic"
    )


def test_model_fault_spares_other_models(fake: FakeUpstream) -> None:
    fault = {"x-fault": f"status:529, model:{SONNET}, times:2"}
    reference_status, _, reference = post_json(fake, "/v1/chat/completions", chat_payload("gpt-4o"), OPENAI_AUTH)
    fake.clear()

    openai_status, openai_headers, openai_body = post_json(
        fake, "/v1/chat/completions", chat_payload("gpt-4o"), {**OPENAI_AUTH, **fault}
    )
    haiku_status, _, haiku_body = post_json(
        fake, "/v1/messages", messages_payload("claude-haiku-4-5"), {**ANTHROPIC_AUTH, **fault}
    )
    sonnet = [post_json(fake, "/v1/messages", messages_payload(SONNET), {**ANTHROPIC_AUTH, **fault}) for _ in range(3)]

    assert reference_status == 200
    assert openai_status == 200
    assert "x-should-retry" not in openai_headers
    assert openai_headers["openai-processing-ms"] == "120"
    assert without_ids(json.loads(openai_body)) == without_ids(json.loads(reference))
    assert haiku_status == 200
    assert json.loads(haiku_body)["content"] == [{"type": "text", "text": "Hello from the fake upstream."}]
    assert [status for status, _, _ in sonnet] == [529, 529, 200]
    for _, headers, body in sonnet[:2]:
        expected = '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"%s"}'
        assert body == (expected % headers["request-id"]).encode()
        assert headers["x-should-retry"] == "false"
        assert headers["retry-after"] == "1"
    assert json.loads(sonnet[2][2])["model"] == SONNET
    assert [response.status for response in fake.sent] == [200, 200, 529, 529, 200]


@pytest.mark.parametrize(
    ("requested", "faulted"),
    [("gpt-4o", True), ("gpt-4o-mini", False), ("gpt-4o-2024-08-06", False), ("GPT-4o", False), ("gpt-4", False)],
)
def test_model_fault_matches_name_exactly(fake: FakeUpstream, requested: str, faulted: bool) -> None:
    headers = {**OPENAI_AUTH, "x-fault": "status:500, model:gpt-4o"}
    status, _, body = post_json(fake, "/v1/chat/completions", chat_payload(requested), headers)

    assert status == (500 if faulted else 200)
    if faulted:
        assert body == OPENAI_500_BODY
    else:
        assert json.loads(body)["object"] == "chat.completion"


def test_model_fault_matches_azure_deployment(fake: FakeUpstream) -> None:
    headers = {"api-key": OPENAI_KEY, "x-fault": "status:500, model:prod-gpt4o, times:1"}
    query = "?api-version=2024-10-21"
    other_status, _, other_body = post_json(
        fake, f"/openai/deployments/staging-gpt4o/chat/completions{query}", chat_payload("gpt-4o"), headers
    )
    first_status, _, first_body = post_json(
        fake, f"/openai/deployments/prod-gpt4o/chat/completions{query}", chat_payload("gpt-4o"), headers
    )
    second_status, _, _ = post_json(
        fake, f"/openai/deployments/prod-gpt4o/chat/completions{query}", chat_payload("gpt-4o"), headers
    )

    assert other_status == 200
    assert json.loads(other_body)["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert first_status == 500
    assert first_body == OPENAI_500_BODY
    assert second_status == 200


def test_kind_fault_spares_other_provider(fake: FakeUpstream) -> None:
    fault = {"x-fault": "status:500, kind:openai, times:1"}
    anthropic_statuses = [
        post_json(fake, "/v1/messages", messages_payload(SONNET), {**ANTHROPIC_AUTH, **fault})[0] for _ in range(2)
    ]
    openai_first = post_json(fake, "/v1/chat/completions", chat_payload("gpt-4o"), {**OPENAI_AUTH, **fault})
    openai_second = post_json(fake, "/v1/chat/completions", chat_payload("gpt-4o"), {**OPENAI_AUTH, **fault})

    assert anthropic_statuses == [200, 200]
    assert openai_first[0] == 500
    assert openai_first[2] == OPENAI_500_BODY
    assert openai_first[1]["x-should-retry"] == "false"
    assert openai_second[0] == 200
    assert json.loads(openai_second[2])["choices"][0]["finish_reason"] == "stop"


def test_kind_fault_follows_provider_choice(fake: FakeUpstream) -> None:
    fault = {"x-fault": "status:503, kind:anthropic"}
    openai_status, _, _ = post_json(fake, "/v1/chat/completions", chat_payload("gpt-4o"), {**OPENAI_AUTH, **fault})
    messages_status, messages_headers, messages_body = post_json(
        fake, "/v1/messages", messages_payload(SONNET), {**ANTHROPIC_AUTH, **fault}
    )
    # Only the anthropic-version header makes the fake serve this path as Anthropic.
    models_raw = raw_exchange(fake.port, "GET", "/v1/models", headers={**ANTHROPIC_AUTH, **fault})
    models_status, _, _ = split_response(models_raw)

    assert openai_status == 200
    assert messages_status == 503
    expected = '{"type":"error","error":{"type":"api_error","message":"Service unavailable"},"request_id":"%s"}'
    assert messages_body == (expected % messages_headers["request-id"]).encode()
    assert models_status == 503


def test_model_and_kind_faults_combine(fake: FakeUpstream) -> None:
    # An Anthropic-shaped request naming an OpenAI model matches `model:` but not `kind:`.
    fault = {"x-fault": "status:500, kind:openai, model:gpt-4o"}
    anthropic_status, _, _ = post_json(fake, "/v1/messages", messages_payload("gpt-4o"), {**ANTHROPIC_AUTH, **fault})
    other_model_status, _, _ = post_json(
        fake, "/v1/chat/completions", chat_payload("gpt-4o-mini"), {**OPENAI_AUTH, **fault}
    )
    target_status, _, _ = post_json(fake, "/v1/chat/completions", chat_payload("gpt-4o"), {**OPENAI_AUTH, **fault})

    assert anthropic_status == 200
    assert other_model_status == 200
    assert target_status == 500


def test_model_fault_spares_slow_and_cut(fake: FakeUpstream) -> None:
    fault = {"x-fault": f"cut, slow:5, model:{SONNET}"}
    started = time.monotonic()
    status, headers, body = post_json(
        fake, "/v1/chat/completions", chat_payload("gpt-4o", stream=True), {**OPENAI_AUTH, **fault}
    )
    elapsed = time.monotonic() - started

    assert status == 200
    assert elapsed < 4.0
    assert headers["openai-processing-ms"] == "120"
    assert body.endswith(b"data: [DONE]\n\n")
    assert fake.sent[0].complete is True


def test_anthropic_early_error_on_the_wire(fake: FakeUpstream) -> None:
    headers = {**ANTHROPIC_AUTH, "x-fault": "early-error"}
    status, response_headers, body = post_json(fake, "/v1/messages", messages_payload(SONNET, stream=True), headers)
    events = parse_sse(body)

    assert status == 200
    assert response_headers["content-type"] == "text/event-stream; charset=utf-8"
    assert [name for name, _ in events] == ["message_start", "error"]
    assert body.startswith(b"event: message_start\ndata: {")
    assert body.endswith(b"}\n\n" + OVERLOADED_EVENT)
    assert json.loads(events[0][1])["message"]["model"] == SONNET
    assert json.loads(events[0][1])["message"]["content"] == []
    assert fake.sent[0].complete is True


def test_anthropic_early_error_in_sdk(fake: FakeUpstream) -> None:
    stream = anthropic_client(fake).messages.create(
        model=SONNET, max_tokens=10, messages=USER_HI, stream=True, extra_headers={"x-fault": "early-error"}
    )
    types = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        for event in stream:
            types.append(event.type)

    assert types == ["message_start"]
    assert caught.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}


def test_chat_early_error_on_the_wire(fake: FakeUpstream) -> None:
    payload = chat_payload("gpt-4o", stream=True, stream_options={"include_usage": True})
    status, response_headers, body = post_json(
        fake, "/v1/chat/completions", payload, {**OPENAI_AUTH, "x-fault": "early-error"}
    )

    assert status == 200
    assert response_headers["content-type"] == "text/event-stream; charset=utf-8"
    assert body == (
        b'data: {"error":{"message":"The server had an error while processing your request. Sorry about that!",'
        b'"type":"server_error","param":null,"code":null}}\n\n'
    )
    assert json.loads(parse_sse(body)[0][1]) == {"error": SERVER_ERROR}
    assert fake.sent[0].complete is True


def test_chat_early_error_in_sdk(fake: FakeUpstream) -> None:
    stream = openai_client(fake).chat.completions.create(
        model="gpt-4o", messages=USER_HI, stream=True, extra_headers={"x-fault": "early-error"}
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk)

    assert received == []
    assert caught.value.body == SERVER_ERROR
    assert not isinstance(caught.value, openai.APIStatusError)


def test_responses_early_error_before_delta(fake: FakeUpstream) -> None:
    headers = {**OPENAI_AUTH, "x-fault": "early-error"}
    status, _, body = post_json(fake, "/v1/responses", {"model": "gpt-5.5", "input": "hi", "stream": True}, headers)
    events = parse_sse(body)

    assert status == 200
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "error",
    ]
    assert events[-1][1] == (
        '{"type":"error","code":"server_error","message":"The server had an error while processing your request. '
        'Sorry about that!","param":null,"sequence_number":4}'
    )
    assert body.endswith(b"\n\n")


def test_responses_early_error_function_call(fake: FakeUpstream) -> None:
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    payload = {"model": "gpt-5.5", "input": "go", "tools": [tool], "stream": True}
    stream = openai_client(fake).responses.create(
        model="gpt-5.5", input="go", tools=[tool], stream=True, extra_headers={"x-fault": "early-error"}
    )
    events = list(stream)
    _, _, body = post_json(fake, "/v1/responses", payload, {**OPENAI_AUTH, "x-fault": "early-error"})

    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "error",
    ]
    assert events[-1].code == "server_error"
    assert events[2].item.type == "function_call"
    assert events[2].item.arguments == ""
    assert [name for name, _ in parse_sse(body)] == [event.type for event in events]


def test_early_error_ignored_without_stream(fake: FakeUpstream) -> None:
    fault = {"x-fault": "early-error"}
    chat_status, _, chat_body = post_json(
        fake, "/v1/chat/completions", chat_payload("gpt-4o"), {**OPENAI_AUTH, **fault}
    )
    messages_status, _, messages_body = post_json(
        fake, "/v1/messages", messages_payload(SONNET), {**ANTHROPIC_AUTH, **fault}
    )
    responses_status, _, responses_body = post_json(
        fake, "/v1/responses", {"model": "gpt-5.5", "input": "hi"}, {**OPENAI_AUTH, **fault}
    )

    assert chat_status == 200
    assert json.loads(chat_body)["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert messages_status == 200
    assert json.loads(messages_body)["stop_reason"] == "end_turn"
    assert responses_status == 200
    assert json.loads(responses_body)["status"] == "completed"


def test_early_error_targets_one_model_once(fake: FakeUpstream) -> None:
    # A fallback from Anthropic to OpenAI forwards the same x-fault value to both attempts.
    fault = {"x-fault": f"early-error, model:{SONNET}, times:1"}
    first = post_json(fake, "/v1/messages", messages_payload(SONNET, stream=True), {**ANTHROPIC_AUTH, **fault})
    fallback = post_json(fake, "/v1/chat/completions", chat_payload("gpt-4o", stream=True), {**OPENAI_AUTH, **fault})
    second = post_json(fake, "/v1/messages", messages_payload(SONNET, stream=True), {**ANTHROPIC_AUTH, **fault})

    assert first[0] == 200
    assert first[2].endswith(OVERLOADED_EVENT)
    assert fallback[0] == 200
    assert fallback[2].endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in fallback[2]
    assert second[0] == 200
    assert [name for name, _ in parse_sse(second[2])][-1] == "message_stop"
    assert b"event: error" not in second[2]


# --- wire format -----------------------------------------------------------------------------------


def test_sse_write_boundaries(fake: FakeUpstream) -> None:
    payload = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": USER_HI, "stream": True}
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01", **text_header(UTF8_TEXT)}
    _, response_headers, wire = split_response(
        raw_exchange(fake.port, "POST", "/v1/messages", json.dumps(payload).encode(), headers)
    )
    payloads, complete = dechunk(wire)
    writes = fake.sent[0].writes

    assert complete is True
    assert response_headers["transfer-encoding"] == "chunked"
    assert payloads == writes
    assert b"".join(writes) == fake.sent[0].body
    assert len(writes) > 2 * len(parse_sse(fake.sent[0].body)) - 2
    pairs = zip(writes, writes[1:])
    assert any(left.endswith(b"\n") and right.startswith(b"\n") for left, right in pairs)
    split_characters = []
    for piece in writes:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            split_characters.append(piece)
    assert split_characters


def test_plan_writes_is_deterministic() -> None:
    events = ["data: {\"a\":\"é\"}\n\n".encode(), b"data: [DONE]\n\n"]

    assert plan_writes(events) == [b"data: {\"a\":\"\xc3", b"\xa9\"}\n", b"\ndata: [", b"DONE]\n", b"\n"]


def test_crlf_framing_parses_in_both_sdks(fake: FakeUpstream) -> None:
    crlf = {"x-fake-crlf": "1", **text_header(UTF8_TEXT)}
    client = openai_client(fake)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=USER_HI, stream=True, extra_headers=crlf))
    with anthropic_client(fake).messages.stream(
        model="claude-haiku-4-5", max_tokens=100, messages=USER_HI, extra_headers=crlf
    ) as stream:
        message = stream.get_final_message()

    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == UTF8_TEXT
    assert message.content[0].text == UTF8_TEXT
    for sent in fake.sent:
        assert b"\n" not in sent.body.replace(b"\r\n", b"")
        assert any(piece.endswith(b"\r") for piece in sent.writes)


def test_gzip_header_compresses_json_and_stream(fake: FakeUpstream) -> None:
    gzip_header = {"x-fake-gzip": "1", **text_header(UTF8_TEXT)}
    client = openai_client(fake)
    completion = client.chat.completions.create(model="gpt-4o", messages=USER_HI, extra_headers=gzip_header)
    chunks = list(
        client.chat.completions.create(model="gpt-4o", messages=USER_HI, stream=True, extra_headers=gzip_header)
    )

    assert completion.choices[0].message.content == UTF8_TEXT
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == UTF8_TEXT
    for sent in fake.sent:
        assert sent.header("content-encoding") == "gzip"
        assert zlib.decompress(sent.wire_body, wbits=31) == sent.body


def test_gzip_stream_decodes_after_every_write(fake: FakeUpstream) -> None:
    payload = {"model": "gpt-4o", "messages": USER_HI, "stream": True}
    headers = {"Authorization": f"Bearer {OPENAI_KEY}", "x-fake-gzip": "gzip", **text_header(UTF8_TEXT)}
    _, response_headers, wire = split_response(
        raw_exchange(fake.port, "POST", "/v1/chat/completions", json.dumps(payload).encode(), headers)
    )
    payloads, complete = dechunk(wire)
    writes = fake.sent[0].writes
    decoder = zlib.decompressobj(wbits=31)

    assert complete is True
    assert response_headers["content-encoding"] == "gzip"
    assert len(payloads) == len(writes) + 1
    for payload_bytes, piece in zip(payloads, writes):
        assert decoder.decompress(payload_bytes) == piece
    assert decoder.decompress(payloads[-1]) == b""
    assert decoder.eof


def test_compress_option_negotiates_coding() -> None:
    with FakeUpstream(expected_keys={}, compress=True) as server:
        payload = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 10, "messages": USER_HI, "stream": True})
        base = {"anthropic-version": "2023-06-01"}
        codings = []
        for accept in ("gzip, deflate, br, zstd", "gzip", "identity", "br;q=0, gzip"):
            _, headers, wire = split_response(
                raw_exchange(server.port, "POST", "/v1/messages", payload.encode(), {**base, "Accept-Encoding": accept})
            )
            codings.append(headers.get("content-encoding"))
            payloads, _ = dechunk(wire)
            if headers.get("content-encoding") == "br":
                decoder = brotli.Decompressor()
                assert [decoder.process(part) for part in payloads[:-1]] == server.sent[-1].writes
        identity = {**base, "Accept-Encoding": "gzip, br", "x-fake-gzip": "0"}
        _, forced_off, _ = split_response(raw_exchange(server.port, "POST", "/v1/messages", payload.encode(), identity))
        message = anthropic_client(server).messages.create(model="claude-haiku-4-5", max_tokens=10, messages=USER_HI)

        assert codings == ["br", "gzip", None, "gzip"]
        assert "content-encoding" not in forced_off
        assert message.content[0].text == "Hello from the fake upstream."
        assert server.sent[-1].header("content-encoding") == "br"
        assert brotli.decompress(server.sent[-1].wire_body) == server.sent[-1].body


def test_keep_alive_and_chunked_request_body(fake: FakeUpstream) -> None:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=TIMEOUT)
    headers = {"Authorization": f"Bearer {OPENAI_KEY}", "Content-Type": "application/json", "X-Mixed-Case": "Yes"}
    try:
        first_payload = json.dumps({"model": "gpt-4o", "messages": USER_HI})
        connection.request("POST", "/v1/chat/completions", body=first_payload, headers=headers)
        first = connection.getresponse()
        first.read()
        payload = json.dumps({"model": "gpt-4o", "messages": USER_HI, "stream": True}).encode()
        pieces = iter([payload[:10], payload[10:]])
        connection.request("POST", "/v1/chat/completions?trace=1", body=pieces, headers=headers, encode_chunked=True)
        second = connection.getresponse()
        second_body = second.read()
    finally:
        connection.close()

    assert first.status == 200
    assert second.status == 200
    assert len(fake.received) == 2
    assert fake.received[0].connection_id == fake.received[1].connection_id
    assert fake.received[1].header("transfer-encoding") == "chunked"
    assert fake.received[1].body == payload
    assert fake.received[1].json["stream"] is True
    assert fake.received[1].query == "trace=1"
    assert ("X-Mixed-Case", "Yes") in fake.received[0].headers
    assert second_body.endswith(b"data: [DONE]\n\n")


def test_bad_request_line_is_400_and_closes() -> None:
    with FakeUpstream() as server, socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        received = b""
        while data := sock.recv(4096):
            received += data

    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in received


def test_ids_repeat_on_a_fresh_server() -> None:
    ids = []
    for _ in range(2):
        with FakeUpstream(expected_keys={}) as server:
            completion = openai_client(server).chat.completions.create(model="gpt-4o", messages=USER_HI)
            ids.append((completion.id, server.sent[0].header("x-request-id")))

    assert ids[0] == ids[1]
    assert len(ids[0][0]) == len("chatcmpl-") + 29


def test_chunk_delay_stream_completes() -> None:
    with FakeUpstream(expected_keys={}, chunk_delay=0.001) as server:
        chunks = list(
            openai_client(server).chat.completions.create(
                model="gpt-4o", messages=USER_HI, stream=True, extra_headers=text_header("a b")
            )
        )

    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "a b"


def test_async_lifecycle_with_async_sdks() -> None:
    async def exercise() -> tuple[str, str]:
        async with FakeUpstream(expected_keys={}) as server:
            openai_async = openai.AsyncOpenAI(
                api_key="k", base_url=server.base_url + "/v1", max_retries=0, timeout=TIMEOUT
            )
            anthropic_async = anthropic.AsyncAnthropic(
                api_key="k", base_url=server.base_url, max_retries=0, timeout=TIMEOUT
            )
            completion = await openai_async.chat.completions.create(model="gpt-4o", messages=USER_HI)
            message = await anthropic_async.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=USER_HI)
            await openai_async.close()
            await anthropic_async.close()
            return completion.choices[0].message.content, message.content[0].text

    texts = asyncio.run(asyncio.wait_for(exercise(), TIMEOUT * 2))

    assert texts == ("Hello from the fake upstream.", "Hello from the fake upstream.")


def test_cli_prints_port_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "addons.testing.fake_upstream", "--port", "0", "--log-level", "WARNING"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        readable, _, _ = select.select([process.stdout], [], [], TIMEOUT)
        assert readable, "the fake upstream printed no port"
        port = int(process.stdout.readline())
        status, _, _ = split_response(
            raw_exchange(port, "GET", "/v1/models", headers={"Authorization": "Bearer sk-real-openai"})
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT)

    assert status == 200


# --- fidelity to recorded traffic ------------------------------------------------------------------


def load_fixture(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def fixture_params() -> list[Any]:
    if not FIXTURE_FILES:
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_FIXTURES), id="no-fixtures")]
    return [pytest.param(path, id=path.stem) for path in FIXTURE_FILES]


def recorded_request(fixture: dict[str, Any], extra_headers: dict[str, str]) -> tuple[str, bytes, dict[str, str]]:
    """Return the recorded request's target, body and headers, with the right key and `extra_headers` added."""
    request = fixture["request"]
    target = request["path"] + (f"?{request['query']}" if request["query"] else "")
    headers = dict(request["headers"])
    if fixture["provider"] == "anthropic":
        headers["x-api-key"] = ANTHROPIC_KEY
    else:
        headers["Authorization"] = f"Bearer {OPENAI_KEY}"
    return target, json.dumps(request["body"]).encode(), headers | extra_headers


@pytest.mark.parametrize("fixture_path", fixture_params())
def test_fixture_replay_is_byte_exact(fake: FakeUpstream, fixture_path: Path) -> None:
    fixture = load_fixture(fixture_path)
    target, body, headers = recorded_request(fixture, {"x-fixture": fixture["name"]})
    raw = raw_exchange(fake.port, fixture["request"]["method"], target, body, headers)
    status, response_headers, wire = split_response(raw)
    if response_headers.get("transfer-encoding") == "chunked":
        payloads, complete = dechunk(wire)
        assert complete
        wire = b"".join(payloads)

    recorded = fixture["response"]
    assert status == recorded["status"]
    assert raw.split(b"\r\n", 1)[0].decode() == f"HTTP/1.1 {recorded['status']} {recorded['reason']}"
    for name, value in recorded["headers"].items():
        assert response_headers[name.lower()] == value, name
    assert wire == recorded["body"].encode("utf-8")


def skeleton(value: Any, *, ordered: bool) -> Any:
    """Return the shape of a JSON value: its keys (in order when `ordered`) and the kinds of its values."""
    if isinstance(value, dict):
        items = [(key, skeleton(item, ordered=ordered)) for key, item in value.items()]
        return items if ordered else sorted(items, key=lambda pair: pair[0])
    if isinstance(value, list):
        shapes: list[Any] = []
        for item in value:
            shape = skeleton(item, ordered=ordered)
            if not shapes or shapes[-1] != shape:
                shapes.append(shape)
        return ["list", shapes]
    if value is None:
        return "null"
    return {bool: "bool", int: "number", float: "number", str: "string"}[type(value)]


def shapes_match(recorded: Any, generated: Any) -> bool:
    """Compare two skeletons, where "null" on either side matches any kind."""
    if recorded == "null" or generated == "null":
        return True
    if isinstance(recorded, list) and isinstance(generated, list):
        if len(recorded) != len(generated):
            return False
        return all(shapes_match(left, right) for left, right in zip(recorded, generated))
    if isinstance(recorded, tuple) and isinstance(generated, tuple):
        return recorded[0] == generated[0] and shapes_match(recorded[1], generated[1])
    return recorded == generated


def event_shapes(body: bytes, *, ordered: bool) -> list[Any]:
    """Return the shape of each SSE event, collapsing runs of events with the same shape."""
    shapes: list[Any] = []
    for name, data in parse_sse(body):
        shape = (name, data if data == "[DONE]" else skeleton(json.loads(data), ordered=ordered))
        if not shapes or not shapes_match(shapes[-1], shape):
            shapes.append(shape)
    return shapes


def usage_objects(value: Any) -> list[dict[str, Any]]:
    """Return every non-null `usage` object inside a JSON value, in document order."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "usage" and isinstance(item, dict):
                found.append(item)
            else:
                found.extend(usage_objects(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(usage_objects(item))
    return found


def steering_for(fixture: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Derive headers and a request body that make the fake produce the recorded kind of output and usage."""
    response = fixture["response"]
    body = dict(fixture["request"]["body"])
    headers: dict[str, str] = {}
    if response["status"] >= 400:
        headers["x-fault"] = f"status:{response['status']}"
    tool_markers = ('"tool_calls"', '"tool_use"', '"type":"function_call"', '"type": "function_call"')
    headers["x-fake-tool-call"] = "1" if any(marker in response["body"] for marker in tool_markers) else "0"
    if fixture["usage_on_wire"]:
        usage: dict[str, Any] = {}
        for entry in fixture["usage_on_wire"]:
            usage |= entry["usage"]
        headers["x-fake-usage"] = json.dumps(usage)
    if fixture["request"]["path"] == "/v1/chat/completions" and body.get("stream"):
        body["stream_options"] = dict(body.get("stream_options") or {})
        body["stream_options"]["include_obfuscation"] = '"obfuscation"' in response["body"]
    return headers, body


@pytest.mark.parametrize("fixture_path", fixture_params())
def test_generated_matches_recorded_shape(fake: FakeUpstream, fixture_path: Path) -> None:
    fixture = load_fixture(fixture_path)
    recorded = fixture["response"]
    ordered = fixture["source"].get("body_origin") != "re-serialised from parsed JSON (compact)"
    headers, body = steering_for(fixture)
    target, _, request_headers = recorded_request(fixture, headers)
    status, response_headers, generated = post_json(fake, target, body, request_headers)

    assert status == recorded["status"]
    assert response_headers["content-type"].split(";")[0] == recorded["headers"]["content-type"].split(";")[0]
    assert {name.lower() for name in recorded["headers"]} <= set(response_headers)

    recorded_body = recorded["body"].encode("utf-8")
    if recorded["headers"]["content-type"].startswith("text/event-stream"):
        recorded_shapes = event_shapes(recorded_body, ordered=ordered)
        generated_shapes = event_shapes(generated, ordered=ordered)
        assert [name for name, _ in generated_shapes] == [name for name, _ in recorded_shapes]
        assert shapes_match(recorded_shapes, generated_shapes)
        recorded_documents = [json.loads(data) for _, data in parse_sse(recorded_body) if data != "[DONE]"]
        generated_documents = [json.loads(data) for _, data in parse_sse(generated) if data != "[DONE]"]
    else:
        recorded_documents, generated_documents = [json.loads(recorded_body)], [json.loads(generated)]
        recorded_shape = skeleton(recorded_documents[0], ordered=ordered)
        generated_shape = skeleton(generated_documents[0], ordered=ordered)
        assert shapes_match(recorded_shape, generated_shape)

    recorded_usage = usage_objects(recorded_documents)
    generated_usage = usage_objects(generated_documents)
    assert len(generated_usage) == len(recorded_usage)
    for index, (left, right) in enumerate(zip(recorded_usage, generated_usage)):
        if fixture["provider"] == "anthropic" and index == 0 and len(recorded_usage) == 2:
            left, right = dict(left), dict(right)
            del left["output_tokens"], right["output_tokens"]  # message_start's count is provisional
        assert right == left
        if ordered:
            assert list(right) == list(left)

    recorded_models = [document["model"] for document in recorded_documents if "model" in document]
    generated_models = [document["model"] for document in generated_documents if "model" in document]
    assert generated_models[:1] == recorded_models[:1]
