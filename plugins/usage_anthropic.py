"""Token usage and response model of Anthropic Messages responses.

Anthropic's `input_tokens` already excludes cache reads (`cache_read_input_tokens`) and cache writes
(`cache_creation_input_tokens`), so the counts map one to one onto `addons.call.Usage`. The one-hour
part of the writes comes from `cache_creation.ephemeral_1h_input_tokens`. Without that breakdown
every write counts as a five-minute write.

A stream reports usage twice: `message_start` has the input-side counts and a provisional output
count, and `message_delta` has the cumulative final `output_tokens` plus, in newer API versions, the
input-side counts again (those win). `call.usage` is updated at each of the two events, and
`call.usage_complete` stays False from `message_start` until `message_delta` arrives, so a cut stream
is priced from what was seen and flagged as partial without any end-of-stream hook.

`/v1/messages/count_tokens` is free, so its response is not read.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from addons import hookimpl
from addons.call import Usage
from plugins.pricing import PRICE_CONTEXT_KEY

if TYPE_CHECKING:
    from mitmproxy import http

    from addons.call import Call
    from addons.sse import SSEEvent

def _count(container: Any, key: str) -> int | None:
    """Return a token count from a usage object, or None when it is missing or not an integer."""
    if not isinstance(container, dict):
        return None
    value = container.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def update_usage_from_anthropic(usage: Usage, report: dict[str, Any]) -> None:
    """Overwrite the fields of `usage` that the Anthropic usage object `report` contains."""
    input_tokens = _count(report, "input_tokens")
    if input_tokens is not None:
        usage.input_tokens = input_tokens
    output_tokens = _count(report, "output_tokens")
    if output_tokens is not None:
        usage.output_tokens = output_tokens
    cache_read = _count(report, "cache_read_input_tokens")
    if cache_read is not None:
        usage.cache_read_tokens = cache_read
    cache_write = _count(report, "cache_creation_input_tokens")
    if cache_write is not None:
        usage.cache_write_tokens = cache_write
    write_1h = _count(report.get("cache_creation"), "ephemeral_1h_input_tokens")
    if write_1h is not None:
        usage.cache_write_1h_tokens = write_1h
    thinking = _count(report.get("output_tokens_details"), "thinking_tokens")
    if thinking is not None:
        usage.reasoning_tokens = thinking
    # The 1h writes are a part of all writes, even if a later report repeats only the total.
    usage.cache_write_1h_tokens = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)


def usage_from_anthropic(report: dict[str, Any]) -> Usage:
    """Normalise an Anthropic `usage` object."""
    usage = Usage()
    update_usage_from_anthropic(usage, report)
    return usage


def _is_anthropic_usage(report: Any) -> bool:
    return isinstance(report, dict) and ("input_tokens" in report or "output_tokens" in report)


def _store_price_context(call: Call, report: dict[str, Any]) -> None:
    # genai-prices has separate rates for Anthropic's fast mode (`"speed": "fast"`).
    if report.get("speed") == "fast":
        call.metadata[PRICE_CONTEXT_KEY] = {"speed": "fast"}


def _is_priced_anthropic(call: Call) -> bool:
    return (
        call.provider is not None
        and call.provider.kind == "anthropic"
        and call.endpoint != "messages.count_tokens"
    )


def _is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith("text/event-stream")


@hookimpl
def tollhouse_response(call: Call, flow: http.HTTPFlow) -> None:
    response = flow.response
    if not _is_priced_anthropic(call) or response is None:
        return
    if not 200 <= response.status_code < 300 or _is_event_stream(response):
        return
    content = response.content
    if not content:
        return
    try:
        body = json.loads(content)
    except ValueError:
        return
    if not isinstance(body, dict):
        return

    model = body.get("model")
    if isinstance(model, str) and model:
        call.response_model = model
    report = body.get("usage")
    if _is_anthropic_usage(report):
        call.usage = usage_from_anthropic(report)
        _store_price_context(call, report)


def _event_type(event: SSEEvent) -> str | None:
    if event.event is not None:
        return event.event
    # With data-only framing (some compatible servers) the type is only in the JSON. A JSON string
    # cannot contain these quoted names unescaped, so a match is the `type` value.
    data = event.data
    if '"message_start"' in data:
        return "message_start"
    if '"message_delta"' in data:
        return "message_delta"
    return None


@hookimpl
def tollhouse_sse_event(call: Call, event: SSEEvent) -> None:
    if not _is_priced_anthropic(call):
        return
    event_type = _event_type(event)
    if event_type == "message_start":
        body = event.json
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            return
        model = message.get("model")
        if isinstance(model, str) and model:
            call.response_model = model
        report = message.get("usage")
        if _is_anthropic_usage(report):
            call.usage = usage_from_anthropic(report)
            call.usage_complete = False
            _store_price_context(call, report)
    elif event_type == "message_delta":
        body = event.json
        report = body.get("usage") if isinstance(body, dict) else None
        if not _is_anthropic_usage(report):
            return
        if call.usage is None:
            call.usage = Usage()
        update_usage_from_anthropic(call.usage, report)
        call.usage_complete = True
        _store_price_context(call, report)
