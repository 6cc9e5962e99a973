"""Anthropic endpoints of the fake upstream: messages, token counting and models.

Bodies follow api.anthropic.com as recorded in 2025-2026: compact JSON, and SSE where every event has an
`event:` line (SDK 2.17 ignores events without one). `message_start` carries the input-side usage and a
provisional `output_tokens`; `message_delta` repeats the input counts and carries the final, cumulative
`output_tokens`. Streamed data objects are padded with spaces before their closing brace, as the API does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Callable

from addons.testing.fake_upstream import (
    DEFAULT_TEXT,
    MODEL_SNAPSHOTS,
    BadRequest,
    Exchange,
    Headers,
    ReceivedRequest,
    Reply,
    deterministic_token,
    estimate_tokens,
    example_arguments,
    json_compact,
    limit_pieces,
    merge_usage,
    resolve_model,
    split_tokens,
    sse_event,
)

KIND = "anthropic"

JSON = "application/json"
EVENT_STREAM = "text/event-stream; charset=utf-8"
ORGANIZATION_ID = "00000000-0000-4000-8000-00000000fa4e"
#: (limit name, limit) pairs for the `anthropic-ratelimit-<name>-*` headers.
RATE_LIMITS = [("input-tokens", 2_000_000), ("output-tokens", 400_000), ("requests", 4_000), ("tokens", 2_400_000)]

THINKING_TEXT = "The user asked a short question, so a short and direct plan fits best."
#: Error `type` and message that api.anthropic.com sends with each status.
STATUS_ERRORS = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "This request would exceed your organization's rate limit. Please try again later."),
    500: ("api_error", "Internal server error"),
    503: ("api_error", "Service unavailable"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}
#: The `usage` fields that `message_delta` repeats. The others appear in `message_start` only.
DELTA_USAGE_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")


# --- headers and errors ----------------------------------------------------------------------------


def response_headers(
    exchange: Exchange, content_type: str, input_tokens: int = 0, *, exhausted: bool = False
) -> Headers:
    """Return the headers api.anthropic.com sends with every response. `exhausted` zeroes the remaining limits."""
    reset = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers: Headers = [
        ("content-type", content_type),
        ("request-id", request_id(exchange)),
        ("anthropic-organization-id", ORGANIZATION_ID),
    ]
    for name, limit in RATE_LIMITS:
        if exhausted:
            remaining = 0
        elif name == "requests":
            remaining = limit - 1
        else:
            remaining = max(0, limit - input_tokens)
        headers += [
            (f"anthropic-ratelimit-{name}-limit", str(limit)),
            (f"anthropic-ratelimit-{name}-remaining", str(remaining)),
            (f"anthropic-ratelimit-{name}-reset", reset),
        ]
    return headers


def request_id(exchange: Exchange) -> str:
    """Return the exchange's `request-id`, which error bodies repeat as `request_id`."""
    return exchange.make_id("req_", 24, name="request")


def error_reply(
    exchange: Exchange, status: int, error_type: str, message: str, headers: Headers | None = None
) -> Reply:
    """Return an error in Anthropic's layout: ``{"type": "error", "error": {type, message}, "request_id"}``."""
    body = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id(exchange)}
    return Reply(status, headers or response_headers(exchange, JSON), json_compact(body).encode())


def presented_key(request: ReceivedRequest) -> str | None:
    """Return the key from `x-api-key`, else from `Authorization: Bearer <key>`, else None."""
    key = request.header("x-api-key")
    if key is not None:
        return key
    authorization = request.header("authorization")
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else authorization


def authentication_error(exchange: Exchange, key: str | None) -> Reply:
    """Return the 401 for a missing or wrong key."""
    message = "invalid x-api-key" if key else "x-api-key header is required"
    return error_reply(exchange, 401, "authentication_error", message)


def invalid_request_error(exchange: Exchange, message: str, param: str | None = None) -> Reply:
    """Return a 400 invalid_request_error. Anthropic names the field inside `message`, so `param` is unused."""
    return error_reply(exchange, 400, "invalid_request_error", message)


def not_found_error(exchange: Exchange, message: str | None = None) -> Reply:
    """Return the 404 for a path this fake does not serve (or a missing fixture, with `message`)."""
    return error_reply(exchange, 404, "not_found_error", message or "Not found")


def fault_error(exchange: Exchange, status: int) -> Reply:
    """Return the error body and headers that api.anthropic.com sends with `status`, for `x-fault`."""
    fault = exchange.steering.fault
    if status == 401:
        return authentication_error(exchange, presented_key(exchange.request))
    if status >= 500:
        fallback = ("api_error", "Internal server error")
    else:
        fallback = ("invalid_request_error", "Invalid request.")
    error_type, message = STATUS_ERRORS.get(status, fallback)

    headers = response_headers(exchange, JSON, exhausted=status == 429)
    headers.append(("x-should-retry", "true" if fault.retry else "false"))
    if status in (429, 529) or fault.retry_after is not None:
        seconds = 1.0 if fault.retry_after is None else fault.retry_after
        headers.append(("retry-after", str(math.ceil(seconds))))
        if fault.retry_after is not None:
            headers.append(("retry-after-ms", str(round(seconds * 1000))))
    return error_reply(exchange, status, error_type, message, headers)


def route(method: str, path: str) -> Callable[[Exchange], Reply] | None:
    """Return the handler for `method` and `path`, or None when this fake does not serve them."""
    path = path.rstrip("/")
    if method == "POST" and path == "/v1/messages":
        return messages
    if method == "POST" and path == "/v1/messages/count_tokens":
        return count_tokens
    if method == "GET" and path == "/v1/models":
        return list_models
    return None


# --- messages --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Block:
    """One content block of the fake model's output, and the deltas it streams as."""

    kind: str  # "thinking", "text" or "tool_use"
    deltas: list[str]
    tool_id: str = ""
    name: str = ""
    tool_input: dict[str, Any] = field(default_factory=dict)
    signature: str = ""


@dataclass(slots=True)
class MessagePlan:
    """Planned output of the fake model: content blocks, stop reason and their output-token count."""

    blocks: list[Block]
    stop_reason: str
    output_tokens: int


def messages(exchange: Exchange) -> Reply:
    """Handle ``POST /v1/messages``, returning JSON, or SSE when the request has ``stream: true``."""
    body = _validated_body(exchange, require_max_tokens=True)
    model = resolve_model(body["model"])
    plan = _plan_message(exchange, body)
    usage = _usage(exchange, body, plan)
    message_id = exchange.make_id("msg_", 24, name="message")
    stream = bool(body.get("stream"))
    headers = response_headers(exchange, EVENT_STREAM if stream else JSON, usage.get("input_tokens", 0))
    if stream:
        return Reply(200, headers, events=_stream_events(exchange, model, message_id, plan, usage))
    return Reply(200, headers, json_compact(_message_json(model, message_id, plan, usage)).encode())


def count_tokens(exchange: Exchange) -> Reply:
    """Handle ``POST /v1/messages/count_tokens``, returning the input-token estimate (or `x-fake-usage`)."""
    body = _validated_body(exchange, require_max_tokens=False)
    default = {"input_tokens": estimate_tokens(body.get("system"), body.get("messages"), body.get("tools"))}
    counted = merge_usage(default, exchange.steering.usage)
    body_bytes = json_compact({"input_tokens": counted["input_tokens"]}).encode()
    return Reply(200, response_headers(exchange, JSON), body_bytes)


def _validated_body(exchange: Exchange, *, require_max_tokens: bool) -> dict[str, Any]:
    if exchange.request.header("anthropic-version") is None:
        raise BadRequest("anthropic-version: header is required")
    body = exchange.json_body()
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("model: Field required", "model")
    max_tokens = body.get("max_tokens")
    if require_max_tokens and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise BadRequest("max_tokens: Field required", "max_tokens")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadRequest("messages: Field required", "messages")
    return body


def _plan_message(exchange: Exchange, body: dict[str, Any]) -> MessagePlan:
    """Plan the content blocks: thinking when the request enables it, then text and/or one tool call."""
    steering = exchange.steering
    blocks: list[Block] = []
    tokens = 0

    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    if thinking.get("type") in ("enabled", "adaptive"):
        pieces = split_tokens(THINKING_TEXT)
        signature = base64.b64encode(hashlib.sha512(THINKING_TEXT.encode()).digest() * 3).decode("ascii")
        blocks.append(Block("thinking", _group(pieces, 4), signature=signature))
        tokens += len(pieces)

    tool = _pick_tool(body, steering.tool_call)
    stop_reason = "end_turn"
    if tool is None or steering.text is not None:
        text = steering.text if steering.text is not None else DEFAULT_TEXT
        pieces, truncated = limit_pieces(split_tokens(text), body.get("max_tokens"))
        blocks.append(Block("text", _group(pieces, 3)))
        tokens += len(pieces)
        stop_reason = "max_tokens" if truncated else stop_reason

    if tool is not None and stop_reason != "max_tokens":
        tool_input = example_arguments(tool.get("input_schema"))
        partial = _json_spaced(tool_input) if tool_input else ""
        deltas = [""] + [partial[start : start + 12] for start in range(0, len(partial), 12)]
        tool_id = exchange.make_id("toolu_", 24)
        blocks.append(Block("tool_use", deltas, tool_id=tool_id, name=tool["name"], tool_input=tool_input))
        tokens += len(deltas)
        stop_reason = "tool_use"
    return MessagePlan(blocks, stop_reason, max(1, tokens))


def _pick_tool(body: dict[str, Any], forced: bool | None) -> dict[str, Any] | None:
    """Return the tool to call: the one `tool_choice` names, else the first, unless the last turn has a tool result."""
    tools = [tool for tool in body.get("tools") or [] if isinstance(tool, dict) and isinstance(tool.get("name"), str)]
    choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {"type": "auto"}
    if not tools or forced is False or choice.get("type") == "none":
        return None
    if choice.get("type") == "tool":
        return next((tool for tool in tools if tool["name"] == choice.get("name")), tools[0])
    if choice.get("type") == "auto" and not forced and _follows_tool_result(body["messages"]):
        return None
    return tools[0]


def _follows_tool_result(turns: list[Any]) -> bool:
    last = turns[-1] if isinstance(turns[-1], dict) else {}
    content = last.get("content")
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )


def _group(pieces: list[str], size: int) -> list[str]:
    return ["".join(pieces[start : start + size]) for start in range(0, len(pieces), size)]


def _json_spaced(value: Any) -> str:
    """Serialise tool input with ", " and ": " separators, as Anthropic streams `partial_json`."""
    return json.dumps(value, ensure_ascii=False)


def _usage(exchange: Exchange, body: dict[str, Any], plan: MessagePlan) -> dict[str, Any]:
    """Return the usage: defaults, then `x-fake-usage`, then the cache totals made consistent.

    A cache-write total without a split counts as 5-minute writes, and a split without a total sets the total.
    """
    override = exchange.steering.usage
    default = {
        "input_tokens": estimate_tokens(body.get("system"), body.get("messages"), body.get("tools")),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": plan.output_tokens,
        "service_tier": "standard",
        "inference_geo": "not_available",
    }
    usage = merge_usage(default, override)
    split = usage.get("cache_creation")
    if "cache_creation_input_tokens" in override and "cache_creation" not in override and isinstance(split, dict):
        split["ephemeral_5m_input_tokens"] = usage["cache_creation_input_tokens"]
        split["ephemeral_1h_input_tokens"] = 0
    elif "cache_creation" in override and "cache_creation_input_tokens" not in override and isinstance(split, dict):
        usage["cache_creation_input_tokens"] = sum(value for value in split.values() if isinstance(value, int))
    return usage


def _message_json(model: str, message_id: str, plan: MessagePlan, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": [_block_json(block) for block in plan.blocks],
        "stop_reason": plan.stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _block_json(block: Block) -> dict[str, Any]:
    if block.kind == "thinking":
        return {"type": "thinking", "thinking": "".join(block.deltas), "signature": block.signature}
    if block.kind == "tool_use":
        return {"type": "tool_use", "id": block.tool_id, "name": block.name, "input": block.tool_input}
    return {"type": "text", "text": "".join(block.deltas)}


def _stream_events(
    exchange: Exchange, model: str, message_id: str, plan: MessagePlan, usage: dict[str, Any]
) -> list[str]:
    """Build the event stream: message_start, ping, the blocks, message_delta and message_stop.

    With `x-fault: midstream-error`, an `error` event (overloaded_error) follows the first content
    delta and ends the stream. With `x-fault: early-error`, the same event follows `message_start` and ends it.
    """
    crlf = exchange.steering.crlf
    events: list[str] = []

    def add(name: str, data: dict[str, Any]) -> None:
        text = json_compact({"type": name} | data)
        padding = " " * (int(deterministic_token(f"{message_id}:{len(events)}", 1), 36) % 16)
        events.append(sse_event(text[:-1] + padding + "}", event=name, crlf=crlf))

    start_usage = dict(usage)
    # message_start reports a provisional output count, and message_delta the final one.
    start_usage["output_tokens"] = min(1, usage.get("output_tokens", 1))
    message = {
        "model": model,
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "stop_details": None,
        "usage": start_usage,
    }
    add("message_start", {"message": message})
    if exchange.steering.fault.early_error:
        events.append(_overloaded_event(crlf))
        return events

    for index, block in enumerate(plan.blocks):
        add("content_block_start", {"index": index, "content_block": _block_start(block)})
        if index == 0:
            events.append(sse_event('{"type": "ping"}', event="ping", crlf=crlf))
        for delta in _block_deltas(block):
            add("content_block_delta", {"index": index, "delta": delta})
            if exchange.steering.fault.midstream_error:
                events.append(_overloaded_event(crlf))
                return events
        add("content_block_stop", {"index": index})

    delta_usage = {name: usage[name] for name in DELTA_USAGE_FIELDS if name in usage}
    if "server_tool_use" in usage:
        delta_usage["server_tool_use"] = usage["server_tool_use"]
    delta = {"stop_reason": plan.stop_reason, "stop_sequence": None, "stop_details": None}
    add("message_delta", {"delta": delta, "usage": delta_usage})
    add("message_stop", {})
    return events


def _overloaded_event(crlf: bool) -> str:
    """Return the `error` event that api.anthropic.com sends when it becomes overloaded during a stream."""
    error = {"type": "overloaded_error", "message": "Overloaded"}
    return sse_event(json_compact({"type": "error", "error": error}), event="error", crlf=crlf)


def _block_start(block: Block) -> dict[str, Any]:
    if block.kind == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    if block.kind == "tool_use":
        return {"type": "tool_use", "id": block.tool_id, "name": block.name, "input": {}, "caller": {"type": "direct"}}
    return {"type": "text", "text": ""}


def _block_deltas(block: Block) -> list[dict[str, Any]]:
    """Return the deltas of a block. A thinking block ends with an empty thinking delta and its signature."""
    if block.kind == "thinking":
        deltas = [{"type": "thinking_delta", "thinking": piece} for piece in block.deltas]
        deltas.append({"type": "thinking_delta", "thinking": ""})
        deltas.append({"type": "signature_delta", "signature": block.signature})
        return deltas
    if block.kind == "tool_use":
        return [{"type": "input_json_delta", "partial_json": piece} for piece in block.deltas]
    return [{"type": "text_delta", "text": piece} for piece in block.deltas]


# --- models ----------------------------------------------------------------------------------------


def list_models(exchange: Exchange) -> Reply:
    """Handle ``GET /v1/models`` (with `anthropic-version`), listing the Claude snapshots in the snapshot table."""
    snapshots = sorted({snapshot for alias, snapshot in MODEL_SNAPSHOTS.items() if alias.startswith("claude")})
    data = [
        {
            "type": "model",
            "id": snapshot,
            "display_name": snapshot.removeprefix("claude-").replace("-", " ").title(),
            "created_at": f"{snapshot[-8:-4]}-{snapshot[-4:-2]}-{snapshot[-2:]}T00:00:00Z",
        }
        for snapshot in snapshots
    ]
    document = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    return Reply(200, response_headers(exchange, JSON), json_compact(document).encode())
