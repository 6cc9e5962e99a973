"""Response translation (JSON, streams, errors), checked through the official SDKs' own parsers.

Each translated response is served by a loopback HTTP server to an `openai` or `anthropic` client, so the
checks see what an application using the SDK would see.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anthropic
import openai
import pytest

from addons.sse import SSEReader
from addons.translation import (
    ChatToMessagesStream,
    MessagesToChatStream,
    chat_to_messages_response,
    error_to_anthropic,
    error_to_openai,
    messages_to_chat_response,
)

RECORDED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "recorded"


class ReplayServer:
    """A loopback HTTP server that responds to every POST with the status, content type and body it holds."""

    def __init__(self) -> None:
        self.status = 200
        self.content_type = "application/json"
        self.body = b""
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(replay.status)
                self.send_header("content-type", replay.content_type)
                self.send_header("content-length", str(len(replay.body)))
                self.send_header("x-should-retry", "false")
                self.end_headers()
                self.wfile.write(replay.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def serve(self, body: bytes, *, status: int = 200, content_type: str = "application/json") -> None:
        self.status = status
        self.content_type = content_type
        self.body = body

    def serve_stream(self, body: bytes) -> None:
        self.serve(body, content_type="text/event-stream")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def server():
    replay = ReplayServer()
    yield replay
    replay.stop()


@pytest.fixture
def openai_client(server):
    with openai.OpenAI(
        api_key="sk-test", base_url=f"http://127.0.0.1:{server.port}/v1", max_retries=0, timeout=5
    ) as client:
        yield client


@pytest.fixture
def anthropic_client(server):
    with anthropic.Anthropic(
        api_key="sk-ant-test", base_url=f"http://127.0.0.1:{server.port}", max_retries=0, timeout=5
    ) as client:
        yield client


def recorded(name: str) -> dict:
    path = RECORDED / f"{name}.json"
    if not path.exists():
        pytest.skip(f"recorded fixture {name} not found in {RECORDED}")
    return json.loads(path.read_text(encoding="utf-8"))


def sse_events(text: str) -> list:
    reader = SSEReader()
    events = reader.feed(text.encode("utf-8")) + reader.close()
    return [event for event in events if event.data]


def translate_anthropic_stream(events, *, include_usage: bool = True, model: str | None = None) -> bytes:
    translator = MessagesToChatStream(include_usage=include_usage, model=model)
    out = b"".join(translator.feed(event, data) for event, data in events)
    return out + translator.finish()


def translate_recorded_anthropic_stream(name: str, *, include_usage: bool = True) -> bytes:
    body = recorded(name)["response"]["body"]
    events = [(event.event, event.json) for event in sse_events(body)]
    return translate_anthropic_stream(events, include_usage=include_usage)


def translate_openai_stream(chunks, *, model: str | None = None) -> bytes:
    translator = ChatToMessagesStream(model=model)
    out = b"".join(translator.feed(chunk) for chunk in chunks)
    return out + translator.finish()


def openai_stream(client, **fields):
    """Stream through the SDK's accumulating helper and return the chunks and the final completion."""
    with client.chat.completions.stream(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "Hi"}], **fields
    ) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    return chunks, final


def anthropic_stream(client):
    """Stream through the SDK's accumulating helper and return the events and the final message."""
    with client.messages.stream(
        model="gpt-4.1", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    return events, final


# --- Anthropic responses to OpenAI clients ---------------------------------------------------------


def test_recorded_text_stream_openai_sdk(server, openai_client):
    server.serve_stream(translate_recorded_anthropic_stream("anthropic-stream-text"))

    chunks, final = openai_stream(openai_client, stream_options={"include_usage": True})

    assert final.id == "chatcmpl-000000000000000000000fx1"
    assert final.model == "claude-haiku-4-5-20251001"
    assert final.choices[0].message.content == "Hello"
    assert final.choices[0].finish_reason == "stop"
    assert final.usage.prompt_tokens == 10
    assert final.usage.completion_tokens == 4
    assert final.usage.total_tokens == 14
    assert {chunk.id for chunk in chunks} == {"chatcmpl-000000000000000000000fx1"}
    assert chunks[-1].choices == []


def test_recorded_tool_stream_openai_sdk(server, openai_client):
    server.serve_stream(translate_recorded_anthropic_stream("anthropic-stream-tool-use"))

    _, final = openai_stream(openai_client, stream_options={"include_usage": True})

    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert len(message.tool_calls) == 1
    assert message.tool_calls[0].id == "toolu_000000000000000000000fx2"
    assert message.tool_calls[0].function.name == "pelican_name_generator"
    # The recorded call streams only an empty fragment, so the translator supplies "{}".
    assert message.tool_calls[0].function.arguments == "{}"
    assert final.usage.prompt_tokens == 543
    assert final.usage.completion_tokens == 40


def test_recorded_thinking_stream_openai_sdk(server, openai_client):
    server.serve_stream(translate_recorded_anthropic_stream("anthropic-stream-thinking-utf8"))

    _, final = openai_stream(openai_client, stream_options={"include_usage": True})

    assert final.choices[0].message.content == (
        '1. **Pouch** - references their iconic bill pouch\n2. **Pelé** - playful take on "pelican"'
    )
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason == "stop"
    assert final.usage.prompt_tokens == 46
    assert final.usage.completion_tokens == 133


def test_recorded_stream_without_usage_option(server, openai_client):
    body = translate_recorded_anthropic_stream("anthropic-stream-text", include_usage=False)
    server.serve_stream(body)

    chunks, final = openai_stream(openai_client)

    assert final.choices[0].message.content == "Hello"
    assert final.usage is None
    assert all(chunk.choices for chunk in chunks)
    assert b'"usage"' not in body
    assert body.endswith(b"data: [DONE]\n\n")


def parallel_tool_events(usage_start: dict, usage_end: dict) -> list[tuple[str, dict]]:
    """An Anthropic stream with thinking, text and two tool calls whose input arrives in pieces."""
    def delta(index, delta):
        return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def start(index, block):
        return ("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})

    def stop(index):
        return ("content_block_stop", {"type": "content_block_stop", "index": index})

    message = {
        "id": "msg_01HvQ",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage_start,
    }
    return [
        ("message_start", {"type": "message_start", "message": message}),
        start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        delta(0, {"type": "thinking_delta", "thinking": "Two lookups."}),
        delta(0, {"type": "signature_delta", "signature": "EqQB"}),
        stop(0),
        ("ping", {"type": "ping"}),
        start(1, {"type": "text", "text": ""}),
        delta(1, {"type": "text_delta", "text": "Let me "}),
        delta(1, {"type": "text_delta", "text": "check."}),
        stop(1),
        start(2, {"type": "tool_use", "id": "toolu_A", "name": "lookup_sku", "input": {}}),
        delta(2, {"type": "input_json_delta", "partial_json": ""}),
        delta(2, {"type": "input_json_delta", "partial_json": '{"sku": '}),
        delta(2, {"type": "input_json_delta", "partial_json": '"A-17"}'}),
        stop(2),
        start(3, {"type": "tool_use", "id": "toolu_B", "name": "lookup_sku", "input": {}}),
        delta(3, {"type": "input_json_delta", "partial_json": '{"sku": "B'}),
        delta(3, {"type": "input_json_delta", "partial_json": '-2"}'}),
        stop(3),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": usage_end},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


CACHED_START_USAGE = {
    "input_tokens": 310,
    "cache_creation_input_tokens": 2048,
    "cache_read_input_tokens": 1024,
    "output_tokens": 1,
}


def test_parallel_tool_stream_openai_sdk(server, openai_client):
    events = parallel_tool_events(CACHED_START_USAGE, {"output_tokens": 95})
    server.serve_stream(translate_anthropic_stream(events))

    chunks, final = openai_stream(openai_client, stream_options={"include_usage": True})

    message = final.choices[0].message
    assert final.id == "chatcmpl-01HvQ"
    assert message.content == "Let me check."
    assert [call.id for call in message.tool_calls] == ["toolu_A", "toolu_B"]
    assert [call.function.name for call in message.tool_calls] == ["lookup_sku", "lookup_sku"]
    assert [call.function.arguments for call in message.tool_calls] == ['{"sku": "A-17"}', '{"sku": "B-2"}']
    assert final.choices[0].finish_reason == "tool_calls"
    # Tool indexes count tool blocks only, not the thinking and text blocks before them.
    indexes = [call.index for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or []]
    assert indexes == [0, 0, 0, 1, 1, 1]


def test_cached_usage_stream_openai_sdk(server, openai_client):
    events = parallel_tool_events(CACHED_START_USAGE, {"output_tokens": 95})
    server.serve_stream(translate_anthropic_stream(events))

    _, final = openai_stream(openai_client, stream_options={"include_usage": True})

    assert final.usage.prompt_tokens == 310 + 2048 + 1024
    assert final.usage.prompt_tokens_details.cached_tokens == 1024
    assert final.usage.prompt_tokens_details.cache_write_tokens == 2048
    assert final.usage.completion_tokens == 95
    assert final.usage.total_tokens == 310 + 2048 + 1024 + 95


def test_message_delta_input_counts_replace_start(server, openai_client):
    end_usage = {"input_tokens": 12, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 7}
    events = parallel_tool_events(CACHED_START_USAGE, end_usage)
    server.serve_stream(translate_anthropic_stream(events))

    _, final = openai_stream(openai_client, stream_options={"include_usage": True})

    assert final.usage.prompt_tokens == 12
    assert final.usage.prompt_tokens_details.cached_tokens == 0
    assert final.usage.completion_tokens == 7


def test_stream_model_override(server, openai_client):
    events = parallel_tool_events(CACHED_START_USAGE, {"output_tokens": 95})
    server.serve_stream(translate_anthropic_stream(events, model="team-default"))

    chunks, final = openai_stream(openai_client, stream_options={"include_usage": True})

    assert final.model == "team-default"
    assert {chunk.model for chunk in chunks} == {"team-default"}


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
    ],
)
def test_stop_reason_to_finish_reason(stop_reason, finish_reason):
    translator = MessagesToChatStream(include_usage=False)
    translator.feed("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "m"}})
    out = translator.feed("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason}})

    assert json.loads(out.removeprefix(b"data: "))["choices"][0]["finish_reason"] == finish_reason
    assert messages_to_chat_response({"stop_reason": stop_reason})["choices"][0]["finish_reason"] == finish_reason


def test_stream_error_event_openai_sdk(server, openai_client):
    events = parallel_tool_events(CACHED_START_USAGE, {"output_tokens": 95})[:8]
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    body = translate_anthropic_stream(events + [("error", error)])
    server.serve_stream(body)

    with pytest.raises(openai.APIError) as info:
        openai_stream(openai_client)

    assert info.value.message == "Overloaded"
    assert info.value.body == {
        "message": "Overloaded",
        "type": "server_error",
        "param": None,
        "code": "overloaded_error",
    }
    assert b"[DONE]" not in body


def test_cut_stream_ends_with_error():
    translator = MessagesToChatStream(include_usage=True)
    for event, data in parallel_tool_events(CACHED_START_USAGE, {"output_tokens": 95})[:8]:
        translator.feed(event, data)

    out = translator.finish()

    assert out == (
        b'data: {"error":{"message":"The upstream stream ended before the response was complete.",'
        b'"type":"server_error","param":null,"code":null}}\n\n'
    )
    assert translator.finish() == b""


def test_stream_cut_after_message_delta_completes():
    translator = MessagesToChatStream(include_usage=False)
    for event, data in parallel_tool_events(CACHED_START_USAGE, {"output_tokens": 95})[:-1]:
        translator.feed(event, data)

    assert translator.finish() == b"data: [DONE]\n\n"


def test_stream_finish_after_message_stop_empty():
    translator = MessagesToChatStream(include_usage=True)
    for event, data in parallel_tool_events(CACHED_START_USAGE, {"output_tokens": 95}):
        translator.feed(event, data)

    assert translator.finish() == b""
    assert translator.feed("message_stop", {"type": "message_stop"}) == b""


def test_stream_ping_emits_nothing():
    translator = MessagesToChatStream(include_usage=True)

    assert translator.feed("ping", {"type": "ping"}) == b""


def test_recorded_anthropic_json_openai_sdk(server, openai_client):
    answer = json.loads(recorded("anthropic-messages-tools-cached")["response"]["body"])
    server.serve(json.dumps(messages_to_chat_response(answer)).encode())

    completion = openai_client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])

    assert completion.id == "chatcmpl-000000000000000000000fx1"
    assert completion.model == "claude-sonnet-4-5-20250929"
    message = completion.choices[0].message
    assert message.content is None
    assert message.tool_calls[0].id == "toolu_000000000000000000000fx2"
    assert message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"location": "Tokyo"}
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage.prompt_tokens == 24 + 1857
    assert completion.usage.prompt_tokens_details.cached_tokens == 1857
    assert completion.usage.completion_tokens == 33
    assert completion.usage.total_tokens == 24 + 1857 + 33


def test_anthropic_json_usage_exact():
    answer = json.loads(recorded("anthropic-messages-cache-read-write")["response"]["body"])

    usage = messages_to_chat_response(answer)["usage"]

    assert usage == {
        "prompt_tokens": 3 + 1111 + 418,
        "completion_tokens": 33,
        "total_tokens": 3 + 1111 + 418 + 33,
        "prompt_tokens_details": {"cached_tokens": 1111, "cache_write_tokens": 418},
    }


def test_anthropic_json_text_and_thinking():
    answer = {
        "id": "msg_01",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "Hmm.", "signature": "EqQB"},
            {"type": "text", "text": "Four "},
            {"type": "text", "text": "units."},
        ],
        "stop_reason": "max_tokens",
        "usage": {"input_tokens": 5, "output_tokens": 9, "output_tokens_details": {"thinking_tokens": 4}},
    }

    result = messages_to_chat_response(answer, model="alias")

    assert result["model"] == "alias"
    assert result["choices"][0]["message"] == {"role": "assistant", "content": "Four units.", "refusal": None}
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}


# --- OpenAI responses to Anthropic clients ---------------------------------------------------------


def recorded_openai_chunks(name: str) -> list:
    return [event.json for event in sse_events(recorded(name)["response"]["body"])]


def test_recorded_openai_text_stream_anthropic_sdk(server, anthropic_client):
    server.serve_stream(translate_openai_stream(recorded_openai_chunks("openai-chat-stream-usage")))

    events, final = anthropic_stream(anthropic_client)

    assert final.id == "msg_00000000000000000000000000fx1"
    assert final.model == "gpt-4o-mini-2024-07-18"
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].text.endswith(" London.")
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 78
    assert final.usage.output_tokens == 9
    assert events[-1].type == "message_stop"


def test_recorded_openai_tool_stream_anthropic_sdk(server, anthropic_client):
    server.serve_stream(translate_openai_stream(recorded_openai_chunks("openai-chat-stream-tools")))

    _, final = anthropic_stream(anthropic_client)

    assert [block.type for block in final.content] == ["tool_use"]
    assert final.content[0].id == "call_000000000000000000000fx2"
    assert final.content[0].name == "multiply"
    assert final.content[0].input == {"a": 1231, "b": 2331}
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens == 54
    assert final.usage.output_tokens == 20


def openai_chunk(delta: dict | None = None, finish_reason: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return {
        "id": "chatcmpl-9f2c",
        "object": "chat.completion.chunk",
        "model": "gpt-4.1",
        "choices": choices,
        "usage": usage,
    }


def tool_call_chunk(index: int, arguments: str, *, call_id: str | None = None, name: str | None = None) -> dict:
    call: dict = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return openai_chunk({"tool_calls": [call]})


PARALLEL_OPENAI_CHUNKS = [
    openai_chunk({"role": "assistant", "content": ""}),
    openai_chunk({"content": "Checking "}),
    openai_chunk({"content": "both."}),
    tool_call_chunk(0, "", call_id="call_A", name="lookup_sku"),
    tool_call_chunk(0, '{"sku":'),
    tool_call_chunk(0, '"A-17"}'),
    # The first fragment of the second call already carries part of the arguments.
    tool_call_chunk(1, '{"sku"', call_id="call_B", name="lookup_sku"),
    tool_call_chunk(1, ':"B-2"}'),
    openai_chunk({}, "tool_calls"),
    openai_chunk(
        usage={
            "prompt_tokens": 1520,
            "completion_tokens": 210,
            "total_tokens": 1730,
            "prompt_tokens_details": {"cached_tokens": 1280, "cache_write_tokens": 200},
        }
    ),
    None,
]


def test_parallel_tool_stream_anthropic_sdk(server, anthropic_client):
    server.serve_stream(translate_openai_stream(PARALLEL_OPENAI_CHUNKS))

    _, final = anthropic_stream(anthropic_client)

    assert final.id == "msg_9f2c"
    assert [block.type for block in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == "Checking both."
    assert [block.id for block in final.content[1:]] == ["call_A", "call_B"]
    assert [block.input for block in final.content[1:]] == [{"sku": "A-17"}, {"sku": "B-2"}]
    assert final.stop_reason == "tool_use"


def test_cached_usage_stream_anthropic_sdk(server, anthropic_client):
    server.serve_stream(translate_openai_stream(PARALLEL_OPENAI_CHUNKS))

    _, final = anthropic_stream(anthropic_client)

    assert final.usage.input_tokens == 1520 - 1280 - 200
    assert final.usage.cache_read_input_tokens == 1280
    assert final.usage.cache_creation_input_tokens == 200
    assert final.usage.output_tokens == 210


def test_openai_stream_events_have_event_lines():
    body = translate_openai_stream(PARALLEL_OPENAI_CHUNKS)

    events = sse_events(body.decode())

    assert all(event.event == event.json["type"] for event in events)
    assert [event.event for event in events][:2] == ["message_start", "content_block_start"]
    assert [event.event for event in events][-2:] == ["message_delta", "message_stop"]


def test_openai_stream_without_usage_ends_on_done(server, anthropic_client):
    chunks = [openai_chunk({"role": "assistant", "content": "Hi"}), openai_chunk({}, "length"), None]
    server.serve_stream(translate_openai_stream(chunks, model="alias"))

    _, final = anthropic_stream(anthropic_client)

    assert final.model == "alias"
    assert final.content[0].text == "Hi"
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 0


def test_openai_stream_empty_content_opens_no_block():
    body = translate_openai_stream([openai_chunk({"role": "assistant", "content": ""}), openai_chunk({}, "stop"), None])

    assert [event.event for event in sse_events(body.decode())] == ["message_start", "message_delta", "message_stop"]


def test_openai_stream_error_anthropic_sdk(server, anthropic_client):
    error = {"error": {"message": "Rate limit reached", "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
    server.serve_stream(translate_openai_stream(PARALLEL_OPENAI_CHUNKS[:3] + [error]))

    with pytest.raises(anthropic.APIStatusError) as info:
        anthropic_stream(anthropic_client)

    assert info.value.body == {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}}


def test_openai_cut_stream_ends_with_error():
    translator = ChatToMessagesStream()
    translator.feed(PARALLEL_OPENAI_CHUNKS[1])

    out = translator.finish()

    assert out == (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"api_error",'
        b'"message":"The upstream stream ended before the response was complete."}}\n\n'
    )


def test_openai_stream_missing_call_id_generated():
    chunks = [tool_call_chunk(0, "{}", call_id="", name="ping"), openai_chunk({}, "tool_calls"), None]

    events = sse_events(translate_openai_stream(chunks).decode())

    block = events[1].json["content_block"]
    assert block["name"] == "ping"
    assert block["id"].startswith("toolu_")
    assert len(block["id"]) == len("toolu_") + 32


def test_openai_azure_filter_chunk_skipped():
    translator = ChatToMessagesStream()

    assert translator.feed({"id": "", "choices": [], "prompt_filter_results": []}) == b""


def test_recorded_openai_json_anthropic_sdk(server, anthropic_client):
    answer = json.loads(recorded("openai-chat-tools-cached")["response"]["body"])
    server.serve(json.dumps(chat_to_messages_response(answer)).encode())

    message = anthropic_client.messages.create(
        model="gpt-4.1", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
    )

    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["tool_use"]
    assert message.usage.input_tokens == 1187 - 1152
    assert message.usage.cache_read_input_tokens == 1152
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.output_tokens == 14


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
    ],
)
def test_finish_reason_to_stop_reason(finish_reason, stop_reason):
    choice = {"index": 0, "message": {"content": "x"}, "finish_reason": finish_reason}
    answer = {"id": "chatcmpl-1", "choices": [choice]}

    assert chat_to_messages_response(answer)["stop_reason"] == stop_reason


def test_openai_json_text_and_empty_arguments():
    answer = {
        "id": "chatcmpl-9f2c",
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": ""}}],
                },
            }
        ],
        "usage": {"prompt_tokens": 1520, "completion_tokens": 210, "prompt_tokens_details": {"cached_tokens": 1280}},
    }

    result = chat_to_messages_response(answer)

    assert result == {
        "id": "msg_9f2c",
        "type": "message",
        "role": "assistant",
        "model": "gpt-4o-2024-08-06",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "ping", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 240,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 1280,
            "output_tokens": 210,
        },
    }


def test_openai_json_invalid_arguments_kept():
    call = {"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": "{oops"}}
    choice = {"index": 0, "message": {"tool_calls": [call]}, "finish_reason": "tool_calls"}
    answer = {"id": "chatcmpl-1", "choices": [choice]}

    content = chat_to_messages_response(answer)["content"]

    assert content == [{"type": "tool_use", "id": "call_1", "name": "ping", "input": {"arguments": "{oops"}}]


# --- Error bodies ----------------------------------------------------------------------------------


def test_anthropic_error_to_openai_sdk(server, openai_client):
    upstream = recorded("anthropic-error-400")["response"]["body"].encode()
    server.serve(error_to_openai(400, upstream), status=400)

    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])

    assert info.value.body == {
        "message": "This model does not support effort level 'xhigh'. Supported levels: high, low, max, medium.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request_error",
    }


def test_openai_error_to_anthropic_sdk(server, anthropic_client):
    upstream = recorded("openai-error-404")["response"]["body"].encode()
    message = json.loads(upstream)["error"]["message"]
    server.serve(error_to_anthropic(404, upstream), status=404)

    with pytest.raises(anthropic.NotFoundError) as info:
        anthropic_client.messages.create(model="gpt-4.1", max_tokens=10, messages=[{"role": "user", "content": "Hi"}])

    assert info.value.body == {"type": "error", "error": {"type": "not_found_error", "message": message}}


@pytest.mark.parametrize(
    ("status", "openai_type", "anthropic_type"),
    [
        (401, "invalid_request_error", "authentication_error"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, "server_error", "api_error"),
        (529, "server_error", "overloaded_error"),
    ],
)
def test_error_type_follows_status(status, openai_type, anthropic_type):
    body = b'{"error": {"message": "boom"}}'

    assert json.loads(error_to_openai(status, body))["error"]["type"] == openai_type
    assert json.loads(error_to_anthropic(status, body))["error"]["type"] == anthropic_type


def test_error_body_not_json_quoted():
    result = json.loads(error_to_openai(502, b"<html>Bad gateway</html>"))

    assert result["error"]["message"] == "The upstream provider returned HTTP 502: <html>Bad gateway</html>"
    assert result["error"]["type"] == "server_error"

