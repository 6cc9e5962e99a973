"""OpenAI endpoints of the fake upstream: chat completions, responses, embeddings and models.

Bodies follow api.openai.com as recorded in 2025-2026: JSON indented by 2 spaces with a final newline,
error bodies indented by 4, SSE data compact with raw UTF-8. Chat streams have `data:` lines only and
end with ``data: [DONE]``; Responses streams have `event:` lines and carry usage only in the final
`response.completed` (or `response.incomplete`) event.
"""

from __future__ import annotations

import base64
import math
import random
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from addons.testing.fake_upstream import (
    DEFAULT_TEXT,
    HEX_DIGITS,
    MODEL_SNAPSHOTS,
    BadRequest,
    Exchange,
    Fault,
    Headers,
    ReceivedRequest,
    Reply,
    deterministic_token,
    estimate_tokens,
    example_arguments,
    json_compact,
    json_indented,
    limit_pieces,
    merge_usage,
    resolve_model,
    split_tokens,
    sse_event,
)

KIND = "openai"

JSON = "application/json"
JSON_UTF8 = "application/json; charset=utf-8"
EVENT_STREAM = "text/event-stream; charset=utf-8"
RATE_LIMIT_REQUESTS = 30_000
RATE_LIMIT_TOKENS = 150_000_000

SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"
EMBEDDING_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


# --- headers and errors ----------------------------------------------------------------------------


def response_headers(exchange: Exchange, content_type: str, prompt_tokens: int = 0) -> Headers:
    """Return the headers api.openai.com sends with every response, rate limits included."""
    return [
        ("content-type", content_type),
        ("openai-organization", "fake-org"),
        ("openai-processing-ms", str(120 + round(exchange.steering.fault.slow * 1000))),
        ("openai-project", "proj_fake"),
        ("openai-version", "2020-10-01"),
        ("x-ratelimit-limit-requests", str(RATE_LIMIT_REQUESTS)),
        ("x-ratelimit-limit-tokens", str(RATE_LIMIT_TOKENS)),
        ("x-ratelimit-remaining-requests", str(RATE_LIMIT_REQUESTS - 1)),
        ("x-ratelimit-remaining-tokens", str(RATE_LIMIT_TOKENS - prompt_tokens)),
        ("x-ratelimit-reset-requests", "2ms"),
        ("x-ratelimit-reset-tokens", "0s"),
        ("x-request-id", exchange.make_id("req_", 32, alphabet=HEX_DIGITS, name="request")),
    ]


def error_reply(
    exchange: Exchange,
    status: int,
    message: str,
    error_type: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Headers | None = None,
) -> Reply:
    """Return an error in OpenAI's layout: ``{"error": {message, type, param, code}}``."""
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return Reply(status, headers or response_headers(exchange, JSON_UTF8), json_indented(body, 4))


def presented_key(request: ReceivedRequest) -> str | None:
    """Return the key from `Authorization: Bearer <key>` or Azure's `api-key`, or None when there is none."""
    azure_key = request.header("api-key")
    if azure_key is not None:
        return azure_key
    authorization = request.header("authorization")
    if authorization is None:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else authorization


def authentication_error(exchange: Exchange, key: str | None) -> Reply:
    """Return the 401 for a missing or wrong key. Like older API versions, the message repeats the key in full."""
    if not key:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        return error_reply(exchange, 401, message, "invalid_request_error")
    message = (
        f"Incorrect API key provided: {key}. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )
    return error_reply(exchange, 401, message, "invalid_request_error", code="invalid_api_key")


def invalid_request_error(exchange: Exchange, message: str, param: str | None = None) -> Reply:
    """Return a 400 invalid_request_error."""
    return error_reply(exchange, 400, message, "invalid_request_error", param=param)


def not_found_error(exchange: Exchange, message: str | None = None) -> Reply:
    """Return the 404 for a path this fake does not serve (or a missing fixture, with `message`)."""
    request = exchange.request
    text = message or f"Invalid URL ({request.method} {request.path})"
    return error_reply(exchange, 404, text, "invalid_request_error")


def fault_error(exchange: Exchange, status: int) -> Reply:
    """Return the error body and headers that api.openai.com sends with `status`, for `x-fault`."""
    fault = exchange.steering.fault
    model = _requested_model(exchange)
    headers = response_headers(exchange, JSON_UTF8)
    headers.append(("x-should-retry", "true" if fault.retry else "false"))
    if status in (429, 503) or fault.retry_after is not None:
        seconds = 1.0 if fault.retry_after is None else fault.retry_after
        headers.append(("retry-after", str(math.ceil(seconds))))
        if fault.retry_after is not None:
            headers.append(("retry-after-ms", str(round(seconds * 1000))))

    if status == 401:
        return authentication_error(exchange, presented_key(exchange.request))
    if status == 404:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return error_reply(exchange, 404, message, "invalid_request_error", code="model_not_found", headers=headers)
    if status == 429:
        _set_header(headers, "x-ratelimit-remaining-requests", "0")
        _set_header(headers, "x-ratelimit-reset-requests", "1s")
        message = (
            f"Rate limit reached for {model} in organization org-fake on requests per min (RPM): "
            f"Limit {RATE_LIMIT_REQUESTS}, Used {RATE_LIMIT_REQUESTS}, Requested 1. Please try again in 1s. "
            "Visit https://platform.openai.com/account/rate-limits to learn more."
        )
        return error_reply(exchange, 429, message, "requests", code="rate_limit_exceeded", headers=headers)
    if status == 503:
        message = "The server is overloaded or not ready yet."
        return error_reply(exchange, 503, message, "server_error", headers=headers)
    if status >= 500:
        return error_reply(exchange, status, SERVER_ERROR_MESSAGE, "server_error", headers=headers)
    message = f"The request failed with status {status}, as its x-fault header asked."
    return error_reply(exchange, status, message, "invalid_request_error", headers=headers)


def _set_header(headers: Headers, name: str, value: str) -> None:
    headers[:] = [(key, value if key == name else old) for key, old in headers]


def _requested_model(exchange: Exchange) -> str:
    body = exchange.request.json
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else "unknown"


_AZURE_DEPLOYMENT_PATH = re.compile(r"^/openai/deployments/[^/]+(/.*)$")


def route(method: str, path: str) -> Callable[[Exchange], Reply] | None:
    """Return the handler for `method` and `path`, or None when this fake does not serve them.

    Azure's paths (`/openai/deployments/{deployment}/...` and `/openai/v1/...`) and paths under a
    base-URL prefix (`/prefix/v1/...`) are served like the `/v1/...` path they end with.
    """
    path = path.rstrip("/")
    deployment = _AZURE_DEPLOYMENT_PATH.match(path)
    if deployment:
        path = "/v1" + deployment.group(1)
    elif not path.startswith("/v1/") and "/v1/" in path:
        path = path[path.index("/v1/"):]
    if method == "POST":
        return {"/v1/chat/completions": chat_completions, "/v1/responses": responses, "/v1/embeddings": embeddings}.get(
            path
        )
    if method == "GET" and path == "/v1/models":
        return list_models
    if method == "GET" and path.startswith("/v1/models/"):
        return retrieve_model
    return None


# --- shared request reading ------------------------------------------------------------------------


@dataclass(slots=True)
class ToolCall:
    """A function call the fake model makes: arguments as JSON text and as streamed fragments."""

    call_id: str
    name: str
    arguments: str
    fragments: list[str] = field(default_factory=list)


def _required_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    return model


def _is_reasoning_model(model: str) -> bool:
    return model.startswith(("o1", "o3", "o4", "gpt-5"))


def _fingerprint(model: str) -> str | None:
    """Return the `system_fingerprint`, which is null for reasoning models (as recorded for gpt-5-nano)."""
    if _is_reasoning_model(model):
        return None
    return "fp_" + deterministic_token(model, 10, HEX_DIGITS)


def _obfuscation(seed: str) -> str:
    """Return deterministic padding for the `obfuscation` field, 1 to 16 characters long."""
    token = deterministic_token(seed, 17)
    return token[1 : 2 + int(token[0], 36) % 16]


def _service_tier(body: dict[str, Any]) -> str:
    tier = body.get("service_tier")
    return tier if tier in ("default", "flex", "priority", "scale") else "default"


def _make_tool_call(exchange: Exchange, name: str, schema: Any) -> ToolCall:
    arguments = json_compact(example_arguments(schema))
    fragments = [arguments[start : start + 4] for start in range(0, len(arguments), 4)]
    return ToolCall(exchange.make_id("call_", 24), name, arguments, fragments)


def _pick_tool(
    tools: list[dict[str, Any]], choice: Any, after_tool_result: bool, forced: bool | None
) -> dict[str, Any] | None:
    """Return the tool to call, or None for a text reply.

    The fake calls the first tool (or the one `choice` names) unless `choice` is "none", the last input
    is a tool result, or `x-fake-tool-call` decides otherwise.
    """
    if not tools or forced is False or choice == "none":
        return None
    if isinstance(choice, dict):
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        return next((tool for tool in tools if tool["name"] == name), tools[0])
    if after_tool_result and not forced and choice != "required":
        return None
    return tools[0]


# --- chat completions ------------------------------------------------------------------------------


@dataclass(slots=True)
class ChatPlan:
    """Planned output of the fake model for a chat request."""

    pieces: list[str]
    tool: ToolCall | None
    finish_reason: str


def chat_completions(exchange: Exchange) -> Reply:
    """Handle ``POST /v1/chat/completions``, returning JSON, or SSE when the request has ``stream: true``."""
    body = exchange.json_body()
    model = resolve_model(_required_model(body))
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("Missing required parameter: 'messages'.", "messages")
    if not messages:
        raise BadRequest("[] is too short - 'messages'", "messages")

    plan = _plan_chat(exchange, body, messages)
    usage = _chat_usage(exchange, body, plan)
    headers = response_headers(exchange, EVENT_STREAM if body.get("stream") else JSON, usage["prompt_tokens"])
    if body.get("stream"):
        return Reply(200, headers, events=_chat_stream_events(exchange, body, model, plan, usage))
    return Reply(200, headers, _chat_json(exchange, body, model, plan, usage))


def _plan_chat(exchange: Exchange, body: dict[str, Any], messages: list[Any]) -> ChatPlan:
    tools = [
        {"name": tool["function"].get("name"), "parameters": tool["function"].get("parameters")}
        for tool in body.get("tools") or []
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)
    ]
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    tool = _pick_tool(tools, body.get("tool_choice", "auto"), last.get("role") == "tool", exchange.steering.tool_call)
    if tool is not None:
        return ChatPlan([], _make_tool_call(exchange, tool["name"], tool["parameters"]), "tool_calls")

    # NOTE: `n`, `stop` and `logprobs` are accepted but ignored: the reply is always one choice.
    text = exchange.steering.text if exchange.steering.text is not None else DEFAULT_TEXT
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    pieces, truncated = limit_pieces(split_tokens(text), limit)
    return ChatPlan(pieces, None, "length" if truncated else "stop")


def _chat_usage(exchange: Exchange, body: dict[str, Any], plan: ChatPlan) -> dict[str, Any]:
    prompt = estimate_tokens(body.get("messages"), body.get("tools"))
    completion = max(1, len(plan.pieces) + (len(plan.tool.fragments) if plan.tool else 0))
    default = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    usage = merge_usage(default, exchange.steering.usage)
    if "total_tokens" not in exchange.steering.usage:
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def _chat_json(exchange: Exchange, body: dict[str, Any], model: str, plan: ChatPlan, usage: dict[str, Any]) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.pieces) if plan.tool is None else None}
    if plan.tool is not None:
        function = {"name": plan.tool.name, "arguments": plan.tool.arguments}
        message["tool_calls"] = [{"id": plan.tool.call_id, "type": "function", "function": function}]
    message["refusal"] = None
    message["annotations"] = []

    choice: dict[str, Any] = {"index": 0, "message": message}
    if not _is_reasoning_model(model):
        choice["logprobs"] = None  # reasoning models leave the key out, as recorded for gpt-5-nano
    choice["finish_reason"] = plan.finish_reason
    completion = {
        "id": exchange.make_id("chatcmpl-", 29, name="completion"),
        "object": "chat.completion",
        "created": exchange.created,
        "model": model,
        "choices": [choice],
        "usage": usage,
        "service_tier": _service_tier(body),
        "system_fingerprint": _fingerprint(model),
    }
    return json_indented(completion, 2)


def _chat_stream_events(
    exchange: Exchange, body: dict[str, Any], model: str, plan: ChatPlan, usage: dict[str, Any]
) -> list[str]:
    """Build the chunk events.

    With `stream_options.include_usage`, every chunk has ``"usage": null`` before `obfuscation`, and a
    last chunk with ``"choices": []`` carries the usage. Without it, no chunk has a `usage` key.
    `obfuscation` is present unless `stream_options.include_obfuscation` is false. With `x-fault: midstream-error`,
    an error object follows half of the content chunks and ends the stream. With `early-error`, the error object
    is the only event.
    """
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    include_usage = options.get("include_usage") is True
    obfuscate = options.get("include_obfuscation") is not False
    crlf = exchange.steering.crlf
    base = {
        "id": exchange.make_id("chatcmpl-", 29, name="completion"),
        "object": "chat.completion.chunk",
        "created": exchange.created,
        "model": model,
        "service_tier": _service_tier(body),
        "system_fingerprint": _fingerprint(model),
    }
    events: list[str] = []
    if exchange.steering.fault.early_error:
        events.append(sse_event(json_compact({"error": _stream_error()}), crlf=crlf))
        return events

    def add_chunk(choices: list[dict[str, Any]], chunk_usage: dict[str, Any] | None = None) -> None:
        chunk: dict[str, Any] = {**base, "choices": choices}
        if include_usage:
            chunk["usage"] = chunk_usage
        if obfuscate:
            chunk["obfuscation"] = _obfuscation(f"{base['id']}:{len(events)}")
        events.append(sse_event(json_compact(chunk), crlf=crlf))

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    if plan.tool is not None:
        call = {
            "index": 0,
            "id": plan.tool.call_id,
            "type": "function",
            "function": {"name": plan.tool.name, "arguments": ""},
        }
        add_chunk([choice({"role": "assistant", "content": None, "tool_calls": [call], "refusal": None})])
        deltas = [{"tool_calls": [{"index": 0, "function": {"arguments": part}}]} for part in plan.tool.fragments]
    else:
        add_chunk([choice({"role": "assistant", "content": "", "refusal": None})])
        deltas = [{"content": piece} for piece in plan.pieces]

    error_after = math.ceil(len(deltas) / 2) if exchange.steering.fault.midstream_error else None
    for index, delta in enumerate(deltas):
        if index == error_after:
            break
        add_chunk([choice(delta)])
    if error_after is not None:
        events.append(sse_event(json_compact({"error": _stream_error()}), crlf=crlf))
        return events

    add_chunk([choice({}, plan.finish_reason)])
    if include_usage:
        add_chunk([], usage)
    events.append(sse_event("[DONE]", crlf=crlf))
    return events


def _stream_error() -> dict[str, Any]:
    """Return the error object that a failing chat stream sends in place of a chunk."""
    return {"message": SERVER_ERROR_MESSAGE, "type": "server_error", "param": None, "code": None}


# --- responses -------------------------------------------------------------------------------------


@dataclass(slots=True)
class ResponsesPlan:
    """Planned output of the fake model for a Responses request."""

    reasoning: bool
    pieces: list[str]
    tool: ToolCall | None
    incomplete: bool


def responses(exchange: Exchange) -> Reply:
    """Handle ``POST /v1/responses``, returning JSON, or SSE with `event:` lines when ``stream: true``."""
    body = exchange.json_body()
    model = resolve_model(_required_model(body))
    if "input" not in body and "previous_response_id" not in body:
        raise BadRequest("Missing required parameter: 'input'.", "input")

    plan = _plan_responses(exchange, body)
    usage = _responses_usage(exchange, body, plan)

    ids = {
        "response": exchange.make_id("resp_", 50, alphabet=HEX_DIGITS),
        "reasoning": exchange.make_id("rs_", 50, alphabet=HEX_DIGITS),
        "message": exchange.make_id("msg_", 50, alphabet=HEX_DIGITS),
        "function": exchange.make_id("fc_", 50, alphabet=HEX_DIGITS),
    }
    headers = response_headers(exchange, EVENT_STREAM if body.get("stream") else JSON, usage["input_tokens"])
    if body.get("stream"):
        return Reply(200, headers, events=_responses_stream_events(exchange, body, model, plan, usage, ids))
    output = _responses_output(body, plan, ids, status="completed")
    document = _response_object(exchange, body, model, ids["response"], output, usage, streamed=False)
    return Reply(200, headers, json_indented(document, 2))


def _responses_usage(exchange: Exchange, body: dict[str, Any], plan: ResponsesPlan) -> dict[str, Any]:
    prompt = estimate_tokens(body.get("instructions"), body.get("input"), body.get("tools"))
    output = max(1, len(plan.pieces) + (len(plan.tool.fragments) if plan.tool else 0))
    default = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }
    usage = merge_usage(default, exchange.steering.usage)
    if "total_tokens" not in exchange.steering.usage:
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    return usage


def _plan_responses(exchange: Exchange, body: dict[str, Any]) -> ResponsesPlan:
    """Plan the output. A reasoning item comes first when `x-fake-usage` sets reasoning tokens."""
    details = exchange.steering.usage.get("output_tokens_details")
    reasoning_tokens = details.get("reasoning_tokens") if isinstance(details, dict) else None
    reasoning = isinstance(reasoning_tokens, int) and reasoning_tokens > 0
    items = body.get("input") if isinstance(body.get("input"), list) else []
    last = items[-1] if items and isinstance(items[-1], dict) else {}
    tools = [
        {"name": tool.get("name"), "parameters": tool.get("parameters")}
        for tool in body.get("tools") or []
        if isinstance(tool, dict) and tool.get("type") == "function"
    ]
    choice = body.get("tool_choice", "auto")
    tool = _pick_tool(tools, choice, last.get("type") == "function_call_output", exchange.steering.tool_call)
    if tool is not None:
        call = _make_tool_call(exchange, tool["name"], tool["parameters"])
        return ResponsesPlan(reasoning, [], call, False)

    text = exchange.steering.text if exchange.steering.text is not None else DEFAULT_TEXT
    pieces, truncated = limit_pieces(split_tokens(text), body.get("max_output_tokens"))
    return ResponsesPlan(reasoning, pieces, None, truncated)


def _responses_output(
    body: dict[str, Any], plan: ResponsesPlan, ids: dict[str, str], *, status: str
) -> list[dict[str, Any]]:
    """Return the `output` items: an optional reasoning item, then a function call or a message."""
    output: list[dict[str, Any]] = []
    if plan.reasoning:
        output.append(_reasoning_item(body, ids, done=True))
    if plan.tool is not None:
        output.append(_function_call_item(plan.tool, ids, plan.tool.arguments, "completed"))
    else:
        message_status = "incomplete" if plan.incomplete else status
        output.append(_message_item(ids, [_output_text("".join(plan.pieces))], message_status))
    return output


def _reasoning_item(body: dict[str, Any], ids: dict[str, str], *, done: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"id": ids["reasoning"], "type": "reasoning"}
    if done and "reasoning.encrypted_content" in (body.get("include") or []):
        item["encrypted_content"] = "gAAAAB" + deterministic_token(ids["reasoning"], 120)
    item["summary"] = []
    return item


def _function_call_item(tool: ToolCall, ids: dict[str, str], arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": ids["function"],
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": tool.call_id,
        "name": tool.name,
    }


def _message_item(ids: dict[str, str], content: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "id": ids["message"],
        "type": "message",
        "status": status,
        "content": content,
        "phase": "final_answer",
        "role": "assistant",
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _response_object(
    exchange: Exchange,
    body: dict[str, Any],
    model: str,
    response_id: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    *,
    streamed: bool,
    status: str = "completed",
) -> dict[str, Any]:
    """Return the `response` object. Request parameters are echoed, and `usage` is None until the end."""
    finished = status in ("completed", "incomplete")
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    document: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": exchange.created,
        "status": status,
        "background": bool(body.get("background", False)),
    }
    if not streamed:
        document["billing"] = {"payer": "developer"}
    document |= {
        "completed_at": exchange.created if finished else None,
        "error": None,
        "frequency_penalty": body.get("frequency_penalty", 0.0),
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": model,
        "moderation": None,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "presence_penalty": body.get("presence_penalty", 0.0),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "prompt_cache_retention": body.get("prompt_cache_retention"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": _service_tier(body) if finished else body.get("service_tier", "auto"),
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": text.get("format", {"type": "text"}), "verbosity": text.get("verbosity", "medium")},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [_echo_tool(tool) for tool in body.get("tools") or [] if isinstance(tool, dict)],
        "top_logprobs": body.get("top_logprobs", 0),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": usage,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }
    return document


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """Return a function tool as the API echoes it: strict by default, closed to extra properties."""
    if tool.get("type") != "function":
        return tool
    strict = tool.get("strict", True)
    parameters = dict(tool.get("parameters") or {})
    if strict:
        parameters.setdefault("additionalProperties", False)
    return {
        "type": "function",
        "description": tool.get("description"),
        "name": tool.get("name"),
        "parameters": parameters,
        "strict": strict,
    }


def _responses_stream_events(
    exchange: Exchange,
    body: dict[str, Any],
    model: str,
    plan: ResponsesPlan,
    usage: dict[str, Any],
    ids: dict[str, str],
) -> list[str]:
    """Build the Responses event stream. Each event's data has `type` first, then its fields sorted."""
    crlf = exchange.steering.crlf
    events: list[str] = []

    def add(event_type: str, **fields: Any) -> None:
        fields["sequence_number"] = len(events)
        data = {"type": event_type} | dict(sorted(fields.items()))
        events.append(sse_event(json_compact(data), event=event_type, crlf=crlf))

    def response(status: str, output: list[dict[str, Any]], final_usage: dict[str, Any] | None) -> dict[str, Any]:
        return _response_object(
            exchange, body, model, ids["response"], output, final_usage, streamed=True, status=status
        )

    add("response.created", response=response("in_progress", [], None))
    add("response.in_progress", response=response("in_progress", [], None))

    index = 0
    if plan.reasoning:
        add("response.output_item.added", item=_reasoning_item(body, ids, done=False), output_index=index)
        add("response.output_item.done", item=_reasoning_item(body, ids, done=True), output_index=index)
        index += 1

    fault = exchange.steering.fault
    if plan.tool is not None:
        error_after = _error_position(fault, len(plan.tool.fragments))
        finished = _stream_function_call(add, plan.tool, ids, index, error_after)
    else:
        finished = _stream_message(add, plan, ids, index, _error_position(fault, len(plan.pieces)))
    if not finished:
        return events

    status = "incomplete" if plan.incomplete else "completed"
    output = _responses_output(body, plan, ids, status="completed")
    add(f"response.{status}", response=response(status, output, usage))
    return events


def _error_position(fault: Fault, delta_count: int) -> int | None:
    """Return how many of `delta_count` deltas precede the fault's error event, or None for no error event."""
    if fault.early_error:
        return 0
    if fault.midstream_error:
        return math.ceil(delta_count / 2)
    return None


def _stream_message(
    add: Callable[..., None], plan: ResponsesPlan, ids: dict[str, str], index: int, error_after: int | None
) -> bool:
    """Add the events of a message item, ending with an error event after `error_after` deltas if set.

    Return False when the error event ended the stream.
    """
    item_id = ids["message"]
    add("response.output_item.added", item=_message_item(ids, [], "in_progress"), output_index=index)
    add("response.content_part.added", content_index=0, item_id=item_id, output_index=index, part=_output_text(""))
    for position, piece in enumerate(plan.pieces):
        if position == error_after:
            break
        add(
            "response.output_text.delta",
            content_index=0,
            delta=piece,
            item_id=item_id,
            logprobs=[],
            obfuscation=_obfuscation(f"{item_id}:{position}"),
            output_index=index,
        )
    if error_after is not None:
        add("error", code="server_error", message=SERVER_ERROR_MESSAGE, param=None)
        return False

    text = "".join(plan.pieces)
    status = "incomplete" if plan.incomplete else "completed"
    add("response.output_text.done", content_index=0, item_id=item_id, logprobs=[], output_index=index, text=text)
    add("response.content_part.done", content_index=0, item_id=item_id, output_index=index, part=_output_text(text))
    add("response.output_item.done", item=_message_item(ids, [_output_text(text)], status), output_index=index)
    return True


def _stream_function_call(
    add: Callable[..., None], tool: ToolCall, ids: dict[str, str], index: int, error_after: int | None
) -> bool:
    """Add the events of a function call item, ending with an error event after `error_after` deltas if set.

    Return False when the error event ended the stream.
    """
    item_id = ids["function"]
    add("response.output_item.added", item=_function_call_item(tool, ids, "", "in_progress"), output_index=index)
    for position, fragment in enumerate(tool.fragments):
        if position == error_after:
            break
        add(
            "response.function_call_arguments.delta",
            delta=fragment,
            item_id=item_id,
            obfuscation=_obfuscation(f"{item_id}:{position}"),
            output_index=index,
        )
    if error_after is not None:
        add("error", code="server_error", message=SERVER_ERROR_MESSAGE, param=None)
        return False

    add("response.function_call_arguments.done", arguments=tool.arguments, item_id=item_id, output_index=index)
    done_item = _function_call_item(tool, ids, tool.arguments, "completed")
    add("response.output_item.done", item=done_item, output_index=index)
    return True


# --- embeddings and models -------------------------------------------------------------------------


def embeddings(exchange: Exchange) -> Reply:
    """Handle ``POST /v1/embeddings``, returning deterministic unit vectors as floats or base64 float32."""
    body = exchange.json_body()
    model = _required_model(body)
    inputs = _embedding_inputs(body.get("input"))
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise BadRequest(f"Invalid value for 'encoding_format': {encoding_format!r}.", "encoding_format")
    dimensions = body.get("dimensions", EMBEDDING_DIMENSIONS.get(model, 1536))
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
        raise BadRequest(f"Invalid value for 'dimensions': {dimensions!r}.", "dimensions")

    data = []
    for index, item in enumerate(inputs):
        vector = embedding_vector(model, item, dimensions)
        if encoding_format == "base64":
            encoded: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
        else:
            encoded = vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})

    prompt = sum(len(item) if isinstance(item, list) else estimate_tokens(item) for item in inputs)
    usage = merge_usage({"prompt_tokens": prompt, "total_tokens": prompt}, exchange.steering.usage)
    if "total_tokens" not in exchange.steering.usage:
        usage["total_tokens"] = usage["prompt_tokens"]
    document = {"object": "list", "data": data, "model": model, "usage": usage}
    return Reply(200, response_headers(exchange, JSON, usage["prompt_tokens"]), json_indented(document, 2))


def _embedding_inputs(value: Any) -> list[Any]:
    """Return the inputs as a list of strings or token-id lists, or raise BadRequest for other shapes."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value):
            return [value]
        if all(isinstance(item, str) and item for item in value):
            return list(value)
        if all(isinstance(item, list) and item and all(isinstance(t, int) for t in item) for item in value):
            return list(value)
    raise BadRequest("'input' must be a non-empty string, array of strings, or array of token arrays.", "input")


def embedding_vector(model: str, item: Any, dimensions: int) -> list[float]:
    """Return a deterministic unit vector for `item`, each value exactly representable as float32."""
    rng = random.Random(f"{model}:{json_compact(item)}")
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [_shortest_float32(value / norm) for value in raw]


def _shortest_float32(value: float) -> float:
    """Round `value` to float32, then return the shortest decimal that reads back as that float32."""
    (single,) = struct.unpack("<f", struct.pack("<f", value))
    for digits in range(6, 10):
        candidate = float(f"{single:.{digits}g}")
        if struct.pack("<f", candidate) == struct.pack("<f", single):
            return candidate
    return single


def list_models(exchange: Exchange) -> Reply:
    """Handle ``GET /v1/models``, listing the OpenAI aliases in the snapshot table."""
    names = [name for name in MODEL_SNAPSHOTS if not name.startswith("claude")] + list(EMBEDDING_DIMENSIONS)
    document = {"object": "list", "data": [_model_entry(name) for name in names]}
    return Reply(200, response_headers(exchange, JSON), json_indented(document, 2))


def retrieve_model(exchange: Exchange) -> Reply:
    """Handle ``GET /v1/models/{id}``. Every id exists, because the fake echoes unknown model names."""
    name = exchange.request.path.rstrip("/").removeprefix("/v1/models/")
    return Reply(200, response_headers(exchange, JSON), json_indented(_model_entry(name), 2))


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
