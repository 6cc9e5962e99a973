"""Tests for usage extraction (`plugins.usage_openai`, `plugins.usage_anthropic`) and for the
`include_usage` injection of `plugins.stream_usage`, called through pluggy as the gateway calls them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pluggy
import pytest
from mitmproxy import http
from mitmproxy.test import tflow

import addons.hookspecs
import addons.sse
from addons.call import Call, Usage, endpoint_for
from addons.sse import SSEEvent, SSEReader
from plugins import stream_usage, usage_anthropic, usage_openai

RECORDED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "recorded"
MISSING_FIXTURES = f"recorded provider traffic not found at {RECORDED} (it is not part of the repository)"


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("tollhouse")
    manager.add_hookspecs(addons.hookspecs)
    # The built-in registration order.
    for plugin in (stream_usage, usage_openai, usage_anthropic):
        manager.register(plugin)
    return manager


def make_call(kind: str, path: str, *, stream: bool = False, body: dict[str, Any] | None = None) -> Call:
    call = Call(request_id="t", listener="proxy")
    call.provider = SimpleNamespace(kind=kind, name=kind)  # type: ignore[assignment]
    call.endpoint = endpoint_for(kind, path)
    call.method = "POST"
    call.path = path
    call.stream = stream
    call.request_json = body
    call.model = body.get("model") if body else None
    return call


def make_flow(status: int, content: bytes, content_type: str = "application/json") -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flow.response.status_code = status
    flow.response.headers["content-type"] = content_type
    flow.response.content = content
    return flow


def load_fixture(name: str) -> dict[str, Any]:
    path = RECORDED / f"{name}.json"
    if not path.is_file():
        pytest.skip(MISSING_FIXTURES)
    return json.loads(path.read_text(encoding="utf-8"))


def fixture_call(fixture: dict[str, Any]) -> Call:
    request = fixture["request"]
    body = request["body"]
    return make_call(fixture["provider"], request["path"], stream=bool(body.get("stream")), body=body)


def run_json(pm: pluggy.PluginManager, call: Call, status: int, body: bytes) -> None:
    call.status = status
    pm.hook.tollhouse_response(call=call, flow=make_flow(status, body))


def run_stream(pm: pluggy.PluginManager, call: Call, stream: bytes, seed: int = 1) -> list[SSEEvent]:
    """Pass a stream through the reader and the hooks as the gateway does, and return the forwarded events."""
    rng = random.Random(seed)
    reader = SSEReader()
    events: list[SSEEvent] = []
    offset = 0
    while offset < len(stream):
        size = rng.randint(1, 200)
        events.extend(reader.feed(stream[offset : offset + size]))
        offset += size
    events.extend(reader.close())

    call.status = 200
    forwarded = []
    for event in events:
        results = pm.hook.tollhouse_sse_event(call=call, event=event)
        if False not in results:
            forwarded.append(event)
    flow = make_flow(200, b"", "text/event-stream; charset=utf-8")
    pm.hook.tollhouse_response(call=call, flow=flow)
    return forwarded


def sse(*bodies: dict[str, Any] | str, names: list[str] | None = None) -> bytes:
    parts = []
    for index, body in enumerate(bodies):
        data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
        prefix = f"event: {names[index]}\n" if names else ""
        parts.append(f"{prefix}data: {data}\n\n")
    return "".join(parts).encode()


# -- OpenAI, non-streamed --------------------------------------------------------------------------


OPENAI_JSON_CASES = [
    ("openai-chat-cached", Usage(input_tokens=120, output_tokens=2, cache_read_tokens=1024), "gpt-4.1-2025-04-14"),
    ("openai-chat-tools-cached", Usage(input_tokens=35, output_tokens=14, cache_read_tokens=1152), "gpt-4.1-2025-04-14"),
    ("openai-chat-reasoning", Usage(input_tokens=208, output_tokens=138, reasoning_tokens=128), "gpt-5-nano-2025-08-07"),
    ("openai-embeddings", Usage(input_tokens=7), "text-embedding-3-small"),
    ("openai-responses", Usage(input_tokens=11, output_tokens=5), "gpt-5.5-2026-04-23"),
    (
        "openai-responses-tools-reasoning",
        Usage(input_tokens=88, output_tokens=65, reasoning_tokens=45),
        "gpt-5.5-2026-04-23",
    ),
]


@pytest.mark.parametrize(("name", "expected", "model"), OPENAI_JSON_CASES, ids=[c[0] for c in OPENAI_JSON_CASES])
def test_openai_json_fixture_usage(pm: pluggy.PluginManager, name: str, expected: Usage, model: str) -> None:
    fixture = load_fixture(name)
    call = fixture_call(fixture)

    run_json(pm, call, fixture["response"]["status"], fixture["response"]["body"].encode())

    assert call.usage == expected
    assert call.response_model == model
    assert call.usage_complete is True
    # Embeddings responses carry no service tier.
    expected_context = None if name == "openai-embeddings" else {"service_tier": "default"}
    assert call.metadata.get("pricing.context") == expected_context


@pytest.mark.parametrize("name", ["openai-error-400", "openai-error-404", "openai-error-429", "anthropic-error-400"])
def test_error_fixture_has_no_usage(pm: pluggy.PluginManager, name: str) -> None:
    fixture = load_fixture(name)
    call = fixture_call(fixture)

    run_json(pm, call, fixture["response"]["status"], fixture["response"]["body"].encode())

    assert call.usage is None
    assert call.response_model is None


def test_openai_chat_cache_write_tokens(pm: pluggy.PluginManager) -> None:
    body = {
        "model": "gpt-x-2026-01-01",
        "service_tier": "flex",
        "usage": {
            "prompt_tokens": 5000,
            "completion_tokens": 700,
            "prompt_tokens_details": {"cached_tokens": 3000, "cache_write_tokens": 1500},
            "completion_tokens_details": {"reasoning_tokens": 600},
        },
    }
    call = make_call("openai", "/v1/chat/completions", body={"model": "gpt-x"})

    run_json(pm, call, 200, json.dumps(body).encode())

    assert call.usage == Usage(
        input_tokens=500, output_tokens=700, cache_read_tokens=3000, cache_write_tokens=1500, reasoning_tokens=600
    )
    assert call.response_model == "gpt-x-2026-01-01"
    assert call.metadata["pricing.context"] == {"service_tier": "flex"}


def test_openai_responses_cache_write_tokens(pm: pluggy.PluginManager) -> None:
    body = {
        "object": "response",
        "model": "gpt-y",
        "usage": {
            "input_tokens": 900,
            "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 200},
            "output_tokens": 50,
            "output_tokens_details": {"reasoning_tokens": 20},
        },
    }
    call = make_call("openai", "/v1/responses", body={"model": "gpt-y"})

    run_json(pm, call, 200, json.dumps(body).encode())

    assert call.usage == Usage(
        input_tokens=600, output_tokens=50, cache_read_tokens=100, cache_write_tokens=200, reasoning_tokens=20
    )


def test_openai_null_details_count_as_zero(pm: pluggy.PluginManager) -> None:
    body = {
        "model": "m",
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 3,
            "prompt_tokens_details": None,
            "completion_tokens_details": {"reasoning_tokens": None},
        },
    }
    call = make_call("openai", "/v1/chat/completions", body={"model": "m"})

    run_json(pm, call, 200, json.dumps(body).encode())

    assert call.usage == Usage(input_tokens=10, output_tokens=3)


def test_openai_non_json_body_ignored(pm: pluggy.PluginManager) -> None:
    call = make_call("openai", "/v1/chat/completions", body={"model": "m"})

    run_json(pm, call, 200, b"<html>not json</html>")

    assert call.usage is None


def test_openai_plugin_ignores_anthropic_call(pm: pluggy.PluginManager) -> None:
    body = {"model": "m", "usage": {"prompt_tokens": 10, "completion_tokens": 3}}
    call = make_call("anthropic", "/v1/messages", body={"model": "m"})

    run_json(pm, call, 200, json.dumps(body).encode())

    assert call.usage is None


# -- OpenAI, streamed ------------------------------------------------------------------------------


OPENAI_STREAM_CASES = [
    ("openai-chat-stream-usage", Usage(input_tokens=78, output_tokens=9), "gpt-4o-mini-2024-07-18"),
    ("openai-chat-stream-tools", Usage(input_tokens=54, output_tokens=20), "gpt-4o-mini-2024-07-18"),
    ("openai-responses-stream", Usage(input_tokens=11, output_tokens=5), "gpt-5.5-2026-04-23"),
    ("openai-responses-stream-utf8", Usage(input_tokens=94, output_tokens=18), "gpt-5.5-2026-04-23"),
]


@pytest.mark.parametrize(("name", "expected", "model"), OPENAI_STREAM_CASES, ids=[c[0] for c in OPENAI_STREAM_CASES])
def test_openai_stream_fixture_usage(pm: pluggy.PluginManager, name: str, expected: Usage, model: str) -> None:
    fixture = load_fixture(name)
    call = fixture_call(fixture)

    run_stream(pm, call, fixture["response"]["body"].encode())

    assert call.usage == expected
    assert call.response_model == model
    assert call.usage_complete is True
    assert call.metadata["pricing.context"] == {"service_tier": "default"}


@pytest.mark.parametrize(("name", "parses"), [("openai-chat-stream-usage", 2), ("openai-responses-stream", 2)])
def test_openai_stream_parses_few_events(
    pm: pluggy.PluginManager, monkeypatch: pytest.MonkeyPatch, name: str, parses: int
) -> None:
    fixture = load_fixture(name)
    call = fixture_call(fixture)
    parsed: list[str] = []
    real_parse = addons.sse._parse_json

    def counting_parse(data: str) -> Any:
        parsed.append(data)
        return real_parse(data)

    monkeypatch.setattr(addons.sse, "_parse_json", counting_parse)

    run_stream(pm, call, fixture["response"]["body"].encode())

    # The first event with a model name and the one with the usage.
    assert len(parsed) == parses


def test_openai_chat_stream_cut_before_usage(pm: pluggy.PluginManager) -> None:
    fixture = load_fixture("openai-chat-stream-usage")
    call = fixture_call(fixture)
    body = fixture["response"]["body"].encode()
    cut = body[: body.index(b'"choices":[]')]

    run_stream(pm, call, cut)

    assert call.usage is None
    assert call.response_model == "gpt-4o-mini-2024-07-18"


@pytest.mark.parametrize("terminal", ["response.incomplete", "response.failed"])
def test_openai_responses_other_terminal_events(pm: pluggy.PluginManager, terminal: str) -> None:
    usage = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 16,
             "output_tokens_details": {"reasoning_tokens": 4}}
    stream = sse(
        {"type": "response.created", "response": {"model": "o3-2025-04-16", "usage": None}},
        {"type": "response.output_text.delta", "delta": "hi"},
        {"type": terminal, "response": {"model": "o3-2025-04-16", "service_tier": "flex", "usage": usage}},
        names=["response.created", "response.output_text.delta", terminal],
    )
    call = make_call("openai", "/v1/responses", stream=True, body={"model": "o3", "stream": True})

    run_stream(pm, call, stream)

    assert call.usage == Usage(input_tokens=32, output_tokens=16, cache_read_tokens=8, reasoning_tokens=4)
    assert call.response_model == "o3-2025-04-16"
    assert call.metadata["pricing.context"] == {"service_tier": "flex"}


def test_openai_stream_with_spaced_json(pm: pluggy.PluginManager) -> None:
    stream = (
        b'data: {"model": "m-1", "choices": [{"delta": {"content": "a"}}], "usage": null}\n\n'
        b'data: {"model": "m-1", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}\n\n'
        b"data: [DONE]\n\n"
    )
    call = make_call("openai", "/v1/chat/completions", stream=True,
                     body={"model": "m", "stream": True, "stream_options": {"include_usage": True}})

    run_stream(pm, call, stream)

    assert call.usage == Usage(input_tokens=9, output_tokens=2)
    assert call.response_model == "m-1"


# -- Anthropic -------------------------------------------------------------------------------------


ANTHROPIC_JSON_CASES = [
    (
        "anthropic-messages-cache-read-write",
        Usage(input_tokens=3, output_tokens=33, cache_read_tokens=1111, cache_write_tokens=418),
    ),
    ("anthropic-messages-cache-read", Usage(input_tokens=3, output_tokens=5, cache_read_tokens=1217)),
    ("anthropic-messages-tools-cached", Usage(input_tokens=24, output_tokens=33, cache_read_tokens=1857)),
]


@pytest.mark.parametrize(("name", "expected"), ANTHROPIC_JSON_CASES, ids=[c[0] for c in ANTHROPIC_JSON_CASES])
def test_anthropic_json_fixture_usage(pm: pluggy.PluginManager, name: str, expected: Usage) -> None:
    fixture = load_fixture(name)
    call = fixture_call(fixture)

    run_json(pm, call, fixture["response"]["status"], fixture["response"]["body"].encode())

    assert call.usage == expected
    assert call.response_model == "claude-sonnet-4-5-20250929"
    assert call.usage_complete is True


ANTHROPIC_STREAM_CASES = [
    ("anthropic-stream-text", Usage(input_tokens=10, output_tokens=4)),
    ("anthropic-stream-thinking-utf8", Usage(input_tokens=46, output_tokens=133)),
    ("anthropic-stream-tool-use", Usage(input_tokens=543, output_tokens=40)),
]


@pytest.mark.parametrize(("name", "expected"), ANTHROPIC_STREAM_CASES, ids=[c[0] for c in ANTHROPIC_STREAM_CASES])
def test_anthropic_stream_fixture_usage(pm: pluggy.PluginManager, name: str, expected: Usage) -> None:
    fixture = load_fixture(name)
    call = fixture_call(fixture)

    run_stream(pm, call, fixture["response"]["body"].encode())

    assert call.usage == expected
    assert call.response_model == "claude-haiku-4-5-20251001"
    assert call.usage_complete is True


def test_anthropic_stream_parses_two_events(pm: pluggy.PluginManager, monkeypatch: pytest.MonkeyPatch) -> None:
    fixture = load_fixture("anthropic-stream-thinking-utf8")
    call = fixture_call(fixture)
    parsed: list[str] = []
    real_parse = addons.sse._parse_json
    monkeypatch.setattr(addons.sse, "_parse_json", lambda data: parsed.append(data) or real_parse(data))

    run_stream(pm, call, fixture["response"]["body"].encode())

    assert len(parsed) == 2


def test_anthropic_stream_cut_keeps_partial_usage(pm: pluggy.PluginManager) -> None:
    fixture = load_fixture("anthropic-stream-text")
    call = fixture_call(fixture)
    body = fixture["response"]["body"].encode()
    cut = body[: body.index(b"event: message_delta")]

    run_stream(pm, call, cut)

    assert call.usage == Usage(input_tokens=10, output_tokens=2)
    assert call.usage_complete is False


def test_anthropic_usage_visible_as_events_arrive(pm: pluggy.PluginManager) -> None:
    start = {"type": "message_start", "message": {"model": "claude-sonnet-4-20250514", "usage": {
        "input_tokens": 12, "cache_read_input_tokens": 3000, "cache_creation_input_tokens": 2500,
        "cache_creation": {"ephemeral_5m_input_tokens": 500, "ephemeral_1h_input_tokens": 2000},
        "output_tokens": 1}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {
        "input_tokens": 14, "cache_read_input_tokens": 3100, "cache_creation_input_tokens": 2500,
        "output_tokens": 321}}
    events = SSEReader().feed(sse(start, delta, names=["message_start", "message_delta"]))
    call = make_call("anthropic", "/v1/messages", stream=True, body={"model": "claude-sonnet-4-0", "stream": True})

    pm.hook.tollhouse_sse_event(call=call, event=events[0])
    assert call.usage == Usage(input_tokens=12, output_tokens=1, cache_read_tokens=3000,
                               cache_write_tokens=2500, cache_write_1h_tokens=2000)
    assert call.usage_complete is False
    assert call.response_model == "claude-sonnet-4-20250514"

    pm.hook.tollhouse_sse_event(call=call, event=events[1])
    # The repeated input-side counts in message_delta win, and the 1h split stays from message_start.
    assert call.usage == Usage(input_tokens=14, output_tokens=321, cache_read_tokens=3100,
                               cache_write_tokens=2500, cache_write_1h_tokens=2000)
    assert call.usage_complete is True


def test_anthropic_data_only_stream(pm: pluggy.PluginManager) -> None:
    start = {"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": 5, "output_tokens": 1}}}
    delta = {"type": "message_delta", "usage": {"output_tokens": 9}}
    call = make_call("anthropic", "/v1/messages", stream=True, body={"model": "claude-x", "stream": True})

    run_stream(pm, call, sse(start, delta))

    assert call.usage == Usage(input_tokens=5, output_tokens=9)
    assert call.usage_complete is True


def test_anthropic_1h_writes_and_fast_mode(pm: pluggy.PluginManager) -> None:
    body = {"type": "message", "model": "claude-opus-4-6", "usage": {
        "input_tokens": 50, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
        "output_tokens": 70, "output_tokens_details": {"thinking_tokens": 30}, "speed": "fast"}}
    call = make_call("anthropic", "/v1/messages", body={"model": "claude-opus-4-6"})

    run_json(pm, call, 200, json.dumps(body).encode())

    assert call.usage == Usage(input_tokens=50, output_tokens=70, cache_write_tokens=1000,
                               cache_write_1h_tokens=600, reasoning_tokens=30)
    assert call.metadata["pricing.context"] == {"speed": "fast"}


def test_anthropic_count_tokens_has_no_usage(pm: pluggy.PluginManager) -> None:
    call = make_call("anthropic", "/v1/messages/count_tokens", body={"model": "claude-sonnet-4-0"})

    run_json(pm, call, 200, b'{"input_tokens": 1234}')

    assert call.endpoint == "messages.count_tokens"
    assert call.usage is None


def test_anthropic_error_status_ignored(pm: pluggy.PluginManager) -> None:
    body = {"type": "message", "model": "claude-x", "usage": {"input_tokens": 5, "output_tokens": 1}}
    call = make_call("anthropic", "/v1/messages", body={"model": "claude-x"})

    run_json(pm, call, 529, json.dumps(body).encode())

    assert call.usage is None


# -- include_usage injection -----------------------------------------------------------------------


def request_flow(body: bytes) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.path = "/v1/chat/completions"
    flow.request.content = body
    return flow


def test_inject_include_usage_keeps_client_bytes(pm: pluggy.PluginManager) -> None:
    raw = b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    call = make_call("openai", "/v1/chat/completions", stream=True, body=json.loads(raw))
    flow = request_flow(raw)

    pm.hook.tollhouse_upstream_request(call=call, flow=flow)

    assert flow.request.content == b'{"stream_options":{"include_usage":true},' + raw[1:]
    assert json.loads(flow.request.content)["stream_options"] == {"include_usage": True}
    assert call.request_json["stream_options"] == {"include_usage": True}
    assert call.rewrite_stream is True
    assert call.metadata[stream_usage.INJECTED_KEY] is True


def test_inject_keeps_other_stream_options(pm: pluggy.PluginManager) -> None:
    body = {"model": "gpt-4o", "stream": True, "stream_options": {"include_obfuscation": False, "include_usage": False}}
    call = make_call("openai", "/v1/chat/completions", stream=True, body=body)
    flow = request_flow(json.dumps(body).encode())

    pm.hook.tollhouse_upstream_request(call=call, flow=flow)

    sent = json.loads(flow.request.content)
    assert sent == {"model": "gpt-4o", "stream": True,
                    "stream_options": {"include_obfuscation": False, "include_usage": True}}
    assert call.rewrite_stream is True


def test_inject_replaces_null_stream_options(pm: pluggy.PluginManager) -> None:
    body = {"model": "gpt-4o", "stream": True, "stream_options": None}
    call = make_call("openai", "/v1/chat/completions", stream=True, body=body)
    flow = request_flow(json.dumps(body).encode())

    pm.hook.tollhouse_upstream_request(call=call, flow=flow)

    assert json.loads(flow.request.content)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("kind", "path", "stream", "body"),
    [
        ("openai", "/v1/chat/completions", True, {"model": "m", "stream": True, "stream_options": {"include_usage": True}}),
        ("openai", "/v1/chat/completions", False, {"model": "m"}),
        ("openai", "/v1/responses", True, {"model": "m", "stream": True}),
        ("anthropic", "/v1/messages", True, {"model": "m", "stream": True}),
    ],
    ids=["client-requested", "not-streamed", "responses", "anthropic"],
)
def test_inject_skipped(pm: pluggy.PluginManager, kind: str, path: str, stream: bool, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    call = make_call(kind, path, stream=stream, body=body)
    flow = request_flow(raw)

    pm.hook.tollhouse_upstream_request(call=call, flow=flow)

    assert flow.request.content == raw
    assert call.rewrite_stream is False
    assert stream_usage.INJECTED_KEY not in call.metadata


def test_inject_skipped_when_answered(pm: pluggy.PluginManager) -> None:
    body = {"model": "m", "stream": True}
    raw = json.dumps(body).encode()
    call = make_call("openai", "/v1/chat/completions", stream=True, body=body)
    flow = request_flow(raw)
    flow.response = http.Response.make(200, b"{}")

    pm.hook.tollhouse_upstream_request(call=call, flow=flow)

    assert flow.request.content == raw
    assert call.rewrite_stream is False


def test_injected_stream_matches_plain_stream(pm: pluggy.PluginManager) -> None:
    fixture = load_fixture("openai-chat-stream-usage")
    body = fixture["response"]["body"].encode()
    call = make_call("openai", "/v1/chat/completions", stream=True, body={"model": "gpt-4o-mini", "stream": True})
    pm.hook.tollhouse_upstream_request(call=call, flow=request_flow(b'{"model":"gpt-4o-mini","stream":true}'))

    forwarded = run_stream(pm, call, body)

    # What upstream sends without include_usage: no usage chunk and no "usage" member.
    expected = b"".join(
        block + b"\n\n"
        for block in body.split(b"\n\n")
        if block and b'"choices":[]' not in block
    ).replace(b',"usage":null', b"")
    assert b"".join(event.raw for event in forwarded) == expected
    assert len(forwarded) == 11
    for event in forwarded[:-1]:
        assert "usage" not in json.loads(event.raw.decode()[len("data: "):])
    assert forwarded[-1].raw == b"data: [DONE]\n\n"
    assert call.usage == Usage(input_tokens=78, output_tokens=9)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'data: {"id":"a","usage":null,"obfuscation":"x"}\n\n', b'data: {"id":"a","obfuscation":"x"}\n\n'),
        (b'data: {"usage":null,"id":"a"}\n\n', b'data: {"id":"a"}\n\n'),
        (b'data: {"id":"a","usage":null}\n\n', b'data: {"id":"a"}\n\n'),
        (b'data: {"id": "a", "usage": null}\r\n\r\n', b'data: {"id": "a"}\r\n\r\n'),
        (b'data: {"id":"a","content":"\\"usage\\":null"}\n\n', b'data: {"id":"a","content":"\\"usage\\":null"}\n\n'),
        (b"data: [DONE]\n\n", b"data: [DONE]\n\n"),
        (b": ping\n\n", b": ping\n\n"),
    ],
    ids=["middle", "first", "last", "spaced-crlf", "inside-string", "done", "comment"],
)
def test_usage_null_member_removed(pm: pluggy.PluginManager, raw: bytes, expected: bytes) -> None:
    call = make_call("openai", "/v1/chat/completions", stream=True, body={"model": "m", "stream": True})
    call.metadata[stream_usage.INJECTED_KEY] = True
    event = SSEReader().feed(raw)[0]

    results = pm.hook.tollhouse_sse_event(call=call, event=event)

    assert False not in results
    assert event.raw == expected


def test_usage_chunk_withheld_only_when_injected(pm: pluggy.PluginManager) -> None:
    raw = b'data: {"id":"a","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    injected = make_call("openai", "/v1/chat/completions", stream=True, body={"model": "m", "stream": True})
    injected.metadata[stream_usage.INJECTED_KEY] = True
    requested = make_call("openai", "/v1/chat/completions", stream=True, body={"model": "m", "stream": True})

    injected_results = pm.hook.tollhouse_sse_event(call=injected, event=SSEReader().feed(raw)[0])
    requested_results = pm.hook.tollhouse_sse_event(call=requested, event=SSEReader().feed(raw)[0])

    assert False in injected_results
    assert False not in requested_results
    assert injected.usage == Usage(input_tokens=3, output_tokens=1)
    assert requested.usage == Usage(input_tokens=3, output_tokens=1)


def test_azure_filter_chunk_not_withheld(pm: pluggy.PluginManager) -> None:
    raw = b'data: {"choices":[],"model":"","prompt_filter_results":[{"prompt_index":0}]}\n\n'
    call = make_call("openai", "/v1/chat/completions", stream=True, body={"model": "m", "stream": True})
    call.metadata[stream_usage.INJECTED_KEY] = True
    event = SSEReader().feed(raw)[0]

    results = pm.hook.tollhouse_sse_event(call=call, event=event)

    assert False not in results
    assert event.raw == raw
