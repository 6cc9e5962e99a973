"""Token usage and response model of OpenAI responses: Chat Completions, Responses and Embeddings.

OpenAI counts cached and cache-written tokens inside `prompt_tokens` (Responses: `input_tokens`), and
reasoning tokens inside `completion_tokens` (`output_tokens`). `usage_from_openai` splits them into
the disjoint fields of `addons.call.Usage`.

Streamed responses carry usage in one event: the extra `choices: []` chunk of a Chat Completions stream
sent with `stream_options.include_usage` (see `plugins.stream_usage`), or the terminal
`response.completed` / `response.incomplete` / `response.failed` event of a Responses stream. A stream
that ends before that event leaves `call.usage` as None.

The response's `service_tier` (flex, priority, ...) is stored as `call.metadata["pricing.context"]`,
which `plugins.pricing` passes to genai-prices.
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

def _count(container: Any, key: str) -> int:
    """Return a token count from a usage object, counting missing, null or non-integer values as 0."""
    if not isinstance(container, dict):
        return 0
    value = container.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return 0


def usage_from_openai(usage: dict[str, Any]) -> Usage:
    """Normalise an OpenAI `usage` object (Chat Completions, Embeddings or Responses shape)."""
    if "prompt_tokens" in usage:
        prompt = _count(usage, "prompt_tokens")
        completion = _count(usage, "completion_tokens")
        input_details = usage.get("prompt_tokens_details")
        output_details = usage.get("completion_tokens_details")
    else:
        prompt = _count(usage, "input_tokens")
        completion = _count(usage, "output_tokens")
        input_details = usage.get("input_tokens_details")
        output_details = usage.get("output_tokens_details")

    cache_read = _count(input_details, "cached_tokens")
    cache_write = _count(input_details, "cache_write_tokens")
    return Usage(
        # Clamped so that an inconsistent report can never produce a negative cost.
        input_tokens=max(0, prompt - cache_read - cache_write),
        output_tokens=completion,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=_count(output_details, "reasoning_tokens"),
    )


def apply_openai_body(call: Call, body: dict[str, Any]) -> None:
    """Copy usage, model and service tier from a response object or a stream chunk onto `call`."""
    model = body.get("model")
    if isinstance(model, str) and model:
        call.response_model = model

    usage = body.get("usage")
    if isinstance(usage, dict) and ("prompt_tokens" in usage or "input_tokens" in usage):
        call.usage = usage_from_openai(usage)

    service_tier = body.get("service_tier")
    if isinstance(service_tier, str) and service_tier:
        call.metadata[PRICE_CONTEXT_KEY] = {"service_tier": service_tier}


def _is_openai(call: Call) -> bool:
    # Azure and OpenAI-compatible providers report usage in OpenAI's shape.
    return call.provider is not None and getattr(call.provider, "api_format", call.provider.kind) == "openai"


def _is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith("text/event-stream")


@hookimpl
def tollhouse_response(call: Call, flow: http.HTTPFlow) -> None:
    response = flow.response
    if not _is_openai(call) or response is None:
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
    if isinstance(body, dict):
        apply_openai_body(call, body)


@hookimpl
def tollhouse_sse_event(call: Call, event: SSEEvent) -> None:
    if not _is_openai(call):
        return
    data = event.data

    # Substring checks avoid parsing the many delta events. A JSON string cannot contain `"usage"`
    # unescaped, so the key is found only where it is a key (or the string value "usage").
    has_usage = '"usage"' in data and '"usage":null' not in data
    wants_model = call.response_model is None and '"model"' in data
    if not (has_usage or wants_model):
        return

    chunk = event.json
    if not isinstance(chunk, dict):
        return
    # Responses events wrap the response object. Chat Completions chunks are flat.
    response = chunk.get("response")
    if isinstance(response, dict):
        apply_openai_body(call, response)
    else:
        apply_openai_body(call, chunk)
