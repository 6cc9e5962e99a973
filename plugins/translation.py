"""Translates between OpenAI Chat Completions and Anthropic Messages when client and provider differ.

The base-URL listener lets a client speak one format to a provider of the other: `/v1/chat/completions`
routed to an Anthropic provider (Portkey's unified OpenAI format), or `/v1/messages` routed to an
OpenAI-format provider. This plugin rewrites the request (body, path, headers) and translates the
response back. `tollhouse_response` translates a JSON response or an upstream error, and
`tollhouse_sse_event` translates a stream event by event.

The usage plugins read the provider's own events and bodies, because the response hooks here are
marked `trylast`. So a translated call is priced once, on the provider's counts. Other endpoints
(embeddings, responses, count_tokens) have no counterpart in the other format and get a 400.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from addons import hookimpl
from addons.errors import error_response
from addons.routing import native_path, upstream_path
from addons.translation import (
    ChatToMessagesStream,
    MessagesToChatStream,
    TranslationError,
    chat_to_messages_request,
    chat_to_messages_response,
    error_to_anthropic,
    error_to_openai,
    messages_to_chat_request,
    messages_to_chat_response,
)
from plugins.stream_usage import TRANSLATED_KEY

if TYPE_CHECKING:
    from mitmproxy import http

    from addons.call import Call
    from addons.sse import SSEEvent

#: `call.metadata` key of the stream translator of a translated streamed call.
STREAM_KEY = "translation.stream"

ANTHROPIC_VERSION = "2023-06-01"

# The client path each translation starts from, and the upstream path it goes to.
_CHAT_PATH = "/v1/chat/completions"
_MESSAGES_PATH = "/v1/messages"

# Anthropic request headers that an OpenAI-format provider must not receive.
_ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")


def _needs_translation(call: Call) -> bool:
    return (
        call.provider is not None
        and call.client_format is not None
        and call.client_format != call.provider.api_format
    )


def _reject(call: Call, flow: http.HTTPFlow, message: str) -> None:
    call.answered_by_gateway = True
    call.error = message
    flow.response = error_response(call.client_format, 400, message, request_id=call.request_id)


@hookimpl(tryfirst=True)
def tollhouse_upstream_request(call: Call, flow: http.HTTPFlow) -> None:
    # tryfirst, so that the other plugins get the request as it goes upstream and
    # `plugins.stream_usage` finds `TRANSLATED_KEY`.
    if flow.response is not None or not _needs_translation(call):
        return
    provider = call.provider
    client_path = native_path(call.path)
    if call.client_format == "openai" and client_path == _CHAT_PATH:
        target_path, target_endpoint = _MESSAGES_PATH, "messages"
    elif call.client_format == "anthropic" and client_path == _MESSAGES_PATH:
        target_path, target_endpoint = _CHAT_PATH, "chat.completions"
    else:
        _reject(
            call, flow,
            f"tollhouse: {client_path} cannot be sent to provider {provider.name!r} (kind {provider.kind}): only "
            f"{_CHAT_PATH} and {_MESSAGES_PATH} are translated between the OpenAI and Anthropic formats. "
            "Choose a provider of the client's format with the x-portkey-provider header.",
        )
        return

    body = call.request_json
    if body is None:
        _reject(call, flow, "tollhouse: the request body must be a JSON object to be translated.")
        return
    try:
        if target_endpoint == "messages":
            translated = chat_to_messages_request(body)
        else:
            translated = messages_to_chat_request(body)
    except TranslationError as e:
        _reject(call, flow, f"tollhouse: cannot translate the request for provider {provider.name!r}: {e}")
        return

    request = flow.request
    request.content = json.dumps(translated, ensure_ascii=False, separators=(",", ":")).encode()
    request.path = upstream_path(provider, request.path, target_path)
    request.headers["content-type"] = "application/json"
    if target_endpoint == "messages":
        request.headers["anthropic-version"] = ANTHROPIC_VERSION
    else:
        for name in _ANTHROPIC_HEADERS:
            request.headers.pop(name, None)
    call.endpoint = target_endpoint
    call.metadata[TRANSLATED_KEY] = True

    if call.stream:
        call.rewrite_stream = True
        if target_endpoint == "messages":
            call.metadata[STREAM_KEY] = MessagesToChatStream(include_usage=_client_wants_usage(body))
        else:
            call.metadata[STREAM_KEY] = ChatToMessagesStream()


def _client_wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


@hookimpl(trylast=True)
def tollhouse_sse_event(call: Call, event: SSEEvent) -> bool | None:
    translator = call.metadata.get(STREAM_KEY)
    if translator is None:
        return None
    if isinstance(translator, MessagesToChatStream):
        data = event.json
        translated = translator.feed(event.event, data) if isinstance(data, dict) else b""
    elif event.data == "[DONE]":
        translated = translator.feed(None)
    else:
        data = event.json
        translated = translator.feed(data) if isinstance(data, dict) else b""
    # NOTE: the translators' finish() is never called, because the gateway has no end-of-stream hook. A
    # stream cut before its last event therefore reaches the client without a closing error event.
    if not translated:
        return False
    event.raw = translated
    return None


@hookimpl(trylast=True)
def tollhouse_response(call: Call, flow: http.HTTPFlow) -> None:
    # trylast: the usage plugins have read the provider's own body before it is replaced.
    response = flow.response
    if response is None or response.stream or not call.metadata.get(TRANSLATED_KEY):
        return
    content = response.content or b""
    to_openai = call.client_format == "openai"
    if response.status_code >= 400:
        translated = error_to_openai(response.status_code, content) if to_openai else error_to_anthropic(
            response.status_code, content
        )
    else:
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # A response body that cannot be translated reaches the client as an error in its format.
            call.error = f"upstream answer is not a JSON object and could not be translated ({len(content)} bytes)"
            translated = error_to_openai(502, content) if to_openai else error_to_anthropic(502, content)
            response.status_code = 502
            call.status = 502
        elif to_openai:
            translated = json.dumps(messages_to_chat_response(body), ensure_ascii=False).encode()
        else:
            translated = json.dumps(chat_to_messages_response(body), ensure_ascii=False).encode()
    response.content = translated
    response.headers["content-type"] = "application/json"
